"""The Hugging Face <-> qwen_jax parameter table: names and layout transforms, one place.

`param_table(cfg)` is the single place that knows Hugging Face tensor names.  Each entry
maps one of our parameter paths to a Hugging Face name (with `{i}` for the layer index of
stacked decoder parameters) and a layout transform:

* `copy`       same shape (norm weights, embeddings, biases reshaped to [heads, head_dim]);
* `t`          2-D transpose (nn.Linear [out, in] -> kernel [in, out]);
* `in_heads`   [heads*head_dim, embed] -> [embed, heads, head_dim]   (q/k/v projections);
* `out_heads`  [embed, heads*head_dim] -> [heads, head_dim, embed]   (o_proj);
* `heads`      [heads*head_dim] -> [heads, head_dim]                  (q/k/v biases).

Mixture-of-experts models keep the released per-expert names
(`model.layers.{i}.mlp.experts.{e}.gate_proj.weight`, `{e}` = expert index, stacked into
our `[layers, experts, ...]` arrays) and split their layers into two stacks (`layers` for the
sparse, `dense_layers` for the dense-MLP layers; `ParamSpec.layers` lists the Hugging Face
layer indices of a stack).  Folders that hold experts fused (transformers v5) are read as if
they held the per-expert tensors (`qwen_jax.hf.safetensors_io.open_reader`).
"""

from __future__ import annotations

from typing import NamedTuple

import numpy as np

from qwen_jax.config import QwenConfig
from qwen_jax.model import layer_stacks


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

