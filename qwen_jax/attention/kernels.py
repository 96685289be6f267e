"""Fused attention kernels for GPU/TPU: cuDNN (through JAX's cuDNN module) and tokamax (Pallas).

* `cudnn`: causal flash attention.  Packed documents (segment ids) go through cuDNN's packed
  (ragged) layout: each contiguous run of equal segment ids becomes one sequence of its own,
  described by per-run lengths and offsets (`packed_segments`) under a static bound on runs per
  row; no [seq, seq] mask is built, and only the within-document triangles are computed.  A
  row with more runs than the bound falls back, at run time, to the exact blockwise kernel.
  With a sliding window, or where the packed layout is unavailable, segments go through a dense
  boolean mask (correct, slow).
* `kernel`: tokamax's Pallas flash attention (Mosaic GPU on Hopper, Triton elsewhere on GPU,
  Mosaic TPU on TPU).  Packed documents are contiguous runs of equal segment ids, so the mask
  is expressed as a per-query `k_start` (the first key of the query's document, or of its
  sliding window) plus causality: O(seq) mask data, never a [seq, seq] array.  Falls back to
  cuDNN, then XLA, where tokamax is not installed or does not support the shape.

JAX's cuDNN module and tokamax's mask/kernel table are private API: every use goes through
`qwen_jax.compat` and is guarded by a support check with a public fallback.  Both register here
(`registry.py`): `cudnn` (also the ring's fused per-step core) and `kernel`.
"""

from __future__ import annotations

import functools

import jax
import jax.numpy as jnp
import numpy as np
from jax import lax

from qwen_jax import compat
from qwen_jax.attention import registry
from qwen_jax.attention.blockwise import blockwise_attention
from qwen_jax.attention.masks import attention_mask

# cuDNN's packed layout needs Hopper and cuDNN >= 9.6; older JAX scaled the key offsets by the
# query head count (wrong with grouped-query attention), fixed in JAX 0.11.1: before that, K/V
# heads are repeated for the packed call.
PACKED_MIN_CUDNN = 90600
PACKED_GQA_FIXED_JAX = (0, 11, 1)
PACKED_MASK = "PADDING_CAUSAL"  # causal inside each run; the run lengths are cuDNN's padding


