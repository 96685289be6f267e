"""Model configuration: one immutable `QwenConfig`, read from a Hugging Face `config.json`.

Why a dataclass of our own rather than `transformers.PretrainedConfig`: the model must run
without torch/transformers installed and must be hashable (it is a static argument of
jitted functions).  We read both spellings transformers has used for RoPE:

* v4: top-level `rope_theta` + `rope_scaling` (kind under `rope_type` or legacy `type`);
* v5: `rope_parameters` (one dict holding `rope_type`, `rope_theta`, ...).

and normalise to the v5 shape with the v5 precedence rules (docs/long_context.md §RoPE-config).  Sliding-window
layers are resolved exactly as transformers does (`use_sliding_window`,
`max_window_layers`, v5 `layer_types`).
"""

from __future__ import annotations

import dataclasses
import json
import logging
import os
from collections.abc import Mapping
from typing import Any

from qwen_jax.dtypes import FLOAT_DTYPES, dtype_name

SUPPORTED_MODEL_TYPES = ("qwen2", "qwen3", "qwen2_moe", "qwen3_moe")
MOE_MODEL_TYPES = ("qwen2_moe", "qwen3_moe")
MOE_KEYS = ("num_experts", "num_experts_per_tok", "moe_intermediate_size", "shared_expert_intermediate_size",
            "norm_topk_prob", "decoder_sparse_step", "mlp_only_layers", "router_aux_loss_coef")
ROPE_TYPES = ("default", "linear", "dynamic", "yarn")
MOE_DISPATCHES = ("all_to_all", "all_gather")  # how token rows reach their experts' shards (docs/moe.md)
MOE_MATMUL_IMPLS = ("auto", "xla", "mosaic_gpu")  # grouped matmul of the experts (layers/grouped_matmul.py)
REMAT_VALUES = ("none", "full", "dots", "dots_no_batch", "save_attention")  # model.remat; see model.REMAT_POLICIES
# Keys of a YaRN/linear/dynamic dict we understand; anything else is kept but unused.
_ROPE_KEYS = {
    "rope_type", "type", "rope_theta", "factor", "original_max_position_embeddings",
    "attention_factor", "beta_fast", "beta_slow", "mscale", "mscale_all_dim", "truncate",
    "partial_rotary_factor",
}


class ConfigError(ValueError):
    """A config.json (or override) value that cannot be used; the message names file and key."""


def _freeze(value: Any) -> Any:
    """Dicts/lists -> sorted tuples, so the config stays hashable (jit static argument)."""
    if isinstance(value, Mapping):
        return tuple(sorted((k, _freeze(v)) for k, v in value.items()))
    if isinstance(value, list | tuple):
        return tuple(_freeze(v) for v in value)
    return value


