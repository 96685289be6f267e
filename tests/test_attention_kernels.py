"""The fused-kernel path's mask plumbing on CPU (the kernels themselves need a GPU: benchmarks/attention_kernels.py)."""

from __future__ import annotations

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from qwen_jax.attention import attend, resolve_impl
from qwen_jax.attention.kernels import (
    cudnn_packed_supported,
    default_max_segments,
    kernel_attention,
    packed_layout_bound,
    packed_segments,
    runs_per_row,
    segment_starts,
    segmented_attention,
)
from qwen_jax.attention.masks import attention_mask
from qwen_jax.attention.reference import xla_attention


def test_segment_starts_give_the_packed_document_mask():
    seg = jnp.asarray([[1, 1, 2, 2, 2, 3, 0, 0], [5, 5, 5, 5, 5, 5, 5, 5]], jnp.int32)
    starts = segment_starts(seg)
    np.testing.assert_array_equal(starts, [[0, 0, 2, 2, 2, 5, 6, 6], [0] * 8])
    # k_start + causality (what the tokamax kernel is given) equals the segment mask
    idx = np.arange(8)
    from_starts = (idx[None, None, :] >= np.asarray(starts)[:, :, None]) & (idx[None, None, :] <= idx[None, :, None])
    np.testing.assert_array_equal(from_starts, attention_mask(8, 8, q_segment_ids=seg, kv_segment_ids=seg))


def test_kernel_and_auto_fall_back_to_reference_on_cpu():
    rng = np.random.default_rng(0)
    q = jnp.asarray(rng.standard_normal((1, 12, 4, 8)), jnp.float32)
    k, v = (jnp.asarray(rng.standard_normal((1, 12, 2, 8)), jnp.float32) for _ in range(2))
    seg = jnp.asarray([[1] * 5 + [2] * 7], jnp.int32)
    assert resolve_impl("auto", jnp.bfloat16) == "xla"  # CPU
    ref = attend(q, k, v, impl="xla", segment_ids=seg, sliding_window=4)
    np.testing.assert_array_equal(kernel_attention(q, k, v, segment_ids=seg, sliding_window=4), ref)
    with pytest.raises(ValueError, match="unknown attention implementation"):
        attend(q, k, v, impl="flash9")


# ----------------------------------------------------------------------------------------------
# cuDNN packed layout: segment ids -> per-run (length, offset) under a static bound


def rows_of(*docs_per_row, seq):
    """Segment-id rows from document lengths (ids 1, 2, ...), the rest padding (id 0)."""
    rows = []
    for docs in docs_per_row:
        ids = np.concatenate([np.full(n, i + 1, np.int32) for i, n in enumerate(docs)] or [np.zeros(0, np.int32)])
        rows.append(np.concatenate([ids, np.zeros(seq - len(ids), np.int32)]))
    return np.stack(rows)


def mask_of_layout(seqlens, offsets, seq):
    """What cuDNN computes for the packed layout: causal attention inside each (offset, length) run."""
    seqlens, offsets = np.asarray(seqlens), np.asarray(offsets)
    idx = np.arange(seq)
    masks = []
    for lens, offs in zip(seqlens, offsets, strict=True):
        m = np.zeros((seq, seq), bool)
        for n, o in zip(lens, offs[:-1], strict=True):
            if n > 0:
                inside = (idx >= o) & (idx < o + n)
                m |= inside[:, None] & inside[None, :] & (idx[None, :] <= idx[:, None])
        masks.append(m)
    return np.stack(masks)


_packed_segments = jax.jit(packed_segments, static_argnums=1)


