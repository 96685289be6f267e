"""Token embedding; also serves as the output projection when embeddings are tied."""

from __future__ import annotations

import jax.numpy as jnp
from flax import nnx

from qwen_jax.layers.common import normal, param
from qwen_jax.sharding import constrain


class Embed(nnx.Module):
    def __init__(self, vocab: int, dim: int, *, init_std: float, dtype, param_dtype, rngs: nnx.Rngs):
        self.dtype = dtype
        self.embedding = param(rngs, normal(init_std), (vocab, dim), ("vocab", "embed"), param_dtype)

    def __call__(self, ids):
        out = jnp.take(self.embedding.value, ids, axis=0).astype(self.dtype)
        return constrain(out, ("batch", "length", "act_embed"))

    def attend(self, x):
        """Logits x @ embedding^T (tied lm_head), accumulated in float32."""
        w = self.embedding.value.astype(self.dtype)
        return jnp.einsum("bte,ve->btv", x, w, preferred_element_type=jnp.float32)
