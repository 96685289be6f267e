"""The full model with ring attention on a `seq` mesh equals the reference model: logits and gradients."""

from __future__ import annotations

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from flax import nnx
from hf_fixtures import make_hf_model, random_ids

import qwen_jax
from qwen_jax.attention.ring import to_zigzag
from qwen_jax.model import ring_size
from qwen_jax.sharding import make_mesh


def loss_and_grads(model, ids, positions, segments, weights, zigzag=False):
    graphdef, state = nnx.split(model)

    def loss_fn(state):
        m = nnx.merge(graphdef, state)
        logits = m.logits(m.hidden_states(ids, positions, segments, zigzag=zigzag))
        return jnp.sum(jax.nn.log_softmax(logits) * weights) / weights.shape[1]

    return jax.jit(jax.value_and_grad(loss_fn))(state)


@pytest.fixture(scope="module")
def folder(tmp_path_factory):
    path = tmp_path_factory.mktemp("ring_model")
    make_hf_model(path, use_sliding_window=True, sliding_window=9, max_window_layers=2)
    return path


def test_ring_model_equals_reference_logits_and_grads(folder):
    n, t = 4, 32
    ids = jnp.asarray(random_ids(2, t), jnp.int32)
    segments = jnp.asarray(np.array([[1] * 20 + [2] * 12, [1] * 7 + [2] * 25]), jnp.int32)
    positions = jnp.asarray(np.array([list(range(20)) + list(range(12)), list(range(7)) + list(range(25))]), jnp.int32)
    weights = jnp.asarray(np.random.default_rng(0).standard_normal((2, t, 256)), jnp.float32)

    ref_model = qwen_jax.from_pretrained(folder)
    ref_logits = np.asarray(jax.jit(lambda m, *a: m(*a))(ref_model, ids, positions, segments))
    ref_loss, ref_grads = loss_and_grads(ref_model, ids, positions, segments, weights)

    mesh = make_mesh({"seq": n}, devices=jax.devices()[:n])
    ring_model = qwen_jax.from_pretrained(folder, mesh=mesh, attention="ring", attention_block_size=8)
    with jax.set_mesh(mesh):
        assert ring_size(ring_model.cfg) == n  # the ring really runs (not the single-device fallback)
        # natural-order inputs: the model permutes to zig-zag and back itself
        logits = np.asarray(jax.jit(lambda m, *a: m(*a))(ring_model, ids, positions, segments))
        # trainer path: everything permuted together beforehand (loss is order-invariant)
        z = lambda x: to_zigzag(x, n, axis=1)
        loss, grads = loss_and_grads(ring_model, z(ids), z(positions), z(segments), z(weights), zigzag=True)
    np.testing.assert_allclose(logits, ref_logits, rtol=0, atol=2e-5)
    assert float(loss) == pytest.approx(float(ref_loss), rel=1e-5)
    flat_ref = dict(nnx.to_flat_state(ref_grads))
    for path, g in nnx.to_flat_state(grads):
        r = np.asarray(flat_ref[path].value)
        err = np.linalg.norm(np.asarray(g.value) - r) / max(np.linalg.norm(r), 1e-30)
        assert err <= 1e-5, (path, err)


def test_zigzag_inputs_need_positions(folder):
    model = qwen_jax.from_pretrained(folder)
    with pytest.raises(ValueError, match="needs the permuted positions"):
        model.hidden_states(jnp.zeros((1, 8), jnp.int32), zigzag=True)
