"""The rule registry of qwen-lint (qwen_jax/lint/rules.py) against the code that emits findings and the docs.

Both directions: every id the package can emit is a registry entry (no rule-id string outside the registry; each
family module emits only its own family's entries), and every registered rule has a minimal broken folder here
that fires it (at a severity the registry lists; its --fix, where the registry says there is one, clears it).
The docs tables are the registry's own output.
"""

from __future__ import annotations

import ast
import importlib
import io
import json
import os
import re
import subprocess
import sys
from contextlib import redirect_stdout
from pathlib import Path

import pytest
from test_lint_config import BASE, INSTRUCT, INSTRUCT_GEN, QWEN3, YARN, make

from qwen_jax import lint
from qwen_jax.lint import rules
from qwen_jax.lint.rules import RULES, Rule

ROOT = Path(__file__).resolve().parents[1]
LINT_DIR = ROOT / "qwen_jax" / "lint"
RULE_ID = re.compile(r"QL-[A-Z]+-\d+")
SEVERITIES = {"error", "warning", "info"}

NO_THETA = {k: v for k, v in INSTRUCT.items() if k != "rope_theta"}
MOE = dict(QWEN3, model_type="qwen3_moe", architectures=["Qwen3MoeForCausalLM"], num_experts=8,
           num_experts_per_tok=2, moe_intermediate_size=64)
DCA_1M = {"chunk_size": 262144, "local_size": 8192, "original_max_position_embeddings": 262144}

# rule id -> the smallest broken folder that fires it (arguments of test_lint_config.make)
FIRES = {
    "QL-JSON-01": dict(raw={"config.json": '{"model_type": "qwen2", "vocab_size": 151936, "vocab_size": 152064}'}),
    "QL-JSON-02": dict(raw={"config.json": '{"model_type": "qwen2",\n'}),
    "QL-JSON-03": dict(config=dict(INSTRUCT, max_position_embeddings="32768")),
    "QL-JSON-04": dict(raw={"config.json": json.dumps(INSTRUCT).replace('"rope_theta": 1000000.0',
                                                                       '"rope_theta": NaN')}),
    "QL-ROPE-01": dict(config=NO_THETA),
    "QL-ROPE-02": dict(config=dict(INSTRUCT, max_position_embeddings=131072, rope_scaling=dict(
        {k: v for k, v in YARN.items() if k != "rope_type"}, type="yarn"))),
    "QL-ROPE-03": dict(config=dict(INSTRUCT, rope_scaling=YARN)),
    "QL-ROPE-04": dict(config=dict(QWEN3, rope_scaling=dict(YARN, original_max_position_embeddings=40960))),
    "QL-ROPE-05": dict(config=dict(INSTRUCT, max_position_embeddings=131072, rope_scaling=YARN)),
    "QL-ROPE-06": dict(config=dict(INSTRUCT, max_position_embeddings=131072, rope_scaling=dict(YARN, type="linear"))),
    "QL-ROPE-07": dict(config=dict(INSTRUCT, max_position_embeddings=131072,
                                   rope_scaling={"rope_type": "yarn", "factor": 4.0})),
    "QL-ROPE-08": dict(config=dict(INSTRUCT, rope_scaling={"rope_type": "linear", "factor": 0.5})),
    "QL-ROPE-09": dict(config=dict(INSTRUCT, rope_scaling={"rope_type": "ntk-by-parts", "factor": 4.0})),
    "QL-ROPE-10": dict(config=dict(INSTRUCT, max_position_embeddings=131072,
                                   rope_scaling={"rope_type": "linear", "factor": 4.0})),
    "QL-ROPE-11": dict(config=dict(INSTRUCT, rope_parameters={"rope_type": "default", "rope_theta": 10000.0})),
    "QL-ROPE-12": dict(config=dict(INSTRUCT, rope_scaling={"rope_type": "yarn",
                                                           "original_max_position_embeddings": 32768})),
    "QL-ROPE-13": dict(config=dict(NO_THETA, rope_parameters={"rope_type": "default", "rope_theta": 1e6})),
    "QL-CTX-01": dict(config=dict(INSTRUCT, max_position_embeddings=131072)),
    "QL-CTX-02": dict(config=dict(INSTRUCT, max_position_embeddings=1010000, rope_theta=1e7)),
    "QL-DCA-01": dict(config=dict(INSTRUCT, max_position_embeddings=1010000, rope_theta=1e7,
                                  dual_chunk_attention_config={"local_size": 8192})),
    "QL-DCA-02": dict(config=dict(INSTRUCT, max_position_embeddings=131072, rope_scaling=YARN,
                                  dual_chunk_attention_config=DCA_1M)),
    "QL-DCA-03": dict(config=dict(INSTRUCT, max_position_embeddings=1010000, rope_theta=1e7,
                                  dual_chunk_attention_config=DCA_1M)),
    "QL-SWA-01": dict(config=dict(INSTRUCT, use_sliding_window=True, sliding_window=4096, max_window_layers=14)),
    "QL-SWA-02": dict(config=dict(QWEN3, sliding_window=4096)),
    "QL-SWA-03": dict(config=dict(INSTRUCT, layer_types=["full_attention"] * 3)),
    "QL-EOS-01": dict(config=INSTRUCT, gen=dict(INSTRUCT_GEN, eos_token_id=[151643])),
    "QL-EOS-02": dict(config=dict(INSTRUCT, eos_token_id=151643), gen=dict(INSTRUCT_GEN, eos_token_id=[151645])),
    "QL-EOS-03": dict(config=dict(INSTRUCT, eos_token_id=151643), gen=INSTRUCT_GEN),
    "QL-EOS-04": dict(config=INSTRUCT, gen=dict(INSTRUCT_GEN, eos_token_id=[151645]),
                      tok={"eos_token": "<|endoftext|>"}),
    "QL-EOS-05": dict(config=INSTRUCT, gen=INSTRUCT_GEN, tok={"eos_token": "<|endoftext|>"}),
    "QL-EOS-06": dict(config=INSTRUCT, gen=dict(INSTRUCT_GEN, pad_token_id=151645)),
    "QL-EOS-07": dict(config=dict(INSTRUCT, eos_token_id=None)),
    "QL-TOK-01": dict(config=dict(INSTRUCT, eos_token_id=[151645, 160000], vocab_size=151936)),
    "QL-TOK-02": dict(config=dict(INSTRUCT, bos_token_id=151645)),
    "QL-TOK-03": dict(config=INSTRUCT, gen=dict(INSTRUCT_GEN, eos_token_id=[151645, 151644])),
    "QL-VOC-01": dict(config=dict(QWEN3, vocab_size=151665)),
    "QL-VOC-02": dict(config=dict(BASE, vocab_size=151665)),
    "QL-VOC-03": dict(config=dict(BASE, vocab_size=32000)),
    "QL-GEN-01": dict(gen=INSTRUCT_GEN),
    "QL-MOE-01": dict(config=dict(MOE, num_experts=0)),
    "QL-MOE-02": dict(config=dict(MOE, num_experts_per_tok=9)),
    "QL-MOE-03": dict(config=dict(MOE, moe_intermediate_size=0)),
    "QL-MOE-04": dict(config=dict(MOE, mlp_only_layers=[0, 28])),
    "QL-MOE-05": dict(config=dict(MOE, decoder_sparse_step=0)),
}


