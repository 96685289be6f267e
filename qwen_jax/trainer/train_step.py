"""Train state, its shardings, and the jitted train step.

The train state is a plain dict pytree::

    {"params": nested dict (nnx.to_pure_dict of the model's Params), "opt_state": optax state,
     "step": int32 scalar (completed optimizer steps), "rng": uint32[2] raw PRNG key}

Parameters and AdamW moments share the parameter shardings of `qwen_jax.sharding` (fsdp and
tensor axes); everything else is replicated.  The step is `jax.jit` with explicit input and
output shardings and the state donated.  Gradient accumulation is a `lax.scan` over
microbatches inside the step; every microbatch loss is divided by the number of loss tokens
of the *whole* global batch, so accumulation only changes float summation order.
"""

from __future__ import annotations

from collections.abc import Callable

import jax
import jax.numpy as jnp
import optax
from flax import nnx
from jax.sharding import Mesh, NamedSharding, PartitionSpec

from qwen_jax import sharding as sh
from qwen_jax.config import QwenConfig
from qwen_jax.hf_io import abstract_model
from qwen_jax.model import Qwen
from qwen_jax.trainer.loss import model_loss_sums
from qwen_jax.trainer.optimizer import FreezeSpec, apply_freeze, path_str

BATCH_KEYS = ("input_ids", "positions", "segment_ids", "targets", "loss_mask")
NONFINITE_MODES = ("stop", "skip")  # what a step with a non-finite loss / gradient norm / learning rate does


def param_shardings(cfg: QwenConfig, mesh: Mesh):
    """(graphdef, abstract params pure dict, NamedSharding pure dict) without allocating anything."""
    graphdef, abstract = abstract_model(cfg)
    shardings = nnx.to_pure_dict(sh.state_shardings(abstract, mesh))
    return graphdef, nnx.to_pure_dict(abstract), shardings


def init_params(cfg: QwenConfig, seed: int, shardings):
    """Random init straight into the parameter shardings (no full copy on one device)."""
    def make():
        return nnx.to_pure_dict(nnx.state(Qwen(cfg, rngs=nnx.Rngs(seed)), nnx.Param))

    return jax.jit(make, out_shardings=shardings)()


def replicated(mesh: Mesh) -> NamedSharding:
    return NamedSharding(mesh, PartitionSpec())


def state_shardings(tx: optax.GradientTransformation, abstract_params, p_shardings, mesh: Mesh) -> dict:
    """Shardings of the whole train state: optimizer moments follow their parameter, the rest is replicated."""
    abstract_opt = jax.eval_shape(tx.init, abstract_params)
    rep = replicated(mesh)
    flat_sh = {path_str(p): s for p, s in jax.tree_util.tree_leaves_with_path(p_shardings)}
    flat_shape = {path_str(p): a.shape for p, a in jax.tree_util.tree_leaves_with_path(abstract_params)}

    def one(path, leaf):
        # an optimizer leaf shaped like a parameter sits under that parameter's dict keys
        keys = "/".join(str(k.key) for k in path if isinstance(k, jax.tree_util.DictKey))
        for name, s in flat_sh.items():
            if (keys == name or keys.endswith("/" + name)) and flat_shape[name] == leaf.shape:
                return s
        return rep

    opt_sh = jax.tree_util.tree_map_with_path(one, abstract_opt)
    return {"params": p_shardings, "opt_state": opt_sh, "step": rep, "rng": rep}


def abstract_state(tx, abstract_params, shardings) -> dict:
    """ShapeDtypeStructs (with shardings) of the train state: the restore target."""
    abstract = {
        "params": abstract_params,
        "opt_state": jax.eval_shape(tx.init, abstract_params),
        "step": jax.ShapeDtypeStruct((), jnp.int32),
        "rng": jax.ShapeDtypeStruct((2,), jnp.uint32),
    }
    return jax.tree.map(lambda a, s: jax.ShapeDtypeStruct(a.shape, a.dtype, sharding=s), abstract, shardings)


def init_state(params, tx, seed: int, shardings) -> dict:
    def make(p):
        return {"params": p, "opt_state": tx.init(p), "step": jnp.zeros((), jnp.int32),
                "rng": jax.random.PRNGKey(seed + 1)}

    return jax.jit(make, out_shardings=shardings)(params)


def batch_shardings(mesh: Mesh, global_batch: int, seq_len: int, keys=BATCH_KEYS) -> dict:
    """Input shardings of the batch arrays; `positions`/`segment_ids` may be left out (one document per row)."""
    s = sh.batch_sharding(mesh, 2, (global_batch, seq_len))
    return {k: s for k in keys}


