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
6. at the end, export a Hugging Face folder (when `tools/convert.py` is available).
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

EXIT_PREEMPTED = 0  # exit code after a SIGTERM-triggered checkpoint (documented in docs/training.md)


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
def init_distributed(mode: str, address: str | None, num_processes: int | None, process_id: int | None) -> None:
    import jax

    address = address or os.environ.get("JAX_COORDINATOR_ADDRESS")
    if num_processes is None and os.environ.get("JAX_NUM_PROCESSES"):
        num_processes = int(os.environ["JAX_NUM_PROCESSES"])
    if process_id is None and os.environ.get("JAX_PROCESS_ID"):
        process_id = int(os.environ["JAX_PROCESS_ID"])
    if mode == "off":
        return
    if mode == "auto":
        jax.distributed.initialize()
        return
    if address and (num_processes or 1) > 1:
        if process_id is None:
            raise ValueError("--coordinator_address given without --process_id (or JAX_PROCESS_ID)")
        if os.environ.get("JAX_PLATFORMS", "").startswith("cpu"):
            jax.config.update("jax_cpu_collectives_implementation", "gloo")
        jax.distributed.initialize(coordinator_address=address, num_processes=num_processes, process_id=process_id)


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

    # ---- data
    if config.synthetic_data:
        data_iter = SyntheticBatches(gbs, seq_len, cfg.vocab_size, seed=int(config.data.get("seed", 0)),
                                     process_index=pidx, process_count=pcount, stages=spec.stages)
    else:
        from qwen_jax.data import make_pipeline

        if source == "hf" and not config.data.get("model_dir", "x"):
            config.data.model_dir = config.model.init_from  # stop ids from the model's generation_config.json
        data_iter = make_pipeline(config.data, process_index=pidx, process_count=pcount).iterator()

    # ---- state: resume, or init
    os.makedirs(workdir, exist_ok=True)
    ckpt_dir = ckpt_lib.checkpoint_dir(workdir)
    ckpt = ckpt_lib.Checkpointer(ckpt_dir, keep=int(config.keep_checkpoints),
                                 async_save=bool(config.async_checkpointing))
    latest = ckpt.latest_step()
    if latest is not None:
        state, meta = ckpt.restore(latest, abstract, data_iter)
        say(f"resumed from {ckpt_dir} step {latest}")
    else:
        base_abstract, base_sh = lora_lib.base_only(abstract_params), lora_lib.base_only(p_sh)
        if source == "preset":
            params = ts.init_params(cfg, int(config.seed), base_sh)
        elif source == "hf":
            from qwen_jax.hf_io import from_pretrained

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
        ckpt_lib.write_side_files(ckpt_dir, cfg, hf_source=config.model.init_from if source != "preset" else None,
                                  tokenizer_dir=tok_dir)

    train_step = ts.make_train_step(graphdef, tx, schedule, freeze, mesh=mesh, state_sh=state_sh, batch_sh=batch_sh,
                                    chunk_size=int(config.loss.chunk_size), z_loss=float(config.loss.z_loss),
                                    grad_accum_steps=accum, zigzag=ring > 1,
                                    dropout_keys=lora_lib.dropout_key_fn(cfg, lora),
                                    router_z_loss_weight=float(config.loss.router_z_loss))
    logger = metrics_lib.MetricsLogger(
        workdir, peak_flops=metrics_lib.peak_flops_per_device(float(config.peak_flops_per_device)),
        num_devices=jax.device_count(), log_every=int(config.log_every), enabled=pidx == 0)
    config_json = json.loads(config.to_json_best_effort())

    def save(step, force=False):
        meta = {"step": step, "rng": np.asarray(jax.device_get(state["rng"])).tolist(), "config": config_json}
        return ckpt.save(step, state, meta, data_iter, force=force)

    guard = ckpt_lib.PreemptionGuard()
    step = int(jax.device_get(state["step"]))
    total = int(config.total_steps)
    t_last = time.perf_counter()
    exit_code = 0
    while step < total:
        local = ts.permute_batch_for_ring(next(data_iter), ring)
        batch = {k: jax.make_array_from_process_local_data(batch_sh[k], np.asarray(local[k]))
                 for k in ts.BATCH_KEYS}
        state, metrics = train_step(state, batch)
        step += 1
        metrics = jax.device_get(metrics)
        now = time.perf_counter()
        rows, length = batch["input_ids"].shape  # the data schedule may change them
        logger.log(step, metrics, step_time=now - t_last, tokens=rows * length, total_steps=total,
                   flops_per_token=metrics_lib.flops_per_token(cfg, length))
        t_last = now
        if step % int(config.save_every) == 0 or step == total:
            save(step)
        if _preempted(guard, ckpt, step):
            if ckpt.latest_step() != step:
                save(step, force=True)
            ckpt.wait()
            say(f"preempted (signal {guard.signum}): saved step {step}, exiting")
            exit_code = EXIT_PREEMPTED
            break
    ckpt.close()
    logger.close()
    if step >= total:
        say(f"done: {total} steps; checkpoints in {ckpt_dir}")
        if config.export_hf and lora is not None and pidx == 0:
            for folder in lora_lib.export(ckpt_dir, total, lora, adapter_dir=os.path.join(workdir, "hf_adapter"),
                                          merged_dir=config.export_hf_dir or os.path.join(workdir, "hf_export")):
                say(f"exported {folder}")
        elif config.export_hf and lora is None:
            export_hf(ckpt_dir, config.export_hf_dir or os.path.join(workdir, "hf_export"), total)
    return exit_code


