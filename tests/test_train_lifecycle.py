"""The trainer's life in its workdir, by real `python -m qwen_jax.train` subprocesses (tiny model, CPU).

Rerun of a finished run, extending `total_steps` (atomic re-export), the workdir lock, Ctrl-C once
and twice, SIGKILL then resume (each step exactly once in metrics.jsonl and TensorBoard), a NaN
learning rate, damaged checkpoints, a full disk, file modes; in-process: the skip mode of the
jitted step, the batch prefetcher and the out-of-memory message.
"""

from __future__ import annotations

import fcntl
import json
import os
import shutil
import signal
import subprocess
import sys
import time

import numpy as np
import pytest

from tests import train_launch as tl

TOTAL = 6
SAVE_EVERY = 2
# eos_token_id: the exported config must name one (the shrunk vocabulary drops the preset's ids)
RUN_ARGS = [f"--config.total_steps={TOTAL}", f"--config.save_every={SAVE_EVERY}", "--config.export_hf=true",
            "--config.model.overrides=vocab_size=512,eos_token_id=[2]"]
LONG_ARGS = ["--config.total_steps=100000", "--config.save_every=100000", "--config.export_hf=false"]


def _run(workdir, *extra, **kw):
    start = time.perf_counter()
    result = tl.run(workdir, *RUN_ARGS, *extra, **kw)
    return result, time.perf_counter() - start


def _steps(workdir) -> list[int]:
    return [r["step"] for r in tl.all_records(workdir)]


def _ckpt_steps(workdir) -> list[int]:
    d = os.path.join(workdir, "checkpoints")
    return sorted(int(n) for n in os.listdir(d) if n.isdigit()) if os.path.isdir(d) else []


def _export_step(workdir) -> int:
    with open(os.path.join(workdir, "hf_export", "qwen_jax_export.json")) as f:
        return json.load(f)["step"]


def _error_lines(stderr: str) -> list[str]:
    """stderr lines that are not absl warnings/info or the converter's progress."""
    return [line for line in stderr.splitlines()
            if line.strip() and line[:1] not in "WI" and not line.startswith("orbax-to-hf")]


def _scalars(workdir, tag="train/loss") -> list[tuple[int, float]]:
    """(step, value) of a TensorBoard tag as TensorBoard shows it (purged steps dropped)."""
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

    acc = EventAccumulator(os.path.join(workdir, "tensorboard"), size_guidance={"scalars": 0})
    acc.Reload()
    return [(e.step, e.value) for e in acc.Scalars(tag)]


def _scalar_tags(workdir) -> list[tuple[int, str]]:
    """(step, tag) of every TensorBoard scalar event."""
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

    acc = EventAccumulator(os.path.join(workdir, "tensorboard"), size_guidance={"scalars": 0})
    acc.Reload()
    return [(e.step, tag) for tag in acc.Tags()["scalars"] for e in acc.Scalars(tag)]


def _copy(src, dst):
    shutil.copytree(src, dst, symlinks=True)
    return dst


@pytest.fixture(scope="module")
def finished(tmp_path_factory):
    """One finished run (checkpoints 2, 4, 6, an export of step 6) under umask 022; copied by tests that change it."""
    workdir = tmp_path_factory.mktemp("finished")
    old = os.umask(0o022)
    try:
        result, seconds = _run(workdir)
    finally:
        os.umask(old)
    assert result.returncode == 0, result.stdout + result.stderr
    assert _steps(workdir) == list(range(1, TOTAL + 1))
    assert _ckpt_steps(workdir) == [2, 4, 6] and _export_step(workdir) == TOTAL
    return workdir, result, seconds


