"""Random-access record sources over JSONL and Parquet files.

A source is one entry of ``config.data.sources``: a path, glob or ``bundled:NAME``, expanded to a sorted list of
files that are concatenated.  Records are read lazily (JSONL: by byte offset; Parquet: memory-mapped per process), so
the sources are cheap to pickle into grain worker processes.  Each record comes back as a :class:`RawRecord` with its
location (``file:line`` for JSONL, ``file:row N`` for Parquet); JSON parsing and field checks happen later, in the
tokenization step, so that a bad record is reported with that location.
"""

from __future__ import annotations

import bisect
import dataclasses
import glob
import os
from typing import Any

import numpy as np

KINDS = ("chat", "continuation", "text")
BUNDLED_DIR = os.path.join(os.path.dirname(os.path.abspath(__file__)), "bundled")


@dataclasses.dataclass
class RawRecord:
    source: int  # index into config.data.sources
    location: str  # "path:line" or "path:row N"
    payload: Any  # bytes (a JSONL line) or dict (a Parquet row)


def resolve_paths(path: str) -> list[str]:
    if path.startswith("bundled:"):
        path = os.path.join(BUNDLED_DIR, path[len("bundled:"):])
    path = os.path.expanduser(path)
    if any(ch in path for ch in "*?["):
        files = sorted(glob.glob(path, recursive=True))
    else:
        files = [path] if os.path.exists(path) else []
    if not files:
        raise FileNotFoundError(f"data source {path!r} matches no file")
    return files


class _JsonlFile:
    def __init__(self, path: str):
        self.path = path
        offsets, lengths, lines = [], [], []
        with open(path, "rb") as f:
            pos = 0
            for lineno, line in enumerate(f, start=1):
                if line.strip():  # blank lines are ignored
                    offsets.append(pos)
                    lengths.append(len(line))
                    lines.append(lineno)
                pos += len(line)
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
        self._n = pq.ParquetFile(path).metadata.num_rows
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
    """Concatenation of the files of one configured source; grain ``RandomAccessDataSource`` protocol."""

    def __init__(self, index: int, path: str):
        self.index = index
        self.files = []
        for p in resolve_paths(path):
            if p.endswith((".parquet", ".pq")):
                self.files.append(_ParquetFile(p))
            elif p.endswith((".jsonl", ".json", ".jsonl.txt")):
                self.files.append(_JsonlFile(p))
            else:
                raise ValueError(f"data source file {p!r}: expected .jsonl or .parquet")
        self._starts = np.cumsum([0] + [len(f) for f in self.files]).tolist()
        if self._starts[-1] == 0:
            raise ValueError(f"data source {path!r} has no records")

    def __len__(self) -> int:
        return self._starts[-1]

    def __getitem__(self, i: int) -> RawRecord:
        i = int(i) % len(self)
        k = bisect.bisect_right(self._starts, i) - 1
        loc, payload = self.files[k].get(i - self._starts[k])
        return RawRecord(self.index, loc, payload)
