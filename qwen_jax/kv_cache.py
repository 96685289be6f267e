"""Key/value cache for incremental decoding, and attention over it.

Layout: one `[batch, length, kv_heads, head_dim]` key and value buffer per decoder layer (in
the compute dtype), a shared write slot `index`, and per row the first slot holding a real
token, `start` (prompts are left-padded so every row's prompt ends at the same slot; a row's
position is `slot - start`).  Because positions advance one per slot in every row, slot
distances equal position distances: the causal rule and transformers' sliding-window rule
(`0 <= q - k < window`) are applied to slot indices, exactly as transformers' cache masks do.

Why one dense attention over the whole buffer: the buffer length is a static bucket (so one
compilation serves many prompt and output lengths), unwritten slots are masked by causality,
padding by `start`.  Prefill (t = prompt slots) and decode (t = 1) are the same function.

Keys are stored already rotated (RoPE by absolute position, or DCA's key position
`p mod (chunk_size - local_size)`), so a decode step rotates only the new token.
"""

from __future__ import annotations

import dataclasses
import math

import jax
import jax.numpy as jnp
from jax.sharding import NamedSharding

from qwen_jax.attention.dca import dca_branch, dca_key_positions, dca_length_scale, dca_query_positions
from qwen_jax.attention.reference import xla_attention
from qwen_jax.rope import apply_rope, cos_sin
from qwen_jax.sharding import logical_to_spec

CACHE_AXES = ("batch", None, "act_kv_heads", None)  # [batch, length, kv_heads, head_dim]


@jax.tree_util.register_dataclass
@dataclasses.dataclass(frozen=True)
class KVCache:
    keys: tuple  # per layer [batch, length, kv_heads, head_dim], rotated
    values: tuple  # per layer [batch, length, kv_heads, head_dim]
    index: jax.Array  # int32 scalar: the slot the next token is written to
    start: jax.Array  # int32 [batch]: first slot of each row's prompt (left padding before it)

    @property
    def length(self) -> int:
        return self.keys[0].shape[1]

    def positions(self, t: int) -> jax.Array:
        """Positions [batch, t] of the next t slots (0 on padding slots)."""
        slots = self.index + jnp.arange(t, dtype=jnp.int32)
        return jnp.maximum(slots[None, :] - self.start[:, None], 0)


def length_bucket(n: int, minimum: int = 16) -> int:
    """`n` rounded up to a bucket: a power of two up to 4096, then a multiple of 4096.

    Buffers and prompts are padded to buckets so that different prompt and output lengths
    reuse the same compiled prefill and decode step (at most 2x padding, 1.x above 4096).
    """
    n = max(int(n), minimum)
    if n <= 4096:
        return 1 << math.ceil(math.log2(n))
    return -(-n // 4096) * 4096


def cache_sharding(mesh, shape) -> NamedSharding:
    """The buffers' sharding: batch over (data, fsdp), kv heads over tensor (the project's logical rules)."""
    return NamedSharding(mesh, logical_to_spec(CACHE_AXES, shape, mesh))


def init_cache(cfg, start, length: int, mesh=None) -> KVCache:
    """An empty cache of `length` slots for rows whose prompts start at slots `start` [batch]."""
    start = jnp.asarray(start, jnp.int32)
    shape = (start.shape[0], int(length), cfg.num_key_value_heads, cfg.head_dim)
    dtype = jnp.dtype(cfg.dtype)
    sharding = cache_sharding(mesh, shape) if mesh is not None else None
    n = cfg.num_hidden_layers
    return KVCache(tuple(jnp.zeros(shape, dtype, device=sharding) for _ in range(n)),
                   tuple(jnp.zeros(shape, dtype, device=sharding) for _ in range(n)), jnp.zeros((), jnp.int32), start)


def write(buffer, new, index):
    """`buffer` with `new` [batch, t, ...] written at slots [index, index + t)."""
    return jax.lax.dynamic_update_slice_in_dim(buffer, new.astype(buffer.dtype), index, axis=1)


def _segments(cache: KVCache, t: int):
    """(query, key) segment ids: 1 on real tokens, 0 on left padding (padding never reaches a real token)."""
    q_slots = cache.index + jnp.arange(t, dtype=jnp.int32)
    k_slots = jnp.arange(cache.length, dtype=jnp.int32)
    start = cache.start[:, None]
    return (q_slots[None] >= start).astype(jnp.int32), (k_slots[None] >= start).astype(jnp.int32)


def cached_attention(q, keys, values, cache: KVCache, *, sliding_window=None):
    """Causal attention of q [batch, t, heads, d] (slots index..index+t) over the written buffers."""
    q_seg, k_seg = _segments(cache, q.shape[1])
    return xla_attention(q, keys, values, segment_ids=q_seg, kv_segment_ids=k_seg, sliding_window=sliding_window,
                         q_offset=cache.index)


def rotate_dca_keys(k, positions, ctx):
    """Keys rotated once by DCA's key position `p mod (chunk_size - local_size)` (what the cache stores)."""
    cos, sin = cos_sin(dca_key_positions(positions, ctx.chunk_size, ctx.local_size), ctx.inv_freq, 1.0, k.dtype)
    return apply_rope(k, cos, sin)


def cached_dca_attention(q, keys, values, cache: KVCache, *, positions, ctx):
    """Dual Chunk Attention of unrotated q (positions [batch, t]) over DCA-rotated cached keys.

    Same rules as `attention.dca_dense` (branch by chunk index of query and key position, one
    softmax over the union, σ² length scaling with the query's document length = its row's
    largest position + 1), so a decode step equals the last row of a full DCA forward.
    """
    b, t, h, d = q.shape
    kvh = keys.shape[2]
    g = h // kvh
    c, w = ctx.chunk_size, ctx.local_size
    k_positions = jnp.maximum(jnp.arange(cache.length, dtype=jnp.int32)[None] - cache.start[:, None], 0)
    branch = dca_branch(positions, k_positions, c, w)[:, None, None]  # [b, 1, 1, t, L]
    logits = None
    for idx, qp in enumerate(dca_query_positions(positions, c, w)):
        cos, sin = cos_sin(qp, ctx.inv_freq, 1.0, q.dtype)
        qv = apply_rope(q, cos, sin).reshape(b, t, kvh, g, d)
        lv = jnp.einsum("btkgd,bskd->bkgts", qv, keys, preferred_element_type=jnp.float32)
        logits = lv if logits is None else jnp.where(branch == idx, lv, logits)
    logits = logits * d**-0.5
    if ctx.original_max_position_embeddings > 0:
        sigma = dca_length_scale(jnp.max(positions, axis=-1) + 1, ctx.original_max_position_embeddings)
        logits = logits * jnp.square(sigma)[:, None, None, None, None]
    q_seg, k_seg = _segments(cache, t)
    q_slots = cache.index + jnp.arange(t, dtype=jnp.int32)
    mask = (q_slots[:, None] >= jnp.arange(cache.length)[None, :])[None] & (q_seg[:, :, None] == k_seg[:, None, :])
    logits = jnp.where(mask[:, None, None], logits, -jnp.inf)
    probs = jax.nn.softmax(logits, axis=-1)  # every query row sees at least itself
    out = jnp.einsum("bkgts,bskd->btkgd", probs.astype(values.dtype), values, preferred_element_type=jnp.float32)
    return out.reshape(b, t, h, d).astype(q.dtype)