def assert_layout_matches_segments(seg, bound):
    seqlens, offsets, fits = _packed_segments(jnp.asarray(seg), bound)
    assert seqlens.shape == (seg.shape[0], bound) and offsets.shape == (seg.shape[0], bound + 1)
    assert seqlens.dtype == jnp.int32 and offsets.dtype == jnp.int32
    n_runs = 1 + (np.diff(seg, axis=1) != 0).sum(axis=1)
    np.testing.assert_array_equal(fits, n_runs <= bound)
    for r in np.flatnonzero(n_runs <= bound):
        used = int(n_runs[r])
        assert np.all(np.asarray(seqlens)[r, used:] == -1) and np.all(np.asarray(offsets)[r, used:] == -1)
        assert int(np.asarray(seqlens)[r, :used].sum()) == seg.shape[1]  # every token in exactly one run
        row, t = jnp.asarray(seg[r:r + 1]), seg.shape[1]
        np.testing.assert_array_equal(mask_of_layout(seqlens[r:r + 1], offsets[r:r + 1], t)[0],
                                      attention_mask(t, t, q_segment_ids=row, kv_segment_ids=row)[0])


@pytest.mark.parametrize("docs, bound", [
    (([5, 7, 3], [15]), 4),  # trailing padding (id 0) is a run of its own; one document filling the row
    (([1] * 16, [2] * 8), 16),  # many one- and two-token documents, bound exactly met
    (([16],), 1),  # one document, bound 1
    (([4, 4, 4], [16]), 3),  # padding makes 4 runs in row 0: over the bound, row 1 still fits
    (([1] * 16, [3, 3]), 15),  # 16 runs > 15
])
def test_packed_segments_cover_exactly_the_segment_mask(docs, bound):
    assert_layout_matches_segments(rows_of(*docs, seq=16), bound)


@settings(max_examples=40, deadline=None)
@given(st.lists(st.lists(st.integers(1, 9), min_size=1, max_size=10), min_size=3, max_size=3),
       st.sampled_from([1, 2, 4, 7, 12]))
def test_packed_segments_property(doc_lengths, bound):
    """Three rows of random documents (the last cut at the row end, the rest padding), a few bounds."""
    seq = 40
    rows = [[n for n in np.cumsum(d) if n <= seq] for d in doc_lengths]
    docs = [list(np.diff([0, *r])) for r in rows]
    assert_layout_matches_segments(rows_of(*docs, seq=seq), bound)


def emulated_packed_kernel(q, k, v, seqlens, offsets, *, scale):
    """The cuDNN packed kernel's contract in XLA (reads only the layout, never the segment ids)."""
    t = q.shape[1]
    idx = jnp.arange(t)
    inside = (idx >= offsets[:, :-1, None]) & (idx < offsets[:, :-1, None] + seqlens[..., None])  # [b, M, t]
    run_of = jnp.where(inside.any(1), jnp.argmax(inside, axis=1), -1 - idx)
    return xla_attention(q, k, v, segment_ids=run_of, scale=scale)


def _nan_kernel(q, *a, **kw):
    return jnp.full_like(q, jnp.nan)


@jax.jit
def _segmented_vs_reference(q, k, v, dout, seg):
    """Outputs and gradients of `segmented_attention` (bound 4) and of the reference, plus which branch ran."""
    from qwen_jax.attention.blockwise import blockwise_attention

    def fallback(*a, **kw):
        return blockwise_attention(*a, block_size=8, **kw)

    def segmented(packed_kernel, fallback):
        return lambda q, k, v: segmented_attention(q, k, v, seg, scale=8**-0.5, max_segments=4,
                                                   packed_kernel=packed_kernel, fallback=fallback)

    out, vjp = jax.vjp(segmented(emulated_packed_kernel, fallback), q, k, v)
    ref_out, ref_vjp = jax.vjp(lambda q, k, v: xla_attention(q, k, v, segment_ids=seg), q, k, v)
    # each branch poisoned in turn: the output is finite only where the other branch ran
    packed_ran = jnp.all(jnp.isfinite(segmented(emulated_packed_kernel, _nan_kernel)(q, k, v)))
    fallback_ran = jnp.all(jnp.isfinite(segmented(_nan_kernel, fallback)(q, k, v)))
    return out, vjp(dout), ref_out, ref_vjp(dout), packed_ran, fallback_ran