@dataclasses.dataclass(frozen=True)
class QwenConfig:
    """Architecture (Hugging Face names) plus how to run it (our names, after the marker)."""

    model_type: str = "qwen2"
    vocab_size: int = 151936
    hidden_size: int = 896
    intermediate_size: int = 4864
    num_hidden_layers: int = 24
    num_attention_heads: int = 14
    num_key_value_heads: int = 2
    head_dim: int = 64
    max_position_embeddings: int = 32768
    rms_norm_eps: float = 1e-6
    tie_word_embeddings: bool = False
    attention_bias: bool = True  # q/k/v bias: always on for qwen2, config key for qwen3
    qk_norm: bool = False  # qwen3: RMSNorm over head_dim on q and k before RoPE
    rope_theta: float = 1e6
    # Normalised v5-style rope dict (without rope_theta), frozen to a sorted tuple of items.
    rope_parameters: tuple = (("rope_type", "default"),)
    sliding_window: int | None = None  # already gated by use_sliding_window
    layer_types: tuple = ()  # per layer: "full_attention" | "sliding_attention"
    dual_chunk_attention: tuple | None = None  # frozen dual_chunk_attention_config
    initializer_range: float = 0.02
    bos_token_id: int | None = None
    eos_token_id: tuple = ()
    pad_token_id: int | None = None
    # ---- mixture of experts (qwen2_moe / qwen3_moe; num_experts = 0: dense) ----
    num_experts: int = 0
    num_experts_per_tok: int = 0
    moe_intermediate_size: int = 0
    shared_expert_intermediate_size: int = 0  # qwen2_moe's shared expert (0 = none, as qwen3_moe)
    norm_topk_prob: bool = False  # renormalise the top-k router probabilities to sum to 1
    decoder_sparse_step: int = 1  # layer i is sparse when (i + 1) % step == 0 and i not in mlp_only_layers
    mlp_only_layers: tuple = ()
    router_aux_loss_coef: float = 0.0  # weight of the load-balancing loss in training
    # ---- how to run it (not Hugging Face keys) ----
    dtype: str = "float32"  # compute dtype of activations / matmuls
    param_dtype: str = "float32"  # storage dtype of parameters
    attention: str = "xla"  # a name of the attention registry (qwen_jax/attention/registry.py)
    scan_layers: bool = False  # lax.scan over decoder layers (compile time) vs unrolled loop
    remat: str = "none"  # rematerialisation policy: none | full | dots | dots_no_batch | save_attention
    moe_dispatch: str = "all_to_all"  # expert parallelism (mesh expert > 1): one of MOE_DISPATCHES
    attention_block_size: int = 512  # key/query block for blockwise and ring attention
    # cuDNN packed layout: bound on documents (runs of segment ids) per row; 0 = from the row length
    attention_max_segments: int = 0
    moe_matmul: str = "auto"  # one of MOE_MATMUL_IMPLS

    def __post_init__(self):
        if not self.layer_types:
            object.__setattr__(self, "layer_types", ("full_attention",) * self.num_hidden_layers)
        self.validate()

    # ---- derived views ----
    @property
    def rope(self) -> dict:
        """The RoPE dict in v5 form (`rope_type`, `factor`, ...) plus `rope_theta`."""
        return {**dict(self.rope_parameters), "rope_theta": self.rope_theta}

    @property
    def rope_type(self) -> str:
        return dict(self.rope_parameters)["rope_type"]

    @property
    def dca(self) -> dict | None:
        return None if self.dual_chunk_attention is None else dict(self.dual_chunk_attention)

    def layer_window(self, layer: int) -> int | None:
        """Sliding window (tokens, self included) of decoder layer `layer`, or None for full attention."""
        if self.layer_types[layer] == "sliding_attention" and self.sliding_window is not None:
            return int(self.sliding_window)
        return None

    @property
    def family(self) -> str:
        """The attention flavour, qwen2 or qwen3: a mixture-of-experts model shares its dense sibling's."""
        return self.model_type.removesuffix("_moe")

    @property
    def is_moe(self) -> bool:
        return self.model_type in MOE_MODEL_TYPES and self.num_experts > 0

    def is_sparse(self, layer: int) -> bool:
        """Whether decoder layer `layer` has the mixture-of-experts block (transformers' rule)."""
        return (self.is_moe and layer not in self.mlp_only_layers
                and (layer + 1) % self.decoder_sparse_step == 0)

    def replace(self, **overrides) -> QwenConfig:
        """A copy with overrides; an unknown key is an error that lists the valid ones."""
        valid = {f.name for f in dataclasses.fields(self)}
        unknown = sorted(set(overrides) - valid)
        if unknown:
            raise ConfigError(f"unknown config key(s) {unknown}; valid keys: {sorted(valid)}")
        return dataclasses.replace(self, **overrides)

    def validate(self, source: str = "config") -> None:
        def bad(key, why):
            raise ConfigError(f"{source}: key '{key}': {why}")

        for key in ("vocab_size", "hidden_size", "intermediate_size", "num_hidden_layers",
                    "num_attention_heads", "num_key_value_heads", "head_dim", "max_position_embeddings"):
            value = getattr(self, key)
            if isinstance(value, bool) or not isinstance(value, int) or value <= 0:
                bad(key, f"must be a positive integer, got {value!r}")
        if self.num_attention_heads % self.num_key_value_heads:
            bad("num_key_value_heads", f"{self.num_key_value_heads} does not divide "
                f"num_attention_heads={self.num_attention_heads}")
        if self.head_dim % 2:
            bad("head_dim", f"RoPE needs an even head_dim, got {self.head_dim}")
        if not (isinstance(self.rope_theta, int | float) and self.rope_theta > 1):
            bad("rope_theta", f"must be a number > 1, got {self.rope_theta!r}")
        if not (isinstance(self.rms_norm_eps, int | float) and 0 < self.rms_norm_eps < 1):
            bad("rms_norm_eps", f"must be in (0, 1), got {self.rms_norm_eps!r}")
        if len(self.layer_types) != self.num_hidden_layers:
            bad("layer_types", f"has {len(self.layer_types)} entries for {self.num_hidden_layers} layers")
        for t in self.layer_types:
            if t not in ("full_attention", "sliding_attention"):
                bad("layer_types", f"unknown layer type {t!r} (full_attention | sliding_attention)")
        if self.sliding_window is not None and (
            isinstance(self.sliding_window, bool) or not isinstance(self.sliding_window, int)
            or self.sliding_window <= 0
        ):
            bad("sliding_window", f"must be a positive integer, got {self.sliding_window!r}")
        rope = dict(self.rope_parameters)
        rope_type = rope.get("rope_type")
        if rope_type not in ROPE_TYPES:
            bad("rope_scaling.rope_type", f"unsupported RoPE type {rope_type!r}; supported: {ROPE_TYPES}")
        if rope_type != "default":
            factor = rope.get("factor")
            if rope_type == "yarn" and factor is None:
                factor = self.max_position_embeddings / rope["original_max_position_embeddings"]
            if not isinstance(factor, int | float) or isinstance(factor, bool) or not factor >= 1:
                bad("rope_scaling.factor", f"{rope_type} RoPE needs a number factor >= 1, got {factor!r}")
        if rope_type == "yarn":
            orig = rope.get("original_max_position_embeddings")
            if not isinstance(orig, int) or orig <= 0:
                bad("rope_scaling.original_max_position_embeddings", f"must be a positive integer, got {orig!r}")
        if self.dual_chunk_attention is not None:
            dca = dict(self.dual_chunk_attention)
            for key in ("chunk_size", "local_size"):
                if not isinstance(dca.get(key), int) or dca[key] < 0:
                    bad(f"dual_chunk_attention_config.{key}", f"must be a non-negative integer, got {dca.get(key)!r}")
            if dca["chunk_size"] <= dca["local_size"]:
                bad("dual_chunk_attention_config.chunk_size", "must be larger than local_size")
        for key in ("dtype", "param_dtype"):
            if getattr(self, key) not in FLOAT_DTYPES:
                bad(key, f"must be float32, bfloat16 or float16, got {getattr(self, key)!r}")
        from qwen_jax.attention import registry  # the attention modules, loaded when a config is checked

        if self.attention not in registry.names():
            bad("attention", f"must be one of {registry.names()}, got {self.attention!r}")
        if self.moe_dispatch not in MOE_DISPATCHES:
            bad("moe_dispatch", f"must be one of {MOE_DISPATCHES}, got {self.moe_dispatch!r}")
        if self.moe_matmul not in MOE_MATMUL_IMPLS:
            bad("moe_matmul", f"must be one of {MOE_MATMUL_IMPLS}, got {self.moe_matmul!r}")
        if self.remat not in REMAT_VALUES:
            bad("remat", f"must be {' | '.join(REMAT_VALUES)}, got {self.remat!r}")
        if isinstance(self.attention_max_segments, bool) or not isinstance(self.attention_max_segments, int) \
                or self.attention_max_segments < 0:
            bad("attention_max_segments", f"must be a non-negative integer, got {self.attention_max_segments!r}")
        if self.is_moe:
            for key in ("num_experts_per_tok", "moe_intermediate_size", "decoder_sparse_step"):
                value = getattr(self, key)
                if isinstance(value, bool) or not isinstance(value, int) or value <= 0:
                    bad(key, f"must be a positive integer, got {value!r}")
            if self.num_experts_per_tok > self.num_experts:
                bad("num_experts_per_tok", f"{self.num_experts_per_tok} exceeds num_experts={self.num_experts}")
            if self.shared_expert_intermediate_size < 0:
                bad("shared_expert_intermediate_size", "must be >= 0")
            outside = [i for i in self.mlp_only_layers if not 0 <= i < self.num_hidden_layers]
            if outside:
                bad("mlp_only_layers", f"{outside} outside [0, {self.num_hidden_layers})")