# ---------------------------------------------------------------- rerun, extend, lock
@pytest.mark.slow
def test_rerun_of_finished_run_exits_quickly_and_trains_nothing(finished, tmp_path):
    src, first, first_seconds = finished
    workdir = _copy(src, tmp_path / "w")
    records = tl.all_records(workdir)
    export_mtime = os.stat(workdir / "hf_export" / "model.safetensors.index.json").st_mtime_ns
    result, seconds = _run(workdir)
    assert result.returncode == 0, result.stdout + result.stderr
    assert f"run complete: checkpoint step {TOTAL} >= total_steps {TOTAL}" in result.stdout
    assert "is up to date (step 6)" in result.stdout and "step 1/" not in result.stdout
    assert tl.all_records(workdir) == records
    assert os.stat(workdir / "hf_export" / "model.safetensors.index.json").st_mtime_ns == export_mtime
    assert seconds < first_seconds, (seconds, first_seconds)
    print(f"rerun of a finished run: {seconds:.1f} s (the run itself: {first_seconds:.1f} s)")
    # a missing export is written again, still without training
    shutil.rmtree(workdir / "hf_export")
    result, _ = _run(workdir)
    assert result.returncode == 0, result.stdout + result.stderr
    assert "exported Hugging Face folder" in result.stdout and _export_step(workdir) == TOTAL
    assert tl.all_records(workdir) == records


@pytest.mark.slow
def test_extending_total_steps_resumes_and_replaces_the_export_atomically(finished, tmp_path):
    src, _, _ = finished
    workdir = _copy(src, tmp_path / "w")
    old_weights = (workdir / "hf_export" / "model-00001-of-00001.safetensors").read_bytes()
    # a failing export (its staging name is taken by a file) leaves the previous export untouched
    (tmp_path / "w" / "hf_export.new").write_text("in the way")
    result, _ = _run(workdir, "--config.total_steps=8")
    assert result.returncode == 1, result.stdout + result.stderr
    errors = _error_lines(result.stderr)
    assert len(errors) == 1 and errors[0].startswith("error: export of the Hugging Face folder of step 8"), errors
    assert "the previous export is unchanged" in errors[0]
    assert _export_step(workdir) == TOTAL
    assert (workdir / "hf_export" / "model-00001-of-00001.safetensors").read_bytes() == old_weights
    # the rerun finds step 8 complete and only exports
    os.remove(workdir / "hf_export.new")
    result, _ = _run(workdir, "--config.total_steps=8")
    assert result.returncode == 0, result.stdout + result.stderr
    assert "run complete: checkpoint step 8" in result.stdout and _export_step(workdir) == 8
    assert (workdir / "hf_export" / "model-00001-of-00001.safetensors").read_bytes() != old_weights
    assert _steps(workdir) == list(range(1, 9))
    assert not [n for n in os.listdir(workdir) if n.startswith(("hf_export.", ".hf_export"))]


@pytest.mark.slow
def test_second_run_in_a_running_workdir_is_refused_and_ctrl_c_saves_the_current_step(tmp_path):
    workdir = tmp_path / "w"
    proc = tl.launch(workdir, *LONG_ARGS, log=tmp_path / "run1.log")
    try:
        _wait_for(lambda: len(_steps(workdir)) >= 2, proc)
        second = tl.run(workdir, *LONG_ARGS)
        assert second.returncode == 2, second.stdout + second.stderr
        errors = _error_lines(second.stderr)
        assert len(errors) == 1 and errors[0].startswith(f"error: workdir {workdir} is in use"), errors
        assert f"pid {proc.pid}" in errors[0] and "Traceback" not in second.stderr
        # Ctrl-C once: a checkpoint of the current step, exit 0
        proc.send_signal(signal.SIGSTOP)
        proc.send_signal(signal.SIGINT)
        proc.send_signal(signal.SIGCONT)
        assert proc.wait(timeout=120) == 0
    finally:
        proc.kill()
    log = (tmp_path / "run1.log").read_text()
    assert "SIGINT received: saving a checkpoint after the current step" in log and "Traceback" not in log
    last = _steps(workdir)[-1]
    assert f"preempted (signal {int(signal.SIGINT)}): saved step {last}, exiting" in log
    assert _ckpt_steps(workdir) == [last]
    # the lock went with the process
    fd = os.open(workdir / ".lock", os.O_RDWR)
    fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
    os.close(fd)

    # Ctrl-C twice: stops at once, nothing saved, no traceback
    proc = tl.launch(workdir, *LONG_ARGS, log=tmp_path / "run2.log")
    try:
        _wait_for(lambda: _steps(workdir)[-1] >= last + 2, proc)
        proc.send_signal(signal.SIGINT)
        time.sleep(0.02)
        proc.send_signal(signal.SIGINT)
        start = time.perf_counter()
        code = proc.wait(timeout=60)
        stopped_in = time.perf_counter() - start
    finally:
        proc.kill()
    log = (tmp_path / "run2.log").read_text()
    assert code == 130, log
    assert "second SIGINT: stopped at once without saving" in log and "Traceback" not in log
    assert stopped_in < 5, stopped_in
    print(f"second Ctrl-C: process gone {stopped_in:.2f} s after it")
    assert max(_ckpt_steps(workdir)) == last


