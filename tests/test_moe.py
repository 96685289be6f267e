"""Qwen2-MoE / Qwen3-MoE against transformers: logits (one device and an `expert` mesh), the fused v5
expert layout, the router losses, a sharded train step, conversion both ways."""

from __future__ import annotations

import json

import jax
import jax.numpy as jnp
import numpy as np
import pytest
import torch
from flax import nnx
from hf_fixtures import hf_logits, make_hf_model, random_ids
from safetensors.numpy import load_file, save_file

import qwen_jax
from qwen_jax import sharding
from qwen_jax.layers.moe import load_balancing_loss, router_z_loss

# odd expert counts, top-k > 2, norm_topk_prob both ways, dense and sparse layers mixed, tied and untied
CASES = {
    "qwen2_mixed_untied": dict(model_type="qwen2_moe", num_hidden_layers=4, num_experts=5, num_experts_per_tok=3,
                               moe_intermediate_size=32, shared_expert_intermediate_size=48, norm_topk_prob=True,
                               decoder_sparse_step=2, mlp_only_layers=[2], tie_word_embeddings=False),
    "qwen2_tied": dict(model_type="qwen2_moe", num_experts=3, num_experts_per_tok=2, moe_intermediate_size=24,
                       shared_expert_intermediate_size=40, norm_topk_prob=False, tie_word_embeddings=True),
    "qwen3_mixed_tied": dict(model_type="qwen3_moe", num_experts=7, num_experts_per_tok=3, moe_intermediate_size=32,
                             norm_topk_prob=True, mlp_only_layers=[0], tie_word_embeddings=True),
    "qwen3_top4_untied": dict(model_type="qwen3_moe", num_experts=5, num_experts_per_tok=4, moe_intermediate_size=16,
                              norm_topk_prob=False),
    # 8 experts: divisible by the expert axis of the mesh tests
    "qwen2_ep": dict(model_type="qwen2_moe", num_experts=8, num_experts_per_tok=3, moe_intermediate_size=16,
                     shared_expert_intermediate_size=24, norm_topk_prob=True, decoder_sparse_step=1,
                     mlp_only_layers=[0]),
}
TOL = 1e-4


@pytest.fixture(scope="module")
def folders(tmp_path_factory):
    """case -> (folder, transformers model), built once."""
    out = {}
    for i, (name, kw) in enumerate(CASES.items()):
        folder = tmp_path_factory.mktemp(name)
        out[name] = (folder, make_hf_model(folder, seed=i, **kw))
    return out


def _forward(model, ids):
    return np.asarray(nnx.jit(lambda m, x: m(x))(model, jnp.asarray(ids)))


def test_config_keys():
    """MoE keys read with transformers' defaults, written back by to_hf_dict; v5's num_local_experts spelling;
    a depth override keeps the derived layer kinds in step."""
    from qwen_jax.config import config_from_dict, to_hf_dict
    from qwen_jax.presets import get_preset

    raw = get_preset("qwen3-30b-a3b")
    cfg = config_from_dict(raw)
    assert (cfg.num_experts, cfg.num_experts_per_tok, cfg.moe_intermediate_size, cfg.norm_topk_prob,
            cfg.shared_expert_intermediate_size, cfg.router_aux_loss_coef) == (128, 8, 768, True, 0, 0.001)
    back = to_hf_dict(cfg)
    assert back["architectures"] == ["Qwen3MoeForCausalLM"] and "shared_expert_intermediate_size" not in back
    assert config_from_dict(back) == cfg
    v5 = {k: v for k, v in raw.items() if k != "num_experts"} | {"num_local_experts": 16}
    assert config_from_dict(v5).num_experts == 16
    assert config_from_dict(raw, num_hidden_layers=2).layer_types == ("full_attention",) * 2
    qwen2 = config_from_dict({**get_preset("qwen1.5-moe-a2.7b"), "qkv_bias": False, "mlp_only_layers": [3, 1]})
    assert not qwen2.attention_bias and qwen2.mlp_only_layers == (1, 3) and not qwen2.is_sparse(3)


@pytest.mark.parametrize("name", list(CASES))
def test_logits_match_transformers(folders, name):
    folder, hf = folders[name]
    ids = random_ids(2, 13)
    ref = hf_logits(hf, ids)
    model = qwen_jax.from_pretrained(folder)
    assert model.cfg.is_moe and model.cfg.num_experts == CASES[name]["num_experts"]
    diff = np.abs(_forward(model, ids) - ref).max()
    assert diff <= TOL, diff
    if name == "qwen2_mixed_untied":  # scanned layers: the same numbers
        scanned = qwen_jax.from_pretrained(folder, scan_layers=True)
        assert np.abs(_forward(scanned, ids) - ref).max() <= TOL


