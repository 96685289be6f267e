"""A training run's config and command line, checked before anything is written.

`python -m qwen_jax.train` calls `validate` once, before it creates the workdir, builds the data
pipeline or touches a device: every value a user can get wrong is checked here, and each failure is
a `RunConfigError` whose message is one line naming the flag, the config key or the file (and line)
to fix.  The launcher prints it as `error: <message>` and exits 2.  The functions are pure (device
and process counts are arguments), so the checks are testable without a launch.

What is checked:

* the command line: every `--config.<key>=<value>` names an existing key and parses as its type;
  list-valued keys (`data.sources`) take JSON, which absl cannot parse, so they are taken off the
  command line here and set on the parsed config (`list_overrides`, `apply_overrides`);
* the workdir (not a file; it or its nearest existing parent writable) and the export folder;
* run length, checkpoints, optimizer values;
* the mesh against the device count;
* the model: preset name, `model.overrides` (each key a `QwenConfig` field, each value of its
  type), `model.init_from` (a Hugging Face folder or an Orbax checkpoint root) and its tensor
  shapes against its config, read from the safetensors headers / Orbax metadata only;
* the data: `data.sources` entries and their files, `data.tokenizer`, and every stage of the
  progressive length schedule (`qwen_jax/data/schedule.py`): each stage's global batch divides
  over the processes, by `grad_accum_steps`, its microbatch over data x fsdp, by the packing lanes,
  and its length over the `seq` axis (twice over for ring attention's zig-zag layout).  A later
  stage that does not fit fails here, not when the run reaches it.
"""

from __future__ import annotations

import dataclasses
import importlib.util
import json
import math
import os
import re
import types
import typing
from typing import Any

from qwen_jax.config import MOE_DISPATCHES, MOE_MATMUL_IMPLS, ConfigError, QwenConfig
from qwen_jax.data.errors import DataError
from qwen_jax.data.schedule import Stage, packing_lanes, parse_schedule
from qwen_jax.trainer.synthetic import SYNTHETIC_LAYOUTS

DEFAULT_CONFIG_FILE = "configs/base.py"


class RunConfigError(ValueError):
    """A flag, config value or input file the run cannot use; the message is one line that names it."""


@dataclasses.dataclass(frozen=True)
class RunSpec:
    """What `validate` derived from the config: the trainer builds the run from these."""

    workdir: str  # absolute
    mesh_shape: dict[str, int]  # every axis resolved (no -1)
    model: QwenConfig
    source: str  # 'preset' | 'hf' | 'orbax'
    model_overrides: dict  # the QwenConfig overrides applied (run settings and model.overrides)
    stages: tuple[Stage, ...]  # the data schedule (one stage without seq_len_schedule)
    grad_accum_steps: int


# ---------------------------------------------------------------- command line
@dataclasses.dataclass(frozen=True)
class _Override:
    key: str
    value: str
    indices: tuple[int, ...]  # positions in argv (the flag, and its value when given separately)


def _scan_command_line(argv: list[str]) -> tuple[str, list[_Override]]:
    """(--config file spec, the --config.<key> overrides in order)."""
    spec = DEFAULT_CONFIG_FILE
    overrides = []
    args = list(argv)
    for i, arg in enumerate(args[1:], start=1):
        if arg.startswith("--config="):
            spec = arg.split("=", 1)[1]
        elif arg == "--config" and i + 1 < len(args):
            spec = args[i + 1]
        elif arg.startswith(("--config.", "--noconfig.")):
            body = arg.split(".", 1)[1]
            key, has_value, value = body.partition("=")
            indices = (i,)
            if not has_value:
                if arg.startswith("--noconfig."):
                    value = "false"
                elif i + 1 < len(args) and not args[i + 1].startswith("--"):
                    value, indices = args[i + 1], (i, i + 1)
                else:
                    value = "true"
            overrides.append(_Override(key, value, indices))
    return spec, overrides


