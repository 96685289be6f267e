"""Memory-efficient causal attention: online softmax over key blocks (FlashAttention-2 style, in XLA).

`blockwise_attention` is the public entry point.  The work is done by a general block kernel
(`attention_fwd` / `attention_bwd`) that the ring (`ring.py`) and Dual Chunk Attention
(`dca.py`) reuse:

* queries and keys carry explicit *global* token indices (`q_index` [Tq], `kv_index` [Tk],
  int32, each non-decreasing).  The mask is causal on these indices (`kv <= q`), optionally
  windowed (`q - kv < window`) and segment-restricted (`q_seg == kv_seg`).  Because the
  indices are monotone, the key blocks a query block can see form one contiguous range
  `[lo, hi]` that is computed per query block; blocks outside it (the causal upper triangle,
  blocks left of a sliding window) are never touched.
* several *query variants* may share one key set (`qs` is a tuple): per (query, key) pair a
  `branch` in `0 .. len(qs)-1` picks which variant's logit is used.  Plain attention has one
  variant; DCA has three (intra / successive / inter rotations) and selects by chunk index.
* an optional per-row logit multiplier `q_scale` [b, Tq] (DCA length scaling σ²).
* float32 accumulators; fully masked rows give out 0 and lse -inf, never NaN.

Backward (`attention_bwd`): FlashAttention-2 recomputation from the saved output and the
natural-log LSE: `P = exp(S - lse)`, `dV = Pᵀ dO`, `dS = P ∘ (dO Vᵀ - Δ)` with
`Δ = rowsum(dO ∘ O) - dlse`, `dQ = scale dS K`, `dK = scale dSᵀ Q`.  Nothing of size T×T is
ever stored; the only residuals are q, k, v, out and lse.
"""

from __future__ import annotations

import dataclasses
import functools

import jax
import jax.numpy as jnp
import numpy as np
from jax import lax

from qwen_jax.attention import registry


@dataclasses.dataclass(frozen=True)
class BlockSpec:
    """Static configuration of the block kernel (hashable: used as a custom_vjp nondiff arg)."""

    scale: float
    block_q: int
    block_k: int
    sliding_window: int | None = None
    # DCA: chunk length Lc; branch = clip(floor(q_pos / Lc) - floor(kv_pos / Lc), 0, n_variants - 1).
    chunk_len: int | None = None


@dataclasses.dataclass(frozen=True)
class BlockAux:
    """Integer/float side arrays of the block kernel (no gradients flow into them)."""

    q_index: jax.Array  # [Tq] int32, non-decreasing global index
    kv_index: jax.Array  # [Tk] int32, non-decreasing global index
    q_seg: jax.Array | None = None  # [b, Tq]
    kv_seg: jax.Array | None = None  # [b, Tk]
    q_pos: jax.Array | None = None  # [b, Tq] per-document positions (DCA branch selection)
    kv_pos: jax.Array | None = None  # [b, Tk]
    q_scale: jax.Array | None = None  # [b, Tq] float32 per-row logit multiplier


jax.tree_util.register_dataclass(
    BlockAux,
    data_fields=["q_index", "kv_index", "q_seg", "kv_seg", "q_pos", "kv_pos", "q_scale"],
    meta_fields=[],
)


# ----------------------------------------------------------------------------------------------
# padding / blocking helpers


def _pad_axis(x, size, axis, value=0):
    extra = size - x.shape[axis]
    if extra == 0:
        return x
    widths = [(0, 0)] * x.ndim
    widths[axis] = (0, extra)
    return jnp.pad(x, widths, constant_values=value)


def _pad_edge(x, size, axis):
    """Pad by repeating the last element (keeps index arrays non-decreasing)."""
    extra = size - x.shape[axis]
    if extra == 0:
        return x
    last = lax.slice_in_dim(x, x.shape[axis] - 1, x.shape[axis], axis=axis)
    reps = [1] * x.ndim
    reps[axis] = extra
    return jnp.concatenate([x, jnp.tile(last, reps)], axis=axis)


