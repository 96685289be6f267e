"""qwen_jax: Qwen2 / Qwen2.5 / Qwen3 in JAX/Flax NNX.

Public surface (kept stable):

    model = qwen_jax.from_pretrained(path, dtype=..., param_dtype=..., mesh=None, **config_overrides)
    logits = model(input_ids, positions=None, segment_ids=None)   # [batch, seq, vocab]
    new_ids = qwen_jax.generate(model, prompts, max_new_tokens=..., temperature=0.0, top_k=0, top_p=1.0,
                                stop_ids=None, seed=0)                # list[list[int]]

The names below are imported on first access (PEP 562), so that `import qwen_jax.lint` (the standard-library
config linter, run by the pre-commit hook) loads no jax, flax or numpy.  `qwen_jax.generate` is the function of
`qwen_jax.generation`; once the CLI module `qwen_jax.generate` is imported, Python binds the module to that
attribute instead, and the module is callable with the same arguments (see qwen_jax/generate.py).
"""

import importlib
import importlib.util

_EXPORTS = {
    "CheckpointError": "qwen_jax.hf.safetensors_io",
    "ConfigError": "qwen_jax.config",
    "Qwen": "qwen_jax.model",
    "QwenConfig": "qwen_jax.config",
    "config_from_dict": "qwen_jax.config",
    "from_pretrained": "qwen_jax.hf.models",
    "generate": "qwen_jax.generation",
    "load_model": "qwen_jax.hf.models",
    "load_hf_config": "qwen_jax.config",
}

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


def __getattr__(name):
    if name in _EXPORTS:
        value = getattr(importlib.import_module(_EXPORTS[name]), name)
        globals()[name] = value  # later lookups are plain attribute reads
        return value
    # Submodules stay reachable as attributes (`qwen_jax.config.QwenConfig` after `import qwen_jax`), as they were
    # when this file imported them eagerly.
    if name.isidentifier() and importlib.util.find_spec(f"{__name__}.{name}") is not None:
        return importlib.import_module(f"{__name__}.{name}")
    raise AttributeError(f"module {__name__!r} has no attribute {name!r}")


def __dir__():
    return sorted(set(globals()) | set(__all__))
