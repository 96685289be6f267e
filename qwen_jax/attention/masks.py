"""Boolean attention masks (True = may attend), shared by every attention implementation."""

from __future__ import annotations

import jax.numpy as jnp


def attention_mask(q_len, kv_len, *, q_offset=0, causal=True, sliding_window=None,
                   q_segment_ids=None, kv_segment_ids=None, q_index=None, kv_index=None):
    """[batch or 1, q_len, kv_len] mask.

    Query i sits at index `q_offset + i` of the key sequence unless explicit global indices
    `q_index` [q_len] / `kv_index` [kv_len] are given (ring layouts).  Causal: k <= q.
    Sliding window (transformers' rule): 0 <= q - k < window, the query itself included.
    Segments: same id only (packed documents never see each other).
    """
    qi = jnp.arange(q_len) + q_offset if q_index is None else q_index
    ki = jnp.arange(kv_len) if kv_index is None else kv_index
    diff = qi[:, None] - ki[None, :]
    mask = jnp.ones((q_len, kv_len), bool)
    if causal:
        mask = diff >= 0
    if sliding_window is not None:
        mask = mask & (diff < sliding_window)
    mask = mask[None]
    if q_segment_ids is not None:
        mask = mask & (q_segment_ids[:, :, None] == kv_segment_ids[:, None, :])
    return mask
