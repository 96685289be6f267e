"""Launcher: `python -m qwen_jax.train --config=configs/demo.py --workdir=DIR [--config.key=value ...]`.

One code path for one CPU, one GPU, a GPU node or a TPU pod slice:

1. flags and config (`configs/base.py` keys), the whole run checked by `qwen_jax/run_config.py` before anything
   is written: a bad flag, key or input file is one line `error: ...` on stderr and exit code 2;
2. `jax.distributed.initialize` from `--coordinator_address/--num_processes/--process_id` or the
   environment (`JAX_COORDINATOR_ADDRESS`, `JAX_NUM_PROCESSES`, `JAX_PROCESS_ID`; or
   `--distributed=auto` for TPU pods / SLURM auto-detection);
3. mesh (`data`, `fsdp`, `tensor`, `seq`), model config, parameter and optimizer shardings;
4. resume from the latest checkpoint in `<workdir>/checkpoints` if there is one, else start from
   random init (a preset), a Hugging Face folder or an Orbax checkpoint (`model.init_from`);
5. the loop: per-process data -> global arrays -> jitted step; metrics every step; asynchronous
   checkpoints every `save_every` steps and at the end; on SIGTERM a checkpoint of the current
   step, then exit 0;
6. at the end, export a Hugging Face folder (`qwen_jax.hf.export`).
"""

from __future__ import annotations

import json
import os
import sys
import time

from absl import app, flags
from ml_collections import config_flags

from qwen_jax import run_config

FLAGS = flags.FLAGS
# The config flag reads its overrides from this list, filled by `parse_flags` (not from sys.argv: list-valued
# overrides are JSON, which ml_collections cannot parse, and are set by `parse_flags` instead).  No default file
# here, or it would be loaded at import time; `parse_flags` names run_config.DEFAULT_CONFIG_FILE when none is given.
_FLAG_ARGV: list[str] = []
_CONFIG = config_flags.DEFINE_config_file("config", None, "Training config file (default: configs/base.py).",
                                          lock_config=True, sys_argv=_FLAG_ARGV)
flags.DEFINE_string("workdir", None, "Run directory: checkpoints, metrics.jsonl, TensorBoard events.")
flags.DEFINE_string("coordinator_address", None, "host:port of process 0 (multi-process runs).")
flags.DEFINE_integer("num_processes", None, "Number of processes (multi-process runs).")
flags.DEFINE_integer("process_id", None, "This process's index (multi-process runs).")
flags.DEFINE_enum("distributed", "env", ["env", "auto", "off"],
                  "env: initialize from flags / JAX_* environment variables when given; "
                  "auto: jax.distributed.initialize() with cluster auto-detection (TPU pods, SLURM); off: never.")

EXIT_PREEMPTED = 0  # exit code after a SIGTERM/SIGINT-triggered checkpoint (documented in docs/training.md)
EXIT_FAILED = 1  # the run stopped: non-finite step, failed save, device out of memory
EXIT_USAGE = 2  # bad input, or the workdir is in use by another run


# ---------------------------------------------------------------- command line
def fail(message) -> None:
    """The one-line answer to bad input: `error: <message>` on stderr, exit 2."""
    print("error: " + " ".join(str(message).splitlines()), file=sys.stderr)
    sys.exit(2)


def parse_flags(argv):
    """absl flags, with the --config overrides checked first and the list-valued ones set from JSON."""
    try:
        lists = run_config.check_overrides(argv)
        _FLAG_ARGV[:] = argv = run_config.absl_argv(argv, lists)
        rest = FLAGS(argv)
        run_config.apply_overrides(_CONFIG.value, lists)
    except (run_config.RunConfigError, flags.Error) as e:
        fail(e)
    return rest


# ---------------------------------------------------------------- distributed
def init_distributed(mode: str, settings: run_config.Distributed) -> None:
    """Join the multi-process run `settings` describes (checked by `run_config.distributed_settings`)."""
    import jax

    if mode == "auto":
        jax.distributed.initialize()
    elif settings.multi_process:
        if os.environ.get("JAX_PLATFORMS", "").startswith("cpu"):
            jax.config.update("jax_cpu_collectives_implementation", "gloo")
        jax.distributed.initialize(coordinator_address=settings.coordinator_address,
                                   num_processes=settings.num_processes, process_id=settings.process_id)


