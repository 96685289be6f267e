"""Random-access record sources over JSONL and Parquet files.

A source is one entry of ``config.data.sources``: a path, glob or ``bundled:NAME``, expanded to a sorted list of
files that are concatenated.  Records are read lazily (JSONL: by byte offset; Parquet: memory-mapped per process), so
the sources are cheap to pickle into grain worker processes.  Each record comes back as a :class:`RawRecord` with its
location (``file:line`` for JSONL, ``file:row N`` for Parquet); JSON parsing and field checks happen later, in the
tokenization step, so that a bad record is reported with that location.

Before that, building a source checks what can be checked once, up front, so that a run fails before its first step
rather than hours in: every configured path matches a file, every file can be read and holds records, and (with
``strict``, i.e. ``data.skip_bad_records=False``) every JSONL line is UTF-8 and one JSON object.  These failures raise
:class:`~qwen_jax.data.errors.DataError` naming the file and line.  The JSONL check rides on the scan that indexes
line offsets, which reads every byte anyway.
"""

from __future__ import annotations

import bisect
import dataclasses
import glob
import json
import os
from typing import Any

import numpy as np

from qwen_jax.data import passkey
from qwen_jax.data.errors import DataError

KINDS = ("chat", "continuation", "text")  # file sources
SYNTHETIC_KINDS = (passkey.KIND,)  # generated sources: no path (qwen_jax/data/passkey.py)
PARQUET_SUFFIXES = (".parquet", ".pq")
JSONL_SUFFIXES = (".jsonl", ".json", ".jsonl.txt")
DATA_SUFFIXES = JSONL_SUFFIXES + PARQUET_SUFFIXES
BUNDLED_DIR = os.path.join(os.path.dirname(os.path.abspath(__file__)), "bundled")


@dataclasses.dataclass
class RawRecord:
    source: int  # index into config.data.sources
    location: str  # "path:line" or "path:row N"
    payload: Any  # bytes (a JSONL line) or dict (a Parquet row)


def source_specs(sources) -> list[dict]:
    """``config.data.sources`` as plain dicts {path, kind, weight}, checked (DataError naming ``data.sources[i]``).

    A synthetic kind (``passkey``) has no path ('' here) and its own settings under the key ``synthetic``."""
    if isinstance(sources, str | bytes) or not hasattr(sources, "__len__"):
        raise DataError(f"data.sources must be a list of {{\"path\", \"kind\", \"weight\"}} objects, got {sources!r}")
    if not sources:
        raise DataError("data.sources is empty")
    out = []
    for i, s in enumerate(sources):
        key = f"data.sources[{i}]"
        if not hasattr(s, "keys"):
            raise DataError(f"{key} must be an object with a 'path' (and 'kind', 'weight'), got {s!r}")
        s = dict(s)
        kind = s.get("kind", "chat")
        weight = check_weight(s.get("weight", 1.0), key)
        if kind in SYNTHETIC_KINDS:
            out.append({"path": "", "kind": kind, "weight": weight, "synthetic": passkey.passkey_spec(s, key)})
            continue
        unknown = sorted(set(s) - {"path", "kind", "weight"})
        if unknown:
            raise DataError(f"{key}: unknown field(s) {unknown}; valid: path, kind, weight")
        if not isinstance(s.get("path"), str) or not s["path"]:
            raise DataError(f"{key}.path must be a file, glob or 'bundled:NAME', got {s.get('path')!r}")
        if kind not in KINDS:
            raise DataError(f"{key}.kind must be one of {KINDS + SYNTHETIC_KINDS}, got {kind!r}")
        out.append({"path": s["path"], "kind": kind, "weight": weight})
    return out


def check_weight(w, key: str) -> float:
    if isinstance(w, bool) or not isinstance(w, int | float) or not w > 0:
        raise DataError(f"{key}.weight must be a number > 0, got {w!r}")
    return float(w)


def open_source(index: int, spec: dict, strict: bool = True):
    """The record source of one checked ``source_specs`` entry: its files, or a synthetic generator."""
    if spec["kind"] == passkey.KIND:
        return PasskeySource(index, spec["synthetic"])
    return FileSource(index, spec["path"], strict)


class PasskeySource:
    """``size`` generated passkey trials (grain ``RandomAccessDataSource`` protocol); payload = the trial's dict."""

    def __init__(self, index: int, spec: dict):
        self.index, self.spec = index, dict(spec)

    def __len__(self) -> int:
        return int(self.spec["size"])

    def __getitem__(self, i: int) -> RawRecord:
        i = int(i) % len(self)
        return RawRecord(self.index, f"passkey[{i}]", dataclasses.asdict(passkey.draw_trial(self.spec, i)))


