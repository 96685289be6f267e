"""Fused attention kernels: cuDNN through `jax.nn.dot_product_attention`.

cuDNN has no segment-id argument in JAX's public API, so packed batches go through the
boolean `mask` argument (correct, slower).  The `kernel` path is the fastest fused kernel
per platform; until a faster one is measured it is cuDNN on GPU and XLA elsewhere.
"""

from __future__ import annotations

import jax

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


def kernel_attention(q, k, v, *, segment_ids=None, sliding_window=None, scale=None):
    if jax.default_backend() == "gpu" and q.dtype.itemsize == 2:
        return cudnn_attention(q, k, v, segment_ids=segment_ids, sliding_window=sliding_window, scale=scale)
    return xla_attention(q, k, v, segment_ids=segment_ids, sliding_window=sliding_window, scale=scale)
