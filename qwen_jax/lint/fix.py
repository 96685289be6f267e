"""`--fix`: apply the findings' unambiguous edits to the JSON text in place (key order, indentation and the rest of
the file kept), through a temporary file and `os.replace`, printing a unified diff."""

from __future__ import annotations

import contextlib
import json
import os
import re

from qwen_jax.lint.linter import lint_folder


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
    import difflib  # only --fix needs these: a plain lint (the pre-commit hook) starts faster without them
    import tempfile

    by_file = {}
    for fd in folder.findings:
        if fd.edit is not None:
            by_file.setdefault(fd.edit_file, []).append(fd.edit)
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
