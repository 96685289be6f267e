"""Optional pre-tokenization cache (``data.cache_dir``).

With ``cache_dir`` set, each source is tokenized once (in order, with ``worker_count`` grain workers) into
``<cache_dir>/<kind>-<key>/``: ``ids.bin`` (int32), ``mask.bin`` (uint8), ``offsets.npy`` (int64, n+1) and
``bad.json`` (record index -> error message, so bad records still fail or are skipped at the point the stream reaches
them).  ``key`` hashes the tokenizer, chat template, eos id, kind and the files' paths, sizes and mtimes, so a changed
input or tokenizer builds a new cache.  Later runs (and every epoch) read the memory-mapped arrays instead of
tokenizing: the batches are identical to the uncached pipeline's.  The cache is built in a temporary folder and renamed
into place, so concurrent builders (several hosts on a shared file system) are safe.
"""

from __future__ import annotations

import hashlib
import json
import logging
import os
import shutil
import tempfile

import grain
import numpy as np

from qwen_jax.data.chunks import Chunks
from qwen_jax.data.sources import FileSource

log = logging.getLogger(__name__)
CACHE_VERSION = 2  # 2: chats tokenized whole, masks from character offsets


def cache_key(source: FileSource, kind: str, tokenize) -> str:
    h = hashlib.sha256()
    h.update(json.dumps({"v": CACHE_VERSION, "kind": kind, "eos": tokenize.eos_id, "template": tokenize.chat_template,
                         "files": [(f.path, os.path.getsize(f.path), os.stat(f.path).st_mtime_ns)
                                   for f in source.files]}).encode())
    h.update(tokenize.backend.to_str().encode())
    return h.hexdigest()[:20]


class CachedTokens:
    """Random-access source of tokenized documents (the Tokenize output format) from a built cache."""

    def __init__(self, path: str, index: int):
        self.path = path
        self.index = index
        self.offsets = np.load(os.path.join(path, "offsets.npy"))
        with open(os.path.join(path, "bad.json")) as f:
            self.bad = {int(k): v for k, v in json.load(f).items()}
        self._arrays = None

    def __len__(self) -> int:
        return len(self.offsets) - 1

    def __getstate__(self):
        d = dict(self.__dict__)
        d["_arrays"] = None
        return d

    def _open(self, name: str, dtype, n: int) -> np.ndarray:
        return np.memmap(os.path.join(self.path, name), dtype, "r", shape=(n,)) if n else np.zeros(0, dtype)

    def __getitem__(self, i: int) -> dict:
        i = int(i) % len(self)
        if i in self.bad:
            return {"bad": self.bad[i], "source": self.index}
        arrays = self._arrays
        if arrays is None:  # opened lazily in each process; one assignment, so read threads never see half of it
            n = int(self.offsets[-1])
            arrays = self._arrays = (self._open("ids.bin", np.int32, n), self._open("mask.bin", np.uint8, n))
        a, b = int(self.offsets[i]), int(self.offsets[i + 1])
        return {"ids": arrays[0][a:b].tobytes(), "mask": arrays[1][a:b].tobytes(), "source": self.index}


def build_or_load(cache_dir: str, source: FileSource, kind: str, tokenize, *, worker_count: int = 0) -> CachedTokens:
    from qwen_jax.data.tokenization import TokenizeChunk

    os.makedirs(cache_dir, exist_ok=True)
    final = os.path.join(cache_dir, f"{kind}-{cache_key(source, kind, tokenize)}")
    if os.path.exists(os.path.join(final, "offsets.npy")):
        log.info("token cache hit: %s", final)
        return CachedTokens(final, source.index)
    log.info("building token cache %s (%d records)", final, len(source))
    tmp = tempfile.mkdtemp(dir=cache_dir, prefix=".build-")
    ds = Chunks(grain.MapDataset.source(source), 256).map(TokenizeChunk(tokenize)).to_iter_dataset()
    if worker_count > 0:
        from absl import flags

        if not flags.FLAGS.is_parsed():
            flags.FLAGS.mark_as_parsed()
        ds = ds.mp_prefetch(grain.MultiprocessingOptions(num_workers=worker_count, per_worker_buffer_size=2))
    offsets, bad, pos, i = [0], {}, 0, 0
    it = iter(ds)
    try:
        with open(os.path.join(tmp, "ids.bin"), "wb") as fi, open(os.path.join(tmp, "mask.bin"), "wb") as fm:
            for chunk in it:
                for doc in chunk:
                    if "bad" in doc:
                        bad[i] = doc["bad"]
                    else:
                        fi.write(doc["ids"])
                        fm.write(doc["mask"])
                        pos += len(doc["mask"])
                    offsets.append(pos)
                    i += 1
    finally:
        if hasattr(it, "close"):
            it.close()
    np.save(os.path.join(tmp, "offsets.npy"), np.asarray(offsets, np.int64))
    with open(os.path.join(tmp, "bad.json"), "w") as f:
        json.dump({str(k): v for k, v in bad.items()}, f)
    try:
        os.rename(tmp, final)
    except OSError:  # another process won the race
        shutil.rmtree(tmp, ignore_errors=True)
    return CachedTokens(final, source.index)
