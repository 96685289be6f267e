"""Gradients of the model: the unrolled path (custom-VJP `unstack_layers`) against lax.scan's autodiff."""

from __future__ import annotations

import re

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from flax import nnx

from qwen_jax.config import config_from_dict
from qwen_jax.model import Qwen, unstack_layers
from qwen_jax.presets import get_preset
from qwen_jax.trainer.loss import model_loss_sums


def test_unstack_layers_backward_is_a_stack_of_the_layer_cotangents():
    rng = np.random.default_rng(0)
    stacked = {"w": jnp.asarray(rng.normal(size=(4, 3, 2)), jnp.float32),
               "b": jnp.asarray(rng.normal(size=(4, 5)), jnp.float32)}

    def loss(layers):  # every layer used differently; layer 2 not at all (its cotangent is zero)
        return sum(jnp.sum(jnp.sin(lay["w"]) * (i + 1)) + jnp.sum(lay["b"] ** 3) for i, lay in enumerate(layers)
                   if i != 2)

    got = jax.grad(lambda t: loss(unstack_layers(t)))(stacked)
    want = jax.grad(lambda t: loss([jax.tree.map(lambda a, i=i: a[i], t) for i in range(4)]))(stacked)
    for k in stacked:
        np.testing.assert_array_equal(got[k], want[k])
    assert not np.any(np.asarray(got["w"][2])) and np.all(np.asarray(got["w"][0]) != 0)
    jaxpr = str(jax.make_jaxpr(jax.grad(lambda t: loss(unstack_layers(t))))(stacked))
    # one stack per leaf, not a sum of zero-padded slices
    assert "pad[" not in jaxpr and ("stack[" in jaxpr or "concatenate[" in jaxpr)
    naive = str(jax.make_jaxpr(jax.grad(lambda t: loss([jax.tree.map(lambda a, i=i: a[i], t) for i in range(4)])))(
        stacked))
    assert "pad[" in naive or "dynamic_update_slice" in naive  # what the custom VJP replaces


def test_unstack_layers_rejects_mismatched_layer_axes():
    with pytest.raises(ValueError, match="leading"):
        unstack_layers({"a": jnp.zeros((3, 2)), "b": jnp.zeros((4,))})


@pytest.mark.parametrize("remat", ["none", "full"])
def test_unrolled_and_scanned_layers_give_the_same_gradients(remat):
    """Three layers, the last two with a sliding window (two layer groups), unrolled (with and without remat)
    against lax.scan's autodiff; unrolled, the gradient of the stack is assembled without any pad."""
    raw = get_preset("tiny")
    raw.update(vocab_size=256, num_hidden_layers=3, use_sliding_window=True, sliding_window=5, max_window_layers=1)
    rng = np.random.default_rng(1)
    ids = jnp.asarray(rng.integers(0, 256, (2, 13)), jnp.int32)  # 12 positions: loss chunks of 4, no padding
    batch = {"input_ids": ids[:, :-1], "targets": ids[:, 1:], "loss_mask": jnp.ones((2, 12), jnp.float32)}
    grads = {}
    jaxprs = {}
    for scan in (False, True):
        cfg = config_from_dict(raw, dtype="float32", attention="xla", scan_layers=scan,
                               remat="none" if scan else remat)
        assert cfg.layer_window(0) is None and cfg.layer_window(2) == 5
        graphdef, params = nnx.split(Qwen(cfg, rngs=nnx.Rngs(0)), nnx.Param)

        def loss(p, graphdef=graphdef):
            return model_loss_sums(nnx.merge(graphdef, p), batch, chunk_size=4)[0]

        grads[scan] = nnx.to_pure_dict(jax.jit(jax.grad(loss))(params))
        jaxprs[scan] = str(jax.make_jaxpr(jax.grad(loss))(params))
    stack_pad = re.compile(r"f32\[3,[\d,]*\] = pad\[")  # a zero-padded cotangent of a [3 layers, ...] parameter
    assert not stack_pad.search(jaxprs[False]) and stack_pad.search(jaxprs[True])  # scanned groups' slices do pad
    flat_u = jax.tree_util.tree_leaves_with_path(grads[False])
    flat_s = jax.tree.leaves(grads[True])
    assert len(flat_u) == len(flat_s) > 10
    for (path, a), b in zip(flat_u, flat_s, strict=True):
        a, b = np.asarray(a), np.asarray(b)
        assert np.abs(b).max() > 0, path
        np.testing.assert_allclose(a, b, rtol=1e-5, atol=1e-6 * np.abs(b).max(), err_msg=str(path))
