"""Tokenization, masks, eos checks and bad records of the input pipeline."""

from __future__ import annotations

import json

import numpy as np
import pytest

from qwen_jax.data import QWEN2_CHATML_TEMPLATE, BadRecordError, default_config, make_pipeline
from qwen_jax.data.tokenization import bundled_tokenizer_dir, doc_arrays, load_tokenizer

IM_END = "<|im_end|>"


def write_jsonl(path, records):
    with open(path, "w") as f:
        for r in records:
            f.write((r if isinstance(r, str) else json.dumps(r)) + "\n")
    return str(path)


def cfg_for(sources, **kw):
    c = default_config()
    c.sources = sources
    c.seq_len = 128
    c.global_batch_size = 2
    for k, v in kw.items():
        setattr(c, k, v)
    return c


def runs(mask):
    """[start, end) of each run of ones."""
    m = np.concatenate([[0], np.asarray(mask, int), [0]])
    d = np.diff(m)
    return list(zip(np.where(d == 1)[0], np.where(d == -1)[0], strict=True))


@pytest.fixture(scope="module")
def chat_pipeline():
    return make_pipeline(default_config())


def bundled_records():
    with open(__import__("qwen_jax.data.sources", fromlist=["x"]).BUNDLED_DIR + "/chat.jsonl") as f:
        return [json.loads(line) for line in f]


def test_tokenizer_files_and_template():
    path = bundled_tokenizer_dir()
    tok = load_tokenizer(path)
    assert tok.convert_tokens_to_ids(["<|endoftext|>", "<|im_start|>", "<|im_end|>"]) == [151643, 151644, 151645]
    assert tok.chat_template  # the shipped tokenizer_config.json carries its own (Qwen3) template
    msgs = [{"role": "system", "content": "S"}, {"role": "user", "content": "U1"},
            {"role": "assistant", "content": "A1"}]
    text = tok.apply_chat_template(msgs, tokenize=False, chat_template=QWEN2_CHATML_TEMPLATE)
    assert text == ("<|im_start|>system\nS<|im_end|>\n<|im_start|>user\nU1<|im_end|>\n"
                    "<|im_start|>assistant\nA1<|im_end|>\n")


@pytest.mark.parametrize("template", ["", "chatml"])
def test_chat_mask_covers_exactly_assistant_content_and_im_end(template):
    p = make_pipeline(cfg_for(default_config().sources, chat_template=template))
    im_end = p.tokenizer.convert_tokens_to_ids(IM_END)
    for rec in bundled_records()[:120]:
        out = p.encode(rec)
        ids, mask = out["ids"], out["mask"]
        want = [m["content"] + IM_END for m in rec["messages"] if m["role"] == "assistant"]
        got = [p.decode(ids[a:b]) for a, b in runs(mask)]
        assert got == want
        for _, b in runs(mask):
            assert ids[b - 1] == im_end  # each masked span ends with the closing <|im_end|>
        # The whole sequence is the template rendering.
        rendered = p.tokenizer.apply_chat_template(rec["messages"], tokenize=False, chat_template=p.chat_template)
        assert p.decode(ids) == rendered


def test_chat_system_turn_unmasked(chat_pipeline):
    p = chat_pipeline
    rec = {"messages": [{"role": "system", "content": "Be brief."}, {"role": "user", "content": "2+2?"},
                        {"role": "assistant", "content": "4"}]}
    out = p.encode(rec)
    assert [p.decode(out["ids"][a:b]) for a, b in runs(out["mask"])] == ["4" + IM_END]
    assert p.decode(out["ids"]).startswith("<|im_start|>system\nBe brief.<|im_end|>\n<|im_start|>user\n2+2?")


