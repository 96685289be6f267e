"""Model presets (configs/model_presets.py): they parse, transformers agrees on their size, and
their sizes match the published parameter counts."""

from __future__ import annotations

import pytest

from configs.model_presets import PRESETS, get_preset, preset_names
from qwen_jax.config import config_from_dict, num_params, to_hf_dict

REAL = [name for name in PRESETS if name != "tiny"]

# "Number of Parameters" from the Hugging Face model cards (billions, as printed there: rounded).
PUBLISHED_PARAMS_B = {
    "qwen2-0.5b": 0.49, "qwen2-1.5b": 1.54, "qwen2-7b": 7.62, "qwen2-72b": 72.71,
    "qwen2.5-0.5b": 0.49, "qwen2.5-1.5b": 1.54, "qwen2.5-3b": 3.09, "qwen2.5-7b": 7.61,
    "qwen2.5-14b": 14.7, "qwen2.5-32b": 32.5, "qwen2.5-72b": 72.7,
    "qwen3-0.6b": 0.6, "qwen3-1.7b": 1.7, "qwen3-4b": 4.0, "qwen3-8b": 8.2, "qwen3-14b": 14.8, "qwen3-32b": 32.8,
}

ARCH_KEYS = ("model_type", "vocab_size", "hidden_size", "intermediate_size", "num_hidden_layers",
             "num_attention_heads", "num_key_value_heads", "max_position_embeddings", "rms_norm_eps",
             "tie_word_embeddings", "rope_theta")


def test_names():
    expected = {"qwen2-0.5b", "qwen2-1.5b", "qwen2-7b", "qwen2-72b",
                "qwen2.5-0.5b", "qwen2.5-1.5b", "qwen2.5-3b", "qwen2.5-7b", "qwen2.5-14b", "qwen2.5-32b", "qwen2.5-72b",
                "qwen3-0.6b", "qwen3-1.7b", "qwen3-4b", "qwen3-8b", "qwen3-14b", "qwen3-32b", "tiny"}
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
    if cfg.model_type == "qwen3":
        assert cfg.head_dim == preset["head_dim"] == 128 and cfg.qk_norm and not cfg.attention_bias
    else:
        assert cfg.head_dim * cfg.num_attention_heads == cfg.hidden_size and cfg.attention_bias
    hf = to_hf_dict(cfg)  # and back: the architecture keys survive
    assert {k: hf[k] for k in ARCH_KEYS} == {k: preset[k] for k in ARCH_KEYS}


def test_tiny_covers_the_tokenizer():
    cfg = config_from_dict(get_preset("tiny"))
    assert cfg.vocab_size > 151645  # <|im_end|>
    assert (cfg.hidden_size, cfg.num_hidden_layers, cfg.num_attention_heads, cfg.num_key_value_heads,
            cfg.intermediate_size, cfg.max_position_embeddings) == (64, 2, 4, 2, 128, 4096)
    assert cfg.tie_word_embeddings and cfg.rope_theta == 1e6


@pytest.mark.parametrize("name", list(PRESETS))
def test_transformers_agrees_on_parameter_count(name):
    torch = pytest.importorskip("torch")
    transformers = pytest.importorskip("transformers")
    preset = get_preset(name)
    if preset["model_type"] == "qwen3":
        hf_config, model_cls = transformers.Qwen3Config(**preset), transformers.Qwen3ForCausalLM
    else:
        hf_config, model_cls = transformers.Qwen2Config(**preset), transformers.Qwen2ForCausalLM
    for key in ARCH_KEYS:
        if key == "rope_theta":  # transformers v5 moves it into rope_parameters
            theta = getattr(hf_config, "rope_theta", None) or (hf_config.rope_parameters or {}).get("rope_theta")
            assert theta == preset[key]
        else:
            assert getattr(hf_config, key) == preset[key], key
    with torch.device("meta"):  # shapes only: no memory, no init cost
        model = model_cls(hf_config)
    hf_count = sum(p.numel() for p in model.parameters())  # parameters() yields a tied weight once
    assert hf_count == num_params(config_from_dict(preset))


@pytest.mark.parametrize("name", REAL)
def test_published_parameter_count(name):
    """Within 1% of the model card, or equal to it at the card's rounding (Qwen3-1.7B: 1.72B vs "1.7B")."""
    ours = num_params(config_from_dict(get_preset(name))) / 1e9
    published = PUBLISHED_PARAMS_B[name]
    decimals = len(repr(published).split(".")[1])
    assert abs(ours - published) <= 0.01 * published or round(ours, decimals) == published, (ours, published)
