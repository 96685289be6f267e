"""Grouped-query self-attention block: projections, optional q/k RMSNorm (Qwen3), RoPE, kernel, output.

The attention *computation* lives in `qwen_jax.attention` behind one interface; this module
only owns the parameters and the rotation, so every backend sees the same q/k/v.
"""

from __future__ import annotations

from flax import nnx

from qwen_jax import attention as attention_ops
from qwen_jax.config import QwenConfig
from qwen_jax.layers.linear import Linear
from qwen_jax.layers.normalization import RMSNorm
from qwen_jax.rope import apply_rope
from qwen_jax.sharding import constrain


class Attention(nnx.Module):
    def __init__(self, cfg: QwenConfig, *, dtype, param_dtype, rngs: nnx.Rngs):
        e, h, kv, d = cfg.hidden_size, cfg.num_attention_heads, cfg.num_key_value_heads, cfg.head_dim
        kw = dict(init_std=cfg.initializer_range, dtype=dtype, param_dtype=param_dtype, rngs=rngs)
        self.cfg = cfg
        self.q_proj = Linear((e,), (h, d), in_axes=("embed",), out_axes=("heads", "head_dim"),
                             use_bias=cfg.attention_bias, **kw)
        self.k_proj = Linear((e,), (kv, d), in_axes=("embed",), out_axes=("kv_heads", "head_dim"),
                             use_bias=cfg.attention_bias, **kw)
        self.v_proj = Linear((e,), (kv, d), in_axes=("embed",), out_axes=("kv_heads", "head_dim"),
                             use_bias=cfg.attention_bias, **kw)
        # Qwen2: no o_proj bias ever; Qwen3: o_proj follows attention_bias.
        self.o_proj = Linear((h, d), (e,), in_axes=("heads", "head_dim"), out_axes=("embed",),
                             use_bias=cfg.family == "qwen3" and cfg.attention_bias, **kw)
        if cfg.qk_norm:
            self.q_norm = RMSNorm(d, cfg.rms_norm_eps, param_dtype=param_dtype, rngs=rngs, axes=("head_dim",))
            self.k_norm = RMSNorm(d, cfg.rms_norm_eps, param_dtype=param_dtype, rngs=rngs, axes=("head_dim",))

    def __call__(self, x, *, rope, positions, segment_ids, sliding_window, impl):
        """x [batch, seq, embed]; rope = (cos, sin) tables or a DCA context; returns [batch, seq, embed]."""
        q = constrain(self.q_proj(x), ("batch", "length", "act_heads", None))
        k = constrain(self.k_proj(x), ("batch", "length", "act_kv_heads", None))
        v = constrain(self.v_proj(x), ("batch", "length", "act_kv_heads", None))
        if self.cfg.qk_norm:
            q, k = self.q_norm(q), self.k_norm(k)
        if isinstance(rope, attention_ops.DcaContext):
            out = attention_ops.dca(q, k, v, ctx=rope, positions=positions, segment_ids=segment_ids,
                                    impl=impl, block_size=self.cfg.attention_block_size)
        else:
            cos, sin = rope
            q, k = apply_rope(q, cos, sin), apply_rope(k, cos, sin)
            out = attention_ops.attend(q, k, v, impl=impl, segment_ids=segment_ids, sliding_window=sliding_window,
                                       block_size=self.cfg.attention_block_size)
        out = constrain(out, ("batch", "length", "act_heads", None))
        return self.o_proj(out)