def normalise_rope(raw: Mapping, source: str = "config.json") -> tuple[float, dict]:
    """(rope_theta, v5-style rope dict without rope_theta) from a raw config dict.

    Precedence is what transformers 5.x does (`RotaryEmbeddingConfigMixin.convert_rope_params_to_dict`:
    `self.rope_parameters = rope_scaling or self.rope_parameters`): a non-empty `rope_scaling` replaces
    `rope_parameters` entirely (the latter's `rope_theta` included), else `rope_parameters`; `rope_type`
    wins over legacy `type`; `rope_theta` from the chosen dict, else top level, else 10000; for YaRN a
    *top-level* `original_max_position_embeddings` overrides the dict's, and a missing one defaults to
    `max_position_embeddings`.  A file holding both (and differing) is logged; qwen-lint reports it.
    """
    scaling, parameters = raw.get("rope_scaling"), raw.get("rope_parameters")
    if scaling:
        params, key = scaling, "rope_scaling"
        if parameters and parameters != scaling:
            logging.warning("%s: both 'rope_scaling' and 'rope_parameters' are set and differ; using 'rope_scaling' "
                        "as transformers 5.x does", source)
    else:
        params, key = parameters, "rope_parameters"
    if params is None:
        params = {}
    if not isinstance(params, Mapping):
        raise ConfigError(f"{source}: key '{key}' must be an object or null, got {type(params).__name__}")
    params = dict(params)
    if "full_attention" in params and isinstance(params["full_attention"], Mapping):
        params = dict(params["full_attention"])  # per-layer-type nesting: Qwen uses one kind
    rope_type = params.get("rope_type", params.get("type", "default"))
    if "type" in params and "rope_type" in params and params["type"] != params["rope_type"]:
        raise ConfigError(f"{source}: key '{key}': 'type'={params['type']!r} and "
                          f"'rope_type'={params['rope_type']!r} disagree")
    params.pop("type", None)
    params["rope_type"] = rope_type
    theta = params.pop("rope_theta", raw.get("rope_theta", 10000.0))
    if rope_type == "yarn":
        if raw.get("original_max_position_embeddings") is not None:
            params["original_max_position_embeddings"] = raw["original_max_position_embeddings"]
        params.setdefault("original_max_position_embeddings", raw.get("max_position_embeddings"))
    if params.get("factor") is not None and isinstance(params["factor"], int | float):
        params["factor"] = float(params["factor"])
    if not isinstance(theta, int | float) or isinstance(theta, bool):
        raise ConfigError(f"{source}: key 'rope_theta' must be a number, got {theta!r}")
    return float(theta), params


