"""QL-DCA: Dual Chunk Attention (`dual_chunk_attention_config`, the Qwen2.5-1M models) as vLLM reads it
(docs/long_context.md §DCA)."""

from __future__ import annotations

from qwen_jax.lint.core import CONFIG, ERROR, INFO, WARNING, is_int
from qwen_jax.lint.facts import KNOWN_ROPE_TYPES
from qwen_jax.lint.rope import rope_view
from qwen_jax.lint.rules import DCA_01, DCA_02, DCA_03


def check_dca(ctx):
    cfg, f = ctx.cfg, ctx.folder
    if cfg is None or cfg.get("dual_chunk_attention_config") is None:
        return
    d = cfg["dual_chunk_attention_config"]
    path = ("dual_chunk_attention_config",)
    src, p, _, _ = rope_view(cfg)
    kind = None if p is None else p.get("rope_type", p.get("type", "default"))
    if isinstance(kind, str) and kind in KNOWN_ROPE_TYPES and kind not in ("default", "mrope"):
        f.add(DCA_02, ERROR, CONFIG, path,
              f"dual_chunk_attention_config together with {kind} scaling: vLLM ignores the scaling under DCA, "
              "transformers ignores DCA, so the two runtimes compute different attention",
              f"remove {src} (DCA uses plain RoPE)")
    if not isinstance(d, dict):
        return  # QL-JSON-03
    cs, ls = d.get("chunk_size"), d.get("local_size")
    for key, v in (("chunk_size", cs), ("local_size", ls)):
        if v is None:
            f.add(DCA_01, ERROR, CONFIG, path,
                  f"dual_chunk_attention_config has no {key}: vLLM's DCA rotary embedding requires it",
                  f"add {key} (Qwen2.5-1M: chunk_size 262144, local_size 8192)")
        elif is_int(v) and v <= 0:
            f.add(DCA_01, ERROR, CONFIG, path + (key,), f"dual_chunk_attention_config.{key} {v} is not "
                  "positive", "use the released values (chunk_size 262144, local_size 8192)")
    if is_int(cs) and is_int(ls) and cs > 0 and ls > 0 and ls >= cs:
        f.add(DCA_01, ERROR, CONFIG, path + ("local_size",),
              f"local_size {ls} >= chunk_size {cs}: the intra-chunk length chunk_size - local_size is not positive",
              "local_size must be smaller than chunk_size")
    if is_int(cs) and ctx.mpe is not None and cs > ctx.mpe:
        f.add(DCA_01, WARNING, CONFIG, path + ("chunk_size",),
              f"chunk_size {cs} > max_position_embeddings {ctx.mpe}: DCA never splits the input",
              "use a chunk_size below the context length")
    if "original_max_position_embeddings" not in d:
        f.add(DCA_01, INFO, CONFIG, path,
              "dual_chunk_attention_config has no original_max_position_embeddings: vLLM disables the "
              "length-dependent attention scaling", "add original_max_position_embeddings (262144 for Qwen2.5-1M)")
    f.add(DCA_03, INFO, CONFIG, path,
          "dual_chunk_attention_config is read by vLLM only: transformers runs plain full attention",
          "serve long inputs with vLLM")