def test_continuation_and_text_masks(tmp_path):
    cont = write_jsonl(tmp_path / "c.jsonl", [{"prompt": "The capital of France is", "completion": " Paris."}])
    text = write_jsonl(tmp_path / "t.jsonl", [{"text": "Hello world, this is pretraining text."}])
    p = make_pipeline(cfg_for([{"path": cont, "kind": "continuation", "weight": 1.0},
                               {"path": text, "kind": "text", "weight": 1.0}]))
    eos = p.tokenizer.eos_token
    c = p.encode({"prompt": "The capital of France is", "completion": " Paris."})
    (a, b), = runs(c["mask"])
    assert p.decode(c["ids"][:a]) == "The capital of France is"
    assert p.decode(c["ids"][a:b]) == " Paris." + eos and b == len(c["ids"])
    assert c["ids"][-1] == p.eos_id
    t = p.encode({"text": "Hello world."}, source=1)
    assert t["mask"].all() and t["ids"][-1] == p.eos_id and p.decode(t["ids"]) == "Hello world." + eos
    # And through the packed batch: loss_mask marks targets that are completion tokens.
    b = next(p.iterator())
    sel = b["loss_mask"] > 0
    assert (b["targets"][sel] != 0).all()


def test_bad_records_error_names_file_and_line(tmp_path):
    path = write_jsonl(tmp_path / "bad.jsonl", [{"text": "ok one"}, {"text": "ok two"}, "{not json", {"txt": "x"}])
    c = cfg_for([{"path": path, "kind": "text", "weight": 1.0}], shuffle=False, num_epochs=1)
    from qwen_jax.data import DataError

    with pytest.raises(DataError, match=r"bad\.jsonl:3: not valid JSON"):  # found when the file is indexed
        make_pipeline(c)
    path2 = write_jsonl(tmp_path / "bad2.jsonl", [{"text": "ok"}, "", {"txt": "x"}])  # blank line 2 is ignored
    c2 = cfg_for([{"path": path2, "kind": "text", "weight": 1.0}], shuffle=False, num_epochs=1)
    with pytest.raises(BadRecordError, match=r"bad2\.jsonl:3: text record: needs a non-empty string field 'text'"):
        list(make_pipeline(c2).iterator())
    chat = write_jsonl(tmp_path / "chat.jsonl", [{"messages": [{"role": "user", "content": "hi"}]}])
    c3 = cfg_for([{"path": chat, "kind": "chat", "weight": 1.0}], num_epochs=1)
    with pytest.raises(BadRecordError, match=r"chat\.jsonl:1: chat record: no assistant message"):
        list(make_pipeline(c3).iterator())


def test_skip_bad_records_counts(tmp_path):
    good = [{"text": f"good record {i}"} for i in range(10)]
    lines = good[:4] + ["{broken", {"no_text": 1}] + good[4:] + ["[1, 2]"]
    path = write_jsonl(tmp_path / "mixed.jsonl", lines)
    c = cfg_for([{"path": path, "kind": "text", "weight": 1.0}], num_epochs=1, skip_bad_records=True)
    it = make_pipeline(c).iterator()
    batches = list(it)
    st = it.stats()
    assert st["bad_records"] == 3 and st["examples"] == 10
    assert sum(int(b["segment_ids"].max(axis=1).sum()) for b in batches) == 10


def _model_dir(tmp_path, name, gen_eos=None, cfg_eos=None):
    d = tmp_path / name
    d.mkdir()
    if cfg_eos is not None:
        (d / "config.json").write_text(json.dumps({"model_type": "qwen2", "eos_token_id": cfg_eos}))
    if gen_eos is not None:
        (d / "generation_config.json").write_text(json.dumps({"eos_token_id": gen_eos}))
    return str(d)


