"""Synthetic batches in the data pipeline's format, a pure function of (seed, step).

For tests and throughput runs (`--config.synthetic_data=true`): the same dict of numpy arrays
as `qwen_jax.data` yields — `input_ids`, `positions`, `segment_ids` (0 = padding), `targets`
(next token), `loss_mask` (float32; only "response" tokens count) — of shape
[per_process_batch, seq_len], this process's rows of the global batch.  Rows hold one or two
packed sequences following a learnable rule (next = (a * token + b) mod vocab), a "prompt" part
without loss, and padding at the end.  Its state is just the step, saved like the pipeline's.
With `stages` (a progressive length schedule, `qwen_jax.data.schedule`) the shape of step k's
batch is its stage's, as the pipeline's would be.
"""

from __future__ import annotations

from collections.abc import Sequence

import numpy as np

from qwen_jax.data.schedule import Stage, stage_at


class SyntheticBatches:
    def __init__(self, global_batch_size: int, seq_len: int, vocab_size: int, seed: int = 0,
                 process_index: int = 0, process_count: int = 1, stages: Sequence[Stage] = ()):
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
                a, c, tok = (int(x) for x in rng.integers(1, v, 3))
                seq = np.empty(length, np.int64)
                for i in range(length):
                    seq[i] = tok
                    tok = (a * tok + c) % v
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
