"""Hugging Face <-> qwen_jax parameters: the one name table, streaming safetensors I/O, `from_pretrained`.

The table `PARAM_TABLE` is the single place that knows Hugging Face tensor names.  Each
entry maps one of our parameter paths to a Hugging Face name (with `{i}` for the layer
index of stacked decoder parameters) and a layout transform:

* `copy`       same shape (norm weights, embeddings, biases reshaped to [heads, head_dim]);
* `t`          2-D transpose (nn.Linear [out, in] -> kernel [in, out]);
* `in_heads`   [heads*head_dim, embed] -> [embed, heads, head_dim]   (q/k/v projections);
* `out_heads`  [embed, heads*head_dim] -> [heads, head_dim, embed]   (o_proj);
* `heads`      [heads*head_dim] -> [heads, head_dim]                  (q/k/v biases).

Mixture-of-experts models keep the released per-expert names
(`model.layers.{i}.mlp.experts.{e}.gate_proj.weight`, `{e}` = expert index, stacked into
our `[layers, experts, ...]` arrays) and split their layers into two stacks (`layers` for the
sparse, `dense_layers` for the dense-MLP layers; `ParamSpec.layers` lists the Hugging Face
layer indices of a stack).  transformers v5 holds experts fused in memory
(`mlp.experts.gate_up_proj` [E, 2m, embed], `mlp.experts.down_proj` [E, embed, m]);
`open_reader` reads folders written that way as if they held the per-expert tensors.

Reading is tensor by tensor with `safetensors.safe_open` (numpy, no torch): with a mesh,
every device shard is built by `jax.make_array_from_callback` straight from the file, so
the whole model never sits on one device.
"""

from __future__ import annotations

import json
import os
import re
from typing import NamedTuple

import jax
import jax.numpy as jnp
import numpy as np
from flax import nnx

from qwen_jax.config import ConfigError, QwenConfig, load_hf_config, model_stop_ids
from qwen_jax.model import Qwen, layer_stacks
from qwen_jax.model_folder import CheckpointError, inside_model_folder

SAFETENSORS_INDEX = "model.safetensors.index.json"
SAFETENSORS_SINGLE = "model.safetensors"


class ParamSpec(NamedTuple):
    path: tuple[str, ...]  # our path inside the nnx state
    hf_name: str  # Hugging Face tensor name; "{i}" = decoder layer index
    transform: str  # copy | t | in_heads | out_heads | heads
    layers: tuple[int, ...] | None = None  # Hugging Face layer indices of a stack; None = every layer
    experts: int = 0  # > 0: "{e}" in hf_name, our array is [layers, experts, ...]

    @property
    def stacked(self) -> bool:
        return "{i}" in self.hf_name


def param_table(cfg: QwenConfig) -> list[ParamSpec]:
    """Every parameter this config has, with its Hugging Face name and layout transform."""
    table = [
        ParamSpec(("embed_tokens", "embedding"), "model.embed_tokens.weight", "copy"),
        ParamSpec(("norm", "scale"), "model.norm.weight", "copy"),
    ]
    for stack, indices in layer_stacks(cfg).items():
        at = None if indices == tuple(range(cfg.num_hidden_layers)) else indices
        specs = _layer_specs(cfg, cfg.is_sparse(indices[0]))
        table += [spec._replace(path=(stack, *spec.path), layers=at) for spec in specs]
    if not cfg.tie_word_embeddings:
        table.append(ParamSpec(("lm_head", "kernel"), "lm_head.weight", "t"))
    return table


def _layer_specs(cfg: QwenConfig, sparse: bool) -> list[ParamSpec]:
    """The parameters of one decoder layer (paths below the stack name)."""
    layer = "model.layers.{i}."
    mlp = [ParamSpec(("mlp", name, "kernel"), layer + f"mlp.{name}.weight", "t")
           for name in ("gate_proj", "up_proj", "down_proj")]
    if sparse:
        mlp = [ParamSpec(("mlp", "gate", "kernel"), layer + "mlp.gate.weight", "t")]
        mlp += [ParamSpec(("mlp", "experts", name), layer + "mlp.experts.{e}." + f"{name}.weight", "t",
                          experts=cfg.num_experts) for name in ("gate_proj", "up_proj", "down_proj")]
        if cfg.shared_expert_intermediate_size:
            mlp += [ParamSpec(("mlp", "shared_expert", name, "kernel"), layer + f"mlp.shared_expert.{name}.weight", "t")
                    for name in ("gate_proj", "up_proj", "down_proj")]
            mlp.append(ParamSpec(("mlp", "shared_expert_gate", "kernel"), layer + "mlp.shared_expert_gate.weight", "t"))
    table = [
        ParamSpec(("input_layernorm", "scale"), layer + "input_layernorm.weight", "copy"),
        ParamSpec(("post_attention_layernorm", "scale"), layer + "post_attention_layernorm.weight", "copy"),
        *mlp,
        ParamSpec(("self_attn", "o_proj", "kernel"), layer + "self_attn.o_proj.weight", "out_heads"),
    ]
    for name in ("q_proj", "k_proj", "v_proj"):
        table.append(ParamSpec(("self_attn", name, "kernel"), layer + f"self_attn.{name}.weight", "in_heads"))
        if cfg.attention_bias:
            table.append(ParamSpec(("self_attn", name, "bias"), layer + f"self_attn.{name}.bias", "heads"))
    if cfg.family == "qwen3" and cfg.attention_bias:
        table.append(ParamSpec(("self_attn", "o_proj", "bias"), layer + "self_attn.o_proj.bias", "copy"))
    if cfg.qk_norm:
        table.append(ParamSpec(("self_attn", "q_norm", "scale"), layer + "self_attn.q_norm.weight", "copy"))
        table.append(ParamSpec(("self_attn", "k_norm", "scale"), layer + "self_attn.k_norm.weight", "copy"))
    return table