def config_from_dict(raw: Mapping, source: str = "config.json", **overrides) -> QwenConfig:
    """Build a QwenConfig from a Hugging Face config dict (v4 or v5 form)."""
    if not isinstance(raw, Mapping):
        raise ConfigError(f"{source}: expected a JSON object at top level")
    model_type = raw.get("model_type")
    if model_type not in SUPPORTED_MODEL_TYPES:
        raise ConfigError(f"{source}: key 'model_type': unsupported value {model_type!r} "
                          f"(supported: {', '.join(SUPPORTED_MODEL_TYPES)})")
    if raw.get("hidden_act", "silu") != "silu":
        raise ConfigError(f"{source}: key 'hidden_act': only 'silu' is supported, got {raw['hidden_act']!r}")

    def get(key, default=None, kind=None):
        value = raw.get(key, default)
        if value is None:
            value = default
        if kind is int and (isinstance(value, bool) or not isinstance(value, int)):
            # transformers writes ints; accept integral floats (e.g. 32768.0) but nothing else
            if isinstance(value, float) and value.is_integer():
                return int(value)
            raise ConfigError(f"{source}: key '{key}' must be an integer, got {value!r}")
        if kind is float and (isinstance(value, bool) or not isinstance(value, int | float)):
            raise ConfigError(f"{source}: key '{key}' must be a number, got {value!r}")
        if kind is bool and not isinstance(value, bool):
            raise ConfigError(f"{source}: key '{key}' must be true or false, got {value!r}")
        return value

    heads = get("num_attention_heads", 32, int)
    hidden = get("hidden_size", 4096, int)
    layers = get("num_hidden_layers", 32, int)
    kv_heads = get("num_key_value_heads", heads, int)
    if heads <= 0:
        raise ConfigError(f"{source}: key 'num_attention_heads' must be positive, got {heads}")
    family = model_type.removesuffix("_moe")
    default_head_dim = 128 if family == "qwen3" else hidden // heads
    head_dim = get("head_dim", default_head_dim, int)
    use_sliding = get("use_sliding_window", False, bool)
    sliding_window = raw.get("sliding_window", 4096) if use_sliding else None
    if sliding_window is not None:
        sliding_window = get("sliding_window", 4096, int)
    layer_types = raw.get("layer_types")
    # derived per-layer kinds follow an overridden depth (e.g. a preset cut to 2 layers)
    depth = overrides.get("num_hidden_layers", layers) if layer_types is None else layers
    if layer_types is None and model_type in MOE_MODEL_TYPES:
        layer_types = _moe_layer_types(model_type, depth, sliding_window, get("max_window_layers", 28, int))
    if layer_types is None:
        max_window_layers = get("max_window_layers", 28, int)
        layer_types = [
            "sliding_attention" if sliding_window is not None and i >= max_window_layers else "full_attention"
            for i in range(depth)
        ]
    elif not isinstance(layer_types, list):
        raise ConfigError(f"{source}: key 'layer_types' must be a list, got {type(layer_types).__name__}")
    theta, rope = normalise_rope(raw, source)
    unknown = sorted(set(rope) - _ROPE_KEYS)
    if unknown:  # a typo (e.g. "factr") would silently change nothing: say so
        logging.warning("%s: ignoring unknown RoPE key(s) %s (known: %s)", source, unknown, sorted(_ROPE_KEYS))
        rope = {k: v for k, v in rope.items() if k in _ROPE_KEYS}
    eos = raw.get("eos_token_id")
    eos = () if eos is None else tuple(eos) if isinstance(eos, list) else (eos,)
    dca = raw.get("dual_chunk_attention_config")
    if dca is not None and not isinstance(dca, Mapping):
        raise ConfigError(f"{source}: key 'dual_chunk_attention_config' must be an object")
    if dca is not None:
        dca = {k: v for k, v in dca.items() if k in ("chunk_size", "local_size", "original_max_position_embeddings")}
    fields = dict(
        model_type=model_type,
        vocab_size=get("vocab_size", 151936, int),
        hidden_size=hidden,
        intermediate_size=get("intermediate_size", 22016, int),
        num_hidden_layers=layers,
        num_attention_heads=heads,
        num_key_value_heads=kv_heads,
        head_dim=head_dim,
        max_position_embeddings=get("max_position_embeddings", 32768, int),
        rms_norm_eps=get("rms_norm_eps", 1e-6, float),
        tie_word_embeddings=get("tie_word_embeddings", False, bool),
        attention_bias=(get("qkv_bias", True, bool) if model_type == "qwen2_moe" else True if model_type == "qwen2"
                        else get("attention_bias", False, bool)),
        qk_norm=family == "qwen3",
        rope_theta=theta,
        rope_parameters=_freeze(rope),
        sliding_window=sliding_window,
        layer_types=tuple(layer_types),
        dual_chunk_attention=_freeze(dca) if dca is not None else None,
        initializer_range=get("initializer_range", 0.02, float),
        bos_token_id=raw.get("bos_token_id"),
        eos_token_id=eos,
        pad_token_id=raw.get("pad_token_id"),
    )
    if model_type in MOE_MODEL_TYPES:
        fields.update(_moe_fields(raw, get, source))
    if "dtype" in overrides:
        overrides["dtype"] = dtype_name(overrides["dtype"])
    if "param_dtype" in overrides:
        overrides["param_dtype"] = dtype_name(overrides["param_dtype"])
    valid = {f.name for f in dataclasses.fields(QwenConfig)}
    unknown_overrides = sorted(set(overrides) - valid)
    if unknown_overrides:
        raise ConfigError(f"unknown config override(s) {unknown_overrides}; valid keys: {sorted(valid)}")
    fields.update(overrides)
    try:
        return QwenConfig(**fields)
    except ConfigError as e:
        raise ConfigError(str(e).replace("config:", f"{source}:", 1)) from None


