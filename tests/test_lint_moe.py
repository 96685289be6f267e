"""qwen-lint's mixture-of-experts rules (QL-MOE-01..05) on the published MoE configs and their mistakes."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import pytest

from qwen_jax import lint as lc
from qwen_jax.presets import get_preset

ROOT = Path(__file__).resolve().parents[1]
MOE_PRESETS = ["qwen1.5-moe-a2.7b", "qwen2-57b-a14b", "qwen2-57b-a14b-instruct", "qwen3-30b-a3b", "qwen3-235b-a22b"]


def moe_findings(tmp_path, config) -> set[tuple[str, str, str]]:
    """{(rule, severity, key)} of the QL-MOE findings for a folder holding `config`."""
    (tmp_path / "config.json").write_text(json.dumps(config, indent=2))
    found = lc.lint_folder(str(tmp_path)).findings
    assert all(f.rule in lc.RULES and f.line >= 1 for f in found)
    return {(f.rule, f.severity, f.key) for f in found if f.rule.startswith("QL-MOE")}


@pytest.mark.parametrize("name", MOE_PRESETS)
def test_published_configs_are_clean(tmp_path, name):
    assert moe_findings(tmp_path, get_preset(name)) == set()


@pytest.mark.parametrize("preset,patch,expected", [
    ("qwen3-30b-a3b", {"num_experts": 0}, {("QL-MOE-01", "error", "num_experts")}),
    ("qwen3-30b-a3b", {"num_experts_per_tok": "8"}, {("QL-MOE-01", "error", "num_experts_per_tok")}),
    ("qwen3-30b-a3b", {"num_experts_per_tok": 129}, {("QL-MOE-02", "error", "num_experts_per_tok")}),
    ("qwen1.5-moe-a2.7b", {"moe_intermediate_size": 0}, {("QL-MOE-03", "error", "moe_intermediate_size")}),
    ("qwen1.5-moe-a2.7b", {"shared_expert_intermediate_size": -1},
     {("QL-MOE-03", "error", "shared_expert_intermediate_size")}),
    ("qwen3-30b-a3b", {"mlp_only_layers": [0, 48]}, {("QL-MOE-04", "error", "mlp_only_layers")}),
    ("qwen3-30b-a3b", {"mlp_only_layers": "0"}, {("QL-MOE-04", "error", "mlp_only_layers")}),
    ("qwen3-30b-a3b", {"mlp_only_layers": [3, 3]}, {("QL-MOE-04", "warning", "mlp_only_layers")}),
    ("qwen2-57b-a14b", {"decoder_sparse_step": 0}, {("QL-MOE-05", "error", "decoder_sparse_step")}),
    ("qwen2-57b-a14b", {"decoder_sparse_step": 29}, {("QL-MOE-05", "warning", "decoder_sparse_step")}),
    ("qwen2-57b-a14b", {"num_hidden_layers": 2, "max_window_layers": 2, "mlp_only_layers": [0, 1]},
     {("QL-MOE-05", "warning", "decoder_sparse_step")}),
])
def test_mistakes_are_flagged(tmp_path, preset, patch, expected):
    assert moe_findings(tmp_path, {**get_preset(preset), **patch}) == expected


def test_transformers_v5_expert_count_key(tmp_path):
    """transformers v5 writes Qwen3-MoE's expert count as num_local_experts; the rules read it."""
    config = get_preset("qwen3-30b-a3b")
    del config["num_experts"]
    assert moe_findings(tmp_path, {**config, "num_local_experts": 128}) == set()
    assert moe_findings(tmp_path, {**config, "num_local_experts": 4}) == {
        ("QL-MOE-02", "error", "num_experts_per_tok")}


def test_dense_configs_are_not_checked(tmp_path):
    config = {**get_preset("qwen2.5-7b"), "num_experts_per_tok": 99, "num_experts": 2}
    assert moe_findings(tmp_path, config) == set()


def test_cli_exit_status_and_message(tmp_path):
    (tmp_path / "config.json").write_text(json.dumps({**get_preset("qwen3-30b-a3b"), "num_experts_per_tok": 200},
                                                     indent=2))
    run = subprocess.run([sys.executable, str(ROOT / "tools" / "lint_config.py"), str(tmp_path)],
                         capture_output=True, text=True, timeout=60)
    assert run.returncode == 1
    assert "config.json:" in run.stdout and "error QL-MOE-02 num_experts_per_tok 200 > num_experts 128" in run.stdout


def test_rules_are_documented():
    for doc in (ROOT / "docs" / "lint.md", ROOT / "README.md"):
        text = doc.read_text()
        for rule in lc.RULES.values():
            if rule.id.startswith("QL-MOE"):
                assert f"| `{rule.id}` | {rule.severity} | {rule.title} |" in text, (doc, rule.id)
