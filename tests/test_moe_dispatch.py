"""Expert parallelism's two dispatches against one device: a sparse MoE layer (routed experts, shared expert,
router statistics) and its gradients on the 8 virtual CPU devices, with balanced routing and with every token
forced onto one expert shard (the all-to-all's dropless worst case).  Token counts per `expert` shard are odd.
The whole train step on these meshes: tests/test_moe.py."""

from __future__ import annotations

import dataclasses
import functools

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from flax import nnx

from qwen_jax import sharding
from qwen_jax.config import QwenConfig
from qwen_jax.layers.moe import SparseMoE, load_balancing_loss

# 8 experts, top-3: expert=4 gives 2 experts per shard (fewer than k), expert=2 gives 4 (more than k)
CFG = QwenConfig(model_type="qwen2_moe", vocab_size=64, hidden_size=32, intermediate_size=64, num_hidden_layers=1,
                 num_attention_heads=2, num_key_value_heads=2, head_dim=16, num_experts=8, num_experts_per_tok=3,
                 moe_intermediate_size=16, shared_expert_intermediate_size=24, norm_topk_prob=True,
                 initializer_range=0.3)
SHAPE = (4, 5, 32)  # 20 tokens: 5 per shard of expert=4
MESHES = {"expert4_fsdp2": {"expert": 4, "fsdp": 2}, "expert2_data2_fsdp2": {"expert": 2, "data": 2, "fsdp": 2}}


def _layer(dispatch: str) -> SparseMoE:
    cfg = dataclasses.replace(CFG, moe_dispatch=dispatch)
    return SparseMoE(cfg, dtype=jnp.float32, param_dtype=jnp.float32, rngs=nnx.Rngs(0))


def _inputs(routing: str, experts_per_shard: int):
    """(parameters, x, output cotangent).  `one_shard`: a constant input feature and a router row that lift the first
    min(k, experts per shard) experts of shard 1 above all others, so every token sends as many rows to shard 1 as
    one shard can take from it (the all-to-all block of that destination is full, the others nearly empty)."""
    rng = np.random.default_rng(0)
    params = jax.tree.map(np.asarray, nnx.to_pure_dict(nnx.state(_layer("all_to_all"), nnx.Param)))
    x = rng.normal(size=SHAPE).astype(np.float32)
    if routing == "one_shard":
        favoured = experts_per_shard + np.arange(min(CFG.num_experts_per_tok, experts_per_shard))
        x[..., 0] = 4.0
        params["gate"]["kernel"] = params["gate"]["kernel"].copy()
        params["gate"]["kernel"][0, favoured] += 3.0
    return params, x, rng.normal(size=SHAPE).astype(np.float32)


@nnx.jit
def _value_and_grads(layer, x, cotangent):
    def loss(layer, x):
        y, stats = layer(x)
        return jnp.sum(y * cotangent) + load_balancing_loss(stats, CFG.num_experts), (y, stats)

    (_, (y, stats)), grads = nnx.value_and_grad(loss, argnums=(0, 1), has_aux=True)(layer, x)
    return y, stats, grads


def _run(dispatch, params, x, cotangent, mesh=None):
    layer = _layer(dispatch)
    state = nnx.state(layer, nnx.Param)
    nnx.replace_by_pure_dict(state, params)
    if mesh is None:
        nnx.update(layer, state)
        return jax.tree.map(np.asarray, _value_and_grads(layer, jnp.asarray(x), jnp.asarray(cotangent)))
    nnx.update(layer, jax.device_put(state, sharding.state_shardings(state, mesh)))
    place = sharding.batch_sharding(mesh, 3, SHAPE)
    with jax.set_mesh(mesh):
        program = str(jax.make_jaxpr(lambda x: layer(x))(x))
        out = _value_and_grads(layer, jax.device_put(x, place), jax.device_put(cotangent, place))
    if mesh.shape["expert"] > 1:
        assert layer.experts.gate_proj.value.sharding.spec[0] == "expert"
    return jax.tree.map(np.asarray, out), program


@functools.cache
def _one_device(routing: str, experts_per_shard: int):
    """The reference, shared by both dispatches (one device runs neither)."""
    return _run("all_to_all", *_inputs(routing, experts_per_shard))


