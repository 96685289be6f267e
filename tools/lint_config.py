#!/usr/bin/env python3
"""Config linter for Qwen2 / Qwen2.5 / Qwen3 model folders (``qwen-lint``).

Reads ``config.json``, ``generation_config.json`` and ``tokenizer_config.json`` (plus the chat template and the
head of ``tokenizer.json`` where present) and reports the mismatches that make a checkpoint misbehave at run time:
RoPE / YaRN / DCA / sliding-window settings, the effective stop-token set, special-token ids and the vocabulary
size.  The rules follow how transformers (v4 and v5) and vLLM read these files; the RoPE / YaRN / DCA math is in
docs/long_context.md (§RoPE-config, §YaRN, §DCA).

Standard library only, and runnable as a plain file (``tools/lint_config.py``), as a module
(``python -m tools.lint_config``) or as the ``qwen-lint`` console script, so the pre-commit hook stays fast.

Exit status: 0 no error (warnings allowed), 1 at least one error (or a warning with ``--strict``), 2 usage error.
"""

from __future__ import annotations

import argparse
import bisect
import contextlib
import json
import math
import os
import re
import sys

# --------------------------------------------------------------------------------------------------------------
# Qwen facts
# --------------------------------------------------------------------------------------------------------------

ENDOFTEXT, IM_START, IM_END = 151643, 151644, 151645
QWEN_BPE_SIZE = 151643  # ordinary BPE tokens 0..151642
QWEN_SPECIALS = {
    "<|endoftext|>": 151643, "<|im_start|>": 151644, "<|im_end|>": 151645, "<|object_ref_start|>": 151646,
    "<|object_ref_end|>": 151647, "<|box_start|>": 151648, "<|box_end|>": 151649, "<|quad_start|>": 151650,
    "<|quad_end|>": 151651, "<|vision_start|>": 151652, "<|vision_end|>": 151653, "<|vision_pad|>": 151654,
    "<|image_pad|>": 151655, "<|video_pad|>": 151656, "<tool_call>": 151657, "</tool_call>": 151658,
    "<|fim_prefix|>": 151659, "<|fim_middle|>": 151660, "<|fim_suffix|>": 151661, "<|fim_pad|>": 151662,
    "<|repo_name|>": 151663, "<|file_sep|>": 151664, "<tool_response>": 151665, "</tool_response>": 151666,
    "<think>": 151667, "</think>": 151668,
}
QWEN_SPECIAL_NAMES = {v: k for k, v in QWEN_SPECIALS.items()}
TERMINATORS = {ENDOFTEXT, IM_END}
PADDED_VOCABS = (151936, 152064)  # embedding rows of the released checkpoints (padded past the tokenizer)
# Smallest tokenizer of each family: Qwen2 shipped 151646 entries, Qwen2.5 151665, Qwen3 151669 (<think> tokens).
FAMILY_TOKENIZER_MIN = {"qwen2": 151646, "qwen3": 151669}
NATIVE_CONTEXT = 32768  # pre-training length of Qwen2 / Qwen2.5 / Qwen3 (YaRN's original_max_position_embeddings)
CHAT_CONTEXT = 40960  # 32768 + 8192 generation budget (Qwen3, QwQ)
KNOWN_THETAS = (1e6, 5e6, 1e7)
TEXT_MODEL_TYPES = {"qwen2": "qwen2", "qwen2_moe": "qwen2", "qwen3": "qwen3", "qwen3_moe": "qwen3"}
TEXT_ARCHITECTURES = {"Qwen2ForCausalLM": "qwen2", "Qwen2MoeForCausalLM": "qwen2", "Qwen3ForCausalLM": "qwen3",
                      "Qwen3MoeForCausalLM": "qwen3"}
KNOWN_ROPE_TYPES = ("default", "linear", "dynamic", "yarn", "longrope", "llama3", "mrope")
CONFIG, GENCONFIG, TOKCONFIG = "config.json", "generation_config.json", "tokenizer_config.json"
KNOWN_FILES = (CONFIG, GENCONFIG, TOKCONFIG)

ERROR, WARNING, INFO = "error", "warning", "info"
_SEV_RANK = {INFO: 0, WARNING: 1, ERROR: 2}

# id: (severities it can take, what it catches, run-time symptom it prevents)
RULES = {
    "QL-JSON-01": ("error", "duplicate key in a JSON object",
                   "Python keeps the last value, other parsers the first or reject: runtimes disagree"),
    "QL-JSON-02": ("error", "invalid JSON (with line and column), not UTF-8, or top level not an object",
                   "the checkpoint does not load at all"),
    "QL-JSON-03": ("error", "a known key has the wrong type (string number, float layer count, bool as string...) "
                   "or a number out of range (Infinity, beyond 2**53)",
                   "TypeError at load, or a silently wrong value"),
    "QL-JSON-04": ("warning", "NaN / Infinity literal", "rejected by strict JSON parsers (Rust, JS, Go)"),
    "QL-ROPE-01": ("error/info", "rope_theta missing, or unusual for a Qwen model (10000 with a long context)",
                   "loaders fall back to theta 10000: wrong RoPE base, output degrades with length"),
    "QL-ROPE-02": ("warning", "legacy rope_scaling `type` key without `rope_type`",
                   "readers that only look at `rope_type` run without scaling"),
    "QL-ROPE-03": ("error/warning", "YaRN: max_position_embeddings != factor x original_max_position_embeddings",
                   "version-dependent scaling factor (transformers 4.45-4.55 use mpe/original); context cap wrong"),
    "QL-ROPE-04": ("error/warning", "YaRN original_max_position_embeddings is not Qwen's pre-training length 32768",
                   "wrong YaRN frequency ramp; long-context quality drops"),
    "QL-ROPE-05": ("info", "static YaRN enabled in the checkpoint config",
                   "scaling applies to short prompts too (slight quality loss); enable only for long inputs"),
    "QL-ROPE-06": ("error", "`type` and `rope_type` disagree", "transformers uses rope_type, older readers type"),
    "QL-ROPE-07": ("error", "YaRN without original_max_position_embeddings",
                   "vLLM raises KeyError; transformers assumes max_position_embeddings was the pre-training length"),
    "QL-ROPE-08": ("error/warning/info", "scaling factor < 1, == 1 or not a float",
                   "factor < 1 compresses nothing and extrapolates; 1 is a no-op"),
    "QL-ROPE-09": ("error", "unknown rope type", "model construction fails (no RoPE init function)"),
    "QL-ROPE-10": ("warning", "linear/dynamic scaling with max_position_embeddings already multiplied",
                   "scaling applied twice: vLLM allows factor^2 x context, dynamic NTK starts too late"),
    "QL-ROPE-11": ("warning/info", "both rope_scaling and rope_parameters (transformers 5.x uses rope_scaling), "
                   "or v4 rope_theta / a top-level original_max_position_embeddings disagreeing with the v5 block",
                   "transformers v4, v5 and v5-form readers build different RoPE from the same folder"),
    "QL-ROPE-12": ("error", "scaling block without `factor`", "KeyError when the rotary embedding is built"),
    "QL-ROPE-13": ("info", "RoPE only in the v5 `rope_parameters` form",
                   "transformers < 5 and older runtimes ignore it (theta 10000, no scaling)"),
    "QL-CTX-01": ("warning", "context longer than the trained window with static RoPE and no scaling",
                  "garbage output past the trained length (chat models are tuned at 32768)"),
    "QL-CTX-02": ("error", "context far beyond any released Qwen window (Qwen2/2.5 131072, Qwen3 262144) with "
                  "plain RoPE: neither rope scaling nor dual_chunk_attention_config",
                  "garbage past the trained length (e.g. a 1M model whose DCA block was deleted)"),
    "QL-DCA-01": ("error/info", "malformed dual_chunk_attention_config",
                  "vLLM fails to build the DCA rotary embedding / chunking"),
    "QL-DCA-02": ("error", "DCA combined with rope scaling",
                  "vLLM ignores the scaling, transformers ignores DCA: runtimes compute different attention"),
    "QL-DCA-03": ("info", "DCA is read by vLLM only", "transformers runs plain full attention over the context"),
    "QL-SWA-01": ("warning/info", "sliding-window attention active on some layers",
                  "those layers only see the last `sliding_window` tokens (Qwen releases never trained with it)"),
    "QL-SWA-02": ("warning", "inactive sliding_window smaller than max_position_embeddings",
                  "runtimes that ignore use_sliding_window cap the usable context to the window"),
    "QL-SWA-03": ("error/warning", "layer_types inconsistent with num_hidden_layers / use_sliding_window",
                  "transformers v4 and v5 window different layers, or v5 refuses the config"),
    "QL-EOS-01": ("error", "chat model whose effective stop set lacks the chat turn end <|im_end|>",
                  "generation never stops: the model runs on past the end of its turn"),
    "QL-EOS-02": ("warning", "config.json eos not contained in generation_config.json eos",
                  "runtimes reading config.json stop on different tokens than transformers/vLLM"),
    "QL-EOS-03": ("error/warning", "chat model whose config.json eos_token_id is not <|im_end|>",
                  "runtimes that read config.json only never stop at the end of a turn"),
    "QL-EOS-04": ("error", "tokenizer eos_token not in the effective stop set",
                  "a model fine-tuned with this tokenizer emits a token generation does not stop on"),
    "QL-EOS-05": ("warning", "tokenizer eos_token disagrees with config.json eos_token_id",
                  "training (tokenizer) and inference (config) use different end tokens"),
    "QL-EOS-06": ("warning", "pad token equal to the chat turn end",
                  "collators mask pad labels, so the model never learns to emit its stop token"),
    "QL-EOS-07": ("error", "no stop token at all", "generation only ends at max_new_tokens"),
    "QL-TOK-01": ("error", "special token id >= vocab_size", "index out of range in the embedding (CUDA assert)"),
    "QL-TOK-02": ("error", "bos equal to a stop token (other than Qwen's unused <|endoftext|> bos)",
                  "a prepended bos ends generation immediately / prompts start with end-of-turn"),
    "QL-TOK-03": ("error/warning", "non-terminator (<|im_start|>, <think>, text token) in the eos list",
                  "generation stops at the start of a turn, inside reasoning, or on ordinary text"),
    "QL-VOC-01": ("error", "vocab_size below the tokenizer size", "token ids past the embedding: crash or garbage"),
    "QL-VOC-02": ("warning", "vocab_size not a released Qwen size (151936 / 152064): embeddings resized",
                  "weights, LoRA adapters and downstream tools must all agree on the new shape"),
    "QL-VOC-03": ("warning", "vocab_size far below the Qwen tokenizer (no tokenizer in the folder to check)",
                  "Qwen token ids index past the embedding unless a custom tokenizer is used"),
    "QL-GEN-01": ("info", "no config.json next to the linted files", "nothing to check the token ids against"),
    "QL-MOE-01": ("error", "MoE expert count (num_experts) or num_experts_per_tok missing or not a positive integer",
                  "the router has no experts to choose from: model construction fails or every layer is dense"),
    "QL-MOE-02": ("error", "num_experts_per_tok larger than num_experts",
                  "torch.topk raises 'selected index k out of range' on the first forward pass"),
    "QL-MOE-03": ("error", "moe_intermediate_size / shared_expert_intermediate_size not a positive integer",
                  "zero-size or negative expert weights: construction fails or the experts output nothing"),
    "QL-MOE-04": ("error/warning", "mlp_only_layers not a list of layer indices in [0, num_hidden_layers)",
                  "out-of-range entries are silently ignored: the layers meant to be dense stay sparse"),
    "QL-MOE-05": ("error/warning", "decoder_sparse_step < 1, or no layer left sparse",
                  "ZeroDivisionError when the model is built (step 0), or a MoE config that runs no experts"),
}
MOE_MODEL_TYPES = ("qwen2_moe", "qwen3_moe")


