"""Model presets (qwen_jax/presets.py): they parse, transformers agrees on their size, and
their sizes match the published parameter counts."""

from __future__ import annotations

import pytest

from qwen_jax.config import config_from_dict, to_hf_dict
from qwen_jax.model import num_params
from qwen_jax.presets import PRESETS, get_preset, preset_names

REAL = [name for name in PRESETS if name != "tiny"]

# "Number of Parameters" from the Hugging Face model cards (billions, as printed there: rounded).
PUBLISHED_PARAMS_B = {
    "qwen2-0.5b": 0.49, "qwen2-1.5b": 1.54, "qwen2-7b": 7.62, "qwen2-72b": 72.71,
    "qwen2.5-0.5b": 0.49, "qwen2.5-1.5b": 1.54, "qwen2.5-3b": 3.09, "qwen2.5-7b": 7.61,
    "qwen2.5-14b": 14.7, "qwen2.5-32b": 32.5, "qwen2.5-72b": 72.7,
    "qwen3-0.6b": 0.6, "qwen3-1.7b": 1.7, "qwen3-4b": 4.0, "qwen3-8b": 8.2, "qwen3-14b": 14.8, "qwen3-32b": 32.8,
    "qwen1.5-moe-a2.7b": 14.3, "qwen2-57b-a14b": 57.4, "qwen2-57b-a14b-instruct": 57.4, "qwen3-30b-a3b": 30.5,
    "qwen3-235b-a22b": 235.0,
}
# Activated parameters of the MoE model cards (billions; the "A2.7B" in the name): num_params(active=True)
PUBLISHED_ACTIVE_B = {"qwen1.5-moe-a2.7b": 2.7, "qwen2-57b-a14b": 14, "qwen2-57b-a14b-instruct": 14,
                      "qwen3-30b-a3b": 3.3, "qwen3-235b-a22b": 22}
MOE_KEYS = ("num_experts", "num_experts_per_tok", "moe_intermediate_size", "norm_topk_prob", "decoder_sparse_step")

ARCH_KEYS = ("model_type", "vocab_size", "hidden_size", "intermediate_size", "num_hidden_layers",
             "num_attention_heads", "num_key_value_heads", "max_position_embeddings", "rms_norm_eps",
             "tie_word_embeddings", "rope_theta")


def test_names():
    expected = {"qwen2-0.5b", "qwen2-1.5b", "qwen2-7b", "qwen2-72b",
                "qwen2.5-0.5b", "qwen2.5-1.5b", "qwen2.5-3b", "qwen2.5-7b", "qwen2.5-14b", "qwen2.5-32b", "qwen2.5-72b",
                "qwen3-0.6b", "qwen3-1.7b", "qwen3-4b", "qwen3-8b", "qwen3-14b", "qwen3-32b", "tiny",
                "qwen1.5-moe-a2.7b", "qwen2-57b-a14b", "qwen2-57b-a14b-instruct", "qwen3-30b-a3b", "qwen3-235b-a22b"}
    assert set(PRESETS) == expected
    assert preset_names() == list(PRESETS)
    assert set(PUBLISHED_PARAMS_B) == set(REAL)


def test_get_preset_is_a_deep_copy():
    a = get_preset("qwen2.5-7b")
    a["hidden_size"] = 1
    a["architectures"].append("x")
    b = get_preset("qwen2.5-7b")
    assert b["hidden_size"] == 3584 and b["architectures"] == ["Qwen2ForCausalLM"]


@pytest.mark.parametrize("bad", ["qwen2-3b", "Qwen2.5-7B", "", None])
def test_unknown_preset_lists_valid_names(bad):
    with pytest.raises(KeyError) as info:
        get_preset(bad)
    message = str(info.value)
    assert repr(bad) in message and "qwen2.5-7b" in message and "tiny" in message