def _tokenizer_dir(data_cfg) -> str | None:
    """The tokenizer folder the data pipeline uses (copied next to the checkpoints)."""
    try:
        from qwen_jax.data.tokenization import tokenizer_dir
    except ImportError:
        return None
    folder = tokenizer_dir(data_cfg.get("tokenizer", ""))
    return folder if folder and os.path.isdir(folder) else None


def _preempted(guard, ckpt, step: int) -> bool:
    import jax

    flag = guard.requested
    if jax.process_count() > 1:
        import numpy as np
        from jax.experimental import multihost_utils

        flag = bool(np.max(multihost_utils.process_allgather(np.int32(flag))))
    return flag


def export_hf(ckpt_dir: str, out_dir: str, step: int) -> None:
    import jax

    from qwen_jax.metrics import say

    try:
        from tools.convert import orbax_to_hf
    except ImportError:
        say("HF export skipped: tools/convert.py (issue 4) is not available yet")
        return
    if jax.process_index() == 0:
        orbax_to_hf(ckpt_dir, out_dir, step=step)
        say(f"exported Hugging Face folder: {out_dir}")


def main(argv):
    if len(argv) > 1:
        fail(f"unexpected arguments: {argv[1:]}")
    if not FLAGS["verbosity"].present:  # Orbax logs every save at INFO through absl: keep stdout readable
        from absl import logging

        logging.set_verbosity(logging.WARNING)
    init_distributed(FLAGS.distributed, FLAGS.coordinator_address, FLAGS.num_processes, FLAGS.process_id)
    sys.exit(launch(_CONFIG.value, FLAGS.workdir))


def launch(config, workdir: str | None) -> int:
    """`run`, with bad input (a flag, config key or input file) answered by `fail`: one line, exit 2."""
    try:
        return run(config, workdir)
    except user_errors() as e:
        fail(e)


def user_errors() -> tuple[type[Exception], ...]:
    """Errors whose message is written for the user (one line naming the flag, key or file): `fail` prints them."""
    from qwen_jax.config import ConfigError
    from qwen_jax.data import BadRecordError, DataError
    from qwen_jax.hf_io import CheckpointError
    from qwen_jax.lora import LoraError
    from qwen_jax.trainer.optimizer import FreezeError

    return run_config.RunConfigError, ConfigError, DataError, BadRecordError, CheckpointError, FreezeError, LoraError


def cli():
    app.run(main, flags_parser=parse_flags)


if __name__ == "__main__":
    cli()
