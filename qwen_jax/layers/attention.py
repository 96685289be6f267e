"""Grouped-query self-attention block: projections, optional q/k RMSNorm (Qwen3), RoPE, kernel, output.

The attention *computation* lives in `qwen_jax.attention` behind one interface; this module
only owns the parameters and the rotation, so every backend sees the same q/k/v.
"""

from __future__ import annotations

import jax.numpy as jnp
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


def fuse_qkv(q, k, v, kv_heads: int):
    """q [..., heads, d], k and v [..., kv_heads, d] -> [..., kv_heads, group + 2, d]: per kv head, its
    `group` query heads, then its key, then its value (query head h reads kv head h // group)."""
    lead = q.shape[:-2]
    q = q.reshape(*lead, kv_heads, q.shape[-2] // kv_heads, q.shape[-1])
    return jnp.concatenate([q, k[..., None, :], v[..., None, :]], axis=-2)


class Attention(nnx.Module):
    """`fused_qkv=True` (generation only, built by `with_fused_qkv`): one `qkv_proj` [embed, kv_heads,
    group + 2, head_dim] instead of q/k/v_proj, so a decode step runs one matmul (and one bias add)
    instead of three.  Grouped per kv head, so a tensor axis shards it over kv heads like the cache."""

    def __init__(self, cfg: QwenConfig, *, dtype, param_dtype, rngs: nnx.Rngs, fused_qkv: bool = False):
        e, h, kv, d = cfg.hidden_size, cfg.num_attention_heads, cfg.num_key_value_heads, cfg.head_dim
        kw = dict(init_std=cfg.initializer_range, dtype=dtype, param_dtype=param_dtype, rngs=rngs)
        self.cfg = cfg
        self.fused_qkv = fused_qkv
        if fused_qkv:
            self.qkv_proj = Linear((e,), (kv, h // kv + 2, d), in_axes=("embed",),
                                   out_axes=("kv_heads", None, "head_dim"), use_bias=cfg.attention_bias, **kw)
        else:
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
        q, k, v = self._project_fused(x) if self.fused_qkv else self._project(x)
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

    def _project_fused(self, x):
        """`_project` through the one `qkv_proj` matmul."""
        g = self.cfg.num_attention_heads // self.cfg.num_key_value_heads
        qkv = self.qkv_proj(x)  # [batch, t, kv_heads, group + 2, head_dim]
        q = qkv[..., :g, :].reshape(*qkv.shape[:2], -1, qkv.shape[-1])
        q = constrain(q, ("batch", "length", "act_heads", None))
        k = constrain(qkv[..., g, :], ("batch", "length", "act_kv_heads", None))
        v = constrain(qkv[..., g + 1, :], ("batch", "length", "act_kv_heads", None))
        if self.cfg.qk_norm:
            q, k = self.q_norm(q), self.k_norm(k)
        return q, k, v

    def with_fused_qkv(self) -> Attention:
        """This block with q/k/v_proj concatenated into one `qkv_proj` (same values; for decoding).

        Without low-rank adapters only (an adapter's A/B factors cannot be concatenated into
        one projection without forming their product): a block carrying one is returned as is."""
        projections = (self.q_proj, self.k_proj, self.v_proj)
        if self.fused_qkv or any(p.lora_a is not None for p in projections):
            return self
        kernel = self.q_proj.kernel.value
        fused = nnx.eval_shape(lambda: Attention(self.cfg, dtype=self.q_proj.dtype, param_dtype=kernel.dtype,
                                                 rngs=nnx.Rngs(0), fused_qkv=True))
        kv = self.cfg.num_key_value_heads
        fused.qkv_proj.kernel.value = constrain(fuse_qkv(*(p.kernel.value for p in projections), kv),
                                                ("embed", "kv_heads", None, "head_dim"))
        if self.cfg.attention_bias:
            fused.qkv_proj.bias.value = fuse_qkv(*(p.bias.value for p in projections), kv)
        fused.o_proj = self.o_proj
        if self.cfg.qk_norm:
            fused.q_norm, fused.k_norm = self.q_norm, self.k_norm
        return fused