@pytest.mark.parametrize("docs, fits", [(([5, 7, 3], [24]), True), (([2] * 12, [1] * 24), False)],
                         ids=["fits", "over_bound"])
def test_segmented_attention_packed_or_fallback_equals_reference(docs, fits):
    """Bound 4: rows of <= 4 runs take the packed kernel, more take the fallback; both equal the reference."""
    seg = jnp.asarray(rows_of(*docs, seq=24))
    rng = np.random.default_rng(1)
    q = jnp.asarray(rng.standard_normal((2, 24, 4, 8)), jnp.float32)
    k, v, dout = (jnp.asarray(rng.standard_normal(s), jnp.float32) for s in [(2, 24, 2, 8)] * 2 + [(2, 24, 4, 8)])
    out, grads, ref_out, ref_grads, packed_ran, fallback_ran = _segmented_vs_reference(q, k, v, dout, seg)
    assert (bool(packed_ran), bool(fallback_ran)) == (fits, not fits)
    np.testing.assert_allclose(out, ref_out, rtol=1e-5, atol=1e-5)
    for g, rg in zip(grads, ref_grads, strict=True):
        np.testing.assert_allclose(g, rg, rtol=1e-5, atol=1e-5)


def test_default_segment_bound_and_cpu_support():
    assert [default_max_segments(n) for n in (1024, 4096, 16384, 32768, 10**7)] == [16, 16, 64, 128, 256]
    assert not cudnn_packed_supported()  # CPU: cudnn_attention keeps the dense-mask path, never the packed one
    # no implementation here takes the packed layout, so no run is held to a bound
    assert all(packed_layout_bound(name, "bfloat16", 16384, 0) is None for name in ("auto", "cudnn", "xla"))


def test_host_run_count_is_what_the_packed_layout_needs():
    """`runs_per_row` (host, numpy) decides like the device's `packed_segments`: a row fits a bound iff its
    run count is at most the bound (padding runs counted, a repeated id after another is a new run)."""
    rng = np.random.default_rng(0)
    rows = np.cumsum(rng.random((6, 24)) < np.linspace(0.05, 0.6, 6)[:, None], axis=1) % 3  # id 0 = padding
    runs = runs_per_row(rows)
    for bound in (2, 5, 8, 12):
        _, _, fits = packed_segments(jnp.asarray(rows), bound)
        np.testing.assert_array_equal(np.asarray(fits), runs <= bound)


def test_model_passes_its_segment_bound_to_attention(monkeypatch):
    """`attention_max_segments` (settable as --config.model.overrides=attention_max_segments=N) reaches `attend`."""
    from flax import nnx

    from qwen_jax import attention as attention_ops
    from qwen_jax.config import ConfigError, config_from_dict
    from qwen_jax.model import Qwen
    from qwen_jax.presets import get_preset

    seen = []
    real_attend = attention_ops.attend

    def spy(*a, **kw):
        seen.append(kw["max_segments"])
        return real_attend(*a, **kw)

    monkeypatch.setattr(attention_ops, "attend", spy)
    ids = jnp.ones((1, 8), jnp.int32)
    seg = jnp.asarray([[1] * 5 + [0] * 3], jnp.int32)
    for bound, expected in ((0, None), (24, 24)):
        cfg = config_from_dict(get_preset("tiny"), vocab_size=64, attention_max_segments=bound)
        jax.eval_shape(lambda cfg=cfg: Qwen(cfg, rngs=nnx.Rngs(0))(ids, segment_ids=seg))  # tracing is enough
        assert seen[-1] == expected
    with pytest.raises(ConfigError, match="attention_max_segments"):
        config_from_dict(get_preset("tiny"), attention_max_segments=-1)
