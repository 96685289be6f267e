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
