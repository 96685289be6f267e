"""Command-line tools for qwen_jax (config linter, checkpoint converter)."""
