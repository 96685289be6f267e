"""Check the linter against a folder of reference configs one has locally (not part of the repository).

Layout: `REF_DIR/real/<model>/` holds published configs (each must lint without a warning or an error);
`REF_DIR/cases/<name>/` holds a broken config plus `expected.json` (`rule_ids`, `min_severity`, optional
`must_not_flag`): each must get at least one of its rule ids at `min_severity` or above, and none of the
`must_not_flag` ones.  Usage: python benchmarks/check_reference.py REF_DIR (or QWEN_REF_CONFIGS=REF_DIR).
tests/test_lint_config.py runs it on a folder it builds.
"""

from __future__ import annotations

import json
import os
import re
import sys

sys.path.insert(0, os.path.join(os.path.dirname(os.path.abspath(__file__)), ".."))

from qwen_jax.lint import SEV_RANK, lint_folder  # noqa: E402


def main(argv=None):
    argv = sys.argv[1:] if argv is None else argv
    ref = argv[0] if argv else os.environ.get("QWEN_REF_CONFIGS", "")
    if not ref or not os.path.isdir(ref):
        print(f"error: reference folder {ref!r} is not a folder (usage: check_reference.py REF_DIR)", file=sys.stderr)
        return 2
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
        minsev = SEV_RANK[exp.get("min_severity", "warning")]
        got = {f.rule: max(SEV_RANK[g.severity] for g in fs if g.rule == f.rule) for f in fs}
        hit = [r for r in want if got.get(r, -1) >= minsev]
        top = max(got.values(), default=-1)
        forbidden = [m.split()[0] for m in exp.get("must_not_flag", []) if re.match(r"QL-", m)]
        bad_flags = [r for r in forbidden if r in got]
        good = bool(hit) and top >= minsev and not bad_flags
        ok &= good
        inv = {v: k for k, v in SEV_RANK.items()}
        print(f"case  {name:40s} {'OK' if good else 'MISS'}  expected {want}>={exp.get('min_severity')}; "
              f"got {', '.join(f'{r}:{inv[s]}' for r, s in sorted(got.items()))}"
              + (f"; FORBIDDEN {bad_flags}" if bad_flags else ""))
    print("ALL OK" if ok else "FAILURES")
    return 0 if ok else 1


if __name__ == "__main__":
    sys.exit(main())
