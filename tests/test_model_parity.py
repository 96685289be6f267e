"""Logit parity with transformers' PyTorch Qwen2/Qwen3 on tiny random checkpoints (float32: max |diff| <= 1e-4)."""

from __future__ import annotations

import functools

import jax
import jax.numpy as jnp
import numpy as np
import pytest
import torch
from flax import nnx
from hf_fixtures import hf_logits, make_hf_model, random_ids
from transformers import AutoModelForCausalLM

import qwen_jax
from qwen_jax.sharding import make_mesh

TOL = 1e-4
REPORT: dict[str, float] = {}


@functools.partial(jax.jit, static_argnums=0)
def _forward(graphdef, state, ids, positions, segment_ids):
    return nnx.merge(graphdef, state)(ids, positions, segment_ids)


def forward(model, ids, positions=None, segment_ids=None):
    graphdef, state = nnx.split(model)
    to = lambda x: None if x is None else jnp.asarray(x, jnp.int32)
    return np.asarray(_forward(graphdef, state, to(ids), to(positions), to(segment_ids)))


def check(name, ours, ref, tol=TOL):
    err = float(np.max(np.abs(ours - ref)))
    REPORT[name] = err
    print(f"[parity] {name}: max |logit diff| = {err:.3e} (max |logit| {np.max(np.abs(ref)):.2f})")
    assert np.all(np.isfinite(ours))
    assert err <= tol, f"{name}: max |logit diff| {err} > {tol}"


CASES = {
    "untied_gqa2": dict(),
    "tied": dict(tie_word_embeddings=True),
    "mha_group1": dict(num_key_value_heads=4),
    "gqa_group7": dict(num_attention_heads=7, num_key_value_heads=1, hidden_size=56),
    "sliding_window_some_layers": dict(use_sliding_window=True, sliding_window=5, max_window_layers=1),
    "qwen3": dict(model_type="qwen3"),
    "qwen3_tied_sliding": dict(model_type="qwen3", tie_word_embeddings=True, use_sliding_window=True,
                               sliding_window=6, max_window_layers=2),
}


@pytest.mark.parametrize("name", sorted(CASES))
def test_parity_fp32(tmp_path, name):
    kwargs = dict(CASES[name])
    hf = make_hf_model(tmp_path, **kwargs)
    model = qwen_jax.from_pretrained(tmp_path)
    ids = random_ids(2, 24)
    check(name, forward(model, ids), hf_logits(hf, ids))


ROPE_CASES = {
    # (config overrides, sequence length): lengths run past the original window
    "yarn_v4_rope_scaling": (dict(max_position_embeddings=32,
                                  rope_scaling={"rope_type": "yarn", "factor": 4.0,
                                                "original_max_position_embeddings": 16}), 60),
    "yarn_v5_rope_parameters": (dict(max_position_embeddings=32,
                                     rope_parameters={"rope_type": "yarn", "factor": 4.0, "rope_theta": 10000.0,
                                                      "original_max_position_embeddings": 16}), 60),
    "linear": (dict(max_position_embeddings=16, rope_scaling={"type": "linear", "factor": 2.0}), 40),
    "dynamic": (dict(max_position_embeddings=16, rope_scaling={"type": "dynamic", "factor": 2.0}), 40),
}


@pytest.mark.parametrize("name", sorted(ROPE_CASES))
def test_parity_rope_scaling_past_original_window(tmp_path, name):
    overrides, seq = ROPE_CASES[name]
    hf = make_hf_model(tmp_path, **overrides)
    model = qwen_jax.from_pretrained(tmp_path)
    expected_type = name.split("_")[0]
    assert model.cfg.rope_type == expected_type
    ids = random_ids(1, seq)
    check(name, forward(model, ids), hf_logits(hf, ids))


def test_rope_scaling_changes_logits(tmp_path):
    """Guards the tests above: YaRN must actually change the output past the original window."""
    overrides, seq = ROPE_CASES["yarn_v4_rope_scaling"]
    make_hf_model(tmp_path, **overrides)
    ids = random_ids(1, seq)
    yarn = forward(qwen_jax.from_pretrained(tmp_path), ids)
    plain = forward(qwen_jax.from_pretrained(tmp_path, rope_parameters=(("rope_type", "default"),)), ids)
    assert np.max(np.abs(yarn - plain)) > 10 * TOL  # i.e. the parity check above would catch a no-op YaRN


def test_packed_segments_equal_separate_documents(tmp_path):
    """Two documents packed in one row give the logits each gets alone in transformers."""
    hf = make_hf_model(tmp_path)
    model = qwen_jax.from_pretrained(tmp_path)
    a, b = random_ids(1, 13, seed=1), random_ids(1, 11, seed=2)
    packed = np.concatenate([a, b], axis=1)
    positions = np.concatenate([np.arange(13), np.arange(11)])[None]
    segments = np.array([[1] * 13 + [2] * 11])
    ours = forward(model, packed, positions, segments)
    ref = np.concatenate([hf_logits(hf, a), hf_logits(hf, b)], axis=1)
    check("packed_segments", ours, ref)
    # and the mask matters: without segment ids the second document sees the first
    leaky = forward(model, packed, positions, None)
    assert np.max(np.abs(leaky[:, 13:] - ref[:, 13:])) > 1e-3


def test_sharded_safetensors_folder(tmp_path):
    hf = make_hf_model(tmp_path, max_shard_size="100KB")
    assert (tmp_path / "model.safetensors.index.json").exists()
    assert len(list(tmp_path.glob("model-*.safetensors"))) > 1
    model = qwen_jax.from_pretrained(tmp_path)
    ids = random_ids(2, 16)
    check("sharded_folder", forward(model, ids), hf_logits(hf, ids))