# --------------------------------------------------------------------------------------------------------------
# Findings and JSON with locations
# --------------------------------------------------------------------------------------------------------------


class Finding:
    __slots__ = ("rule", "severity", "file", "line", "key", "message", "fix", "edit")

    def __init__(self, rule, severity, file, line, key, message, fix, edit=None):
        self.rule, self.severity, self.file, self.line = rule, severity, file, line
        self.key, self.message, self.fix, self.edit = key, message, fix, edit

    def as_dict(self):
        return {"rule": self.rule, "severity": self.severity, "file": self.file, "line": self.line,
                "key": self.key, "message": self.message, "fix": self.fix}


class Loc:
    __slots__ = ("line", "key_start", "key_end", "val_start", "val_end")

    def __init__(self, line, key_start, key_end, val_start, val_end):
        self.line, self.key_start, self.key_end = line, key_start, key_end
        self.val_start, self.val_end = val_start, val_end


class JsonFile:
    """One JSON file: text, parsed data, per-path key locations, duplicate keys, parse error."""

    def __init__(self, path):
        self.path = path
        self.text = None
        self.data = None
        self.error = None  # (line, col, message)
        self.locs = {}  # path tuple -> [Loc, ...] in file order
        self.duplicates = []  # (path tuple, Loc)
        self.nonfinite = []  # literal names
        self.root_span = None
        self._line_starts = [0]

    def load(self):
        try:
            with open(self.path, "rb") as f:
                raw = f.read()
        except OSError as e:
            self.error = (1, 1, f"cannot read file: {e.strerror or e}")
            return self
        try:
            text = raw.decode("utf-8")
        except UnicodeDecodeError as e:
            line = raw[: e.start].count(b"\n") + 1
            self.error = (line, 1, "not valid UTF-8")
            return self
        if text.startswith("\ufeff"):
            self.error = (1, 1, "file starts with a UTF-8 byte-order mark (rejected by Python's json)")
            return self
        self.text = text
        self._line_starts = [0] + [m.end() for m in re.finditer("\n", text)]

        def parse_constant(name):
            self.nonfinite.append(name)
            return float(name.replace("-", "")) * (-1 if name.startswith("-") else 1)

        try:
            self.data = json.loads(text, parse_constant=parse_constant)
        except json.JSONDecodeError as e:
            self.error = (e.lineno, e.colno, f"invalid JSON: {e.msg}")
            return self
        except RecursionError:
            self.error = (1, 1, "invalid JSON: nesting too deep")
            return self
        except ValueError as e:  # e.g. integer string too long
            self.error = (1, 1, f"invalid JSON: {e}")
            return self
        try:
            _Scanner(self).scan()
        except (RecursionError, IndexError, ValueError):
            self.locs, self.duplicates = {}, []
        return self

    def line_of(self, offset):
        return bisect.bisect_right(self._line_starts, offset)

    def loc(self, *path):
        """Location of the occurrence Python's json keeps (the last one)."""
        locs = self.locs.get(tuple(path))
        return locs[-1] if locs else None

    def line(self, *path):
        """Line of the key at `path`, else of its nearest present parent, else 1."""
        path = tuple(path)
        while path:
            loc = self.loc(*path)
            if loc is not None:
                return loc.line
            path = path[:-1]
        return 1


_TOKEN_RE = re.compile(r'"(?:[^"\\]|\\.)*"|[{}\[\]:,]|[^\s{}\[\]:,"]+')


class _Scanner:
    """Walks valid JSON text and records where every key and value sits (json already validated it)."""

    def __init__(self, jf):
        self.jf = jf
        self.toks = [(m.group(), m.start(), m.end()) for m in _TOKEN_RE.finditer(jf.text)]
        self.i = 0

    def scan(self):
        start, end = self.value(())
        self.jf.root_span = (start, end)

    def value(self, path):
        tok, start, end = self.toks[self.i]
        if tok == "{":
            return self.obj(path, start)
        if tok == "[":
            return self.arr(path, start)
        self.i += 1
        return start, end

    def obj(self, path, start):
        self.i += 1
        seen = set()
        if self.toks[self.i][0] == "}":
            self.i += 1
            return start, self.toks[self.i - 1][2]
        while True:
            ktok, ks, ke = self.toks[self.i]
            key = json.loads(ktok)
            self.i += 2  # key, colon
            vs, ve = self.value(path + (key,))
            loc = Loc(self.jf.line_of(ks), ks, ke, vs, ve)
            self.jf.locs.setdefault(path + (key,), []).append(loc)
            if key in seen:
                self.jf.duplicates.append((path + (key,), loc))
            seen.add(key)
            tok, _, te = self.toks[self.i]
            self.i += 1
            if tok == "}":
                return start, te

    def arr(self, path, start):
        self.i += 1
        if self.toks[self.i][0] == "]":
            self.i += 1
            return start, self.toks[self.i - 1][2]
        idx = 0
        while True:
            vs, ve = self.value(path + (idx,))
            self.jf.locs.setdefault(path + (idx,), []).append(Loc(self.jf.line_of(vs), vs, vs, vs, ve))
            idx += 1
            tok, _, te = self.toks[self.i]
            self.i += 1
            if tok == "]":
                return start, te


# --------------------------------------------------------------------------------------------------------------
# Value helpers (wrong types read as "absent"; QL-JSON-03 reports them)
# --------------------------------------------------------------------------------------------------------------


# Beyond 2**53 a JSON number is no longer exact in the float64 that most readers use, and int64 loaders overflow
# soon after; no config value comes near it.  Larger numbers (and Infinity) are "out of range": QL-JSON-03.
MAX_JSON_NUMBER = 2 ** 53


def _is_int(v):
    return isinstance(v, int) and not isinstance(v, bool) and abs(v) <= MAX_JSON_NUMBER


def _is_num(v):
    return (_is_int(v) or isinstance(v, float)) and math.isfinite(v) and abs(v) <= MAX_JSON_NUMBER


def _out_of_range(v):
    """A number (not a bool) that the rules cannot compute with: Infinity/NaN or beyond MAX_JSON_NUMBER."""
    return isinstance(v, int | float) and not isinstance(v, bool) and not _is_num(v)


def _ids(v):
    """An id field (int or list of ints) as a list of ints; None when absent, null or wrongly typed."""
    if _is_int(v):
        return [v]
    if isinstance(v, list) and v and all(_is_int(x) for x in v):
        return list(v)
    return None


def _fmt_num(x):
    if isinstance(x, float) and x.is_integer() and abs(x) < 1e16:
        x = int(x)
    return str(x)


def _token_content(v):
    if isinstance(v, str):
        return v
    if isinstance(v, dict) and isinstance(v.get("content"), str):
        return v["content"]
    return None


