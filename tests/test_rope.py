"""RoPE tables against transformers' ROPE_INIT_FUNCTIONS / Qwen2RotaryEmbedding and float64 values of the
formulas (docs/long_context.md §Scaling, §YaRN; the values are listed in §Checks)."""

from __future__ import annotations

import math

import jax.numpy as jnp
import numpy as np
import pytest
import torch
from transformers import Qwen2Config
from transformers.modeling_rope_utils import ROPE_INIT_FUNCTIONS
from transformers.models.qwen2.modeling_qwen2 import Qwen2RotaryEmbedding

from qwen_jax import rope as R
from qwen_jax.config import config_from_dict


def ours(hf_dict: dict):
    cfg = config_from_dict({"model_type": "qwen2", **hf_dict})
    return cfg, R.inv_freq_and_scaling(cfg.rope, cfg.head_dim, cfg.max_position_embeddings)


BASE = dict(hidden_size=1024, num_attention_heads=8, num_key_value_heads=2, num_hidden_layers=1,
            intermediate_size=64, rope_theta=1e6, max_position_embeddings=32768)  # head_dim 128

HF_CASES = {
    "default": {},
    "linear": {"rope_scaling": {"type": "linear", "factor": 4.0}},
    "yarn_qwen_recipe": {"rope_scaling": {"type": "yarn", "factor": 4.0, "original_max_position_embeddings": 32768}},
    "yarn_lmax_131072": {"max_position_embeddings": 131072,
                         "rope_scaling": {"rope_type": "yarn", "factor": 4.0,
                                          "original_max_position_embeddings": 32768}},
    "yarn_truncate_false": {"rope_scaling": {"rope_type": "yarn", "factor": 4.0, "truncate": False,
                                             "original_max_position_embeddings": 32768}},
    "yarn_mscale": {"rope_scaling": {"rope_type": "yarn", "factor": 40.0, "mscale": 0.707, "mscale_all_dim": 1.0,
                                     "original_max_position_embeddings": 4096, "beta_fast": 32.0, "beta_slow": 1.0}},
    "yarn_attention_factor": {"rope_scaling": {"rope_type": "yarn", "factor": 8.0, "attention_factor": 0.5,
                                               "original_max_position_embeddings": 8192}},
    "yarn_theta_1e7": {"rope_theta": 1e7, "max_position_embeddings": 1048576,
                       "rope_scaling": {"rope_type": "yarn", "factor": 4.0,
                                        "original_max_position_embeddings": 262144}},
}


@pytest.mark.parametrize("name", sorted(HF_CASES))
def test_inv_freq_matches_transformers(name):
    hf_dict = {**BASE, **HF_CASES[name]}
    hf_cfg = Qwen2Config(**hf_dict)
    kind = hf_cfg.rope_parameters["rope_type"]
    if kind == "default":
        ref, ref_scale = Qwen2RotaryEmbedding.compute_default_rope_parameters(hf_cfg)
    else:
        ref, ref_scale = ROPE_INIT_FUNCTIONS[kind](hf_cfg, None)
    _, (inv, scale) = ours(hf_dict)
    np.testing.assert_allclose(inv, ref.numpy(), rtol=1e-6, atol=0)
    assert abs(scale - ref_scale) <= 1e-12


@pytest.mark.parametrize("seq_len", [1000, 32768, 65536, 131072])
def test_dynamic_ntk_matches_transformers(seq_len):
    hf_dict = {**BASE, "rope_scaling": {"type": "dynamic", "factor": 2.0}}
    ref, _ = ROPE_INIT_FUNCTIONS["dynamic"](Qwen2Config(**hf_dict), None, seq_len=seq_len)
    cfg, _ = ours(hf_dict)
    inv = R.dynamic_inv_freq(cfg.rope, cfg.head_dim, cfg.max_position_embeddings, seq_len)
    np.testing.assert_allclose(np.asarray(inv), ref.numpy(), rtol=2e-6, atol=0)


@pytest.mark.parametrize("name", ["default", "yarn_qwen_recipe", "linear"])
def test_cos_sin_match_qwen2_rotary_embedding(name):
    hf_dict = {**BASE, **HF_CASES[name]}
    rotary = Qwen2RotaryEmbedding(Qwen2Config(**hf_dict))
    positions = np.array([[0, 1, 7, 100, 4095, 32767, 65000, 99999]])
    x = torch.zeros(1, 8, 128)
    cos_ref, sin_ref = rotary(x, torch.as_tensor(positions))
    cfg, _ = ours(hf_dict)
    cos, sin = R.rope_tables(cfg.rope, cfg.head_dim, cfg.max_position_embeddings, jnp.asarray(positions), jnp.float32)
    np.testing.assert_allclose(np.asarray(cos), cos_ref.numpy(), atol=1e-5)
    np.testing.assert_allclose(np.asarray(sin), sin_ref.numpy(), atol=1e-5)
    cos16, _ = rotary(x.to(torch.bfloat16), torch.as_tensor(positions))
    ours16, _ = R.rope_tables(cfg.rope, 128, cfg.max_position_embeddings, jnp.asarray(positions), jnp.bfloat16)
    np.testing.assert_allclose(np.asarray(ours16, np.float32), cos16.float().numpy(), atol=1e-2)


