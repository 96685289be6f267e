"""qwen-convert: Hugging Face <-> Orbax checkpoint conversion, streaming and lossless.

    qwen-convert hf-to-orbax --hf_dir D --out_dir O [--dtype bf16|fp16|fp32|keep] [--overwrite]
    qwen-convert orbax-to-hf --ckpt C [--step N] --out_dir O [--dtype ...] [--max_shard_size 5GB]
                             [--overwrite] [--allow_lint_errors]

The Orbax side follows the checkpoint contract of `qwen_jax.checkpoint_format` (step
folders holding the `params` item, Hugging Face config/tokenizer files at the root).

Guarantees: tensors are read and written one block at a time (one decoder layer of a
stacked parameter, or a band of vocabulary rows), so peak memory is about one block;
HF -> Orbax -> HF is bit-identical with `--dtype keep`; weights are read from safetensors
only (never unpickled, never `trust_remote_code`); output is written into a temporary
folder beside the target and renamed at the end, so a failure leaves nothing behind.
Exit status: 0 success, 1 conversion error (message on stderr), 2 usage error.
"""

from __future__ import annotations

import argparse
import contextlib
import errno
import json
import logging
import math
import os
import shutil
import signal
import subprocess
import sys
import tempfile
import time
from collections.abc import Callable, Iterator
from pathlib import Path

import numpy as np

from qwen_jax.atomic import atomic_write_json
from qwen_jax.dtypes import FLOAT_DTYPES, dtype_name, numpy_dtype

log = logging.getLogger("qwen_convert")

REPO_ROOT = Path(__file__).resolve().parent.parent


class ConvertError(Exception):
    """A conversion that cannot proceed; the message says why and what to do."""


# ---------------------------------------------------------------- progress
class Progress:
    """A tqdm bar (bytes, with a tensor count) on a terminal; plain log lines otherwise."""

    def __init__(self, desc: str, total_tensors: int, total_bytes: int, stream=None, tty: bool | None = None):
        self.stream = stream if stream is not None else sys.stderr
        self.tty = self.stream.isatty() if tty is None else tty
        self.desc, self.total_tensors, self.total_bytes = desc, total_tensors, total_bytes
        self.tensors = 0
        self.bytes = 0
        self._next_pct = 10
        self._start = time.monotonic()
        self._bar = None
        if self.tty:
            from tqdm import tqdm

            self._bar = tqdm(total=total_bytes, unit="B", unit_scale=True, unit_divisor=1024, desc=desc,
                             file=self.stream, dynamic_ncols=True)
        else:
            self._line(f"{desc}: {total_tensors} tensors, {_gib(total_bytes)}")

    def _line(self, text: str) -> None:
        print(text, file=self.stream, flush=True)

    def update(self, nbytes: int, tensor_done: bool) -> None:
        self.bytes += nbytes
        self.tensors += int(tensor_done)
        if self._bar is not None:
            self._bar.update(nbytes)
            self._bar.set_postfix_str(f"{self.tensors}/{self.total_tensors} tensors", refresh=False)
            return
        pct = 100 * self.bytes / max(self.total_bytes, 1)
        if pct >= self._next_pct:
            while self._next_pct <= pct:
                self._next_pct += 10
            self._line(f"{self.desc}: {self.tensors}/{self.total_tensors} tensors, "
                       f"{_gib(self.bytes)} / {_gib(self.total_bytes)} ({pct:.0f}%), "
                       f"{time.monotonic() - self._start:.1f}s")

    def close(self) -> None:
        if self._bar is not None:
            self._bar.close()
        else:
            self._line(f"{self.desc}: done, {self.tensors} tensors, {_gib(self.bytes)} in "
                       f"{time.monotonic() - self._start:.1f}s")


def _gib(n: int) -> str:
    return f"{n / 2**30:.2f} GiB" if n >= 2**28 else f"{n / 2**20:.1f} MiB"


