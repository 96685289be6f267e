"""Fused chunked cross-entropy: values and gradients against autodiff of the unfused loss, memory, eval path."""

from __future__ import annotations

import re

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from qwen_jax import sharding
from qwen_jax.trainer.loss import fused_cross_entropy, logsumexp_one_pass, reference_loss

B, T, E, V = 3, 40, 16, 50


def inputs(dtype=jnp.float32, seed=0):
    rng = np.random.default_rng(seed)
    h = jnp.asarray(rng.normal(size=(B, T, E)), dtype)
    w = jnp.asarray(rng.normal(size=(E, V)) / 2, jnp.float32)
    tgt = jnp.asarray(rng.integers(0, V, (B, T)), jnp.int32)
    mask = jnp.asarray(rng.random((B, T)) > 0.3, jnp.float32)  # ~30% masked tokens
    return h, w, tgt, mask


def unfused(h, w, tgt, mask, z_weight):
    """Straightforward full-logits (objective, nll, z) sums; its jax autodiff is the reference gradient."""
    logits = jnp.einsum("bte,ev->btv", h, w.astype(h.dtype), preferred_element_type=jnp.float32)
    lse = jax.nn.logsumexp(logits, axis=-1)
    target_logit = jnp.take_along_axis(logits, tgt[..., None], axis=-1)[..., 0]
    nll = jnp.sum((lse - target_logit) * mask)
    z = jnp.sum(jnp.square(lse) * mask)
    return nll + z_weight * z, nll, z


def fused(h, w, tgt, mask, chunk, z_weight, vocab_major=False):
    return fused_cross_entropy(h, w, tgt, mask, chunk_size=chunk, z_weight=z_weight, vocab_major=vocab_major)


def assert_close(a, b, rtol):
    """Elementwise, relative to the largest reference entry (gradients have entries near zero)."""
    a, b = np.asarray(a, np.float64), np.asarray(b, np.float64)
    np.testing.assert_allclose(a, b, rtol=rtol, atol=rtol * np.abs(b).max())


# chunk 7 and 16 do not divide T = 40 (padded last chunk); 64 > T is clipped to one chunk
@pytest.mark.parametrize("chunk,z_weight", [(7, 0.0), (7, 1e-4), (16, 0.1), (64, 1e-4)])
def test_values_and_grads_match_autodiff_of_unfused(chunk, z_weight):
    h, w, tgt, mask = inputs()
    got = fused(h, w, tgt, mask, chunk, z_weight)
    want = unfused(h, w, tgt, mask, z_weight)
    for a, b in zip(got, want, strict=True):
        np.testing.assert_allclose(a, b, rtol=1e-5)
    logits = jnp.einsum("bte,ev->btv", h, w)
    np.testing.assert_allclose(got[1] / mask.sum(), reference_loss(logits, tgt, mask), rtol=1e-5)

    g = jax.grad(lambda h, w: fused(h, w, tgt, mask, chunk, z_weight)[0], (0, 1))(h, w)
    g_ref = jax.grad(lambda h, w: unfused(h, w, tgt, mask, z_weight)[0], (0, 1))(h, w)
    for a, b in zip(g, g_ref, strict=True):
        assert a.dtype == b.dtype == jnp.float32
        assert_close(a, b, 1e-5)


@pytest.mark.parametrize("shape,scale", [((3, 7), 1.0), ((2, 5, 1000), 30.0), ((2, 4099), 1e3)])
def test_logsumexp_one_pass_equals_two_pass(shape, scale):
    x = jnp.asarray(np.random.default_rng(3).normal(size=shape) * scale, jnp.float32)
    np.testing.assert_allclose(jax.jit(logsumexp_one_pass)(x), jax.nn.logsumexp(x, axis=-1), rtol=1e-6)
    # -inf entries, ties, a row of equal values, a row with one finite value, +inf, nan
    edge = jnp.array([[-jnp.inf, 1.0, 2.0, -jnp.inf], [5.0, 5.0, 5.0, 5.0], [-jnp.inf, -jnp.inf, -3.0, -jnp.inf],
                      [1.0, jnp.inf, -jnp.inf, 0.0], [1.0, jnp.nan, 2.0, 3.0]])
    np.testing.assert_allclose(logsumexp_one_pass(edge), jax.nn.logsumexp(edge, axis=-1), rtol=1e-6)
    assert "reduce_max" not in str(jax.make_jaxpr(logsumexp_one_pass)(x))  # one (variadic) reduction


