"""`lint_folder`: every rule family over one model folder."""

from __future__ import annotations

from qwen_jax.lint.context_length import check_context_length
from qwen_jax.lint.core import SEV_RANK, Context, Folder
from qwen_jax.lint.dca import check_dca
from qwen_jax.lint.eos import check_eos
from qwen_jax.lint.general import check_general
from qwen_jax.lint.json_syntax import check_files
from qwen_jax.lint.moe import check_moe
from qwen_jax.lint.rope import check_rope
from qwen_jax.lint.sliding_window import check_sliding_window
from qwen_jax.lint.tokens import check_tokens
from qwen_jax.lint.vocab import check_vocab

# Each check returns at once when the files it reads are absent or unparsable (QL-JSON reports those).
CHECKS = (check_rope, check_context_length, check_dca, check_sliding_window, check_moe, check_general, check_vocab,
          check_tokens, check_eos)


def lint_folder(path):
    """The parsed folder at `path` with its findings, sorted by file, line, severity (worst first) and rule."""
    folder = Folder(path)
    check_files(folder)
    if all(jf is None for jf in folder.files.values()):
        return folder
    ctx = Context(folder)
    for check in CHECKS:
        check(ctx)
    folder.findings.sort(key=lambda x: (x.file, x.line, -SEV_RANK[x.severity], x.rule))
    return folder
