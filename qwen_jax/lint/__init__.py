"""`qwen-lint`: the config linter for Qwen2 / Qwen2.5 / Qwen3 model folders (docs/lint.md).

Reads ``config.json``, ``generation_config.json`` and ``tokenizer_config.json`` (plus the chat template and the
head of ``tokenizer.json`` where present) and reports the mismatches that make a checkpoint misbehave at run time:
RoPE / YaRN / DCA / sliding-window settings, the effective stop-token set, special-token ids, the vocabulary size
and the MoE keys.  The rules follow how transformers (v4 and v5) and vLLM read these files.

Layout: `rules` is the registry (every rule's id, family, severities, title, fix); one module per family emits
its findings by registry entry (`json_syntax`, `rope`, `context_length`, `dca`, `sliding_window`, `moe`, `eos`,
`tokens`, `vocab`, `general`); `core` holds the finding, the JSON reader with key locations and the folder model;
`linter.lint_folder` runs the families, `fix` applies --fix, `cli.main` is the command.

Standard library only: importing it loads no jax, numpy, torch or transformers (the package `qwen_jax` imports
its model code lazily), so the pre-commit hook stays fast.
"""

from qwen_jax.lint.cli import main
from qwen_jax.lint.core import CONFIG, GENCONFIG, KNOWN_FILES, SEV_RANK, TOKCONFIG, Finding
from qwen_jax.lint.linter import lint_folder
from qwen_jax.lint.rules import RULES, Rule, fixes_markdown, rules_markdown

__all__ = ["CONFIG", "GENCONFIG", "KNOWN_FILES", "RULES", "SEV_RANK", "TOKCONFIG", "Finding", "Rule", "fixes_markdown",
           "lint_folder", "main", "rules_markdown"]