# ---------------------------------------------------------------- atomic output folder
@contextlib.contextmanager
def atomic_output(out_dir: str, overwrite: bool, sources: tuple[str, ...] = ()) -> Iterator[str]:
    """Yield a temporary folder beside `out_dir`; on success it replaces `out_dir`, on any error it is removed.

    With `overwrite`, an existing `out_dir` stays whole until the new folder is complete; the two
    are then exchanged in one step where the kernel can (`renameat2` RENAME_EXCHANGE on Linux),
    else by two renames, and the old one is removed.  The folder gets the mode the umask gives
    a new folder (mkdtemp makes it 0700, which a serving process of another user cannot read).
    """
    from qwen_jax.atomic import honour_umask

    out = os.path.abspath(out_dir)
    for src in sources:
        if os.path.realpath(src) == os.path.realpath(out):
            raise ConvertError(f"{out}: output folder is the input folder; choose another --out_dir")
    if os.path.lexists(out) and not overwrite:
        raise ConvertError(f"{out}: already exists; pass --overwrite to replace it (it was left untouched)")
    if os.path.lexists(out) and not os.path.isdir(out):
        raise ConvertError(f"{out}: exists and is not a folder; refusing to replace it")
    parent = os.path.dirname(out)
    os.makedirs(parent, exist_ok=True)
    tmp = tempfile.mkdtemp(prefix=f".{os.path.basename(out)}.tmp-", dir=parent)
    try:
        honour_umask(tmp)
        yield tmp
        if os.path.lexists(out):
            _exchange(tmp, out)  # tmp now holds the old folder
        else:
            os.rename(tmp, out)
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise
    shutil.rmtree(tmp, ignore_errors=True)


def _exchange(a: str, b: str) -> None:
    """Swap two paths: atomically with Linux renameat2(RENAME_EXCHANGE), else by two renames."""
    import ctypes

    try:
        libc = ctypes.CDLL(None, use_errno=True)
        renameat2 = libc.renameat2
    except (OSError, AttributeError):
        renameat2 = None
    if renameat2 is not None:
        at_fdcwd, rename_exchange = -100, 2
        if renameat2(at_fdcwd, os.fsencode(a), at_fdcwd, os.fsencode(b), rename_exchange) == 0:
            return
        err = ctypes.get_errno()
        if err not in (errno.EINVAL, errno.ENOSYS, errno.EOPNOTSUPP):
            raise OSError(err, os.strerror(err), b)
    aside = a + ".old"
    os.rename(b, aside)
    os.rename(a, b)
    os.rename(aside, a)


def _nested_set(tree: dict, path: tuple[str, ...], value) -> None:
    for key in path[:-1]:
        tree = tree.setdefault(key, {})
    tree[path[-1]] = value


def _target_dtype(dtype: str | None) -> np.dtype | None:
    if dtype is None:
        return None
    if str(dtype).lower() == "keep":
        return None
    if dtype_name(dtype) not in FLOAT_DTYPES:
        raise ConvertError(f"unknown --dtype {dtype!r} (choose from bf16, fp16, fp32, keep)")
    return numpy_dtype(dtype)


# ---------------------------------------------------------------- hf -> orbax
def hf_to_orbax(hf_dir: str, out_dir: str, dtype: str = "keep", overwrite: bool = False,
                progress: Callable[..., Progress] | None = None) -> str:
    """Convert a Hugging Face safetensors folder into a checkpoint directory (step 0). Returns out_dir."""
    from qwen_jax import checkpoint_format as cf
    from qwen_jax.checkpoint_format import block_rows_for
    from qwen_jax.config import load_hf_config
    from qwen_jax.hf_io import abstract_model, check_tensors, flat_paths, hf_names, open_reader, param_table

    hf_dir = os.path.abspath(hf_dir)
    if not os.path.isdir(hf_dir):
        raise ConvertError(f"{hf_dir}: not a folder (expected a Hugging Face model folder)")
    target = _target_dtype(dtype)
    out = os.path.abspath(out_dir)
    if os.path.lexists(out) and not overwrite:
        raise ConvertError(f"{out}: already exists; pass --overwrite to replace it (it was left untouched)")
    cfg = load_hf_config(hf_dir)
    cf.side_files(hf_dir)  # a symlink that leads outside the folder stops here, before any work
    reader = open_reader(hf_dir)
    try:
        _, abstract_state = abstract_model(cfg)
        abstract = flat_paths(abstract_state)
        check_tensors(cfg, reader, abstract, hf_dir)
        table = param_table(cfg)
        layers = cfg.num_hidden_layers
        lazy: dict = {}
        total_bytes = 0
        for spec in table:
            shape = tuple(abstract[spec.path].shape)
            names = hf_names(spec, layers)
            source_dtypes = {reader.numpy_dtype(n) for n in names}
            if target is None and len(source_dtypes) > 1:
                raise ConvertError(f"{hf_dir}: layers of {spec.hf_name} have different dtypes "
                                   f"{sorted(map(str, source_dtypes))}; pass --dtype to choose one")
            dt = target if target is not None else source_dtypes.pop()
            arr = _lazy_from_hf(reader, spec, shape, dt, block_rows_for)
            total_bytes += arr.nbytes
            _nested_set(lazy, spec.path, arr)
        total_tensors = sum(len(hf_names(s, layers)) for s in table)
        bar = (progress or Progress)("hf-to-orbax", total_tensors, total_bytes)
        blocks_per_param = {".".join(s.path): (layers if s.stacked else None) for s in table}

        def on_block(name, nbytes, last):
            # one tensor = one layer of a stacked parameter, or the whole of a non-stacked one
            bar.update(nbytes, tensor_done=last or blocks_per_param.get(name) is not None)

        with atomic_output(out, overwrite, sources=(hf_dir,)) as tmp:
            largest = max(reader.nbytes(n) for n in reader.files)
            _with_disk_errors(lambda: cf.save_params_streaming(tmp, 0, lazy, on_block=on_block, budget=2 * largest),
                              out)
            copied = cf.copy_side_files(hf_dir, tmp)
        bar.close()
        log.info("wrote %s (step 0; side files: %s)", out, ", ".join(copied))
        return out
    finally:
        reader.close()