def default_max_segments(seq_len: int) -> int:
    """Static bound on runs per row when none is configured: one document per 256 tokens, 16..256.

    The packed kernel keeps float32 softmax statistics of shape [batch * bound, heads, seq] as a
    backward residual, so the bound trades memory (128 at 32k tokens: 2-4x the attention output)
    against how often a row of many short documents takes the exact blockwise fallback, which costs
    a whole step several times the packed kernel's time.  Chat SFT data packed into 16k-token rows
    (a log-normal spread of conversations, median ~550 tokens) holds 25 documents a row on average
    and up to 40: a bound of one per 512 tokens (32) would send 8% of such steps to the fallback.
    """
    return int(min(256, max(16, seq_len // 256)))


def runs_per_row(segment_ids: np.ndarray) -> np.ndarray:
    """Host-side count of contiguous runs of equal segment ids per row ([batch, seq] -> [batch]): the
    number of packed-layout segments `packed_segments` needs for each row (padding runs included)."""
    seg = np.asarray(segment_ids)
    return 1 + np.count_nonzero(seg[:, 1:] != seg[:, :-1], axis=1)


def packed_layout_bound(impl: str, dtype, seq_len: int, configured: int) -> int | None:
    """The runs-per-row bound packed rows of `seq_len` tokens are held to when attention `impl`
    (resolved for `dtype` here) takes cuDNN's packed layout; None when it does not (other
    implementations, `kernel` through tokamax, and 32-bit inputs take any number of documents).
    `configured`: `model.attention_max_segments` (0 = `default_max_segments`)."""
    name = registry.resolve(impl, dtype)
    if name == "kernel":
        if tokamax_available():
            return None
        name = registry.resolve(registry.AUTO, dtype)
    if name != "cudnn" or np.dtype(dtype).itemsize != 2 or not cudnn_packed_supported():
        return None
    return int(configured) or default_max_segments(seq_len)


def packed_segments(segment_ids, max_segments: int):
    """Contiguous runs of equal segment ids -> cuDNN's packed layout.

    Returns `(seqlens [b, M] int32, offsets [b, M + 1] int32, fits [b] bool)` with M =
    `max_segments`: run r of row b starts at `offsets[b, r]` and has `seqlens[b, r]` tokens;
    entries past the row's last run are -1 (JAX's convention).  Every run is a segment,
    padding (id 0) included, so padding tokens attend to each other exactly as in the
    reference mask.  `fits[b]` is False when row b has more than M runs (its layout is then
    truncated and must not be used).  Assumes each segment id occupies one contiguous run per
    row, as packed data does (a repeated id in two runs would be two documents here).
    """
    seg = jnp.asarray(segment_ids)
    b, t = seg.shape
    m = int(max_segments)
    pos = jnp.broadcast_to(jnp.arange(t, dtype=jnp.int32), (b, t))
    is_start = jnp.concatenate([jnp.ones((b, 1), bool), seg[:, 1:] != seg[:, :-1]], axis=1)
    run = jnp.cumsum(is_start, axis=1, dtype=jnp.int32) - 1  # run index of every token
    n_runs = run[:, -1] + 1
    slot = jnp.where(is_start & (run < m), run, m)  # slot m is out of range: dropped
    rows = jnp.broadcast_to(jnp.arange(b)[:, None], (b, t))
    starts = jnp.full((b, m), t, jnp.int32).at[rows, slot].set(pos, mode="drop")
    ends = jnp.concatenate([starts[:, 1:], jnp.full((b, 1), t, jnp.int32)], axis=1)
    valid = jnp.arange(m)[None, :] < n_runs[:, None]
    seqlens = jnp.where(valid, ends - starts, -1)
    offsets = jnp.concatenate([jnp.where(valid, starts, -1), jnp.full((b, 1), -1, jnp.int32)], axis=1)
    return seqlens, offsets, n_runs <= m


def segmented_attention(q, k, v, segment_ids, *, scale, max_segments, packed_kernel, fallback):
    """`packed_kernel(q, k, v, seqlens, offsets, scale=)` when every row fits the bound, else `fallback`.

    The choice is made on the device (`lax.cond`): the bound is static, the data is not.
    """
    seqlens, offsets, fits = packed_segments(segment_ids, max_segments)
    return lax.cond(jnp.all(fits),
                    lambda: packed_kernel(q, k, v, seqlens, offsets, scale=scale),
                    lambda: fallback(q, k, v, segment_ids=segment_ids, scale=scale))


@functools.cache
def cudnn_packed_supported() -> bool:
    """cuDNN packed layout usable here: CUDA GPU of compute capability >= 9.0, cuDNN >= 9.6, API as expected."""
    if jax.default_backend() != "gpu":
        return False
    try:
        compat.cudnn_mask_type(PACKED_MASK)
        if not compat.cudnn_packed_api():
            return False
        cc = tuple(int(x) for x in jax.devices()[0].compute_capability.split("."))
        return cc >= (9, 0) and compat.cudnn_version() >= PACKED_MIN_CUDNN
    except Exception:
        return False


def cudnn_packed_attention(q, k, v, seqlens, offsets, *, scale):
    """Causal attention inside each packed run (`packed_segments` layout) through cuDNN; differentiable."""
    h, kv = q.shape[2], k.shape[2]
    if kv != h and tuple(jax.__version_info__[:3]) < PACKED_GQA_FIXED_JAX:
        k, v = (jnp.repeat(x, h // kv, axis=2) for x in (k, v))
    return compat.cudnn_attention(q, k, v, scale=scale, mask=PACKED_MASK, q_seqlen=seqlens, kv_seqlen=seqlens,
                                  q_offsets=offsets, kv_offsets=offsets)


def cudnn_attention(q, k, v, *, segment_ids=None, sliding_window=None, scale=None, max_segments=None):
    """Causal flash attention through cuDNN (GPU, 16-bit inputs).

    `segment_ids` [batch, seq]: packed documents through the packed layout with at most
    `max_segments` runs per row (None: `default_max_segments(seq)`; 0: dense mask instead);
    rows over the bound take the exact blockwise kernel.  With a sliding window, or where the
    packed layout is unavailable, segments are a dense [batch, 1, seq, seq] mask.
    """
    t, s = q.shape[1], k.shape[1]
    scale = q.shape[-1] ** -0.5 if scale is None else scale
    window = None if sliding_window is None else (sliding_window - 1, 0)
    if segment_ids is None:
        return jax.nn.dot_product_attention(q, k, v, scale=scale, is_causal=True, local_window_size=window,
                                            implementation="cudnn")
    bound = default_max_segments(t) if max_segments is None else int(max_segments)
    if bound > 0 and sliding_window is None and t == s and cudnn_packed_supported():
        return segmented_attention(q, k, v, segment_ids, scale=scale, max_segments=bound,
                                   packed_kernel=cudnn_packed_attention, fallback=blockwise_attention)
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
# output as operands.  Both are internal JAX API (`qwen_jax.compat`): `cudnn_block_supported`
# checks they exist; tests/test_compat.py and `benchmarks/ring_scaling.py --check` compare the
# pair with `reference.dense_block_*` on GPU.


def cudnn_block_supported(dtype) -> bool:
    """cuDNN ring core usable here: GPU, 16-bit inputs, and JAX's cuDNN internals as expected."""
    if jax.default_backend() != "gpu" or jnp.dtype(dtype).itemsize != 2:
        return False
    return compat.cudnn_block_api()


def _stat_to_rows(stat, b, t, h):
    """cuDNN softmax statistics -> [b, t, h] float32 (JAX gives [b, h, t] for the BTNH layout)."""
    if stat.shape == (b, h, t):
        stat = jnp.swapaxes(stat, 1, 2)
    if stat.shape != (b, t, h):
        raise NotImplementedError(f"unexpected cuDNN softmax statistics shape {stat.shape} for q [{b}, {t}, {h}, .]")
    return stat.astype(jnp.float32)


def cudnn_block_fwd(q, k, v, *, causal: bool, scale: float):
    """(out float32 [b, tq, h, d], lse float32 [b, tq, h]) of one block pair through cuDNN flash attention."""
    out, stat = compat.cudnn_attention(q, k, v, scale=scale, mask="CAUSAL" if causal else "NO_MASK",
                                       return_residual=True)
    b, t, h, _ = q.shape
    return out.astype(jnp.float32), _stat_to_rows(stat, b, t, h)


def cudnn_block_bwd(q, k, v, out, lse, dout, *, causal: bool, scale: float):
    """(dq, dk, dv) float32 of one block pair given the final `out`/`lse` of every query row (cuDNN backward)."""
    stat = jnp.swapaxes(lse.astype(jnp.float32), 1, 2)  # [b, h, t]
    grads = compat.cudnn_attention_bwd(q, k, v, stat, out.astype(q.dtype), dout.astype(q.dtype), scale=scale,
                                       mask="CAUSAL" if causal else "NO_MASK")
    return tuple(x.astype(jnp.float32) for x in grads)


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
    kernels = compat.tokamax_kernels()
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
    mask = compat.tokamax_mask(None if k_start is None else k_start[:, None, :], is_causal=True)
    scale = q.shape[-1] ** -0.5 if scale is None else scale
    errors = []
    for name in implementation:
        if name not in kernels:
            continue
        try:
            return kernels[name](q, k, v, mask=mask, logits_scale=scale, bias=None, precision=None,
                                         logits_soft_cap=None, q_sharding=None)
        except NotImplementedError as e:
            errors.append(f"{name}: {e}")
    raise NotImplementedError("; ".join(errors) or f"no tokamax attention kernel for {platform}")


def kernel_attention(q, k, v, *, segment_ids=None, sliding_window=None, scale=None, max_segments=None):
    """The fastest fused kernel available: tokamax on GPU/TPU where it applies, else what `auto` picks."""
    if jax.default_backend() in ("gpu", "tpu") and tokamax_available():
        try:
            return tokamax_attention(q, k, v, segment_ids=segment_ids, sliding_window=sliding_window, scale=scale)
        except NotImplementedError:
            pass
    return registry.attend(q, k, v, impl=registry.AUTO, segment_ids=segment_ids, sliding_window=sliding_window,
                           scale=scale, max_segments=max_segments)


registry.register(registry.AttentionImpl(
    "cudnn", cudnn_attention, platforms=frozenset({"gpu"}), half_precision_only=True, options=("max_segments",),
    ring_core=registry.RingCore("cudnn", cudnn_block_fwd, cudnn_block_bwd, supported=cudnn_block_supported,
                                auto_rank=0),
    auto_rank=0))
registry.register(registry.AttentionImpl("kernel", kernel_attention, options=("max_segments",)))
