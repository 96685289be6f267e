"""Section references into docs/long_context.md (`§Name` in code, tests and docs) name sections that exist, and
nothing points outside the repository."""

from __future__ import annotations

import re
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]


def repo_text_files():
    for folder in ("qwen_jax", "tests", "tools", "docs", "configs", "benchmarks"):
        for path in (ROOT / folder).rglob("*"):
            if path.suffix in (".py", ".md") and "fixtures" not in path.parts and path != Path(__file__).resolve():
                yield path
    yield from (ROOT / name for name in ("README.md", "ARCHITECTURE.md", "BUILD.md"))


def test_long_context_section_references_exist():
    doc = (ROOT / "docs" / "long_context.md").read_text()
    sections = set(re.findall(r"^#+ §([\w-]+)", doc, re.M))
    assert {"RoPE", "RoPE-config", "YaRN", "DCA", "DCA-example", "LSE-merge", "Ring", "Zigzag"} <= sections
    refs = {}
    for path in repo_text_files():
        for name in re.findall(r"§([A-Za-z][\w-]*[A-Za-z])", path.read_text(encoding="utf-8")):
            refs.setdefault(name, path.relative_to(ROOT))
    missing = {name: str(where) for name, where in refs.items() if name not in sections}
    assert not missing, missing
    assert len(refs) >= 10


def test_no_references_to_an_external_spec():
    pattern = re.compile(r"shared/spec|long-context\.md|spec §|\.\./shared")
    hits = [str(p.relative_to(ROOT)) for p in repo_text_files() if pattern.search(p.read_text(encoding="utf-8"))]
    assert not hits, hits
