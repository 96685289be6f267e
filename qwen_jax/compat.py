"""Every use of a third-party private API (`jax._src`, `tokamax._src`, `orbax.checkpoint._src`) lives here.

Each function wraps one use, says why no public API does the job, and names the versions it was
checked on; a missing module or attribute raises `PrivateApiError` (so callers can fall back
with a typed error instead of an AttributeError deep in a trace).  tests/test_compat.py checks
every symbol on the installed versions; tests/test_import_graph.py keeps `_src` out of every
other module.
"""

from __future__ import annotations

import importlib
import inspect


class PrivateApiError(ImportError):
    """A private third-party symbol this project relies on is absent in the installed version."""


def _private(module: str, *attrs: str):
    try:
        obj = importlib.import_module(module)
    except ImportError as e:
        raise PrivateApiError(f"{module} is not importable here ({e})") from e
    for attr in attrs:
        if not hasattr(obj, attr):
            raise PrivateApiError(f"{module}.{'.'.join(attrs)} is absent in the installed version")
        obj = getattr(obj, attr)
    return obj


# ---------------------------------------------------------------- JAX cuDNN fused attention
# `jax.nn.dot_product_attention(implementation="cudnn")` has no packed (ragged) layout, does not
# return the softmax statistics, and has no backward that takes them; ring attention and packed
# documents need all three.  Checked on jax 0.10.2 (installed CPU build: symbols and the backward's
# abstract evaluation) and by reading the source of jax 0.11.0 and of main at 0.11.1.dev (2026-08):
# same signature, MaskType/AttentionLayout members and backward operand list; the GPU test
# (tests/test_compat.py) is the check on 0.11.2.
CUDNN_MODULE = "jax._src.cudnn.fused_attention_stablehlo"


def cudnn_mask_type(name: str):
    """`MaskType.<name>` (NO_MASK, CAUSAL, PADDING_CAUSAL, ...): the public API takes only is_causal."""
    return _private(CUDNN_MODULE, "MaskType", name)


def cudnn_version() -> int:
    """cuDNN version as JAX reports it (e.g. 90600); raises where no cuDNN is loaded (CPU)."""
    return _private(CUDNN_MODULE, "check_cudnn_version")()


def cudnn_packed_api() -> bool:
    """The private `dot_product_attention` takes the packed layout (seqlens and offsets for q and kv)."""
    params = inspect.signature(_private(CUDNN_MODULE, "dot_product_attention")).parameters
    return all(n in params for n in ("q_seqlen", "kv_seqlen", "q_offsets", "kv_offsets"))


def cudnn_attention(q, k, v, *, scale, mask: str, return_residual=False, **packed):
    """cuDNN flash attention in the BTNH layout; `packed`: q_seqlen/kv_seqlen/q_offsets/kv_offsets.

    `return_residual=True` also returns the float32 softmax statistics (natural-log LSE, [b, h, t]).
    """
    fn = _private(CUDNN_MODULE, "dot_product_attention")
    return fn(q, k, v, scale=scale, mask_type=cudnn_mask_type(mask), qkv_layout="BTNH",
              return_residual=return_residual, **packed)


def cudnn_attention_bwd(q, k, v, stat, out, dout, *, scale, mask: str):
    """(dq, dk, dv) from the given softmax statistics `stat` [b, h, t] and output (cuDNN backward primitive).

    Binds `_dot_product_attention_bwd_p_wrapper` with the operand list of jax 0.10/0.11: q, k, v,
    seven unused optional operands (bias, seqlens, offsets, page tables), stat, out, dout.
    """
    import jax.numpy as jnp  # compat stays importable without JAX's start-up cost (checkpoint tools)

    prim = _private(CUDNN_MODULE, "_dot_product_attention_bwd_p_wrapper")
    layout = _private(CUDNN_MODULE, "AttentionLayout", "BTNH").value
    unused = jnp.zeros(0, q.dtype)
    grads = prim.bind(q, k, v, *(unused,) * 7, stat, out, dout, scale=scale, seed=42, dropout_rate=0.0,
                      variadic_args=(False, False), mask_type=cudnn_mask_type(mask), layout=layout,
                      sliding_window_length=None)
    return grads[:3]


