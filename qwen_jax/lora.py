"""LoRA: low-rank adapters on the projections, a frozen base, PEFT-compatible import and export.

A targeted `Linear` (kernel [*in, *out]) gains `lora_a` [*in, r] and `lora_b` [r, *out] (float32,
stacked over layers like every decoder parameter) and computes `x W + alpha/r * dropout(x) A B`
(`qwen_jax.layers.linear.lora_delta`).  A is initialised as PEFT does (kaiming-uniform with
a=sqrt(5) on its [r, in] weight, i.e. U(-1/sqrt(in), 1/sqrt(in))), B as zeros, so training starts
from the base model exactly.

Layouts.  PEFT's `lora_A.weight` is an nn.Linear weight [r, in] and `lora_B.weight` [out, r] on
Hugging Face's flattened shapes; our in/out dims keep heads apart (q_proj [embed, heads, head_dim],
o_proj [heads, head_dim, embed]) in the same row-major order as Hugging Face's flattening, so for
every projection `lora_A = A.reshape(-1, r).T` and `lora_B = B.reshape(r, -1).T`.

The base is frozen whole (`freeze_base`: FreezeSpec ALL), so the optimizer allocates no moments
for it and the train step does not differentiate it.  `base_dtype` stores it in a narrower dtype
(it never receives an update, so no master copy is needed).  Checkpoints hold base and adapters
(the train state's `params` is the whole tree): a resumed run needs nothing but its workdir.
"""

from __future__ import annotations

import dataclasses
import json
import os
import re
import shutil
import tempfile

import jax
import jax.numpy as jnp
import numpy as np
from flax import nnx

from qwen_jax.atomic import atomic_write_json
from qwen_jax.dtypes import FLOAT_DTYPES

ADAPTERS = ("lora_a", "lora_b")
DEFAULT_TARGETS = r"/(self_attn/(q|k|v|o)_proj|mlp/(gate|up|down)_proj)/kernel$"
EXPORTS = ("merged", "adapter", "both")
BASE_DTYPES = ("keep", *FLOAT_DTYPES)
PEFT_PREFIX = "base_model.model."
ADAPTER_CONFIG = "adapter_config.json"
ADAPTER_WEIGHTS = "adapter_model.safetensors"


class LoraError(ValueError):
    """A LoRA setting or adapter folder that cannot be used; the message names the key or file."""


class LoraDropoutKey(nnx.Variable):
    """The PRNG key (raw uint32[2], stacked over layers) of one adapter's dropout; set per step, never trained."""


@dataclasses.dataclass(frozen=True)
class LoraSpec:
    rank: int
    alpha: float
    dropout: float = 0.0
    targets: str = DEFAULT_TARGETS
    base_dtype: str = "keep"
    export: str = "both"
    init_from: str = ""

    @property
    def scale(self) -> float:
        return float(self.alpha) / int(self.rank)


def spec_from_config(block) -> LoraSpec | None:
    """The `lora` config block (configs/base.py) as a LoraSpec; None when LoRA is off (rank 0, no init_from).

    With `init_from` (a PEFT adapter folder) rank, alpha and targets come from its adapter_config.json.
    """
    if block is None:
        return None
    rank, init_from = block.get("rank", 0), str(block.get("init_from", "") or "")
    if isinstance(rank, bool) or not isinstance(rank, int) or rank < 0:
        raise LoraError(f"config key 'lora.rank' must be an integer >= 0 (0 = off), got {rank!r}")
    if rank == 0 and not init_from:
        return None
    dropout = float(block.get("dropout", 0.0))
    if not 0.0 <= dropout < 1.0:
        raise LoraError(f"config key 'lora.dropout' must be in [0, 1), got {dropout!r}")
    base_dtype, export = str(block.get("base_dtype", "keep")), str(block.get("export", "both"))
    if base_dtype not in BASE_DTYPES:
        raise LoraError(f"config key 'lora.base_dtype' must be one of {' | '.join(BASE_DTYPES)}, got {base_dtype!r}")
    if export not in EXPORTS:
        raise LoraError(f"config key 'lora.export' must be one of {' | '.join(EXPORTS)}, got {export!r}")
    targets = str(block.get("targets", DEFAULT_TARGETS))
    alpha = float(block.get("alpha", 16.0))
    if init_from:
        peft = read_adapter_config(init_from)
        rank, alpha, targets = peft["r"], float(peft["lora_alpha"]), peft_targets_regex(peft, init_from)
    try:
        re.compile(targets)
    except re.error as e:
        raise LoraError(f"config key 'lora.targets': invalid regex {targets!r} ({e})") from None
    if alpha <= 0:
        raise LoraError(f"config key 'lora.alpha' must be > 0, got {alpha!r}")
    return LoraSpec(rank, alpha, dropout, targets, base_dtype, export, init_from)


