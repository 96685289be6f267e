"""`python -m qwen_jax.lint`: the `qwen-lint` command."""

from qwen_jax.lint.cli import entry

entry()