@pytest.mark.parametrize("name", list(PRESETS))
def test_preset_parses(name):
    preset = get_preset(name)
    cfg = config_from_dict(preset, source=f"preset {name}")
    for key in ARCH_KEYS:
        assert getattr(cfg, key) == preset[key], key
    assert cfg.layer_types == ("full_attention",) * cfg.num_hidden_layers  # sliding window is off everywhere
    assert cfg.bos_token_id == 151643 and all(t < cfg.vocab_size for t in cfg.eos_token_id)
    if cfg.family == "qwen3":
        assert cfg.head_dim == preset["head_dim"] == 128 and cfg.qk_norm and not cfg.attention_bias
    else:
        assert cfg.head_dim * cfg.num_attention_heads == cfg.hidden_size and cfg.attention_bias
    keys = ARCH_KEYS + (MOE_KEYS if cfg.is_moe else ())
    hf = to_hf_dict(cfg)  # and back: the architecture keys survive
    assert {k: hf[k] for k in keys} == {k: preset[k] for k in keys}
    if cfg.is_moe:
        assert all(cfg.is_sparse(i) for i in range(cfg.num_hidden_layers))  # every released MoE layer is sparse


def test_tiny_covers_the_tokenizer():
    cfg = config_from_dict(get_preset("tiny"))
    assert cfg.vocab_size > 151645  # <|im_end|>
    assert (cfg.hidden_size, cfg.num_hidden_layers, cfg.num_attention_heads, cfg.num_key_value_heads,
            cfg.intermediate_size, cfg.max_position_embeddings) == (64, 2, 4, 2, 128, 4096)
    assert cfg.tie_word_embeddings and cfg.rope_theta == 1e6


@pytest.mark.parametrize("name", list(PRESETS))
def test_transformers_agrees_on_parameter_count(name):
    import torch
    import transformers

    preset = get_preset(name)
    classes = {"qwen2": "Qwen2", "qwen3": "Qwen3", "qwen2_moe": "Qwen2Moe",
               "qwen3_moe": "Qwen3Moe"}[preset["model_type"]]
    hf_config = getattr(transformers, f"{classes}Config")(**preset)
    model_cls = getattr(transformers, f"{classes}ForCausalLM")
    for key in ARCH_KEYS:
        if key == "rope_theta":  # transformers v5 moves it into rope_parameters
            theta = getattr(hf_config, "rope_theta", None) or (hf_config.rope_parameters or {}).get("rope_theta")
            assert theta == preset[key]
        else:
            assert getattr(hf_config, key) == preset[key], key
    with torch.device("meta"):  # shapes only: no memory, no init cost
        model = model_cls(hf_config)
    hf_count = sum(p.numel() for p in model.parameters())  # parameters() yields a tied weight once
    cfg = config_from_dict(preset)
    assert hf_count == num_params(cfg)
    # active: what one token touches; transformers' routed experts are stacked [num_experts, ...] tensors
    routed = sum(p.numel() for n, p in model.named_parameters() if ".mlp.experts." in n)
    if cfg.is_moe:
        assert routed and routed % cfg.num_experts == 0
    active = hf_count - routed + routed // max(cfg.num_experts, 1) * cfg.num_experts_per_tok
    assert active == num_params(cfg, active=True)


@pytest.mark.parametrize("name", REAL)
def test_published_parameter_count(name):
    """Within 1% of the model card, or equal to it at the card's rounding (Qwen3-1.7B: 1.72B vs "1.7B")."""
    ours = num_params(config_from_dict(get_preset(name))) / 1e9
    published = PUBLISHED_PARAMS_B[name]
    decimals = len(repr(published).split(".")[1])
    assert abs(ours - published) <= 0.01 * published or round(ours, decimals) == published, (ours, published)
    if name in PUBLISHED_ACTIVE_B:
        active, published = num_params(config_from_dict(get_preset(name)), active=True) / 1e9, PUBLISHED_ACTIVE_B[name]
        assert abs(active - published) <= 0.025 * published, (active, published)