_CONFIG_TYPES = {
    "vocab_size": "int", "max_position_embeddings": "int", "num_hidden_layers": "int", "max_window_layers": "int",
    "hidden_size": "int", "intermediate_size": "int", "num_attention_heads": "int", "num_key_value_heads": "int?",
    "head_dim": "int?", "sliding_window": "int?", "use_sliding_window": "bool", "tie_word_embeddings": "bool",
    "rope_theta": "num", "rope_scaling": "dict?", "rope_parameters": "dict?", "dual_chunk_attention_config": "dict?",
    "bos_token_id": "id?", "eos_token_id": "ids?", "pad_token_id": "id?", "model_type": "str",
    "layer_types": "strlist?", "architectures": "strlist?", "original_max_position_embeddings": "int?",
    "norm_topk_prob": "bool", "router_aux_loss_coef": "num?", "qkv_bias": "bool",
}
_GEN_TYPES = {"bos_token_id": "id?", "eos_token_id": "ids?", "pad_token_id": "id?", "max_new_tokens": "int?",
              "max_length": "int?", "do_sample": "bool", "temperature": "num?", "top_p": "num?", "top_k": "int?"}
_TOK_TYPES = {"eos_token": "tok?", "bos_token": "tok?", "pad_token": "tok?", "added_tokens_decoder": "dict",
              "add_bos_token": "bool", "model_max_length": "num?"}
_ROPE_TYPES = {"rope_type": "str", "type": "str", "factor": "num", "original_max_position_embeddings": "int",
               "rope_theta": "num", "beta_fast": "num?", "beta_slow": "num?", "attention_factor": "num?",
               "mscale": "num?", "mscale_all_dim": "num?", "truncate": "bool"}
_DCA_TYPES = {"chunk_size": "int", "local_size": "int", "original_max_position_embeddings": "int"}


def _type_ok(kind, v):
    optional = kind.endswith("?")
    kind = kind.rstrip("?")
    if v is None:
        return optional
    if kind == "int":
        return _is_int(v)
    if kind == "num":
        return _is_num(v)
    if kind == "bool":
        return isinstance(v, bool)
    if kind == "str":
        return isinstance(v, str)
    if kind == "dict":
        return isinstance(v, dict)
    if kind == "strlist":
        return isinstance(v, list) and all(isinstance(x, str) for x in v)
    if kind == "id":
        return _is_int(v)
    if kind == "ids":
        return _is_int(v) or (isinstance(v, list) and all(_is_int(x) for x in v))
    if kind == "tok":
        return _token_content(v) is not None
    return True


_KIND_WORDS = {"int": "an integer", "num": "a number", "bool": "true/false", "str": "a string", "dict": "an object",
               "strlist": "a list of strings", "id": "an integer token id", "ids": "an integer or a list of integers",
               "tok": "a token string (or an AddedToken object)"}


# --------------------------------------------------------------------------------------------------------------
# The folder model
# --------------------------------------------------------------------------------------------------------------


class Folder:
    def __init__(self, path):
        self.path = path
        self.files = {}
        for name in KNOWN_FILES:
            p = os.path.join(path, name)
            self.files[name] = JsonFile(p).load() if os.path.isfile(p) else None
        self.findings = []

    def data(self, name):
        jf = self.files.get(name)
        if jf is None or jf.error is not None or not isinstance(jf.data, dict):
            return None
        return jf.data

    def fpath(self, name):
        return os.path.join(self.path, name)

    def add(self, rule, severity, name, path, message, fix, edit=None):
        jf = self.files.get(name)
        line = jf.line(*path) if jf is not None and jf.error is None else 1
        key = ".".join(str(p) for p in path) if path else None
        self.findings.append(Finding(rule, severity, self.fpath(name), line, key, message, fix, edit))


def _chat_template(folder):
    parts = []
    tok = folder.data(TOKCONFIG)
    if tok is not None:
        ct = tok.get("chat_template")
        if isinstance(ct, str):
            parts.append(ct)
        elif isinstance(ct, list):
            parts.extend(x.get("template") for x in ct if isinstance(x, dict) and isinstance(x.get("template"), str))
    for name in ("chat_template.jinja", "chat_template.json"):
        p = os.path.join(folder.path, name)
        if os.path.isfile(p):
            try:
                with open(p, encoding="utf-8") as f:
                    parts.append(f.read())
            except (OSError, UnicodeDecodeError):
                pass
    return "\n".join(parts)


def _tokenizer_json_added(folder):
    """content -> id of added tokens from the head of tokenizer.json (never parses the 7 MB vocabulary)."""
    p = os.path.join(folder.path, "tokenizer.json")
    if not os.path.isfile(p):
        return {}
    try:
        with open(p, "rb") as f:
            head = f.read(1 << 20).decode("utf-8", "replace")
    except OSError:
        return {}
    m = re.search(r'"added_tokens"\s*:\s*\[', head)
    if not m:
        return {}
    out = {}
    for obj in re.finditer(r"\{[^{}]*\}", head[m.end():]):
        text = obj.group()
        mid = re.search(r'"id"\s*:\s*(\d+)', text)
        mc = re.search(r'"content"\s*:\s*("(?:[^"\\]|\\.)*")', text)
        if mid and mc:
            try:
                out[json.loads(mc.group(1))] = int(mid.group(1))
            except ValueError:
                continue
        rest = head[m.end() + obj.end():].lstrip()
        if rest.startswith("]"):
            break
    return out


class Context:
    """Everything the rules need, read once from the folder."""

    def __init__(self, folder):
        self.folder = folder
        self.cfg = folder.data(CONFIG)
        self.gen = folder.data(GENCONFIG)
        self.tok = folder.data(TOKCONFIG)
        cfg = self.cfg or {}
        mt = cfg.get("model_type") if isinstance(cfg.get("model_type"), str) else ""
        arch = cfg.get("architectures")
        arch0 = arch[0] if isinstance(arch, list) and arch and isinstance(arch[0], str) else ""
        # Qwen-specific rules only for the text families (VL / Omni / Next configs have other layouts).
        self.family = TEXT_MODEL_TYPES.get(mt) if mt else TEXT_ARCHITECTURES.get(arch0)
        self.mpe = cfg.get("max_position_embeddings") if _is_int(cfg.get("max_position_embeddings")) else None
        self.vocab = cfg.get("vocab_size") if _is_int(cfg.get("vocab_size")) else None
        # token table
        self.tok_ids = dict(QWEN_SPECIALS) if self.family else {}
        added = {}
        if self.tok is not None and isinstance(self.tok.get("added_tokens_decoder"), dict):
            for k, v in self.tok["added_tokens_decoder"].items():
                c = _token_content(v)
                if c is not None and re.fullmatch(r"\d{1,9}", k):
                    added[c] = int(k)
        if not added:
            added = _tokenizer_json_added(folder)
        self.tok_ids.update(added)
        self.tok_names = {v: k for k, v in self.tok_ids.items()}
        self.tokenizer_size = max(added.values()) + 1 if added and max(added.values()) >= 1000 else None
        self.template = _chat_template(folder)
        self.turn_end = "<|im_end|>" if "<|im_end|>" in self.template else None
        # eos sets
        self.cfg_eos = _ids(cfg.get("eos_token_id"))
        self.gen_has_eos = self.gen is not None and self.gen.get("eos_token_id") is not None
        self.gen_eos = _ids(self.gen.get("eos_token_id")) if self.gen is not None else None
        # transformers: generation_config.json wins when it sets eos; vLLM also adds it to the tokenizer's eos.
        self.stop = set(self.gen_eos if self.gen_has_eos and self.gen_eos is not None else self.cfg_eos or [])
        self.stop_source = GENCONFIG if self.gen_has_eos else CONFIG
        tok_eos = _token_content(self.tok.get("eos_token")) if self.tok is not None else None
        self.tok_eos_name = tok_eos
        self.tok_eos = self.tok_ids.get(tok_eos) if tok_eos is not None else None
        self.chat_model = self._is_chat(tokenizer=False)  # evidence from the model files themselves
        self.is_chat = self.chat_model or self._is_chat(tokenizer=True)

    def _is_chat(self, tokenizer):
        if not self.family:
            return False
        if tokenizer:
            return self.tok_eos_name == "<|im_end|>"
        cfg = self.cfg or {}
        names = [os.path.basename(os.path.abspath(self.folder.path))]
        if isinstance(cfg.get("_name_or_path"), str):
            names.append(cfg["_name_or_path"])
        if any(re.search(r"(?i)(?:^|[-./ ])(?:instruct|chat)(?:$|[-./ \d])", n) for n in names):
            return True
        ids = set(self.cfg_eos or []) | set(self.gen_eos or [])
        if _is_int(cfg.get("bos_token_id")):
            ids.add(cfg["bos_token_id"])
        return IM_END in ids

    def name(self, tid):
        n = self.tok_names.get(tid)
        return f"{n} ({tid})" if n else str(tid)


# --------------------------------------------------------------------------------------------------------------
# Rules
# --------------------------------------------------------------------------------------------------------------