def _ceil_to(n, m):
    return -(-n // m) * m


class _Blocked:
    """q/k/v and side arrays padded to whole blocks and reshaped [.., n_blocks, block, ..]."""

    def __init__(self, qs, k, v, aux: BlockAux, spec: BlockSpec):
        b, tq, h, d = qs[0].shape
        tk, kvh = k.shape[1], k.shape[2]
        self.b, self.tq, self.tk, self.h, self.d, self.kvh, self.g = b, tq, tk, h, d, kvh, h // kvh
        self.bq, self.bk = min(spec.block_q, tq), min(spec.block_k, tk)
        self.tq_p, self.tk_p = _ceil_to(tq, self.bq), _ceil_to(tk, self.bk)
        self.nq, self.nk = self.tq_p // self.bq, self.tk_p // self.bk
        q_index = _pad_edge(aux.q_index.astype(jnp.int32), self.tq_p, 0)
        kv_index = _pad_edge(aux.kv_index.astype(jnp.int32), self.tk_p, 0)
        self.q_index = q_index.reshape(self.nq, self.bq)
        self.kv_index = kv_index.reshape(self.nk, self.bk)
        self.kv_valid = (jnp.arange(self.tk_p) < tk).reshape(self.nk, self.bk)

        def rows(x, size, nb, blk, value=0):  # [b, T] -> [b, nb, blk]
            return None if x is None else _pad_axis(x, size, 1, value).reshape(b, nb, blk)

        self.q_seg = rows(aux.q_seg, self.tq_p, self.nq, self.bq)
        self.kv_seg = rows(aux.kv_seg, self.tk_p, self.nk, self.bk)
        self.q_pos = rows(aux.q_pos, self.tq_p, self.nq, self.bq)
        self.kv_pos = rows(aux.kv_pos, self.tk_p, self.nk, self.bk)
        self.q_scale = rows(aux.q_scale, self.tq_p, self.nq, self.bq, 1)

    def blocks_q(self, x):  # [b, Tq, h, ...] -> [b, nq, bq, kv, g, ...]
        x = _pad_axis(x, self.tq_p, 1)
        return x.reshape(self.b, self.nq, self.bq, self.kvh, self.g, *x.shape[3:])

    def blocks_k(self, x):  # [b, Tk, kv, d] -> [b, nk, bk, kv, d]
        return _pad_axis(x, self.tk_p, 1).reshape(self.b, self.nk, self.bk, self.kvh, self.d)

    def unblock_q(self, x):  # [b, nq, bq, kv, g, ...] -> [b, Tq, h, ...]
        x = x.reshape(self.b, self.tq_p, self.h, *x.shape[5:])
        return x[:, : self.tq]

    def unblock_k(self, x):
        return x.reshape(self.b, self.tk_p, self.kvh, self.d)[:, : self.tk]

    # ---- block ranges (indices are non-decreasing, so visible blocks are contiguous)
    def kv_range(self, i, window):
        """Key blocks [lo, hi) that query block i can see."""
        qmin, qmax = self.q_index[i, 0], self.q_index[i, -1]
        kmin, kmax = self.kv_index[:, 0], self.kv_index[:, -1]
        hi = jnp.sum(kmin <= qmax)
        lo = 0 if window is None else jnp.sum(kmax <= qmin - window)
        return lo, jnp.maximum(hi, lo)

    def q_range(self, j, window):
        """Query blocks [lo, hi) that can see key block j."""
        kmin, kmax = self.kv_index[j, 0], self.kv_index[j, -1]
        qmin, qmax = self.q_index[:, 0], self.q_index[:, -1]
        lo = jnp.sum(qmax < kmin)
        hi = self.nq if window is None else jnp.sum(qmin < kmax + window)
        return lo, jnp.maximum(hi, lo)

    # ---- mask / branch / logits for one (query block i, key block j) pair
    def mask(self, i, j, window):
        qi, kj = self.q_index[i], self.kv_index[j]
        diff = qi[:, None] - kj[None, :]
        m = (diff >= 0) & self.kv_valid[j][None, :]
        if window is not None:
            m = m & (diff < window)
        m = m[None]  # [1, bq, bk]
        if self.q_seg is not None:
            m = m & (self.q_seg[:, i][:, :, None] == self.kv_seg[:, j][:, None, :])
        return m[:, None, None]  # [b or 1, 1, 1, bq, bk] (broadcast over kv, g)

    def branch(self, i, j, chunk_len, n_var):
        if n_var == 1:
            return None
        cq = self.q_pos[:, i] // chunk_len
        ck = self.kv_pos[:, j] // chunk_len
        br = jnp.clip(cq[:, :, None] - ck[:, None, :], 0, n_var - 1)
        return br[:, None, None]  # [b, 1, 1, bq, bk]

    def row_scale(self, i, scale):
        if self.q_scale is None:
            return scale
        return scale * self.q_scale[:, i].astype(jnp.float32)[:, None, None, :, None]  # [b,1,1,bq,1]


def _logits(qbs, kb, branch, row_scale):
    """Scaled logits [b, kv, g, bq, bk] in float32, selecting the query variant per pair."""
    s = None
    for idx, qb in enumerate(qbs):
        sv = jnp.einsum("bqkgd,bskd->bkgqs", qb, kb, preferred_element_type=jnp.float32)
        s = sv if s is None else jnp.where(branch == idx, sv, s)
    return s * row_scale


def _dyn(x, i, axis=1):
    return lax.dynamic_index_in_dim(x, i, axis=axis, keepdims=False)


# ----------------------------------------------------------------------------------------------
# forward


def attention_fwd(qs, k, v, aux: BlockAux, spec: BlockSpec):
    """(out [b, Tq, h, d] float32, lse [b, Tq, h] float32) for query variants `qs`."""
    blk = _Blocked(qs, k, v, aux, spec)
    qbs = [blk.blocks_q(q) for q in qs]
    kb_all, vb_all = blk.blocks_k(k), blk.blocks_k(v)
    window, n_var = spec.sliding_window, len(qs)
    b, kvh, g, bq, d = blk.b, blk.kvh, blk.g, blk.bq, blk.d

    def one_q_block(i):
        qb = [_dyn(x, i) for x in qbs]  # [b, bq, kv, g, d]
        rs = blk.row_scale(i, spec.scale)
        lo, hi = blk.kv_range(i, window)

        def body(j, carry):
            acc, m, den = carry
            kb, vb = _dyn(kb_all, j), _dyn(vb_all, j)
            mask = blk.mask(i, j, window)
            s = _logits(qb, kb, blk.branch(i, j, spec.chunk_len, n_var), rs)
            s = jnp.where(mask, s, -jnp.inf)
            m_new = jnp.maximum(m, jnp.max(s, axis=-1))
            m_safe = jnp.where(jnp.isfinite(m_new), m_new, 0.0)
            p = jnp.exp(s - m_safe[..., None])
            alpha = jnp.exp(m - m_safe)
            den = den * alpha + jnp.sum(p, axis=-1)
            pv = jnp.einsum("bkgqs,bskd->bkgqd", p.astype(vb.dtype), vb, preferred_element_type=jnp.float32)
            acc = acc * alpha[..., None] + pv
            return acc, m_new, den

        init = (jnp.zeros((b, kvh, g, bq, d), jnp.float32), jnp.full((b, kvh, g, bq), -jnp.inf, jnp.float32),
                jnp.zeros((b, kvh, g, bq), jnp.float32))
        acc, m, den = lax.fori_loop(lo, hi, body, init)
        empty = den == 0
        out = acc / jnp.where(empty, 1.0, den)[..., None]
        lse = jnp.where(empty, -jnp.inf, m + jnp.log(jnp.where(empty, 1.0, den)))
        # -> [b, bq, kv, g, d] / [b, bq, kv, g]
        return out.transpose(0, 3, 1, 2, 4), lse.transpose(0, 3, 1, 2)

    out, lse = lax.map(one_q_block, jnp.arange(blk.nq))  # [nq, b, bq, kv, g, ...]
    out = blk.unblock_q(jnp.moveaxis(out, 0, 1))
    lse = blk.unblock_q(jnp.moveaxis(lse, 0, 1))
    return out, lse


# ----------------------------------------------------------------------------------------------
# backward


def attention_bwd(qs, k, v, aux: BlockAux, spec: BlockSpec, out, lse, dout, dlse=None):
    """Gradients (dqs tuple, dk, dv), all float32, given the *final* out/lse of every query row.

    `out`/`lse` may be the result of a larger attention (ring: other key blocks contributed
    too); the gradients returned are the contributions of the keys passed here.
    """
    blk = _Blocked(qs, k, v, aux, spec)
    window, n_var = spec.sliding_window, len(qs)
    qbs = [blk.blocks_q(q) for q in qs]
    kb_all, vb_all = blk.blocks_k(k), blk.blocks_k(v)
    delta = jnp.sum(dout.astype(jnp.float32) * out.astype(jnp.float32), axis=-1)  # [b, Tq, h]
    if dlse is not None:
        delta = delta - dlse.astype(jnp.float32)
    lse_safe = jnp.where(jnp.isfinite(lse), lse, 0.0).astype(jnp.float32)
    # per-row arrays as [b, nq, bq, kv, g]
    delta_b, lse_b = blk.blocks_q(delta), blk.blocks_q(lse_safe)
    do_b = blk.blocks_q(dout)

    def one_k_block(j, carry):
        dqs_all, dk_all, dv_all = carry
        kb, vb = _dyn(kb_all, j), _dyn(vb_all, j)
        lo, hi = blk.q_range(j, window)

        def body(i, inner):
            dqs_all, dk, dv = inner
            qb = [_dyn(x, i) for x in qbs]
            rs = blk.row_scale(i, spec.scale)
            br = blk.branch(i, j, spec.chunk_len, n_var)
            mask = blk.mask(i, j, window)
            s = _logits(qb, kb, br, rs)
            lse_i = _dyn(lse_b, i).transpose(0, 2, 3, 1)[..., None]  # [b, kv, g, bq, 1]
            p = jnp.where(mask, jnp.exp(s - lse_i), 0.0)
            do = _dyn(do_b, i)  # [b, bq, kv, g, d]
            dv = dv + jnp.einsum("bkgqs,bqkgd->bskd", p.astype(do.dtype), do, preferred_element_type=jnp.float32)
            dp = jnp.einsum("bqkgd,bskd->bkgqs", do, vb, preferred_element_type=jnp.float32)
            ds = p * (dp - _dyn(delta_b, i).transpose(0, 2, 3, 1)[..., None]) * rs
            new_dqs = []
            for idx, (q_i, dq_all) in enumerate(zip(qb, dqs_all, strict=True)):
                ds_v = ds if br is None else jnp.where(br == idx, ds, 0.0)
                dq_blk = jnp.einsum("bkgqs,bskd->bqkgd", ds_v.astype(kb.dtype), kb,
                                    preferred_element_type=jnp.float32)
                new_dqs.append(lax.dynamic_update_index_in_dim(dq_all, _dyn(dq_all, i) + dq_blk, i, axis=1))
                dk = dk + jnp.einsum("bkgqs,bqkgd->bskd", ds_v.astype(q_i.dtype), q_i,
                                     preferred_element_type=jnp.float32)
            return tuple(new_dqs), dk, dv

        zeros_k = jnp.zeros((blk.b, blk.bk, blk.kvh, blk.d), jnp.float32)
        dqs_all, dk, dv = lax.fori_loop(lo, hi, body, (dqs_all, zeros_k, zeros_k))
        dk_all = lax.dynamic_update_index_in_dim(dk_all, dk, j, axis=1)
        dv_all = lax.dynamic_update_index_in_dim(dv_all, dv, j, axis=1)
        return dqs_all, dk_all, dv_all

    dq0 = tuple(jnp.zeros(x.shape, jnp.float32) for x in qbs)
    dk0 = jnp.zeros(kb_all.shape, jnp.float32)
    dqs, dk, dv = lax.fori_loop(0, blk.nk, one_k_block, (dq0, dk0, dk0))
    return tuple(blk.unblock_q(x) for x in dqs), blk.unblock_k(dk), blk.unblock_k(dv)


# ----------------------------------------------------------------------------------------------
# differentiable wrapper


def zero_cotangent(x):
    """Cotangent of a side array no gradient flows into (float0 for integers): every custom_vjp over `BlockAux`."""
    if x is None:
        return None
    if jnp.issubdtype(x.dtype, jnp.floating):
        return jnp.zeros_like(x)
    return np.zeros(x.shape, jax.dtypes.float0)


@functools.partial(jax.custom_vjp, nondiff_argnums=(4,))
def block_attention(qs, k, v, aux: BlockAux, spec: BlockSpec):
    """Differentiable (out [b,Tq,h,d] in q dtype, lse [b,Tq,h] float32) with a recomputing backward."""
    out, lse = attention_fwd(qs, k, v, aux, spec)
    return out.astype(qs[0].dtype), lse


def _block_attention_fwd(qs, k, v, aux, spec):
    out, lse = attention_fwd(qs, k, v, aux, spec)
    out = out.astype(qs[0].dtype)
    return (out, lse), (qs, k, v, aux, out, lse)


def _block_attention_bwd(spec, res, cts):
    qs, k, v, aux, out, lse = res
    dout, dlse = cts
    dqs, dk, dv = attention_bwd(qs, k, v, aux, spec, out, lse, dout, dlse)
    daux = jax.tree.map(zero_cotangent, aux)
    return (tuple(dq.astype(q.dtype) for dq, q in zip(dqs, qs, strict=True)), dk.astype(k.dtype),
            dv.astype(v.dtype), daux)


block_attention.defvjp(_block_attention_fwd, _block_attention_bwd)


def blockwise_attention(q, k, v, *, segment_ids=None, sliding_window=None, scale=None, block_size=512,
                        return_lse=False):
    """Causal attention with O(seq * block) memory; same semantics as `reference.xla_attention`.

    q [batch, seq, heads, head_dim]; k, v [batch, seq, kv_heads, head_dim] (GQA, never repeated);
    `segment_ids` [batch, seq] (packed documents); `sliding_window`: key visible iff
    0 <= q - k < window.  Any seq length (padded internally to whole blocks).  Returns `out`
    (q dtype) and, if asked, the natural-log `lse` [batch, seq, heads] (float32, -inf for fully
    masked rows).
    """
    t, d = q.shape[1], q.shape[3]
    if k.shape[1] != t:
        raise ValueError(f"blockwise_attention is self-attention: q seq {t} != kv seq {k.shape[1]}")
    if q.shape[2] % k.shape[2]:
        raise ValueError(f"query heads {q.shape[2]} not a multiple of kv heads {k.shape[2]}")
    scale = d**-0.5 if scale is None else float(scale)
    spec = BlockSpec(scale=scale, block_q=int(block_size), block_k=int(block_size),
                     sliding_window=None if sliding_window is None else int(sliding_window))
    idx = jnp.arange(t, dtype=jnp.int32)
    seg = None if segment_ids is None else jnp.broadcast_to(jnp.asarray(segment_ids, jnp.int32), q.shape[:2])
    aux = BlockAux(q_index=idx, kv_index=idx, q_seg=seg, kv_seg=seg)
    out, lse = block_attention((q,), k, v, aux, spec)
    return (out, lse) if return_lse else out


registry.register(registry.AttentionImpl(
    "blockwise", blockwise_attention, options=("block_size",),
    ring_core=registry.RingCore("blockwise", masks=True, auto_rank=1)))
