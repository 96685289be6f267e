"""The MoE grouped matmul (`qwen_jax/layers/grouped_matmul.py`) on CPU: the `xla` implementation is
`jax.lax.ragged_dot`; `auto` picks it off Hopper; the kernel path's padding, row masking and custom VJP
wiring, run with XLA's ragged products standing in for the Mosaic-GPU kernels, equal plain `ragged_dot`
in value and both gradients; the real forward kernel, in Pallas' GPU interpreter, equals `ragged_dot`.
The gradient kernels run only on a GPU: benchmarks/grouped_matmul_check.py."""

from __future__ import annotations

import functools

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from qwen_jax.config import ConfigError, QwenConfig
from qwen_jax.layers import grouped_matmul as gm
from qwen_jax.sharding import make_mesh


def _problem(m, k, n, sizes, seed=0, dtype=jnp.float32):
    kx, kw, kd = jax.random.split(jax.random.key(seed), 3)
    x = jax.random.normal(kx, (m, k), dtype)
    w = jax.random.normal(kw, (len(sizes), k, n), dtype)
    dy = jax.random.normal(kd, (m, n), dtype)
    return x, w, jnp.asarray(sizes, jnp.int32), dy


def _value_and_grads(matmul, x, w, sizes, dy):
    """(out, dx, dw) of `sum(matmul(x, w, sizes) * dy)`, in one jitted computation."""
    @jax.jit
    def run(x, w, sizes, dy):
        out, vjp = jax.vjp(lambda x, w: matmul(x, w, sizes), x, w)
        return (out, *vjp(dy))
    return run(x, w, sizes, dy)


def _garbage_outside_groups(product):
    """`product` with NaN in the rows outside every group, as the Mosaic kernels leave them unwritten."""
    def run(a, b, sizes):
        out = product(a, b, sizes)
        rows = jnp.arange(out.shape[0])[:, None]
        return jnp.where(rows < jnp.sum(sizes), out, jnp.nan)
    return run


UNWRITTEN_TAIL_KERNELS = gm.GroupedKernels(forward=_garbage_outside_groups(gm.XLA_KERNELS.forward),
                                           input_grad=_garbage_outside_groups(gm.XLA_KERNELS.input_grad),
                                           weight_grad=gm.XLA_KERNELS.weight_grad)


def test_xla_implementation_is_ragged_dot():
    """`xla` is today's behaviour bit for bit: `jax.lax.ragged_dot` and its autodiff."""
    x, w, sizes, dy = _problem(24, 16, 8, [5, 0, 11, 8])
    ours = _value_and_grads(functools.partial(gm.grouped_matmul, implementation="xla"), x, w, sizes, dy)
    ref = _value_and_grads(jax.lax.ragged_dot, x, w, sizes, dy)
    for a, b in zip(ours, ref, strict=True):
        np.testing.assert_array_equal(np.asarray(a), np.asarray(b))


def test_auto_is_xla_off_hopper_and_names_are_checked():
    assert jax.default_backend() == "cpu" and not gm.is_hopper()
    for dtype in (jnp.bfloat16, jnp.float16, jnp.float32):
        assert gm.resolve_implementation("auto", dtype) == "xla"
    assert gm.resolve_implementation("mosaic_gpu", jnp.bfloat16) == "mosaic_gpu"
    with pytest.raises(ValueError, match="moe_matmul"):
        gm.resolve_implementation("triton", jnp.bfloat16)
    x, w, sizes, _ = _problem(8, 4, 4, [3, 5])
    with pytest.raises(ValueError, match="Hopper"):
        gm.grouped_matmul(x, w, sizes, implementation="mosaic_gpu")
    with pytest.raises(ConfigError, match="'moe_matmul'"):
        QwenConfig(moe_matmul="triton")


def test_partitioned_axes_size_counts_automatic_axes():
    """`auto` keeps XLA on a partitioned mesh (the kernels have no partitioning rule)."""
    assert gm.partitioned_axes_size() == 1
    mesh = make_mesh({"data": 2, "fsdp": 2, "expert": 2})
    with jax.set_mesh(mesh):
        assert gm.partitioned_axes_size() == 8

        @functools.partial(jax.shard_map, in_specs=jax.P("expert"), out_specs=jax.P("expert"),
                           axis_names={"expert"})
        def inside(a):
            assert gm.partitioned_axes_size() == 4  # data x fsdp stay automatic
            return a

        inside(jnp.zeros(8))


# (m, k, n, group sizes, align): unaligned m/k/n with empty middle/last groups and rows past the last group
# (the expert-parallel layout); empty first groups; an already aligned shape (no padding)
CASES = {
    "unaligned_tail": (37, 20, 13, [7, 0, 12, 9, 0], 8),
    "empty_first": (50, 24, 10, [0, 0, 30, 20], 32),
    "aligned": (32, 16, 16, [16, 0, 3, 13], 16),
}


