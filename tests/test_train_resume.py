"""Exact resume: SIGKILL at a random step and SIGTERM, relaunch, per-step losses equal the uninterrupted run's."""

from __future__ import annotations

import os
import random
import signal
import time

import pytest

from tests import train_launch as tl

pytestmark = pytest.mark.slow
TOTAL = 12  # steps (tl.TINY_ARGS), checkpoints every 3


@pytest.fixture(scope="module")
def reference(tmp_path_factory):
    workdir = tmp_path_factory.mktemp("uninterrupted")
    result = tl.run(workdir)
    assert result.returncode == 0, result.stdout + result.stderr
    losses = tl.losses(workdir)
    assert sorted(losses) == list(range(1, TOTAL + 1))
    assert losses[TOTAL] < losses[1]  # it learns
    return workdir, losses, result.stdout


def _wait_for_step(proc, workdir, step, timeout=300):
    deadline = time.time() + timeout
    while time.time() < deadline:
        if max(tl.losses(workdir), default=0) >= step:
            return
        assert proc.poll() is None, f"training exited early ({proc.returncode})"
        time.sleep(0.05)
    raise TimeoutError(f"step {step} not reached")


def _complete_checkpoints(workdir):
    d = os.path.join(workdir, "checkpoints")
    return sorted(int(n) for n in os.listdir(d) if n.isdigit()) if os.path.isdir(d) else []


def test_launch_log_and_outputs(reference):
    workdir, _, stdout = reference
    assert "parameters: " in stdout and "trainable" in stdout and "total" in stdout
    assert "step 12/12 | loss" in stdout and "mfu n/a" in stdout
    ckpts = _complete_checkpoints(workdir)
    assert ckpts[-1] == TOTAL and len(ckpts) <= 3
    root = os.path.join(workdir, "checkpoints")
    for name in ("config.json", "generation_config.json"):
        assert os.path.exists(os.path.join(root, name))
    assert set(os.listdir(os.path.join(root, str(TOTAL)))) >= {"params", "opt_state", "meta", "data"}
    events = [f for f in os.listdir(os.path.join(workdir, "tensorboard")) if f.startswith("events")]
    assert events
    scalars = _read_scalars(os.path.join(workdir, "tensorboard", events[0]))
    assert [step for step, _ in scalars["train/loss"]] == list(range(1, TOTAL + 1))
    assert {"train/grad_norm", "train/learning_rate", "train/tokens_per_sec", "train/step_time"} <= set(scalars)


def _read_scalars(path):
    """{tag: [(step, value)]} from a TensorBoard event file (TFRecord framing, tensorboardX protos)."""
    import struct

    from tensorboardX.proto import event_pb2

    out = {}
    with open(path, "rb") as f:
        while header := f.read(12):
            (length,) = struct.unpack("<Q", header[:8])
            data = f.read(length)
            f.read(4)
            event = event_pb2.Event.FromString(data)
            for v in event.summary.value:
                out.setdefault(v.tag, []).append((event.step, v.simple_value))
    return out


def test_sigkill_at_random_step_resumes_exactly(reference, tmp_path):
    _, ref, _ = reference
    kill_at = random.Random().randint(4, TOTAL - 1)
    proc = tl.launch(tmp_path, log=tmp_path / "run1.log")
    _wait_for_step(proc, tmp_path, kill_at)
    while not _complete_checkpoints(tmp_path):
        time.sleep(0.05)
    proc.send_signal(signal.SIGKILL)
    proc.wait()
    first = tl.losses(tmp_path)
    resume_from = max(_complete_checkpoints(tmp_path))
    assert resume_from < TOTAL
    result = tl.run(tmp_path)
    assert result.returncode == 0, result.stdout + result.stderr
    assert "resumed from" in result.stdout and f"step {resume_from}" in result.stdout
    records = tl.all_records(tmp_path)  # steps logged after the checkpoint by the killed run are cut on resume
    assert [r["step"] for r in records] == list(range(1, TOTAL + 1)), (kill_at, resume_from, first.keys())
    assert {r["step"]: r["loss"] for r in records} == ref
    assert all(first[s] == ref[s] for s in first), "the run before the kill already differs"


def test_sigterm_saves_current_step_and_resumes_exactly(reference, tmp_path):
    _, ref, _ = reference
    stop_at = random.Random().randint(2, TOTAL - 4)
    proc = tl.launch(tmp_path, log=tmp_path / "run1.log")
    _wait_for_step(proc, tmp_path, stop_at)
    # Freeze the process before signalling: steps take milliseconds with a warm compile cache, and
    # a run that reaches TOTAL before the handler runs would not test preemption at all.
    proc.send_signal(signal.SIGSTOP)
    proc.send_signal(signal.SIGTERM)
    proc.send_signal(signal.SIGCONT)
    assert proc.wait(timeout=120) == 0, (tmp_path / "run1.log").read_text()
    log = (tmp_path / "run1.log").read_text()
    last = max(tl.losses(tmp_path))
    assert f"preempted (signal {int(signal.SIGTERM)}): saved step {last}" in log
    assert max(_complete_checkpoints(tmp_path)) == last < TOTAL
    result = tl.run(tmp_path)
    assert result.returncode == 0, result.stdout + result.stderr
    assert f"resumed from {tmp_path / 'checkpoints'} step {last}" in result.stdout
    assert tl.losses(tmp_path) == ref


def test_resume_when_already_done_is_a_no_op(reference):
    """Relaunching a finished run restores the last step and trains nothing more."""
    workdir, ref, _ = reference
    result = tl.run(workdir)
    assert result.returncode == 0 and f"step {TOTAL}" in result.stdout
    assert tl.losses(workdir) == ref


def test_demo_pipeline_sigkill_resumes_exactly(tmp_path):
    """The real pipeline (bundled chat set, Qwen tokenizer, grain iterator state in the checkpoint)."""
    args = ["--config=configs/demo.py", "--config.data.seq_len=64", "--config.data.global_batch_size=4",
            "--config.total_steps=8", "--config.save_every=3", "--config.export_hf=false"]
    ref_dir, run_dir = tmp_path / "ref", tmp_path / "run"
    result = tl.run(ref_dir, *args)
    assert result.returncode == 0, result.stdout + result.stderr
    ref = tl.losses(ref_dir)
    assert sorted(ref) == list(range(1, 9))
    proc = tl.launch(run_dir, *args, log=tmp_path / "run1.log")
    _wait_for_step(proc, run_dir, random.Random().randint(4, 7))
    while not _complete_checkpoints(run_dir):
        time.sleep(0.05)
    proc.send_signal(signal.SIGKILL)
    proc.wait()
    resume_from = max(_complete_checkpoints(run_dir))
    result = tl.run(run_dir, *args)
    assert result.returncode == 0, result.stdout + result.stderr
    assert f"step {resume_from}" in result.stdout
    assert tl.losses(run_dir) == ref
