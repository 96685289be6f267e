"""Plain full attention in XLA: the reference every fast path is tested against.

Layout `[batch, seq, heads, head_dim]` for queries, `[batch, seq, kv_heads, head_dim]` for
keys/values (grouped-query attention without repeating K/V: query head h reads kv head
h // G).  Scores and softmax in float32.
"""

from __future__ import annotations

import jax.numpy as jnp

from qwen_jax.attention import registry
from qwen_jax.attention.masks import attention_mask


def xla_attention(q, k, v, *, segment_ids=None, kv_segment_ids=None, sliding_window=None, scale=None,
                  causal=True, q_offset=0, return_lse=False):
    """Softmax(scale * q k^T + mask) v.

    `segment_ids` [batch, q_seq] (and `kv_segment_ids` [batch, kv_seq], default the same):
    tokens attend only within their own segment (packed documents).
    `sliding_window`: a key is visible iff 0 <= q_index - k_index < window.
    `q_offset`: index of the first query relative to the first key (for blocks).
    Returns `out` (and the natural-log log-sum-exp [batch, seq, heads] if asked).
    """
    b, t, h, d = q.shape
    s, kv = k.shape[1], k.shape[2]
    g = h // kv
    scale = d**-0.5 if scale is None else scale
    qg = q.reshape(b, t, kv, g, d)
    logits = jnp.einsum("btkgd,bskd->bkgts", qg, k, preferred_element_type=jnp.float32) * scale
    q_seg, k_seg = segment_ids, segment_ids if kv_segment_ids is None else kv_segment_ids
    mask = attention_mask(t, s, q_offset=q_offset, causal=causal, sliding_window=sliding_window,
                          q_segment_ids=q_seg, kv_segment_ids=k_seg)  # [b or 1, t, s]
    mask = mask[:, None, None]
    logits = jnp.where(mask, logits, -jnp.inf)
    row_max = jnp.max(logits, axis=-1, keepdims=True)
    row_max = jnp.where(jnp.isfinite(row_max), row_max, 0.0)  # fully masked rows: output 0
    weights = jnp.exp(logits - row_max)
    denom = jnp.sum(weights, axis=-1, keepdims=True)
    probs = weights / jnp.where(denom == 0, 1.0, denom)
    out = jnp.einsum("bkgts,bskd->btkgd", probs.astype(v.dtype), v,
                     preferred_element_type=jnp.float32).reshape(b, t, h, d).astype(q.dtype)
    if not return_lse:
        return out
    lse = (row_max + jnp.log(denom))[..., 0]  # [b, kv, g, t]; -inf for fully masked rows
    lse = jnp.where(denom[..., 0] == 0, -jnp.inf, lse)
    return out, lse.reshape(b, h, t).transpose(0, 2, 1)


# ----------------------------------------------------------------------------------------------
# dense block contract (ring attention's fused-kernel core; `kernels.cudnn_block_*` is the GPU one)


def dense_block_fwd(q, k, v, *, causal: bool, scale: float):
    """(out float32 [b, tq, h, d], lse float32 [b, tq, h]) of one block pair, causal (top-left) or unmasked.

    The XLA twin of `kernels.cudnn_block_fwd`: same contract, runs anywhere (CPU tests of the
    ring's kernel path, and the GPU check of the cuDNN block).
    """
    out, lse = xla_attention(q, k, v, scale=scale, causal=causal, return_lse=True)
    return out.astype(jnp.float32), lse


def dense_block_bwd(q, k, v, out, lse, dout, *, causal: bool, scale: float):
    """(dq, dk, dv) float32 of one block pair given the *final* `out`/`lse` of each query row.

    `out`/`lse` come from the whole attention (other key blocks contributed too): the softmax
    probabilities of this block are exp(s - lse), and D = rowsum(dout * out), exactly as in
    FlashAttention's backward.  Rows with lse = -inf get zero gradients.
    """
    b, t, h, d = q.shape
    s, kv = k.shape[1], k.shape[2]
    g = h // kv
    qg = q.reshape(b, t, kv, g, d)
    logits = jnp.einsum("btkgd,bskd->bkgts", qg, k, preferred_element_type=jnp.float32) * scale
    if causal:
        logits = jnp.where(attention_mask(t, s, causal=True)[:, None, None], logits, -jnp.inf)
    lse_g = lse.astype(jnp.float32).reshape(b, t, kv, g).transpose(0, 2, 3, 1)[..., None]  # [b, kv, g, t, 1]
    p = jnp.where(jnp.isfinite(lse_g), jnp.exp(logits - jnp.where(jnp.isfinite(lse_g), lse_g, 0.0)), 0.0)
    do = dout.astype(jnp.float32).reshape(b, t, kv, g, d)
    delta = jnp.sum(do * out.astype(jnp.float32).reshape(b, t, kv, g, d), axis=-1).transpose(0, 2, 3, 1)
    dv = jnp.einsum("bkgts,btkgd->bskd", p, do)
    dp = jnp.einsum("btkgd,bskd->bkgts", do, v.astype(jnp.float32))
    ds = p * (dp - delta[..., None]) * scale
    dq = jnp.einsum("bkgts,bskd->btkgd", ds, k.astype(jnp.float32)).reshape(b, t, h, d)
    dk = jnp.einsum("bkgts,btkgd->bskd", ds, qg.astype(jnp.float32))
    return dq, dk, dv


registry.register(registry.AttentionImpl(
    "xla", xla_attention, dca="dense", ring_core=registry.RingCore("dense", dense_block_fwd, dense_block_bwd),
    auto_rank=1))