def _moe_layer_types(model_type: str, layers: int, sliding_window, max_window_layers: int) -> list[str]:
    """transformers' defaults: Qwen2-MoE slides on even layers below max_window_layers, Qwen3-MoE on all."""
    def slides(i):
        if sliding_window is None:
            return False
        return model_type == "qwen3_moe" or ((i + 1) % 2 == 1 and i < max_window_layers)

    return ["sliding_attention" if slides(i) else "full_attention" for i in range(layers)]


def _moe_fields(raw: Mapping, get, source: str) -> dict:
    """The mixture-of-experts keys of a qwen2_moe / qwen3_moe config.json (transformers' defaults)."""
    qwen2 = raw.get("model_type") == "qwen2_moe"
    mlp_only = raw.get("mlp_only_layers") or []
    if not isinstance(mlp_only, list) or not all(isinstance(i, int) and not isinstance(i, bool) for i in mlp_only):
        raise ConfigError(f"{source}: key 'mlp_only_layers' must be a list of layer indices, got {mlp_only!r}")
    return dict(
        # transformers v5 writes Qwen3-MoE's count as num_local_experts; the released files say num_experts
        num_experts=get("num_experts", raw.get("num_local_experts", 60 if qwen2 else 128), int),
        num_experts_per_tok=get("num_experts_per_tok", 4 if qwen2 else 8, int),
        moe_intermediate_size=get("moe_intermediate_size", 1408 if qwen2 else 768, int),
        shared_expert_intermediate_size=get("shared_expert_intermediate_size", 5632, int) if qwen2 else 0,
        norm_topk_prob=get("norm_topk_prob", False, bool),
        decoder_sparse_step=get("decoder_sparse_step", 1, int),
        mlp_only_layers=tuple(sorted(set(mlp_only))),
        router_aux_loss_coef=get("router_aux_loss_coef", 0.001, float),
    )


