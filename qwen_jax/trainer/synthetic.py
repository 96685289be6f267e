"""Synthetic batches in the data pipeline's format, a pure function of (seed, step).

For tests and throughput runs (`--config.synthetic_data=true`): the same dict of numpy arrays
as `qwen_jax.data` yields — `input_ids`, `positions`, `segment_ids` (0 = padding), `targets`
(next token), `loss_mask` (float32; only "response" tokens count) — of shape
[per_process_batch, seq_len], this process's rows of the global batch.  Sequences follow a
learnable rule (next = (a * token + b) mod vocab).  Two layouts (`--config.synthetic_layout`):

* `packed`: rows hold one or two packed sequences, each with a "prompt" part without loss, then
  padding: what packed chat data looks like to the step (segment ids, per-document positions).
* `full_rows`: one sequence fills each row and every token counts; no `segment_ids`, and positions
  0..seq-1, which the trainer sends only where ring attention's zig-zag order needs them
  (`train_step.full_row_keys`): the batches the step harness (`benchmarks/train_throughput.py`)
  feeds, so the launcher and the harness time the same work.

Its state is just the step, saved like the pipeline's.
With `stages` (a progressive length schedule, `qwen_jax.data.schedule`) the shape of step k's
batch is its stage's, as the pipeline's would be.
"""

from __future__ import annotations

from collections.abc import Sequence

import numpy as np

from qwen_jax.data.schedule import Stage, stage_at

SYNTHETIC_LAYOUTS = ("packed", "full_rows")


def rule_sequence(rng: np.random.Generator, length: int, vocab: int) -> np.ndarray:
    """`length` tokens of next = (a * token + c) mod vocab from a random (a, c, first token)."""
    a, c, tok = (int(x) for x in rng.integers(1, vocab, 3))
    seq = np.empty(length, np.int64)
    for i in range(length):
        seq[i] = tok
        tok = (a * tok + c) % vocab
    return seq


class SyntheticBatches:
    def __init__(self, global_batch_size: int, seq_len: int, vocab_size: int, seed: int = 0,
                 process_index: int = 0, process_count: int = 1, stages: Sequence[Stage] = (),
                 layout: str = "packed"):
        if layout not in SYNTHETIC_LAYOUTS:
            raise ValueError(f"synthetic layout must be {' | '.join(SYNTHETIC_LAYOUTS)}, got {layout!r}")
        self.layout = layout
        self.stages = list(stages) or [Stage(int(seq_len), 0, int(global_batch_size))]
        for st in self.stages:
            if st.global_batch_size % process_count:
                raise ValueError(f"global batch {st.global_batch_size} does not divide over {process_count} processes")
        self.vocab = vocab_size
        self.seed, self.process_index, self.process_count = seed, process_index, process_count
        self.step = 0

    def global_batch(self, step: int) -> dict[str, np.ndarray]:
        rng = np.random.default_rng((self.seed, step))
        stage = stage_at(self.stages, step)
        b, t, v = stage.global_batch_size, stage.seq_len, min(self.vocab, 1 << 16)
        if self.layout == "full_rows":
            ids = np.stack([rule_sequence(rng, t + 1, v) for _ in range(b)]).astype(np.int32)
            return {"input_ids": np.ascontiguousarray(ids[:, :-1]), "targets": np.ascontiguousarray(ids[:, 1:]),
                    "positions": np.tile(np.arange(t, dtype=np.int32), (b, 1)),
                    "loss_mask": np.ones((b, t), np.float32)}
        ids = np.zeros((b, t + 1), np.int32)
        seg = np.zeros((b, t + 1), np.int32)
        pos = np.zeros((b, t + 1), np.int32)
        mask = np.zeros((b, t + 1), np.float32)
        for r in range(b):
            start = 0
            for s in range(1, 3):
                length = int(rng.integers(t // 4, t // 2 + 1))
                length = min(length, t + 1 - start)
                if length < 4:
                    break
                seq = rule_sequence(rng, length, v)
                prompt = int(rng.integers(1, length // 2 + 1))
                ids[r, start:start + length] = seq
                seg[r, start:start + length] = s
                pos[r, start:start + length] = np.arange(length)
                mask[r, start + prompt:start + length] = 1.0
                start += length
        same = seg[:, 1:] == seg[:, :-1]
        batch = {
            "input_ids": ids[:, :-1], "positions": pos[:, :-1], "segment_ids": seg[:, :-1],
            "targets": ids[:, 1:], "loss_mask": mask[:, 1:] * same * (seg[:, :-1] > 0),
        }
        return {k: np.ascontiguousarray(x) for k, x in batch.items()}

    def __iter__(self):
        return self

    def __next__(self) -> dict[str, np.ndarray]:
        batch = self.global_batch(self.step)
        self.step += 1
        n = len(batch["input_ids"]) // self.process_count
        lo = self.process_index * n
        return {k: x[lo:lo + n] for k, x in batch.items()}

    def get_state(self) -> dict:
        return {"step": self.step, "seed": self.seed}

    def set_state(self, state: dict) -> None:
        self.step = int(state["step"])