def test_eos_mismatch_refused(tmp_path):
    base = _model_dir(tmp_path, "base", gen_eos=151643, cfg_eos=151643)  # a base model: stops on <|endoftext|> only
    with pytest.raises(ValueError, match=r"(?s)chat turns end with '<\|im_end\|>'.*generation_config\.json"):
        make_pipeline(cfg_for(default_config().sources, model_dir=base))
    text = write_jsonl(tmp_path / "t.jsonl", [{"text": "abc"}])
    src = [{"path": text, "kind": "text", "weight": 1.0}]
    # Tokenizer eos is <|im_end|>, the base model stops on <|endoftext|>: refused, naming the file.
    with pytest.raises(ValueError, match=r"(?s)eos mismatch.*'<\|im_end\|>'.*base/generation_config\.json"):
        make_pipeline(cfg_for(src, model_dir=base))
    assert make_pipeline(cfg_for(src, model_dir=base, eos_token="<|endoftext|>")).eos_id == 151643
    # generation_config.json wins over config.json; a list is accepted.
    inst = _model_dir(tmp_path, "inst", gen_eos=[151645, 151643], cfg_eos=151643)
    assert make_pipeline(cfg_for(default_config().sources, model_dir=inst)).eos_id == 151645
    # Only config.json present.
    only_cfg = _model_dir(tmp_path, "only_cfg", cfg_eos=151643)
    with pytest.raises(ValueError, match=r"only_cfg/config\.json \(key eos_token_id\)"):
        make_pipeline(cfg_for(src, model_dir=only_cfg))
    gen_only = _model_dir(tmp_path, "gen_only", gen_eos=151643, cfg_eos=151645)
    with pytest.raises(ValueError, match=r"gen_only/generation_config\.json"):
        make_pipeline(cfg_for(src, model_dir=gen_only))


def test_parquet_source(tmp_path):
    import pyarrow as pa
    import pyarrow.parquet as pq

    recs = bundled_records()[:20]
    pq.write_table(pa.Table.from_pylist(recs), tmp_path / "chat.parquet")
    texts = [{"text": f"parquet text number {i}"} for i in range(5)]
    pq.write_table(pa.Table.from_pylist(texts), tmp_path / "text.parquet")
    p = make_pipeline(cfg_for([{"path": str(tmp_path / "*.parquet"), "kind": "chat", "weight": 1.0}],
                              num_epochs=1, shuffle=False, skip_bad_records=True, seq_len=512))
    it = p.iterator()
    list(it)
    assert it.stats()["examples"] == 20 and it.stats()["bad_records"] == 5  # text rows are not chat records
    p2 = make_pipeline(cfg_for([{"path": str(tmp_path / "chat.parquet"), "kind": "chat", "weight": 1.0}],
                               num_epochs=1, shuffle=False))
    out = doc_arrays(p2.tokenize.map(p2.lane_records[0]))
    want = [m["content"] + IM_END for m in recs[0]["messages"] if m["role"] == "assistant"]
    assert [p2.decode(out["ids"][a:b]) for a, b in runs(out["mask"])] == want
    p3 = make_pipeline(cfg_for([{"path": str(tmp_path / "chat.parquet"), "kind": "text", "weight": 1.0}],
                               num_epochs=1, shuffle=False))
    with pytest.raises(BadRecordError, match=r"chat\.parquet:row 1: text record"):
        next(p3.iterator())


def test_packed_batch_trains_exactly_assistant_tokens(chat_pipeline):
    p = chat_pipeline
    by_ids = {}
    for rec in bundled_records():
        out = p.encode(rec)
        by_ids[tuple(out["ids"].tolist())] = (rec, out)
    b = next(p.iterator())
    im_end_text = IM_END
    checked = 0
    for r in range(b["input_ids"].shape[0]):
        seg = b["segment_ids"][r]
        for k in range(1, int(seg.max()) + 1):
            idx = np.where(seg == k)[0]
            key = tuple(b["input_ids"][r, idx].tolist())
            if key not in by_ids:  # truncated document
                continue
            rec, out = by_ids[key]
            trained = b["targets"][r, idx][b["loss_mask"][r, idx] > 0]
            want = "".join(m["content"] + im_end_text for m in rec["messages"] if m["role"] == "assistant")
            assert p.decode(trained) == want
            checked += 1
    assert checked > 5