def test_rotation_matches_transformers_apply_rotary_pos_emb():
    from transformers.models.qwen2.modeling_qwen2 import apply_rotary_pos_emb

    rng = np.random.default_rng(0)
    q = rng.standard_normal((2, 5, 3, 16)).astype(np.float32)  # [b, t, h, d]
    positions = np.tile(np.arange(5), (2, 1)) * 37
    inv = R.default_inv_freq(1e4, 16)
    cos, sin = R.cos_sin(jnp.asarray(positions), inv, 1.0, jnp.float32)
    ours_q = np.asarray(R.apply_rope(jnp.asarray(q), cos, sin))
    tq = torch.as_tensor(q).transpose(1, 2)
    ref_q, _ = apply_rotary_pos_emb(tq, tq, torch.tensor(np.asarray(cos)), torch.tensor(np.asarray(sin)))
    np.testing.assert_allclose(ours_q, ref_q.transpose(1, 2).numpy(), rtol=1e-6, atol=1e-6)


# ---- float64 values of the formulas in docs/long_context.md §Scaling / §YaRN (recomputed in numpy) ----
def test_oracle_default_theta_1e6():
    inv = R.default_inv_freq(1e6, 128)
    expected = {0: 1.0, 1: 8.0584218776e-01, 10: 1.1547819847e-01, 23: 6.9783058486e-03, 32: 1.0e-03,
                40: 1.7782794100e-04, 63: 1.2409377608e-06}
    for j, v in expected.items():
        assert inv[j] == pytest.approx(v, rel=1e-6)
    assert float(np.sum(inv, dtype=np.float64)) == pytest.approx(5.150444313677811, rel=1e-6)


def test_oracle_yarn_qwen_recipe():
    rope = {"rope_type": "yarn", "factor": 4.0, "original_max_position_embeddings": 32768, "rope_theta": 1e6}
    assert R.yarn_correction_range(rope, 128) == (23, 40)
    inv, scale = R.yarn_inv_freq(rope, 128, 32768)
    expected = {0: 1.0, 22: 8.6596432336e-03, 23: 6.9783058486e-03, 24: 5.3753214908e-03, 30: 1.0643609812e-03,
                31: 8.0295972755e-04, 32: 6.0294117647e-04, 39: 6.4903943208e-05, 40: 4.4456985251e-05,
                63: 3.1023444019e-07}
    for j, v in expected.items():
        assert inv[j] == pytest.approx(v, rel=1e-6), j
    assert float(np.sum(inv, dtype=np.float64)) == pytest.approx(5.144034721740072, rel=1e-6)
    assert scale == pytest.approx(1.138629436111989, abs=1e-12)
    # G: explicit factor wins regardless of max_position_embeddings (v5 rule, not the mid-4.x override)
    for lmax in (32768, 40960, 131072):
        np.testing.assert_array_equal(R.yarn_inv_freq(rope, 128, lmax)[0], inv)


def test_oracle_yarn_truncate_false_and_theta_1e7():
    rope = {"rope_type": "yarn", "factor": 4.0, "original_max_position_embeddings": 32768, "rope_theta": 1e6,
            "truncate": False}
    low, high = R.yarn_correction_range(rope, 128)
    assert low == pytest.approx(23.5959476083381) and high == pytest.approx(39.6508807104171)
    inv, _ = R.yarn_inv_freq(rope, 128, 32768)
    for j, v in {24: 5.5172704751e-03, 31: 8.1172537458e-04, 39: 6.1878068125e-05, 40: 4.4456985251e-05}.items():
        assert inv[j] == pytest.approx(v, rel=1e-6)
    rope = {"rope_type": "yarn", "factor": 4.0, "original_max_position_embeddings": 262144, "rope_theta": 1e7}
    assert R.yarn_correction_range(rope, 128) == (28, 43)
    inv, _ = R.yarn_inv_freq(rope, 128, 1048576)
    for j, v in {20: 6.4938163158e-03, 40: 1.6867860137e-05, 63: 3.2159923623e-08}.items():
        assert inv[j] == pytest.approx(v, rel=1e-6)


