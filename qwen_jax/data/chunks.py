"""`Chunks`: a grain MapDataset view that groups k consecutive elements into one list.

Tokenization runs on chunks of documents (one batched tokenizer call each), both in the pipeline
and when the token cache is built, so both import it from here.
"""

from __future__ import annotations

import sys

import grain


class Chunks(grain.MapDataset):
    """Element c = [parent[c*k], ..., parent[c*k + k - 1]] (the last chunk may be shorter)."""

    def __init__(self, parent: grain.MapDataset, k: int):
        super().__init__(parent)
        self._k = k
        n = len(parent)
        self._len = sys.maxsize if n >= sys.maxsize else -(-n // k)
        self._n = n

    def __len__(self) -> int:
        return self._len

    def __str__(self) -> str:
        return f"Chunks({self._k})"

    def __getitem__(self, c):
        if isinstance(c, slice):
            return self.slice(c)
        return [self._parent[j] for j in range(c * self._k, min((c + 1) * self._k, self._n))]