@pytest.mark.parametrize("name", list(CASES))
def test_padded_kernel_path_matches_ragged_dot(name):
    """pad_grouped + kernel_grouped_matmul (custom VJP, masking) with kernels that leave NaN outside the groups
    equals `ragged_dot`: forward, dx, dw in float32 to 1e-5; rows outside every group are exactly zero."""
    m, k, n, group_sizes, align = CASES[name]
    x, w, sizes, dy = _problem(m, k, n, group_sizes, seed=len(name))
    matmul = functools.partial(gm.kernel_grouped_matmul, UNWRITTEN_TAIL_KERNELS)
    padded = functools.partial(gm.pad_grouped, matmul, align=align)
    ours = _value_and_grads(padded, x, w, sizes, dy)
    ref = _value_and_grads(jax.lax.ragged_dot, x, w, sizes, dy)
    for what, a, b in zip(("out", "dx", "dw"), ours, ref, strict=True):
        assert a.shape == b.shape and a.dtype == b.dtype, what
        np.testing.assert_allclose(np.asarray(a), np.asarray(b), rtol=1e-5, atol=1e-5, err_msg=what)
    total = sum(group_sizes)
    assert not np.asarray(ours[0])[total:].any() and not np.asarray(ours[1])[total:].any()


def test_unmasked_garbage_would_show():
    """The NaN stand-in kernels do poison the result without the row mask (so the test above can fail)."""
    x, w, sizes, _ = _problem(37, 20, 13, CASES["unaligned_tail"][3])
    assert np.isnan(np.asarray(UNWRITTEN_TAIL_KERNELS.forward(x, w, sizes))).any()


@pytest.mark.slow  # two jitted MoE layers (six ragged products) compile slowly on CPU
def test_moe_layer_uses_the_configured_implementation(monkeypatch):
    """grouped_swiglu sends its three projections through grouped_matmul with `moe_matmul`: the padded kernel path
    (CPU stand-in kernels) equals `xla` for an expert shard whose other experts' rows lie past the groups."""
    import qwen_jax.layers.moe as moe

    kx, kw, kr = jax.random.split(jax.random.key(3), 3)
    tokens, embed, hidden, experts = 11, 16, 8, 4
    x = jax.random.normal(kx, (tokens, embed))
    w_gate, w_up = jax.random.normal(kw, (2, experts - 1, embed, hidden)) * 0.3
    w_down = jax.random.normal(kr, (experts - 1, hidden, embed)) * 0.3
    _, weights, ids = moe.route(jax.random.normal(kr, (tokens, experts)), 2, True)
    layer = jax.jit(moe.grouped_swiglu, static_argnames=("first_expert", "moe_matmul"))
    want = layer(x, weights, ids, w_gate, w_up, w_down, first_expert=1, moe_matmul="xla")
    kernel_path = functools.partial(gm.pad_grouped, functools.partial(gm.kernel_grouped_matmul, UNWRITTEN_TAIL_KERNELS),
                                    align=8)
    calls = []

    def fake(a, b, group_sizes, implementation):
        calls.append(implementation)
        return kernel_path(a, b, group_sizes)

    monkeypatch.setattr(moe, "grouped_matmul", fake)
    got = layer(x, weights, ids, w_gate, w_up, w_down, first_expert=1, moe_matmul="mosaic_gpu")
    assert calls == ["mosaic_gpu"] * 3
    assert bool(jnp.any(ids == 0))  # some assignments belong to the expert outside this shard
    np.testing.assert_allclose(np.asarray(got), np.asarray(want), rtol=1e-5, atol=1e-5)


@pytest.mark.slow  # the GPU interpreter steps through the kernel's SMs and pipeline stages one by one
def test_mosaic_forward_kernel_in_gpu_interpret_mode(monkeypatch):
    """The real forward Mosaic-GPU kernel, run by Pallas' GPU interpreter on CPU (which simulates unwritten memory),
    through pad_grouped + the row mask: equals bf16 `ragged_dot` with empty first/middle groups and rows past the
    last group.  (The interpreter cannot run the gradients' transposed shared-memory reads; the GPU check covers
    them.)"""
    interpret = pytest.importorskip("jax._src.pallas.mosaic_gpu.interpret.params")
    from jax.experimental.pallas import mosaic_gpu as plgpu
    from jax.experimental.pallas.ops.gpu import ragged_dot_mgpu

    shim = type("InterpretedMosaicGPU", (), {})()
    for name in dir(plgpu):
        if not name.startswith("__"):
            setattr(shim, name, getattr(plgpu, name))
    shim.kernel = functools.partial(plgpu.kernel, interpret=interpret.InterpretGPUParams())
    monkeypatch.setattr(ragged_dot_mgpu, "plgpu", shim)
    x, w, sizes, _ = _problem(200, 100, 60, [0, 70, 0, 110], dtype=jnp.bfloat16)
    got = gm.pad_grouped(functools.partial(gm.kernel_grouped_matmul, gm.MOSAIC_KERNELS), x, w, sizes)
    want = jax.lax.ragged_dot(x, w, sizes)
    assert got.shape == want.shape and got.dtype == want.dtype
    np.testing.assert_allclose(np.asarray(got, np.float32), np.asarray(want, np.float32), rtol=1e-2, atol=1e-2)
    assert not np.asarray(got, np.float32)[180:].any()
