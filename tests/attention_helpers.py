"""Shared helpers of the attention tests (blockwise, ring, DCA)."""

from __future__ import annotations

import jax.numpy as jnp
import numpy as np


def rel_err(a, b) -> float:
    """max |a - b| / max |b|, in float64."""
    a, b = np.asarray(a, np.float64), np.asarray(b, np.float64)
    return float(np.abs(a - b).max() / max(np.abs(b).max(), 1e-30))


def make_qkv(b, t, h, kv, d, seed=0):
    """Random float32 q [b, t, h, d] and k, v [b, t, kv, d]."""
    rng = np.random.default_rng(seed)
    return tuple(jnp.asarray(rng.standard_normal(s), jnp.float32) for s in ((b, t, h, d), (b, t, kv, d), (b, t, kv, d)))