def base_config(cfg, overrides: dict, spec: LoraSpec | None):
    """(QwenConfig, overrides) with the frozen base's storage dtype (`lora.base_dtype`) as param_dtype."""
    if spec is None or spec.base_dtype == "keep":
        return cfg, overrides
    return cfg.replace(param_dtype=spec.base_dtype), {**overrides, "param_dtype": spec.base_dtype}


# ---------------------------------------------------------------- paths and trees
def path_of(path) -> str:
    return "/".join(str(getattr(k, "key", getattr(k, "name", k))) for k in path)


def is_adapter(path: str) -> bool:
    return path.rsplit("/", 1)[-1] in ADAPTERS


def flatten(tree) -> dict:
    return {path_of(p): v for p, v in jax.tree_util.tree_leaves_with_path(tree)}


def unflatten(flat: dict) -> dict:
    out: dict = {}
    for path, value in flat.items():
        node = out
        *parents, last = path.split("/")
        for key in parents:
            node = node.setdefault(key, {})
        node[last] = value
    return out


def partition(tree, keep) -> tuple[dict, dict]:
    """(leaves whose path satisfies `keep`, the others) of a nested dict, as two nested dicts."""
    flat = flatten(tree)
    return (unflatten({p: v for p, v in flat.items() if keep(p)}),
            unflatten({p: v for p, v in flat.items() if not keep(p)}))


def combine(*trees) -> dict:
    """The union of nested dicts with disjoint leaves (inverse of `partition`)."""
    flat: dict = {}
    for t in trees:
        flat.update(flatten(t))
    return unflatten(flat)


def base_only(tree) -> dict:
    """The tree without adapter leaves (what a base checkpoint or Hugging Face folder holds)."""
    return partition(tree, lambda p: not is_adapter(p))[0]


# ---------------------------------------------------------------- attaching adapters to a model
def projection_kernels(model) -> dict[str, object]:
    """kernel path -> Linear module, for every decoder-layer projection that can take an adapter."""
    from qwen_jax.layers.linear import Linear

    return {path_of(path) + "/kernel": m for path, m in nnx.iter_modules(model)
            if isinstance(m, Linear) and path and path[0] == "layers"}


def target_paths(model, spec: LoraSpec) -> list[str]:
    candidates = projection_kernels(model)
    rx = re.compile(spec.targets)
    hits = sorted(p for p in candidates if rx.search("/" + p))
    if not hits:
        raise LoraError(f"config key 'lora.targets': regex {spec.targets!r} matches no projection kernel; "
                        f"they are: {', '.join(sorted(candidates))}")
    return hits


def attach(model, spec: LoraSpec):
    """Give the targeted projections adapter Params (zeros; values come from `init_adapters` or a PEFT folder)."""
    modules = projection_kernels(model)
    r = int(spec.rank)
    for path in target_paths(model, spec):
        lin = modules[path]
        kernel = lin.kernel
        axes = tuple(kernel.get_metadata().get("axes", ()))
        lead = kernel.shape[:kernel.ndim - len(axes)]  # the stacked layer axis
        in_shape, out_shape = kernel.shape[len(lead):len(lead) + lin.n_in], kernel.shape[len(lead) + lin.n_in:]
        lin.lora_a = nnx.Param(jnp.zeros((*lead, *in_shape, r), jnp.float32), axes=(*axes[:lin.n_in], None))
        lin.lora_b = nnx.Param(jnp.zeros((*lead, r, *out_shape), jnp.float32), axes=(None, *axes[lin.n_in:]))
        lin.lora_scale = spec.scale
        lin.lora_dropout = float(spec.dropout)
        if spec.dropout > 0:
            lin.lora_key = LoraDropoutKey(jnp.zeros((*lead, 2), jnp.uint32))
    return model