def _lazy_from_hf(reader, spec, shape, dt, block_rows_for):
    from qwen_jax.checkpoint_format import LazyArray
    from qwen_jax.hf_io import hf_shape, read_stacked, to_ours

    if spec.stacked:
        def read_layer(k):
            return np.ascontiguousarray(read_stacked(reader, spec, k, shape[1:]).astype(dt, copy=False))[None]

        return LazyArray(shape, dt, 0, 1, read_layer)
    if spec.transform in ("copy", "t") and len(shape) == 2:
        rows, cols = hf_shape(spec, shape)
        band = block_rows_for(rows, cols, dt, reader.numpy_dtype(spec.hf_name))
        axis = 0 if spec.transform == "copy" else 1

        def read_band(k):
            part = reader.read_rows(spec.hf_name, k * band, (k + 1) * band).astype(dt, copy=False)
            return np.ascontiguousarray(part if axis == 0 else part.T)

        return LazyArray(shape, dt, axis, band, read_band)

    def read_whole(k):
        return np.ascontiguousarray(to_ours(spec, reader.read(spec.hf_name), shape).astype(dt, copy=False))

    return LazyArray(shape, dt, 0, shape[0], read_whole)


def _with_disk_errors(fn, out: str):
    """Run fn; a full disk (possibly wrapped by Orbax/TensorStore) becomes one clear ConvertError."""
    try:
        return fn()
    except OSError as e:
        if e.errno == errno.ENOSPC:
            raise ConvertError(f"{out}: no space left on device while writing; nothing was written "
                               f"(the temporary folder was removed). Free space or choose another --out_dir") from e
        raise
    except Exception as e:
        cause = e
        while cause is not None:
            if isinstance(cause, OSError) and cause.errno == errno.ENOSPC or "No space left" in str(cause):
                raise ConvertError(f"{out}: no space left on device while writing; nothing was written "
                                   f"(the temporary folder was removed). Free space or choose another --out_dir"
                                   ) from e
            cause = cause.__cause__ or cause.__context__
        raise