def test_logsumexp_one_pass_accumulates_bf16_in_float32():
    """A vocab-sized bf16 row: a bf16 running sum would stop growing long before 151,936 terms."""
    x = jnp.asarray(np.random.default_rng(4).normal(size=(2, 151936)), jnp.bfloat16)
    got = jax.jit(logsumexp_one_pass)(x)
    assert got.dtype == jnp.float32
    np.testing.assert_allclose(got, jax.nn.logsumexp(x.astype(jnp.float32), axis=-1), rtol=1e-5)  # sum order


def test_only_the_objective_is_differentiable():
    """nll and z come through stop_gradient: their cotangents are zero, so the custom bwd may ignore them."""
    h, w, tgt, mask = inputs()
    zw = 1e-2

    def mixed(h, w):  # nll and z must contribute nothing to the gradient
        obj, nll, z = fused(h, w, tgt, mask, 7, zw)
        return 0.5 * obj + 3.0 * nll - 2.0 * z + nll * z

    g = jax.grad(mixed, (0, 1))(h, w)
    g_ref = jax.grad(lambda h, w: 0.5 * unfused(h, w, tgt, mask, zw)[0], (0, 1))(h, w)
    for a, b in zip(g, g_ref, strict=True):
        assert_close(a, b, 1e-5)
    for i in (1, 2):
        for gi in jax.grad(lambda h, w, i=i: fused(h, w, tgt, mask, 7, zw)[i], (0, 1))(h, w):
            assert not np.any(np.asarray(gi))

    # integer targets get a float0 cotangent, the mask a zero one
    _, vjp = jax.vjp(lambda h, w, t, m: fused(h, w, t, m, 7, zw)[0], h, w, tgt, mask)
    _, _, d_tgt, d_mask = vjp(jnp.float32(1.0))
    assert d_tgt.dtype == jax.dtypes.float0 and d_tgt.shape == tgt.shape
    assert d_mask.shape == mask.shape and not np.any(np.asarray(d_mask))


def test_tied_embedding_gradient_flows_through_transpose():
    h, w, tgt, mask = inputs()
    emb = w.T  # [vocab, embed]
    g = jax.grad(lambda e: fused(h, e.T, tgt, mask, 16, 1e-4)[0])(emb)
    g_ref = jax.grad(lambda e: unfused(h, e.T, tgt, mask, 1e-4)[0])(emb)
    assert g.shape == emb.shape
    assert_close(g, g_ref, 1e-5)


def test_vocab_major_projection_equals_transposed():
    """vocab_major=True (the tied embedding as stored, [vocab, embed]): same values and gradients as w_out = emb.T,
    with the gradient computed in [vocab, embed] layout (no transpose in the jaxpr)."""
    h, w, tgt, mask = inputs(seed=2)
    emb = w.T

    def vm(h, e):
        return fused(h, e, tgt, mask, 16, 1e-4, vocab_major=True)[0]

    got = jax.value_and_grad(vm, (0, 1))(h, emb)
    want = jax.value_and_grad(lambda h, e: unfused(h, e.T, tgt, mask, 1e-4)[0], (0, 1))(h, emb)
    np.testing.assert_allclose(got[0], want[0], rtol=1e-5)
    for a, b in zip(got[1], want[1], strict=True):
        assert a.shape == b.shape
        assert_close(a, b, 1e-5)
    jaxpr = str(jax.make_jaxpr(jax.grad(vm, 1))(h, emb))
    assert f"[{E},{V}]" not in jaxpr  # no [embed, vocab] array anywhere: no transpose of W or of its gradient
    assert f"[{E},{V}]" in str(jax.make_jaxpr(jax.grad(lambda h, e: fused(h, e.T, tgt, mask, 16, 1e-4)[0], 1))(h, emb))


def test_projection_of_the_wrong_layout_is_an_error():
    h, w, tgt, mask = inputs()
    with pytest.raises(ValueError, match=r"w_out \(16, 50\) is not \[vocab, embed\].*vocab_major=True"):
        fused(h, w, tgt, mask, 16, 0.0, vocab_major=True)
    with pytest.raises(ValueError, match=r"is not \[embed, vocab\]"):
        fused(h, w.T, tgt, mask, 16, 0.0)


