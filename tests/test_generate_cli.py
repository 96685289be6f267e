"""`python -m qwen_jax.generate` and `python -m qwen_jax.evaluate` as real subprocesses."""

from __future__ import annotations

import json
import os
import subprocess
import sys

import numpy as np
import pytest
import torch
from hf_fixtures import make_chat_model

import qwen_jax
from qwen_jax.data.tokenization import load_tokenizer

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, ROOT)
from qwen_jax.hf import convert  # noqa: E402


def run(module, *args, timeout=300):
    env = {**os.environ, "PYTHONPATH": ROOT, "JAX_PLATFORMS": "cpu", "XLA_FLAGS": ""}
    return subprocess.run([sys.executable, "-m", module, *args], capture_output=True, text=True, env=env,
                          timeout=timeout, cwd=ROOT)


@pytest.fixture(scope="module")
def chat_folder(tmp_path_factory):
    folder = tmp_path_factory.mktemp("chat")
    hf = make_chat_model(str(folder))
    return str(folder), hf


def _reply(proc) -> tuple[str, str]:
    """(streamed text, stop line) of a one-prompt run."""
    assert proc.returncode == 0, proc.stderr
    text, _, stop = proc.stdout.rpartition("\n[stopped: ")
    return text, stop.rstrip("\n")


@pytest.mark.slow
def test_generate_cli_streams_and_says_why(chat_folder, tmp_path):
    folder, _ = chat_folder
    tok = load_tokenizer(folder)
    model = qwen_jax.from_pretrained(folder)
    assert 151645 in model.stop_token_ids  # config.json's <|im_end|> (also the tokenizer's eos)
    # plain text: the streamed text is the decoded greedy continuation, stopped by length
    ids = tok.encode("The capital of France is")
    want = qwen_jax.generate(model, [ids], max_new_tokens=6)[0]
    text, stop = _reply(run("qwen_jax.generate", "--model", folder, "--prompt", "The capital of France is",
                            "--max_new_tokens", "6"))
    if want[-1] in model.stop_token_ids:
        assert stop.startswith(f"stop id {want[-1]}")
    else:
        assert stop == "length (max_new_tokens=6); 6 new tokens]"
    assert text == tok.decode(want, skip_special_tokens=True)

    # a training checkpoint dir (Orbax + side files), two prompts from JSONL: a text prompt under --chat and
    # the same turn as messages; --system is added to both; a stop id of generation_config.json ends each reply
    messages = [{"role": "system", "content": "Be brief."}, {"role": "user", "content": "Hi"}]
    chat_ids = tok.apply_chat_template(messages, add_generation_prompt=True, tokenize=True, return_dict=False)
    free = qwen_jax.generate(model, [list(chat_ids)], max_new_tokens=8, stop_ids=[])[0]
    stop_id = free[2]
    n = free.index(stop_id) + 1
    with open(os.path.join(folder, "generation_config.json"), "w") as f:
        json.dump({"eos_token_id": [stop_id, 151643]}, f)
    ckpt = convert.hf_to_orbax(folder, str(tmp_path / "ckpt"))
    prompts = tmp_path / "p.jsonl"
    prompts.write_text(json.dumps({"prompt": "Hi"}) + "\n\n" + json.dumps({"messages": messages[1:]}) + "\n")
    proc = run("qwen_jax.generate", "--model", ckpt, "--step", "0", "--prompts", str(prompts), "--chat", "--system",
               "Be brief.", "--max_new_tokens", "8")
    assert proc.returncode == 0, proc.stderr
    reply = tok.decode(free[:n], skip_special_tokens=True)
    stop = f"[stopped: stop id {stop_id} ({tok.convert_ids_to_tokens(stop_id)}); {n} new tokens]"
    assert proc.stdout == "".join(f"=== prompt {i}/2 ===\n{reply}\n{stop}\n" for i in (1, 2))


@pytest.mark.parametrize("args, message", [
    (["--prompt", "x", "--prompts", "f.jsonl"], "not allowed with argument"),
    (["--prompts", "/nonexistent.jsonl"], "--prompts /nonexistent.jsonl: No such file"),
    (["--prompt", "x", "--max_new_tokens", "0"], "--max_new_tokens must be >= 1"),
    (["--prompt", "x", "--top_p", "0"], "0 < --top_p <= 1"),
])
def test_generate_cli_bad_input(chat_folder, capsys, args, message):
    from qwen_jax.generate import main

    assert main(["--model", chat_folder[0], *args]) == 2
    captured = capsys.readouterr()
    lines = captured.err.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith("error: ") and message in lines[0], captured.err
    assert captured.out == ""


def test_generate_cli_bad_jsonl_and_model(chat_folder, tmp_path, capsys):
    from qwen_jax.generate import main

    bad = tmp_path / "bad.jsonl"
    bad.write_text('{"prompt": "ok"}\n{"nope": 1}\n')
    assert main(["--model", chat_folder[0], "--prompts", str(bad)]) == 2
    assert capsys.readouterr().err.strip() == \
        f'error: --prompts {bad} line 2: expected {{"prompt": text}} or {{"messages": [...]}}'
    # a real process: exit code 2, one line, no traceback
    proc = run("qwen_jax.generate", "--model", str(tmp_path), "--prompt", "x")
    assert proc.returncode == 2 and proc.stderr.strip() == f"error: --model {tmp_path}: no tokenizer files " \
        "(tokenizer.json) in the folder"
    # the package attribute stays callable after the CLI module was imported
    import qwen_jax

    assert callable(qwen_jax.generate)


