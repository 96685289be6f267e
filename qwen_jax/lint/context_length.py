"""QL-CTX: a context window longer than the model was trained for, with plain (unscaled, non-DCA) RoPE."""

from __future__ import annotations

import math

from qwen_jax.lint.core import CONFIG, ERROR, WARNING, is_num
from qwen_jax.lint.facts import CHAT_CONTEXT, RELEASED_STATIC_WINDOW
from qwen_jax.lint.rope import rope_view
from qwen_jax.lint.rules import CTX_01, CTX_02


def check_context_length(ctx):
    cfg = ctx.cfg
    if cfg is None:
        return
    _, p, theta, _ = rope_view(cfg)
    mpe, qwen = ctx.mpe, ctx.family is not None
    dca = cfg.get("dual_chunk_attention_config")
    plain = p is None or p.get("rope_type", p.get("type")) in ("default", "mrope", None)
    beyond = qwen and dca is None and bool(mpe) and plain and _check_trained_window(ctx, mpe, theta)
    if p is None and not beyond and qwen and dca is None and is_num(theta) and math.isclose(theta, 1e6) and mpe:
        limit = CHAT_CONTEXT if ctx.chat_model else 131072
        if mpe > limit:
            kind = "chat model was tuned at 32768" if ctx.chat_model else "released base models stop at 131072"
            ctx.folder.add(CTX_01, WARNING, CONFIG, ("max_position_embeddings",),
                           f"max_position_embeddings {mpe} with static RoPE and no rope_scaling: the {kind}; "
                           "positions past that produce garbage",
                           f"set max_position_embeddings to {32768 if ctx.chat_model else 131072}, or add "
                           'rope_scaling {"rope_type": "yarn", "factor": 4.0, "original_max_position_embeddings": '
                           "32768}")


def _check_trained_window(ctx, mpe, theta):
    """QL-CTX-02: a context far beyond any released Qwen's window with plain RoPE is an error (the classic case: a
    1M model whose dual_chunk_attention_config was deleted so that a runtime without DCA starts)."""
    limit = RELEASED_STATIC_WINDOW[ctx.family]
    if mpe <= limit:
        return False
    looks_1m = mpe > 2 * limit and is_num(theta) and theta >= 5e6
    ctx.folder.add(
        CTX_02, ERROR, CONFIG, ("max_position_embeddings",),
        f"max_position_embeddings {mpe} with plain RoPE (no rope scaling, no dual_chunk_attention_config) is far "
        f"beyond any released {'Qwen2/2.5' if ctx.family == 'qwen2' else 'Qwen3'} window ({limit}): attention "
        "past the trained length produces garbage"
        + (" (a 1M-context model whose dual_chunk_attention_config was removed?)" if looks_1m else ""),
        "restore dual_chunk_attention_config (1M models) or YaRN rope scaling, or set max_position_embeddings to "
        f"at most {limit}")
    return True
