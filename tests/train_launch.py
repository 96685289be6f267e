"""One way to launch `python -m qwen_jax.train` in a subprocess for tests (tiny model, synthetic data, CPU)."""

from __future__ import annotations

import json
import os
import subprocess
import sys
import tempfile

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
# Compiled steps are shared between launches (persistent cache): relaunches start in seconds.
CACHE = os.path.join(tempfile.gettempdir(), "qwen_jax_test_compile_cache")

TINY_ARGS = [
    "--config=configs/base.py",
    "--config.synthetic_data=true",
    "--config.model.overrides=vocab_size=512",
    "--config.model.dtype=float32",
    "--config.data.seq_len=64",
    "--config.data.global_batch_size=8",
    "--config.optimizer.warmup_steps=2",
    "--config.optimizer.learning_rate=3e-3",
    "--config.total_steps=12",
    "--config.save_every=3",
    "--config.export_hf=false",
]


def env(devices: int = 2, **extra) -> dict:
    e = dict(os.environ)
    e.update(JAX_PLATFORMS="cpu", XLA_FLAGS=f"--xla_force_host_platform_device_count={devices}",
             JAX_COMPILATION_CACHE_DIR=CACHE, JAX_PERSISTENT_CACHE_MIN_COMPILE_TIME_SECS="0",
             JAX_PERSISTENT_CACHE_MIN_ENTRY_SIZE_BYTES="0", PYTHONPATH=ROOT, PYTHONUNBUFFERED="1",
             TF_CPP_MIN_LOG_LEVEL="2")
    e.update({k: str(v) for k, v in extra.items()})
    return e


def command(workdir, *extra_args) -> list[str]:
    """TINY_ARGS, or only `extra_args` when they name their own --config file."""
    base = [] if any(a.startswith("--config=") for a in extra_args) else TINY_ARGS
    return [sys.executable, "-m", "qwen_jax.train", f"--workdir={workdir}", *base, *extra_args]


def launch(workdir, *extra_args, devices: int = 2, log=None, **env_extra) -> subprocess.Popen:
    out = open(log, "ab") if log else subprocess.PIPE  # noqa: SIM115
    return subprocess.Popen(command(workdir, *extra_args), cwd=ROOT, env=env(devices, **env_extra), stdout=out,
                            stderr=subprocess.STDOUT)


def run(workdir, *extra_args, devices: int = 2, timeout: float = 600, **env_extra) -> subprocess.CompletedProcess:
    return subprocess.run(command(workdir, *extra_args), cwd=ROOT, env=env(devices, **env_extra),
                          capture_output=True, text=True, timeout=timeout)


def losses(workdir) -> dict[int, float]:
    """step -> loss from metrics.jsonl; a step logged twice (before a kill and after resume) keeps the last."""
    out = {}
    path = os.path.join(workdir, "metrics.jsonl")
    if not os.path.exists(path):
        return out
    with open(path) as f:
        for line in f:
            if line.strip():
                rec = json.loads(line)
                if "loss" in rec:  # not an eval/... line
                    out[rec["step"]] = rec["loss"]
    return out


def all_records(workdir, host: bool = False) -> list[dict]:
    """The step and eval records of metrics.jsonl; with `host`, the host-memory phase records (`host/...`) instead."""
    with open(os.path.join(workdir, "metrics.jsonl")) as f:
        records = [json.loads(line) for line in f if line.strip()]
    return [r for r in records if any(k.startswith("host/") for k in r) == host]