def resolve_paths(path: str, key: str = "data source") -> list[str]:
    """The files of one source path (a file, a glob or ``bundled:NAME``), sorted; ``key`` names it in errors."""
    shown = path
    if path.startswith("bundled:"):
        path = os.path.join(BUNDLED_DIR, path[len("bundled:"):])
    path = os.path.expanduser(path)
    if any(ch in path for ch in "*?["):
        files = sorted(p for p in glob.glob(path, recursive=True) if not os.path.isdir(p))
    else:
        if os.path.isdir(path):
            raise DataError(f"{key}: {shown!r} is a directory (give a file or a glob such as '{shown}/*.jsonl')")
        files = [path] if os.path.exists(path) else []
    if not files:
        raise DataError(f"{key}: {shown!r} matches no file")
    for f in files:
        if not f.endswith(DATA_SUFFIXES):
            raise DataError(f"{key}: {f}: expected a {' or '.join(DATA_SUFFIXES)} file")
    return files


def check_json_line(line: bytes) -> str | None:
    """Why a JSONL line is not one UTF-8 JSON object, or None if it is."""
    try:
        text = line.decode("utf-8")
    except UnicodeDecodeError as e:
        return f"not UTF-8 (byte 0x{line[e.start]:02x} at column {e.start + 1})"
    try:
        value = json.loads(text.rstrip("\r\n"))
    except json.JSONDecodeError as e:
        return f"not valid JSON ({e.msg} at column {e.pos + 1})"
    if not isinstance(value, dict):
        return f"a record must be a JSON object, got {type(value).__name__}"
    return None


class _JsonlFile:
    def __init__(self, path: str, strict: bool = True):
        self.path = path
        offsets, lengths, lines = [], [], []
        try:
            with open(path, "rb") as f:
                pos = 0
                for lineno, line in enumerate(f, start=1):
                    if line.strip():  # blank lines are ignored
                        if strict and (why := check_json_line(line)):
                            raise DataError(f"{path}:{lineno}: {why} "
                                            "(set data.skip_bad_records=True to skip and count bad records)")
                        offsets.append(pos)
                        lengths.append(len(line))
                        lines.append(lineno)
                    pos += len(line)
        except OSError as e:
            raise DataError(f"{path}: cannot read ({e.strerror})") from None
        self.offsets = np.asarray(offsets, np.int64)
        self.lengths = np.asarray(lengths, np.int64)
        self.lines = np.asarray(lines, np.int64)
        self._fd = None

    def __len__(self) -> int:
        return len(self.offsets)

    def __getstate__(self):
        d = dict(self.__dict__)
        d["_fd"] = None
        return d

    def get(self, i: int) -> tuple[str, Any]:
        if self._fd is None:
            self._fd = os.open(self.path, os.O_RDONLY)  # kept open for the life of the process; pread is thread-safe
        line = os.pread(self._fd, int(self.lengths[i]), int(self.offsets[i]))
        return f"{self.path}:{int(self.lines[i])}", line


class _ParquetFile:
    def __init__(self, path: str):
        import pyarrow.parquet as pq

        self.path = path
        import pyarrow as pa

        try:
            self._n = pq.ParquetFile(path).metadata.num_rows
        except (OSError, pa.ArrowException) as e:  # ArrowInvalid: not Parquet, truncated
            raise DataError(f"{path}: not a readable Parquet file ({str(e).splitlines()[0]})") from None
        self._table = None

    def __len__(self) -> int:
        return self._n

    def __getstate__(self):
        d = dict(self.__dict__)
        d["_table"] = None
        return d

    def get(self, i: int) -> tuple[str, Any]:
        if self._table is None:
            import pyarrow.parquet as pq

            self._table = pq.read_table(self.path, memory_map=True)
        return f"{self.path}:row {i + 1}", self._table.slice(i, 1).to_pylist()[0]


class FileSource:
    """Concatenation of the files of one configured source; grain ``RandomAccessDataSource`` protocol.

    ``strict``: check every JSONL line up front (UTF-8, one JSON object); the first bad one is a DataError."""

    def __init__(self, index: int, path: str, strict: bool = True):
        self.index = index
        key = f"data.sources[{index}].path"
        self.files = []
        for p in resolve_paths(path, key):
            if p.endswith(PARQUET_SUFFIXES):
                self.files.append(_ParquetFile(p))
            else:
                self.files.append(_JsonlFile(p, strict))
        self._starts = np.cumsum([0] + [len(f) for f in self.files]).tolist()
        if self._starts[-1] == 0:
            what = self.files[0].path if len(self.files) == 1 else f"{path!r} ({len(self.files)} files)"
            raise DataError(f"{key}: {what} is empty (no records)")

    def __len__(self) -> int:
        return self._starts[-1]

    def __getitem__(self, i: int) -> RawRecord:
        i = int(i) % len(self)
        k = bisect.bisect_right(self._starts, i) - 1
        loc, payload = self.files[k].get(i - self._starts[k])
        return RawRecord(self.index, loc, payload)