def hf_shape(spec: ParamSpec, our_shape: tuple[int, ...]) -> tuple[int, ...]:
    """The Hugging Face shape of one layer's tensor, given our (unstacked) shape."""
    s = tuple(our_shape)
    if spec.transform == "copy":
        return s
    if spec.transform == "t":
        return (s[1], s[0])
    if spec.transform == "in_heads":  # ours [E, H, D]
        return (s[1] * s[2], s[0])
    if spec.transform == "out_heads":  # ours [H, D, E]
        return (s[2], s[0] * s[1])
    if spec.transform == "heads":  # ours [H, D]
        return (s[0] * s[1],)
    raise ValueError(spec.transform)


def to_ours(spec: ParamSpec, hf: np.ndarray, our_shape: tuple[int, ...]) -> np.ndarray:
    """One Hugging Face tensor -> our layout (unstacked shape), contiguous."""
    if spec.transform == "copy":
        return np.ascontiguousarray(hf)
    if spec.transform == "t":
        return transpose_copy(hf, (1, 0))
    if spec.transform == "in_heads":
        e, h, d = our_shape
        return transpose_copy(hf.reshape(h * d, e), (1, 0)).reshape(e, h, d)
    if spec.transform == "out_heads":
        h, d, e = our_shape
        return transpose_copy(hf.reshape(e, h * d), (1, 0)).reshape(h, d, e)
    if spec.transform == "heads":
        return np.ascontiguousarray(hf).reshape(our_shape)
    raise ValueError(spec.transform)


def to_hf(spec: ParamSpec, ours: np.ndarray) -> np.ndarray:
    """One of our (unstacked) tensors -> Hugging Face layout, contiguous."""
    if spec.transform in ("copy", "heads"):
        out = np.ascontiguousarray(ours)
        return out.reshape(-1) if spec.transform == "heads" else out
    if spec.transform == "t":
        return transpose_copy(ours, (1, 0))
    if spec.transform == "in_heads":
        e, h, d = ours.shape
        return transpose_copy(ours.reshape(e, h * d), (1, 0))
    if spec.transform == "out_heads":
        h, d, e = ours.shape
        return transpose_copy(ours.reshape(h * d, e), (1, 0))
    raise ValueError(spec.transform)


_UINT_OF_SIZE = {1: np.uint8, 2: np.uint16, 4: np.uint32, 8: np.uint64}


def transpose_copy(x: np.ndarray, axes: tuple[int, ...], band: int = 64) -> np.ndarray:
    """`np.ascontiguousarray(x.transpose(axes))`, 3-4x faster for large matrices.

    A plain strided copy of a big matrix misses the cache on every element; copying bands of
    `band` source rows keeps each band's output lines in cache.  The copy runs on an unsigned
    integer view of the same width: bit-exact for every float dtype, and numpy's integer copy
    loops release the GIL, so transposes in worker threads run in parallel (bfloat16, an
    ml_dtypes type, would hold the GIL).
    """
    bits = x.view(_UINT_OF_SIZE[x.dtype.itemsize]) if x.dtype.itemsize in _UINT_OF_SIZE and x.ndim else x
    out = np.empty(tuple(x.shape[a] for a in axes), dtype=bits.dtype)
    where = axes.index(0)  # the output axis that source axis 0 becomes
    for start in range(0, x.shape[0] if x.ndim else 0, band):
        index = [slice(None)] * x.ndim
        index[where] = slice(start, start + band)
        out[tuple(index)] = bits[start:start + band].transpose(axes)
    if not x.ndim:
        out[()] = bits
    return out.view(x.dtype)