def permute_batch_for_ring(batch: dict, ring: int) -> dict:
    """Zig-zag order for ring attention over `ring` devices: all batch arrays permuted together.

    Targets are already the shifted next tokens (the pipeline shifts them), so permuting every
    array with the same index keeps each (token, position, segment, target, mask) row intact and
    gives every device of the ring the same causal work.
    """
    if ring <= 1:
        return batch
    from qwen_jax.attention.ring import to_zigzag

    return {k: (to_zigzag(v, ring, axis=1) if k in BATCH_KEYS else v) for k, v in batch.items()}


def make_train_step(graphdef, tx: optax.GradientTransformation, schedule: optax.Schedule, freeze: FreezeSpec, *,
                    mesh: Mesh, state_sh: dict, batch_sh: dict, chunk_size: int = 1024, z_loss: float = 0.0,
                    grad_accum_steps: int = 1, zigzag: bool = False, nonfinite: str = "stop") -> Callable:
    """`step(state, batch) -> (state, metrics)`, jitted, state donated.

    `zigzag`: batches arrive in ring attention's zig-zag order (see `permute_batch_for_ring`).
    `nonfinite`: metrics always carry `finite` (1.0 when loss, gradient norm and learning rate are
    finite).  "stop" applies every update (the launcher stops before saving a non-finite state);
    "skip" keeps params and optimizer state unchanged on a non-finite step, decided on the device so
    the host never waits for it.
    """
    if nonfinite not in NONFINITE_MODES:
        raise ValueError(f"nonfinite must be one of {NONFINITE_MODES}, got {nonfinite!r}")
    accum = int(grad_accum_steps)

    def loss_fn(params, batch, denom):
        model = nnx.merge(graphdef, params)
        objective, nll, z = model_loss_sums(model, batch, chunk_size=chunk_size, zigzag=zigzag, z_weight=z_loss)
        return objective / denom, (nll, z)  # objective = nll + z_loss * z; nll, z carry no gradient

    grad_fn = jax.value_and_grad(loss_fn, has_aux=True)

    def step(state, batch):
        params = state["params"]
        batch = {k: batch[k] for k in BATCH_KEYS if k in batch}
        denom = jnp.maximum(jnp.sum(batch["loss_mask"].astype(jnp.float32)), 1.0)
        if accum == 1:
            (_, (nll, z)), grads = grad_fn(params, batch, denom)
        else:
            b = batch["input_ids"].shape[0]
            # microbatch i = rows i, i + accum, ...: every device keeps its own rows
            micro = jax.tree.map(lambda x: x.reshape(b // accum, accum, *x.shape[1:]).swapaxes(0, 1), batch)

            def body(carry, mb):
                g_acc, nll_acc, z_acc = carry
                mb = {k: sh.constrain(v, ("batch", "length")) for k, v in mb.items()}
                (_, (nll, z)), g = grad_fn(params, mb, denom)
                return (jax.tree.map(jnp.add, g_acc, g), nll_acc + nll, z_acc + z), None

            zero = jnp.zeros((), jnp.float32)
            g0 = jax.tree.map(jnp.zeros_like, params)
            (grads, nll, z), _ = jax.lax.scan(body, (g0, zero, zero), micro)
        grad_norm = optax.global_norm(apply_freeze(grads, freeze))
        updates, opt_state = tx.update(grads, state["opt_state"], params)
        new_params = optax.apply_updates(params, updates)
        new_params = jax.tree.map(lambda n, p: n.astype(p.dtype), new_params, params)
        rng, _ = jax.random.split(state["rng"])
        lr = schedule(state["step"])
        finite = jnp.isfinite(nll) & jnp.isfinite(z) & jnp.isfinite(grad_norm) & jnp.isfinite(lr)
        if nonfinite == "skip":
            new_params, opt_state = jax.tree.map(lambda new, old: jnp.where(finite, new, old),
                                                 (new_params, opt_state), (params, state["opt_state"]))
        new_state = {"params": new_params, "opt_state": opt_state, "step": state["step"] + 1, "rng": rng}
        metrics = {"loss": nll / denom, "z_loss": z / denom, "grad_norm": grad_norm,
                   "learning_rate": lr, "loss_tokens": denom, "finite": finite.astype(jnp.float32)}
        return new_state, metrics

    jitted = jax.jit(step, in_shardings=(state_sh, batch_sh), out_shardings=(state_sh, replicated(mesh)),
                     donate_argnums=(0,))

    def run(state, batch):
        with jax.set_mesh(mesh):
            return jitted(state, batch)

    run.jitted = jitted
    return run
