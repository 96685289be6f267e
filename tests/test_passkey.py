"""The synthetic passkey training source, niah's RoPE / DCA overrides and benchmarks/passkey_niah.py --tiny."""

from __future__ import annotations

import json
import os
import subprocess
import sys

import numpy as np
import pytest

from qwen_jax.config import load_hf_config
from qwen_jax.data import DataError, default_config, make_pipeline
from qwen_jax.data.tokenization import bundled_tokenizer_dir, load_tokenizer
from qwen_jax.evals import niah, prompts

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
SOURCE = {"kind": "passkey", "seed": 3, "min_length": 40, "max_length": 120, "key_digits": 5}


def pipeline(**source):
    cfg = default_config()
    cfg.sources = [{**SOURCE, **source}]
    cfg.seq_len, cfg.global_batch_size = 128, 4
    return make_pipeline(cfg)


@pytest.fixture(scope="module")
def qwen_tok():
    return load_tokenizer(bundled_tokenizer_dir())


def test_passkey_example_is_the_eval_prompt_with_the_key_at_its_depth(qwen_tok):
    p = pipeline()
    intro = len(qwen_tok.encode(prompts.INTRO))
    question = len(qwen_tok.encode("\n" + prompts.TASKS["passkey"][1] + " " + prompts.TASKS["passkey"][2]))
    for length, depth, key in ((120, 0.0, 10000), (120, 1.0, 99999), (97, 0.3, 31415), (64, 0.75, 27182)):
        doc = p.encode({"length": length, "depth": depth, "key": key})
        ids, mask = doc["ids"].tolist(), doc["mask"]
        answer = qwen_tok.encode(f" {key}")
        # the prompt is, token for token, what the evaluation asks (HF tokenizer, niah's builder)
        assert ids[:length] == prompts.build_prompt(qwen_tok, "passkey", length, depth, key, chat=False)
        assert len(ids) == length + len(answer) and ids[length:] == answer
        # loss on the answer only: its tokens decode to the key, everything before is context
        assert mask.tolist() == [0] * length + [1] * len(answer)
        assert qwen_tok.decode(doc["ids"][mask == 1]) == f" {key}"
        # the key sentence starts at `depth` of the filler between the intro and the question
        needle = qwen_tok.encode(prompts.TASKS["passkey"][0].format(key=key))
        starts = [i for i in range(length) if ids[i:i + len(needle)] == needle]
        filler = length - intro - len(needle) - question
        assert starts == [intro + int(round(depth * filler))]
        assert qwen_tok.decode(ids[:length]).endswith("What is the pass key? The pass key is")


def test_passkey_batches_train_on_keys_hidden_in_their_own_document():
    it = pipeline().iterator()
    keys = []
    for _ in range(3):
        b = next(it)
        for row in range(b["input_ids"].shape[0]):
            for seg in range(1, int(b["segment_ids"][row].max()) + 1):
                in_seg = b["segment_ids"][row] == seg
                trained = b["targets"][row][in_seg & (b["loss_mask"][row] == 1)]
                text = it._p.decode(trained)
                assert text.startswith(" ") and text[1:].isdigit() and len(text) == 6
                assert text.strip() in it._p.decode(b["input_ids"][row][in_seg])
                keys.append(text)
    assert len(set(keys)) > 0.9 * len(keys)  # random keys, not one repeated
    # a function of (seed, index): the same stream again, another one with another seed
    again, other = next(pipeline().iterator()), next(pipeline(seed=4).iterator())
    first = next(pipeline().iterator())
    assert np.array_equal(again["input_ids"], first["input_ids"])
    assert not np.array_equal(other["input_ids"], first["input_ids"])


@pytest.mark.parametrize("source, message", [
    ({"min_length": 200, "max_length": 100}, "data.sources[0]: min_length 200 > max_length 100"),
    ({"key_digits": 0}, "data.sources[0].key_digits must be an integer >= 1, got 0"),
    ({"path": "x.jsonl"}, "data.sources[0]: unknown field(s) ['path'] for kind 'passkey'"),
    ({"seed": "a"}, "data.sources[0].seed must be an integer >= 0, got 'a'"),
])
def test_passkey_source_errors_name_the_key(source, message):
    with pytest.raises(DataError) as e:
        pipeline(**source)
    assert str(e.value).startswith(message)


def _folder(tmp_path, name, **extra) -> str:
    from qwen_jax.presets import get_preset

    folder = tmp_path / name
    folder.mkdir()
    (folder / "config.json").write_text(json.dumps({**get_preset("tiny"), "max_position_embeddings": 128, **extra}))
    return str(folder)


