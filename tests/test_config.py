"""config.json reading: v4 and v5 RoPE forms, sliding-window resolution as transformers does it, clear errors."""

from __future__ import annotations

import json

import pytest
from transformers import Qwen2Config, Qwen3Config

from qwen_jax.config import ConfigError, config_from_dict, load_hf_config, to_hf_dict

SMALL = dict(model_type="qwen2", hidden_size=64, num_attention_heads=4, num_key_value_heads=2, num_hidden_layers=4,
             intermediate_size=32, vocab_size=128)


def test_v4_and_v5_rope_forms_normalise_to_the_same_config():
    v4 = {**SMALL, "rope_theta": 1e6, "rope_scaling": {"type": "yarn", "factor": 4.0,
                                                      "original_max_position_embeddings": 32768}}
    v4_rope_type = {**SMALL, "rope_theta": 1e6, "rope_scaling": {"rope_type": "yarn", "factor": 4,
                                                                "original_max_position_embeddings": 32768}}
    v5 = {**SMALL, "rope_parameters": {"rope_type": "yarn", "factor": 4.0, "rope_theta": 1e6,
                                       "original_max_position_embeddings": 32768}}
    configs = [config_from_dict(d) for d in (v4, v4_rope_type, v5)]
    assert configs[0] == configs[1] == configs[2]
    assert configs[0].rope == {"rope_type": "yarn", "factor": 4.0, "original_max_position_embeddings": 32768,
                               "rope_theta": 1e6}


def test_configs_written_by_transformers_round_trip(tmp_path):
    """Whatever transformers writes (v5 form) reads back to what transformers itself resolved."""
    for cls, extra in ((Qwen2Config, {}), (Qwen3Config, {"head_dim": 32, "attention_bias": True})):
        hf = cls(**{k: v for k, v in SMALL.items() if k != "model_type"}, **extra, use_sliding_window=True,
                 sliding_window=16, max_window_layers=2,
                 rope_parameters={"rope_type": "linear", "factor": 2.0, "rope_theta": 5e5})
        hf.save_pretrained(tmp_path)
        cfg = load_hf_config(tmp_path)
        assert list(cfg.layer_types) == list(hf.layer_types)
        assert [cfg.layer_window(i) for i in range(4)] == [None, None, 16, 16]
        assert cfg.rope_theta == 5e5 and cfg.rope_type == "linear"
        assert cfg.head_dim == (32 if cls is Qwen3Config else 16)
        assert cfg.attention_bias is True and cfg.qk_norm == (cls is Qwen3Config)


def test_sliding_window_inactive_unless_use_sliding_window():
    cfg = config_from_dict({**SMALL, "use_sliding_window": False, "sliding_window": 4, "max_window_layers": 0})
    assert cfg.sliding_window is None and all(cfg.layer_window(i) is None for i in range(4))
    # v5 layer_types saying "sliding" with the window switched off: transformers uses no window either
    cfg = config_from_dict({**SMALL, "layer_types": ["sliding_attention"] * 4, "sliding_window": 4})
    assert all(cfg.layer_window(i) is None for i in range(4))
    cfg = config_from_dict({**SMALL, "use_sliding_window": True, "sliding_window": 4, "max_window_layers": 3})
    assert [cfg.layer_window(i) for i in range(4)] == [None, None, None, 4]


def test_yarn_top_level_original_overrides_dict_and_missing_defaults_to_max_positions():
    cfg = config_from_dict({**SMALL, "max_position_embeddings": 40960, "original_max_position_embeddings": 8192,
                            "rope_scaling": {"rope_type": "yarn", "factor": 4.0,
                                             "original_max_position_embeddings": 32768}})
    assert cfg.rope["original_max_position_embeddings"] == 8192
    cfg = config_from_dict({**SMALL, "max_position_embeddings": 40960,
                            "rope_scaling": {"rope_type": "yarn", "factor": 4.0}})
    assert cfg.rope["original_max_position_embeddings"] == 40960