def _wait_for(condition, proc, timeout=300):
    deadline = time.time() + timeout
    while time.time() < deadline:
        try:
            if condition():
                return
        except (OSError, IndexError, ValueError):
            pass
        assert proc.poll() is None, f"training exited early ({proc.returncode})"
        time.sleep(0.05)
    raise TimeoutError("condition not reached")


# ---------------------------------------------------------------- metrics exactly once
@pytest.mark.slow
def test_sigkill_then_resume_logs_every_step_exactly_once(tmp_path):
    workdir = tmp_path / "w"
    args = ["--config.total_steps=12", "--config.save_every=3", "--config.export_hf=false"]
    proc = tl.launch(workdir, *args, log=tmp_path / "run1.log")
    try:
        while True:  # freeze it at a moment with steps logged past the newest complete checkpoint
            _wait_for(lambda: _ckpt_steps(workdir) and _steps(workdir)[-1] < 12, proc)
            proc.send_signal(signal.SIGSTOP)
            ckpts, steps = _ckpt_steps(workdir), _steps(workdir)
            if ckpts and steps[-1] > ckpts[-1] and ckpts[-1] < 12:
                break
            proc.send_signal(signal.SIGCONT)
            time.sleep(0.01)
        proc.send_signal(signal.SIGKILL)
        proc.wait()
    finally:
        proc.kill()
    resume_from = ckpts[-1]
    before = {r["step"]: r["loss"] for r in tl.all_records(workdir)}
    assert max(before) > resume_from
    result = tl.run(workdir, *args)
    assert result.returncode == 0, result.stdout + result.stderr
    assert f"resumed from {workdir / 'checkpoints'} step {resume_from}" in result.stdout
    records = tl.all_records(workdir)
    assert [r["step"] for r in records] == list(range(1, 13))
    assert all(records[s - 1]["loss"] == before[s] for s in range(1, resume_from + 1))
    tb = _scalars(workdir)
    assert [s for s, _ in tb] == list(range(1, 13))
    assert np.array_equal(np.float32([v for _, v in tb]), np.float32([r["loss"] for r in records]))


# ---------------------------------------------------------------- non-finite
@pytest.mark.slow
def test_divergence_stops_before_a_save_and_never_exports(finished, tmp_path):
    """A run that diverges mid-way (a learning rate of 1e38 takes the parameters to the edge of float32 at
    step 7, so step 8 overflows) stops before saving step 8."""
    src, _, _ = finished
    workdir = _copy(src, tmp_path / "w")
    export = (workdir / "hf_export" / "model-00001-of-00001.safetensors").read_bytes()
    result, _ = _run(workdir, "--config.total_steps=12", "--config.optimizer.learning_rate=1e38")
    assert result.returncode == 1, result.stdout + result.stderr
    errors = _error_lines(result.stderr)
    assert len(errors) == 1, errors
    assert errors[0].startswith("error: non-finite "), errors
    assert ("at step 8: stopped before saving it; the last checkpoint (step 6) is kept, nothing is exported"
            in errors[0]), errors
    assert _ckpt_steps(workdir) == [2, 4, 6]
    assert _export_step(workdir) == TOTAL
    assert (workdir / "hf_export" / "model-00001-of-00001.safetensors").read_bytes() == export


@pytest.mark.slow
def test_keep_checkpoints_below_one_is_an_error(tmp_path):
    result = tl.run(tmp_path / "w", "--config.keep_checkpoints=0")
    assert result.returncode == 2
    assert "'keep_checkpoints' must be an integer >= 1" in result.stderr and "Traceback" not in result.stderr
    assert not _ckpt_steps(tmp_path / "w")