def load_config_file(spec: str):
    """`get_config()` (or `get_config(arg)` for `file.py:arg`) of a config file."""
    path, _, arg = spec.partition(":")
    module_spec = importlib.util.spec_from_file_location("_train_config", path)
    if module_spec is None or not os.path.isfile(path):
        raise RunConfigError(f"--config={spec}: file {path!r} not found")
    module = importlib.util.module_from_spec(module_spec)
    module_spec.loader.exec_module(module)
    if not hasattr(module, "get_config"):
        raise RunConfigError(f"--config={spec}: {path} defines no get_config()")
    return module.get_config(arg) if arg else module.get_config()


def flat_keys(cfg, prefix: str = "") -> dict:
    """{dotted key: value} over the leaves of a ConfigDict."""
    out = {}
    for key, value in cfg.items():
        name = f"{prefix}{key}"
        if hasattr(value, "items"):
            out.update(flat_keys(value, name + "."))
        else:
            out[name] = value
    return out


def _parses_as(kind: type, value: str) -> bool:
    if kind is bool:
        return value.lower() in ("true", "false", "1", "0", "yes", "no")
    try:
        kind(value)
    except ValueError:
        return False
    return True


def check_overrides(argv: list[str]) -> dict[str, list]:
    """Every `--config.<key>=<value>` names an existing key and parses as that key's type.

    Returns the list-valued overrides, parsed from JSON: absl's config flags cannot parse lists,
    so the launcher takes them off the command line (`absl_argv`) and sets them itself."""
    spec, overrides = _scan_command_line(argv)
    cfg = load_config_file(spec)
    if not overrides:
        return {}
    keys = flat_keys(cfg)
    groups = {k.rsplit(".", 1)[0] for k in keys if "." in k}
    lists = {}
    for o in overrides:
        if o.key in groups:
            continue
        if o.key not in keys:
            raise RunConfigError(f"unknown config key {o.key!r} (--config.{o.key}); "
                                 f"valid keys: {', '.join(sorted(keys))}")
        default = keys[o.key]
        if isinstance(default, list):
            try:
                value = json.loads(o.value)
            except json.JSONDecodeError as e:
                raise RunConfigError(f"config key {o.key!r} expects a JSON list (--config.{o.key}='[...]'), "
                                     f"got {o.value!r}: {e.msg} at column {e.colno}") from None
            if not isinstance(value, list):
                raise RunConfigError(f"config key {o.key!r} expects a JSON list (--config.{o.key}='[...]'), "
                                     f"got {type(value).__name__} {o.value!r}")
            lists[o.key] = value
        elif type(default) in (bool, int, float) and not _parses_as(type(default), o.value):
            raise RunConfigError(f"config key {o.key!r} expects {type(default).__name__} (default {default!r}), "
                                 f"got {o.value!r}")
    return lists


def absl_argv(argv: list[str], list_keys) -> list[str]:
    """argv as absl's config flag should parse it: the config file named (DEFAULT_CONFIG_FILE when it is not, right
    after the program name, before any override) and the list-valued overrides `list_keys` taken off."""
    _, overrides = _scan_command_line(argv)
    drop = {i for o in overrides if o.key in list_keys for i in o.indices}
    out = [a for i, a in enumerate(argv) if i not in drop]
    if not any(a == "--config" or a.startswith("--config=") for a in out[1:]):
        out.insert(1, f"--config={DEFAULT_CONFIG_FILE}")
    return out


def apply_overrides(config, values: dict[str, Any]) -> None:
    """Set dotted keys on a (possibly locked) ConfigDict."""
    for key, value in values.items():
        *parents, last = key.split(".")
        node = config
        for p in parents:
            node = node[p]
        node[last] = value


# ---------------------------------------------------------------- distributed
@dataclasses.dataclass(frozen=True)
class Distributed:
    """How this process joins a multi-process run (`jax.distributed.initialize` arguments), or None fields."""

    coordinator_address: str | None
    num_processes: int | None
    process_id: int | None

    @property
    def multi_process(self) -> bool:
        return bool(self.coordinator_address) and (self.num_processes or 1) > 1


