"""What the command lines (`qwen_jax.generate`, `qwen_jax.evaluate`, `qwen_jax.evals.niah`) share.

Bad input is a `UsageError`: the command prints one line `error: ...` naming the flag, file
(and line) or key, and exits with code 2, without a traceback.
"""

from __future__ import annotations

import argparse
import json
import os


class UsageError(Exception):
    """Bad command-line input: printed as one `error: ...` line, exit code 2."""


class Parser(argparse.ArgumentParser):
    """argparse, with its errors raised as `UsageError` (one line, exit 2) instead of usage + exit."""

    def error(self, message):
        raise UsageError(message)


def load_model(path: str, step: int | None, dtype: str, *, tokenizer: bool, **config_overrides):
    """(model, tokenizer or None) of a Hugging Face folder or checkpoints dir; bad paths are `UsageError`s.

    `config_overrides`: `QwenConfig` fields that replace the folder's (e.g. a RoPE scaling to evaluate with)."""
    from qwen_jax.config import ConfigError
    from qwen_jax.data.tokenization import has_tokenizer, load_tokenizer
    from qwen_jax.hf.models import load_model as load
    from qwen_jax.hf.safetensors_io import CheckpointError

    if not os.path.isdir(path):
        raise UsageError(f"--model {path}: not a directory")
    if tokenizer and not has_tokenizer(path):
        raise UsageError(f"--model {path}: no tokenizer files (tokenizer.json) in the folder")
    try:
        model = load(path, step, dtype=dtype, **config_overrides)
    except (ConfigError, CheckpointError) as e:
        raise UsageError(f"--model {path}: {e}") from None
    if not tokenizer:
        return model, None
    return model, load_tokenizer(os.path.abspath(path))


def read_jsonl(path: str, flag: str) -> list[tuple[int, object]]:
    """(line number, parsed value) of every non-empty line; a missing file or bad JSON is a `UsageError`."""
    try:
        with open(path, encoding="utf-8") as f:
            lines = f.readlines()
    except OSError as e:
        raise UsageError(f"{flag} {path}: {e.strerror}") from None
    out = []
    for n, line in enumerate(lines, 1):
        if not line.strip():
            continue
        try:
            out.append((n, json.loads(line)))
        except json.JSONDecodeError as e:
            raise UsageError(f"{flag} {path} line {n}: invalid JSON ({e.msg})") from None
    return out