# ---------------------------------------------------------------- main
def run(config, workdir: str) -> int:
    import jax
    import numpy as np
    from flax import nnx

    from qwen_jax import checkpoint as ckpt_lib
    from qwen_jax import lora as lora_lib
    from qwen_jax import metrics as metrics_lib
    from qwen_jax import sharding as sh
    from qwen_jax.trainer import optimizer as opt_lib
    from qwen_jax.trainer import train_step as ts
    from qwen_jax.trainer.prefetch import DevicePrefetcher
    from qwen_jax.trainer.synthetic import SyntheticBatches

    say = metrics_lib.say
    pidx, pcount = jax.process_index(), jax.process_count()
    spec = run_config.validate(config, workdir, num_devices=jax.device_count(), process_count=pcount)
    workdir = spec.workdir  # created only once the config has been validated

    # ---- mesh and model
    mesh = sh.make_mesh(spec.mesh_shape)
    cfg, source, overrides = spec.model, spec.source, spec.model_overrides
    lora = lora_lib.spec_from_config(config.get("lora"))  # None when LoRA is off
    cfg, overrides = lora_lib.base_config(cfg, overrides, lora)
    ring = int(mesh.shape["seq"])
    gbs, seq_len = spec.stages[0].global_batch_size, spec.stages[0].seq_len
    accum = spec.grad_accum_steps
    say(f"devices: {jax.device_count()} x {jax.devices()[0].device_kind} over {pcount} process(es); "
        f"mesh {dict(mesh.shape)}")
    say(f"model: {source} {config.model.init_from or config.model.preset} | layers {cfg.num_hidden_layers} "
        f"hidden {cfg.hidden_size} vocab {cfg.vocab_size} | dtype {cfg.dtype} params {cfg.param_dtype} | "
        f"remat {cfg.remat} scan_layers {cfg.scan_layers}")
    if len(spec.stages) > 1:
        say("data schedule: " + ", ".join(f"{st.global_batch_size} x {st.seq_len} from step {st.start_step}"
                                          for st in spec.stages))

    graphdef, abstract_params, p_sh = ts.param_shardings(cfg, mesh, lora)
    if int(config.freeze_layers) and "dense_layers" in abstract_params:
        raise run_config.RunConfigError(
            "config key 'freeze_layers': it counts positions in a layer stack; this model mixes dense and sparse "
            "layers (two stacks, docs/moe.md): use freeze='<regex>' instead")
    freeze = opt_lib.resolve_freeze(abstract_params, config.freeze, int(config.freeze_layers), cfg.num_hidden_layers)
    freeze = lora_lib.freeze_base(freeze, abstract_params, lora)
    counts = freeze.summary(abstract_params)
    say(f"parameters: {counts['trainable']:,} trainable / {counts['total']:,} total "
        f"({counts['frozen']:,} frozen)")
    if counts["frozen_paths"]:
        say("frozen: " + ", ".join(counts["frozen_paths"]))
    tx, schedule = opt_lib.make_optimizer(abstract_params, config.optimizer, int(config.total_steps), freeze)
    state_sh = ts.state_shardings(tx, abstract_params, p_sh, mesh)
    abstract = ts.abstract_state(tx, abstract_params, state_sh)
    batch_sh = ts.batch_shardings(mesh, gbs, seq_len)
    keep = int(config.keep_checkpoints)  # >= 1 and a known `nonfinite` mode: checked by run_config.validate
    nonfinite = str(config.nonfinite)
    total = int(config.total_steps)
    export_dir = os.path.abspath(config.export_hf_dir or os.path.join(workdir, "hf_export"))

    # ---- the workdir: one run at a time (process 0 holds the lock for all)
    created_workdir = not os.path.exists(workdir)
    os.makedirs(workdir, exist_ok=True)
    try:
        lock = ckpt_lib.WorkdirLock(workdir) if pidx == 0 else None
    except ckpt_lib.WorkdirBusy as e:
        raise RunError(str(e), EXIT_USAGE) from None
    guard = ckpt_lib.PreemptionGuard(announce=say)
    ckpt_dir = ckpt_lib.checkpoint_dir(workdir)
    ckpt = ckpt_lib.Checkpointer(ckpt_dir, keep=keep, async_save=bool(config.async_checkpointing))
    logger = prefetcher = None
    try:
        newest = next(iter(ckpt.step_folders()), None)
        if newest is not None and newest >= total and ckpt.missing_items(newest, with_data=True) is None:
            say(f"run complete: checkpoint step {newest} >= total_steps {total} in {ckpt_dir}; nothing to train "
                "(raise --config.total_steps to train further)")
            ckpt.close()
            if config.export_hf:
                export_run(ckpt_dir, workdir, export_dir, newest, lora)
            return 0

        # ---- data
        if config.synthetic_data:
            data_iter = SyntheticBatches(gbs, seq_len, cfg.vocab_size, seed=int(config.data.get("seed", 0)),
                                         process_index=pidx, process_count=pcount, stages=spec.stages)
        else:
            from qwen_jax.data import make_pipeline

            if source == "hf" and not config.data.get("model_dir", "x"):
                config.data.model_dir = config.model.init_from  # stop ids from the model's generation_config.json
            pipeline = make_pipeline(config.data, process_index=pidx, process_count=pcount)
            say(pipeline.chat_setup.describe())
            data_iter = pipeline.iterator()

        # ---- state: resume from the newest intact checkpoint, or init
        try:
            restored = ckpt.restore_latest(abstract, data_iter, report=say)
        except ckpt_lib.CheckpointMismatch as e:
            raise RunError(str(e), EXIT_USAGE) from None
        skipped = 0
        saved = []  # checkpoint steps: the one resumed from, then those whose save has started
        if restored is not None:
            latest, state, meta = restored
            saved.append(latest)
            skipped = int(meta.get("nonfinite_skipped", 0))
            say(f"resumed from {ckpt_dir} step {latest}")
        else:
            base_abstract, base_sh = lora_lib.base_only(abstract_params), lora_lib.base_only(p_sh)
            if source == "preset":
                params = ts.init_params(cfg, int(config.seed), base_sh)
            elif source == "hf":
                from qwen_jax.hf.models import from_pretrained

                model = from_pretrained(config.model.init_from, mesh=mesh, **overrides)
                params = nnx.to_pure_dict(nnx.state(model, nnx.Param))
                del model
            else:
                step = None if config.model.init_step < 0 else int(config.model.init_step)
                params = ckpt_lib.restore_params(config.model.init_from, step, base_abstract, base_sh)
            params = lora_lib.add_adapters(params, cfg, lora, abstract_params, p_sh, int(config.seed))
            state = ts.init_state(params, tx, int(config.seed), state_sh)
            del params
            say(f"initialised from {source}; checkpoints in {ckpt_dir}")
        if pidx == 0:
            tok_dir = None if config.synthetic_data else _tokenizer_dir(config.data)
            hf_source = config.model.init_from if source != "preset" else None
            _on_save_errors(lambda: ckpt_lib.write_side_files(ckpt_dir, cfg, hf_source=hf_source,
                                                              tokenizer_dir=tok_dir),
                            0, ckpt_dir, what="writing the Hugging Face side files beside the checkpoints")
            if not config.synthetic_data:  # the template training renders with is the one the export ships
                _on_save_errors(lambda: pipeline.chat_setup.write_chat_template(ckpt_dir), 0, ckpt_dir,
                                what="writing the chat template beside the checkpoints")

        train_step = ts.make_train_step(graphdef, tx, schedule, freeze, mesh=mesh, state_sh=state_sh,
                                        batch_sh=batch_sh, chunk_size=int(config.loss.chunk_size),
                                        z_loss=float(config.loss.z_loss), grad_accum_steps=accum, zigzag=ring > 1,
                                        nonfinite=nonfinite, dropout_keys=lora_lib.dropout_key_fn(cfg, lora),
                                        router_z_loss_weight=float(config.loss.router_z_loss))
        step = int(jax.device_get(state["step"]))
        logger = metrics_lib.MetricsLogger(
            workdir, peak_flops=metrics_lib.peak_flops_per_device(float(config.peak_flops_per_device)),
            num_devices=jax.device_count(), log_every=int(config.log_every), enabled=pidx == 0, resume_step=step)
        config_json = json.loads(config.to_json_best_effort())
        from qwen_jax.evaluate import make_evaluator

        evaluator = make_evaluator(config, graphdef, mesh=mesh, process_index=pidx, process_count=pcount)
        eval_every = int(config.eval.every)

        def to_global(local):
            local = ts.permute_batch_for_ring(local, ring)
            return {k: jax.make_array_from_process_local_data(batch_sh[k], np.asarray(local[k]))
                    for k in ts.BATCH_KEYS}

        prefetcher = DevicePrefetcher(data_iter, to_global)
        pending = []  # the last dispatched step: (step, metrics on device, tokens, row length)
        t_last = time.perf_counter()

        def drain():
            """Fetch and log the pending step's metrics (waits for that step); stop on a non-finite step."""
            nonlocal t_last, skipped
            if not pending:
                return
            done, metrics, tokens, length = pending.pop()
            metrics = on_device_errors(lambda: jax.device_get(metrics), done)
            now = time.perf_counter()
            finite = bool(metrics.pop("finite"))
            if not finite and nonfinite == "skip":
                skipped += 1
                say(f"step {done}: {_nonfinite_values(metrics)}: update skipped ({skipped} so far)")
            if nonfinite == "skip":
                metrics["nonfinite_skipped"] = skipped
            logger.log(done, metrics, step_time=now - t_last, tokens=tokens, total_steps=total,
                       flops_per_token=metrics_lib.flops_per_token(cfg, length))
            t_last = now
            if not finite and nonfinite == "stop":
                last = max(saved, default=None)
                kept = f"the last checkpoint (step {last}) is kept" if last else "no checkpoint was written"
                raise RunError(f"{_nonfinite_values(metrics)} at step {done}: stopped before saving it; {kept}, "
                               "nothing is exported (nonfinite='skip' skips such steps instead)", EXIT_FAILED)

        def save(step, data_state, force=False):
            drain()  # a state is saved only once its own metrics were checked
            logger.flush()
            meta = {"step": step, "rng": np.asarray(jax.device_get(state["rng"])).tolist(), "config": config_json,
                    "nonfinite_skipped": skipped}
            saved.append(step)
            _on_save_errors(lambda: ckpt.save(step, state, meta, data_iter, force=force, data_state=data_state),
                            step, ckpt_dir)

        if step < total and guard.requested:
            say(f"preempted (signal {guard.signum}) before the first step; nothing new to save, exiting")
            return EXIT_PREEMPTED
        exit_code = 0
        data_state = None
        while step < total:
            batch, data_state = next(prefetcher)
            rows, length = batch["input_ids"].shape  # the data schedule may change them
            state, metrics = on_device_errors(lambda: train_step(state, batch), step + 1)  # noqa: B023
            step += 1
            drain()  # the previous step's metrics: the device already has this step queued
            pending.append((step, metrics, rows * length, length))
            if evaluator is not None and (step % eval_every == 0 or step == total):
                drain()  # this step's own metrics first: a diverged state is not evaluated
                ev = on_device_errors(lambda: evaluator(state["params"]), step)  # noqa: B023 (called at once)
                logger.log_scalars(step, {"eval/loss": ev["loss"], "eval/perplexity": ev["perplexity"]}, label="eval")
            if step % int(config.save_every) == 0 or step == total:
                save(step, data_state)
            if _preempted(guard, ckpt, step):
                if not saved or saved[-1] != step:
                    save(step, data_state, force=True)
                _on_save_errors(ckpt.wait, step, ckpt_dir)
                say(f"preempted (signal {guard.signum}): saved step {step}, exiting")
                exit_code = EXIT_PREEMPTED
                break
        drain()
        _on_save_errors(ckpt.close, max(saved, default=step), ckpt_dir)
        logger.close()
        if step >= total:
            say(f"done: {total} steps; checkpoints in {ckpt_dir}")
            if config.export_hf:
                export_run(ckpt_dir, workdir, export_dir, step, lora)
        return exit_code
    finally:
        if prefetcher is not None:
            prefetcher.close()
        if logger is not None:
            logger.close()
        error = sys.exc_info()[1]
        if not (isinstance(error, RunError) and error.hard_exit):  # a stopped run still finishes earlier saves
            try:
                ckpt.close()
            except Exception as e:  # noqa: BLE001 - the error already on its way out is the one to report
                if error is None:
                    raise RunError(f"checkpoint save failed: {ckpt_lib.one_line(e)} (checkpoint folder "
                                   f"{ckpt_dir})", EXIT_FAILED, hard_exit=True) from None
        guard.restore()
        if lock is not None:
            lock.release()
        if error is not None and created_workdir and pidx == 0:
            remove_if_untouched(workdir)


