"""Device mesh and the one table that maps logical axes to mesh axes.

Modules name *logical* axes (`embed`, `heads`, `mlp`, `vocab`, `batch`, `length`, ...) as
parameter metadata (`nnx.Param(..., axes=(...))`) and in activation constraints; only this
file knows the mesh axes `data`, `fsdp`, `expert`, `tensor`, `seq`.  `expert` shards the
stacked experts of mixture-of-experts layers (expert parallelism) and, like `data` and
`fsdp`, the batch.  A mesh axis is dropped for a
dimension it does not divide (e.g. 2 kv heads on a tensor axis of 4 are replicated), so
every preset runs on every mesh shape.

The mesh uses `AxisType.Auto` (GSPMD-style propagation): shardings are explicit at jit
boundaries and at a few constraints inside the model, and XLA propagates the rest.
"""

from __future__ import annotations

import math
from collections.abc import Sequence

import jax
from jax.sharding import AxisType, Mesh, NamedSharding, PartitionSpec

MESH_AXES = ("data", "fsdp", "expert", "tensor", "seq")

# logical axis -> mesh axis (or tuple of mesh axes, or None = replicated).
LOGICAL_RULES: dict[str, str | tuple[str, ...] | None] = {
    # parameters
    "vocab": "tensor",
    "embed": "fsdp",
    "heads": "tensor",
    "kv_heads": "tensor",
    "head_dim": None,
    "mlp": "tensor",
    "norm": None,
    "layers": None,
    "experts": "expert",
    "moe_mlp": "tensor",
    "router": None,
    # activations
    "batch": ("data", "fsdp", "expert"),
    "length": "seq",
    "act_embed": None,
    "act_heads": "tensor",
    "act_kv_heads": "tensor",
    "act_mlp": "tensor",
    "act_vocab": "tensor",
}


def mesh_sizes(shape: dict[str, int] | Sequence[int], num_devices: int) -> dict[str, int]:
    """{axis: size} over (data, fsdp, expert, tensor, seq) for `num_devices`; one size may be -1 (the rest).

    Pure (no devices needed), so a launcher can check a mesh before it touches anything."""
    if isinstance(shape, dict):
        unknown = sorted(set(shape) - set(MESH_AXES))
        if unknown:
            raise ValueError(f"unknown mesh axes {unknown}; valid: {MESH_AXES}")
        sizes = [int(shape.get(a, 1)) for a in MESH_AXES]
    else:
        sizes = [int(s) for s in shape]
        if len(sizes) != len(MESH_AXES):
            raise ValueError(f"mesh shape needs {len(MESH_AXES)} sizes {MESH_AXES}, got {sizes}")
    if sizes.count(-1) > 1:
        raise ValueError(f"at most one mesh axis may be -1, got {dict(zip(MESH_AXES, sizes, strict=True))}")
    if -1 in sizes:
        rest = math.prod(s for s in sizes if s != -1)
        if rest <= 0 or num_devices % rest:
            raise ValueError(f"mesh {dict(zip(MESH_AXES, sizes, strict=True))} does not divide {num_devices} devices")
        sizes[sizes.index(-1)] = num_devices // rest
    if any(s <= 0 for s in sizes) or math.prod(sizes) != num_devices:
        raise ValueError(
            f"mesh {dict(zip(MESH_AXES, sizes, strict=True))} needs {math.prod(sizes)} devices, "
            f"{num_devices} available"
        )
    return dict(zip(MESH_AXES, sizes, strict=True))


def axis_size(name: str, mesh=None) -> int:
    """Size of mesh axis `name` (e.g. `seq`: the ring attention's ring); 1 without a mesh or without that axis.

    `mesh`: default the mesh set with `jax.set_mesh` (abstract inside jit)."""
    if mesh is None:
        mesh = jax.sharding.get_abstract_mesh()
    return 1 if mesh is None or mesh.empty or name not in mesh.axis_names else int(mesh.shape[name])


def make_mesh(shape: dict[str, int] | Sequence[int], devices=None) -> Mesh:
    """A mesh with axes (data, fsdp, expert, tensor, seq); one size may be -1 (the rest of the devices)."""
    devices = list(jax.devices() if devices is None else devices)
    sizes = tuple(mesh_sizes(shape, len(devices)).values())
    return jax.make_mesh(sizes, MESH_AXES, axis_types=(AxisType.Auto,) * len(MESH_AXES), devices=devices)


def logical_to_spec(axes: Sequence[str | None], shape: Sequence[int] | None = None,
                    mesh: Mesh | None = None, rules: dict | None = None) -> PartitionSpec:
    """PartitionSpec for logical `axes`; with `shape` and `mesh`, mesh axes that do not divide are dropped."""
    rules = LOGICAL_RULES if rules is None else rules
    used: set[str] = set()
    spec = []
    for i, name in enumerate(axes):
        target = rules.get(name) if name is not None else None
        targets = () if target is None else (target,) if isinstance(target, str) else tuple(target)
        kept = []
        for t in targets:
            if t in used or (mesh is not None and t not in mesh.shape):
                continue
            size = mesh.shape[t] if mesh is not None else 1
            if shape is not None and mesh is not None:
                divisor = size * math.prod(mesh.shape[k] for k in kept)
                if shape[i] % divisor:
                    continue
            kept.append(t)
        used.update(kept)
        spec.append(None if not kept else kept[0] if len(kept) == 1 else tuple(kept))
    return PartitionSpec(*spec)


def param_axes(path: tuple, value) -> tuple:
    """Logical axes of a parameter from its `axes` metadata; stacked layers get a leading 'layers'."""
    axes = tuple(value.get_metadata().get("axes", ()))
    ndim = len(value.shape)
    if ndim == len(axes) + 1:
        axes = ("layers",) + axes
    if len(axes) != ndim:
        raise ValueError(f"parameter {'/'.join(map(str, path))}: axes {axes} do not match shape {value.shape}")
    return axes


def state_shardings(state, mesh: Mesh):
    """NamedSharding for every Variable in an nnx.State (abstract or concrete)."""
    from flax import nnx

    def one(path, variable):
        axes = param_axes(path, variable)
        return NamedSharding(mesh, logical_to_spec(axes, variable.shape, mesh))

    return nnx.map_state(one, state) if hasattr(nnx, "map_state") else jax.tree_util.tree_map_with_path(
        lambda p, v: one(p, v), state, is_leaf=lambda x: isinstance(x, nnx.Variable))


def constrain(x, axes: Sequence[str | None]):
    """with_sharding_constraint on logical axes when a mesh is set (jax.set_mesh); a no-op otherwise."""
    mesh = jax.sharding.get_abstract_mesh()
    if mesh.empty:
        return x
    return jax.lax.with_sharding_constraint(x, logical_to_spec(axes, x.shape, mesh))


def batch_sharding(mesh: Mesh, ndim: int = 2, shape=None) -> NamedSharding:
    """Sharding of a [batch, seq, ...] input: batch over (data, fsdp, expert), seq over seq."""
    axes = ("batch", "length") + (None,) * (ndim - 2)
    return NamedSharding(mesh, logical_to_spec(axes, shape, mesh))