DISTRIBUTED_ENV = {"coordinator_address": "JAX_COORDINATOR_ADDRESS", "num_processes": "JAX_NUM_PROCESSES",
                   "process_id": "JAX_PROCESS_ID"}


def distributed_settings(mode: str, coordinator_address: str | None, num_processes: int | None,
                         process_id: int | None, environ) -> Distributed:
    """The `--coordinator_address/--num_processes/--process_id` flags, each falling back to its JAX_* variable,
    checked as a set: a coordinator needs both partners (and they it), 0 <= process id < processes.

    Checked before `jax.distributed.initialize`, which would otherwise wait for a coordinator that never comes
    or fail deep inside with a traceback.  With `--distributed=auto|off` the explicit flags have no effect, so
    giving them is an error too."""
    flags_given = {"coordinator_address": coordinator_address, "num_processes": num_processes,
                   "process_id": process_id}
    if mode != "env":
        given = [f"--{k}" for k, v in flags_given.items() if v is not None]
        if given:
            raise RunConfigError(f"{', '.join(given)}: not used with --distributed={mode} (only with "
                                 "--distributed=env, the default)")
        return Distributed(None, None, None)
    names, values = {}, {}
    for key, flag_value in flags_given.items():
        env_value = environ.get(DISTRIBUTED_ENV[key]) or None
        names[key] = f"--{key}" if flag_value is not None else DISTRIBUTED_ENV[key]
        if flag_value is not None or env_value is None:
            values[key] = flag_value
        elif key == "coordinator_address":
            values[key] = env_value
        else:
            try:
                values[key] = int(env_value)
            except ValueError:
                raise RunConfigError(f"{DISTRIBUTED_ENV[key]}={env_value!r}: expected an integer") from None
    address, count, index = values["coordinator_address"], values["num_processes"], values["process_id"]
    present = [names[k] for k, v in values.items() if v is not None]
    missing = [f"--{k} (or {DISTRIBUTED_ENV[k]})" for k, v in values.items() if v is None]
    if present and missing:
        raise RunConfigError(f"{' and '.join(present)} given without {' and '.join(missing)}: a multi-process run "
                             "needs all three (docs/training.md)")
    if not present:
        return Distributed(None, None, None)
    host, _, port = address.rpartition(":")
    if not host or not port.isdigit() or not 0 < int(port) < 65536:
        raise RunConfigError(f"{names['coordinator_address']}={address!r}: expected host:port")
    if count < 1:
        raise RunConfigError(f"{names['num_processes']}={count}: must be >= 1")
    if not 0 <= index < count:
        raise RunConfigError(f"{names['process_id']}={index}: must be in [0, {count}) "
                             f"({names['num_processes']}={count})")
    return Distributed(address, count, index)


# ---------------------------------------------------------------- run settings
def _number(config, key: str):
    node = config
    for part in key.split("."):
        node = node[part]
    return node


def _check_at_least(config, key: str, low: int) -> int:
    value = _number(config, key)
    if isinstance(value, bool) or not isinstance(value, int) or value < low:
        raise RunConfigError(f"config key {key!r} must be an integer >= {low}, got {value!r}")
    return value


def check_moe_matmul(cfg: QwenConfig) -> None:
    """`model.moe_matmul=mosaic_gpu` names kernels that run only on a Hopper GPU: refused elsewhere
    before anything is written, instead of failing inside the first compiled step."""
    if cfg.moe_matmul != "mosaic_gpu":
        return
    from qwen_jax.layers.grouped_matmul import is_hopper  # imports jax: only when the choice is explicit

    if not is_hopper():
        import jax

        raise RunConfigError(f"config key 'model.moe_matmul' is 'mosaic_gpu', which needs a Hopper GPU (compute "
                             f"capability 9.x); this run has {jax.devices()[0].device_kind}: use auto or xla")


