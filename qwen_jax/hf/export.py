"""orbax-to-hf: a checkpoint directory's `params` as a Hugging Face folder (shards, index, config, side files).

Every shard file is filled in parallel, one Orbax read at a time (`run_bounded` keeps the
bytes in flight under a budget); the config.json is the source's, with only its dtype key
following an export dtype; the exported config is checked by the config linter.
"""

from __future__ import annotations

import contextlib
import json
import logging
import math
import os
import shutil
import subprocess
import sys
from collections.abc import Callable, Iterator

import numpy as np

from qwen_jax.atomic import atomic_write_json
from qwen_jax.hf.models import abstract_model, flat_paths
from qwen_jax.hf.names import hf_shape, layer_blocks, param_table, to_hf
from qwen_jax.hf.output import ConvertError, Progress, atomic_output, target_dtype, with_disk_errors
from qwen_jax.hf.safetensors_io import CheckpointError, SafetensorsWriter, parse_size

log = logging.getLogger("qwen_convert")


# ---------------------------------------------------------------- orbax -> hf
def orbax_to_hf(ckpt_dir: str, out_dir: str, step: int | None = None, dtype: str = "keep",
                max_shard_size: str | int = "5GB", overwrite: bool = False, allow_lint_errors: bool = False,
                progress: Callable[..., Progress] | None = None) -> str:
    """Export a checkpoint directory's `params` (latest step by default) as a Hugging Face folder."""
    from qwen_jax import checkpoint_format as cf
    from qwen_jax.config import load_hf_config

    ckpt_dir = os.path.abspath(ckpt_dir)
    if not os.path.isdir(ckpt_dir):
        raise ConvertError(f"{ckpt_dir}: not a folder (expected a checkpoint directory)")
    if not os.path.exists(os.path.join(ckpt_dir, "config.json")):
        raise ConvertError(f"{ckpt_dir}: no config.json beside the checkpoint (the checkpoint format keeps the "
                           "source model's Hugging Face config.json at the checkpoint root)")
    target = target_dtype(dtype)
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
            with_disk_errors(lambda: _write_shards(tmp, files, shards, table, plan, reader, bar), out)
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
        run_bounded(run, blocks, cost=lambda b: _block_nbytes(reader, b) * (1 + 1 / _layers(b)), budget=largest)
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
LINT_COMMAND = (sys.executable, "-m", "qwen_jax.lint")


def run_linter(folder: str) -> tuple[int, list[dict]]:
    """(exit status, findings) of `qwen-lint --format json folder`.

    A subprocess, as a user or the pre-commit hook runs it: the export is judged by exactly
    the command line's verdict, and a crash of the linter cannot take the export with it.
    """
    proc = subprocess.run([*LINT_COMMAND, "--format", "json", folder], capture_output=True, text=True, check=False)
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

