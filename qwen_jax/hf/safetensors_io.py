"""Safetensors model folders: streaming reads (tensor by tensor, row bands, fused experts) and writes.

Reading is tensor by tensor with plain file reads (numpy, no torch, no mmap), so only the
tensors being converted are ever in memory; `SafetensorsWriter` fills a file piece by piece
at any offset, from any thread.  Only safetensors are read: pickled weights are refused.
"""

from __future__ import annotations

import json
import os
import re

import jax
import numpy as np

from qwen_jax.config import QwenConfig
from qwen_jax.dtypes import SAFETENSORS_CODES, from_safetensors, to_safetensors
from qwen_jax.hf.names import hf_blocks, hf_shape, param_table
from qwen_jax.model_folder import CheckpointError, inside_model_folder

SAFETENSORS_INDEX = "model.safetensors.index.json"
SAFETENSORS_SINGLE = "model.safetensors"




# ---------------------------------------------------------------- safetensors folder reading
def weight_files(folder: str) -> dict[str, str]:
    """Tensor name -> file path for a model folder (single file or sharded index).

    Every file must stay inside the folder (`inside_model_folder`): an index naming an absolute
    path, a "..", or a symlink that leads elsewhere is an error naming the index and the shard.
    """
    index = os.path.join(folder, SAFETENSORS_INDEX)
    single = os.path.join(folder, SAFETENSORS_SINGLE)
    if os.path.exists(index):
        try:
            with open(index, encoding="utf-8") as f:
                weight_map = json.load(f)["weight_map"]
            shards = set(weight_map.values())
        except (json.JSONDecodeError, KeyError, TypeError, AttributeError) as e:
            raise CheckpointError(f"{index}: not a valid safetensors index ({e})") from None
        for shard in sorted(shards, key=str):
            parts = str(shard).replace("\\", "/").split("/")
            if not isinstance(shard, str) or not shard or os.path.isabs(shard) or ".." in parts:
                raise CheckpointError(f"{index}: shard {shard!r} is not a file name inside the model folder "
                                      "(absolute paths and '..' are refused)")
        missing_files = sorted(f for f in shards if not os.path.exists(os.path.join(folder, f)))
        if missing_files:
            raise CheckpointError(f"{index}: lists shard files that do not exist: {missing_files}")
        for shard in sorted(shards):
            inside_model_folder(folder, shard, named_by=index)
        return {name: os.path.join(folder, file) for name, file in weight_map.items()}
    if os.path.exists(single):
        inside_model_folder(folder, SAFETENSORS_SINGLE)
        return {name: single for name in _safetensors_keys(single)}
    pickled = sorted(f for f in os.listdir(folder) if f.endswith((".bin", ".pt", ".pth", ".ckpt")))
    if pickled:
        raise CheckpointError(
            f"{folder}: only pickled weights ({', '.join(pickled)}); refusing to unpickle (it runs arbitrary code). "
            "Re-save as safetensors in a trusted environment: "
            "AutoModelForCausalLM.from_pretrained(folder).save_pretrained(out, safe_serialization=True)"
        )
    raise CheckpointError(f"{folder}: no {SAFETENSORS_SINGLE} or {SAFETENSORS_INDEX} found")


def _safetensors_keys(file: str) -> list[str]:
    from safetensors import safe_open

    try:
        with safe_open(file, framework="numpy") as f:
            return list(f.keys())
    except Exception as e:  # safetensors raises its own error types for truncated/corrupt headers
        raise CheckpointError(f"{file}: cannot read safetensors header ({e})") from None


