#!/usr/bin/env python3
"""`qwen-lint` as a plain script: the pre-commit hook's entry (`language: script`, no install) and
``python -m tools.lint_config``.  The linter is the package `qwen_jax.lint` (standard library only)."""

import os
import sys

if not __package__:  # run as a file: import the qwen_jax next to this script, not an installed one
    sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

from qwen_jax.lint.cli import entry, main  # noqa: E402

__all__ = ["main"]

if __name__ == "__main__":
    entry()
