"""`fused_adamw` (what `make_optimizer` returns) == the optax chain built from optax's own parts.

Same parameters, same gradients, several steps with global-norm clipping both active and not,
weight-decay mask, whole-leaf and partial-layer freezing: parameters and AdamW moments agree to
float32 rounding, frozen values stay bit-identical and wholly frozen leaves hold no state.
"""

import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest

from configs.base import get_config
from qwen_jax.trainer import optimizer as opt

L = 3


def make_params(rng):
    def arr(*shape):
        return jnp.asarray(rng.standard_normal(shape), jnp.float32)

    return {"embed_tokens": {"embedding": arr(11, 4)},
            "layers": {"mlp": {"up_proj": {"kernel": arr(L, 4, 6)}},
                       "self_attn": {"q_proj": {"kernel": arr(L, 4, 2, 2), "bias": arr(L, 2, 2)}},
                       "input_layernorm": {"scale": arr(L, 4)}},
            "norm": {"scale": arr(4)}}


@pytest.mark.parametrize("freeze,freeze_layers", [("", 0), (r"q_proj/kernel", 1)])
def test_fused_adamw_equals_optax_chain(freeze, freeze_layers):
    rng = np.random.default_rng(0)
    params = make_params(rng)
    c = get_config().optimizer
    c.learning_rate, c.warmup_steps, c.grad_clip, c.weight_decay = 1e-2, 2, 1.0, 0.1
    spec = opt.resolve_freeze(params, freeze=freeze, freeze_layers=freeze_layers)
    fused, schedule = opt.make_optimizer(params, c, 10, spec)
    chain = opt.optax_chain(params, c, schedule, spec)

    def run(tx):
        p, state = params, tx.init(params)
        step = jax.jit(lambda p, s, g: (lambda u, s: (optax.apply_updates(p, u), s))(*tx.update(g, s, p)))
        for i in range(4):
            # steps 0 and 2: gradients with norm >> clip (clipping active); 1 and 3: norm << clip
            g_rng = np.random.default_rng(100 + i)
            size = 10.0 if i % 2 == 0 else 1e-3
            grads = {path: jnp.asarray(g_rng.standard_normal(x.shape) * size, jnp.float32)
                     for path, x in opt.flat_params(params).items()}
            grads = jax.tree_util.tree_unflatten(jax.tree.structure(params), list(grads.values()))
            p, state = step(p, state, grads)
        return p, state

    (p_f, s_f), (p_c, s_c) = run(fused), run(chain)
    for (path, a), b in zip(jax.tree_util.tree_leaves_with_path(p_f), jax.tree.leaves(p_c), strict=True):
        np.testing.assert_allclose(a, b, rtol=2e-6, atol=1e-7, err_msg=opt.path_str(path))
    # moments: the chain keeps them inside its (clip, multi_transform(adamw)) state
    chain_adam = [x for x in jax.tree.leaves(s_c, is_leaf=lambda x: isinstance(x, optax.ScaleByAdamState))
                  if isinstance(x, optax.ScaleByAdamState)][0]
    mu_c = {opt.path_str(p): x for p, x in jax.tree_util.tree_leaves_with_path(chain_adam.mu)}
    mu_f = {opt.path_str(p): x for p, x in jax.tree_util.tree_leaves_with_path(s_f.mu)}
    assert set(mu_f) == set(mu_c)  # wholly frozen leaves: no state in either
    for k in mu_f:
        np.testing.assert_allclose(mu_f[k], mu_c[k], rtol=2e-6, atol=1e-9, err_msg=k)
    assert int(s_f.count) == 4
    # frozen values bit-identical, the rest moved
    before = opt.flat_params(params)
    for path, new in opt.flat_params(p_f).items():
        n = spec.frozen.get(path, 0)
        old = np.asarray(before[path])
        if n == opt.ALL:
            assert np.array_equal(old, new) and path not in mu_f, path
        elif n:
            assert np.array_equal(old[:n], new[:n]) and not np.array_equal(old[n:], new[n:]), path
        else:
            assert not np.array_equal(old, new), path
    if freeze:
        assert "layers/self_attn/q_proj/kernel" not in mu_f and "embed_tokens/embedding" not in mu_f


def test_fused_adamw_needs_params():
    params = make_params(np.random.default_rng(1))
    tx, _ = opt.make_optimizer(params, get_config().optimizer, 10, opt.resolve_freeze(params))
    with pytest.raises(ValueError, match="params"):
        tx.update(params, tx.init(params))
