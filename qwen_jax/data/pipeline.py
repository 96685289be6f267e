"""The input pipeline: sources -> mixture -> shuffle/epochs -> lanes -> tokenize (grain workers) -> pack -> batches.

Determinism and sharding
------------------------
The global document stream (weighted mixture of the shuffled, repeated sources; grain ``MapDataset``) is dealt
round-robin to ``num_lanes`` packing lanes: document ``i`` goes to lane ``i % num_lanes``.  Each lane packs its own
documents into rows; at every step lane ``l`` supplies ``global_batch / num_lanes`` consecutive rows of the global
batch (rows ``[l*R, (l+1)*R)``).  Process ``p`` of ``P`` owns lanes ``[p*L/P, (p+1)*L/P)`` and reads and tokenizes
only their documents, so its rows are exactly rows ``[p*B/P, (p+1)*B/P)`` of the single-process global batch: the
per-process batches concatenated in process order equal the ``process_count=1`` batch bit for bit.  ``num_lanes``
(default: gcd of the stage batch sizes) must not change between runs that should see the same data; the process
count must divide it.

Tokenization runs in grain worker processes (``worker_count``; ``mp_prefetch``) in stream order; packing runs in the
main process, so the output does not depend on the worker count.

Steps, schedule and state
-------------------------
The iterator counts steps itself: the ``k``-th ``next()`` of ``pipeline.iterator(start_step)`` returns the batch for
step ``start_step + k``, shaped ``[pipeline.per_process_batch_at(step), pipeline.seq_len_at(step)]``.

State: ``it.get_state()`` returns a small JSON-able dict (step, position in the document stream, each lane's pending
and open-row pieces as ``[doc, start, stop]`` triples, counters); ``it.set_state(state)`` on an iterator of a freshly
built pipeline with the same data config resumes bit-identically (the few buffered documents are re-tokenized).
The state does not depend on ``worker_count``, which may change between runs.  The iterator is a
``grain.DatasetIterator``, so Orbax can save it next to the params with ``grain.checkpoint.CheckpointSave(it)`` /
``grain.checkpoint.CheckpointRestore(it)`` (one ``process_<i>-of-<n>.json`` per process).
"""

from __future__ import annotations

import collections
import hashlib
import json
import logging
import sys
from typing import Any

import grain
import numpy as np

from qwen_jax.data.cache import build_or_load
from qwen_jax.data.chunks import Chunks
from qwen_jax.data.errors import DataError
from qwen_jax.data.packing import Lane, build_rows
from qwen_jax.data.schedule import Stage, packing_lanes, parse_schedule, stage_at
from qwen_jax.data.sources import SYNTHETIC_KINDS, RawRecord, open_source, source_specs
from qwen_jax.data.tokenization import (
    BadRecordError,
    Tokenize,
    TokenizeChunk,
    check_stop_tokens,
    doc_arrays,
    load_tokenizer,
    resolve_chat_setup,
)

log = logging.getLogger(__name__)
STATE_VERSION = 1


