"""The training run: workdir, model state (resume or init), data, the jitted step in a loop, checkpoints.

`run(config, workdir)` is what `python -m qwen_jax.train` calls once flags are parsed and the
distributed runtime is up.  The config is checked by `qwen_jax/run_config.py` before anything is
written.  Metrics, evaluation and the end-of-run export plug in as hooks (`qwen_jax/trainer/hooks.py`);
a caller adds its own with `run(..., hooks=[...])`.  What decides whether the run goes on stays
here: non-finite steps, asynchronous checkpoints every `save_every` steps and at the end, and
SIGTERM/SIGINT (a checkpoint of the current step, then exit 0).
"""

from __future__ import annotations

import json
import math
import os
import shutil
import sys
import time

from qwen_jax import run_config
from qwen_jax.trainer.errors import EXIT_FAILED, EXIT_PREEMPTED, EXIT_USAGE, RunError, on_device_errors, on_save_errors
from qwen_jax.trainer.hooks import EvalHook, ExportHook, Hooks, MetricsHook, PackedAttentionWatch, StepInfo


def run(config, workdir: str, hooks=()) -> int:
    """Train as `config` says in `workdir`; the exit code (0 done or preempted).  `hooks`: extra `Hook`s, called
    after the metrics and evaluation hooks and before the export."""
    import jax
    import numpy as np
    from flax import nnx

    from qwen_jax import checkpoint as ckpt_lib
    from qwen_jax import lora as lora_lib
    from qwen_jax import metrics as metrics_lib
    from qwen_jax import sharding as sh
    from qwen_jax.evaluate import make_evaluator
    from qwen_jax.trainer import optimizer as opt_lib
    from qwen_jax.trainer import train_step as ts
    from qwen_jax.trainer.prefetch import DevicePrefetcher
    from qwen_jax.trainer.synthetic import SyntheticBatches

    say = metrics_lib.say
    host = metrics_lib.HostMemory()  # host RSS per phase: init, first_step, steady, checkpoint, export
    pidx, pcount = jax.process_index(), jax.process_count()
    spec = run_config.validate(config, workdir, num_devices=jax.device_count(), process_count=pcount)
    workdir = spec.workdir  # created only once the config has been validated

    # ---- mesh and model
    mesh = sh.make_mesh(spec.mesh_shape)
    cfg, source, overrides = spec.model, spec.source, spec.model_overrides
    lora = lora_lib.spec_from_config(config.get("lora"))  # None when LoRA is off
    cfg, overrides = lora_lib.base_config(cfg, overrides, lora)
    ring = sh.axis_size("seq", mesh)
    gbs, seq_len = spec.stages[0].global_batch_size, spec.stages[0].seq_len
    say(f"devices: {jax.device_count()} x {jax.devices()[0].device_kind} over {pcount} process(es); "
        f"mesh {dict(mesh.shape)}")
    say(f"model: {source} {config.model.init_from or config.model.preset} | layers {cfg.num_hidden_layers} "
        f"hidden {cfg.hidden_size} vocab {cfg.vocab_size} | dtype {cfg.dtype} params {cfg.param_dtype} | "
        f"remat {cfg.remat} scan_layers {cfg.scan_layers}")
    if len(spec.stages) > 1:
        say("data schedule: " + ", ".join(f"{st.global_batch_size} x {st.seq_len} from step {st.start_step}"
                                          for st in spec.stages))

    graphdef, abstract_params, p_sh = ts.param_shardings(cfg, mesh, lora)
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
    full_rows = config.synthetic_data and config.get("synthetic_layout", "packed") == "full_rows"
    batch_keys = ts.full_row_keys(ring) if full_rows else ts.BATCH_KEYS
    batch_sh = ts.batch_shardings(mesh, gbs, seq_len, keys=batch_keys)
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
    export = ExportHook(ckpt_dir, workdir, export_dir, lora) if config.export_hf else None
    all_hooks = Hooks([])
    prefetcher = None
    try:
        newest = next(iter(ckpt.step_folders()), None)
        if newest is not None and newest >= total and ckpt.missing_items(newest, with_data=True) is None:
            say(f"run complete: checkpoint step {newest} >= total_steps {total} in {ckpt_dir}; nothing to train "
                "(raise --config.total_steps to train further)")
            ckpt.close()
            if export is not None:
                export.on_finish(newest, completed=True)
            return 0

        # ---- data
        if config.synthetic_data:
            data_iter = SyntheticBatches(gbs, seq_len, cfg.vocab_size, seed=int(config.data.get("seed", 0)),
                                         process_index=pidx, process_count=pcount, stages=spec.stages,
                                         layout=config.get("synthetic_layout", "packed"))
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
        skipped = 0  # non-finite steps skipped so far (nonfinite='skip')
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
            tok_dir = None if config.synthetic_data else pipeline_tokenizer_dir(config.data)
            hf_source = config.model.init_from if source != "preset" else None
            on_save_errors(lambda: ckpt_lib.write_side_files(ckpt_dir, cfg, hf_source=hf_source,
                                                             tokenizer_dir=tok_dir),
                           0, ckpt_dir, what="writing the Hugging Face side files beside the checkpoints")
            if not config.synthetic_data:  # the template training renders with is the one the export ships
                on_save_errors(lambda: pipeline.chat_setup.write_chat_template(ckpt_dir), 0, ckpt_dir,
                               what="writing the chat template beside the checkpoints")

        train_step = ts.make_train_step(graphdef, tx, schedule, freeze, mesh=mesh, state_sh=state_sh,
                                        batch_sh=batch_sh, chunk_size=int(config.loss.chunk_size),
                                        z_loss=float(config.loss.z_loss), grad_accum_steps=spec.grad_accum_steps,
                                        zigzag=ring > 1, nonfinite=nonfinite,
                                        dropout_keys=lora_lib.dropout_key_fn(cfg, lora),
                                        router_z_loss_weight=float(config.loss.router_z_loss))
        step = int(jax.device_get(state["step"]))
        logger = metrics_lib.MetricsLogger(
            workdir, peak_flops=metrics_lib.peak_flops_per_device(float(config.peak_flops_per_device)),
            num_devices=jax.device_count(), log_every=int(config.log_every), enabled=pidx == 0, resume_step=step,
            host_memory=host)
        all_hooks.hooks.append(MetricsHook(logger, cfg, total))
        packed_watch = PackedAttentionWatch.for_model(
            cfg, ring, lambda line: print(line if pcount == 1 else f"[process {pidx}] {line}", flush=True))
        all_hooks.hooks.append(packed_watch)
        evaluator = make_evaluator(config, graphdef, mesh=mesh, process_index=pidx, process_count=pcount)
        if evaluator is not None:
            all_hooks.hooks.append(EvalHook(evaluator, logger, int(config.eval.every), total))
        all_hooks.hooks.extend(hooks)
        if export is not None:
            all_hooks.hooks.append(export)
        config_json = json.loads(config.to_json_best_effort())

        def to_global(local):
            packed = packed_watch.measure(local)
            local = ts.permute_batch_for_ring(local, ring)
            return {k: jax.make_array_from_process_local_data(batch_sh[k], np.asarray(local[k]))
                    for k in batch_keys}, packed

        prefetcher = DevicePrefetcher(data_iter, to_global)

        def report_phase(record, at_step):
            say(host.line(record))
            logger.log_scalars(at_step, host.scalars(record), echo=False)

        loop = TrainLoop(state, all_hooks, nonfinite, skipped=skipped, saved=saved,
                         on_first_metrics=lambda done: report_phase(host.end("steady"), done))
        state_bytes = metrics_lib.process_state_bytes(state)
        del state

        def save(step, data_state, force=False):
            loop.sync()  # a state is saved only once its own metrics were checked
            all_hooks.on_checkpoint(step)
            host.end("checkpoint")
            meta = {"step": step, "rng": np.asarray(jax.device_get(loop.state["rng"])).tolist(),
                    "config": config_json, "nonfinite_skipped": loop.skipped}
            saved.append(step)
            on_save_errors(lambda: ckpt.save(step, loop.state, meta, data_iter, force=force, data_state=data_state),
                           step, ckpt_dir)
            host.end("steady")

        if step < total and guard.requested:
            say(f"preempted (signal {guard.signum}) before the first step; nothing new to save, exiting")
            return EXIT_PREEMPTED
        exit_code = 0
        data_state = None
        report_phase(host.end("first_step"), step)
        while step < total:
            (batch, packed), data_state = next(prefetcher)
            packed_watch.consumed(packed)
            rows, length = batch["input_ids"].shape  # the data schedule may change them
            loop.state, metrics = on_device_errors(lambda: train_step(loop.state, batch), step + 1)  # noqa: B023
            step += 1
            loop.sync()  # the previous step's metrics: the device already has this step queued
            loop.pending = (step, metrics, rows * length, length)
            all_hooks.on_state(step, loop)
            if step % int(config.save_every) == 0 or step == total:
                save(step, data_state)
            if preempted(guard):
                if not saved or saved[-1] != step:
                    save(step, data_state, force=True)
                on_save_errors(ckpt.wait, step, ckpt_dir)
                say(f"preempted (signal {guard.signum}): saved step {step}, exiting")
                exit_code = EXIT_PREEMPTED
                break
        loop.sync()
        host.end("checkpoint")  # the last save's wait for its write
        on_save_errors(ckpt.close, max(saved, default=step), ckpt_dir)
        host.end("export" if export is not None and step >= total else None)
        if step >= total:
            say(f"done: {total} steps; checkpoints in {ckpt_dir}")
        all_hooks.on_finish(step, completed=step >= total)
        if host.phase == "export":
            host.end()
        scalars, lines = host.summary(state_bytes)
        logger.log_scalars(step, scalars, echo=False)
        for line in lines:
            say(line)
        return exit_code
    finally:
        if prefetcher is not None:
            prefetcher.close()
        all_hooks.close()
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