def test_bf16_checkpoint(tmp_path):
    """A bf16 checkpoint: loaded exactly (param_dtype='keep'), and fp32 compute matches HF fp32 on the same weights."""
    hf = make_hf_model(tmp_path, dtype=torch.bfloat16)
    model = qwen_jax.from_pretrained(tmp_path, param_dtype="keep")
    assert model.embed_tokens.embedding.value.dtype == jnp.bfloat16
    np.testing.assert_array_equal(
        np.asarray(model.embed_tokens.embedding.value.astype(jnp.float32)),
        hf.model.embed_tokens.weight.detach().float().numpy(),
    )
    ids = random_ids(2, 16)
    fp32 = qwen_jax.from_pretrained(tmp_path, dtype="float32", param_dtype="float32")
    # a fresh fp32 load (hf.float() would keep the rotary inv_freq buffer rounded to bf16 by .to(bf16))
    hf32 = AutoModelForCausalLM.from_pretrained(tmp_path, dtype=torch.float32, attn_implementation="eager")
    check("bf16_checkpoint_fp32_compute", forward(fp32, ids), hf_logits(hf32, ids))
    # bf16 compute over bf16 weights vs transformers in bf16: same rounding regime, loose bound
    bf16 = qwen_jax.from_pretrained(tmp_path, dtype="bfloat16", param_dtype="keep")
    check("bf16_checkpoint_bf16_compute", forward(bf16, ids), hf_logits(hf.to(torch.bfloat16), ids), tol=0.1)


def test_bf16_compute_over_fp32_params(tmp_path):
    hf = make_hf_model(tmp_path)
    model = qwen_jax.from_pretrained(tmp_path, dtype="bfloat16", param_dtype="float32")
    assert model.layers.mlp.gate_proj.kernel.value.dtype == jnp.float32
    ids = random_ids(2, 16)
    ours = forward(model, ids)
    ref = hf_logits(hf, ids)
    err = float(np.max(np.abs(ours - ref)))
    REPORT["bf16_compute_fp32_params"] = err
    assert 0 < err < 0.1  # bf16 rounding is visible (so bf16 really ran) but small


def test_same_logits_on_8_device_mesh(tmp_path):
    """fsdp x tensor (x data) sharding changes placement, not results."""
    assert len(jax.devices()) == 8
    make_hf_model(tmp_path, num_attention_heads=8, num_key_value_heads=4, hidden_size=64, vocab_size=256)
    ids = random_ids(4, 16)
    single = forward(qwen_jax.from_pretrained(tmp_path), ids)
    mesh = make_mesh({"data": 2, "fsdp": 2, "tensor": 2})
    model = qwen_jax.from_pretrained(tmp_path, mesh=mesh)
    q = model.layers.self_attn.q_proj.kernel.value
    assert q.sharding.spec == jax.sharding.PartitionSpec(None, "fsdp", "tensor", None)
    assert len(q.addressable_shards) == 8 and q.addressable_shards[0].data.shape == (3, 32, 4, 8)
    with jax.set_mesh(mesh):
        sharded = forward(model, ids)
    check("mesh_data2_fsdp2_tensor2", sharded, single, tol=1e-5)


def test_unsupported_and_invalid_configs(tmp_path):
    make_hf_model(tmp_path)
    import json

    cfg = json.loads((tmp_path / "config.json").read_text())
    (tmp_path / "config.json").write_text(json.dumps({**cfg, "model_type": "mixtral"}))
    with pytest.raises(qwen_jax.ConfigError, match=r"config.json: key 'model_type': unsupported value 'mixtral'"):
        qwen_jax.from_pretrained(tmp_path)
    (tmp_path / "config.json").write_text(json.dumps({**cfg, "num_key_value_heads": 3}))
    with pytest.raises(qwen_jax.ConfigError, match=r"config.json: key 'num_key_value_heads'"):
        qwen_jax.from_pretrained(tmp_path)
    (tmp_path / "config.json").write_text(json.dumps({**cfg, "hidden_size": 96}))
    with pytest.raises(qwen_jax.CheckpointError, match=r"shape disagrees with config.json.*q_proj"):
        qwen_jax.from_pretrained(tmp_path)


def test_missing_and_unexpected_tensors_listed_together(tmp_path):
    from safetensors.numpy import load_file, save_file

    make_hf_model(tmp_path)
    tensors = load_file(tmp_path / "model.safetensors")
    del tensors["model.layers.1.mlp.up_proj.weight"]
    del tensors["model.norm.weight"]
    tensors["model.layers.9.extra.weight"] = np.zeros(3, np.float32)
    save_file(tensors, tmp_path / "model.safetensors", metadata={"format": "pt"})
    with pytest.raises(qwen_jax.CheckpointError) as err:
        qwen_jax.from_pretrained(tmp_path)
    msg = str(err.value)
    assert "model.layers.1.mlp.up_proj.weight" in msg and "model.norm.weight" in msg
    assert "unexpected tensors (1): model.layers.9.extra.weight" in msg


def test_scan_layers_and_remat_give_identical_logits(tmp_path):
    make_hf_model(tmp_path, use_sliding_window=True, sliding_window=5, max_window_layers=1)
    ids = random_ids(2, 16)
    base = forward(qwen_jax.from_pretrained(tmp_path), ids)
    scanned = forward(qwen_jax.from_pretrained(tmp_path, scan_layers=True, remat="full"), ids)
    np.testing.assert_allclose(scanned, base, rtol=0, atol=1e-5)
