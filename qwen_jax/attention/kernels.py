"""Fused attention kernels for GPU/TPU: cuDNN (through `jax.nn.dot_product_attention`) and tokamax (Pallas).

* `cudnn`: `jax.nn.dot_product_attention(implementation="cudnn")`.  No segment-id argument in
  JAX's public API, so packed batches go through the boolean `mask` (correct, slower).
* `kernel`: tokamax's Pallas flash attention (Mosaic GPU on Hopper, Triton elsewhere on GPU,
  Mosaic TPU on TPU).  Packed documents are contiguous runs of equal segment ids, so the mask
  is expressed as a per-query `k_start` (the first key of the query's document, or of its
  sliding window) plus causality: O(seq) mask data, never a [seq, seq] array.  Falls back to
  cuDNN, then XLA, where tokamax is not installed or does not support the shape.
"""

from __future__ import annotations

import jax
import jax.numpy as jnp

from qwen_jax.attention.masks import attention_mask
from qwen_jax.attention.reference import xla_attention


def cudnn_attention(q, k, v, *, segment_ids=None, sliding_window=None, scale=None):
    t, s = q.shape[1], k.shape[1]
    window = None if sliding_window is None else (sliding_window - 1, 0)
    if segment_ids is None:
        return jax.nn.dot_product_attention(q, k, v, scale=scale, is_causal=True, local_window_size=window,
                                            implementation="cudnn")
    mask = attention_mask(t, s, causal=True, sliding_window=sliding_window, q_segment_ids=segment_ids,
                          kv_segment_ids=segment_ids)[:, None]
    return jax.nn.dot_product_attention(q, k, v, scale=scale, mask=mask, implementation="cudnn")


# ----------------------------------------------------------------------------------------------
# cuDNN as the per-step core of ring attention (same contract as `reference.dense_block_*`)
#
# Ring attention needs, per step, a block's (out, lse) in float32 and a backward that takes the
# *final* out/lse of the whole ring (FlashAttention's recompute-with-global-statistics).  JAX's
# public `jax.nn.dot_product_attention` offers neither, but its cuDNN module does:
# `dot_product_attention(..., return_residual=True)` returns the float32 softmax statistics
# (natural-log LSE, [b, h, t]), and the backward primitive takes the statistics and forward
# output as operands.  Both are internal JAX API: `cudnn_block_supported` checks they exist and
# `benchmarks/ring_scaling.py --check` compares the pair with `reference.dense_block_*` on GPU.


def _cudnn_module():
    from jax._src.cudnn import fused_attention_stablehlo as fa

    return fa


def cudnn_block_supported(dtype) -> bool:
    """cuDNN ring core usable here: GPU, 16-bit inputs, and JAX's cuDNN internals as expected."""
    if jax.default_backend() != "gpu" or jnp.dtype(dtype).itemsize != 2:
        return False
    try:
        fa = _cudnn_module()
        return all(hasattr(fa, n) for n in ("dot_product_attention", "_dot_product_attention_bwd_p_wrapper",
                                            "MaskType", "AttentionLayout"))
    except Exception:
        return False


def _stat_to_rows(stat, b, t, h):
    """cuDNN softmax statistics -> [b, t, h] float32 (JAX gives [b, h, t] for the BTNH layout)."""
    if stat.shape == (b, h, t):
        stat = jnp.swapaxes(stat, 1, 2)
    if stat.shape != (b, t, h):
        raise NotImplementedError(f"unexpected cuDNN softmax statistics shape {stat.shape} for q [{b}, {t}, {h}, .]")
    return stat.astype(jnp.float32)


def cudnn_block_fwd(q, k, v, *, causal: bool, scale: float):
    """(out float32 [b, tq, h, d], lse float32 [b, tq, h]) of one block pair through cuDNN flash attention."""
    fa = _cudnn_module()
    mask = fa.MaskType.CAUSAL if causal else fa.MaskType.NO_MASK
    out, stat = fa.dot_product_attention(q, k, v, scale=scale, mask_type=mask, qkv_layout="BTNH",
                                         return_residual=True)
    b, t, h, _ = q.shape
    return out.astype(jnp.float32), _stat_to_rows(stat, b, t, h)


