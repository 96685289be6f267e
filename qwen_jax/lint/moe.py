"""QL-MOE: the mixture-of-experts keys of qwen2_moe / qwen3_moe configs, read as transformers builds the model."""

from __future__ import annotations

from qwen_jax.lint.core import CONFIG, ERROR, WARNING, is_int
from qwen_jax.lint.facts import MOE_MODEL_TYPES
from qwen_jax.lint.rules import MOE_01, MOE_02, MOE_03, MOE_04, MOE_05


def check_moe(ctx):
    """Mixture-of-experts keys of qwen2_moe / qwen3_moe configs (transformers' defaults when absent)."""
    cfg, f = ctx.cfg, ctx.folder
    mt = cfg.get("model_type") if cfg is not None else None
    if mt not in MOE_MODEL_TYPES:
        return
    qwen2 = mt == "qwen2_moe"
    key = "num_experts" if "num_experts" in cfg or "num_local_experts" not in cfg else "num_local_experts"
    experts = cfg.get(key, 60 if qwen2 else 128)
    top_k = cfg.get("num_experts_per_tok", 4 if qwen2 else 8)
    for name, v in ((key, experts), ("num_experts_per_tok", top_k)):
        if not (is_int(v) and v > 0):
            f.add(MOE_01, ERROR, CONFIG, (name,), f"{name} {v!r} is not a positive integer",
                  "the released configs use num_experts 60/64/128 and num_experts_per_tok 4/8")
    if is_int(experts) and is_int(top_k) and 0 < experts < top_k:
        f.add(MOE_02, ERROR, CONFIG, ("num_experts_per_tok",),
              f"num_experts_per_tok {top_k} > {key} {experts}: a token cannot use more experts than exist",
              f"set num_experts_per_tok <= {experts}")
    sizes = [("moe_intermediate_size", cfg.get("moe_intermediate_size", 1408 if qwen2 else 768))]
    if qwen2:
        sizes.append(("shared_expert_intermediate_size", cfg.get("shared_expert_intermediate_size", 5632)))
    for name, v in sizes:
        if not (is_int(v) and v > 0):
            f.add(MOE_03, ERROR, CONFIG, (name,), f"{name} {v!r} is not a positive integer",
                  "the per-expert SwiGLU width (e.g. 1408 for Qwen1.5-MoE-A2.7B, 768 for Qwen3-30B-A3B)")
    layers = cfg.get("num_hidden_layers") if is_int(cfg.get("num_hidden_layers")) else None
    mlp_only = cfg.get("mlp_only_layers") or []
    if not isinstance(mlp_only, list) or not all(is_int(i) for i in mlp_only):
        f.add(MOE_04, ERROR, CONFIG, ("mlp_only_layers",), f"mlp_only_layers {mlp_only!r} is not a list of "
              "layer indices", "a list of integers such as [] or [0, 1]")
        mlp_only = []
    elif layers is not None and any(not 0 <= i < layers for i in mlp_only):
        outside = sorted({i for i in mlp_only if not 0 <= i < layers})
        f.add(MOE_04, ERROR, CONFIG, ("mlp_only_layers",),
              f"mlp_only_layers {outside} outside the model's layers 0..{layers - 1}: transformers ignores them",
              f"use indices in [0, {layers})")
    elif len(set(mlp_only)) != len(mlp_only):
        f.add(MOE_04, WARNING, CONFIG, ("mlp_only_layers",), "mlp_only_layers repeats a layer index",
              "list each dense layer once")
    step = cfg.get("decoder_sparse_step", 1)
    if not (is_int(step) and step >= 1):
        f.add(MOE_05, ERROR, CONFIG, ("decoder_sparse_step",),
              f"decoder_sparse_step {step!r} must be an integer >= 1 (layer i is sparse when (i + 1) % step == 0)",
              "1 makes every layer sparse (all released Qwen MoE models)")
    elif layers is not None and not any((i + 1) % step == 0 and i not in mlp_only for i in range(layers)):
        f.add(MOE_05, WARNING, CONFIG, ("decoder_sparse_step",),
              f"no layer is sparse (decoder_sparse_step {step}, mlp_only_layers {mlp_only}): the experts are never "
              "used", "lower decoder_sparse_step or shorten mlp_only_layers")