def hf_blocks(spec: ParamSpec, num_layers: int) -> list[tuple[str, tuple[int, ...]]]:
    """(Hugging Face name, index into our array) of every tensor of one parameter, in layer order:
    `()` for an unstacked parameter, `(k,)` for position k of a layer stack, `(k, e)` for expert e."""
    if not spec.stacked:
        return [(spec.hf_name, ())]
    layers = range(num_layers) if spec.layers is None else spec.layers
    if spec.experts:
        return [(spec.hf_name.format(i=i, e=e), (k, e)) for k, i in enumerate(layers) for e in range(spec.experts)]
    return [(spec.hf_name.format(i=i), (k,)) for k, i in enumerate(layers)]


def read_stacked(reader, spec: ParamSpec, position: int, layer_shape: tuple[int, ...]) -> np.ndarray:
    """Position `position` of a stacked parameter in our layout (`layer_shape`: without the layer
    axis); a per-expert parameter reads and stacks all its experts."""
    layer = position if spec.layers is None else spec.layers[position]
    if not spec.experts:
        return to_ours(spec, reader.read(spec.hf_name.format(i=layer)), layer_shape)
    return np.stack([to_ours(spec, reader.read(spec.hf_name.format(i=layer, e=e)), layer_shape[1:])
                     for e in range(spec.experts)])


def hf_names(spec: ParamSpec, num_layers: int) -> list[str]:
    return [name for name, _ in hf_blocks(spec, num_layers)]


def layer_blocks(table: list[ParamSpec], num_layers: int) -> list[tuple[str, ParamSpec, tuple[int, ...]]]:
    """(Hugging Face name, spec, index) of every stacked tensor, ordered by Hugging Face layer (as
    transformers writes them)."""
    blocks = [(name, spec, index) for spec in table if spec.stacked for name, index in hf_blocks(spec, num_layers)]
    layer_of = {spec: range(num_layers) if spec.layers is None else spec.layers for spec in table}
    return sorted(blocks, key=lambda b: layer_of[b[1]][b[2][0]])


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
        dtype = np.dtype(_ml(_ST_TO_NUMPY[entry["dtype"]])) if entry["dtype"] in _ST_TO_NUMPY else None
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
        if code not in _ST_TO_NUMPY:
            raise CheckpointError(f"{self.files[name]}: tensor {name!r} has unsupported dtype {code}")
        return np.dtype(_ml(_ST_TO_NUMPY[code]))

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
_ST_TO_NUMPY = {"BF16": "bfloat16", "F16": "float16", "F32": "float32", "F64": "float64"}
_NUMPY_TO_ST = {v: k for k, v in _ST_TO_NUMPY.items()}


def _ml(name: str):
    if name == "bfloat16":
        import ml_dtypes

        return ml_dtypes.bfloat16
    return name


def safetensors_dtype(dtype) -> str:
    name = np.dtype(dtype).name
    if name not in _NUMPY_TO_ST:
        raise CheckpointError(f"cannot write dtype {name} to safetensors (supported: {sorted(_NUMPY_TO_ST)})")
    return _NUMPY_TO_ST[name]


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


# ---------------------------------------------------------------- model construction
def abstract_model(cfg: QwenConfig):
    """(graphdef, abstract state) without allocating parameters."""
    return nnx.split(nnx.eval_shape(lambda: Qwen(cfg, rngs=nnx.Rngs(0))))


def flat_paths(state) -> dict[tuple, object]:
    """{path tuple of str: leaf} over an nnx.State (variables or raw arrays)."""
    return {tuple(str(k) for k in path): leaf for path, leaf in nnx.to_flat_state(state)}


def from_pretrained(path: str | os.PathLike, *, dtype=None, param_dtype=None, mesh=None, **config_overrides) -> Qwen:
    """Load a Hugging Face Qwen2/Qwen2.5/Qwen3 folder (safetensors) into a `Qwen` model.

    `dtype` is the compute dtype (default float32), `param_dtype` the storage dtype
    (default: float32; pass "keep" to keep the checkpoint's own dtype).  With `mesh`, each
    parameter is placed straight into its sharding (`qwen_jax.sharding` rules); other
    keyword arguments override config keys (e.g. `attention="blockwise"`).
    """
    from qwen_jax.sharding import state_shardings

    folder = os.fspath(path)
    if not os.path.isdir(folder):
        raise ConfigError(f"{folder}: not a directory (expected a Hugging Face model folder)")
    overrides = dict(config_overrides)
    if dtype is not None:
        overrides["dtype"] = dtype
    reader = open_reader(folder)
    if param_dtype == "keep":
        first = next(iter(reader.files))
        param_dtype = {"BF16": "bfloat16", "F16": "float16", "F32": "float32"}.get(reader.dtype(first), "float32")
    if param_dtype is not None:
        overrides["param_dtype"] = param_dtype
    cfg = load_hf_config(folder, **overrides)
    graphdef, abstract_state = abstract_model(cfg)
    abstract = flat_paths(abstract_state)
    check_tensors(cfg, reader, abstract, folder)
    shardings = flat_paths(state_shardings(abstract_state, mesh)) if mesh is not None else None
    device = jax.devices()[0]
    loaded = {}
    for spec in param_table(cfg):
        var = abstract[spec.path]
        shape, target_dtype = var.shape, var.dtype
        sharding = shardings[spec.path] if shardings else jax.sharding.SingleDeviceSharding(device)
        loaded[spec.path] = _load_param(reader, cfg, spec, shape, target_dtype, sharding)
    reader.close()
    state = _fill_state(abstract_state, loaded)
    model = nnx.merge(graphdef, state)
    model.stop_token_ids = model_stop_ids(folder)  # generate(stop_ids=None) stops on these
    return model


