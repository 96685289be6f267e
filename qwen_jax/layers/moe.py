"""Mixture-of-experts feed-forward (Qwen2-MoE, Qwen3-MoE): top-k router, dropless routed experts, shared expert.

As transformers computes it: router logits -> float32 softmax -> top-k (renormalised when
`norm_topk_prob`) -> each token's output is the weighted sum of its k experts' SwiGLU outputs;
Qwen2-MoE adds a shared SwiGLU expert scaled by sigmoid(shared_expert_gate(x)).

Dropless: no capacity factor.  The N*k (token, expert) assignments are sorted by expert, the
rows gathered, and each projection is one grouped matmul (`grouped_matmul`: `ragged_dot`, or
Mosaic-GPU kernels on Hopper) over the contiguous expert groups; the outputs are un-permuted and
summed over k.  Every token is computed, whatever the load.

Expert weights are stacked `[experts, ...]` with the logical axis `experts`, which
`qwen_jax.sharding` maps to the `expert` mesh axis (expert parallelism): each device stores
and computes its own experts (`expert_parallel_swiglu`), the token rows reaching them by an
all-to-all of the routed rows (default) or an all-gather of all rows (`QwenConfig.moe_dispatch`);
an expert count the axis does not divide falls back to one grouped computation that XLA's
partitioner distributes.

The router also returns the statistics the load-balancing loss needs (per-expert top-k
counts and probability sums, the z-loss sum), so training needs no second pass over the
router logits.
"""

from __future__ import annotations

import functools
from typing import NamedTuple

import jax
import jax.numpy as jnp
from flax import nnx

from qwen_jax.config import QwenConfig
from qwen_jax.layers.common import normal, param
from qwen_jax.layers.grouped_matmul import grouped_matmul
from qwen_jax.layers.linear import Linear
from qwen_jax.layers.mlp import MLP
from qwen_jax.sharding import axis_size, constrain


class RouterStats(NamedTuple):
    """Sums over the (masked) tokens of one or more sparse layers; float32."""

    load: jax.Array  # [experts] top-k assignments per expert
    prob: jax.Array  # [experts] router probabilities per expert
    z: jax.Array  # [] sum of logsumexp(router logits)^2
    tokens: jax.Array  # [] tokens counted (per layer, summed over layers)


def route(logits, top_k: int, norm_topk_prob: bool):
    """(probabilities [n, E], top-k weights [n, k], expert ids [n, k]) from float32 router logits [n, E]."""
    probs = jax.nn.softmax(logits.astype(jnp.float32), axis=-1)
    weights, experts = jax.lax.top_k(probs, top_k)
    if norm_topk_prob:
        weights = weights / jnp.sum(weights, axis=-1, keepdims=True)
    return probs, weights, experts


def router_stats(logits, probs, experts, token_mask=None) -> RouterStats:
    """The load-balancing / z-loss sums of one layer (see `load_balancing_loss`)."""
    n, num_experts = probs.shape
    mask = jnp.ones((n,), jnp.float32) if token_mask is None else token_mask.reshape(n).astype(jnp.float32)
    one_hot = jax.nn.one_hot(experts, num_experts, dtype=jnp.float32)  # [n, k, E]
    load = jnp.einsum("nke,n->e", one_hot, mask)
    prob = jnp.einsum("ne,n->e", probs, mask)
    lse = jax.nn.logsumexp(logits.astype(jnp.float32), axis=-1)
    return RouterStats(load, prob, jnp.sum(mask * lse * lse), jnp.sum(mask))


def load_balancing_loss(stats: RouterStats, num_experts: int) -> jax.Array:
    """transformers' `load_balancing_loss_func` from summed stats: E * sum_e f_e * P_e, where f_e is the
    share of top-k assignments and P_e the mean router probability, both pooled over all sparse layers."""
    tokens = jnp.maximum(stats.tokens, 1.0)
    return num_experts * jnp.sum((stats.load / tokens) * (stats.prob / tokens))


def router_z_loss(stats: RouterStats) -> jax.Array:
    """Mean over tokens and sparse layers of logsumexp(router logits)^2 (ST-MoE's z-loss)."""
    return stats.z / jnp.maximum(stats.tokens, 1.0)


