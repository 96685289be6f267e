"""RMSNorm, computed in float32 as transformers' Qwen2RMSNorm does."""

from __future__ import annotations

import jax
import jax.numpy as jnp
from flax import nnx

from qwen_jax.layers.common import ones, param


class RMSNorm(nnx.Module):
    """y = weight * (x * rsqrt(mean(x^2) + eps)).astype(x.dtype); statistics in float32.

    The normalised value is cast back to the input dtype *before* the weight multiply,
    matching transformers bit for bit in bf16.
    """

    def __init__(self, dim: int, eps: float, *, param_dtype, rngs: nnx.Rngs, axes=("norm",)):
        self.eps = eps
        self.scale = param(rngs, ones, (dim,), axes, param_dtype)

    def __call__(self, x):
        x32 = x.astype(jnp.float32)
        variance = jnp.mean(x32 * x32, axis=-1, keepdims=True)
        normed = (x32 * jax.lax.rsqrt(variance + self.eps)).astype(x.dtype)
        return self.scale.value.astype(x.dtype) * normed
