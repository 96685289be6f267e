"""Parameter creation and dtype handling shared by the layers."""

from __future__ import annotations

import jax
import jax.numpy as jnp
from flax import nnx


def param(rngs: nnx.Rngs | None, init, shape, axes, param_dtype) -> nnx.Param:
    """An nnx.Param with its logical `axes` (read by qwen_jax.sharding) and storage dtype.

    `rngs=None` builds zeros/ones-free shapes lazily under nnx.eval_shape as well: callers
    always pass rngs; initialisers that need no key ignore it.
    """
    value = init(rngs.params() if rngs is not None else jax.random.key(0), shape, jnp.dtype(param_dtype))
    return nnx.Param(value, axes=tuple(axes))


def normal(stddev: float):
    return jax.nn.initializers.normal(stddev)


zeros = jax.nn.initializers.zeros
ones = jax.nn.initializers.ones