class TensorReader:
    """Reads single tensors from a safetensors folder, keeping files open; bf16 stays bf16 (ml_dtypes)."""

    def __init__(self, folder: str):
        self.folder = folder
        self.files = weight_files(folder)
        self._open: dict[str, object] = {}
        self._layouts: dict[str, tuple[int, dict]] = {}

    def _handle(self, file: str):
        from safetensors import safe_open

        if file not in self._open:
            try:
                self._open[file] = safe_open(file, framework="numpy")
            except Exception as e:  # truncated / corrupt header
                raise CheckpointError(f"{file}: cannot read safetensors file ({e})") from None
        return self._open[file]

    def shape(self, name: str) -> tuple[int, ...]:
        return tuple(self._handle(self.files[name]).get_slice(name).get_shape())

    def dtype(self, name: str) -> str:
        return self._handle(self.files[name]).get_slice(name).get_dtype()

    def _layout(self, file: str) -> tuple[int, dict]:
        """(data start, header) of a file, parsed once; offsets are checked against the file size."""
        if file not in self._layouts:
            self._handle(file)  # safetensors validates the header first
            with open(file, "rb") as f:
                n = int.from_bytes(f.read(8), "little")
                header = json.loads(f.read(n))
            size = os.path.getsize(file)
            for key, entry in header.items():
                if key != "__metadata__" and 8 + n + entry["data_offsets"][1] > size:
                    raise CheckpointError(f"{file}: truncated (tensor {key!r} ends past the end of the file)")
            self._layouts[file] = (8 + n, header)
        return self._layouts[file]

    def _pread(self, name: str, start_row: int | None = None, stop_row: int | None = None) -> np.ndarray:
        """Plain reads, not mmap: pages of a mapped file would count towards this process's RSS."""
        file = self.files[name]
        base, header = self._layout(file)
        entry = header[name]
        dtype = from_safetensors(entry["dtype"])
        if dtype is None:
            raise CheckpointError(f"{file}: tensor {name!r} has unsupported dtype {entry['dtype']}")
        shape = list(entry["shape"])
        begin, _ = entry["data_offsets"]
        if start_row is not None:
            row = int(np.prod(shape[1:], dtype=np.int64)) * dtype.itemsize
            stop_row = min(stop_row, shape[0])
            begin += start_row * row
            shape[0] = max(0, stop_row - start_row)
        count = int(np.prod(shape, dtype=np.int64))
        out = np.fromfile(file, dtype=np.uint8, count=count * dtype.itemsize, offset=base + begin)
        if out.size != count * dtype.itemsize:
            raise CheckpointError(f"{file}: truncated while reading tensor {name!r}")
        return out.view(dtype).reshape(shape)

    def read(self, name: str) -> np.ndarray:
        file = self.files[name]
        try:
            return self._pread(name)
        except CheckpointError:
            raise
        except Exception as e:
            raise CheckpointError(f"{file}: cannot read tensor {name!r} ({e})") from None

    def read_rows(self, name: str, start: int, stop: int) -> np.ndarray:
        """Rows [start, stop) of a tensor (first axis), without reading the rest."""
        file = self.files[name]
        try:
            return self._pread(name, start, stop)
        except CheckpointError:
            raise
        except Exception as e:
            raise CheckpointError(f"{file}: cannot read tensor {name!r} ({e})") from None

    def nbytes(self, name: str) -> int:
        return int(np.prod(self.shape(name), dtype=np.int64)) * self.numpy_dtype(name).itemsize

    def numpy_dtype(self, name: str) -> np.dtype:
        code = self.dtype(name)
        dtype = from_safetensors(code)
        if dtype is None:
            raise CheckpointError(f"{self.files[name]}: tensor {name!r} has unsupported dtype {code}")
        return dtype

    def close(self):
        self._open.clear()
        self._layouts.clear()


_FUSED_EXPERTS = re.compile(r"(.+\.mlp\.experts)\.(gate_up_proj|down_proj)")