# ---------------------------------------------------------------- damaged checkpoints, failed saves
@pytest.mark.slow
def test_damaged_newer_steps_are_moved_aside_and_resume_uses_the_newest_intact(finished, tmp_path):
    src, _, _ = finished
    workdir = _copy(src, tmp_path / "w")
    ref = {r["step"]: r["loss"] for r in tl.all_records(workdir)}
    ckpt = workdir / "checkpoints"
    data_files = [os.path.join(root, n) for root, _, names in os.walk(ckpt / "6" / "params") for n in names
                  if os.sep + "d" + os.sep in os.path.join(root, n) + os.sep]
    biggest = max(data_files, key=os.path.getsize)
    size = os.path.getsize(biggest)
    os.truncate(biggest, size // 2)
    shutil.rmtree(ckpt / "4" / "opt_state")
    os.mkdir(ckpt / "8")
    result, _ = _run(workdir)
    assert result.returncode == 0, result.stdout + result.stderr
    out = result.stdout
    damaged = workdir / "checkpoints.damaged"
    assert f"checkpoint step 8 is damaged (empty step folder): moved to {damaged / '8'}" in out
    assert "checkpoint step 6 is damaged (" in out and f"moved to {damaged / '6'}" in out
    assert f"checkpoint step 4 is damaged (item 'opt_state' missing): moved to {damaged / '4'}" in out
    assert f"resumed from {ckpt} step 2" in out and "Traceback" not in result.stderr
    assert sorted(os.listdir(damaged)) == ["4", "6", "8"]
    moved = os.path.join(damaged, "6", os.path.relpath(biggest, ckpt / "6"))
    assert os.path.getsize(moved) == size // 2  # kept as it was
    assert _ckpt_steps(workdir) == [2, 4, 6]
    records = tl.all_records(workdir)
    assert [r["step"] for r in records] == list(range(1, TOTAL + 1))
    assert {r["step"]: r["loss"] for r in records} == ref  # bit-identical replay from step 2


@pytest.mark.slow
def test_full_disk_during_a_save_stops_the_run_in_one_line(tmp_path):
    mount = tmp_path / "small"
    mount.mkdir()
    if subprocess.run(["mount", "-t", "tmpfs", "-o", "size=600k", "tmpfs", str(mount)],
                      capture_output=True).returncode != 0:
        pytest.skip("cannot mount a small tmpfs here (needs root)")
    try:
        result = tl.run(mount / "w")
    finally:
        subprocess.run(["umount", "-l", str(mount)], check=False)
    assert result.returncode == 1, result.stdout + result.stderr
    errors = _error_lines(result.stderr)
    assert len(result.stderr.strip().splitlines()) == 1, result.stderr[-3000:]
    assert errors[0].startswith("error: checkpoint save of step 3 failed: No space left on device: "
                                f"{mount / 'w' / 'checkpoints'}"), errors


@pytest.mark.slow
def test_read_only_checkpoint_folder_stops_the_run_in_one_line(finished, tmp_path):
    src, _, _ = finished
    workdir = _copy(src, tmp_path / "w")
    ckpt = workdir / "checkpoints"
    if os.geteuid() == 0:  # root writes through file modes: a read-only bind mount instead
        if subprocess.run(["mount", "--bind", str(ckpt), str(ckpt)], capture_output=True).returncode != 0:
            pytest.skip("cannot bind-mount here")
        subprocess.run(["mount", "-o", "remount,ro,bind", str(ckpt)], check=True)
    else:
        os.chmod(ckpt, 0o555)
    try:
        result, _ = _run(workdir, "--config.total_steps=8")
    finally:
        if os.geteuid() == 0:
            subprocess.run(["umount", "-l", str(ckpt)], check=False)
        else:
            os.chmod(ckpt, 0o755)
    assert result.returncode == 1, result.stdout + result.stderr
    errors = _error_lines(result.stderr)
    assert len(errors) == 1 and errors[0].startswith("error: "), result.stderr[-3000:]
    assert "Read-only file system" in errors[0] or "Permission denied" in errors[0], errors
    assert str(ckpt) in errors[0]
    assert _ckpt_steps(workdir) == [2, 4, 6] and _export_step(workdir) == TOTAL


# ---------------------------------------------------------------- host memory
@pytest.mark.slow
def test_host_memory_is_reported_per_phase_in_order(finished):
    workdir, result, _ = finished
    lines = result.stdout.splitlines()
    host_lines = [i for i, line in enumerate(lines) if line.startswith("host memory")]
    assert [lines[i].split(" peak")[0] for i in host_lines] == [
        "host memory: init", "host memory: first step", "host memory"], result.stdout
    assert host_lines[0] < lines.index(next(x for x in lines if x.startswith("step 1/"))) < host_lines[1]
    assert lines[host_lines[2]].startswith("host memory peaks: init ") and lines[host_lines[2]].endswith("within")
    records = tl.all_records(workdir, host=True)
    assert [r["step"] for r in records] == [0, 1, TOTAL]
    assert set(records[0]) == {"step", "host/init_peak_gib", "host/init_now_gib"}
    assert set(records[1]) == {"step", "host/first_step_peak_gib", "host/first_step_now_gib"}
    phases = ["init", "first_step", "steady", "checkpoint", "export"]
    summary = records[2]
    assert [k for k in summary if k.endswith("_peak_gib")] == [f"host/{p}_peak_gib" for p in phases]
    for p in phases:
        assert summary[f"host/{p}_peak_gib"] >= summary[f"host/{p}_now_gib"] > 0.05, (p, summary)
    assert summary["host/init_peak_gib"] == records[0]["host/init_peak_gib"]
    assert summary["host/budget_gib"] == summary["host/train_state_gib"] + 4 and summary["host/train_state_gib"] > 0
    # the whole run's peak logged with the last step is at least the peaks of the phases ended before it (the
    # resets of the kernel's peak do not lower it)
    last = tl.all_records(workdir)[-1]
    assert last["host_peak_rss_gib"] >= max(summary[f"host/{p}_peak_gib"] for p in phases[:2])
    assert ("host/steady_peak_gib", TOTAL) in [(t, s) for s, t in _scalar_tags(workdir)]


# ---------------------------------------------------------------- file modes
@pytest.mark.slow
def test_everything_in_the_workdir_honours_the_umask(finished):
    workdir, _, _ = finished
    wrong = []
    for root, dirs, files in os.walk(workdir):
        for name in dirs:
            mode = os.stat(os.path.join(root, name)).st_mode & 0o777
            if mode != 0o755:
                wrong.append((os.path.join(root, name), oct(mode)))
        for name in files:
            mode = os.stat(os.path.join(root, name)).st_mode & 0o777
            if mode != 0o644:
                wrong.append((os.path.join(root, name), oct(mode)))
    assert not wrong, wrong
    names = set(os.listdir(workdir))
    assert {"checkpoints", "metrics.jsonl", "tensorboard", ".lock", "hf_export"} <= names


# ---------------------------------------------------------------- in-process pieces
@pytest.mark.slow  # one compile of the step (~10 s, more on a loaded machine)
def test_skip_mode_leaves_params_and_optimizer_state_unchanged():
    import jax

    from configs.base import get_config
    from qwen_jax import sharding
    from qwen_jax.config import config_from_dict
    from qwen_jax.presets import get_preset
    from qwen_jax.trainer import optimizer as opt
    from qwen_jax.trainer import train_step as ts
    from qwen_jax.trainer.synthetic import SyntheticBatches

    cfg = config_from_dict(get_preset("tiny"), vocab_size=512, dtype="float32")
    mesh = sharding.make_mesh({"fsdp": 1}, devices=jax.devices()[:1])
    c = get_config()
    c.optimizer.warmup_steps = 0
    c.optimizer.learning_rate = float("nan")
    graphdef, abstract, p_sh = ts.param_shardings(cfg, mesh)
    spec = opt.resolve_freeze(abstract, "", 0, cfg.num_hidden_layers)
    tx, schedule = opt.make_optimizer(abstract, c.optimizer, 10, spec)
    state_sh = ts.state_shardings(tx, abstract, p_sh, mesh)
    batch_sh = ts.batch_shardings(mesh, 8, 32)
    batch = {k: jax.device_put(v, batch_sh[k]) for k, v in next(SyntheticBatches(8, 32, 512)).items()}
    state = ts.init_state(ts.init_params(cfg, 0, p_sh), tx, 0, state_sh)
    before = jax.tree.map(np.asarray, {"params": state["params"], "opt_state": state["opt_state"]})
    step = ts.make_train_step(graphdef, tx, schedule, spec, mesh=mesh, state_sh=state_sh, batch_sh=batch_sh,
                              chunk_size=32, nonfinite="skip")
    state, metrics = step(state, batch)
    after = jax.tree.map(np.asarray, {"params": state["params"], "opt_state": state["opt_state"]})
    metrics = jax.device_get(metrics)
    assert metrics["finite"] == 0.0 and np.isfinite(metrics["loss"]) and int(state["step"]) == 1
    jax.tree.map(lambda a, b: np.testing.assert_array_equal(a, b), before, after)
    # (without the skip the NaN learning rate makes every updated parameter NaN: the subprocess test above)


def test_prefetcher_pairs_each_batch_with_the_iterator_state_after_it():
    from qwen_jax.trainer.prefetch import DevicePrefetcher
    from qwen_jax.trainer.synthetic import SyntheticBatches

    reference = SyntheticBatches(4, 16, 100)
    with DevicePrefetcher(SyntheticBatches(4, 16, 100), lambda b: b, depth=2) as prefetcher:
        for i in range(5):
            batch, state = next(prefetcher)
            expected = next(reference)
            assert state == {"step": i + 1, "seed": 0}
            np.testing.assert_array_equal(batch["input_ids"], expected["input_ids"])

    class Broken:
        def __next__(self):
            raise ValueError("bad record in data.jsonl line 3")

    with DevicePrefetcher(Broken(), lambda b: b) as prefetcher, pytest.raises(ValueError, match="line 3"):
        next(prefetcher)


def test_device_out_of_memory_is_one_line_with_the_need_and_the_knobs():
    import jax

    from qwen_jax.trainer.errors import RunError, on_device_errors

    text = ("RESOURCE_EXHAUSTED: Out of memory while trying to allocate 139586437120 bytes. "
            "BufferAssignment OOM Debugging.")

    def step():
        raise jax.errors.JaxRuntimeError(text)

    with pytest.raises(RunError) as info:
        on_device_errors(step, 7)
    message = str(info.value)
    assert info.value.code == 1 and "\n" not in message
    assert message.startswith("out of device memory at step 7: an allocation of 130.0 GiB on ")
    for knob in ("model.remat", "model.attention", "data.global_batch_size", "grad_accum_steps",
                 "loss.chunk_size"):
        assert knob in message

    def other():
        raise jax.errors.JaxRuntimeError("INTERNAL: something else")

    with pytest.raises(jax.errors.JaxRuntimeError):
        on_device_errors(other, 7)


def test_metrics_log_is_cut_back_to_the_resume_step_atomically(tmp_path):
    from qwen_jax.metrics import truncate_jsonl

    path = tmp_path / "metrics.jsonl"
    lines = [json.dumps({"step": s, "loss": 1.0 / s}) for s in range(1, 8)]
    path.write_text("\n".join(lines) + "\n" + '{"step": 8, "lo')  # a torn last line (killed mid-write)
    assert truncate_jsonl(str(path), 5) == 3
    assert path.read_text() == "\n".join(lines[:5]) + "\n"
    assert truncate_jsonl(str(path), 5) == 0
    assert not [n for n in os.listdir(tmp_path) if n != "metrics.jsonl"]


def test_workdir_lock_refuses_a_second_holder(tmp_path):
    from qwen_jax.checkpoint import WorkdirBusy, WorkdirLock

    lock = WorkdirLock(str(tmp_path))
    assert (tmp_path / ".lock").read_text() == f"{os.getpid()}\n"
    code = ("import fcntl, os, sys\nfd = os.open(sys.argv[1], os.O_RDWR)\n"
            "try:\n    fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)\nexcept BlockingIOError:\n    sys.exit(3)\n")
    other = subprocess.run([sys.executable, "-c", code, str(tmp_path / ".lock")], capture_output=True, text=True)
    assert other.returncode == 3, other.stderr
    with pytest.raises(WorkdirBusy):  # flock is per open file: a second open in this process conflicts too
        WorkdirLock(str(tmp_path))
    lock.release()
    WorkdirLock(str(tmp_path)).release()