class TrainLoop:
    """The loop's view for hooks (`hooks.LoopView`): the state after the current step, and `sync`, which fetches
    the dispatched step's metrics, hands them to the hooks and applies the `nonfinite` mode."""

    def __init__(self, state, hooks, nonfinite: str, *, skipped: int, saved: list[int], on_first_metrics=None):
        self.state = state
        self.hooks = hooks
        self.nonfinite = nonfinite
        self.skipped = skipped  # non-finite steps skipped so far
        self.saved = saved  # checkpoint steps (shared with the caller): named when a non-finite step stops the run
        self.pending = None  # the last dispatched step: (step, metrics on device, tokens, row length)
        self.t_last = time.perf_counter()
        self.on_first_metrics = on_first_metrics  # called once, with the step, after the first metrics' hooks

    def sync(self) -> None:
        """Fetch and check the dispatched step's metrics (waits for that step); stop on a non-finite step."""
        import jax

        from qwen_jax.metrics import say

        if self.pending is None:
            return
        (done, metrics, tokens, length), self.pending = self.pending, None
        metrics = on_device_errors(lambda: jax.device_get(metrics), done)
        now = time.perf_counter()
        finite = bool(metrics.pop("finite"))
        if not finite and self.nonfinite == "skip":
            self.skipped += 1
            say(f"step {done}: {nonfinite_values(metrics)}: update skipped ({self.skipped} so far)")
        if self.nonfinite == "skip":
            metrics["nonfinite_skipped"] = self.skipped
        self.hooks.on_step_end(done, metrics, StepInfo(step_time=now - self.t_last, tokens=tokens, seq_len=length))
        self.t_last = now
        if self.on_first_metrics is not None:
            first, self.on_first_metrics = self.on_first_metrics, None
            first(done)
        if not finite and self.nonfinite == "stop":
            last = max(self.saved, default=None)
            kept = f"the last checkpoint (step {last}) is kept" if last else "no checkpoint was written"
            raise RunError(f"{nonfinite_values(metrics)} at step {done}: stopped before saving it; {kept}, "
                           "nothing is exported (nonfinite='skip' skips such steps instead)", EXIT_FAILED)