def check_files(folder):
    for name, jf in folder.files.items():
        if jf is None:
            continue
        if jf.error is not None:
            line, col, msg = jf.error
            f = Finding("QL-JSON-02", ERROR, folder.fpath(name), line, None, f"{msg} (line {line}, column {col})",
                        "fix the syntax; every loader refuses this file")
            folder.findings.append(f)
            continue
        if not isinstance(jf.data, dict):
            folder.add("QL-JSON-02", ERROR, name, (), f"top level is {type(jf.data).__name__}, not an object",
                       "the file must hold one JSON object")
            continue
        for path, loc in jf.duplicates:
            key = ".".join(str(p) for p in path)
            first = jf.locs[path][0].line
            folder.findings.append(Finding(
                "QL-JSON-01", ERROR, folder.fpath(name), loc.line, key,
                f'duplicate key "{key}" (first at line {first}): Python json keeps the last value, other parsers '
                "keep the first or reject the file", "delete one of the two entries"))
        for lit in sorted(set(jf.nonfinite)):
            folder.add("QL-JSON-04", WARNING, name, (), f"non-standard literal {lit}: strict JSON parsers reject it",
                       "use a finite number or null")
        if name == CONFIG and not {"model_type", "architectures", "vocab_size"} & set(jf.data):
            continue  # some other tool's config.json (the hook matches any file of that name)
        schema = {CONFIG: _CONFIG_TYPES, GENCONFIG: _GEN_TYPES, TOKCONFIG: _TOK_TYPES}[name]
        _check_types(folder, name, (), jf.data, schema)
        if name == CONFIG:
            for sub, sch in (("rope_scaling", _ROPE_TYPES), ("rope_parameters", _ROPE_TYPES),
                             ("dual_chunk_attention_config", _DCA_TYPES)):
                if isinstance(jf.data.get(sub), dict):
                    _check_types(folder, name, (sub,), jf.data[sub], sch, required=False)


def _check_types(folder, name, base, obj, schema, required=False):
    for key, kind in schema.items():
        if key not in obj:
            continue
        v = obj[key]
        if not _type_ok(kind, v):
            big = isinstance(v, int) and abs(v) >= 10 ** 30
            shown = f"a {len(str(abs(v)))}-digit number" if big else json.dumps(v)
            if len(shown) > 40:
                shown = shown[:37] + "..."
            dotted = ".".join(base + (key,))
            if _out_of_range(v) and (isinstance(v, int) or math.isfinite(v)):
                folder.add("QL-JSON-03", ERROR, name, base + (key,),
                           f"{dotted} is {shown}: out of range (beyond 2**53 no JSON reader holds it exactly; "
                           "float64 overflows at 1.8e308, int64 at 9.2e18): loaders crash or misread it",
                           "write the intended value")
                continue
            folder.add("QL-JSON-03", ERROR, name, base + (key,),
                       f"{dotted} is {shown}, expected {_KIND_WORDS[kind.rstrip('?')]}"
                       f"{' or null' if kind.endswith('?') else ''}: loaders crash or misread it",
                       "write the value with the right JSON type")


def _rope_view(cfg):
    """(source key, params dict or None, theta or None, theta path) as transformers 5.x resolves them
    (``convert_rope_params_to_dict``: ``rope_parameters = rope_scaling or rope_parameters``): a non-empty
    rope_scaling replaces rope_parameters entirely; theta from the chosen block, else the top level."""
    rs, rp = cfg.get("rope_scaling"), cfg.get("rope_parameters")
    if isinstance(rs, dict) and rs:
        src, params = "rope_scaling", rs
    elif isinstance(rp, dict):
        src, params = "rope_parameters", rp
    else:
        src, params = None, None
    if params is not None and "rope_theta" in params:
        return src, params, params["rope_theta"], (src, "rope_theta")
    if "rope_theta" in cfg:
        return src, params, cfg["rope_theta"], ("rope_theta",)
    return src, params, None, None


def check_rope(ctx):
    cfg, f = ctx.cfg, ctx.folder
    src, p, theta, tpath = _rope_view(cfg)
    mpe, qwen = ctx.mpe, ctx.family is not None
    dca = cfg.get("dual_chunk_attention_config")
    # --- theta
    if theta is None and "rope_theta" not in cfg:
        if qwen:
            f.add("QL-ROPE-01", ERROR, CONFIG, ("rope_theta",),
                  "rope_theta is missing: transformers and vLLM fall back to 10000 (Qwen uses 1000000): wrong "
                  "RoPE base, output degrades with length", 'add "rope_theta": 1000000.0')
    elif _is_num(theta):
        if theta <= 0:
            f.add("QL-ROPE-01", ERROR, CONFIG, tpath, f"rope_theta {_fmt_num(theta)} is not positive",
                  "use the family value 1000000.0")
        elif qwen and theta < 1e5:
            if mpe is not None and mpe > 8192:
                f.add("QL-ROPE-01", ERROR, CONFIG, tpath,
                      f"rope_theta {_fmt_num(theta)} does not match the Qwen value 1000000 for a "
                      f"{mpe}-token context: wrong RoPE base, output degrades with length",
                      "set rope_theta to 1000000.0 (1e7 for the 1M models)")
            else:
                f.add("QL-ROPE-01", INFO, CONFIG, tpath,
                      f"rope_theta {_fmt_num(theta)} is below the usual Qwen 1000000 (fine for short-context "
                      "variants such as Qwen2.5-Math)", "check against the base checkpoint")
        elif qwen and not any(math.isclose(theta, t) for t in KNOWN_THETAS):
            f.add("QL-ROPE-01", INFO, CONFIG, tpath,
                  f"rope_theta {_fmt_num(theta)} is not a released Qwen value (1e6, 5e6, 1e7)",
                  "check against the base checkpoint")
    # --- v4 / v5 forms
    rs, rp = cfg.get("rope_scaling"), cfg.get("rope_parameters")
    if isinstance(rp, dict) and rp and isinstance(rs, dict) and rs:
        _check_both_rope_blocks(ctx, rs, rp)
    elif isinstance(rp, dict) and "rope_theta" in cfg:
        top_theta = cfg.get("rope_theta")
        if "rope_theta" in rp and _is_num(top_theta) and _is_num(rp["rope_theta"]) and \
                not math.isclose(top_theta, rp["rope_theta"]):
            f.add("QL-ROPE-11", WARNING, CONFIG, ("rope_parameters", "rope_theta"),
                  f"rope_parameters.rope_theta {_fmt_num(rp['rope_theta'])} != rope_theta {_fmt_num(top_theta)}: "
                  "transformers v4 reads the top-level value, v5 the rope_parameters one",
                  "keep one value in both places")
    elif isinstance(rp, dict) and qwen and "rope_theta" not in cfg:
        f.add("QL-ROPE-13", INFO, CONFIG, ("rope_parameters",),
              "RoPE is given only as v5 rope_parameters: transformers < 5 and older runtimes ignore it "
              "(theta 10000, no scaling)", 'also write top-level "rope_theta" for older loaders')
    plain = p is None or p.get("rope_type", p.get("type")) in ("default", "mrope", None)
    beyond = qwen and dca is None and bool(mpe) and plain and _check_trained_window(ctx, mpe, theta)
    if p is None:
        if not beyond and qwen and dca is None and _is_num(theta) and math.isclose(theta, 1e6) and mpe:
            limit = CHAT_CONTEXT if ctx.chat_model else 131072
            if mpe > limit:
                kind = "chat model was tuned at 32768" if ctx.chat_model else "released base models stop at 131072"
                f.add("QL-CTX-01", WARNING, CONFIG, ("max_position_embeddings",),
                      f"max_position_embeddings {mpe} with static RoPE and no rope_scaling: the {kind}; "
                      "positions past that produce garbage",
                      f'set max_position_embeddings to {32768 if ctx.chat_model else 131072}, or add rope_scaling '
                      '{"rope_type": "yarn", "factor": 4.0, "original_max_position_embeddings": 32768}')
        return
    _check_rope_params(ctx, src, p)


def _check_both_rope_blocks(ctx, rs, rp):
    """Both rope_scaling and rope_parameters: transformers 5.x reads rope_scaling only (and its rope_theta, else
    the top-level one); readers of the v5 form read rope_parameters.  Flag it, and say how they differ."""
    top = ctx.cfg.get("rope_theta")
    used_theta, other_theta = rs.get("rope_theta", top), rp.get("rope_theta", top)
    diffs = []
    if _norm_rope(rs) != _norm_rope(rp):
        diffs.append(f"scaling {_rope_summary(rs)} vs {_rope_summary(rp)}")
    if _is_num(used_theta) and _is_num(other_theta) and not math.isclose(used_theta, other_theta):
        diffs.append(f"theta {_fmt_num(used_theta)} vs {_fmt_num(other_theta)}")
    ignored = "ignores rope_parameters entirely"
    if diffs:
        ctx.folder.add("QL-ROPE-11", WARNING, CONFIG, ("rope_parameters",),
                       f"both rope_scaling and rope_parameters are set and differ ({'; '.join(diffs)}): transformers "
                       f"5.x uses rope_scaling (theta from it, else the top level) and {ignored}; readers of the v5 "
                       "form use rope_parameters: two different RoPEs from one folder",
                       "keep one block: the one the model was trained with")
    else:
        ctx.folder.add("QL-ROPE-11", INFO, CONFIG, ("rope_parameters",),
                       f"both rope_scaling and rope_parameters are set (they agree): transformers 5.x uses "
                       f"rope_scaling and {ignored}", "keep one block to avoid drift")


def _rope_summary(d):
    kind = d.get("rope_type", d.get("type", "default"))
    return json.dumps(kind) + (f" x{_fmt_num(d['factor'])}" if _is_num(d.get("factor")) else "")


# Longest context a released Qwen checkpoint runs with plain RoPE (no YaRN, no DCA): Qwen2/2.5 base models ship
# 131072; Qwen3-2507 models 262144.  The 1M models (Qwen2.5-*-1M) reach 1010000 only through DCA.
RELEASED_STATIC_WINDOW = {"qwen2": 131072, "qwen3": 262144}