def cudnn_block_api() -> bool:
    """The forward with residuals and the backward primitive exist (what `cudnn_attention*` use)."""
    try:
        for attr in ("dot_product_attention", "_dot_product_attention_bwd_p_wrapper", "MaskType", "AttentionLayout"):
            _private(CUDNN_MODULE, attr)
    except PrivateApiError:
        return False
    return True


# ---------------------------------------------------------------- tokamax
# tokamax's public `dot_product_attention` takes a dense mask; its per-query `k_start` mask (O(seq)
# data for packed documents) and the per-backend kernel table are only in `_src`.  Written against
# tokamax 0.0.x (not installed in the CPU test environment: callers check `tokamax_available`).
TOKAMAX_ATTENTION = "tokamax._src.ops.attention"


def tokamax_mask(k_start, *, is_causal: bool):
    """tokamax `Mask(k_start=..., is_causal=...)`: causal plus a first visible key per query."""
    return _private(f"{TOKAMAX_ATTENTION}.base", "Mask")(k_start=k_start, is_causal=is_causal)


def tokamax_kernels() -> dict:
    """tokamax attention kernels by backend name (mosaic_gpu, triton, mosaic_tpu, ...)."""
    return _private(f"{TOKAMAX_ATTENTION}.api", "IMPLEMENTATIONS")


# ---------------------------------------------------------------- Orbax
# Streaming a checkpoint block by block needs a NumpyHandler that writes each leaf through
# TensorStore itself, with Orbax's own spec builders so the files stay StandardSave's format;
# `orbax.checkpoint.type_handlers` exports the handler class but not the spec builders, the
# default handler list or the TensorStore read spec.  Checked on orbax-checkpoint 0.12.8.
ORBAX_SERIALIZATION = "orbax.checkpoint._src.serialization"


def orbax_numpy_handler():
    """Orbax's NumpyHandler class; a subclass overrides `_background_serialize` and reads `_metadata_key`."""
    return _private(f"{ORBAX_SERIALIZATION}.type_handlers", "NumpyHandler")


def orbax_numpy_handler_kwargs() -> dict:
    """NumpyHandler constructor arguments that keep it from copying host arrays before a save.

    Orbax >= 0.12.5 deep-copies numpy values by default (`deepcopy_host_arrays=True`), which would
    double a streaming save's memory; older releases (0.12.4 on the GPU machines) never copy and do
    not take the argument."""
    import inspect

    params = inspect.signature(orbax_numpy_handler().__init__).parameters
    return {"deepcopy_host_arrays": False} if "deepcopy_host_arrays" in params else {}


def orbax_save_args():
    """Default `SaveArgs()` for one leaf."""
    return _private(f"{ORBAX_SERIALIZATION}.types", "SaveArgs")()


def orbax_array_write_spec(*, info, arg, global_shape, local_shape, dtype, metadata_key):
    """TensorStore spec (json) Orbax would write the leaf `info` with (OCDBT subdir of this process)."""
    build = _private(f"{ORBAX_SERIALIZATION}.tensorstore_utils", "build_array_write_spec")
    process_index = _private(f"{ORBAX_SERIALIZATION}.ocdbt_utils", "get_process_index_for_subdir")
    return build(info=info, arg=arg, global_shape=global_shape, local_shape=local_shape, dtype=dtype,
                 use_ocdbt=info.is_ocdbt_checkpoint,
                 process_index=process_index(use_ocdbt=info.is_ocdbt_checkpoint), metadata_key=metadata_key).json


def orbax_type_handler_registry(*extra):
    """A type-handler registry with `extra` (type, handler) pairs ahead of Orbax's defaults."""
    thr = f"{ORBAX_SERIALIZATION}.type_handler_registry"
    return _private(thr, "create_type_handler_registry")(*extra, *_private(thr, "_DEFAULT_TYPE_HANDLERS"))


def orbax_array_read_spec(item_dir: str, name: str, *, use_zarr3: bool, use_ocdbt: bool):
    """TensorStore spec (json) of one saved leaf, as Orbax's restore opens it."""
    spec = _private(f"{ORBAX_SERIALIZATION}.tensorstore_utils", "ArrayReadSpec")
    return spec(item_dir, name, use_zarr3, use_ocdbt=use_ocdbt).json


def orbax_ts_context(*, use_ocdbt: bool):
    """The TensorStore context Orbax reads with (OCDBT cache settings)."""
    return _private(f"{ORBAX_SERIALIZATION}.tensorstore_utils", "get_ts_context")(use_ocdbt=use_ocdbt)
