"""SwiGLU feed-forward: down(silu(gate(x)) * up(x)), no biases."""

from __future__ import annotations

import jax
from flax import nnx

from qwen_jax.layers.linear import Linear
from qwen_jax.sharding import constrain


class MLP(nnx.Module):
    def __init__(self, dim: int, hidden: int, *, init_std: float, dtype, param_dtype, rngs: nnx.Rngs):
        kw = dict(use_bias=False, init_std=init_std, dtype=dtype, param_dtype=param_dtype, rngs=rngs)
        self.gate_proj = Linear((dim,), (hidden,), in_axes=("embed",), out_axes=("mlp",), **kw)
        self.up_proj = Linear((dim,), (hidden,), in_axes=("embed",), out_axes=("mlp",), **kw)
        self.down_proj = Linear((hidden,), (dim,), in_axes=("mlp",), out_axes=("embed",), **kw)

    def __call__(self, x):
        h = jax.nn.silu(self.gate_proj(x)) * self.up_proj(x)
        h = constrain(h, ("batch", "length", "act_mlp"))
        return constrain(self.down_proj(h), ("batch", "length", "act_embed"))