def _check_trained_window(ctx, mpe, theta):
    """QL-CTX-02: a context far beyond any released Qwen's window with plain RoPE is an error (the classic case: a
    1M model whose dual_chunk_attention_config was deleted so that a runtime without DCA starts)."""
    limit = RELEASED_STATIC_WINDOW[ctx.family]
    if mpe <= limit:
        return False
    looks_1m = mpe > 2 * limit and _is_num(theta) and theta >= 5e6
    ctx.folder.add(
        "QL-CTX-02", ERROR, CONFIG, ("max_position_embeddings",),
        f"max_position_embeddings {mpe} with plain RoPE (no rope scaling, no dual_chunk_attention_config) is far "
        f"beyond any released {'Qwen2/2.5' if ctx.family == 'qwen2' else 'Qwen3'} window ({limit}): attention "
        "past the trained length produces garbage"
        + (" (a 1M-context model whose dual_chunk_attention_config was removed?)" if looks_1m else ""),
        "restore dual_chunk_attention_config (1M models) or YaRN rope scaling, or set max_position_embeddings to "
        f"at most {limit}")
    return True


def _norm_rope(d):
    d = {k: v for k, v in d.items() if k not in ("type", "rope_theta")}
    d.setdefault("rope_type", (d.get("type") or "default"))
    return json.dumps(d, sort_keys=True, default=str)


def _check_rope_params(ctx, src, p):
    f, cfg, mpe, qwen = ctx.folder, ctx.cfg, ctx.mpe, ctx.family is not None
    has_rt, has_t = "rope_type" in p, "type" in p
    same = {"mrope": "default"}  # Qwen2-VL's config class rewrites type "mrope" to rope_type "default"
    if has_rt and has_t and same.get(p["rope_type"], p["rope_type"]) != same.get(p["type"], p["type"]):
        f.add("QL-ROPE-06", ERROR, CONFIG, (src, "type"),
              f"{src}.type {json.dumps(p['type'])} conflicts with rope_type {json.dumps(p['rope_type'])}: "
              "transformers uses rope_type, readers of the legacy key use type", "delete the legacy type key")
    if has_t and not has_rt and isinstance(p["type"], str) and p["type"] != "mrope":
        f.add("QL-ROPE-02", WARNING, CONFIG, (src, "type"),
              f'{src} uses the legacy "type" key: readers that only look at "rope_type" run without scaling',
              'rename "type" to "rope_type"', edit=("rename_key", (src, "type"), "rope_type"))
    kind = p.get("rope_type", p.get("type", "default"))
    if not isinstance(kind, str):
        return
    if kind not in KNOWN_ROPE_TYPES:
        f.add("QL-ROPE-09", ERROR, CONFIG, (src, "rope_type" if has_rt else "type"),
              f"unknown rope type {json.dumps(kind)}: transformers has no init function for it and the model "
              "fails to build", f"use one of {', '.join(KNOWN_ROPE_TYPES[:4])}")
        return
    dca = cfg.get("dual_chunk_attention_config")
    if dca is not None and kind not in ("default", "mrope"):
        f.add("QL-DCA-02", ERROR, CONFIG, ("dual_chunk_attention_config",),
              f"dual_chunk_attention_config together with {kind} scaling: vLLM ignores the scaling under DCA, "
              "transformers ignores DCA, so the two runtimes compute different attention",
              f"remove {src} (DCA uses plain RoPE)")
    if kind in ("default", "mrope"):
        return
    if "factor" not in p:
        if kind in ("linear", "dynamic", "yarn", "longrope"):
            f.add("QL-ROPE-12", ERROR, CONFIG, (src,),
                  f"{kind} scaling without a factor: KeyError when the rotary embedding is built",
                  'add "factor" (4.0 for Qwen\'s YaRN recipe)')
        return
    factor = p["factor"]
    if not _is_num(factor):
        return  # QL-JSON-03
    if factor < 1:
        f.add("QL-ROPE-08", ERROR, CONFIG, (src, "factor"),
              f"{kind} factor {_fmt_num(factor)} < 1: positions are stretched instead of compressed",
              "use a factor > 1 (4.0 for 4x context) or remove the scaling block")
        return
    if factor == 1:
        f.add("QL-ROPE-08", WARNING, CONFIG, (src, "factor"),
              f"{kind} factor 1: the scaling is a no-op", "remove the scaling block or set the intended factor")
        return
    if _is_int(factor):
        f.add("QL-ROPE-08", INFO, CONFIG, (src, "factor"),
              f"{kind} factor is the integer {factor}: transformers warns that it should be a float",
              f"write {float(factor)}")
    if kind == "yarn":
        _check_yarn(ctx, src, p, float(factor))
    elif kind in ("linear", "dynamic") and qwen and mpe is not None and mpe >= NATIVE_CONTEXT * factor:
        f.add("QL-ROPE-10", WARNING, CONFIG, ("max_position_embeddings",),
              f"{kind} factor {_fmt_num(factor)} with max_position_embeddings {mpe} already multiplied: scaling "
              f"applied twice (vLLM allows {_fmt_num(mpe * factor)} positions; dynamic NTK only starts at {mpe})",
              f"set max_position_embeddings to the pre-training length {NATIVE_CONTEXT}",
              edit=("set_value", ("max_position_embeddings",), NATIVE_CONTEXT))


def _check_yarn(ctx, src, p, factor):
    f, cfg, mpe, qwen = ctx.folder, ctx.cfg, ctx.mpe, ctx.family is not None
    orig = p.get("original_max_position_embeddings")
    top = cfg.get("original_max_position_embeddings")
    if _is_int(top):
        if _is_int(orig) and orig != top:
            f.add("QL-ROPE-11", WARNING, CONFIG, ("original_max_position_embeddings",),
                  f"top-level original_max_position_embeddings {top} != {src}.original_max_position_embeddings "
                  f"{orig}: transformers v5 uses the top-level value, v4 and vLLM the {src} one",
                  "keep one value (Qwen: 32768 inside the rope block)")
        orig = top  # v5: a top-level value overrides the dict
    if orig is None:
        edit = None
        if qwen and mpe in (NATIVE_CONTEXT, int(NATIVE_CONTEXT * factor)):
            edit = ("insert_key", (src,), "original_max_position_embeddings", NATIVE_CONTEXT)
        f.add("QL-ROPE-07", ERROR, CONFIG, (src,),
              f"yarn without original_max_position_embeddings: vLLM raises KeyError, transformers assumes the "
              f"pre-training length was max_position_embeddings ({mpe})",
              f'add "original_max_position_embeddings": {NATIVE_CONTEXT}' if qwen else
              'add "original_max_position_embeddings" (the pre-training length)', edit=edit)
        return
    if not _is_int(orig) or orig <= 0:
        return
    f.add("QL-ROPE-05", INFO, CONFIG, (src,),
          "static YaRN is enabled in the checkpoint config: it also applies to short prompts (Qwen recommends "
          "adding it only when long inputs are expected)", "keep it only for long-context deployments")
    bad_orig = qwen and orig != NATIVE_CONTEXT
    if bad_orig:
        f.add("QL-ROPE-04", ERROR if orig > NATIVE_CONTEXT else WARNING, CONFIG,
              (src, "original_max_position_embeddings"),
              f"original_max_position_embeddings {orig} != Qwen's native pre-training length {NATIVE_CONTEXT}: "
              "the YaRN frequency ramp is computed for the wrong length",
              f"set original_max_position_embeddings to {NATIVE_CONTEXT}",
              edit=("set_value", (src, "original_max_position_embeddings"), NATIVE_CONTEXT))
    if mpe is None:
        return
    target = factor * orig
    target_i = int(target) if float(target).is_integer() else None
    if mpe == target:
        return
    edit = None if bad_orig or target_i is None else ("set_value", ("max_position_embeddings",), target_i)
    fix = f"set max_position_embeddings to factor x original = {_fmt_num(target)}"
    eff = f"transformers 4.45-4.55 use {mpe}/{orig} = {_fmt_num(round(mpe / orig, 4))} as the effective factor"
    if mpe > target:
        f.add("QL-ROPE-03", ERROR, CONFIG, ("max_position_embeddings",),
              f"yarn: max_position_embeddings {mpe} > factor x original ({_fmt_num(target)}): scaling applied "
              f"twice, positions past {_fmt_num(target)} are extrapolated; {eff}", fix, edit=edit)
    elif mpe == orig:
        f.add("QL-ROPE-03", WARNING, CONFIG, ("max_position_embeddings",),
              f"yarn: max_position_embeddings left at the original {mpe} instead of factor x original "
              f"({_fmt_num(target)}): {eff} (YaRN silently off); servers cap the context at {mpe}", fix, edit=edit)
    else:
        f.add("QL-ROPE-03", WARNING, CONFIG, ("max_position_embeddings",),
              f"yarn: max_position_embeddings {mpe} != factor x original ({_fmt_num(target)}); {eff} "
              "(long-context quality drop)", fix, edit=edit)