def test_bf16_hidden_with_f32_weights():
    """bf16 compute (hidden, weights cast, dlogits cast), f32 accumulation: within bf16 tolerance of f32 autodiff."""
    h, w, tgt, mask = inputs(jnp.bfloat16)
    (obj, g_h, g_w) = _value_and_grads(h, w, tgt, mask, 7, 1e-4)
    assert g_h.dtype == jnp.bfloat16 and g_w.dtype == jnp.float32
    # reference: the same bf16-rounded inputs, everything else in float32
    w16 = w.astype(jnp.bfloat16).astype(jnp.float32)
    ref_obj = unfused(h.astype(jnp.float32), w16, tgt, mask, 1e-4)[0]
    r_h, r_w = jax.grad(lambda h, w: unfused(h, w, tgt, mask, 1e-4)[0], (0, 1))(h.astype(jnp.float32), w16)
    np.testing.assert_allclose(obj, ref_obj, rtol=1e-5)  # bf16 matmul inputs, f32 accumulation: exact-ish
    for a, b in ((g_h, r_h), (g_w, r_w)):
        a = np.asarray(a, np.float32)
        assert np.linalg.norm(a - b) / np.linalg.norm(b) < 1e-2


def _value_and_grads(h, w, tgt, mask, chunk, z_weight):
    obj, (g_h, g_w) = jax.value_and_grad(lambda h, w: fused(h, w, tgt, mask, chunk, z_weight)[0], (0, 1))(h, w)
    return obj, g_h, g_w


@pytest.mark.parametrize("dtype", [jnp.float32, jnp.bfloat16])
def test_grad_never_builds_full_logits(dtype):
    """No [batch, seq, vocab]-sized array anywhere in the jaxpr of the loss and its full gradient."""
    b, t, e, v = 2, 256, 8, 1000
    h, w = jnp.ones((b, t, e), dtype), jnp.ones((e, v))
    tgt, mask = jnp.zeros((b, t), jnp.int32), jnp.ones((b, t))
    jaxpr = str(jax.make_jaxpr(lambda h, w: _value_and_grads(h, w, tgt, mask, 32, 1e-4))(h, w))
    shapes = re.findall(r"(?:f32|bf16)\[([\d,]+)\]", jaxpr)
    assert shapes and all(int(np.prod([int(x) for x in s.split(",")])) < b * t * v for s in shapes)
    assert "f32[2,32,1000]" in jaxpr  # the chunk's logits do exist


def test_matmul_count_eval_vs_grad():
    """Eval runs the custom_vjp primal: 1 vocab matmul per chunk; with grad 3 (logits, d_hidden, dW), none in bwd."""
    h, w, tgt, mask = inputs()
    eval_jaxpr = str(jax.make_jaxpr(lambda h, w: fused(h, w, tgt, mask, 7, 1e-4))(h, w))
    grad_jaxpr = str(jax.make_jaxpr(lambda h, w: _value_and_grads(h, w, tgt, mask, 7, 1e-4))(h, w))
    assert eval_jaxpr.count("scan[") == 1 and eval_jaxpr.count("dot_general") == 1
    assert grad_jaxpr.count("scan[") == 1 and grad_jaxpr.count("dot_general") == 3


@pytest.mark.parametrize("vocab_major", [False, True])
def test_sharded_grads_match_unsharded(vocab_major):
    """Under a (data, fsdp, tensor) mesh, with the logits and dW sharding constraints active."""
    h, w, tgt, mask = inputs(seed=1)
    h, tgt, mask = h[:2], tgt[:2], mask[:2]  # batch 2 over data*fsdp = 2
    w = w.T if vocab_major else w

    def value_and_grads(h, w):
        return jax.value_and_grad(lambda h, w: fused(h, w, tgt, mask, 16, 1e-4, vocab_major)[0], (0, 1))(h, w)

    ref = value_and_grads(h, w)
    mesh = sharding.make_mesh({"data": 1, "fsdp": 2, "tensor": 2, "seq": 2})
    with jax.set_mesh(mesh):
        got = jax.jit(value_and_grads)(h, w)
    assert_close(got[0], ref[0], 1e-5)
    for a, b in zip(got[1], ref[1], strict=True):
        assert_close(a, b, 1e-5)