def check_run_settings(config) -> None:
    """Run length, checkpoints, logging, loss and optimizer values."""
    for key in ("total_steps", "save_every", "keep_checkpoints", "log_every", "grad_accum_steps",
                "loss.chunk_size", "data.global_batch_size", "data.seq_len"):
        _check_at_least(config, key, 1)
    _check_at_least(config, "optimizer.warmup_steps", 0)
    opt = config.optimizer
    if opt.schedule not in ("cosine", "linear", "constant"):
        raise RunConfigError(f"config key 'optimizer.schedule' must be cosine | linear | constant, "
                             f"got {opt.schedule!r}")
    ranges = {"learning_rate": (0, math.inf), "min_lr_ratio": (0, 1), "b1": (0, 1), "b2": (0, 1),
              "eps": (0, math.inf), "weight_decay": (0, math.inf), "grad_clip": (0, math.inf)}
    for key, (low, high) in ranges.items():
        value = opt[key]
        if isinstance(value, bool) or not isinstance(value, int | float) or not (
                math.isfinite(value) and low <= value <= high):
            interval = f">= {low}" if high == math.inf else f"in [{low}, {high}]"
            raise RunConfigError(f"config key 'optimizer.{key}' must be a finite number {interval}, got {value!r}")
    if config.model.moe_dispatch not in MOE_DISPATCHES:
        raise RunConfigError(f"config key 'model.moe_dispatch' must be {' | '.join(MOE_DISPATCHES)}, "
                             f"got {config.model.moe_dispatch!r}")
    if config.model.moe_matmul not in MOE_MATMUL_IMPLS:
        raise RunConfigError(f"config key 'model.moe_matmul' must be {' | '.join(MOE_MATMUL_IMPLS)}, "
                             f"got {config.model.moe_matmul!r}")
    layout = config.get("synthetic_layout", "packed")
    if layout not in SYNTHETIC_LAYOUTS:
        raise RunConfigError(f"config key 'synthetic_layout' must be {' | '.join(SYNTHETIC_LAYOUTS)}, got {layout!r}")
    if layout != "packed" and not config.synthetic_data:
        raise RunConfigError(f"config key 'synthetic_layout' ({layout}) applies to synthetic data only: "
                             "set --config.synthetic_data=True or leave the layout at packed")
    if config.get("nonfinite", "stop") not in ("stop", "skip"):
        raise RunConfigError(f"config key 'nonfinite' must be stop | skip, got {config.nonfinite!r}")
    z = config.loss.z_loss
    if isinstance(z, bool) or not isinstance(z, int | float) or not (math.isfinite(z) and z >= 0):
        raise RunConfigError(f"config key 'loss.z_loss' must be a finite number >= 0, got {z!r}")


def _check_writable_dir(path: str, name: str) -> str:
    """`path` absolute; it is a writable directory, or can be created (its nearest existing parent is one)."""
    full = os.path.abspath(path)
    if os.path.exists(full):
        if not os.path.isdir(full):
            raise RunConfigError(f"{name}: {full} exists and is not a directory")
        if not os.access(full, os.W_OK | os.X_OK):
            raise RunConfigError(f"{name}: {full} is not writable")
        return full
    parent = os.path.dirname(full)
    while not os.path.exists(parent):
        parent = os.path.dirname(parent)
    if not os.path.isdir(parent):
        raise RunConfigError(f"{name}: cannot create {full}: {parent} is not a directory")
    if not os.access(parent, os.W_OK | os.X_OK):
        raise RunConfigError(f"{name}: cannot create {full}: {parent} is not writable")
    return full


def check_workdir(workdir: str | None) -> str:
    """The absolute workdir; it is a writable directory or can be created.  Nothing is created here."""
    if not workdir:
        raise RunConfigError("--workdir is required")
    return _check_writable_dir(workdir, f"--workdir={workdir}")


# ---------------------------------------------------------------- mesh
def mesh_shape(config, num_devices: int) -> dict[str, int]:
    from qwen_jax.sharding import mesh_sizes

    shape = {k: v for k, v in config.mesh.items()}
    bad = {k: v for k, v in shape.items() if isinstance(v, bool) or not isinstance(v, int)}
    if bad:
        raise RunConfigError(f"config key 'mesh': sizes must be integers, got {bad}")
    try:
        return mesh_sizes(shape, num_devices)
    except ValueError as e:
        raise RunConfigError(f"config key 'mesh': {e} (set --config.mesh.<axis>; one axis may be -1)") from None