def load_model(path: str | os.PathLike, step: int | None = None, *, dtype=None, param_dtype=None, mesh=None,
               **config_overrides) -> Qwen:
    """A Hugging Face folder (`from_pretrained`) or a training checkpoint directory (Orbax
    `CheckpointManager` root with config.json beside it; `step` None = the latest)."""
    from qwen_jax import checkpoint_format
    from qwen_jax.sharding import state_shardings

    folder = os.fspath(path)
    if not os.path.isdir(folder):
        raise ConfigError(f"{folder}: not a directory (expected a Hugging Face model folder or a checkpoint dir)")
    if weight_files_present(folder):
        if step is not None:
            raise ConfigError(f"{folder}: a Hugging Face folder has no steps (step={step} given)")
        return from_pretrained(folder, dtype=dtype, param_dtype=param_dtype, mesh=mesh, **config_overrides)
    overrides = dict(config_overrides)
    for key, value in (("dtype", dtype), ("param_dtype", param_dtype)):
        if value is not None:
            overrides[key] = value
    cfg = load_hf_config(folder, **overrides)
    graphdef, abstract_state = abstract_model(cfg)
    abstract_pure = nnx.to_pure_dict(abstract_state)
    if mesh is not None:
        shardings = nnx.to_pure_dict(state_shardings(abstract_state, mesh))
    else:
        one = jax.sharding.SingleDeviceSharding(jax.devices()[0])
        shardings = jax.tree.map(lambda _: one, abstract_pure)
    try:
        params = checkpoint_format.restore_params(folder, step, abstract_pure=abstract_pure, shardings=shardings)
    except FileNotFoundError as e:
        raise ConfigError(str(e)) from None
    state = nnx.State(abstract_state)
    nnx.replace_by_pure_dict(state, params)
    model = nnx.merge(graphdef, state)
    model.stop_token_ids = model_stop_ids(folder)
    return model


def weight_files_present(folder: str) -> bool:
    return any(name.endswith(".safetensors") for name in os.listdir(folder))


def _fill_state(abstract_state, values: dict[tuple, jax.Array]):
    def fill(path, leaf):
        key = tuple(str(k) for k in path)
        if hasattr(leaf, "replace"):
            return leaf.replace(values[key])
        return values[key]

    return nnx.from_flat_state([(p, fill(p, v)) for p, v in nnx.to_flat_state(abstract_state)])


def _load_param(reader: TensorReader, cfg: QwenConfig, spec: ParamSpec, shape, dtype, sharding) -> jax.Array:
    """Build one global array: each Hugging Face tensor is read once and copied into the device shards that need it."""
    shape = tuple(shape)
    index_map = sharding.addressable_devices_indices_map(shape)
    # Devices holding the same shard share one host buffer.
    buffers: dict[tuple, np.ndarray] = {}
    device_keys = {}
    for device, index in index_map.items():
        key = tuple(sl.indices(n) for sl, n in zip(index, shape, strict=True))
        device_keys[device] = key
        if key not in buffers:
            buffers[key] = np.empty(tuple(len(range(*k)) for k in key), dtype=jnp.dtype(dtype))
    for name, index in hf_blocks(spec, cfg.num_hidden_layers):
        block_shape = shape[len(index):]
        tensor = np.asarray(to_ours(spec, reader.read(name), block_shape)).astype(jnp.dtype(dtype), copy=False)
        for key, buf in buffers.items():
            lead = [range(*k) for k in key[:len(index)]]
            if all(i in r for i, r in zip(index, lead, strict=True)):
                at = tuple(r.index(i) for i, r in zip(index, lead, strict=True))
                buf[at] = tensor[tuple(slice(*k) for k in key[len(index):])]
        del tensor
    arrays = [jax.device_put(buffers[device_keys[d]], d) for d in index_map]
    return jax.make_array_from_single_device_arrays(shape, sharding, arrays)
