"""Abstract models and loading: `from_pretrained` (a Hugging Face folder), `load_model` (that or a checkpoint).

With a mesh, every device shard is built straight from the file (each Hugging Face tensor
read once), so the whole model never sits on one device.
"""

from __future__ import annotations

import os

import jax
import jax.numpy as jnp
import numpy as np
from flax import nnx

from qwen_jax.config import ConfigError, QwenConfig, load_hf_config, model_stop_ids
from qwen_jax.dtypes import SAFETENSORS_CODES
from qwen_jax.hf.names import ParamSpec, hf_blocks, param_table, to_ours
from qwen_jax.hf.safetensors_io import TensorReader, check_tensors, open_reader
from qwen_jax.model import Qwen


def abstract_model(cfg: QwenConfig):
    """(graphdef, abstract state) without allocating parameters."""
    return nnx.split(nnx.eval_shape(lambda: Qwen(cfg, rngs=nnx.Rngs(0))))


def flat_paths(state) -> dict[tuple, object]:
    """{path tuple of str: leaf} over an nnx.State (variables or raw arrays)."""
    return {tuple(str(k) for k in path): leaf for path, leaf in nnx.to_flat_state(state)}


def from_pretrained(path: str | os.PathLike, *, dtype=None, param_dtype=None, mesh=None, **config_overrides) -> Qwen:
    """Load a Hugging Face Qwen2/Qwen2.5/Qwen3 folder (safetensors) into a `Qwen` model.

    `dtype` is the compute dtype (default float32), `param_dtype` the storage dtype
    (default: float32; pass "keep" to keep the checkpoint's own dtype).  With `mesh`, each
    parameter is placed straight into its sharding (`qwen_jax.sharding` rules); other
    keyword arguments override config keys (e.g. `attention="blockwise"`).
    """
    from qwen_jax.sharding import state_shardings

    folder = os.fspath(path)
    if not os.path.isdir(folder):
        raise ConfigError(f"{folder}: not a directory (expected a Hugging Face model folder)")
    overrides = dict(config_overrides)
    if dtype is not None:
        overrides["dtype"] = dtype
    reader = open_reader(folder)
    if param_dtype == "keep":
        first = next(iter(reader.files))
        param_dtype = SAFETENSORS_CODES.get(reader.dtype(first), "float32")
    if param_dtype is not None:
        overrides["param_dtype"] = param_dtype
    cfg = load_hf_config(folder, **overrides)
    graphdef, abstract_state = abstract_model(cfg)
    abstract = flat_paths(abstract_state)
    check_tensors(cfg, reader, abstract, folder)
    shardings = flat_paths(state_shardings(abstract_state, mesh)) if mesh is not None else None
    device = jax.devices()[0]
    loaded = {}
    for spec in param_table(cfg):
        var = abstract[spec.path]
        shape, target_dtype = var.shape, var.dtype
        sharding = shardings[spec.path] if shardings else jax.sharding.SingleDeviceSharding(device)
        loaded[spec.path] = _load_param(reader, cfg, spec, shape, target_dtype, sharding)
    reader.close()
    state = _fill_state(abstract_state, loaded)
    model = nnx.merge(graphdef, state)
    model.stop_token_ids = model_stop_ids(folder)  # generate(stop_ids=None) stops on these
    return model


def load_model(path: str | os.PathLike, step: int | None = None, *, dtype=None, param_dtype=None, mesh=None,
               **config_overrides) -> Qwen:
    """A Hugging Face folder (`from_pretrained`) or a training checkpoint directory (Orbax
    `CheckpointManager` root with config.json beside it; `step` None = the latest)."""
    from qwen_jax import checkpoint_format
    from qwen_jax.sharding import state_shardings

    folder = os.fspath(path)
    if not os.path.isdir(folder):
        raise ConfigError(f"{folder}: not a directory (expected a Hugging Face model folder or a checkpoint dir)")
    if weight_files_present(folder):
        if step is not None:
            raise ConfigError(f"{folder}: a Hugging Face folder has no steps (step={step} given)")
        return from_pretrained(folder, dtype=dtype, param_dtype=param_dtype, mesh=mesh, **config_overrides)
    overrides = dict(config_overrides)
    for key, value in (("dtype", dtype), ("param_dtype", param_dtype)):
        if value is not None:
            overrides[key] = value
    cfg = load_hf_config(folder, **overrides)
    graphdef, abstract_state = abstract_model(cfg)
    abstract_pure = nnx.to_pure_dict(abstract_state)
    if mesh is not None:
        shardings = nnx.to_pure_dict(state_shardings(abstract_state, mesh))
    else:
        one = jax.sharding.SingleDeviceSharding(jax.devices()[0])
        shardings = jax.tree.map(lambda _: one, abstract_pure)
    try:
        params = checkpoint_format.restore_params(folder, step, abstract_pure=abstract_pure, shardings=shardings)
    except FileNotFoundError as e:
        raise ConfigError(str(e)) from None
    state = nnx.State(abstract_state)
    nnx.replace_by_pure_dict(state, params)
    model = nnx.merge(graphdef, state)
    model.stop_token_ids = model_stop_ids(folder)
    return model


def weight_files_present(folder: str) -> bool:
    return any(name.endswith(".safetensors") for name in os.listdir(folder))


def _fill_state(abstract_state, values: dict[tuple, jax.Array]):
    def fill(path, leaf):
        key = tuple(str(k) for k in path)
        if hasattr(leaf, "replace"):
            return leaf.replace(values[key])
        return values[key]

    return nnx.from_flat_state([(p, fill(p, v)) for p, v in nnx.to_flat_state(abstract_state)])


def _load_param(reader: TensorReader, cfg: QwenConfig, spec: ParamSpec, shape, dtype, sharding) -> jax.Array:
    """Build one global array: each Hugging Face tensor is read once and copied into the device shards that need it."""
    shape = tuple(shape)
    index_map = sharding.addressable_devices_indices_map(shape)
    # Devices holding the same shard share one host buffer.
    buffers: dict[tuple, np.ndarray] = {}
    device_keys = {}
    for device, index in index_map.items():
        key = tuple(sl.indices(n) for sl, n in zip(index, shape, strict=True))
        device_keys[device] = key
        if key not in buffers:
            buffers[key] = np.empty(tuple(len(range(*k)) for k in key), dtype=jnp.dtype(dtype))
    for name, index in hf_blocks(spec, cfg.num_hidden_layers):
        block_shape = shape[len(index):]
        tensor = np.asarray(to_ours(spec, reader.read(name), block_shape)).astype(jnp.dtype(dtype), copy=False)
        for key, buf in buffers.items():
            lead = [range(*k) for k in key[:len(index)]]
            if all(i in r for i, r in zip(index, lead, strict=True)):
                at = tuple(r.index(i) for i, r in zip(index, lead, strict=True))
                buf[at] = tensor[tuple(slice(*k) for k in key[len(index):])]
        del tensor
    arrays = [jax.device_put(buffers[device_keys[d]], d) for d in index_map]
    return jax.make_array_from_single_device_arrays(shape, sharding, arrays)