def test_niah_overrides_equal_the_config_json_forms(tmp_path):
    """`--rope_scaling yarn:4` / `--dca chunk=128` give the config that the same keys in config.json give."""
    plain = _folder(tmp_path, "plain")
    yarn = load_hf_config(plain, **niah.frozen(niah.rope_override(f"yarn:4:{niah.trained_length(plain)}")))
    want = load_hf_config(_folder(tmp_path, "yarn", rope_scaling={
        "rope_type": "yarn", "factor": 4.0, "original_max_position_embeddings": 128}))
    assert yarn == want and yarn.rope_type == "yarn"
    dca = load_hf_config(plain, **niah.frozen(niah.dca_override("chunk=128")))
    want = load_hf_config(_folder(tmp_path, "dca", dual_chunk_attention_config={
        "chunk_size": 128, "local_size": 16, "original_max_position_embeddings": 0}))
    assert dca == want and dca.dca["chunk_size"] == 128


@pytest.mark.parametrize("flags, message", [
    (["--rope_scaling", "yarn"], "error: --rope_scaling 'yarn': expected yarn:FACTOR[:ORIGINAL] with a number FACTOR"),
    (["--rope_scaling", "ntk:2"], "error: --rope_scaling 'ntk:2': expected linear|dynamic|yarn:FACTOR"),
    (["--rope_scaling", "yarn:0.5"], "error: --rope_scaling 'yarn:0.5': FACTOR must be >= 1"),
    (["--dca", "chunk=64,local=64"], "error: --dca 'chunk=64,local=64': need 0 <= local < chunk"),
    (["--dca", "size=64"], "error: --dca 'size=64': expected chunk=N[,local=M][,original=L0]"),
    (["--dca", "chunk=64", "--rope_scaling", "yarn:4"], "error: --rope_scaling and --dca are alternatives"),
])
def test_niah_override_flags_bad_input(tmp_path, capsys, flags, message):
    assert niah.main(["--model", _folder(tmp_path, "m"), "--out", str(tmp_path / "o"), *flags]) == 2
    err = capsys.readouterr().err
    assert err.startswith(message) and err.count("\n") == 1
    assert not os.path.exists(tmp_path / "o")


@pytest.mark.slow
def test_passkey_niah_tiny_end_to_end(tmp_path):
    out = tmp_path / "out"
    env = {**os.environ, "PYTHONPATH": ROOT, "JAX_PLATFORMS": "cpu", "XLA_FLAGS": ""}
    proc = subprocess.run([sys.executable, "benchmarks/passkey_niah.py", "--tiny", "--out", str(out)], cwd=ROOT,
                          env=env, capture_output=True, text=True, timeout=900)
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
    check_outputs(out)


def check_outputs(out):
    """The table, heatmaps and per-mode results a `--tiny` run writes, consistent with each other."""
    table = (out / "passkey_niah.md").read_text()
    rows = [line for line in table.splitlines() if line.startswith("| ") and not line.startswith("| ---")]
    assert rows[0] == "| mode | 128 (1x) | 256 (2x) | 384 (3x) | 512 (4x) |"
    assert [r.split(" | ")[0] for r in rows[1:]] == ["| plain", "| yarn", "| dca"]
    for mode in ("plain", "yarn", "dca"):
        assert (out / f"passkey_{mode}.png").read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
        result = json.loads((out / mode / "niah.json").read_text())
        assert result["lengths"] == [128, 256, 384, 512] and np.asarray(result["accuracy"]).shape == (2, 4)
        # the table's cells are the depth means of this mode's grid
        cells = rows[1 + ["plain", "yarn", "dca"].index(mode)].strip("| ").split(" | ")[1:]
        assert cells == [f"{100 * m:.0f}%" for m in np.asarray(result["accuracy"]).mean(0)]
    assert json.loads((out / "plain" / "niah.json").read_text())["overrides"] == {}
    assert json.loads((out / "yarn" / "niah.json").read_text())["overrides"]["rope_parameters"] == {
        "rope_type": "yarn", "factor": 4.0, "original_max_position_embeddings": 128}
    assert json.loads((out / "dca" / "niah.json").read_text())["overrides"]["dual_chunk_attention"]["chunk_size"] == 128
    assert "step 2/2" in (out / "train.log").read_text()


def test_passkey_niah_script_bad_input(tmp_path, capsys):
    import importlib.util

    spec = importlib.util.spec_from_file_location("passkey_niah", os.path.join(ROOT, "benchmarks", "passkey_niah.py"))
    script = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(script)
    for argv, message in ((["--tiny", "--steps", "0"], "error: --steps must be >= 1"),
                          (["--skip_train"], "error: --skip_train needs --workdir of a finished run (with hf_export), "
                                             "got None")):
        assert script.main([*argv, "--out", str(tmp_path / "o")]) == 2
        assert capsys.readouterr().err == message + "\n"
    assert not os.path.exists(tmp_path / "o")
