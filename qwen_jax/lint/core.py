"""The linter's core: findings, JSON files read with key locations, the model folder and what the rules read.

Standard library only (the pre-commit hook runs without installing jax/torch); `import qwen_jax.lint` loads no
numerical library (tests/test_lint_registry.py checks it in a fresh interpreter).
"""

from __future__ import annotations

import bisect
import json
import math
import os
import re

from qwen_jax.lint.facts import IM_END, QWEN_SPECIALS, TEXT_ARCHITECTURES, TEXT_MODEL_TYPES
from qwen_jax.lint.rules import Rule

CONFIG, GENCONFIG, TOKCONFIG = "config.json", "generation_config.json", "tokenizer_config.json"
KNOWN_FILES = (CONFIG, GENCONFIG, TOKCONFIG)

ERROR, WARNING, INFO = "error", "warning", "info"
SEV_RANK = {INFO: 0, WARNING: 1, ERROR: 2}


class Finding:
    """One finding.  `rule` is the registered id; `edit` is what --fix applies to the folder's file `edit_file`
    (``("set_value", path, value)``, ``("rename_key", path, new_key)`` or ``("insert_key", object_path, key,
    value)``), None when the fix needs a human."""

    __slots__ = ("rule", "severity", "file", "line", "key", "message", "fix", "edit", "edit_file")

    def __init__(self, rule, severity, file, line, key, message, fix, edit=None, edit_file=None):
        self.rule, self.severity, self.file, self.line = rule, severity, file, line
        self.key, self.message, self.fix, self.edit = key, message, fix, edit
        self.edit_file = edit_file

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


def is_int(v):
    return isinstance(v, int) and not isinstance(v, bool) and abs(v) <= MAX_JSON_NUMBER


def is_num(v):
    return (is_int(v) or isinstance(v, float)) and math.isfinite(v) and abs(v) <= MAX_JSON_NUMBER


def id_list(v):
    """An id field (int or list of ints) as a list of ints; None when absent, null or wrongly typed."""
    if is_int(v):
        return [v]
    if isinstance(v, list) and v and all(is_int(x) for x in v):
        return list(v)
    return None


def fmt_num(x):
    if isinstance(x, float) and x.is_integer() and abs(x) < 1e16:
        x = int(x)
    return str(x)


def token_content(v):
    if isinstance(v, str):
        return v
    if isinstance(v, dict) and isinstance(v.get("content"), str):
        return v["content"]
    return None


# --------------------------------------------------------------------------------------------------------------
# The folder and what the rules read from it
# --------------------------------------------------------------------------------------------------------------


class Folder:
    """The known config files of one model folder, parsed once, and the findings about them."""

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

    def add(self, rule: Rule, severity, name, path, message, fix, edit=None, edit_file=None, line=None):
        """Record a finding of registered `rule` on file `name` at key `path` (its line unless `line` is given);
        `edit` applies to `edit_file` (default: `name`)."""
        jf = self.files.get(name)
        if line is None:
            line = jf.line(*path) if jf is not None and jf.error is None else 1
        key = ".".join(str(p) for p in path) if path else None
        self.findings.append(Finding(rule.id, severity, self.fpath(name), line, key, message, fix, edit,
                                     edit_file or name))


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
        self.mpe = cfg.get("max_position_embeddings") if is_int(cfg.get("max_position_embeddings")) else None
        self.vocab = cfg.get("vocab_size") if is_int(cfg.get("vocab_size")) else None
        # token table
        self.tok_ids = dict(QWEN_SPECIALS) if self.family else {}
        added = {}
        if self.tok is not None and isinstance(self.tok.get("added_tokens_decoder"), dict):
            for k, v in self.tok["added_tokens_decoder"].items():
                c = token_content(v)
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
        self.cfg_eos = id_list(cfg.get("eos_token_id"))
        self.gen_has_eos = self.gen is not None and self.gen.get("eos_token_id") is not None
        self.gen_eos = id_list(self.gen.get("eos_token_id")) if self.gen is not None else None
        # transformers: generation_config.json wins when it sets eos; vLLM also adds it to the tokenizer's eos.
        self.stop = set(self.gen_eos if self.gen_has_eos and self.gen_eos is not None else self.cfg_eos or [])
        self.stop_source = GENCONFIG if self.gen_has_eos else CONFIG
        tok_eos = token_content(self.tok.get("eos_token")) if self.tok is not None else None
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
        if is_int(cfg.get("bos_token_id")):
            ids.add(cfg["bos_token_id"])
        return IM_END in ids

    def name(self, tid):
        n = self.tok_names.get(tid)
        return f"{n} ({tid})" if n else str(tid)
