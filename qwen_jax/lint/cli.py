"""`qwen-lint` (also `python -m qwen_jax.lint`, and `tools/lint_config.py` for the pre-commit hook).

Exit status: 0 no error (warnings allowed), 1 at least one error (or a warning with ``--strict``), 2 usage error.
"""

from __future__ import annotations

import argparse
import json
import os
import sys

from qwen_jax.lint.core import ERROR, INFO, KNOWN_FILES, WARNING
from qwen_jax.lint.fix import fix_folder
from qwen_jax.lint.linter import lint_folder
from qwen_jax.lint.rules import fixes_markdown, rules_markdown


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
    ap.add_argument("--list-fixes", action="store_true", help="print what --fix changes per rule (markdown) and exit")
    return ap


def main(argv=None):
    ap = build_parser()
    args = ap.parse_args(argv)
    out = sys.stdout
    if args.list_rules or args.list_fixes:
        out.write("\n\n".join(t() for t, on in ((rules_markdown, args.list_rules), (fixes_markdown, args.list_fixes))
                               if on) + "\n")
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


def entry():
    """`main` as a process: exit status, quiet on Ctrl-C and on a closed pipe (`qwen-lint ... | head`)."""
    try:
        code = main()
    except KeyboardInterrupt:
        code = 130
    except BrokenPipeError:
        code = 0
    sys.exit(code)