@pytest.mark.parametrize("extra,expected", [
    ({}, 1.3688879454113936),
    ({"mscale": 1.0, "mscale_all_dim": 1.0}, 1.0),
    ({"mscale": 0.707, "mscale_all_dim": 1.0}, 0.9210423553163399),
    ({"mscale": 1.0, "mscale_all_dim": 0.0}, 1.3688879454113936),
])
def test_oracle_yarn_attention_factor(extra, expected):
    rope = {"rope_type": "yarn", "factor": 40.0, "original_max_position_embeddings": 4096, "rope_theta": 1e4, **extra}
    assert R.yarn_inv_freq(rope, 128, 4096)[1] == pytest.approx(expected, abs=1e-12)


def test_oracle_dynamic_ntk():
    rope = {"rope_type": "dynamic", "factor": 2.0, "rope_theta": 1e6}
    np.testing.assert_array_equal(np.asarray(R.dynamic_inv_freq(rope, 128, 32768, 32768)), R.default_inv_freq(1e6, 128))
    inv = np.asarray(R.dynamic_inv_freq(rope, 128, 32768, 65536))
    assert inv[1] == pytest.approx(7.9191149451e-01, rel=1e-6)
    assert inv[63] == pytest.approx(4.1364592025e-07, rel=2e-6)
    inv = np.asarray(R.dynamic_inv_freq(rope, 128, 32768, 131072))
    assert inv[1] == pytest.approx(7.8133224088e-01, rel=1e-6)


def test_oracle_layout_toy_rotate_half_not_interleaved():
    x = jnp.arange(1, 9, dtype=jnp.float32)[None, None, None, :]
    inv = R.default_inv_freq(1e4, 8)
    cos, sin = R.cos_sin(jnp.array([[5]]), inv, 1.0, jnp.float32)
    out = np.asarray(R.apply_rope(x, cos, sin)).ravel()
    np.testing.assert_allclose(out, [5.0782835588, -1.1213881078, 2.6463965963, 3.9599501668, 0.4593866527,
                                     6.2243464486, 7.1411893306, 8.0198999169], rtol=1e-6)
    rope = {"rope_type": "yarn", "factor": 4.0, "original_max_position_embeddings": 64, "rope_theta": 1e4}
    assert R.yarn_correction_range(rope, 8) == (0, 2)
    inv, af = R.yarn_inv_freq(rope, 8, 64)
    np.testing.assert_allclose(inv, [1, 0.0625, 0.0025, 0.00025], rtol=1e-6)
    cos, sin = R.cos_sin(jnp.array([[5]]), inv, af, jnp.float32)
    out = np.asarray(R.apply_rope(x, cos, sin)).ravel()
    np.testing.assert_allclose(out, [5.7822831449, 0.0666152972, 3.3159939644, 4.5431278948, 0.5230711653,
                                     7.2010167416, 8.0124808648, 9.1147215182], rtol=1e-6, atol=1e-6)


def test_relative_position_property():
    rng = np.random.default_rng(0)
    q, k = (jnp.asarray(rng.standard_normal((1, 1, 1, 8)), jnp.float32) for _ in range(2))
    inv = R.default_inv_freq(1e4, 8)

    def dot(pq, pk):
        cq, sq = R.cos_sin(jnp.array([[pq]]), inv, 1.0, jnp.float32)
        ck, sk = R.cos_sin(jnp.array([[pk]]), inv, 1.0, jnp.float32)
        return float(jnp.sum(R.apply_rope(q, cq, sq) * R.apply_rope(k, ck, sk)))

    assert dot(17, 10) == pytest.approx(dot(7, 0), abs=1e-5)
    assert dot(17, 10) != pytest.approx(dot(8, 0), abs=1e-3)


def test_yarn_properties():
    base = R.default_inv_freq(1e6, 128)
    rope = {"rope_type": "yarn", "factor": 1.0, "original_max_position_embeddings": 32768, "rope_theta": 1e6}
    inv, af = R.yarn_inv_freq(rope, 128, 32768)
    np.testing.assert_allclose(inv, base, rtol=1e-7)
    assert af == 1.0
    rope["factor"] = 8.0
    inv, _ = R.yarn_inv_freq(rope, 128, 32768)
    assert np.all(np.diff(inv) <= 0)
    ratio = inv / base
    assert np.all(ratio <= 1 + 1e-6) and np.all(ratio >= 1 / 8 - 1e-6)
    assert math.isclose(R.yarn_mscale(1.0), 1.0)
