"""Check the linter against the shared reference configs (../shared/reference/qwen-configs), if present.

Every `real/<model>/` folder must lint without a warning or an error; every `cases/<name>/` folder must get at
least one of its expected rule ids at `min_severity` or above, and none of the `must_not_flag` rule ids.
Skips (exit 0) when the reference folder is absent.  Usage: python benchmarks/check_reference.py [REF_DIR]
"""

from __future__ import annotations

import json
import os
import re
import sys

sys.path.insert(0, os.path.join(os.path.dirname(os.path.abspath(__file__)), ".."))

from tools.lint_config import _SEV_RANK, lint_folder  # noqa: E402

DEFAULT = os.path.join(os.path.dirname(os.path.abspath(__file__)), "..", "..", "shared", "reference", "qwen-configs")


def main(argv=None):
    argv = sys.argv[1:] if argv is None else argv
    ref = argv[0] if argv else os.environ.get("QWEN_REF_CONFIGS", DEFAULT)
    if not os.path.isdir(ref):
        print(f"reference folder {ref} absent: skipped")
        return 0
    ok = True
    for name in sorted(os.listdir(os.path.join(ref, "real"))):
        fs = lint_folder(os.path.join(ref, "real", name)).findings
        bad = [f for f in fs if f.severity != "info"]
        infos = sorted({f.rule for f in fs if f.severity == "info"})
        print(f"real  {name:28s} {'CLEAN' if not bad else 'FALSE POSITIVE'}  info={infos}")
        for f in bad:
            print(f"      {f.severity} {f.rule} {f.message}")
        ok &= not bad
    for name in sorted(os.listdir(os.path.join(ref, "cases"))):
        d = os.path.join(ref, "cases", name)
        with open(os.path.join(d, "expected.json")) as fh:
            exp = json.load(fh)
        fs = lint_folder(d).findings
        want = exp.get("rule_ids", [])
        minsev = _SEV_RANK[exp.get("min_severity", "warning")]
        got = {f.rule: max(_SEV_RANK[g.severity] for g in fs if g.rule == f.rule) for f in fs}
        hit = [r for r in want if got.get(r, -1) >= minsev]
        top = max(got.values(), default=-1)
        forbidden = [m.split()[0] for m in exp.get("must_not_flag", []) if re.match(r"QL-", m)]
        bad_flags = [r for r in forbidden if r in got]
        good = bool(hit) and top >= minsev and not bad_flags
        ok &= good
        inv = {v: k for k, v in _SEV_RANK.items()}
        print(f"case  {name:40s} {'OK' if good else 'MISS'}  expected {want}>={exp.get('min_severity')}; "
              f"got {', '.join(f'{r}:{inv[s]}' for r, s in sorted(got.items()))}"
              + (f"; FORBIDDEN {bad_flags}" if bad_flags else ""))
    print("ALL OK" if ok else "FAILURES")
    return 0 if ok else 1


if __name__ == "__main__":
    sys.exit(main())
