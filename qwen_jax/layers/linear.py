"""A general dense layer: contracts the trailing `in_shape` dims of x with a kernel [*in, *out].

Multi-dimensional kernels (e.g. q_proj [embed, heads, head_dim]) keep heads as their own
axis, so tensor parallelism shards heads without reshapes.

A Linear may carry a low-rank adapter (LoRA, attached by `qwen_jax.lora`): `lora_a`
[*in, r] and `lora_b` [r, *out], float32, so the layer computes
`x W + scale * dropout(x) A B` without ever forming the [*in, *out] product.
"""

from __future__ import annotations

import jax
import jax.numpy as jnp
from flax import nnx

from qwen_jax.layers.common import normal, param, zeros


def lora_delta(x, a, b, *, scale: float, dtype, dropout: float = 0.0, key=None):
    """scale * (dropout(x) . A) . B, with A [*in, r] contracting the trailing dims of x and B [r, *out].

    As PEFT: dropout (inverted, rate `dropout`) on the adapter's input only, when a `key` is given
    (training); no key = deterministic.  Matmuls take compute-dtype inputs like the base kernel.
    """
    n_in = a.ndim - 1
    if dropout > 0.0 and key is not None:
        keep = jax.random.bernoulli(jax.random.wrap_key_data(key), 1.0 - dropout, x.shape)
        x = jnp.where(keep, x / (1.0 - dropout), jnp.zeros_like(x))
    contract = (tuple(range(x.ndim - n_in, x.ndim)), tuple(range(n_in)))
    h = jax.lax.dot_general(x.astype(dtype), a.astype(dtype), (contract, ((), ())))
    out = jax.lax.dot_general(h, b.astype(dtype), (((h.ndim - 1,), (0,)), ((), ())))
    return out * jnp.asarray(scale, dtype)


class Linear(nnx.Module):
    def __init__(self, in_shape: tuple, out_shape: tuple, *, in_axes: tuple, out_axes: tuple, use_bias: bool,
                 init_std: float, dtype, param_dtype, rngs: nnx.Rngs):
        self.dtype = dtype
        self.n_in = len(in_shape)
        self.kernel = param(rngs, normal(init_std), (*in_shape, *out_shape), (*in_axes, *out_axes), param_dtype)
        self.bias = param(rngs, zeros, tuple(out_shape), tuple(out_axes), param_dtype) if use_bias else None
        # LoRA (qwen_jax.lora.attach sets them): adapter Params, scale alpha/r, dropout rate and its key
        self.lora_a = nnx.data(None)
        self.lora_b = nnx.data(None)
        self.lora_key = nnx.data(None)
        self.lora_scale = 0.0
        self.lora_dropout = 0.0

    def __call__(self, x):
        kernel = self.kernel.value.astype(self.dtype)
        contract = (tuple(range(x.ndim - self.n_in, x.ndim)), tuple(range(self.n_in)))
        out = jax.lax.dot_general(x.astype(self.dtype), kernel, (contract, ((), ())))
        if self.bias is not None:
            out = out + self.bias.value.astype(self.dtype)
        if self.lora_a is not None:
            key = self.lora_key.value if self.lora_key is not None else None
            out = out + lora_delta(x, self.lora_a.value, self.lora_b.value, scale=self.lora_scale, dtype=self.dtype,
                                   dropout=self.lora_dropout, key=key)
        return out.astype(self.dtype)