def run(argv):
    buf = io.StringIO()
    with redirect_stdout(buf):
        code = lint.main([str(a) for a in argv])
    return code, buf.getvalue()


def test_every_firing_case_names_a_registered_rule():
    assert not set(FIRES) - set(RULES), "FIRES names rules the registry does not have"


@pytest.mark.parametrize("rule_id", list(RULES))
def test_every_registered_rule_fires(tmp_path, rule_id):
    """The rule's broken folder fires it, every finding's severity is one its rule lists, only fixable rules carry
    an edit; a fixable rule's --fix removes it."""
    assert rule_id in FIRES, f"{rule_id} is registered but no broken folder in FIRES fires it"
    make(tmp_path, **FIRES[rule_id])
    found = lint.lint_folder(str(tmp_path)).findings
    fired = [f for f in found if f.rule == rule_id]
    assert fired, f"{rule_id} did not fire; got {sorted({f.rule for f in found})}"
    for f in found:
        assert f.severity in RULES[f.rule].severities, (f.rule, f.severity)
        assert f.edit is None or RULES[f.rule].fixable, (f.rule, f.edit)
    if RULES[rule_id].fixable:
        assert any(f.edit is not None for f in fired), f"{rule_id} is fixable but its finding carries no edit"
        run(["--fix", tmp_path])
        assert rule_id not in {f.rule for f in lint.lint_folder(str(tmp_path)).findings}


def _lint_modules():
    for path in sorted(LINT_DIR.glob("*.py")):
        yield path, ast.parse(path.read_text(), filename=str(path))


def _docstrings(tree):
    for node in ast.walk(tree):
        if isinstance(node, ast.Module | ast.ClassDef | ast.FunctionDef | ast.AsyncFunctionDef) and node.body:
            first = node.body[0]
            if isinstance(first, ast.Expr) and isinstance(first.value, ast.Constant):
                yield first.value


def test_no_rule_id_literal_outside_the_registry():
    """Findings are emitted by registry entry: no string in qwen_jax/lint (but rules.py and docstrings) is or
    starts with a rule id, so a typo cannot emit an unregistered id."""
    hits = []
    for path, tree in _lint_modules():
        if path.name == "rules.py":
            continue
        docs = {id(node) for node in _docstrings(tree)}
        for node in ast.walk(tree):
            if isinstance(node, ast.Constant) and isinstance(node.value, str) and id(node) not in docs and \
                    (RULE_ID.search(node.value) or node.value.startswith("QL-")):
                hits.append(f"{path.name}:{node.lineno}: {node.value!r}")
    assert not hits, hits