def remove_if_untouched(workdir: str) -> None:
    """Remove a workdir this run created when it failed before writing anything (bad data found while the
    pipeline was built, say): only empty folders and the lock file in it.  Anything else is kept."""
    import shutil

    from qwen_jax.checkpoint import WorkdirLock

    for root, _dirs, files in os.walk(workdir):
        if any(root != workdir or name != WorkdirLock.FILE_NAME for name in files):
            return
    shutil.rmtree(workdir, ignore_errors=True)


def _nonfinite_values(metrics: dict) -> str:
    """'non-finite learning_rate nan' etc.: the metrics the step's finite flag is made of."""
    import math

    bad = [f"{k} {float(metrics[k])}" for k in ("loss", "z_loss", "grad_norm", "learning_rate")
           if k in metrics and not math.isfinite(float(metrics[k]))]
    return "non-finite " + (", ".join(bad) or "values")


class RunError(RuntimeError):
    """A run that cannot go on, said in one line (`error: ...`); `code` is the exit status."""

    def __init__(self, message: str, code: int, hard_exit: bool = False):
        super().__init__(message)
        self.code = code
        self.hard_exit = hard_exit  # background threads (a failed Orbax save) are broken: skip their teardown


def _on_save_errors(fn, step: int, ckpt_dir: str, what: str = ""):
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
    import re

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


