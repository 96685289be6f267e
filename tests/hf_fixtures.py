"""Tiny real Hugging Face checkpoints made with transformers (`save_pretrained`), for parity tests."""

from __future__ import annotations

import numpy as np
import torch
from transformers import (
    Qwen2Config,
    Qwen2ForCausalLM,
    Qwen2MoeConfig,
    Qwen2MoeForCausalLM,
    Qwen3Config,
    Qwen3ForCausalLM,
    Qwen3MoeConfig,
    Qwen3MoeForCausalLM,
)

MODEL_CLASSES = {"qwen2": (Qwen2Config, Qwen2ForCausalLM), "qwen3": (Qwen3Config, Qwen3ForCausalLM),
                 "qwen2_moe": (Qwen2MoeConfig, Qwen2MoeForCausalLM), "qwen3_moe": (Qwen3MoeConfig, Qwen3MoeForCausalLM)}

TINY = dict(vocab_size=256, hidden_size=64, intermediate_size=96, num_hidden_layers=3, num_attention_heads=4,
            num_key_value_heads=2, max_position_embeddings=128, rope_theta=10000.0, tie_word_embeddings=False,
            initializer_range=0.1)  # larger than HF's 0.02: logits O(10), sharp attention


def make_hf_model(folder, *, model_type="qwen2", seed=0, dtype=torch.float32, max_shard_size=None, **overrides):
    """Build a random transformers model, perturb its norms/biases so nothing is trivially 1 or 0, save it."""
    torch.manual_seed(seed)
    kwargs = {**TINY, **overrides}
    if model_type.startswith("qwen3"):
        kwargs.setdefault("head_dim", 16)
    config_cls, cls = MODEL_CLASSES[model_type]
    config = config_cls(**kwargs)
    config._attn_implementation = "eager"
    model = cls(config).eval()
    with torch.no_grad():
        for name, p in model.named_parameters():
            if name.endswith("bias") or "norm" in name or name.endswith("mlp.gate.weight"):
                p.add_(0.1 * torch.randn_like(p))
    model = model.to(dtype)
    save_kwargs = {"max_shard_size": max_shard_size} if max_shard_size else {}
    model.save_pretrained(folder, **save_kwargs)
    return model


def hf_logits(model, ids: np.ndarray, position_ids: np.ndarray | None = None) -> np.ndarray:
    with torch.no_grad():
        kwargs = {} if position_ids is None else {"position_ids": torch.as_tensor(position_ids)}
        return model(torch.as_tensor(ids), **kwargs).logits.float().numpy()


def random_ids(batch, seq, vocab=256, seed=0) -> np.ndarray:
    return np.random.default_rng(seed).integers(0, vocab, (batch, seq)).astype(np.int64)


def make_chat_model(folder, *, seed=0):
    """A tiny model with Qwen's real vocabulary and tokenizer files (the CLIs read text), tied embeddings."""
    import os
    import shutil

    from qwen_jax.data.tokenization import bundled_tokenizer_dir

    model = make_hf_model(folder, seed=seed, vocab_size=151936, hidden_size=32, intermediate_size=48,
                          num_hidden_layers=2, num_attention_heads=4, num_key_value_heads=2,
                          tie_word_embeddings=True, initializer_range=0.3, eos_token_id=151645)
    src = bundled_tokenizer_dir()
    for name in os.listdir(src):
        if name.startswith("tokenizer") or name in ("vocab.json", "merges.txt"):
            shutil.copy(os.path.join(src, name), os.path.join(folder, name))
    return model