def cudnn_block_bwd(q, k, v, out, lse, dout, *, causal: bool, scale: float):
    """(dq, dk, dv) float32 of one block pair given the final `out`/`lse` of every query row (cuDNN backward)."""
    fa = _cudnn_module()
    mask = fa.MaskType.CAUSAL if causal else fa.MaskType.NO_MASK
    unused = jnp.zeros(0, q.dtype)
    stat = jnp.swapaxes(lse.astype(jnp.float32), 1, 2)  # [b, h, t]
    grads = fa._dot_product_attention_bwd_p_wrapper.bind(
        q, k, v, unused, unused, unused, unused, unused, unused, unused, stat, out.astype(q.dtype),
        dout.astype(q.dtype), scale=scale, seed=42, dropout_rate=0.0, variadic_args=(False, False),
        mask_type=mask, layout=fa.AttentionLayout.BTNH.value, sliding_window_length=None)
    return tuple(x.astype(jnp.float32) for x in grads[:3])


def segment_starts(segment_ids):
    """Index of the first token of each token's (contiguous) segment, [batch, seq] int32."""
    t = segment_ids.shape[1]
    idx = jnp.arange(t, dtype=jnp.int32)
    is_start = jnp.concatenate([jnp.ones_like(segment_ids[:, :1], bool),
                                segment_ids[:, 1:] != segment_ids[:, :-1]], axis=1)
    return jax.lax.cummax(jnp.where(is_start, idx, 0), axis=1)


def tokamax_available() -> bool:
    try:
        import tokamax  # noqa: F401
    except Exception:
        return False
    return True


def tokamax_attention(q, k, v, *, segment_ids=None, sliding_window=None, scale=None, implementation=None):
    """Causal flash attention through tokamax; raises NotImplementedError where no kernel applies."""
    from tokamax._src.ops.attention import base as tk_base
    from tokamax._src.ops.attention.api import IMPLEMENTATIONS

    platform = jax.default_backend()
    if implementation is None:
        implementation = ("mosaic_gpu", "triton") if platform == "gpu" else ("mosaic_tpu",)
    t = q.shape[1]
    idx = jnp.arange(t, dtype=jnp.int32)
    k_start = None
    if segment_ids is not None:
        k_start = segment_starts(segment_ids)
    if sliding_window is not None:
        window_start = jnp.maximum(idx - (sliding_window - 1), 0)[None]
        k_start = window_start if k_start is None else jnp.maximum(k_start, window_start)
    mask = tk_base.Mask(k_start=None if k_start is None else k_start[:, None, :], is_causal=True)
    scale = q.shape[-1] ** -0.5 if scale is None else scale
    errors = []
    for name in implementation:
        if name not in IMPLEMENTATIONS:
            continue
        try:
            return IMPLEMENTATIONS[name](q, k, v, mask=mask, logits_scale=scale, bias=None, precision=None,
                                         logits_soft_cap=None, q_sharding=None)
        except NotImplementedError as e:
            errors.append(f"{name}: {e}")
    raise NotImplementedError("; ".join(errors) or f"no tokamax attention kernel for {platform}")


def kernel_attention(q, k, v, *, segment_ids=None, sliding_window=None, scale=None):
    """The fastest fused kernel available: tokamax, else cuDNN (GPU, 16-bit), else XLA."""
    if jax.default_backend() in ("gpu", "tpu") and tokamax_available():
        try:
            return tokamax_attention(q, k, v, segment_ids=segment_ids, sliding_window=sliding_window, scale=scale)
        except NotImplementedError:
            pass
    if jax.default_backend() == "gpu" and q.dtype.itemsize == 2:
        return cudnn_attention(q, k, v, segment_ids=segment_ids, sliding_window=sliding_window, scale=scale)
    return xla_attention(q, k, v, segment_ids=segment_ids, sliding_window=sliding_window, scale=scale)