@pytest.mark.parametrize("name", ["qwen2_mixed_untied", "qwen3_mixed_tied"])
def test_greedy_generation_matches_transformers(folders, name):
    """Generation walks mixed dense/sparse stacks in layer order: greedy tokens equal transformers'."""
    folder, hf = folders[name]
    model = qwen_jax.from_pretrained(folder)
    prompts = [random_ids(1, 9, seed=3)[0].tolist(), random_ids(1, 4, seed=4)[0].tolist()]
    ours = qwen_jax.generate(model, prompts, max_new_tokens=6, stop_ids=[])
    for prompt, got in zip(prompts, ours, strict=True):
        with torch.no_grad():
            out = hf.generate(torch.tensor([prompt]), attention_mask=torch.ones(1, len(prompt), dtype=torch.long),
                              max_new_tokens=6, do_sample=False, eos_token_id=None, pad_token_id=0)
        assert got == out[0, len(prompt):].tolist()


def test_layer_stacks_follow_sparse_step_and_mlp_only_layers(folders):
    model = qwen_jax.from_pretrained(folders["qwen2_mixed_untied"][0])
    # 4 layers, decoder_sparse_step 2, mlp_only_layers [2]: layer 1 and 3 sparse
    assert [model.cfg.is_sparse(i) for i in range(4)] == [False, True, False, True]
    assert model.layers.mlp.experts.gate_proj.value.shape == (2, 5, 64, 32)
    assert model.dense_layers.mlp.gate_proj.kernel.value.shape == (2, 64, 96)
    hf = folders["qwen2_mixed_untied"][1]
    expert = hf.model.layers[3].mlp.experts
    # per-expert gate rows of the fused transformers tensor, transposed
    np.testing.assert_array_equal(np.asarray(model.layers.mlp.experts.gate_proj.value[1, 4]),
                                  expert.gate_up_proj[4, :32].detach().numpy().T)


@pytest.mark.parametrize("name", ["qwen2_ep", "qwen3_mixed_tied"])
def test_logits_on_expert_mesh(folders, name):
    """8 CPU devices, expert=4 x fsdp=2: experts sharded and computed per device (shard_map, all-to-all dispatch by
    default) when 4 divides their count (8), replicated when not (7); the logits equal one device's to rounding."""
    folder, hf = folders[name]
    ids = random_ids(4, 12)
    ref = hf_logits(hf, ids)
    mesh = sharding.make_mesh({"expert": 4, "fsdp": 2})
    model = qwen_jax.from_pretrained(folder, mesh=mesh)
    w = model.layers.mlp.experts.gate_proj.value
    expected = "expert" if CASES[name]["num_experts"] % 4 == 0 else None
    assert w.sharding.spec[:3] == (None, expected, "fsdp")
    with jax.set_mesh(mesh):
        out = _forward(model, ids)
        program = str(jax.make_jaxpr(lambda x: model(x))(jnp.asarray(ids)))
    assert np.abs(out - ref).max() <= TOL
    one_device = _forward(qwen_jax.from_pretrained(folder), ids)
    np.testing.assert_allclose(out, one_device, rtol=1e-5, atol=1e-5 * np.abs(one_device).max())
    assert ("shard_map" in program) == (expected == "expert")  # expert-parallel path only when 4 divides E
    assert ("all_to_all" in program) == (expected == "expert")


def test_fused_expert_layout_reads_the_same(folders, tmp_path):
    """transformers v5's in-memory layout (experts.gate_up_proj / experts.down_proj) loads to the same model."""
    folder, hf = folders["qwen3_mixed_tied"]
    tensors = load_file(folder / "model.safetensors")
    fused = {}
    for layer in range(3):
        prefix = f"model.layers.{layer}.mlp.experts"
        if f"{prefix}.0.gate_proj.weight" not in tensors:
            continue
        gate, up, down = ([tensors.pop(f"{prefix}.{e}.{p}.weight") for e in range(7)]
                          for p in ("gate_proj", "up_proj", "down_proj"))
        fused[f"{prefix}.gate_up_proj"] = np.stack([np.concatenate([g, u]) for g, u in zip(gate, up, strict=True)])
        fused[f"{prefix}.down_proj"] = np.stack(down)
    np.testing.assert_array_equal(fused["model.layers.1.mlp.experts.gate_up_proj"],
                                  hf.model.layers[1].mlp.experts.gate_up_proj.detach().numpy())
    save_file({**tensors, **fused}, tmp_path / "model.safetensors")
    (tmp_path / "config.json").write_text((folder / "config.json").read_text())
    a, b = qwen_jax.from_pretrained(folder), qwen_jax.from_pretrained(tmp_path)
    for (path, x), (_, y) in zip(nnx.to_flat_state(nnx.state(a)), nnx.to_flat_state(nnx.state(b)), strict=True):
        np.testing.assert_array_equal(np.asarray(x.value), np.asarray(y.value), err_msg=str(path))