# ---------------------------------------------------------------- orbax -> hf
def orbax_to_hf(ckpt_dir: str, out_dir: str, step: int | None = None, dtype: str = "keep",
                max_shard_size: str | int = "5GB", overwrite: bool = False, allow_lint_errors: bool = False,
                progress: Callable[..., Progress] | None = None) -> str:
    """Export a checkpoint directory's `params` (latest step by default) as a Hugging Face folder."""
    from qwen_jax import checkpoint_format as cf
    from qwen_jax.config import load_hf_config
    from qwen_jax.hf_io import abstract_model, flat_paths, hf_shape, layer_blocks, param_table, parse_size

    ckpt_dir = os.path.abspath(ckpt_dir)
    if not os.path.isdir(ckpt_dir):
        raise ConvertError(f"{ckpt_dir}: not a folder (expected a checkpoint directory)")
    if not os.path.exists(os.path.join(ckpt_dir, "config.json")):
        raise ConvertError(f"{ckpt_dir}: no config.json beside the checkpoint (the checkpoint format keeps the "
                           "source model's Hugging Face config.json at the checkpoint root)")
    target = _target_dtype(dtype)
    try:
        shard_limit = parse_size(max_shard_size)
    except ValueError as e:
        raise ConvertError(str(e)) from None
    out = os.path.abspath(out_dir)
    if os.path.lexists(out) and not overwrite:
        raise ConvertError(f"{out}: already exists; pass --overwrite to replace it (it was left untouched)")
    cfg = load_hf_config(ckpt_dir)
    cf.side_files(ckpt_dir)  # a symlink that leads outside the folder stops here, before any work
    try:
        step = cf.resolve_step(ckpt_dir, step)
    except FileNotFoundError as e:
        raise ConvertError(str(e)) from None
    reader = cf.ParamReader(ckpt_dir, step)
    try:
        _, abstract_state = abstract_model(cfg)
        abstract = flat_paths(abstract_state)
        table = param_table(cfg)
        _check_params(cfg, reader, table, abstract, f"{ckpt_dir}/{step}/params")
        plan = []  # (hf_name, spec, index into our array, hf shape, dtype)
        non_stacked = [s for s in table if not s.stacked]
        first = [s for s in non_stacked if s.path[0] == "embed_tokens"]
        last = [s for s in non_stacked if s.path[0] != "embed_tokens"]

        def entry(spec, index, name):
            shape = tuple(abstract[spec.path].shape)
            dt = target if target is not None else reader.dtype(spec.path)
            return (name, spec, index, hf_shape(spec, shape[len(index):]), dt)

        plan += [entry(s, (), s.hf_name) for s in first]
        plan += [entry(s, index, name) for name, s, index in layer_blocks(table, cfg.num_hidden_layers)]
        plan += [entry(s, (), s.hf_name) for s in last]
        shards = _split_shards(plan, shard_limit)
        total = sum(_nbytes(e) for e in plan)
        bar = (progress or Progress)("orbax-to-hf", len(plan), total)
        with atomic_output(out, overwrite, sources=(ckpt_dir,)) as tmp:
            files = [f"model-{si + 1:05d}-of-{len(shards):05d}.safetensors" for si in range(len(shards))]
            weight_map = {e[0]: fname for shard, fname in zip(shards, files, strict=True) for e in shard}
            _with_disk_errors(lambda: _write_shards(tmp, files, shards, table, plan, reader, bar), out)
            index = {"metadata": {"total_size": total}, "weight_map": dict(sorted(weight_map.items()))}
            atomic_write_json(os.path.join(tmp, "model.safetensors.index.json"), index)
            cf.copy_side_files(ckpt_dir, tmp, skip=("config.json",))
            dtypes = {np.dtype(e[4]).name for e in plan}
            _write_config(os.path.join(ckpt_dir, "config.json"), os.path.join(tmp, "config.json"), dtypes)
            _lint_or_stop(tmp, allow_lint_errors)
        bar.close()
        log.info("wrote %s (%d shard(s), step %d)", out, len(shards), step)
        return out
    finally:
        reader.close()


def _nbytes(e) -> int:
    return int(np.prod(e[3], dtype=np.int64)) * np.dtype(e[4]).itemsize


def _split_shards(plan, limit: int) -> list[list]:
    """Greedy, in order, like transformers: a new shard starts when the next tensor would exceed the limit."""
    shards, current, size = [], [], 0
    for e in plan:
        n = _nbytes(e)
        if current and size + n > limit:
            shards.append(current)
            current, size = [], 0
        current.append(e)
        size += n
    if current:
        shards.append(current)
    return shards


