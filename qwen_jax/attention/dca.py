"""Dual Chunk Attention (Qwen2.5-1M, vLLM semantics; docs/long_context.md §DCA).

With `C = chunk_size`, `W = local_size`, chunk length `Lc = C - W`, and per-document positions
`p` (they restart in every packed segment):

* keys are rotated once with `Pk = p mod Lc`;
* queries are rotated three ways: intra `r = p mod Lc`, successive `min(r + Lc, C)`, inter
  `min(2 Lc - 1, C)`;
* for a visible pair (causal by array order, same segment) the branch is chosen by chunk
  index `c = floor(p / Lc)`: `c(i) == c(j)` → intra, `c(i) == c(j) + 1` → successive,
  otherwise inter;
* one softmax over the union of the three branches (== the LSE merge of three partial
  attentions), logits scaled by `head_dim^-0.5 · σ²` with the length scaling
  `σ = max(1, 0.1 ln(Lseq / L0) + 1)` when `original_max_position_embeddings = L0 > 0`, where
  `Lseq` is the length of the query's document (max position in its segment + 1).

Two implementations, both exact and differentiable:

* `impl="xla"` or `auto` (and short sequences): dense, builds the three T×T logit matrices and selects
  per pair (`dca_dense`);
* memory efficient (`impl` in blockwise / ring / kernel / cudnn, or T > `DENSE_MAX_SEQ`): the
  block kernel of `blockwise.py` with three query variants — per (query, key) pair it picks the
  variant's logit by chunk index inside each key block, so the single softmax is computed
  online without any T×T array and with a recomputing custom_vjp backward.  With
  `impl="ring"` and a sequence-parallel mesh, the same three-variant kernel runs inside the
  ring (`ring.ring_dca_attention`; zig-zag layout like `ring_attention`).
"""

from __future__ import annotations

import jax.numpy as jnp

from qwen_jax.attention import registry
from qwen_jax.attention.dca_core import (
    INTER,
    INTRA,
    SUCCESSIVE,
    broadcast_rows,
    check_dca_inputs,
    dca_blockwise,
    dca_branch,
    dca_key_positions,
    dca_length_scale,
    dca_query_positions,
    dca_rotations,
    dca_row_scale,
    dca_seen_distance,
    document_lengths,
)
from qwen_jax.attention.masks import attention_mask
from qwen_jax.attention.ring import ring_dca_attention

DENSE_MAX_SEQ = 8192
# The position rules and the memory-efficient kernel live in dca_core.py (shared with the ring).
__all__ = ["DENSE_MAX_SEQ", "INTER", "INTRA", "SUCCESSIVE", "dca_attention", "dca_blockwise", "dca_branch",
           "dca_dense", "dca_key_positions", "dca_length_scale", "dca_query_positions", "dca_seen_distance",
           "document_lengths"]


# ----------------------------------------------------------------------------------------------
# implementations


def dca_dense(q, k, v, *, positions, segment_ids=None, inv_freq, chunk_size, local_size,
              original_max_position_embeddings=0, scale=None):
    """Dense O(T²) DCA: three logit matrices, per-pair branch selection, one softmax (float32)."""
    positions = check_dca_inputs(q, k, positions, chunk_size, local_size)
    segment_ids = broadcast_rows(segment_ids, q)
    b, t, h, d = q.shape
    kvh = k.shape[2]
    g = h // kvh
    scale = d**-0.5 if scale is None else scale
    qs, kr = dca_rotations(q, k, positions, inv_freq, chunk_size, local_size)
    branch = dca_branch(positions, positions, chunk_size, local_size)[:, None, None]  # [b,1,1,t,t]
    logits = None
    for idx, qv in enumerate(qs):
        lv = jnp.einsum("btkgd,bskd->bkgts", qv.reshape(b, t, kvh, g, d), kr, preferred_element_type=jnp.float32)
        logits = lv if logits is None else jnp.where(branch == idx, lv, logits)
    logits = logits * scale
    row_scale = dca_row_scale(positions, segment_ids, original_max_position_embeddings)
    if row_scale is not None:
        logits = logits * row_scale[:, None, None, :, None]
    mask = attention_mask(t, t, causal=True, q_segment_ids=segment_ids, kv_segment_ids=segment_ids)[:, None, None]
    logits = jnp.where(mask, logits, -jnp.inf)
    row_max = jnp.max(logits, axis=-1, keepdims=True)
    row_max = jnp.where(jnp.isfinite(row_max), row_max, 0.0)
    weights = jnp.exp(logits - row_max)
    denom = jnp.sum(weights, axis=-1, keepdims=True)
    probs = weights / jnp.where(denom == 0, 1.0, denom)
    out = jnp.einsum("bkgts,bskd->btkgd", probs.astype(v.dtype), v, preferred_element_type=jnp.float32)
    return out.reshape(b, t, h, d).astype(q.dtype)


def dca_attention(q, k, v, *, positions, segment_ids=None, inv_freq, chunk_size, local_size,
                  original_max_position_embeddings, scale=None, impl="xla", block_size=512):
    """Dual Chunk Attention on *unrotated* q [b, T, H, D] and k/v [b, T, Hkv, D] (docs/long_context.md §DCA).

    `positions` [b, T] per-document positions (restart per segment; chunk membership uses
    them, while the causal and same-segment masks use array order and `segment_ids`);
    `inv_freq` the default-RoPE table [D/2].  The path follows `registry.dca_path(impl)`: `xla`
    and `auto` are dense for T <= DENSE_MAX_SEQ; every other impl (and longer sequences) uses
    the memory-efficient block kernel, and `ring` on a mesh with a `seq` axis > 1 runs it
    sequence-parallel (zig-zag inputs).
    """
    kw = dict(positions=positions, segment_ids=segment_ids, inv_freq=inv_freq, chunk_size=int(chunk_size),
              local_size=int(local_size), original_max_position_embeddings=int(original_max_position_embeddings or 0),
              scale=scale)
    path = registry.dca_path(impl)
    if path == "ring":
        return ring_dca_attention(q, k, v, block_size=block_size, **kw)
    if path == "dense" and q.shape[1] <= DENSE_MAX_SEQ:
        return dca_dense(q, k, v, **kw)
    return dca_blockwise(q, k, v, block_size=block_size, **kw)