def remove_if_untouched(workdir: str) -> None:
    """Remove a workdir this run created when it failed before writing anything (bad data found while the
    pipeline was built, say): only empty folders and the lock file in it.  Anything else is kept."""
    from qwen_jax.checkpoint import WorkdirLock

    for root, _dirs, files in os.walk(workdir):
        if any(root != workdir or name != WorkdirLock.FILE_NAME for name in files):
            return
    shutil.rmtree(workdir, ignore_errors=True)


def nonfinite_values(metrics: dict) -> str:
    """'non-finite learning_rate nan' etc.: the metrics the step's finite flag is made of."""
    bad = [f"{k} {float(metrics[k])}" for k in ("loss", "z_loss", "grad_norm", "learning_rate")
           if k in metrics and not math.isfinite(float(metrics[k]))]
    return "non-finite " + (", ".join(bad) or "values")


def pipeline_tokenizer_dir(data_cfg) -> str | None:
    """The tokenizer folder the data pipeline uses (copied next to the checkpoints), if it is a folder."""
    from qwen_jax.data.tokenization import tokenizer_dir

    folder = tokenizer_dir(data_cfg.get("tokenizer", ""), data_cfg.get("model_dir", ""))
    return folder if folder and os.path.isdir(folder) else None


def preempted(guard) -> bool:
    """Whether any process got SIGTERM/SIGINT: every process stops after the same step."""
    import jax

    flag = guard.requested
    if jax.process_count() > 1:
        import numpy as np
        from jax.experimental import multihost_utils

        flag = bool(np.max(multihost_utils.process_allgather(np.int32(flag))))
    return flag