def build(cfg, spec: LoraSpec | None, rngs: nnx.Rngs):
    """A `Qwen` model with adapters attached (zero A and B): for tests and evaluation."""
    from qwen_jax.model import Qwen

    model = Qwen(cfg, rngs=rngs)
    return attach(model, spec) if spec is not None else model


def abstract_model(cfg, spec: LoraSpec):
    """(graphdef, abstract Param state, dropout-key template {path: shape}) of the model with adapters."""
    model = nnx.eval_shape(lambda: build(cfg, spec, nnx.Rngs(0)))
    if spec.dropout > 0:
        graphdef, params, keys = nnx.split(model, nnx.Param, LoraDropoutKey)
        template = {p: tuple(v.shape) for p, v in flatten(nnx.to_pure_dict(keys)).items()}
    else:
        graphdef, params = nnx.split(model)
        template = {}
    return graphdef, params, template


def dropout_key_fn(cfg, spec: LoraSpec | None):
    """`keys(rng) -> pure dict` of per-adapter, per-layer dropout keys for `nnx.merge`; None without dropout."""
    if spec is None or spec.dropout <= 0:
        return None
    template = abstract_model(cfg, spec)[2]

    def keys(rng):
        out = {}
        for i, (path, shape) in enumerate(sorted(template.items())):
            k = jax.random.fold_in(rng, i)
            k = jax.random.split(k, shape[0]) if len(shape) == 2 else k
            out[path] = jax.random.key_data(k) if jnp.issubdtype(k.dtype, jax.dtypes.prng_key) else k
        return unflatten(out)

    return keys


def init_adapters(abstract_params, seed: int) -> dict:
    """Adapter values of a params tree: A ~ U(-1/sqrt(in), 1/sqrt(in)) per layer (PEFT's kaiming-uniform), B = 0."""
    out = {}
    root = jax.random.PRNGKey(seed)
    for i, (path, leaf) in enumerate(sorted(flatten(abstract_params).items())):
        if not is_adapter(path):
            continue
        if path.endswith("lora_b"):
            out[path] = jnp.zeros(leaf.shape, jnp.float32)
            continue
        stacked = path.startswith("layers/")
        fan_in = int(np.prod(leaf.shape[1 if stacked else 0:-1]))
        bound = 1.0 / np.sqrt(fan_in)
        out[path] = jax.random.uniform(jax.random.fold_in(root, i), leaf.shape, jnp.float32, -bound, bound)
    return unflatten(out)


def add_adapters(base_params, cfg, spec: LoraSpec | None, abstract_params, shardings, seed: int):
    """Base params (any source) + adapters: fresh (`init_adapters`) or read from `spec.init_from` (PEFT)."""
    if spec is None:
        return base_params
    adapter_abstract = partition(abstract_params, is_adapter)[0]
    adapter_sh = partition(shardings, is_adapter)[0]
    if spec.init_from:
        flat_abs = flatten(adapter_abstract)
        values = read_peft_adapter(spec.init_from, cfg, {p: v.shape for p, v in flat_abs.items()})
        adapters = jax.tree.map(lambda v, s: jax.device_put(v, s), unflatten(values), adapter_sh)
    else:
        adapters = jax.jit(lambda: init_adapters(adapter_abstract, seed), out_shardings=adapter_sh)()
    return combine(base_params, adapters)


def freeze_base(freeze, abstract_params, spec: LoraSpec | None):
    """The FreezeSpec with every non-adapter parameter frozen whole (no optimizer state, no gradient)."""
    if spec is None:
        return freeze
    from qwen_jax.trainer.optimizer import ALL, FreezeError, FreezeSpec

    paths = flatten(abstract_params)
    frozen = {**freeze.frozen, **{p: ALL for p in paths if not is_adapter(p)}}
    if all(frozen.get(p) == ALL for p in paths):
        raise FreezeError("freeze settings freeze every LoRA adapter: nothing would train")
    return FreezeSpec(frozen, freeze.num_layers)


