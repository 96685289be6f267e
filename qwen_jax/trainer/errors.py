"""How a training run stops: exit codes and the one-line `RunError` for failures the user can act on.

The launcher prints a `RunError` as `error: <message>` and exits with its `code`; device calls and
checkpoint calls are wrapped here so an out-of-memory or a failed save is one line naming the cause.
"""

from __future__ import annotations

import re

EXIT_PREEMPTED = 0  # exit code after a SIGTERM/SIGINT-triggered checkpoint (documented in docs/training.md)
EXIT_FAILED = 1  # the run stopped: non-finite step, failed save, device out of memory
EXIT_USAGE = 2  # bad input, or the workdir is in use by another run


class RunError(RuntimeError):
    """A run that cannot go on, said in one line (`error: ...`); `code` is the exit status."""

    def __init__(self, message: str, code: int, hard_exit: bool = False):
        super().__init__(message)
        self.code = code
        self.hard_exit = hard_exit  # background threads (a failed Orbax save) are broken: skip their teardown


def on_save_errors(fn, step: int, ckpt_dir: str, what: str = ""):
    """Run a checkpoint call; a failed save becomes one RunError naming the cause and the path.

    An asynchronous save fails in the background and surfaces at the next checkpoint call, so the
    step is read from the error when it names one.
    """
    from qwen_jax.checkpoint import failed_step, one_line

    try:
        return fn()
    except Exception as e:  # noqa: BLE001 - Orbax wraps OS errors in many types
        what = what or f"checkpoint save of step {failed_step(e) or step}"
        raise RunError(f"{what} failed: {one_line(e)} (checkpoint folder {ckpt_dir}); the run stopped, earlier "
                       "complete checkpoints are kept", EXIT_FAILED, hard_exit=True) from None


def on_device_errors(fn, step: int):
    """Run a device call; device out-of-memory becomes one RunError with the need and the knobs."""
    import jax

    try:
        return fn()
    except jax.errors.JaxRuntimeError as e:
        if "RESOURCE_EXHAUSTED" not in str(e):
            raise
        device = jax.local_devices()[0]
        try:
            stats = device.memory_stats() or {}
        except Exception:  # noqa: BLE001 - not every backend has memory stats
            stats = {}
        raise RunError(oom_message(str(e), step, device.device_kind, stats.get("bytes_limit")), EXIT_FAILED) from None


def oom_message(text: str, step: int, device_kind: str, device_bytes: int | None) -> str:
    """One line for a device out-of-memory error: what was asked for, what the device has, what lowers it."""
    gib = 1 << 30
    need = re.search(r"(?:allocate|allocating)\s+([0-9.]+)\s*([KMGT]?i?B|bytes)?", text)
    need_text = "more than is free"
    if need:
        value, unit = float(need.group(1)), (need.group(2) or "bytes").upper()
        scale = {"BYTES": 1, "B": 1, "KB": 1e3, "KIB": 1 << 10, "MB": 1e6, "MIB": 1 << 20, "GB": 1e9, "GIB": gib,
                 "TB": 1e12, "TIB": 1 << 40}.get(unit, 1)
        need_text = f"{value * scale / gib:.1f} GiB"
    has = f"{device_bytes / gib:.1f} GiB" if device_bytes else "an unknown amount"
    return (f"out of device memory at step {step}: an allocation of {need_text} on {device_kind} with {has} usable; "
            "lower it with model.remat=full (or dots), model.attention=auto/cudnn/blockwise, a smaller "
            "data.global_batch_size or more grad_accum_steps, a smaller loss.chunk_size")
