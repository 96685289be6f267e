"""Launcher: `python -m qwen_jax.train --config=configs/demo.py --workdir=DIR [--config.key=value ...]`.

One code path for one CPU, one GPU, a GPU node or a TPU pod slice.  This module is the command
line only:

1. flags and config (`configs/base.py` keys); the whole run is checked by `qwen_jax/run_config.py`
   before anything is written: a bad flag, key or input file is one line `error: ...` on stderr and
   exit code 2;
2. `jax.distributed.initialize` from `--coordinator_address/--num_processes/--process_id` or the
   environment (`JAX_COORDINATOR_ADDRESS`, `JAX_NUM_PROCESSES`, `JAX_PROCESS_ID`; or
   `--distributed=auto` for TPU pods / SLURM auto-detection);
3. `qwen_jax.trainer.loop.run`: mesh, model, resume or init, the loop, checkpoints, and the hooks
   (metrics, evaluation, the Hugging Face export at the end).
"""
from __future__ import annotations

import os
import sys

from absl import app, flags
from ml_collections import config_flags

from qwen_jax import run_config
from qwen_jax.trainer.errors import RunError
from qwen_jax.trainer.loop import run

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
def main(argv):
    if len(argv) > 1:
        fail(f"unexpected arguments: {argv[1:]}")
    if not FLAGS["verbosity"].present:  # Orbax logs every save at INFO through absl: keep stdout readable
        from absl import logging

        logging.set_verbosity(logging.WARNING)
        from qwen_jax.checkpoint import OrbaxErrorLogFilter, quiet_orbax_leftovers

        logging.get_absl_logger().addFilter(OrbaxErrorLogFilter())
        sys.unraisablehook = quiet_orbax_leftovers(sys.unraisablehook)
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


def cli():
    app.run(main, flags_parser=parse_flags)


if __name__ == "__main__":
    cli()
