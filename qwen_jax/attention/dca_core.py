"""What Dual Chunk Attention's dense path (`dca.py`) and its ring path (`ring.py`) share.

The position rules (chunk index, the three query rotations, the key rotation, length scaling),
the rotations themselves and the memory-efficient kernel (`dca_blockwise`, the block kernel of
`blockwise.py` with three query variants).  The rules are docs/long_context.md §DCA.
"""

from __future__ import annotations

import math

import jax
import jax.numpy as jnp
import numpy as np

from qwen_jax.attention.blockwise import BlockAux, BlockSpec, block_attention
from qwen_jax.rope import apply_rope, cos_sin

INTRA, SUCCESSIVE, INTER = 0, 1, 2


# ----------------------------------------------------------------------------------------------
# position rules (work on numpy or jax integer arrays)


def dca_key_positions(positions, chunk_size: int, local_size: int):
    """`Pk = p mod Lc`."""
    return positions % (chunk_size - local_size)


def dca_query_positions(positions, chunk_size: int, local_size: int):
    """(intra, successive, inter) query positions, each shaped like `positions`."""
    lc = chunk_size - local_size
    r = positions % lc
    xp = np if isinstance(positions, np.ndarray) else jnp
    succ = xp.minimum(r + lc, chunk_size)
    inter = xp.full_like(r, min(2 * lc - 1, chunk_size))
    return r, succ, inter


def dca_branch(q_positions, k_positions, chunk_size: int, local_size: int):
    """Branch (0 intra, 1 successive, 2 inter) of every pair [..., Tq, Tk] from per-document positions."""
    lc = chunk_size - local_size
    xp = np if isinstance(q_positions, np.ndarray) else jnp
    diff = (q_positions // lc)[..., :, None] - (k_positions // lc)[..., None, :]
    return xp.clip(diff, 0, 2)


def dca_seen_distance(positions, chunk_size: int, local_size: int):
    """Relative distance seen by RoPE for every pair [T, T] of one document (numpy; -1 where masked)."""
    positions = np.asarray(positions)
    qp = np.stack(dca_query_positions(positions, chunk_size, local_size))  # [3, T]
    kp = dca_key_positions(positions, chunk_size, local_size)
    br = dca_branch(positions, positions, chunk_size, local_size)
    pq = np.take_along_axis(qp.T, br, axis=1)  # [T, T]: query position of the pair's branch
    seen = pq - kp[None, :]
    t = len(positions)
    return np.where(np.tril(np.ones((t, t), bool)), seen, -1)


def dca_length_scale(lengths, original_max_position_embeddings: int):
    """σ = max(1, 0.1 ln(Lseq / L0) + 1) (1 when L0 <= 0); numpy/python floats or jax arrays."""
    if not original_max_position_embeddings or original_max_position_embeddings <= 0:
        return jnp.ones_like(jnp.asarray(lengths, jnp.float32)) if not np.isscalar(lengths) else 1.0
    if np.isscalar(lengths):
        return max(1.0, 0.1 * math.log(lengths / original_max_position_embeddings) + 1.0)
    lengths = jnp.asarray(lengths, jnp.float32)
    return jnp.maximum(1.0, 0.1 * jnp.log(lengths / original_max_position_embeddings) + 1.0)


def document_lengths(positions, segment_ids=None):
    """Per token: length of its document = (max position within its segment) + 1, [batch, seq] int32.

    Works for any token order (e.g. zig-zag permuted arrays): O(T log T) with a sort.
    """
    positions = jnp.asarray(positions, jnp.int32)
    if segment_ids is None:
        return jnp.broadcast_to(jnp.max(positions, axis=-1, keepdims=True) + 1, positions.shape)
    seg = jnp.asarray(segment_ids, jnp.int32)

    def one(seg_row, pos_row):
        order = jnp.lexsort((pos_row, seg_row))  # by segment, then position
        s_sorted, p_sorted = seg_row[order], pos_row[order]
        last = jnp.searchsorted(s_sorted, seg_row, side="right") - 1  # last token of the segment's run
        return p_sorted[last] + 1

    return jax.vmap(one)(seg, positions)


# ----------------------------------------------------------------------------------------------
# rotations


def dca_rotations(q, k, positions, inv_freq, chunk_size, local_size):
    """Three rotated query copies and the rotated keys (cos/sin in float32, cast to the q dtype)."""
    inv_freq = jnp.asarray(inv_freq, jnp.float32)
    qs = []
    for p in dca_query_positions(positions, chunk_size, local_size):
        cos, sin = cos_sin(p, inv_freq, 1.0, q.dtype)
        qs.append(apply_rope(q, cos, sin))
    cos, sin = cos_sin(dca_key_positions(positions, chunk_size, local_size), inv_freq, 1.0, k.dtype)
    return tuple(qs), apply_rope(k, cos, sin)


def dca_row_scale(positions, segment_ids, original):
    """σ² per query row [b, T] float32, or None when scaling is disabled."""
    if not original or original <= 0:
        return None
    sigma = dca_length_scale(document_lengths(positions, segment_ids), original)
    return sigma * sigma


def broadcast_rows(x, q):
    """[b, T] (or [1, T] / [T]) int32 row array broadcast to q's [batch, seq]; None stays None."""
    return None if x is None else jnp.broadcast_to(jnp.asarray(x, jnp.int32), q.shape[:2])


def check_dca_inputs(q, k, positions, chunk_size, local_size):
    """Validate the DCA shapes/sizes; `positions` broadcast to q's [batch, seq] (default 0..T-1)."""
    if chunk_size - local_size <= 0:
        raise ValueError(f"DCA needs chunk_size > local_size, got {chunk_size}, {local_size}")
    if q.shape[2] % k.shape[2]:
        raise ValueError(f"query heads {q.shape[2]} not a multiple of kv heads {k.shape[2]}")
    b, t = q.shape[:2]
    if positions is None:
        positions = jnp.arange(t, dtype=jnp.int32)
    return broadcast_rows(positions, q)


# ----------------------------------------------------------------------------------------------
# memory-efficient kernel


def dca_blockwise(q, k, v, *, positions, segment_ids=None, inv_freq, chunk_size, local_size,
                  original_max_position_embeddings=0, scale=None, block_size=512, return_lse=False):
    """Memory-efficient DCA on the block kernel (three query variants, online single softmax)."""
    positions = check_dca_inputs(q, k, positions, chunk_size, local_size)
    t, d = q.shape[1], q.shape[3]
    scale = d**-0.5 if scale is None else float(scale)
    qs, kr = dca_rotations(q, k, positions, inv_freq, chunk_size, local_size)
    spec = BlockSpec(scale=scale, block_q=int(block_size), block_k=int(block_size),
                     chunk_len=chunk_size - local_size)
    idx = jnp.arange(t, dtype=jnp.int32)
    seg = broadcast_rows(segment_ids, q)
    aux = BlockAux(q_index=idx, kv_index=idx, q_seg=seg, kv_seg=seg, q_pos=positions, kv_pos=positions,
                   q_scale=dca_row_scale(positions, seg, original_max_position_embeddings))
    out, lse = block_attention(qs, kr, v, aux, spec)
    return (out, lse) if return_lse else out