def _write_shards(folder, files, shards, table, plan, reader, bar) -> None:
    """Fill every shard file in parallel, one Orbax block at a time (see `_export_blocks`)."""
    from qwen_jax.hf_io import SafetensorsWriter

    writers: dict[str, SafetensorsWriter] = {}
    try:
        for fname, shard in zip(files, shards, strict=True):
            writer = SafetensorsWriter(os.path.join(folder, fname), [(e[0], e[3], e[4]) for e in shard])
            writers.update({e[0]: writer for e in shard})
        entries = {e[0]: e for e in plan}
        blocks = [b for spec in table for b in _export_blocks(reader, spec, entries)]
        lock = __import__("threading").Lock()

        def run(block):
            index, spec, pieces = block
            data = reader.read(spec.path, index)
            for name, piece, start in _hf_pieces(spec, data, pieces, entries):
                writers[name].write_at(name, piece, start)
                with lock:
                    bar.update(piece.nbytes, tensor_done=start + piece.nbytes == _nbytes(entries[name]))

        # in flight per block: what was read, plus one converted layer or band
        largest = max(_nbytes(e) for e in plan)
        run_bounded(run, blocks, cost=lambda b: _block_nbytes(reader, b) * (1 + 1 / _layers(b)), budget=2 * largest)
        unique = list({id(w): w for w in writers.values()}.values())
        run_bounded(lambda w: w.close(), unique, cost=lambda w: 0)
    except BaseException:
        for w in {id(w): w for w in writers.values()}.values():
            with contextlib.suppress(OSError):
                w.abort()
        raise