def _tokenizer_dir(data_cfg) -> str | None:
    """The tokenizer folder the data pipeline uses (copied next to the checkpoints)."""
    try:
        from qwen_jax.data.tokenization import tokenizer_dir
    except ImportError:
        return None
    folder = tokenizer_dir(data_cfg.get("tokenizer", ""), data_cfg.get("model_dir", ""))
    return folder if folder and os.path.isdir(folder) else None


def _preempted(guard, ckpt, step: int) -> bool:
    import jax

    flag = guard.requested
    if jax.process_count() > 1:
        import numpy as np
        from jax.experimental import multihost_utils

        flag = bool(np.max(multihost_utils.process_allgather(np.int32(flag))))
    return flag


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
    import shutil

    import jax

    from qwen_jax.checkpoint_format import honour_umask
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
        with open(os.path.join(staging, EXPORT_RECORD), "w", encoding="utf-8") as f:
            json.dump({"step": step, "checkpoints": ckpt_dir}, f)
            f.write("\n")
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


def main(argv):
    if len(argv) > 1:
        fail(f"unexpected arguments: {argv[1:]}")
    if not FLAGS["verbosity"].present:  # Orbax logs every save at INFO through absl: keep stdout readable
        from absl import logging

        logging.set_verbosity(logging.WARNING)
        from qwen_jax.checkpoint import OrbaxErrorLogFilter

        logging.get_absl_logger().addFilter(OrbaxErrorLogFilter())
        sys.unraisablehook = _quiet_after_failed_save(sys.unraisablehook)
    try:
        settings = run_config.distributed_settings(FLAGS.distributed, FLAGS.coordinator_address,
                                                   FLAGS.num_processes, FLAGS.process_id, os.environ)
    except run_config.RunConfigError as e:
        fail(e)
    init_distributed(FLAGS.distributed, settings)
    sys.exit(launch(_CONFIG.value, FLAGS.workdir))