@pytest.mark.parametrize("patch,key", [
    ({"model_type": "qwen2_moe", "num_experts": 3, "num_experts_per_tok": 4}, "num_experts_per_tok"),
    ({"model_type": "qwen3_moe", "mlp_only_layers": [9]}, "mlp_only_layers"),
    ({"model_type": "llama"}, "model_type"),
    ({"hidden_size": "64"}, "hidden_size"),
    ({"num_key_value_heads": 3}, "num_key_value_heads"),
    ({"rope_theta": "big"}, "rope_theta"),
    ({"rope_scaling": {"type": "longrope", "factor": 2.0}}, "rope_scaling.rope_type"),
    ({"rope_scaling": {"type": "linear", "factor": 0.5}}, "rope_scaling.factor"),
    ({"rope_scaling": {"type": "linear", "rope_type": "yarn", "factor": 2.0}}, "rope_scaling"),
    ({"rope_scaling": "yarn"}, "rope_scaling"),
    ({"use_sliding_window": "yes"}, "use_sliding_window"),
    ({"hidden_act": "gelu"}, "hidden_act"),
    ({"layer_types": ["full_attention"]}, "layer_types"),
    ({"dual_chunk_attention_config": {"chunk_size": 8, "local_size": 16}}, "dual_chunk_attention_config.chunk_size"),
])
def test_invalid_values_name_file_and_key(tmp_path, patch, key):
    (tmp_path / "config.json").write_text(json.dumps({**SMALL, **patch}))
    with pytest.raises(ConfigError) as err:
        load_hf_config(tmp_path)
    assert str(tmp_path / "config.json") in str(err.value)
    assert f"key '{key}'" in str(err.value)


def test_broken_json_and_missing_file(tmp_path):
    (tmp_path / "config.json").write_text('{"model_type": "qwen2",\n "hidden_size": }')
    with pytest.raises(ConfigError, match=r"invalid JSON at line 2 column"):
        load_hf_config(tmp_path)
    with pytest.raises(ConfigError, match="not found"):
        load_hf_config(tmp_path / "nope")


def test_overrides_and_unknown_override():
    cfg = config_from_dict(SMALL, dtype="bf16", attention="blockwise")
    assert cfg.dtype == "bfloat16" and cfg.attention == "blockwise"
    with pytest.raises(ConfigError, match=r"unknown config override\(s\) \['atention'\].*valid keys"):
        config_from_dict(SMALL, atention="ring")
    with pytest.raises(ConfigError, match="key 'attention'"):
        config_from_dict(SMALL, attention="flash9")
    with pytest.raises(ConfigError, match="key 'moe_dispatch': must be one of"):
        config_from_dict(SMALL, moe_dispatch="ragged")
    assert hash(cfg)  # static jit argument


def test_to_hf_dict_reads_back_identically():
    cfg = config_from_dict({**SMALL, "rope_scaling": {"type": "yarn", "factor": 4.0,
                                                      "original_max_position_embeddings": 32768},
                            "eos_token_id": [151645, 151643], "tie_word_embeddings": True,
                            "dual_chunk_attention_config": {"chunk_size": 64, "local_size": 8,
                                                            "original_max_position_embeddings": 128}})
    assert config_from_dict(to_hf_dict(cfg)) == cfg
    hf = Qwen2Config(**to_hf_dict(cfg))
    assert hf.rope_parameters["factor"] == 4.0 and hf.tie_word_embeddings


def test_unknown_rope_key_is_reported(caplog):
    with caplog.at_level("WARNING"):
        cfg = config_from_dict({**SMALL, "rope_scaling": {"type": "linear", "factor": 2.0, "factr": 4.0}})
    assert cfg.rope == {"rope_type": "linear", "factor": 2.0, "rope_theta": 10000.0}
    assert "ignoring unknown RoPE key(s) ['factr']" in caplog.text


