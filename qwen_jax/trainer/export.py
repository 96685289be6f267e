"""The end-of-run exports: a Hugging Face folder (or with LoRA a merged folder and/or a PEFT adapter).

Each export replaces the previous one atomically and records the checkpoint step it was written
from, so a rerun of a finished run does not export again.
"""

from __future__ import annotations

import json
import os
import shutil

from qwen_jax.trainer.errors import EXIT_FAILED, RunError

EXPORT_RECORD = "qwen_jax_export.json"  # in the export folder: the checkpoint step it was written from


def exported_step(out_dir: str) -> int | None:
    """The checkpoint step an existing export was written from (None: no export, or one we did not write)."""
    try:
        with open(os.path.join(out_dir, EXPORT_RECORD), encoding="utf-8") as f:
            return int(json.load(f)["step"])
    except (OSError, ValueError, KeyError, TypeError):
        return None


def export_run(ckpt_dir: str, workdir: str, export_dir: str, step: int, lora) -> None:
    """The end-of-run exports: the Hugging Face folder, or with LoRA what `lora.export` asks for (a merged
    folder at `export_dir`, a PEFT adapter at `<workdir>/hf_adapter`); each replaced atomically."""
    if lora is None:
        export_hf(ckpt_dir, export_dir, step)
        return
    from qwen_jax import lora as lora_lib

    if lora.export in ("adapter", "both"):
        export_hf(ckpt_dir, os.path.join(workdir, "hf_adapter"), step, what="PEFT adapter",
                  build=lambda out: lora_lib.export_adapter(ckpt_dir, step, lora, out))
    if lora.export in ("merged", "both"):
        export_hf(ckpt_dir, export_dir, step, what="merged Hugging Face folder",
                  build=lambda out: lora_lib.export_merged(ckpt_dir, step, lora, out))


def export_hf(ckpt_dir: str, out_dir: str, step: int, *, what: str = "Hugging Face folder", build=None) -> None:
    """Export checkpoint `step` as a Hugging Face folder at `out_dir`, replacing an older export atomically.

    Nothing is written when `out_dir` already holds this step.  The new folder is built beside
    `out_dir` (by `build(folder)`; default the conversion core's `orbax_to_hf`) and swapped in by two
    renames; a failure leaves the previous export untouched.
    """
    import jax

    from qwen_jax.atomic import atomic_write_json, honour_umask
    from qwen_jax.hf.export import orbax_to_hf
    from qwen_jax.hf.output import ConvertError
    from qwen_jax.metrics import say

    if jax.process_index() != 0:
        return
    if exported_step(out_dir) == step:
        say(f"{what} {out_dir} is up to date (step {step})")
        return
    staging, retired = f"{out_dir}.new", f"{out_dir}.old"  # the workdir lock keeps them to one run
    if os.path.lexists(retired) and not os.path.lexists(out_dir):  # a run killed between the two renames
        os.rename(retired, out_dir)
    for leftover in (staging, retired):
        shutil.rmtree(leftover, ignore_errors=True)
    try:
        if build is None:
            orbax_to_hf(ckpt_dir, staging, step=step)
        else:
            build(staging)
        atomic_write_json(os.path.join(staging, EXPORT_RECORD), {"step": step, "checkpoints": ckpt_dir})
        honour_umask(staging)
        if os.path.lexists(out_dir):
            os.rename(out_dir, retired)
        os.rename(staging, out_dir)
    except BaseException as e:
        shutil.rmtree(staging, ignore_errors=True)
        if os.path.lexists(retired) and not os.path.lexists(out_dir):
            os.rename(retired, out_dir)
        if isinstance(e, (ConvertError, OSError, ValueError)):
            kept = "the previous export is unchanged" if os.path.lexists(out_dir) else "no export was written"
            raise RunError(f"export of the {what} of step {step} to {out_dir} failed ({kept}): {e}",
                           EXIT_FAILED) from None
        raise
    shutil.rmtree(retired, ignore_errors=True)
    say(f"exported {what}: {out_dir} (step {step})")