# ---------------------------------------------------------------- model
_FIELD_TYPES = typing.get_type_hints(QwenConfig)


def _matches(value, hint) -> bool:
    if hint is typing.Any:
        return True
    if isinstance(hint, types.UnionType) or typing.get_origin(hint) is typing.Union:
        return any(_matches(value, h) for h in typing.get_args(hint))
    if hint is type(None):
        return value is None
    if hint is float:
        return isinstance(value, int | float) and not isinstance(value, bool)
    if hint is int:
        return isinstance(value, int) and not isinstance(value, bool)
    if hint is tuple:
        return isinstance(value, list | tuple)
    return isinstance(value, hint)


def parse_model_overrides(text: str) -> dict:
    """`model.overrides` ("key=value,key=value"): each key a QwenConfig field, each value (JSON) of its type."""
    out = {}
    items = re.split(r",\s*(?=[A-Za-z_]\w*\s*=)", text)  # commas inside a JSON value ([1, 2]) stay
    for item in filter(None, (s.strip() for s in items)):
        key, eq, raw = item.partition("=")
        key = key.strip()
        if not eq:
            raise RunConfigError(f"config key 'model.overrides': expected key=value, got {item!r}")
        if key not in _FIELD_TYPES:
            raise RunConfigError(f"config key 'model.overrides': unknown model key {key!r}; "
                                 f"valid: {', '.join(sorted(_FIELD_TYPES))}")
        try:
            value = json.loads(raw)
        except json.JSONDecodeError:
            value = raw.strip()
        hint = _FIELD_TYPES[key]
        if not _matches(value, hint):
            expected = getattr(hint, "__name__", None) or str(hint)
            raise RunConfigError(f"config key 'model.overrides': {key} expects {expected}, got {raw.strip()!r}")
        out[key] = tuple(value) if isinstance(value, list) else value
    return out


def init_source(path: str) -> str:
    """'hf' for a Hugging Face folder, 'orbax' for a CheckpointManager root (numbered step dirs)."""
    if not os.path.isdir(path):
        raise RunConfigError(f"config key 'model.init_from': {path!r} is not a directory")
    names = os.listdir(path)
    if any(n.endswith(".safetensors") or n.endswith(".safetensors.index.json") for n in names):
        return "hf"
    if any(n.isdigit() and os.path.isdir(os.path.join(path, n)) for n in names):
        return "orbax"
    raise RunConfigError(f"config key 'model.init_from': {path!r} is neither a Hugging Face folder (safetensors) "
                         "nor an Orbax checkpoint root (numbered step directories)")


def model_config(config) -> tuple[QwenConfig, str, dict]:
    """(QwenConfig, source kind 'preset' | 'hf' | 'orbax', the QwenConfig overrides applied)."""
    from qwen_jax.config import config_from_dict, load_hf_config
    from qwen_jax.presets import get_preset

    m = config.model
    run = dict(dtype=m.dtype, param_dtype=m.param_dtype, attention=m.attention, remat=m.remat,
               scan_layers=bool(m.scan_layers), moe_dispatch=m.moe_dispatch, moe_matmul=m.moe_matmul)
    arch = parse_model_overrides(m.overrides)
    if not m.init_from:
        try:
            raw = get_preset(m.preset)
        except KeyError as e:
            raise RunConfigError(f"config key 'model.preset': {e.args[0]}") from None
        if "vocab_size" in arch:  # a shrunk vocabulary (tests): special-token ids of the preset would not fit
            for key in ("bos_token_id", "eos_token_id", "pad_token_id"):
                ids = raw.get(key)
                if any(i >= arch["vocab_size"] for i in (ids if isinstance(ids, list) else [ids]) if i is not None):
                    raw[key] = None
    overrides = run | arch
    try:
        if not m.init_from:
            return config_from_dict(raw, source=f"preset {m.preset!r}", **overrides), "preset", overrides
        kind = init_source(m.init_from)
        return load_hf_config(os.path.join(m.init_from, "config.json"), **overrides), kind, overrides
    except ConfigError as e:
        raise RunConfigError(str(e)) from None


