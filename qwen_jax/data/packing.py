"""First-fit packing into fixed-length rows, per lane.

Pieces are ``(doc, start, stop)`` references into tokenized documents held by the iterator, so the packer's state
(pending pieces, open rows) is a few integers per document and can be saved as JSON and rebuilt exactly.

A lane keeps up to ``buffer`` open rows.  Each incoming piece goes into the first open row with room; if none has
room, a new row is opened, and when ``buffer`` rows are already open the oldest is emitted first.  A row that is
exactly full is emitted at once.  Pieces longer than the row length are truncated (head kept; counted) or split into
row-length pieces (counted), per ``long_examples``.  When the row length changes (a schedule stage boundary), open
rows are dissolved back into the pending queue and repacked at the new length -- no token is lost.
"""

from __future__ import annotations

import collections
from collections.abc import Callable

import numpy as np

Piece = tuple[int, int, int]  # (doc id, start, stop)


class Lane:
    def __init__(self, *, buffer: int, pack: bool, split: bool, stats: collections.Counter):
        self.buffer = max(1, int(buffer)) if pack else 1
        self.pack = pack
        self.split = split
        self.stats = stats
        self.pending: collections.deque[Piece] = collections.deque()
        self.rows: list[list[Piece]] = []  # open rows
        self.used: list[int] = []  # tokens in each open row
        self.seq_len = None  # the length the open rows were built for

    # -- state -------------------------------------------------------------------------------------------------
    def get_state(self) -> dict:
        return {"pending": [list(p) for p in self.pending], "rows": [[list(p) for p in r] for r in self.rows],
                "seq_len": self.seq_len}

    def set_state(self, st: dict) -> None:
        self.pending = collections.deque(tuple(p) for p in st["pending"])
        self.rows = [[tuple(p) for p in r] for r in st["rows"]]
        self.used = [self._used(r) for r in self.rows]
        self.seq_len = st["seq_len"]

    def doc_ids(self) -> set[int]:
        ids = {p[0] for p in self.pending}
        for r in self.rows:
            ids.update(p[0] for p in r)
        return ids

    # -- packing -----------------------------------------------------------------------------------------------
    def _set_len(self, seq_len: int) -> None:
        if self.seq_len != seq_len:
            # Dissolve open rows (oldest first) back to the front of the queue, in their original order.
            back = [p for r in self.rows for p in r]
            self.rows, self.used = [], []
            self.pending.extendleft(reversed(back))
            self.seq_len = seq_len

    @staticmethod
    def _used(row: list[Piece]) -> int:
        return sum(p[2] - p[1] for p in row)

    def next_row(self, seq_len: int, pull: Callable[[], bool]) -> list[Piece] | None:
        """Returns the pieces of the next row, or None when the lane has no data left.

        ``pull()`` moves one more document of this lane into ``pending``; it returns False at the end of the data.
        """
        self._set_len(seq_len)
        while True:
            if self.rows and max(self.used) >= seq_len:
                i = self.used.index(max(self.used))
                self.used.pop(i)
                return self.rows.pop(i)
            if not self.pending and not pull():
                if self.rows:
                    self.used.pop(0)
                    return self.rows.pop(0)
                return None
            doc, start, stop = self.pending.popleft()
            n = stop - start
            if n > seq_len:
                if self.split:
                    if start == 0:
                        self.stats["split_examples"] += 1
                    self.pending.appendleft((doc, start + seq_len, stop))
                else:
                    self.stats["truncated_examples"] += 1
                    self.stats["truncated_tokens"] += n - seq_len
                stop = start + seq_len
                n = seq_len
            piece = (doc, start, stop)
            if not self.pack:
                return [piece]
            for i, u in enumerate(self.used):
                if seq_len - u >= n:
                    self.rows[i].append(piece)
                    self.used[i] += n
                    break
            else:
                self.rows.append([piece])
                self.used.append(n)
                if len(self.rows) > self.buffer:
                    self.used.pop(0)
                    return self.rows.pop(0)


def build_rows(rows: list[list[Piece] | None], seq_len: int, docs: dict[int, dict]) -> dict[str, np.ndarray]:
    """Materializes rows of pieces into the batch arrays (labels shifted inside each segment)."""
    b = len(rows)
    input_ids = np.zeros((b, seq_len), np.int32)
    positions = np.zeros((b, seq_len), np.int32)
    segment_ids = np.zeros((b, seq_len), np.int32)
    targets = np.zeros((b, seq_len), np.int32)
    loss_mask = np.zeros((b, seq_len), np.float32)
    for i, row in enumerate(rows or []):
        off = 0
        for seg, (doc, start, stop) in enumerate(row or [], start=1):
            n = stop - start
            d = docs[doc]
            ids, mask = d["ids"][start:stop], d["mask"][start:stop]
            input_ids[i, off:off + n] = ids
            positions[i, off:off + n] = np.arange(n, dtype=np.int32)
            segment_ids[i, off:off + n] = seg
            targets[i, off:off + n - 1] = ids[1:]
            loss_mask[i, off:off + n - 1] = mask[1:]
            off += n
    return {"input_ids": input_ids, "positions": positions, "segment_ids": segment_ids, "targets": targets,
            "loss_mask": loss_mask}