def grouped_swiglu(x, weights, experts, w_gate, w_up, w_down, first_expert=0, moe_matmul="auto"):
    """Dropless routed experts: x [n, e], weights/experts [n, k], w_gate/w_up [E, e, m], w_down [E, m, e] -> [n, e].

    Assignments are sorted by expert (stable, so equal experts keep token order) and each
    projection is one `grouped_matmul` (`moe_matmul`: its implementation) over the expert groups.
    The weights may hold only experts `first_expert .. first_expert + E - 1` (expert parallelism):
    assignments to other experts sort after every group and contribute zero.
    """
    n, k = experts.shape
    local = w_gate.shape[0]
    ids = experts - first_expert
    mine = (ids >= 0) & (ids < local)
    flat = jnp.where(mine, ids, local).reshape(-1)
    order = jnp.argsort(flat, stable=True)
    group_sizes = jnp.bincount(flat, length=local + 1)[:local].astype(jnp.int32)
    rows = jnp.take(x, order // k, axis=0)  # [n*k, e], grouped by expert
    dot = functools.partial(grouped_matmul, group_sizes=group_sizes, implementation=moe_matmul)
    h = jax.nn.silu(dot(rows, w_gate)) * dot(rows, w_up)
    out = dot(h.astype(x.dtype), w_down)
    scale = jnp.where(mine, weights, jnp.zeros_like(weights)).reshape(-1)
    out = out * jnp.take(scale, order)[:, None].astype(out.dtype)
    unsorted = jnp.take(out, jnp.argsort(order), axis=0)  # back to (token, k) order
    return jnp.sum(unsorted.reshape(n, k, -1), axis=1).astype(x.dtype)


def expert_axis_size() -> int:
    return axis_size("expert")


def all_gather_experts(x, weights, experts, w_gate, w_up, w_down, moe_matmul="auto"):
    """One `expert` shard's routed experts, all-gather dispatch (inside `expert_parallel_swiglu`'s shard_map):
    gather every token row of the axis, compute the assignments of this shard's experts (the others sort
    past the last group and count zero), reduce-scatter the partial outputs back to the token shards."""
    def gather(a):
        return jax.lax.all_gather(a, "expert", tiled=True)

    first = jax.lax.axis_index("expert") * w_gate.shape[0]
    y = grouped_swiglu(gather(x), gather(weights), gather(experts), w_gate, w_up, w_down, first_expert=first,
                       moe_matmul=moe_matmul)
    return jax.lax.psum_scatter(y, "expert", scatter_dimension=0, tiled=True)


def all_to_all_experts(x, weights, experts, w_gate, w_up, w_down, moe_matmul="auto"):
    """One `expert` shard's routed experts, all-to-all dispatch (inside `expert_parallel_swiglu`'s shard_map).

    The shard's n*k (token, expert) assignments are sorted by expert, hence by the shard that holds
    the expert, and each assignment's token row is sent to that shard only; the owner computes its
    experts over the rows it received (one `ragged_dot` per projection) and sends the outputs back
    the same way; the sender weights them and sums over k.  `jax.lax.all_to_all` exchanges equal
    blocks, so each destination's block is sized for the dropless worst case: a token has at most
    min(k, local experts) of its k distinct experts on one shard, so n * min(k, local) rows (unused
    rows are zeros with an out-of-range expert id, which `grouped_swiglu` sorts last and counts zero).
    """
    n, k = experts.shape
    size = jax.lax.axis_size("expert")
    local = w_gate.shape[0]
    block = n * min(k, local)
    flat = experts.reshape(-1)
    order = jnp.argsort(flat, stable=True)  # by expert, so by destination shard, local experts in order
    dest = flat // local
    counts = jnp.bincount(dest, length=size)
    starts = jnp.cumsum(counts) - counts
    slot = jnp.arange(block)
    used = slot[None, :] < counts[:, None]  # [size, block]
    picked = jnp.take(order, jnp.minimum(starts[:, None] + slot[None, :], n * k - 1))  # assignment per slot
    send_rows = jnp.where(used[..., None], jnp.take(x, picked // k, axis=0), jnp.zeros((), x.dtype))
    send_ids = jnp.where(used, jnp.take(flat, picked) - jnp.arange(size)[:, None] * local, local)

    def exchange(a):  # block d goes to shard d; the blocks received are stacked in source order
        return jax.lax.all_to_all(a.reshape(size * block, *a.shape[2:]), "expert", 0, 0, tiled=True)

    rows, ids = exchange(send_rows), exchange(send_ids)
    y = grouped_swiglu(rows, jnp.ones((size * block, 1), x.dtype), ids[:, None], w_gate, w_up, w_down,
                       moe_matmul=moe_matmul)
    back = exchange(y.reshape(size, block, -1))  # each output to the slot its row was sent from
    sorted_dest = jnp.take(dest, order)
    sent_from = sorted_dest * block + jnp.arange(n * k) - jnp.take(starts, sorted_dest)  # slot of sorted row j
    per_assignment = jnp.take(back, jnp.take(sent_from, jnp.argsort(order)), axis=0)  # (token, k) order
    out = per_assignment * weights.reshape(n * k, 1).astype(per_assignment.dtype)
    return jnp.sum(out.reshape(n, k, -1), axis=1).astype(x.dtype)


EXPERT_DISPATCH = {"all_to_all": all_to_all_experts, "all_gather": all_gather_experts}


def expert_parallel_swiglu(x, weights, experts, w_gate, w_up, w_down, dispatch: str, moe_matmul: str = "auto"):
    """`grouped_swiglu` with the experts split over the `expert` mesh axis: a `shard_map` manual in that
    axis only (data/fsdp/tensor stay automatic), tokens and experts split over it, each shard storing
    and computing 1/size of the experts.  `dispatch` (`QwenConfig.moe_dispatch`) picks how token rows
    reach their experts' shards: `all_to_all_experts` or `all_gather_experts`."""
    spec = jax.sharding.PartitionSpec("expert")
    local = functools.partial(EXPERT_DISPATCH[dispatch], moe_matmul=moe_matmul)
    return jax.shard_map(local, in_specs=(spec,) * 6, out_specs=spec, axis_names={"expert"},
                         check_vma=False)(x, weights, experts, w_gate, w_up, w_down)


class Experts(nnx.Module):
    """`num_experts` SwiGLU experts, stacked: gate_proj/up_proj [E, embed, m], down_proj [E, m, embed]."""

    def __init__(self, cfg: QwenConfig, *, dtype, param_dtype, rngs: nnx.Rngs):
        e, m, n = cfg.hidden_size, cfg.moe_intermediate_size, cfg.num_experts
        init = normal(cfg.initializer_range)
        self.dtype = dtype
        self.dispatch = cfg.moe_dispatch
        self.moe_matmul = cfg.moe_matmul
        self.gate_proj = param(rngs, init, (n, e, m), ("experts", "embed", "moe_mlp"), param_dtype)
        self.up_proj = param(rngs, init, (n, e, m), ("experts", "embed", "moe_mlp"), param_dtype)
        self.down_proj = param(rngs, init, (n, m, e), ("experts", "moe_mlp", "embed"), param_dtype)

    def __call__(self, x, weights, experts):
        w = [p.value.astype(self.dtype) for p in (self.gate_proj, self.up_proj, self.down_proj)]
        size = expert_axis_size()
        if size > 1 and w[0].shape[0] % size == 0 and x.shape[0] % size == 0:
            return expert_parallel_swiglu(x.astype(self.dtype), weights, experts, *w, dispatch=self.dispatch,
                                          moe_matmul=self.moe_matmul)
        return grouped_swiglu(x.astype(self.dtype), weights, experts, *w, moe_matmul=self.moe_matmul)


class SparseMoE(nnx.Module):
    """`moe(x [b, t, e], token_mask=None) -> (y [b, t, e], RouterStats)`."""

    def __init__(self, cfg: QwenConfig, *, dtype, param_dtype, rngs: nnx.Rngs):
        self.cfg = cfg
        e = cfg.hidden_size
        kw = dict(use_bias=False, init_std=cfg.initializer_range, dtype=dtype, param_dtype=param_dtype, rngs=rngs)
        self.gate = Linear((e,), (cfg.num_experts,), in_axes=("embed",), out_axes=("router",), **kw)
        self.experts = Experts(cfg, dtype=dtype, param_dtype=param_dtype, rngs=rngs)
        if cfg.shared_expert_intermediate_size:
            self.shared_expert = MLP(e, cfg.shared_expert_intermediate_size, init_std=cfg.initializer_range,
                                     dtype=dtype, param_dtype=param_dtype, rngs=rngs)
            self.shared_expert_gate = Linear((e,), (1,), in_axes=("embed",), out_axes=(None,), **kw)

    def __call__(self, x, token_mask=None):
        cfg = self.cfg
        b, t, e = x.shape
        flat = x.reshape(b * t, e)
        # router in float32 (weights and activations), whatever the compute dtype
        logits = jnp.dot(flat.astype(jnp.float32), self.gate.kernel.value.astype(jnp.float32))
        probs, weights, experts = route(logits, cfg.num_experts_per_tok, cfg.norm_topk_prob)
        y = self.experts(flat, weights.astype(x.dtype), experts).reshape(b, t, e)
        if cfg.shared_expert_intermediate_size:
            y = y + jax.nn.sigmoid(self.shared_expert_gate(x)) * self.shared_expert(x)
        stats = router_stats(logits, probs, experts, token_mask)
        return constrain(y.astype(x.dtype), ("batch", "length", "act_embed")), stats
