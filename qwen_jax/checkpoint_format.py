"""The on-disk checkpoint contract shared by training and conversion, plus streaming Orbax I/O.

Checkpoint directory contract
=============================

A *checkpoint directory* ``C`` is an Orbax ``CheckpointManager`` root:

* ``C/<step>/`` numbered step directories.  Each holds at least the item ``params``, saved
  with ``ocp.args.StandardSave(pure_params, save_args=params_save_args(pure_params))`` (the
  trainer; any chunking reads back the same) where ``pure_params`` is the nested plain dict
  of arrays from ``nnx.to_pure_dict(nnx.state(model, nnx.Param))``: keys are exactly the
  model's attribute names (``embed_tokens/embedding``, ``layers/...``, ``norm/scale``,
  ``lm_head/kernel`` when untied).  Decoder-layer parameters are *stacked*: leading axis =
  layer index.  Training checkpoints may hold further items (``opt_state``, ``meta``,
  ``data``); conversion reads ``params`` only.
* ``C/config.json`` (the Hugging Face config, copied verbatim from the source model),
  ``C/generation_config.json`` (when the source had one) and the tokenizer files
  (`SIDE_FILES`: whatever of them the source folder had).  These are what
  ``orbax-to-hf`` writes back, so ``max_position_embeddings``, RoPE settings and eos ids
  always come from the source model, never from a training run's sequence length.
* ``hf-to-orbax`` writes step 0; ``orbax-to-hf`` defaults to the latest step.

Restoring: ``restore_params(C)`` or plainly::

    mngr = ocp.CheckpointManager(C)
    mngr.restore(step, args=ocp.args.Composite(params=ocp.args.StandardRestore(abstract_pure)))

Streaming
=========

``save_params_streaming`` writes the same format as ``StandardSave`` (same tree metadata,
same TensorStore/OCDBT layout, value type ``np.ndarray``) but each leaf is a `LazyArray`:
its data is produced block by block (one decoder layer of a stacked parameter, or a band
of vocabulary rows of an embedding) and written to TensorStore one block at a time, with
the Zarr chunk shape equal to the block shape.  Peak host memory is therefore about one
block, not one parameter.  `ParamReader` reads such blocks back (``read(path, layer=i)``)
through TensorStore without materialising the whole stacked array.

Both rely on Orbax's private TensorStore spec builders (through ``qwen_jax.compat``, which
says which versions were checked); tests round-trip through the public
``CheckpointManager.restore`` so a format drift fails loudly.
"""

from __future__ import annotations

import asyncio
import math
import os
import re
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from typing import Any

import numpy as np

from qwen_jax import compat
from qwen_jax.atomic import atomic_copy
from qwen_jax.model_folder import inside_model_folder

PARAMS_ITEM = "params"
# The tokenizer and its chat template, as a Hugging Face folder holds them.
TOKENIZER_FILES = (
    "tokenizer.json",
    "tokenizer_config.json",
    "vocab.json",
    "merges.txt",
    "special_tokens_map.json",
    "added_tokens.json",
    "chat_template.jinja",
    "chat_template.json",
)
# Hugging Face side files kept beside the checkpoint and shipped with an export (copied when present in the source).
SIDE_FILES = ("config.json", "generation_config.json", *TOKENIZER_FILES)
_SIDE_PATTERNS = (re.compile(r"chat_template.*\.(jinja|json)$"),)


def side_files(folder: str) -> list[str]:
    """Names of the Hugging Face side files present in `folder` (config, generation config, tokenizer).

    A side file that is a symlink must resolve inside the folder or into a Hugging Face cache
    blob (`model_folder.inside_model_folder`); otherwise this raises `CheckpointError`.
    """
    present = []
    for name in sorted(os.listdir(folder)):
        if not (name in SIDE_FILES or any(p.match(name) for p in _SIDE_PATTERNS)):
            continue
        if os.path.islink(os.path.join(folder, name)):
            inside_model_folder(folder, name)
        if os.path.isfile(os.path.join(folder, name)):
            present.append(name)
    return present


def copy_side_files(src: str, dst: str, skip: Sequence[str] = ()) -> list[str]:
    """Copy the side files of `src` into `dst`, each atomically, with the modes the umask gives new files."""
    copied = []
    for name in side_files(src):
        if name in skip:
            continue
        atomic_copy(os.path.join(src, name), os.path.join(dst, name))
        copied.append(name)
    return copied