class _LaneSelect(grain.MapDataset):
    """Process-local view of the global stream: j -> global index (j // lp) * L + first + j % lp."""

    def __init__(self, parent: grain.MapDataset, num_lanes: int, first: int, lp: int):
        super().__init__(parent)
        self._L, self._first, self._lp = num_lanes, first, lp
        total = len(parent)
        if total >= sys.maxsize:
            self._len = sys.maxsize
        else:
            self._len = total // num_lanes * lp + max(0, min(total % num_lanes - first, lp))

    def __len__(self) -> int:
        return self._len

    def __str__(self) -> str:
        return f"LaneSelect(lanes={self._L}, first={self._first}, per_process={self._lp})"

    def global_index(self, j: int) -> int:
        return (j // self._lp) * self._L + self._first + j % self._lp

    def __getitem__(self, j):
        if isinstance(j, slice):
            return self.slice(j)
        return self._parent[self.global_index(j)]


class Pipeline:
    """Built by :func:`make_pipeline`; see the module docstring."""

    def __init__(self, cfg, *, process_index: int = 0, process_count: int = 1):
        self.cfg = cfg
        self.process_index, self.process_count = int(process_index), int(process_count)
        if not 0 <= self.process_index < self.process_count:
            raise ValueError(f"process_index {process_index} not in [0, {process_count})")
        if cfg.long_examples not in ("truncate", "split"):
            raise DataError(f"data.long_examples must be 'truncate' or 'split', got {cfg.long_examples!r}")
        self.sources = source_specs(cfg.sources)
        self.stages: list[Stage] = parse_schedule(cfg.seq_len_schedule, seq_len=cfg.seq_len,
                                                  global_batch_size=cfg.global_batch_size,
                                                  hold_tokens_per_batch=cfg.hold_tokens_per_batch)
        self.num_lanes = packing_lanes(self.stages, cfg.num_lanes, self.process_count)
        self.lanes_per_process = self.num_lanes // self.process_count
        self.first_lane = self.process_index * self.lanes_per_process

        self.chat_setup = resolve_chat_setup(cfg)  # which tokenizer and template, and why (chat_setup.describe())
        self.tokenizer_path = self.chat_setup.tokenizer_dir
        self.tokenizer = load_tokenizer(self.tokenizer_path)
        self.chat_template = self.chat_setup.chat_template
        kinds = {s["kind"] for s in self.sources}
        self.eos_id = check_stop_tokens(self.tokenizer, model_dir=cfg.model_dir, eos_token=cfg.eos_token, kinds=kinds)
        self.tokenize = Tokenize(self.tokenizer.backend_tokenizer, [s["kind"] for s in self.sources], self.eos_id,
                                 self.chat_template, template_vars=self.tokenizer.special_tokens_map)

        self.cached = bool(cfg.cache_dir)
        synthetic = sorted({s["kind"] for s in self.sources} & set(SYNTHETIC_KINDS))
        if self.cached and synthetic:
            raise DataError(f"data.cache_dir is set but a source is generated ({', '.join(synthetic)}): generated "
                            "records are not cached; set data.cache_dir=''")
        parts = []
        for k, s in enumerate(self.sources):
            src = open_source(k, s, strict=not cfg.skip_bad_records)
            if self.cached:
                src = build_or_load(cfg.cache_dir, src, s["kind"], self.tokenize, worker_count=int(cfg.worker_count))
            ds = grain.MapDataset.source(src)
            if cfg.shuffle:
                ds = ds.shuffle(seed=int(cfg.seed) * 1009 + k)  # reshuffled every epoch (seed + epoch)
            parts.append(ds.repeat(cfg.num_epochs))
        self.records = parts[0] if len(parts) == 1 else grain.MapDataset.mix(parts, [s["weight"] for s in self.sources])
        self.lane_records = _LaneSelect(self.records, self.num_lanes, self.first_lane, self.lanes_per_process)
        self.chunk_size = max(1, int(cfg.tokenize_chunk))
        if self.cached:  # records are already tokenized documents
            self.docs = self.lane_records
            self.doc_chunks = Chunks(self.lane_records, self.chunk_size)
        else:
            self.docs = self.lane_records.map(self.tokenize)  # random access (used to rebuild state)
            self.doc_chunks = Chunks(self.lane_records, self.chunk_size).map(TokenizeChunk(self.tokenize))

    # -- shapes ------------------------------------------------------------------------------------------------
    def stage_at(self, step: int) -> Stage:
        return stage_at(self.stages, step)

    def seq_len_at(self, step: int) -> int:
        return self.stage_at(step).seq_len

    def global_batch_at(self, step: int) -> int:
        return self.stage_at(step).global_batch_size

    def per_process_batch_at(self, step: int) -> int:
        return self.global_batch_at(step) // self.process_count

    def fingerprint(self) -> str:
        keys = ["seed", "shuffle", "num_epochs", "pack", "pack_buffer", "long_examples", "seq_len", "seq_len_schedule",
                "global_batch_size", "hold_tokens_per_batch", "chat_template", "eos_token"]
        d = {k: self.cfg.get(k) for k in keys}
        d.update(sources=self.sources, lanes=self.num_lanes, process=[self.process_index, self.process_count],
                 eos_id=self.eos_id)
        return hashlib.sha256(json.dumps(d, sort_keys=True, default=str).encode()).hexdigest()[:16]

    # -- iteration ---------------------------------------------------------------------------------------------
    def iterator(self, start_step: int = 0) -> BatchIterator:
        """A fresh iterator whose first batch is for step ``start_step`` (data from the start of the stream).

        To resume a run, call ``set_state`` with the saved state instead (the state carries the step)."""
        return BatchIterator(self, start_step)

    def doc_iterator(self, start: int):
        """Iterator over chunks of tokenized documents, starting with the chunk that holds document ``start``."""
        c = start // self.chunk_size
        ds = self.doc_chunks[c:] if c else self.doc_chunks
        it_ds = ds.to_iter_dataset(grain.ReadOptions(num_threads=max(1, int(self.cfg.read_threads)),
                                                     prefetch_buffer_size=int(self.cfg.worker_buffer_size)))
        if self.cfg.worker_count > 0:
            from absl import flags

            if not flags.FLAGS.is_parsed():  # grain's worker code reads absl flags; outside absl.app use defaults
                flags.FLAGS.mark_as_parsed()
            it_ds = it_ds.mp_prefetch(grain.MultiprocessingOptions(
                num_workers=int(self.cfg.worker_count),
                per_worker_buffer_size=max(1, int(self.cfg.worker_buffer_size) // int(self.cfg.worker_count))))
        return iter(it_ds)

    def encode(self, record: dict | str | bytes, source: int = 0) -> dict[str, np.ndarray]:
        """Tokenizes one record as source ``source`` would: {"ids": int32[n], "mask": uint8[n]} (mask 1 = trained)."""
        payload = record if isinstance(record, str | bytes) else json.dumps(record)
        out = self.tokenize.map(RawRecord(source, "<record>", payload))
        if "bad" in out:
            raise BadRecordError(out["bad"])
        return doc_arrays(out)

    def decode(self, ids) -> str:
        return self.tokenizer.decode([int(i) for i in ids], skip_special_tokens=False)


class BatchIterator(grain.DatasetIterator):
    """Yields dicts of numpy arrays ``[per_process_batch, seq_len]``; checkpointable (see module docstring)."""

    def __init__(self, pipeline: Pipeline, start_step: int = 0):
        super().__init__()
        self._p = pipeline
        cfg = pipeline.cfg
        self.step = int(start_step)
        self._next_doc = 0
        self._exhausted = False
        self._docs: dict[int, dict] = {}
        self._doc_it = None
        self._chunk: collections.deque = collections.deque()
        self.counters: collections.Counter = collections.Counter()
        self._lanes = [Lane(buffer=cfg.pack_buffer, pack=cfg.pack, split=cfg.long_examples == "split",
                            stats=self.counters) for _ in range(pipeline.lanes_per_process)]

    # -- documents ---------------------------------------------------------------------------------------------
    def _ensure_doc_it(self):
        if self._doc_it is None:
            self._doc_it = self._p.doc_iterator(self._next_doc)
            self._chunk = collections.deque()
            self._skip = self._next_doc % self._p.chunk_size  # documents of the first chunk already consumed

    def close(self) -> None:
        if self._doc_it is not None and hasattr(self._doc_it, "close"):
            self._doc_it.close()
        self._doc_it = None
        super().close()

    def _add_doc(self, j: int, doc: dict) -> None:
        if "bad" in doc:
            if not self._p.cfg.skip_bad_records:
                raise BadRecordError(f"{doc['bad']} (set data.skip_bad_records=True to skip and count bad records)")
            self.counters["bad_records"] += 1
            self.counters[f"bad_records/source{doc['source']}"] += 1
            log.warning("skipping bad record %s", doc["bad"])
            return
        doc = doc_arrays(doc)
        n = len(doc["ids"])
        if n == 0:
            self.counters["empty_examples"] += 1
            return
        self._docs[j] = doc
        self.counters["examples"] += 1
        self.counters[f"examples/source{doc['source']}"] += 1
        self._lanes[j % len(self._lanes)].pending.append((j, 0, n))

    def _pull(self, lane: Lane) -> bool:
        while not lane.pending:
            if self._exhausted:
                return False
            self._ensure_doc_it()
            while not self._chunk:
                try:
                    chunk = next(self._doc_it)
                except StopIteration:
                    self._exhausted = True
                    return False
                self._chunk.extend(chunk[self._skip:])
                self._skip = 0
            doc = self._chunk.popleft()
            j = self._next_doc
            self._next_doc += 1
            self._add_doc(j, doc)
        return True

    def __next__(self) -> dict[str, np.ndarray]:
        self._assert_not_closed()
        stage = self._p.stage_at(self.step)
        per_lane = stage.global_batch_size // self._p.num_lanes
        rows = []
        for lane in self._lanes:
            for _ in range(per_lane):
                rows.append(lane.next_row(stage.seq_len, lambda lane=lane: self._pull(lane)))
        if all(r is None for r in rows):
            raise StopIteration
        batch = build_rows(rows, stage.seq_len, self._docs)
        keep = set()
        for lane in self._lanes:
            keep |= lane.doc_ids()
        for j in [j for j in self._docs if j not in keep]:
            del self._docs[j]
        c = self.counters
        real = int((batch["segment_ids"] > 0).sum())
        c["steps"] += 1
        c["rows"] += len(rows)
        c["slots"] += batch["input_ids"].size
        c["tokens"] += real
        c["segments"] += int(batch["segment_ids"].max(axis=1).sum())
        c["loss_tokens"] += int(batch["loss_mask"].sum())
        self.step += 1
        return batch

    # -- state -------------------------------------------------------------------------------------------------
    def get_state(self) -> dict[str, Any]:
        return {"version": STATE_VERSION, "fingerprint": self._p.fingerprint(), "step": self.step,
                "next_doc": self._next_doc, "exhausted": self._exhausted,
                "lanes": [lane.get_state() for lane in self._lanes], "counters": dict(self.counters)}

    def set_state(self, state: dict[str, Any]) -> None:
        if state.get("version") != STATE_VERSION:
            raise ValueError(f"data iterator state version {state.get('version')} != {STATE_VERSION}")
        if state["fingerprint"] != self._p.fingerprint():
            raise ValueError("data iterator state was saved with a different data config, lane layout or process "
                             "index/count; the resumed run would not see the same batches")
        if len(state["lanes"]) != len(self._lanes):
            raise ValueError("data iterator state has a different number of lanes")
        if self._doc_it is not None and hasattr(self._doc_it, "close"):
            self._doc_it.close()
        self._doc_it = None
        self.step = int(state["step"])
        self._next_doc = int(state["next_doc"])
        self._exhausted = bool(state["exhausted"])
        self.counters.clear()
        self.counters.update(state["counters"])
        for lane, st in zip(self._lanes, state["lanes"], strict=True):
            lane.set_state(st)
        self._docs = {}
        for j in sorted(set().union(*[lane.doc_ids() for lane in self._lanes])):
            self._docs[j] = doc_arrays(self._p.docs[j])  # re-tokenized in this process

    def stats(self) -> dict[str, float]:
        """Counters so far plus packing efficiency and mask ratio."""
        c = dict(self.counters)
        slots, tokens = c.get("slots", 0), c.get("tokens", 0)
        c["packing_efficiency"] = tokens / slots if slots else 0.0
        c["mask_ratio"] = c.get("loss_tokens", 0) / tokens if tokens else 0.0
        return c


def make_pipeline(data_cfg, *, process_index: int = 0, process_count: int = 1) -> Pipeline:
    """Builds the pipeline for one process; ``data_cfg`` is ``config.data`` (see :func:`default_config`)."""
    return Pipeline(data_cfg, process_index=process_index, process_count=process_count)