@pytest.mark.slow
def test_evaluate_cli_buckets_equal_transformers(chat_folder, tmp_path):
    """Per-bucket loss/perplexity (JSON) equal a numpy recomputation from transformers' per-token losses."""
    folder, hf = chat_folder
    tok = load_tokenizer(folder)
    rng = np.random.default_rng(0)
    docs = [rng.integers(0, 151936, n).tolist() for n in (14, 9, 20)]
    text = "The quick brown fox jumps over the lazy dog, twice over the fence."
    data = tmp_path / "eval.jsonl"
    data.write_text("".join(json.dumps({"input_ids": d}) + "\n" for d in docs) + json.dumps({"text": text}) + "\n")
    out = tmp_path / "report.json"
    proc = run("qwen_jax.evaluate", "--model", folder, "--data", str(data), "--seq_len", "16", "--buckets", "0,4,10",
               "--batch_size", "3", "--json", str(out))
    assert proc.returncode == 0, proc.stderr
    report = json.loads(out.read_text())
    nll, pos = [], []
    for d in docs + [tok.encode(text)]:
        ids = torch.tensor([d[:16]])
        with torch.no_grad():
            logits = hf(ids).logits[0, :-1].double()
        nll.append(torch.nn.functional.cross_entropy(logits, ids[0, 1:], reduction="none").numpy())
        pos.append(np.arange(1, ids.shape[1]))
    nll, pos = np.concatenate(nll), np.concatenate(pos)
    for row, (lo, hi) in zip(report["buckets"], [(0, 4), (4, 10), (10, None)], strict=True):
        sel = (pos >= lo) & (pos < (hi or 10**9))
        assert (row["from"], row["to"], row["tokens"]) == (lo, hi, sel.sum())
        np.testing.assert_allclose(row["loss"], nll[sel].mean(), rtol=1e-5)
        np.testing.assert_allclose(row["perplexity"], np.exp(nll[sel].mean()), rtol=1e-5)
    np.testing.assert_allclose(report["overall"]["loss"], nll.mean(), rtol=1e-5)
    assert "perplexity" in proc.stdout.splitlines()[0] and proc.stdout.splitlines()[-1].split()[0] == "all"


def test_evaluate_cli_bad_input(chat_folder, tmp_path, capsys):
    from qwen_jax.evaluate import main

    data = tmp_path / "d.jsonl"
    data.write_text('{"input_ids": [1, 2, 3]}\n{"input_ids": [1, -5]}\n')
    assert main(["--model", chat_folder[0], "--data", str(data)]) == 2
    assert capsys.readouterr().err.startswith(f"error: --data {data} line 2: input_ids must be")
    assert main(["--model", chat_folder[0], "--data", str(data), "--buckets", "0,8,4"]) == 2
    assert capsys.readouterr().err.strip() == "error: --buckets '0,8,4': need increasing non-negative integers"
    assert not os.path.exists(tmp_path / "r.json")


@pytest.mark.parametrize("chat", [False, True])
def test_niah_prompt_layout(chat_folder, chat):
    from qwen_jax.evals.prompts import TASKS, build_prompt

    tok = load_tokenizer(chat_folder[0])
    for task in TASKS:
        for depth in (0.0, 0.5, 1.0):
            ids = build_prompt(tok, task, 300, depth, 12345, chat=chat)
            assert len(ids) == 300
            needle = tok.encode(TASKS[task][0].format(key=12345))
            starts = [i for i in range(len(ids)) if ids[i:i + len(needle)] == needle]
            assert len(starts) == 1
            text = tok.decode(ids)
            assert text.rstrip().endswith(TASKS[task][2]) and ("<|im_start|>user" in text) == chat
    # the needle moves from the start of the filler to its end
    first = build_prompt(tok, "passkey", 300, 0.0, 1, chat=False)
    last = build_prompt(tok, "passkey", 300, 1.0, 1, chat=False)
    assert first != last


@pytest.mark.slow
def test_niah_cli_writes_grid_and_heatmap(chat_folder, tmp_path):
    out = tmp_path / "niah"
    proc = run("qwen_jax.evals.niah", "--model", chat_folder[0], "--lengths", "64,128", "--depths", "0,1",
               "--trials", "2", "--out", str(out))
    assert proc.returncode == 0, proc.stderr
    result = json.loads((out / "niah.json").read_text())
    assert np.asarray(result["accuracy"]).shape == (2, 2) and len(result["cells"]) == 4
    assert all(len(c["replies"]) == 2 and len(set(c["keys"])) >= 1 for c in result["cells"])
    assert (out / "niah.png").read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    assert proc.stderr.count("niah passkey: length") == 4
    bad = run("qwen_jax.evals.niah", "--model", chat_folder[0], "--depths", "0,2", "--out", str(out))
    assert bad.returncode == 2 and bad.stderr.strip() == "error: --depths '0,2': depths are fractions in [0, 1]"