# ---------------------------------------------------------------- lazily produced arrays
@dataclass
class LazyArray:
    """An array known by shape/dtype whose data is produced block by block along `axis`.

    `read_block(k)` returns the k-th block: ``block`` entries of `axis`, full extent
    elsewhere, already in `dtype`.  `shape[axis]` must be a multiple of `block`.
    """

    shape: tuple[int, ...]
    dtype: np.dtype
    axis: int
    block: int
    read_block: Callable[[int], np.ndarray]

    @property
    def num_blocks(self) -> int:
        return self.shape[self.axis] // self.block if self.shape else 1

    @property
    def block_shape(self) -> tuple[int, ...]:
        if not self.shape:
            return ()
        s = list(self.shape)
        s[self.axis] = self.block
        return tuple(s)

    @property
    def nbytes(self) -> int:
        return math.prod(self.shape) * np.dtype(self.dtype).itemsize

    @property
    def ndim(self) -> int:
        return len(self.shape)

    @property
    def size(self) -> int:
        return math.prod(self.shape)

    def index(self, k: int) -> tuple:
        if not self.shape:
            return ()
        idx = [slice(None)] * len(self.shape)
        idx[self.axis] = slice(k * self.block, (k + 1) * self.block)
        return tuple(idx)


def block_rows(total: int, row_bytes: int, budget: int = 256 << 20) -> int:
    """The largest divisor of `total` whose rows fit in `budget` bytes (at least 1)."""
    best = 1
    for d in range(1, int(math.isqrt(total)) + 1):
        if total % d == 0:
            for c in (d, total // d):
                if c * row_bytes <= budget and c > best:
                    best = c
    return best


def block_rows_for(rows: int, cols: int, *dtypes) -> int:
    """Rows per band when streaming a [rows, cols] tensor whose widest dtype is among `dtypes`."""
    itemsize = max(np.dtype(d).itemsize for d in dtypes)
    return block_rows(rows, cols * itemsize, BAND_BYTES)


BAND_BYTES = 256 << 20  # target bytes per streamed band of a large non-stacked tensor


def _streaming_handler():
    """A NumpyHandler that writes `LazyArray`s block by block (chunk = block), many blocks at once.

    Blocks of all arrays are produced on a thread pool and written concurrently (TensorStore
    encodes and writes on its own threads), with at most `budget` bytes of blocks in flight,
    counted twice (our block and TensorStore's copy of it), so host memory stays bounded.
    """
    import tensorstore as ts

    class StreamingHandler(compat.orbax_numpy_handler()):
        def __init__(self, on_block=None, budget: int = 1 << 30):
            super().__init__(**compat.orbax_numpy_handler_kwargs())
            self.on_block = on_block
            self.budget = budget

        async def _open(self, value, info, arg):
            await info.await_path_creation()
            spec = compat.orbax_array_write_spec(info=info, arg=arg, global_shape=value.shape,
                                                 local_shape=value.block_shape, dtype=np.dtype(value.dtype),
                                                 metadata_key=self._metadata_key)
            return await ts.open(ts.Spec(spec), create=True, open=True, context=info.ts_context)

        async def _background_serialize(self, values, infos, args=None):
            from concurrent.futures import ThreadPoolExecutor

            args = args or [compat.orbax_save_args()] * len(values)
            stores = await asyncio.gather(*(self._open(v, i, a) for v, i, a in zip(values, infos, args, strict=True)))
            loop = asyncio.get_running_loop()
            room = asyncio.Condition()
            in_flight = [0]
            errors: list[BaseException] = []

            async def write_block(pool, value, info, store, k, cost):
                try:
                    # Reading/transforming a block is blocking numpy work: keep the event loop free.
                    data = np.asarray(await loop.run_in_executor(pool, value.read_block, k))
                    if data.shape != value.block_shape or data.dtype != np.dtype(value.dtype):
                        raise ValueError(f"{info.name}: block {k} is {data.shape} {data.dtype}, "
                                         f"expected {value.block_shape} {np.dtype(value.dtype)}")
                    await store[value.index(k)].write(data)
                    if self.on_block is not None:
                        self.on_block(info.name, data.nbytes, k == value.num_blocks - 1)
                except BaseException as e:
                    errors.append(e)
                    raise
                finally:
                    async with room:
                        in_flight[0] -= cost
                        room.notify_all()

            tasks = []
            with ThreadPoolExecutor(max_workers=min(16, os.cpu_count() or 1)) as pool:
                try:
                    for value, info, store in zip(values, infos, stores, strict=True):
                        cost = 2 * math.prod(value.block_shape) * np.dtype(value.dtype).itemsize
                        for k in range(value.num_blocks):
                            async with room:
                                await room.wait_for(lambda c=cost: errors or in_flight[0] == 0
                                                    or in_flight[0] + c <= self.budget)
                                if errors:
                                    break
                                in_flight[0] += cost
                            tasks.append(asyncio.ensure_future(write_block(pool, value, info, store, k, cost)))
                        if errors:
                            break
                finally:
                    # Every started write finishes (none is cancelled): nothing may land in the output
                    # folder after the caller has removed it.
                    await asyncio.gather(*tasks, return_exceptions=True)
            if errors:
                raise errors[0]

    return StreamingHandler


STORED_CHUNK_BYTES = 64 << 20  # at most this many bytes a stored chunk of a trainer checkpoint's parameter


def params_save_args(params: dict) -> dict:
    """`SaveArgs` for a training checkpoint's `params` item: stacked decoder-layer parameters stored one chunk
    per layer (or less), every array in chunks of at most `STORED_CHUNK_BYTES`.

    Why: Orbax stores an array as one chunk per device shard by default, so on one device a stacked
    parameter is one chunk holding every layer, and reading one layer (the export at the end of
    training, `qwen-convert orbax-to-hf`) decodes all of it on one thread with all of it in memory.
    Per-layer chunks are what `save_params_streaming` writes too; restoring is unchanged (TensorStore
    reads any chunking).  An Orbax without `shard_axes` gets the byte bound alone.
    """
    import dataclasses

    import jax
    import orbax.checkpoint as ocp

    fields = {f.name for f in dataclasses.fields(ocp.SaveArgs)}
    bounded = {"chunk_byte_size": STORED_CHUNK_BYTES} if "chunk_byte_size" in fields else {}
    other_args = ocp.SaveArgs(**bounded)
    layer_args = ocp.SaveArgs(**bounded, shard_axes=(0,)) if "shard_axes" in fields else other_args
    args = {key: jax.tree.map(lambda _: other_args, value) for key, value in params.items() if key != "layers"}
    if "layers" in params:
        args["layers"] = jax.tree.map(lambda _: layer_args, params["layers"])
    return args


def save_params_streaming(ckpt_dir: str, step: int, lazy_params: dict, on_block=None, budget: int = 1 << 30,
                          compress: bool = True) -> None:
    """Save a nested dict of `LazyArray`s as item `params` of step `step` (same format as StandardSave).

    `budget`: host bytes of blocks in flight; `compress`: zstd chunks as StandardSave writes
    them, or raw chunks (what restore reads just as well, at disk speed).
    """
    import orbax.checkpoint as ocp

    handler = _streaming_handler()(on_block=on_block, budget=budget)
    registry = compat.orbax_type_handler_registry((LazyArray, handler))
    item_handler = ocp.PyTreeCheckpointHandler(type_handler_registry=registry, use_compression=compress)
    options = ocp.CheckpointManagerOptions(enable_async_checkpointing=False, create=True)
    with ocp.CheckpointManager(ckpt_dir, options=options, item_handlers={PARAMS_ITEM: item_handler}) as mngr:
        mngr.save(step, args=ocp.args.Composite(**{PARAMS_ITEM: ocp.args.PyTreeSave(lazy_params)}))
        mngr.wait_until_finished()


# ---------------------------------------------------------------- reading
class _HideReadOnlyNotes:
    """Drops orbax's notes that a manager opened read-only is read only: they say nothing to a user
    and are printed every time one is opened (an export, a conversion).  Other messages pass."""

    def filter(self, record) -> bool:
        return "read only" not in record.getMessage() and "read_only=True" not in record.getMessage()


def _manager(ckpt_dir: str):
    import logging

    import orbax.checkpoint as ocp

    options = ocp.CheckpointManagerOptions(read_only=True, create=False, save_interval_steps=0)
    absl_logger, hide = logging.getLogger("absl"), _HideReadOnlyNotes()
    absl_logger.addFilter(hide)
    try:
        return ocp.CheckpointManager(os.path.abspath(ckpt_dir), options=options)
    finally:
        absl_logger.removeFilter(hide)


def all_steps(ckpt_dir: str) -> list[int]:
    with _manager(ckpt_dir) as mngr:
        return sorted(mngr.all_steps())


def resolve_step(ckpt_dir: str, step: int | None) -> int:
    steps = all_steps(ckpt_dir)
    if not steps:
        raise FileNotFoundError(f"{ckpt_dir}: no checkpoint steps found (expected numbered step folders)")
    if step is None:
        return steps[-1]
    if step not in steps:
        raise FileNotFoundError(f"{ckpt_dir}: no step {step}; available steps: {steps}")
    return step


def restore_params(ckpt_dir: str, step: int | None = None, *, abstract_pure: Any = None, shardings: Any = None):
    """Restore the `params` item (a nested plain dict of arrays); other items are not read.

    `abstract_pure`: a matching tree of `jax.ShapeDtypeStruct` (or arrays), e.g. from
    ``nnx.to_pure_dict(nnx.state(abstract_model, nnx.Param))``; `shardings`: a matching tree
    of shardings placed onto it.  Without either, arrays come back as stored.
    """
    import jax
    import orbax.checkpoint as ocp

    step = resolve_step(ckpt_dir, step)
    if abstract_pure is not None:
        abstract_pure = jax.tree.map(lambda x: jax.ShapeDtypeStruct(x.shape, x.dtype, sharding=getattr(x, "sharding",
                                                                                                          None)),
                                     abstract_pure)
        if shardings is not None:
            abstract_pure = jax.tree.map(lambda x, s: jax.ShapeDtypeStruct(x.shape, x.dtype, sharding=s),
                                         abstract_pure, shardings)
    with _manager(ckpt_dir) as mngr:
        restored = mngr.restore(step, args=ocp.args.Composite(
            **{PARAMS_ITEM: ocp.args.StandardRestore(abstract_pure)}))
    return restored[PARAMS_ITEM]


class ParamReader:
    """Reads parameters (or one layer / one band of rows of them) from a step's `params` item via TensorStore."""

    def __init__(self, ckpt_dir: str, step: int):
        import json

        self.item_dir = os.path.join(os.path.abspath(ckpt_dir), str(step), PARAMS_ITEM)
        meta_file = os.path.join(self.item_dir, "_METADATA")
        try:
            with open(meta_file, encoding="utf-8") as f:
                meta = json.load(f)
        except FileNotFoundError:
            raise FileNotFoundError(f"{self.item_dir}: no 'params' item in this step (missing _METADATA)") from None
        self.use_ocdbt = bool(meta.get("use_ocdbt", True))
        self.use_zarr3 = bool(meta.get("use_zarr3", False))
        self.paths: list[tuple[str, ...]] = []
        for entry in meta["tree_metadata"].values():
            self.paths.append(tuple(str(k["key"]) for k in entry["key_metadata"]))
        self._open: dict[tuple, Any] = {}
        self._context = None

    def _store(self, path: tuple[str, ...]):
        import tensorstore as ts

        if path not in self._open:
            spec = compat.orbax_array_read_spec(self.item_dir, ".".join(path), use_zarr3=self.use_zarr3,
                                                use_ocdbt=self.use_ocdbt)
            if self._context is None:
                self._context = compat.orbax_ts_context(use_ocdbt=self.use_ocdbt)
            self._open[path] = ts.open(ts.Spec(spec), open=True, read=True, context=self._context).result()
        return self._open[path]

    def shape(self, path) -> tuple[int, ...]:
        return tuple(int(d) for d in self._store(tuple(path)).shape)

    def dtype(self, path) -> np.dtype:
        return np.dtype(self._store(tuple(path)).dtype.numpy_dtype)

    def chunk_shape(self, path) -> tuple[int, ...]:
        """The stored chunk shape: reading part of a chunk decodes all of it, so reads should align to it."""
        return tuple(int(d) for d in self._store(tuple(path)).chunk_layout.read_chunk.shape)

    def read(self, path, index=()) -> np.ndarray:
        store = self._store(tuple(path))
        return np.asarray(store[index].read().result() if index != () else store.read().result())

    def close(self):
        self._open.clear()