BOTH_ROPE_FORMS = {
    "both": dict(rope_theta=1e6, rope_scaling={"rope_type": "linear", "factor": 2.0},
                 rope_parameters={"rope_type": "yarn", "factor": 4.0, "rope_theta": 5e5,
                                  "original_max_position_embeddings": 1024}),
    "scaling_has_theta": dict(rope_theta=1e6, rope_scaling={"rope_type": "yarn", "factor": 4.0, "rope_theta": 7e5,
                                                            "original_max_position_embeddings": 1024},
                              rope_parameters={"rope_type": "linear", "factor": 4.0, "rope_theta": 5e5}),
    "no_top_level_theta": dict(rope_scaling={"type": "dynamic", "factor": 2.0},
                               rope_parameters={"rope_type": "linear", "factor": 4.0, "rope_theta": 5e5}),
    "scaling_null": dict(rope_theta=1e6, rope_scaling=None,
                         rope_parameters={"rope_type": "linear", "factor": 4.0, "rope_theta": 5e5}),
    "scaling_empty": dict(rope_theta=1e6, rope_scaling={},
                          rope_parameters={"rope_type": "yarn", "factor": 2.0, "rope_theta": 5e5}),
}


@pytest.mark.parametrize("model_type", ["qwen2", "qwen3"])
@pytest.mark.parametrize("case", sorted(BOTH_ROPE_FORMS))
def test_rope_scaling_and_rope_parameters_both_present_resolve_as_transformers(tmp_path, case, model_type):
    """config.json with both keys: the same RoPE as transformers 5.x loading the same file (its inv_freq and
    attention scaling, and the cos table at far positions)."""
    import numpy as np
    import torch
    from transformers import AutoConfig
    from transformers.modeling_rope_utils import ROPE_INIT_FUNCTIONS
    from transformers.models.qwen2.modeling_qwen2 import Qwen2RotaryEmbedding

    from qwen_jax import rope as R

    raw = {**SMALL, "model_type": model_type, "max_position_embeddings": 4096, **BOTH_ROPE_FORMS[case]}
    (tmp_path / "config.json").write_text(json.dumps(raw))
    hf = AutoConfig.from_pretrained(tmp_path)
    ours = load_hf_config(str(tmp_path / "config.json"))
    kind = hf.rope_parameters["rope_type"]
    assert ours.rope["rope_type"] == kind and ours.rope_theta == hf.rope_parameters["rope_theta"]
    if kind == "default":
        ref, ref_scale = Qwen2RotaryEmbedding.compute_default_rope_parameters(hf)
    else:
        ref, ref_scale = ROPE_INIT_FUNCTIONS[kind](hf, None)
    inv, scale = R.inv_freq_and_scaling(ours.rope, ours.head_dim, ours.max_position_embeddings)
    np.testing.assert_allclose(inv, ref.numpy(), rtol=1e-6, atol=0)
    assert abs(scale - ref_scale) <= 1e-12
    positions = np.array([[0, 1, 100, 4095]])
    cos_ref, _ = Qwen2RotaryEmbedding(hf)(torch.zeros(1, 4, ours.head_dim), torch.as_tensor(positions))
    cos, _ = R.rope_tables(ours.rope, ours.head_dim, ours.max_position_embeddings, positions, np.float32)
    np.testing.assert_allclose(np.asarray(cos), cos_ref.numpy(), atol=1e-5)


def test_remat_values_are_the_model_policies():
    """`model.remat` is validated against config.REMAT_VALUES (config cannot import the model); every value
    must have a policy in model.REMAT_POLICIES and every policy a value ("none" = no checkpointing)."""
    from qwen_jax.config import REMAT_VALUES
    from qwen_jax.model import REMAT_POLICIES

    assert set(REMAT_VALUES) == {"none", *REMAT_POLICIES}
