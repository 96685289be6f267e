"""qwen_jax: Qwen2 / Qwen2.5 / Qwen3 in JAX/Flax NNX.

Public surface (kept stable):

    model = qwen_jax.from_pretrained(path, dtype=..., param_dtype=..., mesh=None, **config_overrides)
    logits = model(input_ids, positions=None, segment_ids=None)   # [batch, seq, vocab]
    new_ids = qwen_jax.generate(model, prompts, max_new_tokens=..., temperature=0.0, top_k=0, top_p=1.0,
                                stop_ids=None, seed=0)                # list[list[int]]
"""

from qwen_jax.config import ConfigError, QwenConfig, config_from_dict, load_hf_config
from qwen_jax.generation import generate
from qwen_jax.hf.models import from_pretrained, load_model
from qwen_jax.hf.safetensors_io import CheckpointError
from qwen_jax.model import Qwen

__all__ = [
    "CheckpointError",
    "ConfigError",
    "Qwen",
    "QwenConfig",
    "config_from_dict",
    "from_pretrained",
    "generate",
    "load_model",
    "load_hf_config",
]