def merged_params(params, spec: LoraSpec):
    """Base params with `scale * A B` folded into each targeted kernel (in the kernel's dtype); no adapters."""
    flat = flatten(params)
    out = {}
    for path, value in flat.items():
        if is_adapter(path):
            continue
        parent = path.rsplit("/", 1)[0]
        a = flat.get(parent + "/lora_a")
        if path.endswith("/kernel") and a is not None:
            b = flat[parent + "/lora_b"]
            delta = jax.vmap(lambda x, y: jnp.tensordot(x, y, axes=1))(a, b)  # per layer: [*in, r] . [r, *out]
            value = (value.astype(jnp.float32) + spec.scale * delta).astype(value.dtype)
        out[path] = value
    return unflatten(out)


# ---------------------------------------------------------------- PEFT names and layouts
def peft_names(hf_weight_name: str) -> tuple[str, str]:
    """PEFT's (lora_A, lora_B) tensor names for a Hugging Face weight name."""
    stem = PEFT_PREFIX + hf_weight_name.removesuffix(".weight")
    return stem + ".lora_A.weight", stem + ".lora_B.weight"


def to_peft(a: np.ndarray, b: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """One layer's (A [*in, r], B [r, *out]) -> PEFT's (lora_A [r, in], lora_B [out, r])."""
    r = a.shape[-1]
    return np.ascontiguousarray(a.reshape(-1, r).T), np.ascontiguousarray(b.reshape(r, -1).T)


def from_peft(lora_a: np.ndarray, lora_b: np.ndarray, a_shape, b_shape) -> tuple[np.ndarray, np.ndarray]:
    """PEFT's (lora_A [r, in], lora_B [out, r]) -> one layer's (A [*in, r], B [r, *out])."""
    return lora_a.T.reshape(a_shape), lora_b.T.reshape(b_shape)


def merge_weight(weight: np.ndarray, lora_a: np.ndarray, lora_b: np.ndarray, scale: float) -> np.ndarray:
    """A Hugging Face [out, in] weight + scale * lora_B @ lora_A, computed in float32, in the weight's dtype."""
    delta = lora_b.astype(np.float32) @ lora_a.astype(np.float32)
    return (weight.astype(np.float32) + np.float32(scale) * delta).astype(weight.dtype)


def adapter_config(spec: LoraSpec, module_names: list[str], base_model: str | None = None) -> dict:
    """adapter_config.json as PEFT writes it for a plain LoRA on these module names."""
    return {
        "peft_type": "LORA", "task_type": "CAUSAL_LM", "base_model_name_or_path": base_model,
        "r": int(spec.rank), "lora_alpha": float(spec.alpha), "lora_dropout": float(spec.dropout),
        "target_modules": sorted(module_names), "bias": "none", "fan_in_fan_out": False, "use_rslora": False,
        "use_dora": False, "init_lora_weights": True, "modules_to_save": None, "layers_to_transform": None,
        "layers_pattern": None, "rank_pattern": {}, "alpha_pattern": {}, "inference_mode": True,
    }


def read_adapter_config(folder: str) -> dict:
    path = os.path.join(folder, ADAPTER_CONFIG)
    try:
        with open(path, encoding="utf-8") as f:
            cfg = json.load(f)
    except FileNotFoundError:
        raise LoraError(f"{path}: not found (expected a PEFT adapter folder)") from None
    except json.JSONDecodeError as e:
        raise LoraError(f"{path}: not valid JSON ({e})") from None
    if cfg.get("peft_type") != "LORA":
        raise LoraError(f"{path}: peft_type {cfg.get('peft_type')!r} is not 'LORA'")
    unsupported = {k: cfg.get(k) for k in ("use_rslora", "use_dora", "fan_in_fan_out", "layers_to_transform",
                                           "rank_pattern", "alpha_pattern", "modules_to_save") if cfg.get(k)}
    if cfg.get("bias", "none") != "none":
        unsupported["bias"] = cfg["bias"]
    if unsupported:
        raise LoraError(f"{path}: unsupported LoRA options {unsupported} (plain LoRA on the projections only)")
    if not isinstance(cfg.get("r"), int) or cfg["r"] < 1 or not cfg.get("lora_alpha"):
        raise LoraError(f"{path}: needs an integer 'r' >= 1 and 'lora_alpha'")
    return cfg


def peft_targets_regex(cfg: dict, folder: str) -> str:
    """Our `targets` regex for PEFT's `target_modules` list of module names."""
    names = cfg.get("target_modules")
    if isinstance(names, str) or not names:
        raise LoraError(f"{os.path.join(folder, ADAPTER_CONFIG)}: target_modules must be a list of module names, "
                        f"got {names!r}")
    return r"/(" + "|".join(re.escape(n) for n in sorted(names)) + r")/kernel$"


def _kernel_specs(cfg) -> dict[str, object]:
    """'layers/self_attn/q_proj/kernel' -> hf.names ParamSpec, for the kernels of decoder projections."""
    from qwen_jax.hf.names import param_table

    return {"/".join(s.path): s for s in param_table(cfg) if s.stacked and s.path[-1] == "kernel"}


def read_peft_adapter(folder: str, cfg, shapes: dict[str, tuple]) -> dict[str, np.ndarray]:
    """Our stacked adapter arrays {path: array} for `shapes` (paths ending lora_a/lora_b) from a PEFT folder."""
    from safetensors import safe_open

    file = os.path.join(folder, ADAPTER_WEIGHTS)
    if not os.path.exists(file):
        raise LoraError(f"{file}: not found (expected PEFT's adapter weights)")
    table = {p.rsplit("/", 1)[0]: s for p, s in _kernel_specs(cfg).items()
             if p.rsplit("/", 1)[0] + "/lora_a" in shapes}
    out = {}
    with safe_open(file, framework="numpy") as f:
        names = set(f.keys())
        expected = set()
        for parent, spec in sorted(table.items()):
            a_shape, b_shape = shapes[parent + "/lora_a"], shapes[parent + "/lora_b"]
            layers_a, layers_b = [], []
            for i in range(a_shape[0]):
                name_a, name_b = peft_names(spec.hf_name.format(i=i))
                expected |= {name_a, name_b}
                missing = [n for n in (name_a, name_b) if n not in names]
                if missing:
                    raise LoraError(f"{file}: missing tensor(s) {missing}")
                la, lb = f.get_tensor(name_a), f.get_tensor(name_b)
                want_a = (a_shape[-1], int(np.prod(a_shape[1:-1])))
                want_b = (int(np.prod(b_shape[2:])), b_shape[1])
                if la.shape != want_a or lb.shape != want_b:
                    raise LoraError(f"{file}: {name_a} / {name_b} have shapes {la.shape} / {lb.shape}, "
                                    f"expected {want_a} / {want_b} (wrong base model or rank?)")
                a, b = from_peft(la.astype(np.float32), lb.astype(np.float32), a_shape[1:], b_shape[1:])
                layers_a.append(a)
                layers_b.append(b)
            out[parent + "/lora_a"], out[parent + "/lora_b"] = np.stack(layers_a), np.stack(layers_b)
        extra = sorted(names - expected)
        if extra:
            raise LoraError(f"{file}: tensors this model has no adapter for: {extra[:5]}")
    return out


# ---------------------------------------------------------------- writing folders
def _atomic_folder(out: str):
    """A temporary folder beside `out` (renamed onto it by `_commit`)."""
    parent = os.path.dirname(os.path.abspath(out))
    os.makedirs(parent, exist_ok=True)
    return tempfile.mkdtemp(prefix=f".{os.path.basename(out)}.tmp-", dir=parent)


def _commit(tmp: str, out: str) -> None:
    umask = os.umask(0)
    os.umask(umask)
    os.chmod(tmp, 0o777 & ~umask)
    if os.path.lexists(out):
        old = tmp + ".old"
        os.rename(out, old)
        os.rename(tmp, out)
        shutil.rmtree(old, ignore_errors=True)
    else:
        os.rename(tmp, out)


def _write_safetensors(path: str, tensors: list[tuple[str, tuple, object, object]]) -> None:
    """tensors: (name, shape, dtype, produce()) written one at a time (only one tensor in memory)."""
    from qwen_jax.hf.safetensors_io import SafetensorsWriter

    writer = SafetensorsWriter(path, [(n, s, d) for n, s, d, _ in tensors])
    try:
        for name, _, _, produce in tensors:
            writer.write(name, produce())
    except BaseException:
        writer.abort()
        raise
    writer.close()


def write_folder(out: str, fill) -> str:
    """Write a folder atomically: `fill(tmp)` writes into a temporary folder that then replaces `out`."""
    tmp = _atomic_folder(out)
    try:
        fill(tmp)
        _commit(tmp, out)
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise
    return out


# ---------------------------------------------------------------- export from a training checkpoint
def export(ckpt_dir: str, step: int, spec: LoraSpec, *, merged_dir: str, adapter_dir: str) -> list[str]:
    """Write `spec.export`'s folders from checkpoint `step`: a merged Hugging Face folder and/or a PEFT adapter."""
    written = []
    if spec.export in ("adapter", "both"):
        written.append(export_adapter(ckpt_dir, step, spec, adapter_dir))
    if spec.export in ("merged", "both"):
        written.append(export_merged(ckpt_dir, step, spec, merged_dir))
    return written


def _checkpoint_adapters(reader, cfg) -> dict[str, object]:
    """kernel path -> ParamSpec for the kernels of the checkpoint that have adapters."""
    present = {"/".join(p) for p in reader.paths}
    return {p: s for p, s in _kernel_specs(cfg).items() if p.rsplit("/", 1)[0] + "/lora_a" in present}


def export_adapter(ckpt_dir: str, step: int, spec: LoraSpec, out: str) -> str:
    """A PEFT adapter folder (adapter_config.json + adapter_model.safetensors) from a checkpoint's adapters."""
    from qwen_jax import checkpoint_format as cf
    from qwen_jax.config import load_hf_config

    cfg = load_hf_config(ckpt_dir)
    reader = cf.ParamReader(ckpt_dir, step)
    try:
        kernels = _checkpoint_adapters(reader, cfg)
        tensors = []
        for path, pspec in sorted(kernels.items()):
            parent = tuple(path.split("/")[:-1])
            for i in range(cfg.num_hidden_layers):
                def layer(i=i, parent=parent):
                    a = reader.read(parent + ("lora_a",), (i,))
                    b = reader.read(parent + ("lora_b",), (i,))
                    return to_peft(a.astype(np.float32), b.astype(np.float32))
                name_a, name_b = peft_names(pspec.hf_name.format(i=i))
                a_shape = reader.shape(parent + ("lora_a",))[1:]
                b_shape = reader.shape(parent + ("lora_b",))[1:]
                r = a_shape[-1]
                tensors.append((name_a, (r, int(np.prod(a_shape[:-1]))), np.float32, lambda f=layer: f()[0]))
                tensors.append((name_b, (int(np.prod(b_shape[1:])), r), np.float32, lambda f=layer: f()[1]))
        modules = sorted({p.split("/")[-2] for p in kernels})

        def fill(tmp):
            _write_safetensors(os.path.join(tmp, ADAPTER_WEIGHTS), tensors)
            atomic_write_json(os.path.join(tmp, ADAPTER_CONFIG), adapter_config(spec, modules))

        return write_folder(out, fill)
    finally:
        reader.close()


def export_merged(ckpt_dir: str, step: int, spec: LoraSpec, out: str) -> str:
    """A Hugging Face folder of base + scale * B A (merged in float32, stored in the base's dtype)."""
    from qwen_jax import checkpoint_format as cf
    from qwen_jax.config import load_hf_config
    from qwen_jax.hf.names import hf_shape, param_table, to_hf

    cfg = load_hf_config(ckpt_dir)
    reader = cf.ParamReader(ckpt_dir, step)
    try:
        adapted = _checkpoint_adapters(reader, cfg)
        tensors = []
        for pspec in param_table(cfg):
            layers = range(cfg.num_hidden_layers) if pspec.stacked else [None]
            path = "/".join(pspec.path)
            shape = reader.shape(pspec.path)
            dtype = reader.dtype(pspec.path)
            for i in layers:
                def produce(pspec=pspec, i=i, path=path):
                    index = (i,) if i is not None else ()
                    w = to_hf(pspec, reader.read(pspec.path, index))
                    if path not in adapted:
                        return w
                    parent = pspec.path[:-1]
                    a, b = to_peft(reader.read(parent + ("lora_a",), index), reader.read(parent + ("lora_b",), index))
                    return merge_weight(w, a, b, spec.scale)
                name = pspec.hf_name.format(i=i) if i is not None else pspec.hf_name
                tensors.append((name, hf_shape(pspec, shape[1:] if i is not None else shape), dtype, produce))
        dtypes = {np.dtype(t[2]).name for t in tensors}

        def fill(tmp):
            _write_safetensors(os.path.join(tmp, "model.safetensors"), tensors)
            cf.copy_side_files(ckpt_dir, tmp, skip=("config.json",))
            _write_config(os.path.join(ckpt_dir, "config.json"), os.path.join(tmp, "config.json"), dtypes)

        return write_folder(out, fill)
    finally:
        reader.close()


def _write_config(src: str, dst: str, dtypes: set[str]) -> None:
    """The source config.json with its dtype key set to the weights' dtype (when there is one)."""
    with open(src, encoding="utf-8") as f:
        raw = json.load(f)
    if len(dtypes) == 1:
        for k in [k for k in ("dtype", "torch_dtype") if k in raw] or ["dtype"]:
            raw[k] = next(iter(dtypes))
    atomic_write_json(dst, raw)


# ---------------------------------------------------------------- merging a PEFT adapter into a Hugging Face folder
def merge_folders(base_dir: str, adapter_dir: str, out: str, overwrite: bool = False) -> str:
    """Base Hugging Face folder + PEFT adapter folder -> a merged Hugging Face folder (base dtype, one file)."""
    from safetensors import safe_open

    from qwen_jax.checkpoint_format import copy_side_files
    from qwen_jax.hf.safetensors_io import TensorReader

    out = os.path.abspath(out)
    for src in (base_dir, adapter_dir):
        if os.path.realpath(src) == os.path.realpath(out):
            raise LoraError(f"{out}: output folder is an input folder; choose another --out")
    if os.path.lexists(out) and not overwrite:
        raise LoraError(f"{out}: already exists; pass --overwrite to replace it (it was left untouched)")
    peft = read_adapter_config(adapter_dir)
    scale = float(peft["lora_alpha"]) / int(peft["r"])
    weights = os.path.join(adapter_dir, ADAPTER_WEIGHTS)
    if not os.path.exists(weights):
        raise LoraError(f"{weights}: not found (expected PEFT's adapter weights)")
    reader = TensorReader(base_dir)
    try:
        with safe_open(weights, framework="numpy") as adapter:
            names = set(adapter.keys())
            used = set()
            tensors = []
            for name in reader.files:
                if not name.endswith(".weight"):
                    pairs = None
                else:
                    pairs = peft_names(name)
                    pairs = pairs if pairs[0] in names else None
                if pairs:
                    used.update(pairs)

                def produce(name=name, pairs=pairs):
                    w = reader.read(name)
                    if pairs is None:
                        return w
                    return merge_weight(w, adapter.get_tensor(pairs[0]), adapter.get_tensor(pairs[1]), scale)

                tensors.append((name, reader.shape(name), reader.numpy_dtype(name), produce))
            unused = sorted(names - used)
            if unused:
                raise LoraError(f"{weights}: adapter tensors for weights the base does not have: {unused[:5]}")

            def fill(tmp):
                _write_safetensors(os.path.join(tmp, "model.safetensors"), tensors)
                copy_side_files(base_dir, tmp)

            return write_folder(out, fill)
    finally:
        reader.close()