def check_dca(ctx):
    cfg, f = ctx.cfg, ctx.folder
    if "dual_chunk_attention_config" not in cfg or cfg["dual_chunk_attention_config"] is None:
        return
    d = cfg["dual_chunk_attention_config"]
    path = ("dual_chunk_attention_config",)
    if not isinstance(d, dict):
        return  # QL-JSON-03
    cs, ls = d.get("chunk_size"), d.get("local_size")
    for key, v in (("chunk_size", cs), ("local_size", ls)):
        if v is None:
            f.add("QL-DCA-01", ERROR, CONFIG, path,
                  f"dual_chunk_attention_config has no {key}: vLLM's DCA rotary embedding requires it",
                  f"add {key} (Qwen2.5-1M: chunk_size 262144, local_size 8192)")
        elif _is_int(v) and v <= 0:
            f.add("QL-DCA-01", ERROR, CONFIG, path + (key,), f"dual_chunk_attention_config.{key} {v} is not "
                  "positive", "use the released values (chunk_size 262144, local_size 8192)")
    if _is_int(cs) and _is_int(ls) and cs > 0 and ls > 0 and ls >= cs:
        f.add("QL-DCA-01", ERROR, CONFIG, path + ("local_size",),
              f"local_size {ls} >= chunk_size {cs}: the intra-chunk length chunk_size - local_size is not positive",
              "local_size must be smaller than chunk_size")
    if _is_int(cs) and ctx.mpe is not None and cs > ctx.mpe:
        f.add("QL-DCA-01", WARNING, CONFIG, path + ("chunk_size",),
              f"chunk_size {cs} > max_position_embeddings {ctx.mpe}: DCA never splits the input",
              "use a chunk_size below the context length")
    if "original_max_position_embeddings" not in d:
        f.add("QL-DCA-01", INFO, CONFIG, path,
              "dual_chunk_attention_config has no original_max_position_embeddings: vLLM disables the "
              "length-dependent attention scaling", "add original_max_position_embeddings (262144 for Qwen2.5-1M)")
    f.add("QL-DCA-03", INFO, CONFIG, path,
          "dual_chunk_attention_config is read by vLLM only: transformers runs plain full attention",
          "serve long inputs with vLLM")


def check_sliding_window(ctx):
    cfg, f = ctx.cfg, ctx.folder
    use = cfg.get("use_sliding_window") is True
    sw = cfg.get("sliding_window") if _is_int(cfg.get("sliding_window")) else None
    nl = cfg.get("num_hidden_layers") if _is_int(cfg.get("num_hidden_layers")) else None
    mwl = cfg.get("max_window_layers") if _is_int(cfg.get("max_window_layers")) else 28
    lt = cfg.get("layer_types")
    mpe = ctx.mpe
    v4 = set(range(mwl, nl)) if use and sw is not None and nl is not None else set()
    v5 = v4
    if isinstance(lt, list) and all(isinstance(x, str) for x in lt):
        bad = sorted({x for x in lt if x not in ("full_attention", "sliding_attention")})
        if nl is not None and len(lt) != nl:
            f.add("QL-SWA-03", ERROR, CONFIG, ("layer_types",),
                  f"layer_types has {len(lt)} entries for {nl} layers: transformers v5 refuses the config",
                  "one entry per layer")
        elif bad and ctx.family:
            f.add("QL-SWA-03", ERROR, CONFIG, ("layer_types",), f"layer_types contains {bad}: not a Qwen layer kind",
                  "use full_attention / sliding_attention")
        v5 = {i for i, x in enumerate(lt) if x == "sliding_attention"} if use and sw is not None else set()
        if v5 != v4 and nl is not None and len(lt) == nl:
            f.add("QL-SWA-03", WARNING, CONFIG, ("layer_types",),
                  f"layer_types windows layers {_ranges(v5) or 'none'} but use_sliding_window/max_window_layers "
                  f"give {_ranges(v4) or 'none'}: transformers v4 and v5 window different layers",
                  "make layer_types match use_sliding_window and max_window_layers")
    windowed = v5
    if use and sw is not None:
        if windowed and (mpe is None or sw < mpe):
            f.add("QL-SWA-01", WARNING, CONFIG, ("use_sliding_window",),
                  f"sliding-window attention is on: layers {_ranges(windowed)} only attend to the last {sw} tokens "
                  "(Qwen releases never trained with it; v4 applies it only with flash-attention)",
                  'set "use_sliding_window": false unless the model was trained with it')
        elif not windowed:
            f.add("QL-SWA-01", INFO, CONFIG, ("use_sliding_window",),
                  f"use_sliding_window is true but max_window_layers {mwl} >= num_hidden_layers {nl}: no layer is "
                  "windowed", "set use_sliding_window to false to say what runs")
    elif sw is not None and mpe is not None and sw < mpe and not use:
        dca = isinstance(cfg.get("dual_chunk_attention_config"), dict)  # 1M models: DCA bounds attention anyway
        f.add("QL-SWA-02", INFO if dca else WARNING, CONFIG, ("sliding_window",),
              f"inactive sliding_window {sw} < max_position_embeddings {mpe}: runtimes that ignore "
              f"use_sliding_window cap the usable context/KV window at {sw}",
              'set "sliding_window": null (or equal to max_position_embeddings)',
              edit=("set_value", ("sliding_window",), None))


def check_moe(ctx):
    """Mixture-of-experts keys of qwen2_moe / qwen3_moe configs (transformers' defaults when absent)."""
    cfg, f = ctx.cfg, ctx.folder
    mt = cfg.get("model_type")
    if mt not in MOE_MODEL_TYPES:
        return
    qwen2 = mt == "qwen2_moe"
    key = "num_experts" if "num_experts" in cfg or "num_local_experts" not in cfg else "num_local_experts"
    experts = cfg.get(key, 60 if qwen2 else 128)
    top_k = cfg.get("num_experts_per_tok", 4 if qwen2 else 8)
    for name, v in ((key, experts), ("num_experts_per_tok", top_k)):
        if not (_is_int(v) and v > 0):
            f.add("QL-MOE-01", ERROR, CONFIG, (name,), f"{name} {v!r} is not a positive integer",
                  "the released configs use num_experts 60/64/128 and num_experts_per_tok 4/8")
    if _is_int(experts) and _is_int(top_k) and 0 < experts < top_k:
        f.add("QL-MOE-02", ERROR, CONFIG, ("num_experts_per_tok",),
              f"num_experts_per_tok {top_k} > {key} {experts}: a token cannot use more experts than exist",
              f"set num_experts_per_tok <= {experts}")
    sizes = [("moe_intermediate_size", cfg.get("moe_intermediate_size", 1408 if qwen2 else 768))]
    if qwen2:
        sizes.append(("shared_expert_intermediate_size", cfg.get("shared_expert_intermediate_size", 5632)))
    for name, v in sizes:
        if not (_is_int(v) and v > 0):
            f.add("QL-MOE-03", ERROR, CONFIG, (name,), f"{name} {v!r} is not a positive integer",
                  "the per-expert SwiGLU width (e.g. 1408 for Qwen1.5-MoE-A2.7B, 768 for Qwen3-30B-A3B)")
    layers = cfg.get("num_hidden_layers") if _is_int(cfg.get("num_hidden_layers")) else None
    mlp_only = cfg.get("mlp_only_layers") or []
    if not isinstance(mlp_only, list) or not all(_is_int(i) for i in mlp_only):
        f.add("QL-MOE-04", ERROR, CONFIG, ("mlp_only_layers",), f"mlp_only_layers {mlp_only!r} is not a list of "
              "layer indices", "a list of integers such as [] or [0, 1]")
        mlp_only = []
    elif layers is not None and any(not 0 <= i < layers for i in mlp_only):
        outside = sorted({i for i in mlp_only if not 0 <= i < layers})
        f.add("QL-MOE-04", ERROR, CONFIG, ("mlp_only_layers",),
              f"mlp_only_layers {outside} outside the model's layers 0..{layers - 1}: transformers ignores them",
              f"use indices in [0, {layers})")
    elif len(set(mlp_only)) != len(mlp_only):
        f.add("QL-MOE-04", WARNING, CONFIG, ("mlp_only_layers",), "mlp_only_layers repeats a layer index",
              "list each dense layer once")
    step = cfg.get("decoder_sparse_step", 1)
    if not (_is_int(step) and step >= 1):
        f.add("QL-MOE-05", ERROR, CONFIG, ("decoder_sparse_step",),
              f"decoder_sparse_step {step!r} must be an integer >= 1 (layer i is sparse when (i + 1) % step == 0)",
              "1 makes every layer sparse (all released Qwen MoE models)")
    elif layers is not None and not any((i + 1) % step == 0 and i not in mlp_only for i in range(layers)):
        f.add("QL-MOE-05", WARNING, CONFIG, ("decoder_sparse_step",),
              f"no layer is sparse (decoder_sparse_step {step}, mlp_only_layers {mlp_only}): the experts are never "
              "used", "lower decoder_sparse_step or shorten mlp_only_layers")


def _ranges(s):
    s = sorted(s)
    if not s:
        return ""
    out, a, b = [], s[0], s[0]
    for x in s[1:]:
        if x == b + 1:
            b = x
            continue
        out.append(f"{a}-{b}" if a != b else str(a))
        a = b = x
    out.append(f"{a}-{b}" if a != b else str(a))
    return ",".join(out)