def load_hf_config(path: str | os.PathLike, **overrides) -> QwenConfig:
    """Read `config.json` (a file, or the folder holding it)."""
    path = os.fspath(path)
    file = os.path.join(path, "config.json") if os.path.isdir(path) else path
    try:
        with open(file, encoding="utf-8") as f:
            raw = json.load(f)
    except FileNotFoundError:
        raise ConfigError(f"{file}: not found (a Hugging Face model folder needs config.json)") from None
    except json.JSONDecodeError as e:
        raise ConfigError(f"{file}: invalid JSON at line {e.lineno} column {e.colno}: {e.msg}") from None
    return config_from_dict(raw, source=file, **overrides)


def eos_ids(value) -> list[int]:
    """An `eos_token_id` value (int, list or null) as a list of ints."""
    if value is None:
        return []
    return [int(v) for v in (value if isinstance(value, list | tuple) else [value])]


def _read_json(path: str) -> dict:
    if not os.path.exists(path):
        return {}
    with open(path, encoding="utf-8") as f:
        data = json.load(f)
    return data if isinstance(data, dict) else {}


def tokenizer_eos_id(folder: str) -> int | None:
    """The id of the tokenizer's `eos_token` (tokenizer_config.json), from its added tokens or vocabulary."""
    tok_cfg = _read_json(os.path.join(folder, "tokenizer_config.json"))
    eos = tok_cfg.get("eos_token")
    eos = eos.get("content") if isinstance(eos, dict) else eos
    if not isinstance(eos, str):
        return None
    for key, entry in (tok_cfg.get("added_tokens_decoder") or {}).items():
        if isinstance(entry, dict) and entry.get("content") == eos:
            return int(key)
    tok = _read_json(os.path.join(folder, "tokenizer.json"))
    for entry in tok.get("added_tokens") or []:
        if entry.get("content") == eos:
            return int(entry["id"])
    vocab = (tok.get("model") or {}).get("vocab")
    return int(vocab[eos]) if isinstance(vocab, dict) and eos in vocab else None


