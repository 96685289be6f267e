"""QL-GEN: what the folder lacks for the other rules to run."""

from __future__ import annotations

from qwen_jax.lint.core import CONFIG, INFO, KNOWN_FILES
from qwen_jax.lint.rules import GEN_01


def check_general(ctx):
    folder = ctx.folder
    if ctx.cfg is None and folder.files[CONFIG] is None:
        name = next(n for n in KNOWN_FILES if folder.files[n] is not None)
        folder.add(GEN_01, INFO, name, (), "no config.json in this folder: token ids not checked against the "
                   "model", "lint the model folder")