def _export_blocks(reader, spec, entries) -> list[tuple]:
    """(our index, spec, covered HF names or rows) of every read of one stored parameter.

    Reads follow the stored chunk grid: a chunk is decoded whole, so a read that takes a part
    of a chunk, one layer out of a trainer checkpoint's single-chunk stacked parameter say,
    would decode it again for every layer.  Each read is a run of whole chunks of about
    `READ_BYTES` (at least one chunk): several layers of a stacked parameter, or a band of
    vocabulary rows (columns of our LM head) of a big 2-D parameter.
    """
    shape, chunk = reader.shape(spec.path), reader.chunk_shape(spec.path)
    if spec.stacked:
        axis = 0
    elif spec.transform in ("copy", "t") and len(shape) == 2:
        axis = 0 if spec.transform == "copy" else 1
    else:
        return [((), spec, None)]
    slice_bytes = math.prod(shape) // shape[axis] * np.dtype(reader.dtype(spec.path)).itemsize
    unit = max(1, min(chunk[axis], shape[axis]))
    size = unit * max(1, READ_BYTES // max(1, unit * slice_bytes))
    blocks = []
    for start in range(0, shape[axis], size):
        stop = min(start + size, shape[axis])
        index = tuple(slice(start, stop) if a == axis else slice(None) for a in range(len(shape)))
        blocks.append((index, spec, (start, stop)))
    return blocks


def _layers(block) -> int:
    _, spec, span = block
    return span[1] - span[0] if spec.stacked else 1


def _block_nbytes(reader, block) -> int:
    index, spec, _ = block
    shape = reader.shape(spec.path)
    sizes = [len(range(*sl.indices(n))) for sl, n in zip(index, shape, strict=False)] + list(shape[len(index):])
    return math.prod(sizes) * np.dtype(reader.dtype(spec.path)).itemsize


def _hf_pieces(spec, data, span, entries) -> Iterator[tuple[str, np.ndarray, int]]:
    """(HF name, contiguous HF-layout array, byte offset inside that tensor) of a block read from Orbax."""
    from qwen_jax.hf_io import to_hf

    if spec.stacked:
        for j, position in enumerate(range(*span)):
            layer = position if spec.layers is None else spec.layers[position]
            parts = enumerate(data[j]) if spec.experts else [(None, data[j])]  # per-expert tensors of one layer
            for e, part in parts:
                name = spec.hf_name.format(i=layer, e=e)
                yield name, to_hf(spec, part).astype(entries[name][4], copy=False), 0
        return
    dt = entries[spec.hf_name][4]
    if span is None:
        yield spec.hf_name, to_hf(spec, data).astype(dt, copy=False), 0
        return
    part = to_hf(spec, data).astype(dt, copy=False)  # HF rows span[0]:span[1]
    yield spec.hf_name, part, span[0] * part.shape[1] * part.itemsize


def run_bounded(fn, items, cost, budget: int | None = None, workers: int | None = None) -> None:
    """fn(item) for every item on a thread pool, with at most `budget` bytes of `cost(item)` in flight.

    The budget bounds host memory (an item that alone exceeds it still runs, alone); the
    threads overlap TensorStore decoding, numpy transposes and file writes, which all release
    the GIL.  The first exception stops the submission of new items and is raised.
    """
    import threading
    from concurrent.futures import FIRST_EXCEPTION, ThreadPoolExecutor, wait

    budget = IO_BUDGET_BYTES if budget is None else budget
    workers = workers or min(16, os.cpu_count() or 1)
    in_flight = [0]
    room = threading.Condition()
    failed = threading.Event()

    def task(item, nbytes):
        try:
            fn(item)
        except BaseException:
            failed.set()
            raise
        finally:
            with room:
                in_flight[0] -= nbytes
                room.notify_all()

    futures = []
    with ThreadPoolExecutor(max_workers=workers) as pool:
        for item in items:
            nbytes = cost(item)
            with room:
                room.wait_for(lambda n=nbytes: failed.is_set() or in_flight[0] == 0 or in_flight[0] + n <= budget)
                if failed.is_set():
                    break
                in_flight[0] += nbytes
            futures.append(pool.submit(task, item, nbytes))
        done, _ = wait(futures, return_when=FIRST_EXCEPTION)
        for f in futures:
            f.cancel()
    for f in futures:
        if f.done() and not f.cancelled() and f.exception() is not None:
            raise f.exception()


IO_BUDGET_BYTES = 1 << 30  # host bytes in flight across conversion threads, unless the caller says
READ_BYTES = 64 << 20  # target size of one read: big enough for full disk speed, small enough for many threads


def _check_params(cfg, reader, table, abstract, source: str) -> None:
    from qwen_jax.hf_io import CheckpointError

    expected = {s.path: tuple(abstract[s.path].shape) for s in table}
    present = set(reader.paths)
    missing = sorted("/".join(p) for p in set(expected) - present)
    unexpected = sorted("/".join(p) for p in present - set(expected))
    misshaped = [f"{'/'.join(p)}: checkpoint {reader.shape(p)} vs config.json {expected[p]}"
                 for p in sorted(set(expected) & present) if reader.shape(p) != expected[p]]
    problems = []
    if missing:
        problems.append(f"missing parameters ({len(missing)}): {', '.join(missing)}")
    if unexpected:
        problems.append(f"unexpected parameters ({len(unexpected)}): {', '.join(unexpected)}")
    if misshaped:
        problems.append(f"parameters whose shape disagrees with config.json ({len(misshaped)}): "
                        f"{', '.join(misshaped)}")
    if problems:
        raise CheckpointError(f"{source}: " + "; ".join(problems))


def _write_config(src: str, dst: str, dtypes: set[str]) -> None:
    """Copy the source config.json verbatim; only its dtype key follows an export dtype change."""
    with open(src, encoding="utf-8") as f:
        raw = json.load(f)
    dtype = dtypes.pop() if len(dtypes) == 1 else None
    keys = [k for k in ("dtype", "torch_dtype") if k in raw] or ["dtype"]
    if dtype is None or all(raw.get(k) == dtype for k in keys):
        shutil.copyfile(src, dst)  # not copy2: the new file's mode follows the umask, not the source's
        return
    for k in keys:
        raw[k] = dtype
    atomic_write_json(dst, raw)


# ---------------------------------------------------------------- config linter
def run_linter(folder: str) -> tuple[int, list[dict]] | None:
    """(exit status, findings) of `python -m tools.lint_config --format json folder`, or None if absent."""
    if not (REPO_ROOT / "tools" / "lint_config.py").exists():
        log.warning("config linter not available (tools/lint_config.py missing): export not linted")
        return None
    proc = subprocess.run([sys.executable, "-m", "tools.lint_config", "--format", "json", folder],
                          cwd=REPO_ROOT, capture_output=True, text=True, check=False)
    try:
        report = json.loads(proc.stdout)
    except json.JSONDecodeError:
        report = None
    if proc.returncode not in (0, 1) or not isinstance(report, dict):
        raise ConvertError(f"config linter failed to run (exit {proc.returncode}): "
                           f"{(proc.stderr or proc.stdout).strip()[-2000:]}")
    return proc.returncode, list(report.get("findings", []))


def _lint_or_stop(folder: str, allow_errors: bool) -> None:
    result = run_linter(folder)
    if result is None:
        return
    code, findings = result
    errors = [f for f in findings if f.get("severity") == "error"]
    for f in findings:
        if f.get("severity") != "error":
            log.warning("lint %s: %s %s: %s", f.get("severity"), f.get("file"), f.get("key"), f.get("message"))
    if code == 0 and not errors:
        return
    lines = [f"  {f.get('file')}:{f.get('line')} {f.get('key')}: {f.get('message')}"
             + (f" (fix: {f['fix']})" if f.get("fix") else "") for f in errors] or ["  (linter exit status 1)"]
    if allow_errors:
        log.warning("config lint errors (exporting anyway, --allow_lint_errors):\n%s", "\n".join(lines))
        return
    raise ConvertError("config lint errors in the exported config; nothing was written "
                       "(pass --allow_lint_errors to export anyway):\n" + "\n".join(lines))


# ---------------------------------------------------------------- CLI
def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog="qwen-convert", description=__doc__.split("\n\n")[0])
    sub = p.add_subparsers(dest="command", required=True)
    a = sub.add_parser("hf-to-orbax", help="Hugging Face safetensors folder -> Orbax checkpoint directory (step 0)")
    a.add_argument("--hf_dir", required=True)
    a.add_argument("--out_dir", required=True)
    a.add_argument("--dtype", default="keep", choices=["bf16", "fp16", "fp32", "keep"])
    a.add_argument("--overwrite", action="store_true", help="replace an existing --out_dir")
    b = sub.add_parser("orbax-to-hf", help="Orbax checkpoint directory (converted or training) -> Hugging Face folder")
    b.add_argument("--ckpt", required=True, help="checkpoint directory (CheckpointManager root)")
    b.add_argument("--step", type=int, default=None, help="step to export (default: latest)")
    b.add_argument("--out_dir", required=True)
    b.add_argument("--dtype", default="keep", choices=["bf16", "fp16", "fp32", "keep"])
    b.add_argument("--max_shard_size", default="5GB", help="largest safetensors shard (e.g. 5GB, 500MB, 2GiB)")
    b.add_argument("--overwrite", action="store_true", help="replace an existing --out_dir")
    b.add_argument("--allow_lint_errors", action="store_true", help="export even if the config linter reports errors")
    add_lora_commands(sub)
    return p