def test_each_family_module_emits_exactly_its_registered_rules():
    """Each rule entry is imported by the module its `family` names and no other, and is passed to `add` there
    at levels (ERROR / WARNING / INFO names in the severity argument) the registry lists: every registered rule
    has one emitter and every emitted entry is registered."""
    imported = {}  # rule id -> modules importing it
    for path, tree in _lint_modules():
        names = {}
        for node in ast.walk(tree):
            if isinstance(node, ast.ImportFrom) and node.module == "qwen_jax.lint.rules":
                for alias in node.names:
                    value = getattr(rules, alias.name)
                    if isinstance(value, Rule):
                        names[alias.asname or alias.name] = value
        emitted = set()
        for node in ast.walk(tree):
            if isinstance(node, ast.Call) and isinstance(node.func, ast.Attribute) and node.func.attr == "add" \
                    and node.args and isinstance(node.args[0], ast.Name) and node.args[0].id in names:
                rule = names[node.args[0].id]
                emitted.add(node.args[0].id)
                levels = {n.id.lower() for n in ast.walk(node.args[1]) if isinstance(n, ast.Name)} & SEVERITIES
                assert levels <= set(rule.severities), f"{path.name}:{node.lineno}: {rule.id} emitted as {levels}"
        for local, rule in names.items():
            assert rule.family == path.stem, f"{path.name} imports {rule.id} of family {rule.family}"
            assert local in emitted, f"{path.name} imports {rule.id} but never emits it"
            imported.setdefault(rule.id, []).append(path.name)
    assert {rid: mods for rid, mods in imported.items() if len(mods) != 1} == {}
    assert set(imported) == set(RULES), set(RULES) ^ set(imported)


def test_registry_names_and_fields():
    for name, value in vars(rules).items():
        if isinstance(value, Rule):
            assert name == value.id.removeprefix("QL-").replace("-", "_"), (name, value.id)
            assert RULES[value.id] is value
    for rule in RULES.values():
        assert RULE_ID.fullmatch(rule.id) and (LINT_DIR / f"{rule.family}.py").is_file(), rule
        assert rule.severities and set(rule.severities) <= SEVERITIES, rule
        assert rule.title and rule.symptom and "\n" not in rule.title + rule.symptom + rule.fix, rule


GENERATED = re.compile(r"<!-- generated by `qwen-lint (--list-\w+)`[^>]*-->\n(.*?)\n<!-- end of generated table -->",
                       re.S)


@pytest.mark.parametrize("doc,flags", [("docs/lint.md", ["--list-fixes", "--list-rules"]),
                                       ("README.md", ["--list-rules"])])
def test_docs_tables_are_the_registry_output(doc, flags):
    """The rule / fix tables in the docs are exactly what `qwen-lint --list-rules` / `--list-fixes` print
    (regenerate them with those commands)."""
    blocks = GENERATED.findall((ROOT / doc).read_text())
    assert sorted(flag for flag, _ in blocks) == flags
    for flag, block in blocks:
        code, out = run([flag])
        assert code == 0 and out == block + "\n", f"{doc}: the {flag} table differs from the registry"


def test_list_rules_covers_the_registry():
    table = lint.rules_markdown().splitlines()
    assert [line.split("`")[1] for line in table[2:]] == list(RULES)
    fixes = lint.fixes_markdown().splitlines()
    assert [line.split("`")[1] for line in fixes[2:]] == [r.id for r in RULES.values() if r.fixable]


def test_import_loads_no_numerical_library():
    """`import qwen_jax.lint` (the pre-commit hook's import) in a fresh interpreter loads no jax, flax, numpy, torch
    or transformers, and neither does `python -m qwen_jax.lint --list-rules`."""
    heavy = "{'jax', 'flax', 'numpy', 'torch', 'transformers'}"
    code = f"import qwen_jax.lint, sys; print(sorted(m for m in sys.modules if m.split('.')[0] in {heavy}))"
    env = dict(os.environ, PYTHONPATH=str(ROOT))
    p = subprocess.run([sys.executable, "-c", code], cwd=ROOT, env=env, capture_output=True, text=True, timeout=60)
    assert p.returncode == 0 and p.stdout == "[]\n", p.stdout + p.stderr
    p = subprocess.run([sys.executable, "-m", "qwen_jax.lint", "--list-rules"], cwd=ROOT, env=env,
                       capture_output=True, text=True, timeout=60)
    assert p.returncode == 0 and p.stdout == lint.rules_markdown() + "\n" and not p.stderr


def test_console_script_is_the_package_cli():
    """pyproject's `qwen-lint` entry point is qwen_jax.lint's main (tools/lint_config.py only fronts it)."""
    module, attr = re.search(r'^qwen-lint = "([\w.]+):(\w+)"$', (ROOT / "pyproject.toml").read_text(), re.M).groups()
    assert getattr(importlib.import_module(module), attr) is lint.main
