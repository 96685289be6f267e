"""Helpers shared by the benchmark scripts: one measurement per subprocess, median timing."""

from __future__ import annotations

import json
import re
import statistics
import subprocess
import time


def run_result_subprocess(cmd: list[str], env: dict, timeout: float, cwd: str) -> dict:
    """Run a worker that prints `RESULT <json>`: its dict, or {"error": ...} (timeout, out of memory, last error)."""
    try:
        p = subprocess.run(cmd, capture_output=True, text=True, timeout=timeout, env=env, cwd=cwd)
    except subprocess.TimeoutExpired:
        return {"error": f"timeout after {timeout}s"}
    for line in reversed(p.stdout.splitlines()):
        if line.startswith("RESULT "):
            return json.loads(line[7:])
    return {"error": failure_summary((p.stderr or p.stdout).strip().splitlines(), p.returncode)}


def failure_summary(lines: list[str], returncode: int) -> str:
    """One line saying why a process failed, from its output lines: "out of memory", else its last
    `...Error` / `...Exception` line or `error: ...` line (the launcher's one-line errors), else its last line."""
    if any("RESOURCE_EXHAUSTED" in x or "OutOfMemory" in x or "out of memory" in x for x in lines):
        return "out of memory"
    errors = [x for x in lines if re.match(r"^\w*(Error|Exception)\b", x) or x.startswith("error: ")]
    last = errors[-1] if errors else (lines[-1] if lines else f"exit {returncode}")
    return last[:300]


def timed(fn, *args, reps: int = 5) -> float:
    """Median seconds of `fn(*args)` (synced), after one untimed call (compilation)."""
    import jax

    jax.block_until_ready(fn(*args))
    times = []
    for _ in range(reps):
        t0 = time.perf_counter()
        jax.block_until_ready(fn(*args))
        times.append(time.perf_counter() - t0)
    return statistics.median(times)


def torch_lm_step(model, optimizer, device_type: str = "cuda"):
    """`one(ids) -> loss`: a transformers causal-LM training step under bf16 autocast, loss from `labels`."""
    import torch

    def one(ids):
        with torch.autocast(device_type, dtype=torch.bfloat16):
            loss = model(input_ids=ids, labels=ids).loss
        loss.backward()
        optimizer.step()
        optimizer.zero_grad(set_to_none=True)
        return loss

    return one


def torch_step_times(one, batches: list, steps: int, blocks: int, device_type: str = "cuda"):
    """(synced seconds per step, [seconds per step of each back-to-back block], last loss) of a training step
    `one(batch) -> loss`, after 3 warm-up steps; on CUDA the peak-memory counter is reset after the warm-up."""
    import torch

    cuda = device_type == "cuda"
    sync = torch.cuda.synchronize if cuda else (lambda: None)
    for i in range(3):
        one(batches[i % len(batches)])
    sync()
    if cuda:
        torch.cuda.reset_peak_memory_stats()
    synced = []
    for i in range(steps):
        sync()
        t0 = time.perf_counter()
        loss = one(batches[i % len(batches)])
        sync()
        synced.append(time.perf_counter() - t0)
    per_block = []
    for _ in range(blocks):
        t0 = time.perf_counter()
        for i in range(steps):
            loss = one(batches[i % len(batches)])
        sync()
        per_block.append((time.perf_counter() - t0) / steps)
    return synced, per_block, float(loss)
