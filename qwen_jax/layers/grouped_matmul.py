"""Grouped matmul of the MoE experts: `out[i] = x[i] @ w[group(i)]`, rows sorted by group.

`grouped_matmul(x [m, k], w [g, k, n], group_sizes [g]) -> [m, n]`; rows past `sum(group_sizes)`
belong to no group and come out zero (the expert-parallel path puts the rows routed to other
devices there).  Implementations (`model.moe_matmul`):

* `xla`: `jax.lax.ragged_dot` and XLA's own transposes for the gradients.  XLA's GPU backend
  lowers it densely (every row against every expert), which costs `g` times the FLOPs and
  memory of the real work: at Qwen3-30B-A3B's shape a train step runs out of memory.
* `mosaic_gpu`: JAX's Pallas Mosaic-GPU kernels for Hopper, which visit only the row blocks of
  each group (`jax.experimental.pallas.ops.gpu`): forward `ragged_dot_mgpu.ragged_dot`; the
  input gradient is the same kernel with the weights read transposed (`dy @ w[g]^T`); the weight
  gradient is `transposed_ragged_dot_mgpu.transposed_ragged_dot` (`x_g^T @ dy_g` per group, an
  empty group gets zeros).  A `jax.custom_vjp` ties them together.  The kernels take 16-bit
  inputs (bf16/fp16, float32 is cast to bf16) and accumulate in float32 on the tensor cores.
* `auto`: `mosaic_gpu` on a Hopper GPU (compute capability 9.x) for 16-bit inputs when no
  automatically partitioned mesh axis is larger than 1 (the kernels have no partitioning rule,
  so the partitioner would gather their operands), `xla` otherwise.

Kernel shape constraints (`KERNEL_ALIGN`): the forward kernel needs k a multiple of block_k and
n of block_n, the weight-gradient kernel rows a multiple of its block_k and k, n of its
block_m/block_n, and the last row block must lie inside the array.  `pad_grouped` pads rows, k
and n with zeros up to one common multiple: zero k columns add nothing to the dot product, zero
n columns are sliced off, and padded rows go *after* every group (not into the last group or a
dummy group: `group_sizes` stays as given), so no kernel visits them.  The kernels leave rows
outside every group unwritten, so the forward output and the input gradient are masked there
(`zero_rows_outside_groups`).
"""

from __future__ import annotations

import functools
from typing import NamedTuple

import jax
import jax.numpy as jnp
import numpy as np

from qwen_jax.config import MOE_MATMUL_IMPLS

KERNEL_ALIGN = 128  # a multiple of every block size below, for rows, k and n
# Block sizes as in the kernels' own `main()` sweeps (bf16, 128x128 output tiles, 64-deep k steps);
# 4 pipeline stages of (128x64 + 64x128) bf16 tiles use 128 KiB of the H100/H200's 227 KiB shared memory.
FORWARD_BLOCKS = dict(block_m=128, block_n=128, block_k=64, max_concurrent_steps=4, grid_block_n=1)
WEIGHT_GRAD_BLOCKS = dict(block_m=128, block_n=128, block_k=64, max_concurrent_steps=4, grid_block_n=1)


class GroupedKernels(NamedTuple):
    """The three products of a grouped matmul and its gradients, each free to leave rows outside every group
    unwritten (garbage): `forward(x, w, sizes) -> [m, n]`, `input_grad(dy, w, sizes) -> dy @ w[g]^T [m, k]`,
    `weight_grad(x, dy, sizes) -> x_g^T @ dy_g [g, k, n]`."""

    forward: object
    input_grad: object
    weight_grad: object


def xla_weight_grad(x, dy, group_sizes):
    """`x_g^T @ dy_g` for every group through `ragged_dot_general` (the form of XLA's own transpose)."""
    dims = jax.lax.RaggedDotDimensionNumbers(dot_dimension_numbers=(((0,), (0,)), ((), ())),
                                             lhs_ragged_dimensions=[0], rhs_group_dimensions=[])
    return jax.lax.ragged_dot_general(x, dy, group_sizes, dims)


XLA_KERNELS = GroupedKernels(
    forward=jax.lax.ragged_dot,
    input_grad=lambda dy, w, sizes: jax.lax.ragged_dot(dy, jnp.swapaxes(w, 1, 2), sizes),
    weight_grad=xla_weight_grad,
)


def mosaic_forward(x, w, group_sizes):
    from jax.experimental.pallas.ops.gpu import ragged_dot_mgpu
    return ragged_dot_mgpu.ragged_dot(x, w, group_sizes=group_sizes, **FORWARD_BLOCKS)


def mosaic_input_grad(dy, w, group_sizes):
    from jax.experimental.pallas.ops.gpu import ragged_dot_mgpu
    return ragged_dot_mgpu.ragged_dot(dy, w, group_sizes=group_sizes, transpose_rhs=True, **FORWARD_BLOCKS)


def mosaic_weight_grad(x, dy, group_sizes):
    from jax.experimental.pallas.ops.gpu import transposed_ragged_dot_mgpu
    # as JAX's own test of this kernel: its dynamic grid needs standard promotion (Python ints vs int32)
    with jax.numpy_dtype_promotion("standard"):
        return transposed_ragged_dot_mgpu.transposed_ragged_dot(x, dy, group_sizes=group_sizes,
                                                                **WEIGHT_GRAD_BLOCKS)


