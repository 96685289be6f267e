"""Progressive sequence-length schedule.

``seq_len_schedule = "2048:0,8192:1000,32768:3000"`` means: length 2048 from step 0, 8192 from step 1000, 32768 from
step 3000.  An optional third field sets that stage's global batch size explicitly ("8192:1000:16").  Otherwise the
batch is ``global_batch_size`` at the first stage and, with ``hold_tokens_per_batch``, scaled so that
``batch * seq_len`` stays constant (it must divide evenly).  Batch shapes change only at stage boundaries, so a
jitted train step recompiles once per stage.
"""

from __future__ import annotations

import bisect
import dataclasses
import math

from qwen_jax.data.errors import DataError


@dataclasses.dataclass(frozen=True)
class Stage:
    seq_len: int
    start_step: int
    global_batch_size: int

    @property
    def tokens_per_batch(self) -> int:
        return self.seq_len * self.global_batch_size


def parse_schedule(spec: str, *, seq_len: int, global_batch_size: int, hold_tokens_per_batch: bool = True
                   ) -> list[Stage]:
    spec = (spec or "").strip()
    if not spec:
        return [Stage(int(seq_len), 0, int(global_batch_size))]
    raw = []
    for part in spec.split(","):
        fields = part.strip().split(":")
        if len(fields) not in (2, 3) or not all(f.strip().lstrip("-").isdigit() for f in fields):
            raise DataError(f"data.seq_len_schedule entry {part!r}: expected 'len:from_step' or 'len:from_step:batch'")
        raw.append(tuple(int(f) for f in fields))
    raw.sort(key=lambda r: r[1])
    if raw[0][1] != 0:
        raise DataError(f"data.seq_len_schedule {spec!r}: the first stage must start at step 0")
    stages: list[Stage] = []
    base_len = raw[0][0]
    for r in raw:
        length, start = r[0], r[1]
        if length <= 0:
            raise DataError(f"data.seq_len_schedule {spec!r}: lengths must be positive")
        if stages and start == stages[-1].start_step:
            raise DataError(f"data.seq_len_schedule {spec!r}: two stages start at step {start}")
        if len(r) == 3:
            batch = r[2]
        elif hold_tokens_per_batch:
            tokens = base_len * global_batch_size
            if tokens % length:
                raise DataError(f"data.seq_len_schedule {spec!r}: tokens per batch {tokens} (= {global_batch_size} x "
                                 f"{base_len}) is not divisible by stage length {length}")
            batch = tokens // length
        else:
            batch = global_batch_size
        if batch <= 0:
            raise DataError(f"data.seq_len_schedule {spec!r}: stage {length} gets batch {batch}")
        stages.append(Stage(length, start, batch))
    return stages


def stage_at(stages: list[Stage], step: int) -> Stage:
    i = bisect.bisect_right([s.start_step for s in stages], step) - 1
    return stages[max(i, 0)]


def auto_lanes(stages: list[Stage]) -> int:
    return math.gcd(*[s.global_batch_size for s in stages])


def packing_lanes(stages: list[Stage], num_lanes: int, process_count: int) -> int:
    """The number of packing lanes (``data.num_lanes``, 0 = auto), checked against every stage and the processes."""
    lanes = int(num_lanes) or auto_lanes(stages)
    if lanes < 1:
        raise DataError(f"data.num_lanes must be >= 0 (0 = auto), got {num_lanes}")
    for st in stages:
        if st.global_batch_size % lanes:
            raise DataError(f"data.num_lanes={lanes} does not divide the batch {st.global_batch_size} "
                            f"of stage seq_len={st.seq_len}")
    if lanes % process_count:
        raise DataError(f"process_count {process_count} must divide data.num_lanes={lanes} "
                        f"(set data.num_lanes; it must divide every stage's global batch: "
                        f"{[s.global_batch_size for s in stages]})")
    return lanes