class ExpertsReader:
    """A `TensorReader` view that also serves transformers v5's fused expert tensors under the
    released per-expert names: `experts.gate_up_proj` [E, 2m, embed] as `experts.{e}.gate_proj.weight`
    (rows :m) and `experts.{e}.up_proj.weight` (rows m:), `experts.down_proj` [E, embed, m] as
    `experts.{e}.down_proj.weight`.  Each read takes one expert's rows of the fused tensor."""

    def __init__(self, reader: TensorReader):
        self.reader = reader
        self.folder = reader.folder
        self.files = dict(reader.files)
        self._virtual: dict[str, tuple[str, int, int, int]] = {}  # name -> (fused name, expert, row start, stop)
        for name, file in reader.files.items():
            m = _FUSED_EXPERTS.fullmatch(name)
            if not m:
                continue
            experts, rows, _ = reader.shape(name)
            parts = ({"gate_proj": (0, rows // 2), "up_proj": (rows // 2, rows)} if m.group(2) == "gate_up_proj"
                     else {"down_proj": (0, rows)})
            del self.files[name]
            for e in range(experts):
                for part, (start, stop) in parts.items():
                    self._virtual[f"{m.group(1)}.{e}.{part}.weight"] = (name, e, start, stop)
                    self.files[f"{m.group(1)}.{e}.{part}.weight"] = file

    def shape(self, name: str) -> tuple[int, ...]:
        if name not in self._virtual:
            return self.reader.shape(name)
        fused, _, start, stop = self._virtual[name]
        return (stop - start, self.reader.shape(fused)[2])

    def dtype(self, name: str) -> str:
        return self.reader.dtype(self._virtual[name][0] if name in self._virtual else name)

    def numpy_dtype(self, name: str) -> np.dtype:
        return self.reader.numpy_dtype(self._virtual[name][0] if name in self._virtual else name)

    def nbytes(self, name: str) -> int:
        return int(np.prod(self.shape(name), dtype=np.int64)) * self.numpy_dtype(name).itemsize

    def read(self, name: str) -> np.ndarray:
        if name not in self._virtual:
            return self.reader.read(name)
        fused, e, start, stop = self._virtual[name]
        return np.ascontiguousarray(self.reader.read_rows(fused, e, e + 1)[0, start:stop])

    def read_rows(self, name: str, start: int, stop: int) -> np.ndarray:
        if name not in self._virtual:
            return self.reader.read_rows(name, start, stop)
        return self.read(name)[start:stop]

    def close(self):
        self.reader.close()


def open_reader(folder: str) -> TensorReader | ExpertsReader:
    """A tensor reader for a model folder; fused expert tensors are served per expert (`ExpertsReader`)."""
    reader = TensorReader(folder)
    return ExpertsReader(reader) if any(_FUSED_EXPERTS.fullmatch(n) for n in reader.files) else reader


# ---------------------------------------------------------------- safetensors writing (streaming)


def safetensors_dtype(dtype) -> str:
    code = to_safetensors(dtype)
    if code is None:
        raise CheckpointError(f"cannot write dtype {np.dtype(dtype).name} to safetensors "
                              f"(supported: {sorted(SAFETENSORS_CODES.values())})")
    return code


class SafetensorsWriter:
    """Writes one .safetensors file tensor by tensor, or in pieces at any offset, from any thread.

    The header is computed up front from (name, shape, dtype) and the file is sized at once, so
    each piece goes straight to its place with `os.pwrite`: tensors can be filled in any order
    and in parallel, and only the pieces being written are ever in memory.  The result is a
    standard safetensors file.  `close` checks that every byte of every tensor was written."""

    def __init__(self, path: str, entries: list[tuple[str, tuple[int, ...], object]], metadata=None):
        import struct
        import threading

        header: dict = {"__metadata__": dict(metadata or {"format": "pt"})}
        self._extent: dict[str, tuple[int, int]] = {}  # name -> (first data byte, nbytes)
        offset = 0
        for name, shape, dtype in entries:
            nbytes = int(np.prod(shape, dtype=np.int64)) * np.dtype(dtype).itemsize
            header[name] = {"dtype": safetensors_dtype(dtype), "shape": [int(d) for d in shape],
                            "data_offsets": [offset, offset + nbytes]}
            self._extent[name] = (offset, nbytes)
            offset += nbytes
        raw = json.dumps(header, separators=(",", ":")).encode("utf-8")
        raw += b" " * (-len(raw) % 8)
        self.path = path
        self._base = 8 + len(raw)
        self._dtypes = {name: np.dtype(dtype) for name, _, dtype in entries}
        self._written = dict.fromkeys(self._extent, 0)
        self._lock = threading.Lock()
        self._fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o666)
        try:
            _pwrite_all(self._fd, struct.pack("<Q", len(raw)) + raw, 0)
            os.ftruncate(self._fd, self._base + offset)
        except BaseException:
            os.close(self._fd)
            raise

    def write_at(self, name: str, block: np.ndarray, start: int = 0) -> None:
        """Write `block` (raw bytes of part of tensor `name`) at byte `start` of that tensor's data."""
        if name not in self._extent:
            raise ValueError(f"{self.path}: {name!r} is not in this file's header")
        if np.dtype(block.dtype) != self._dtypes[name]:
            raise ValueError(f"{self.path}: {name!r} block is {block.dtype}, header says {self._dtypes[name]}")
        first, nbytes = self._extent[name]
        data = memoryview(np.ascontiguousarray(block).reshape(-1).view(np.uint8))
        if start < 0 or start + data.nbytes > nbytes:
            raise ValueError(f"{self.path}: {name!r} bytes [{start}, {start + data.nbytes}) past its {nbytes}")
        _pwrite_all(self._fd, data, self._base + first + start)
        with self._lock:
            self._written[name] += data.nbytes

    def write(self, name: str, block: np.ndarray) -> None:
        """Append the next part of tensor `name` (parts of one tensor in order)."""
        self.write_at(name, block, self._written[name])

    def close(self) -> None:
        incomplete = [n for n, (_, nbytes) in self._extent.items() if self._written[n] != nbytes]
        try:
            os.fsync(self._fd)
        finally:
            os.close(self._fd)
        if incomplete:
            raise ValueError(f"{self.path}: closed before these tensors were fully written: {_short(incomplete)}")

    def abort(self) -> None:
        os.close(self._fd)


def _pwrite_all(fd: int, data, offset: int) -> None:
    view = memoryview(data).cast("B")
    while view.nbytes:
        n = os.pwrite(fd, view, offset)
        view, offset = view[n:], offset + n


def parse_size(size: str | int) -> int:
    """'5GB' -> 5e9, '500MiB' -> 500*2**20 (transformers' convention), ints pass through."""
    if isinstance(size, int):
        return size
    m = re.fullmatch(r"\s*(\d+(?:\.\d+)?)\s*([KMGT]?I?B)?\s*", str(size).upper())
    if not m:
        raise ValueError(f"cannot parse size {size!r} (examples: 5GB, 500MB, 2GiB, 1000000)")
    unit = m.group(2) or "B"
    factors = {"B": 1, "KB": 10**3, "MB": 10**6, "GB": 10**9, "TB": 10**12,
              "KIB": 2**10, "MIB": 2**20, "GIB": 2**30, "TIB": 2**40}
    if unit not in factors:
        raise ValueError(f"cannot parse size {size!r} (examples: 5GB, 500MB, 2GiB, 1000000)")
    factor = factors[unit]
    return int(float(m.group(1)) * factor)


def check_tensors(cfg: QwenConfig, reader: TensorReader, abstract: dict[tuple, jax.ShapeDtypeStruct],
                  source: str) -> None:
    """One error listing every missing, unexpected and mis-shaped tensor."""
    expected: dict[str, tuple[int, ...]] = {}
    for spec in param_table(cfg):
        shape = abstract[spec.path].shape
        for name, index in hf_blocks(spec, cfg.num_hidden_layers):
            expected[name] = hf_shape(spec, shape[len(index):])
    present = set(reader.files)
    # transformers may store the tied head anyway; it is redundant, not an error.
    ignorable = {"lm_head.weight"} if cfg.tie_word_embeddings else set()
    missing = sorted(set(expected) - present)
    unexpected = sorted(present - set(expected) - ignorable)
    misshaped = [
        f"{n}: file {reader.shape(n)} vs config {expected[n]}"
        for n in sorted(set(expected) & present) if reader.shape(n) != expected[n]
    ]
    problems = []
    if missing:
        problems.append(f"missing tensors ({len(missing)}): {_short(missing)}")
    if unexpected:
        problems.append(f"unexpected tensors ({len(unexpected)}): {_short(unexpected)}")
    if misshaped:
        problems.append(f"tensors whose shape disagrees with config.json ({len(misshaped)}): {_short(misshaped)}")
    if problems:
        raise CheckpointError(f"{source}: " + "; ".join(problems))


def _short(items: list[str], limit: int = 12) -> str:
    more = f" ... and {len(items) - limit} more" if len(items) > limit else ""
    return ", ".join(items[:limit]) + more