@pytest.mark.parametrize("name", ["qwen2_mixed_untied", "qwen3_top4_untied"])
def test_router_losses_match_transformers(folders, name):
    """Load-balancing loss = transformers' load_balancing_loss_func (padding masked), z-loss from its router logits."""
    folder, hf = folders[name]
    ids = random_ids(2, 10)
    mask = np.ones_like(ids)
    mask[1, 7:] = 0  # right padding: the real tokens' router logits do not depend on it
    with torch.no_grad():
        out = hf(torch.as_tensor(ids), attention_mask=torch.as_tensor(mask), output_router_logits=True)
    model = qwen_jax.from_pretrained(folder)
    _, stats = model.hidden_states_and_router(jnp.asarray(ids), segment_ids=jnp.asarray(mask))
    cfg = model.cfg
    np.testing.assert_allclose(float(load_balancing_loss(stats, cfg.num_experts)), float(out.aux_loss), rtol=1e-5)
    logits = torch.stack(out.router_logits).float()  # [sparse layers, tokens, experts]
    keep = torch.as_tensor(mask.reshape(-1)).bool()
    z_ref = (torch.logsumexp(logits[:, keep], dim=-1) ** 2).mean()
    np.testing.assert_allclose(float(router_z_loss(stats)), float(z_ref), rtol=1e-5)
    assert float(stats.tokens) == keep.sum() * len(out.router_logits)


# ---------------------------------------------------------------- a train step: expert=4 x fsdp=2 == one device
def _grad_capture():
    """An optax transformation that leaves the parameters alone and keeps the last gradients in its state."""
    import optax

    return optax.GradientTransformation(lambda p: {"grads": jax.tree.map(jnp.zeros_like, p)},
                                        lambda g, s, p=None: (jax.tree.map(jnp.zeros_like, g), {"grads": g}))


def _one_step(folder, mesh_shape, devices):
    from qwen_jax.trainer import optimizer as opt
    from qwen_jax.trainer import train_step as ts
    from qwen_jax.trainer.synthetic import SyntheticBatches

    mesh = sharding.make_mesh(mesh_shape, devices=jax.devices()[:devices])
    cfg = qwen_jax.load_hf_config(folder, scan_layers=True)  # one compiled layer per stack: CPU compiles fast
    graphdef, abstract, p_sh = ts.param_shardings(cfg, mesh)
    params = nnx.to_pure_dict(nnx.state(qwen_jax.from_pretrained(folder, mesh=mesh, scan_layers=True), nnx.Param))
    tx = _grad_capture()
    state_sh = ts.state_shardings(tx, abstract, p_sh, mesh)
    state = ts.init_state(params, tx, 0, state_sh)
    batch_sh = ts.batch_shardings(mesh, 8, 16)
    step = ts.make_train_step(graphdef, tx, lambda s: 0.0, opt.resolve_freeze(abstract), mesh=mesh, state_sh=state_sh,
                              batch_sh=batch_sh, chunk_size=8, router_z_loss_weight=0.01, grad_accum_steps=2)
    batch = SyntheticBatches(8, 16, cfg.vocab_size, seed=3).global_batch(0)
    state, metrics = step(state, {k: jax.device_put(v, batch_sh[k]) for k, v in batch.items()})
    return jax.tree.map(np.asarray, state["opt_state"]["grads"]), {k: float(v) for k, v in metrics.items()}, state


@pytest.fixture(scope="module")
def one_device_step(folders):
    grads, metrics, _ = _one_step(folders["qwen2_ep"][0], {"fsdp": 1}, 1)
    return grads, metrics


@pytest.mark.slow  # a train-step compilation each (ragged_dot gradients compile slowly on CPU)
@pytest.mark.parametrize("mesh_shape", [{"expert": 4, "fsdp": 2}, {"expert": 2, "data": 2, "fsdp": 2}],
                         ids=["expert4_fsdp2", "expert2_data2_fsdp2"])
