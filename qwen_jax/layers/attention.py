"""Grouped-query self-attention block: projections, optional q/k RMSNorm (Qwen3), RoPE, kernel, output.

The attention *computation* lives in `qwen_jax.attention` behind one interface; this module
only owns the parameters and the rotation, so every backend sees the same q/k/v.
"""

from __future__ import annotations

from flax import nnx
from jax.ad_checkpoint import checkpoint_name

from qwen_jax import attention as attention_ops
from qwen_jax import kv_cache
from qwen_jax.config import QwenConfig
from qwen_jax.layers.linear import Linear
from qwen_jax.layers.normalization import RMSNorm
from qwen_jax.rope import apply_rope
from qwen_jax.sharding import constrain

# checkpoint names of the attention block's saved tensors: q, k, v (projected, before RoPE) and the
# attention output (the o_proj input); the decoder layer adds the residual after attention
ATTENTION_NAMES = ("attention_q", "attention_k", "attention_v", "attention_out")


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
        """x [batch, seq, embed]; rope = (cos, sin) tables or a DCA context; returns [batch, seq, embed].

        The projections and the attention output carry `checkpoint_name`s (ATTENTION_NAMES) so a
        remat policy (`model.remat=save_attention`) can keep them instead of recomputing them."""
        q, k, v = (checkpoint_name(a, n) for a, n in zip(self._project(x), ATTENTION_NAMES[:3], strict=True))
        if isinstance(rope, attention_ops.DcaContext):
            out = attention_ops.dca(q, k, v, ctx=rope, positions=positions, segment_ids=segment_ids,
                                    impl=impl, block_size=self.cfg.attention_block_size)
        else:
            cos, sin = rope
            q, k = apply_rope(q, cos, sin), apply_rope(k, cos, sin)
            out = attention_ops.attend(q, k, v, impl=impl, segment_ids=segment_ids, sliding_window=sliding_window,
                                       block_size=self.cfg.attention_block_size,
                                       max_segments=self.cfg.attention_max_segments or None)
        out = checkpoint_name(constrain(out, ("batch", "length", "act_heads", None)), ATTENTION_NAMES[3])
        return self.o_proj(out)

    def decode(self, x, *, rope, positions, cache, layer_cache, sliding_window):
        """Incremental attention: x [batch, t, embed] at the cache's next t slots.

        Writes this call's (rotated) keys and values into `layer_cache` = (keys, values) and
        attends over everything written so far (`qwen_jax.kv_cache`).  Returns (out, layer_cache).
        """
        q, k, v = self._project(x)
        if isinstance(rope, attention_ops.DcaContext):
            k = kv_cache.rotate_dca_keys(k, positions, rope)
        else:
            q, k = apply_rope(q, *rope), apply_rope(k, *rope)
        keys, values = (kv_cache.write(buf, new, cache.index) for buf, new in zip(layer_cache, (k, v), strict=True))
        if isinstance(rope, attention_ops.DcaContext):
            out = kv_cache.cached_dca_attention(q, keys, values, cache, positions=positions, ctx=rope)
        else:
            out = kv_cache.cached_attention(q, keys, values, cache, sliding_window=sliding_window)
        return self.o_proj(constrain(out, ("batch", "length", "act_heads", None))), (keys, values)

    def _project(self, x):
        q = constrain(self.q_proj(x), ("batch", "length", "act_heads", None))
        k = constrain(self.k_proj(x), ("batch", "length", "act_kv_heads", None))
        v = constrain(self.v_proj(x), ("batch", "length", "act_kv_heads", None))
        if self.cfg.qk_norm:
            q, k = self.q_norm(q), self.k_norm(k)
        return q, k, v