@pytest.mark.parametrize("routing", ["balanced", "one_shard"])
@pytest.mark.parametrize("mesh_name", list(MESHES))
@pytest.mark.parametrize("dispatch", ["all_to_all", pytest.param("all_gather", marks=pytest.mark.slow)])
def test_expert_parallel_layer_equals_one_device(dispatch, mesh_name, routing):
    """Outputs, router statistics and gradients (parameters and input) equal one device to float32 rounding."""
    mesh = sharding.make_mesh(MESHES[mesh_name])
    per_shard = CFG.num_experts // mesh.shape["expert"]
    params, x, cotangent = _inputs(routing, per_shard)
    y1, stats1, grads1 = _one_device(routing, per_shard)
    (y8, stats8, grads8), program = _run(dispatch, params, x, cotangent, mesh)
    # the chosen exchange is the one in the program
    assert ("all_to_all" in program, "all_gather" in program) == (dispatch == "all_to_all", dispatch == "all_gather")
    load = stats1.load
    if routing == "one_shard":  # the routing did land on shard 1 as intended
        favoured = slice(per_shard, per_shard + min(CFG.num_experts_per_tok, per_shard))
        assert np.all(load[favoured] == x.shape[0] * x.shape[1])
    np.testing.assert_allclose(y8, y1, rtol=1e-5, atol=1e-5 * np.abs(y1).max())
    for a, b in zip(stats8, stats1, strict=True):
        np.testing.assert_allclose(a, b, rtol=1e-5)
    flat1 = jax.tree_util.tree_leaves_with_path(grads1)
    for (path, g1), g8 in zip(flat1, jax.tree.leaves(grads8), strict=True):
        assert np.abs(g1).max() > 0, jax.tree_util.keystr(path)  # every parameter (and the input) gets gradient
        np.testing.assert_allclose(g8, g1, rtol=1e-5, atol=1e-5 * np.abs(g1).max(), err_msg=jax.tree_util.keystr(path))


@pytest.mark.parametrize("devices", [1, 4])
def test_expert_axis_of_one_dispatches_nothing(devices):
    """The trainer's default mesh has expert=1 (one GPU: every axis 1): the routed experts are one grouped
    computation over exactly n*k rows, with no shard_map, no exchange and none of the all-to-all's dropless
    worst-case blocks, and the layer, its router statistics and gradients equal the layer outside any mesh."""
    mesh = sharding.make_mesh({"fsdp": devices, "expert": 1}, devices=jax.devices()[:devices])
    params, x, cotangent = _inputs("balanced", CFG.num_experts)
    y1, stats1, grads1 = _one_device("balanced", CFG.num_experts)
    (y, stats, grads), program = _run("all_to_all", params, x, cotangent, mesh)
    for collective in ("shard_map", "all_to_all", "all_gather", "psum_scatter"):
        assert collective not in program
    rows = SHAPE[0] * SHAPE[1] * CFG.num_experts_per_tok
    assert f"f32[{rows},{SHAPE[2]}]" in program and f"f32[{2 * rows}," not in program
    np.testing.assert_allclose(y, y1, rtol=1e-5, atol=1e-5 * np.abs(y1).max())
    for a, b in zip(stats, stats1, strict=True):
        np.testing.assert_allclose(a, b, rtol=1e-5)
    for g, g1 in zip(jax.tree.leaves(grads), jax.tree.leaves(grads1), strict=True):
        np.testing.assert_allclose(g, g1, rtol=1e-5, atol=1e-5 * np.abs(g1).max())


@pytest.mark.parametrize("shape, says", [
    ("qwen3-30b-a3b@0:128x2", "@layers must be 1..48"),
    ("qwen2-57b-a14b@29:128x2", "@layers must be 1..28"),
    ("qwen2-0.5b@2:128x2", "@layers is for mixture-of-experts presets"),
])
def test_launcher_benchmark_refuses_a_bad_layer_cut(tmp_path, shape, says):
    """A reduced-depth MoE shape out of the preset's range is one error line (exit 2) before any run starts;
    @0 used to build the full 48-layer model silently."""
    import os
    import subprocess
    import sys

    root = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
    out = tmp_path / "out"
    proc = subprocess.run([sys.executable, os.path.join(root, "benchmarks", "launcher_throughput.py"), "--shapes",
                           shape, "--data", "synthetic", "--peers", "", "--out", str(out)],
                          capture_output=True, text=True, timeout=120, env={**os.environ, "PYTHONPATH": root})
    assert proc.returncode == 2, proc.stderr
    assert proc.stderr.strip().splitlines()[-1].startswith("launcher_throughput.py: error: --shapes")
    assert says in proc.stderr and "Traceback" not in proc.stderr
    assert not out.exists()