MOSAIC_KERNELS = GroupedKernels(forward=mosaic_forward, input_grad=mosaic_input_grad, weight_grad=mosaic_weight_grad)


def zero_rows_outside_groups(a, group_sizes):
    """`a [m, ...]` with the rows at or past `sum(group_sizes)` set to zero (a select, so garbage there,
    NaN included, does not leak)."""
    rows = jax.lax.broadcasted_iota(jnp.int32, a.shape, 0)
    return jnp.where(rows < jnp.sum(group_sizes), a, jnp.zeros((), a.dtype))


@functools.partial(jax.custom_vjp, nondiff_argnums=(0,))
def kernel_grouped_matmul(kernels: GroupedKernels, x, w, group_sizes):
    """`grouped_matmul` through `kernels` on shapes the kernels accept (see `pad_grouped`)."""
    return zero_rows_outside_groups(kernels.forward(x, w, group_sizes), group_sizes)


def _kernel_fwd(kernels, x, w, group_sizes):
    return kernel_grouped_matmul(kernels, x, w, group_sizes), (x, w, group_sizes)


def _kernel_bwd(kernels, residuals, dy):
    x, w, group_sizes = residuals
    dy = dy.astype(x.dtype)
    dx = zero_rows_outside_groups(kernels.input_grad(dy, w, group_sizes), group_sizes)
    dw = kernels.weight_grad(x, dy, group_sizes)
    return dx.astype(x.dtype), dw.astype(w.dtype), None


kernel_grouped_matmul.defvjp(_kernel_fwd, _kernel_bwd)


def round_up(size: int, multiple: int) -> int:
    return -(-size // multiple) * multiple


def pad_grouped(matmul, x, w, group_sizes, *, align: int = KERNEL_ALIGN):
    """`matmul(x, w, group_sizes)` on x/w zero-padded so rows, k and n are multiples of `align`, the result
    cut back to [m, n].  Padded rows lie after every group and `group_sizes` is unchanged; differentiable
    (the pads and the slice transpose into the gradients' un-padding)."""
    m, k = x.shape
    n = w.shape[2]
    pm, pk, pn = round_up(m, align), round_up(k, align), round_up(n, align)
    if (pm, pk) != (m, k):
        x = jnp.pad(x, ((0, pm - m), (0, pk - k)))
    if (pk, pn) != (k, n):  # the weights are copied only when k or n is unaligned
        w = jnp.pad(w, ((0, 0), (0, pk - k), (0, pn - n)))
    return matmul(x, w, group_sizes)[:m, :n]


def is_hopper(device=None) -> bool:
    """A GPU of compute capability 9.x (H100/H200), where the Mosaic-GPU kernels (wgmma) run."""
    device = device or jax.devices()[0]
    capability = getattr(device, "compute_capability", None)
    return device.platform == "gpu" and capability is not None and str(capability).split(".")[0] == "9"


def partitioned_axes_size() -> int:
    """Product of the sizes of the current mesh's automatically partitioned axes (1 outside a mesh)."""
    mesh = jax.sharding.get_abstract_mesh()
    if mesh.empty:
        return 1
    manual = set(mesh.manual_axes)
    sizes = dict(zip(mesh.axis_names, mesh.axis_sizes, strict=True))
    return int(np.prod([size for name, size in sizes.items() if name not in manual]))


def resolve_implementation(implementation: str, dtype) -> str:
    """`auto` -> `mosaic_gpu` or `xla` (module docstring); other names are checked and returned."""
    if implementation not in MOE_MATMUL_IMPLS:
        raise ValueError(f"moe_matmul must be one of {MOE_MATMUL_IMPLS}, got {implementation!r}")
    if implementation != "auto":
        return implementation
    half = jnp.issubdtype(dtype, jnp.floating) and jnp.dtype(dtype).itemsize == 2
    return "mosaic_gpu" if half and is_hopper() and partitioned_axes_size() == 1 else "xla"


def grouped_matmul(x, w, group_sizes, *, implementation: str = "auto"):
    """x [m, k] @ w[group] [g, k, n] -> [m, n] in the dtype of x and w; rows past sum(group_sizes) are zero."""
    implementation = resolve_implementation(implementation, jnp.result_type(x, w))
    if implementation == "xla":
        return jax.lax.ragged_dot(x, w, group_sizes)
    if not is_hopper():
        raise ValueError(f"moe_matmul='mosaic_gpu' needs a Hopper GPU (compute capability 9.x), "
                         f"not {jax.devices()[0].device_kind}")
    out_dtype = jnp.result_type(x, w)
    kernel_dtype = out_dtype if out_dtype in (jnp.bfloat16, jnp.float16) else jnp.bfloat16
    matmul = functools.partial(kernel_grouped_matmul, MOSAIC_KERNELS)
    out = pad_grouped(matmul, x.astype(kernel_dtype), w.astype(kernel_dtype), group_sizes.astype(jnp.int32))
    return out.astype(out_dtype)
