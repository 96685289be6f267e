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

from qwen_jax import lora as lora_lib
from qwen_jax import sharding as sh
from qwen_jax.config import QwenConfig
from qwen_jax.hf.models import abstract_model
from qwen_jax.layers.moe import load_balancing_loss, router_z_loss
from qwen_jax.model import Qwen
from qwen_jax.trainer.loss import model_loss_sums
from qwen_jax.trainer.optimizer import ALL, FreezeSpec, apply_freeze, path_str

BATCH_KEYS = ("input_ids", "positions", "segment_ids", "targets", "loss_mask")
# one document per row: positions are 0..seq-1 and there are no segments (ring attention's zig-zag
# order still needs the positions: `full_row_keys`)
FULL_ROW_KEYS = ("input_ids", "targets", "loss_mask")
ROUTER_METRICS = ("router_aux_loss", "router_z_loss")  # mixture-of-experts models only
NONFINITE_MODES = ("stop", "skip")  # what a step with a non-finite loss / gradient norm / learning rate does


def param_shardings(cfg: QwenConfig, mesh: Mesh, lora: lora_lib.LoraSpec | None = None):
    """(graphdef, abstract params pure dict, NamedSharding pure dict) without allocating anything.

    With `lora`, the model has adapters on the targeted projections (`qwen_jax.lora`).
    """
    graphdef, abstract = abstract_model(cfg) if lora is None else lora_lib.abstract_model(cfg, lora)[:2]
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
    """The train state around `params`, which it takes over: they are donated, so the parameters
    are never held twice (a bf16 7B base would otherwise peak at twice its 14 GiB during init)."""
    def make(p):
        return {"params": p, "opt_state": tx.init(p), "step": jnp.zeros((), jnp.int32),
                "rng": jax.random.PRNGKey(seed + 1)}

    return jax.jit(make, out_shardings=shardings, donate_argnums=0)(params)


