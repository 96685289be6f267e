"""Blockwise (online-softmax, recomputing custom_vjp) attention == dense reference attention.

Reference: `qwen_jax.attention.reference.xla_attention` (docs/long_context.md §Checks).  Float32, relative error
(max |a - b| / max |b|) <= 1e-5 for out, lse and the gradients dq, dk, dv.
"""

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from attention_helpers import make_qkv, rel_err

from qwen_jax.attention import attend
from qwen_jax.attention.blockwise import BlockAux, BlockSpec, block_attention, blockwise_attention
from qwen_jax.attention.reference import xla_attention

TOL = 1e-5






def packed_segments(b, t, seed=0):
    """Sorted random document ids with a padding tail of id 0 (the trainer's convention)."""
    rng = np.random.default_rng(seed)
    seg = np.sort(rng.integers(1, 5, (b, t)), axis=1)
    seg[:, t - 5:] = 0
    return jnp.asarray(seg, jnp.int32)


def out_lse_and_grads(fn, q, k, v, seed=1):
    """fn -> (out, lse); returns out, lse and the vjp of a random cotangent on both."""
    (out, lse), vjp = jax.vjp(fn, q, k, v)
    rng = np.random.default_rng(seed)
    dout = jnp.asarray(rng.standard_normal(out.shape), jnp.float32)
    dlse = jnp.asarray(rng.standard_normal(lse.shape), jnp.float32)
    dlse = jnp.where(jnp.isfinite(lse), dlse, 0.0)
    return out, lse, vjp((dout, dlse))


CASES = {
    "causal": dict(h=4, kv=4),
    "gqa2": dict(h=4, kv=2),
    "gqa1": dict(h=4, kv=1),
    "segments": dict(h=4, kv=2, segments=True),
    "window": dict(h=4, kv=2, window=5),
    "segments_window": dict(h=4, kv=1, segments=True, window=9),
}


@pytest.mark.parametrize("case", list(CASES))
def test_blockwise_matches_reference(case):
    c = CASES[case]
    b, t, d, block = 2, 37, 8, 8  # seq not a multiple of the block
    q, k, v = make_qkv(b, t, c["h"], c["kv"], d)
    kw = dict(segment_ids=packed_segments(b, t) if c.get("segments") else None, sliding_window=c.get("window"))

    @jax.jit
    def run(q, k, v):
        got = out_lse_and_grads(lambda q, k, v: blockwise_attention(q, k, v, block_size=block, return_lse=True, **kw),
                                q, k, v)
        want = out_lse_and_grads(lambda q, k, v: xla_attention(q, k, v, return_lse=True, **kw), q, k, v)
        return got, want

    (o, lse, grads), (ro, rlse, rgrads) = run(q, k, v)
    assert o.shape == q.shape and lse.shape == (b, t, c["h"])
    assert rel_err(o, ro) <= TOL
    assert rel_err(lse, rlse) <= TOL
    for g, rg, x in zip(grads, rgrads, (q, k, v), strict=True):
        assert g.shape == x.shape
        assert rel_err(g, rg) <= TOL


def test_block_larger_than_seq_and_dispatch():
    q, k, v = make_qkv(1, 12, 2, 1, 16, seed=3)
    ref = xla_attention(q, k, v)
    assert rel_err(blockwise_attention(q, k, v, block_size=512), ref) <= TOL
    assert rel_err(attend(q, k, v, impl="blockwise", block_size=5), ref) <= TOL


def test_fully_masked_rows_give_zero_output_and_grads():
    """A cross block (ring-like) where the first 8 queries see no key: out 0, lse -inf, no NaN."""
    b, t, h, kv, d = 1, 16, 2, 1, 8
    q, k, v = make_qkv(b, t, h, kv, d, seed=4)
    idx = jnp.arange(t, dtype=jnp.int32)
    aux = BlockAux(q_index=idx, kv_index=idx + 8)
    spec = BlockSpec(scale=d**-0.5, block_q=4, block_k=4)
    o, lse, grads = out_lse_and_grads(lambda q, k, v: block_attention((q,), k, v, aux, spec), q, k, v)
    ro, rlse, rgrads = out_lse_and_grads(lambda q, k, v: xla_attention(q, k, v, q_offset=-8, return_lse=True), q, k, v)
    assert np.all(np.asarray(o[:, :8]) == 0) and np.all(np.isneginf(np.asarray(lse[:, :8])))
    assert rel_err(o, ro) <= TOL
    np.testing.assert_array_equal(np.isneginf(lse), np.isneginf(rlse))
    fin = np.isfinite(np.asarray(rlse))
    assert rel_err(np.asarray(lse)[fin], np.asarray(rlse)[fin]) <= TOL
    for g, rg in zip(grads, rgrads, strict=True):
        g = np.asarray(g)
        assert np.all(np.isfinite(g))
        assert rel_err(g, rg) <= TOL
    assert np.all(np.asarray(grads[0])[:, :8] == 0)  # dq of fully masked rows


def test_no_quadratic_residuals():
    """Neither the forward nor the custom_vjp residuals hold a T x T array (O(T * block) memory)."""
    t, block = 256, 32
    q, k, v = make_qkv(1, t, 2, 1, 8)
    def top_level_shapes(fn):
        jaxpr = jax.make_jaxpr(jax.grad(lambda q, k, v: fn(q, k, v).sum(), argnums=(0, 1, 2)))(q, k, v)
        return [getattr(var.aval, "shape", ()) for eqn in jaxpr.jaxpr.eqns for var in eqn.outvars]

    def quadratic(shape):
        return sum(1 for s in shape if s >= t) >= 2

    assert any(quadratic(s) for s in top_level_shapes(xla_attention))  # the check can see T x T arrays
    assert not any(quadratic(s) for s in top_level_shapes(lambda q, k, v: blockwise_attention(q, k, v,
                                                                                              block_size=block)))