def test_train_step_expert_mesh_equals_one_device(folders, one_device_step, mesh_shape):
    """The all-to-all dispatch (the default) in a whole train step with gradient accumulation: loss, router losses,
    gradient norm and every gradient equal one device's.  (The all-gather dispatch's gradients: test_moe_dispatch.)"""
    grads1, m1 = one_device_step
    grads8, m8, state8 = _one_step(folders["qwen2_ep"][0], mesh_shape, 8)
    assert state8["params"]["layers"]["mlp"]["experts"]["up_proj"].sharding.spec[:2] == (None, "expert")
    assert m1["router_aux_loss"] > 0.9 and m1["router_z_loss"] > 0  # balanced routing gives ~1
    for key in ("loss", "router_aux_loss", "router_z_loss", "grad_norm"):
        np.testing.assert_allclose(m8[key], m1[key], rtol=1e-5, err_msg=key)
    flat1 = jax.tree_util.tree_leaves_with_path(grads1)
    flat8 = jax.tree.leaves(grads8)
    for (path, g1), g8 in zip(flat1, flat8, strict=True):
        # summation order differs across devices: compare against the tensor's scale
        np.testing.assert_allclose(g8, g1, rtol=1e-5, atol=1e-5 * np.abs(g1).max(), err_msg=jax.tree_util.keystr(path))
    router = grads1["layers"]["mlp"]["gate"]["kernel"]
    assert np.abs(router).max() > 0  # the router is trained (by the LM loss and the two router losses)
    assert grads1["dense_layers"]["mlp"]["gate_proj"]["kernel"].shape[0] == 1


# ---------------------------------------------------------------- conversion both ways
@pytest.mark.slow
@pytest.mark.parametrize("name", ["qwen2_mixed_untied", "qwen3_mixed_tied"])
def test_convert_round_trip_bit_exact(folders, tmp_path, name):
    from qwen_jax.hf import convert

    folder = folders[name][0]
    ckpt = convert.hf_to_orbax(str(folder), str(tmp_path / "ckpt"))
    # allow_lint_errors: the random test models have no eos token (QL-EOS-07), unrelated to the experts
    back = convert.orbax_to_hf(ckpt, str(tmp_path / "hf"), max_shard_size="40KB", allow_lint_errors=True)
    original = load_file(folder / "model.safetensors")
    index = json.loads((tmp_path / "hf" / "model.safetensors.index.json").read_text())["weight_map"]
    assert len({*index.values()}) > 1  # several shards
    written = {}
    for file in sorted({*index.values()}):
        written.update(load_file(tmp_path / "hf" / file))
    original.pop("lm_head.weight", None) if CASES[name].get("tie_word_embeddings") else None
    assert set(written) == set(original)
    assert "model.layers.1.mlp.experts.0.gate_proj.weight" in written
    for key, value in original.items():
        assert written[key].dtype == value.dtype and np.array_equal(written[key], value), key
    again = qwen_jax.from_pretrained(back)
    ids = random_ids(1, 9)
    np.testing.assert_array_equal(_forward(again, ids), _forward(qwen_jax.from_pretrained(folder), ids))


# ---------------------------------------------------------------- the trainer end to end
@pytest.mark.slow
def test_trainer_runs_moe_on_expert_mesh_and_exports(tmp_path):
    """`python -m qwen_jax.train` on a cut-down Qwen3-30B-A3B preset, mesh expert=2 x fsdp=1: router losses
    logged, and the Hugging Face export loads in transformers with the logits of the trained checkpoint."""
    import train_launch

    arch = ("num_hidden_layers=2,hidden_size=64,intermediate_size=96,moe_intermediate_size=32,num_experts=6,"
            "num_experts_per_tok=3,num_attention_heads=4,num_key_value_heads=2,head_dim=16")
    run = train_launch.run(tmp_path / "run", "--config=configs/base.py", "--config.synthetic_data=true",
                           "--config.model.preset=qwen3-30b-a3b",
                           f"--config.model.overrides={arch}", "--config.total_steps=2", "--config.save_every=2",
                           "--config.export_hf=true", "--config.mesh.fsdp=1", "--config.mesh.expert=2",
                           "--config.loss.router_z_loss=0.001", *train_launch.TINY_ARGS[3:7], timeout=900)
    assert run.returncode == 0, run.stdout[-3000:] + run.stderr[-3000:]
    records = train_launch.all_records(tmp_path / "run")
    assert all(r["router_aux_loss"] > 0.5 and r["router_z_loss"] > 0 for r in records)
    export = tmp_path / "run" / "hf_export"
    hf_config = json.loads((export / "config.json").read_text())
    assert hf_config["model_type"] == "qwen3_moe" and hf_config["num_experts"] == 6
    from transformers import Qwen3MoeForCausalLM

    hf, info = Qwen3MoeForCausalLM.from_pretrained(export, output_loading_info=True, dtype=torch.float32)
    assert not info["missing_keys"] and not info["unexpected_keys"]
    ids = random_ids(1, 9, vocab=hf_config["vocab_size"])
    ours = _forward(qwen_jax.from_pretrained(export), ids)
    assert np.abs(ours - hf_logits(hf.eval(), ids)).max() <= TOL
