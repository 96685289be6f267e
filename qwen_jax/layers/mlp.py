"""SwiGLU feed-forward: down(silu(gate(x)) * up(x)), no biases."""

from __future__ import annotations

import jax
import jax.numpy as jnp
from flax import nnx

from qwen_jax.layers.linear import Linear
from qwen_jax.sharding import constrain


class MLP(nnx.Module):
    """`fused=True` (generation only, built by `with_fused_gate_up`): one `gate_up_proj` [embed, 2, mlp]
    instead of gate/up_proj, so a decode step runs one matmul instead of two; the stacked axis is
    unsharded and `mlp` keeps its tensor sharding."""

    def __init__(self, dim: int, hidden: int, *, init_std: float, dtype, param_dtype, rngs: nnx.Rngs,
                 fused: bool = False):
        kw = dict(use_bias=False, init_std=init_std, dtype=dtype, param_dtype=param_dtype, rngs=rngs)
        self.shape = (dim, hidden)
        self.fused = fused
        if fused:
            self.gate_up_proj = Linear((dim,), (2, hidden), in_axes=("embed",), out_axes=(None, "mlp"), **kw)
        else:
            self.gate_proj = Linear((dim,), (hidden,), in_axes=("embed",), out_axes=("mlp",), **kw)
            self.up_proj = Linear((dim,), (hidden,), in_axes=("embed",), out_axes=("mlp",), **kw)
        self.down_proj = Linear((hidden,), (dim,), in_axes=("mlp",), out_axes=("embed",), **kw)

    def __call__(self, x):
        if self.fused:
            gate_up = self.gate_up_proj(x)
            h = jax.nn.silu(gate_up[..., 0, :]) * gate_up[..., 1, :]
        else:
            h = jax.nn.silu(self.gate_proj(x)) * self.up_proj(x)
        h = constrain(h, ("batch", "length", "act_mlp"))
        return constrain(self.down_proj(h), ("batch", "length", "act_embed"))

    def with_fused_gate_up(self) -> MLP:
        """This MLP with gate/up_proj stacked into one `gate_up_proj` (same values; for decoding).
        An MLP carrying low-rank adapters is returned as is (see `Attention.with_fused_qkv`)."""
        if self.fused or self.gate_proj.lora_a is not None or self.up_proj.lora_a is not None:
            return self
        gate = self.gate_proj.kernel.value
        fused = nnx.eval_shape(lambda: MLP(*self.shape, init_std=0.0, dtype=self.gate_proj.dtype,
                                           param_dtype=gate.dtype, rngs=nnx.Rngs(0), fused=True))
        fused.gate_up_proj.kernel.value = constrain(jnp.stack([gate, self.up_proj.kernel.value], axis=1),
                                                    ("embed", None, "mlp"))
        fused.down_proj = self.down_proj
        return fused