def check_init_shapes(cfg: QwenConfig, source: str, path: str, step: int | None) -> None:
    """The tensors of `model.init_from` have the shapes its config (with the overrides) implies.

    Reads only the safetensors headers (or index) and the Orbax array metadata: a folder whose
    config.json disagrees with its weights fails here, before any parameter is allocated."""
    from qwen_jax.hf.models import abstract_model, flat_paths
    from qwen_jax.hf.safetensors_io import CheckpointError, TensorReader, check_tensors

    _, abstract_state = abstract_model(cfg)
    if source == "hf":
        try:
            reader = TensorReader(path)
            try:
                check_tensors(cfg, reader, flat_paths(abstract_state), path)
            finally:
                reader.close()
        except CheckpointError as e:
            raise RunConfigError(f"config key 'model.init_from': {e}") from None
        return
    from flax import nnx

    from qwen_jax.checkpoint_format import ParamReader

    # Finished Orbax steps are the numbered folders (a save in progress has a temporary name); listed here rather
    # than through a CheckpointManager, whose read-only mode logs warnings.
    steps = sorted(int(n) for n in os.listdir(path) if n.isdigit() and os.path.isdir(os.path.join(path, n)))
    if step is None:
        step = steps[-1]
    elif step not in steps:
        raise RunConfigError(f"config key 'model.init_step': {path} has no step {step}; available steps: {steps}")
    try:
        reader = ParamReader(path, step)
    except FileNotFoundError as e:
        raise RunConfigError(f"config key 'model.init_from': {e}") from None
    expected = {tuple(str(k) for k in p): tuple(v.shape)
                for p, v in nnx.to_flat_state(nnx.state(abstract_state, nnx.Param))}
    stored = set(reader.paths)
    missing = sorted(".".join(p) for p in set(expected) - stored)
    unexpected = sorted(".".join(p) for p in stored - set(expected))
    misshaped = [f"{'.'.join(p)}: checkpoint {reader.shape(p)} vs config {expected[p]}"
                 for p in sorted(set(expected) & stored) if reader.shape(p) != expected[p]]
    reader.close()
    problems = [f"{what} ({len(items)}): {', '.join(items[:8])}{' ...' if len(items) > 8 else ''}"
                for what, items in (("missing parameters", missing), ("unexpected parameters", unexpected),
                                    ("parameters whose shape disagrees with config.json", misshaped)) if items]
    if problems:
        raise RunConfigError(f"config key 'model.init_from': {path} step {step}: " + "; ".join(problems))


# ---------------------------------------------------------------- data
def data_stages(data_cfg) -> list[Stage]:
    try:
        return parse_schedule(data_cfg.seq_len_schedule, seq_len=int(data_cfg.seq_len),
                              global_batch_size=int(data_cfg.global_batch_size),
                              hold_tokens_per_batch=bool(data_cfg.hold_tokens_per_batch))
    except DataError as e:
        raise RunConfigError(str(e)) from None


def _stage_name(stages: list[Stage], st: Stage) -> str:
    if len(stages) == 1:
        return f"data.global_batch_size={st.global_batch_size}, data.seq_len={st.seq_len}"
    return (f"data.seq_len_schedule stage {st.seq_len}:{st.start_step} "
            f"(global batch {st.global_batch_size}, seq_len {st.seq_len})")