def check_tokens(ctx):
    f, cfg, gen = ctx.folder, ctx.cfg, ctx.gen
    qwen = ctx.family is not None
    vocab = ctx.vocab
    # --- vocabulary size
    if vocab is not None:
        tsize, tsrc = ctx.tokenizer_size, "tokenizer"
        if tsize is None and qwen and vocab >= QWEN_BPE_SIZE:
            tsize, tsrc = FAMILY_TOKENIZER_MIN[ctx.family], f"{ctx.family.capitalize()} tokenizer"
        if tsize is not None and vocab < tsize:
            top = ctx.name(tsize - 1)
            f.add("QL-VOC-01", ERROR, CONFIG, ("vocab_size",),
                  f"vocab_size {vocab} < {tsrc} size {tsize}: ids up to {top} fall outside the embedding matrix",
                  f"resize the embeddings to at least {tsize} (released checkpoints use 151936/152064)")
        if qwen and vocab >= QWEN_BPE_SIZE and vocab not in PADDED_VOCABS:
            f.add("QL-VOC-02", WARNING, CONFIG, ("vocab_size",),
                  f"vocab_size {vocab} is not a released Qwen size (151936/152064): embeddings were resized; the "
                  "saved weights, LoRA adapters and downstream tools must all use this shape",
                  "keep the released padded size unless the weights really were resized")
        elif qwen and vocab < QWEN_BPE_SIZE and ctx.tokenizer_size is None:
            f.add("QL-VOC-03", WARNING, CONFIG, ("vocab_size",),
                  f"vocab_size {vocab} is below the {QWEN_BPE_SIZE} Qwen BPE tokens: Qwen token ids index past the "
                  "embedding unless the model uses its own tokenizer", "use the released vocab_size")
    # --- special ids against vocab_size
    if vocab is not None:
        for name, data in ((CONFIG, cfg), (GENCONFIG, gen)):
            if data is None:
                continue
            for key in ("bos_token_id", "eos_token_id", "pad_token_id"):
                for i, tid in enumerate(_ids(data.get(key)) or []):
                    if tid >= vocab or tid < 0:
                        path = (key, i) if isinstance(data.get(key), list) else (key,)
                        f.add("QL-TOK-01", ERROR, name, path,
                              f"{key} {ctx.name(tid)} is outside the vocabulary (vocab_size {vocab}): index out of "
                              "range in the embedding", "use an id below vocab_size")
    # --- stop set
    stop = ctx.stop
    if qwen and not stop and ctx.tok_eos is None:
        name = GENCONFIG if gen is not None else CONFIG
        f.add("QL-EOS-07", ERROR, name, ("eos_token_id",),
              "no eos_token_id anywhere (config, generation_config, tokenizer): generation only ends at "
              "max_new_tokens", f"set eos_token_id ({IM_END} for chat models, {ENDOFTEXT} for base models)")
    for name, data in ((CONFIG, cfg), (GENCONFIG, gen)):
        ids = _ids(data.get("eos_token_id")) if data is not None else None
        for i, tid in enumerate(ids or []):
            path = ("eos_token_id", i) if isinstance(data.get("eos_token_id"), list) else ("eos_token_id",)
            tname = ctx.tok_names.get(tid)
            if tid in TERMINATORS or not qwen:
                continue
            if tname is not None:
                f.add("QL-TOK-03", ERROR, name, path,
                      f"eos_token_id contains {ctx.name(tid)}, which is not a terminator: generation stops "
                      f"{'at the start of a turn' if tid == IM_START else 'in the middle of the output'}",
                      f"remove {tid} from the eos list")
            elif 0 <= tid < QWEN_BPE_SIZE:
                f.add("QL-TOK-03", WARNING, name, path,
                      f"eos_token_id contains ordinary text token {tid}: generation stops whenever it is produced",
                      f"remove {tid} (use stop strings at serving time instead)")
    turn_end_name = ctx.turn_end or "<|im_end|>"
    turn_end = ctx.tok_ids.get(turn_end_name)
    if ctx.is_chat and turn_end is not None and stop and turn_end not in stop:
        edit = None
        if ctx.stop_source == GENCONFIG and ctx.gen_eos is not None:
            edit = ("set_value", ("eos_token_id",), [turn_end] + [x for x in ctx.gen_eos if x != turn_end])
            fname = GENCONFIG
        elif gen is not None and not ctx.gen_has_eos:
            edit = ("insert_key", (), "eos_token_id", [turn_end] + [x for x in (ctx.cfg_eos or []) if x != turn_end])
            fname = GENCONFIG
        else:
            fname = CONFIG
        f.add("QL-EOS-01", ERROR, ctx.stop_source, ("eos_token_id",),
              f"chat model: the effective stop set {{{', '.join(ctx.name(x) for x in sorted(stop))}}} (from "
              f"{ctx.stop_source}) lacks the turn end {ctx.name(turn_end)}: generation never stops at the end of "
              "a turn",
              f"add {turn_end} to the eos_token_id list in {fname}" if edit or gen is not None else
              f"add a generation_config.json with eos_token_id [{turn_end}, {ENDOFTEXT}]", edit=edit)
    if cfg is not None and ctx.cfg_eos and ctx.gen_has_eos and ctx.gen_eos is not None:
        missing = [x for x in ctx.cfg_eos if x not in ctx.gen_eos]
        if missing:
            f.add("QL-EOS-02", WARNING, CONFIG, ("eos_token_id",),
                  f"config.json eos {', '.join(ctx.name(x) for x in missing)} is not in generation_config.json eos "
                  f"{ctx.gen_eos}: transformers/vLLM stop on the latter, runtimes reading config.json on the former",
                  "make both files list the same stop tokens")
    if ctx.is_chat and cfg is not None and ctx.cfg_eos and turn_end is not None and turn_end not in ctx.cfg_eos:
        sev = WARNING if turn_end in stop else ERROR
        f.add("QL-EOS-03", sev, CONFIG, ("eos_token_id",),
              f"chat model config.json eos_token_id is {', '.join(ctx.name(x) for x in ctx.cfg_eos)}, not the turn "
              f"end {ctx.name(turn_end)}: runtimes that read config.json only never stop at the end of a turn",
              f"set eos_token_id to {turn_end}",
              edit=("set_value", ("eos_token_id",), turn_end) if ctx.cfg_eos == [ENDOFTEXT] and
              not isinstance(cfg.get("eos_token_id"), list) else None)
    if ctx.tok_eos is not None and (stop or ctx.cfg_eos):
        if stop and ctx.tok_eos not in stop:
            f.add("QL-EOS-04", ERROR, TOKCONFIG, ("eos_token",),
                  f"tokenizer eos {ctx.name(ctx.tok_eos)} is not in the stop set "
                  f"{{{', '.join(ctx.name(x) for x in sorted(stop))}}} from {ctx.stop_source}: a model fine-tuned "
                  "with this tokenizer emits a token generation never stops on",
                  f"add {ctx.tok_eos} to eos_token_id (or use the tokenizer that matches the model)")
        if ctx.cfg_eos and ctx.tok_eos not in ctx.cfg_eos:
            f.add("QL-EOS-05", WARNING, TOKCONFIG, ("eos_token",),
                  f"tokenizer eos {ctx.name(ctx.tok_eos)} differs from config.json eos_token_id "
                  f"{', '.join(ctx.name(x) for x in ctx.cfg_eos)}: training and inference use different end tokens",
                  "make tokenizer_config.json and config.json name the same eos")
    # --- pad / bos
    if qwen:
        pads = []
        for name, data in ((CONFIG, cfg), (GENCONFIG, gen)):
            if data is not None and _is_int(data.get("pad_token_id")):
                pads.append((name, ("pad_token_id",), data["pad_token_id"]))
        if ctx.tok is not None and _token_content(ctx.tok.get("pad_token")) is not None:
            pads.append((TOKCONFIG, ("pad_token",), ctx.tok_ids.get(_token_content(ctx.tok.get("pad_token")))))
        for name, path, pid in pads:
            if pid == IM_END and ctx.is_chat:
                f.add("QL-EOS-06", WARNING, name, path,
                      f"pad token is the chat turn end {ctx.name(IM_END)}: collators mask pad labels, so the model "
                      "never learns to emit its stop token", f"use <|endoftext|> ({ENDOFTEXT}) as pad")
        for name, data in ((CONFIG, cfg), (GENCONFIG, gen)):
            bos = data.get("bos_token_id") if data is not None else None
            if _is_int(bos) and bos != ENDOFTEXT and (bos in stop or bos == IM_END):
                f.add("QL-TOK-02", ERROR, name, ("bos_token_id",),
                      f"bos_token_id {ctx.name(bos)} is a stop token: runtimes that prepend bos start every prompt "
                      "with end-of-turn (Qwen uses bos 151643 and adds none)", f"set bos_token_id to {ENDOFTEXT}")


def lint_folder(path):
    folder = Folder(path)
    check_files(folder)
    if all(jf is None for jf in folder.files.values()):
        return folder
    ctx = Context(folder)
    if ctx.cfg is not None:
        for check in (check_rope, check_dca, check_sliding_window, check_moe):
            check(ctx)
    elif folder.files[CONFIG] is None:
        name = next(n for n in KNOWN_FILES if folder.files[n] is not None)
        folder.add("QL-GEN-01", INFO, name, (), "no config.json in this folder: token ids not checked against the "
                   "model", "lint the model folder")
    if ctx.cfg is not None or ctx.gen is not None:
        check_tokens(ctx)
    folder.findings.sort(key=lambda x: (x.file, x.line, -_SEV_RANK[x.severity], x.rule))
    return folder


# --------------------------------------------------------------------------------------------------------------
# --fix
# --------------------------------------------------------------------------------------------------------------