def launch(config, workdir: str | None) -> int:
    """`run`, with bad input (a flag, config key or input file) answered by `fail`: one line, exit 2."""
    try:
        return run(config, workdir)
    except user_errors() as e:
        fail(e)
    except RunError as e:
        print(f"error: {e}", file=sys.stderr, flush=True)
        if e.hard_exit:  # background threads (a failed Orbax save) are broken: skip their teardown
            sys.stdout.flush()
            os._exit(e.code)
        return e.code


def user_errors() -> tuple[type[Exception], ...]:
    """Errors whose message is written for the user (one line naming the flag, key or file): `fail` prints them."""
    from qwen_jax.config import ConfigError
    from qwen_jax.data import BadRecordError, DataError
    from qwen_jax.hf.safetensors_io import CheckpointError
    from qwen_jax.lora import LoraError
    from qwen_jax.trainer.optimizer import FreezeError

    return run_config.RunConfigError, ConfigError, DataError, BadRecordError, CheckpointError, FreezeError, LoraError


def _quiet_after_failed_save(previous):
    """An unraisable hook that drops TensorStore's late callbacks into Orbax's closed event loops.

    After a failed save (a full disk) every outstanding write's completion callback raises
    "Event loop is closed", which TensorStore hands to sys.unraisablehook (a traceback each);
    the failure itself is reported in one line by the loop.
    """

    def hook(unraisable):
        if isinstance(unraisable.exc_value, RuntimeError) and str(unraisable.exc_value) == "Event loop is closed":
            return
        previous(unraisable)

    return hook


def cli():
    app.run(main, flags_parser=parse_flags)


if __name__ == "__main__":
    cli()
