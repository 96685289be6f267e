"""A progressive length schedule through the trainer: 8 CPU devices, grad_accum_steps 2, a stage boundary crossed by
an uninterrupted run and by a run stopped before the boundary and extended past it; the losses are equal bit for bit.

Stages (global_batch_size 16, tokens per batch held): 16 x 32 for steps 1-4, then 8 x 64.  With 2 microbatches and
data x fsdp = 4 the second stage's microbatch is 4 rows, one per device group.  The optimizer schedule is constant
after warmup, so the learning rate does not depend on `total_steps` (which the extended run changes).
"""

from __future__ import annotations

import numpy as np
import pytest

from qwen_jax.data.schedule import parse_schedule
from qwen_jax.trainer.synthetic import SyntheticBatches
from tests import train_launch as tl

ARGS = ["--config.data.global_batch_size=16", "--config.data.seq_len_schedule=32:0,64:4",
        "--config.grad_accum_steps=2", "--config.mesh.data=2", "--config.mesh.fsdp=2", "--config.mesh.tensor=2",
        "--config.optimizer.schedule=constant", "--config.save_every=2"]
TOTAL = 7  # batches 0-3 are stage 1, batches 4-6 stage 2


def test_synthetic_batches_follow_the_schedule():
    stages = parse_schedule("32:0,64:4", seq_len=0, global_batch_size=16)
    data = SyntheticBatches(16, 32, 512, stages=stages, process_index=1, process_count=2)
    shapes = [next(data)["input_ids"].shape for _ in range(6)]
    assert shapes == [(8, 32)] * 4 + [(4, 64)] * 2  # this process's half of each global batch
    full = SyntheticBatches(16, 32, 512, stages=stages).global_batch(4)
    data.set_state({"step": 4})
    np.testing.assert_array_equal(next(data)["targets"], full["targets"][4:])


@pytest.mark.slow
def test_schedule_across_stage_boundary_resumes_exactly(tmp_path):
    ref_dir, run_dir = tmp_path / "uninterrupted", tmp_path / "stopped_and_extended"
    result = tl.run(ref_dir, *ARGS, f"--config.total_steps={TOTAL}", devices=8)
    assert result.returncode == 0, result.stdout + result.stderr
    assert "data schedule: 16 x 32 from step 0, 8 x 64 from step 4" in result.stdout
    ref = tl.losses(ref_dir)
    assert sorted(ref) == list(range(1, TOTAL + 1))

    # Stop before the boundary (checkpoint at step 3), then extend: the resumed run crosses it.
    result = tl.run(run_dir, *ARGS, "--config.total_steps=3", devices=8)
    assert result.returncode == 0, result.stdout + result.stderr
    result = tl.run(run_dir, *ARGS, f"--config.total_steps={TOTAL}", devices=8)
    assert result.returncode == 0, result.stdout + result.stderr
    assert f"resumed from {run_dir / 'checkpoints'} step 3" in result.stdout
    assert tl.losses(run_dir) == ref