def _render(value, jf, loc, multiline):
    if not multiline or not isinstance(value, (list, dict)):
        return json.dumps(value)
    line_start = jf.text.rfind("\n", 0, loc.key_start) + 1
    indent = re.match(r"[ \t]*", jf.text[line_start:]).group()
    m = re.search(r"\n([ \t]+)\S", jf.text)
    unit = m.group(1) if m else "  "
    if unit and unit[0] == "\t":
        unit = "\t"
    elif len(unit) > 4:
        unit = "  "
    body = json.dumps(value, indent=len(unit) if unit != "\t" else "\t")
    return body.replace("\n", "\n" + indent)


def plan_edits(jf, edits):
    """Text replacements (start, end, new_text) for one file; None when the file cannot be edited safely."""
    if jf is None or jf.error is not None or jf.duplicates or not isinstance(jf.data, dict) or not jf.locs:
        return None
    out = []
    for edit in edits:
        op, path = edit[0], tuple(edit[1])
        if op == "set_value":
            loc = jf.loc(*path)
            if loc is None:
                continue
            multi = "\n" in jf.text[loc.val_start:loc.val_end]
            out.append((loc.val_start, loc.val_end, _render(edit[2], jf, loc, multi)))
        elif op == "rename_key":
            loc = jf.loc(*path)
            if loc is None or jf.loc(*(path[:-1] + (edit[2],))) is not None:
                continue
            out.append((loc.key_start, loc.key_end, json.dumps(edit[2])))
        elif op == "insert_key":
            key, value = edit[2], edit[3]
            members = [locs[-1] for p, locs in jf.locs.items() if len(p) == len(path) + 1 and p[:-1] == path
                       and isinstance(p[-1], str)]
            if not members or jf.loc(*(path + (key,))) is not None:
                continue
            last = max(members, key=lambda lc: lc.val_end)
            line_start = jf.text.rfind("\n", 0, last.key_start) + 1
            between = jf.text[line_start:last.key_start]
            if between.strip():  # members on one line: insert inline
                text = f", {json.dumps(key)}: {json.dumps(value)}"
            else:
                text = f",\n{between}{json.dumps(key)}: {_render(value, jf, last, isinstance(value, (list, dict)))}"
            out.append((last.val_end, last.val_end, text))
    spans = sorted(out, reverse=True)
    for a, b in zip(spans, spans[1:], strict=False):  # overlapping edits: keep none of them
        if b[1] > a[0]:
            return None
    return spans


def apply_fixes(folder, out):
    """Apply the unambiguous fixes of `folder`; print a unified diff per changed file. Returns changed paths."""
    import difflib
    import tempfile

    by_file = {}
    for fd in folder.findings:
        if fd.edit is not None:
            name = os.path.basename(fd.file)
            if fd.rule == "QL-EOS-01":
                name = GENCONFIG
            by_file.setdefault(name, []).append(fd.edit)
    changed = []
    for name, edits in by_file.items():
        jf = folder.files.get(name)
        spans = plan_edits(jf, edits)
        if not spans:
            continue
        text = jf.text
        for start, end, new in spans:
            text = text[:start] + new + text[end:]
        try:
            json.loads(text)
        except ValueError:
            continue
        if text == jf.text:
            continue
        shown = jf.path if os.path.isabs(jf.path) else None
        diff = difflib.unified_diff(jf.text.splitlines(True), text.splitlines(True),
                                    fromfile=shown or f"a/{jf.path}", tofile=shown or f"b/{jf.path}")
        out.write("".join(diff))
        if not text.endswith("\n") and jf.text.endswith("\n"):
            text += "\n"
        d = os.path.dirname(os.path.abspath(jf.path))
        fd_, tmp = tempfile.mkstemp(prefix=".qwen-lint-", dir=d)
        try:
            with os.fdopen(fd_, "w", encoding="utf-8", newline="") as fh:
                fh.write(text)
            with contextlib.suppress(OSError):
                os.chmod(tmp, os.stat(jf.path).st_mode & 0o7777)
            os.replace(tmp, jf.path)
        except BaseException:
            if os.path.exists(tmp):
                os.unlink(tmp)
            raise
        changed.append(jf.path)
    return changed


def fix_folder(folder, path, out, max_rounds=8):
    """Apply fixes until none is left (one fix can make another possible: a renamed `type` key lets the YaRN
    length fix apply), so that one ``--fix`` reaches the fixed point and a second one changes nothing.  Returns
    the re-linted folder and the changed paths."""
    changed = []
    for _ in range(max_rounds):
        now = apply_fixes(folder, out)
        if not now:
            break
        changed.extend(p for p in now if p not in changed)
        folder = lint_folder(path)
    return folder, changed


# --------------------------------------------------------------------------------------------------------------
# CLI
# --------------------------------------------------------------------------------------------------------------


class UsageError(Exception):
    pass


def group_inputs(paths):
    """Model folders to lint, in input order: folders as given, files grouped by their parent folder."""
    folders = []
    for p in paths:
        if os.path.isdir(p):
            folder = p
            if not any(os.path.isfile(os.path.join(p, n)) for n in KNOWN_FILES):
                raise UsageError(f"{p}: no config.json, generation_config.json or tokenizer_config.json in folder")
        elif os.path.isfile(p):
            if os.path.basename(p) not in KNOWN_FILES:
                raise UsageError(f"{p}: not a config file (expected one of {', '.join(KNOWN_FILES)})")
            folder = os.path.dirname(p) or "."
        else:
            raise UsageError(f"{p}: no such file or folder")
        folder = os.path.normpath(folder)
        if folder not in folders:
            folders.append(folder)
    return folders


def rules_markdown():
    lines = ["| id | severity | what it catches | run-time symptom it prevents |", "|---|---|---|---|"]
    for rid, (sev, what, symptom) in RULES.items():
        lines.append(f"| `{rid}` | {sev} | {what} | {symptom} |")
    return "\n".join(lines)


def build_parser():
    ap = argparse.ArgumentParser(
        prog="qwen-lint", description="Lint Qwen model folders (config.json, generation_config.json, "
        "tokenizer_config.json) for settings that break generation or long context.")
    ap.add_argument("paths", nargs="*", help="model folders, or config.json / generation_config.json / "
                    "tokenizer_config.json files (grouped by folder; siblings are read too)")
    ap.add_argument("--format", choices=("text", "json"), default="text", help="output format (default text)")
    ap.add_argument("--strict", action="store_true", help="exit 1 on warnings too")
    ap.add_argument("--fix", action="store_true", help="apply the unambiguous fixes in place and print a diff")
    ap.add_argument("--ignore", action="append", default=[], metavar="RULE",
                    help="rule id (or prefix such as QL-SWA) to skip; repeatable")
    ap.add_argument("--no-info", action="store_true", help="hide info-level findings")
    ap.add_argument("--list-rules", action="store_true", help="print the rule table (markdown) and exit")
    return ap


def main(argv=None):
    ap = build_parser()
    args = ap.parse_args(argv)
    out = sys.stdout
    if args.list_rules:
        out.write(rules_markdown() + "\n")
        return 0
    if not args.paths:
        ap.print_usage(sys.stderr)
        sys.stderr.write("qwen-lint: error: give at least one model folder or config file\n")
        return 2
    try:
        folders = group_inputs(args.paths)
    except UsageError as e:
        sys.stderr.write(f"qwen-lint: error: {e}\n")
        return 2
    try:
        results = []
        fixed = []
        for path in folders:
            folder = lint_folder(path)
            if args.fix:
                folder, changed = fix_folder(folder, path, sys.stderr if args.format == "json" else out)
                fixed.extend(p for p in changed if p not in fixed)
            results.append(folder)
    except OSError as e:
        sys.stderr.write(f"qwen-lint: error: {e}\n")
        return 2
    except Exception as e:  # a linter bug must still end in one clean line, not a traceback
        sys.stderr.write(f"qwen-lint: internal error ({type(e).__name__}: {e}); please report it\n")
        return 2
    findings = []
    for folder in results:
        for fd in folder.findings:
            if any(fd.rule == r or fd.rule.startswith(r.rstrip("-") + "-") for r in args.ignore):
                continue
            if args.no_info and fd.severity == INFO:
                continue
            findings.append(fd)
    counts = {s: sum(1 for fd in findings if fd.severity == s) for s in (ERROR, WARNING, INFO)}
    if args.format == "json":
        summary = {"folders": len(results), "errors": counts[ERROR], "warnings": counts[WARNING],
                   "infos": counts[INFO], "fixed_files": fixed}
        json.dump({"findings": [fd.as_dict() for fd in findings], "summary": summary}, out, indent=2)
        out.write("\n")
    else:
        for fd in findings:
            key = f" [{fd.key}]" if fd.key else ""
            out.write(f"{fd.file}:{fd.line}: {fd.severity} {fd.rule} {fd.message}{key}\n    fix: {fd.fix}\n")
        if findings:
            out.write(f"{len(results)} folder(s): {counts[ERROR]} error(s), {counts[WARNING]} warning(s), "
                      f"{counts[INFO]} info\n")
    if counts[ERROR] or (args.strict and counts[WARNING]):
        return 1
    return 0


def _entry():
    try:
        code = main()
    except KeyboardInterrupt:
        code = 130
    except BrokenPipeError:
        code = 0
    sys.exit(code)


if __name__ == "__main__":
    _entry()