def check_stages(stages: list[Stage], *, mesh: dict[str, int], grad_accum_steps: int, process_count: int,
                 attention: str) -> None:
    """Every stage's batch and length fit the processes, the microbatches, the mesh and the attention."""
    batch_ways = mesh["data"] * mesh["fsdp"] * mesh.get("expert", 1)
    ring = mesh["seq"]
    for st in stages:
        name, b, t = _stage_name(stages, st), st.global_batch_size, st.seq_len
        if b % process_count:
            raise RunConfigError(f"{name}: the global batch does not divide over {process_count} processes")
        if b % grad_accum_steps:
            raise RunConfigError(f"{name}: grad_accum_steps={grad_accum_steps} does not divide the global batch")
        if (b // grad_accum_steps) % batch_ways:
            raise RunConfigError(f"{name}: the microbatch {b // grad_accum_steps} (global batch / grad_accum_steps) "
                                 f"does not divide over mesh data x fsdp x expert = {batch_ways} devices")
        if ring > 1 and t % (2 * ring):
            raise RunConfigError(f"{name}: ring attention over mesh.seq={ring} needs a sequence length divisible "
                                 f"by 2 x {ring} = {2 * ring} (zig-zag layout)")
    if ring > 1 and attention != "ring":
        raise RunConfigError(f"config key 'mesh.seq'={ring} shards the sequence, which needs ring attention: "
                             "set model.attention='ring' (or mesh.seq=1)")


def check_data(data_cfg, stages: list[Stage], process_count: int) -> None:
    """Sources, their files and the tokenizer folder exist; the packing lanes fit every stage.

    File contents (empty files, malformed lines) are checked when the pipeline indexes them, which
    the trainer also does before it writes anything."""
    from qwen_jax.data.sources import resolve_paths, source_specs

    try:
        for i, s in enumerate(source_specs(data_cfg.sources)):
            if s["path"]:  # a generated source (kind passkey) has none
                resolve_paths(s["path"], f"data.sources[{i}].path")
        packing_lanes(stages, int(data_cfg.num_lanes), process_count)
    except DataError as e:
        raise RunConfigError(str(e)) from None
    if data_cfg.long_examples not in ("truncate", "split"):
        raise RunConfigError(f"config key 'data.long_examples' must be 'truncate' or 'split', "
                             f"got {data_cfg.long_examples!r}")
    for key in ("tokenizer", "model_dir", "cache_dir"):
        folder = data_cfg.get(key, "")
        if folder and key != "cache_dir" and not os.path.isdir(folder):
            raise RunConfigError(f"config key 'data.{key}': {folder!r} is not a directory")
        if folder and key == "cache_dir":
            _check_writable_dir(folder, "config key 'data.cache_dir'")


def check_freeze_layers(config, cfg: QwenConfig) -> None:
    """`freeze_layers` counts positions in one layer stack; a model mixing dense and sparse layers has two."""
    sparse = [cfg.is_sparse(i) for i in range(cfg.num_hidden_layers)]
    if config.get("freeze_layers", 0) and any(sparse) and not all(sparse):
        raise RunConfigError(
            "config key 'freeze_layers': it counts positions in a layer stack; this model mixes dense and sparse "
            "layers (two stacks, docs/moe.md): use freeze='<regex>' instead")


# ---------------------------------------------------------------- everything
def validate(config, workdir: str | None, *, num_devices: int, process_count: int = 1) -> RunSpec:
    """Check the whole run; RunConfigError (one line) for the first problem.  Writes nothing."""
    workdir = check_workdir(workdir)
    check_run_settings(config)
    if config.export_hf and config.export_hf_dir:
        _check_writable_dir(config.export_hf_dir, "config key 'export_hf_dir'")
    shape = mesh_shape(config, num_devices)
    cfg, source, overrides = model_config(config)
    check_freeze_layers(config, cfg)
    check_moe_matmul(cfg)
    stages = data_stages(config.data)
    accum = int(config.grad_accum_steps)
    check_stages(stages, mesh=shape, grad_accum_steps=accum, process_count=process_count, attention=cfg.attention)
    if not config.synthetic_data:
        check_data(config.data, stages, process_count)
    if source != "preset":
        step = None if config.model.init_step < 0 else int(config.model.init_step)
        check_init_shapes(cfg, source, config.model.init_from, step)
    return RunSpec(workdir=workdir, mesh_shape=shape, model=cfg, source=source, model_overrides=overrides,
                   stages=tuple(stages), grad_accum_steps=accum)

