"""A general dense layer: contracts the trailing `in_shape` dims of x with a kernel [*in, *out].

Multi-dimensional kernels (e.g. q_proj [embed, heads, head_dim]) keep heads as their own
axis, so tensor parallelism shards heads without reshapes.
"""

from __future__ import annotations

import jax
from flax import nnx

from qwen_jax.layers.common import normal, param, zeros


class Linear(nnx.Module):
    def __init__(self, in_shape: tuple, out_shape: tuple, *, in_axes: tuple, out_axes: tuple, use_bias: bool,
                 init_std: float, dtype, param_dtype, rngs: nnx.Rngs):
        self.dtype = dtype
        self.n_in = len(in_shape)
        self.kernel = param(rngs, normal(init_std), (*in_shape, *out_shape), (*in_axes, *out_axes), param_dtype)
        self.bias = param(rngs, zeros, tuple(out_shape), tuple(out_axes), param_dtype) if use_bias else None

    def __call__(self, x):
        kernel = self.kernel.value.astype(self.dtype)
        contract = (tuple(range(x.ndim - self.n_in, x.ndim)), tuple(range(self.n_in)))
        out = jax.lax.dot_general(x.astype(self.dtype), kernel, (contract, ((), ())))
        if self.bias is not None:
            out = out + self.bias.value.astype(self.dtype)
        return out.astype(self.dtype)