# ---------------------------------------------------------------- LoRA (core logic in qwen_jax/lora.py)
def add_lora_commands(sub) -> None:
    m = sub.add_parser("merge-lora", help="Hugging Face base folder + PEFT LoRA adapter folder -> merged HF folder")
    m.add_argument("--base", required=True, help="Hugging Face model folder the adapter was trained on")
    m.add_argument("--adapter", required=True, help="PEFT adapter folder (adapter_config.json + safetensors)")
    m.add_argument("--out", required=True, help="merged Hugging Face folder (written atomically)")
    m.add_argument("--overwrite", action="store_true", help="replace an existing --out")


def run_lora_command(args) -> None:
    from qwen_jax.lora import merge_folders

    merge_folders(args.base, args.adapter, args.out, overwrite=args.overwrite)
    log.info("wrote %s", os.path.abspath(args.out))


def main(argv: list[str] | None = None) -> int:
    from qwen_jax.config import ConfigError
    from qwen_jax.hf_io import CheckpointError
    from qwen_jax.lora import LoraError

    args = build_parser().parse_args(argv)
    # SIGTERM -> SystemExit, so the temporary output folder is removed on the way out.
    signal.signal(signal.SIGTERM, lambda *_: sys.exit(143))
    logging.basicConfig(level=logging.INFO, format="%(message)s", stream=sys.stderr)
    from absl import logging as absl_logging

    absl_logging.set_verbosity(absl_logging.ERROR)
    try:
        if args.command == "merge-lora":
            run_lora_command(args)
        elif args.command == "hf-to-orbax":
            hf_to_orbax(args.hf_dir, args.out_dir, dtype=args.dtype, overwrite=args.overwrite)
        else:
            orbax_to_hf(args.ckpt, args.out_dir, step=args.step, dtype=args.dtype,
                        max_shard_size=args.max_shard_size, overwrite=args.overwrite,
                        allow_lint_errors=args.allow_lint_errors)
    except (ConvertError, ConfigError, CheckpointError, LoraError) as e:
        print(f"qwen-convert: error: {e}", file=sys.stderr)
        return 1
    except OSError as e:
        if e.errno == errno.ENOSPC:
            print(f"qwen-convert: error: no space left on device ({e}); nothing was written", file=sys.stderr)
        else:
            print(f"qwen-convert: error: {e}", file=sys.stderr)
        return 1
    return 0


if __name__ == "__main__":
    sys.exit(main())