def config_eos_ids(cfg: dict) -> list[int]:
    """config.json's eos_token_id, or its `text_config`'s (multimodal configs nest the text model's)."""
    return eos_ids(cfg.get("eos_token_id")) or eos_ids((cfg.get("text_config") or {}).get("eos_token_id"))


def generation_eos_ids(folder: str) -> tuple[list[int], str | None]:
    """(ids, file) of the eos ids transformers' `generate` stops on: generation_config.json's eos_token_id when it
    sets one, else config.json's; ([], None) when neither does."""
    for name, read in (("generation_config.json", lambda c: eos_ids(c.get("eos_token_id"))),
                       ("config.json", config_eos_ids)):
        path = os.path.join(folder, name)
        ids = read(_read_json(path))
        if ids:
            return ids, path
    return [], None


def model_stop_ids(folder: str) -> tuple[int, ...]:
    """Every id generation should stop on: the union of generation_config.json's, config.json's
    (or its `text_config`'s) eos_token_id and the tokenizer's eos token.

    Why a union: a fine-tune whose config says <|endoftext|> while its chat turns end with
    <|im_end|> must still stop; runtimes disagree on which file wins, so stop on all of them.
    """
    ids = eos_ids(_read_json(os.path.join(folder, "generation_config.json")).get("eos_token_id"))
    ids += config_eos_ids(_read_json(os.path.join(folder, "config.json")))
    tok = tokenizer_eos_id(folder)
    ids += [] if tok is None else [tok]
    return tuple(sorted(set(ids)))


def to_hf_dict(cfg: QwenConfig) -> dict:
    """The Hugging Face config.json keys this config determines (v5 `rope_parameters` form).

    Conversion prefers copying the source config.json verbatim; this is for models built
    from presets or random init.
    """
    rope = dict(cfg.rope_parameters)
    architecture = {"qwen2": "Qwen2ForCausalLM", "qwen3": "Qwen3ForCausalLM", "qwen2_moe": "Qwen2MoeForCausalLM",
                    "qwen3_moe": "Qwen3MoeForCausalLM"}[cfg.model_type]
    out = {
        "architectures": [architecture],
        "model_type": cfg.model_type,
        "vocab_size": cfg.vocab_size,
        "hidden_size": cfg.hidden_size,
        "intermediate_size": cfg.intermediate_size,
        "num_hidden_layers": cfg.num_hidden_layers,
        "num_attention_heads": cfg.num_attention_heads,
        "num_key_value_heads": cfg.num_key_value_heads,
        "head_dim": cfg.head_dim,
        "hidden_act": "silu",
        "max_position_embeddings": cfg.max_position_embeddings,
        "rms_norm_eps": cfg.rms_norm_eps,
        "tie_word_embeddings": cfg.tie_word_embeddings,
        "rope_theta": cfg.rope_theta,
        "rope_scaling": None if rope["rope_type"] == "default" else rope,
        "use_sliding_window": cfg.sliding_window is not None,
        "sliding_window": cfg.sliding_window,
        "layer_types": list(cfg.layer_types),
        "initializer_range": cfg.initializer_range,
        "bos_token_id": cfg.bos_token_id,
        "eos_token_id": (list(cfg.eos_token_id) if len(cfg.eos_token_id) > 1
                         else cfg.eos_token_id[0] if cfg.eos_token_id else None),
    }
    if cfg.family == "qwen3":
        out["attention_bias"] = cfg.attention_bias
    if cfg.model_type == "qwen2_moe":
        out["qkv_bias"] = cfg.attention_bias
    if cfg.model_type in MOE_MODEL_TYPES:
        out.update({k: getattr(cfg, k) for k in MOE_KEYS})
        out["mlp_only_layers"] = list(cfg.mlp_only_layers)
        if cfg.model_type == "qwen3_moe":
            del out["shared_expert_intermediate_size"]
    if cfg.dca is not None:
        out["dual_chunk_attention_config"] = cfg.dca
    return out


def attention_flops_per_token(cfg: QwenConfig, seq_len: int, causal: bool = True) -> float:
    """Forward attention-score FLOPs per token (QK^T and PV), halved for causal masks."""
    per_token = 2 * 2 * cfg.num_hidden_layers * cfg.num_attention_heads * cfg.head_dim * seq_len
    return per_token / 2 if causal else per_token