def full_row_keys(ring: int) -> tuple[str, ...]:
    """The batch keys of one-document rows: FULL_ROW_KEYS, plus positions under ring attention."""
    return FULL_ROW_KEYS + (("positions",) if ring > 1 else ())


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
                    grad_accum_steps: int = 1, zigzag: bool = False,
                    dropout_keys: Callable | None = None, router_z_loss_weight: float = 0.0,
                    nonfinite: str = "stop") -> Callable:
    """`step(state, batch) -> (state, metrics)`, jitted, state donated.

    `zigzag`: batches arrive in ring attention's zig-zag order (see `permute_batch_for_ring`).
    Wholly frozen parameters (FreezeSpec ALL, e.g. a LoRA base) are not differentiated and pass
    through the step untouched (bit-identical, aliased by donation).  `dropout_keys(rng)` gives the
    extra nnx state the model's dropout reads (LoRA dropout), fresh from the step's rng per microbatch.
    Mixture-of-experts models add `router_aux_loss_coef` (config) x the load-balancing loss and
    `router_z_loss_weight` x the router z-loss, each computed per microbatch over its tokens
    (segment id > 0) and averaged over the microbatches; both are logged.
    `nonfinite`: metrics always carry `finite` (1.0 when loss, gradient norm and learning rate are
    finite).  "stop" applies every update (the launcher stops before saving a non-finite state);
    "skip" keeps the trainable params and optimizer state unchanged on a non-finite step, decided on
    the device so the host never waits for it.
    """
    if nonfinite not in NONFINITE_MODES:
        raise ValueError(f"nonfinite must be one of {NONFINITE_MODES}, got {nonfinite!r}")
    accum = int(grad_accum_steps)
    frozen_whole = {p for p, n in freeze.frozen.items() if n == ALL}
    trainable_path = lambda p: p not in frozen_whole  # noqa: E731

    def loss_fn(trainable, frozen, batch, denom, key):
        params = lora_lib.combine(trainable, frozen)
        extra = (dropout_keys(key),) if dropout_keys is not None else ()
        model = nnx.merge(graphdef, params, *extra)
        if not model.cfg.is_moe:
            objective, nll, z = model_loss_sums(model, batch, chunk_size=chunk_size, zigzag=zigzag, z_weight=z_loss)
            return objective / denom, (nll, z, {})  # objective = nll + z_loss * z; nll, z carry no gradient
        objective, nll, z, stats = model_loss_sums(model, batch, chunk_size=chunk_size, zigzag=zigzag,
                                                   z_weight=z_loss, with_router=True)
        router = dict(zip(ROUTER_METRICS, (load_balancing_loss(stats, model.cfg.num_experts), router_z_loss(stats)),
                          strict=True))
        router_objective = (model.cfg.router_aux_loss_coef * router["router_aux_loss"]
                            + router_z_loss_weight * router["router_z_loss"])
        router = jax.tree.map(lambda v: jax.lax.stop_gradient(v) / accum, router)
        return objective / denom + router_objective / accum, (nll, z, router)

    grad_fn = jax.value_and_grad(loss_fn, has_aux=True)

    def step(state, batch):
        params = state["params"]
        trainable, frozen = lora_lib.partition(params, trainable_path)
        rng, step_key = jax.random.split(state["rng"])
        batch = {k: batch[k] for k in BATCH_KEYS if k in batch}
        denom = jnp.maximum(jnp.sum(batch["loss_mask"].astype(jnp.float32)), 1.0)
        if accum == 1:
            (_, (nll, z, router)), grads = grad_fn(trainable, frozen, batch, denom, step_key)
        else:
            b = batch["input_ids"].shape[0]
            # microbatch i = rows i, i + accum, ...: every device keeps its own rows
            micro = jax.tree.map(lambda x: x.reshape(b // accum, accum, *x.shape[1:]).swapaxes(0, 1), batch)

            def body(carry, xs):
                g_acc, nll_acc, z_acc, router_acc = carry
                mb, i = xs
                mb = {k: sh.constrain(v, ("batch", "length")) for k, v in mb.items()}
                (_, (nll, z, router)), g = grad_fn(trainable, frozen, mb, denom, jax.random.fold_in(step_key, i))
                return (jax.tree.map(jnp.add, g_acc, g), nll_acc + nll, z_acc + z,
                        jax.tree.map(jnp.add, router_acc, router)), None

            zero = jnp.zeros((), jnp.float32)
            g0 = jax.tree.map(jnp.zeros_like, trainable)
            # the router metrics' structure ({} for dense models), from an abstract evaluation (no arrays built)
            first = jax.tree.map(lambda x: x[0], micro)
            router_shapes = jax.eval_shape(loss_fn, trainable, frozen, first, denom, step_key)[1][2]
            router0 = jax.tree.map(lambda x: jnp.zeros(x.shape, x.dtype), router_shapes)
            (grads, nll, z, router), _ = jax.lax.scan(body, (g0, zero, zero, router0), (micro, jnp.arange(accum)))
        # frozen leaves: zero gradients that nothing reads (the optimizer gives them no state)
        grads = lora_lib.combine(grads, jax.tree.map(jnp.zeros_like, frozen))
        grad_norm = optax.global_norm(apply_freeze(grads, freeze))
        updates, opt_state = tx.update(grads, state["opt_state"], params)
        new_trainable = optax.apply_updates(trainable, lora_lib.partition(updates, trainable_path)[0])
        new_trainable = jax.tree.map(lambda n, p: n.astype(p.dtype), new_trainable, trainable)
        lr = schedule(state["step"])
        finite = jnp.isfinite(nll) & jnp.isfinite(z) & jnp.isfinite(grad_norm) & jnp.isfinite(lr)
        if nonfinite == "skip":
            new_trainable, opt_state = jax.tree.map(lambda new, old: jnp.where(finite, new, old),
                                                    (new_trainable, opt_state), (trainable, state["opt_state"]))
        new_params = lora_lib.combine(new_trainable, frozen)
        new_state = {"params": new_params, "opt_state": opt_state, "step": state["step"] + 1, "rng": rng}
        metrics = {"loss": nll / denom, "z_loss": z / denom, "grad_norm": grad_norm, "learning_rate": lr,
                   "loss_tokens": denom, "finite": finite.astype(jnp.float32), **router}
        return new_state, metrics

    jitted = jax.jit(step, in_shardings=(state_sh, batch_sh), out_shardings=(state_sh, replicated(mesh)),
                     donate_argnums=(0,))

    def run(state, batch):
        with jax.set_mesh(mesh):
            return jitted(state, batch)

    run.jitted, run.mesh = jitted, mesh
    return run
