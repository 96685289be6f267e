"""The Qwen2 / Qwen2.5 / Qwen3 decoder in Flax NNX.

Why NNX: it is Flax's current API; parameters are plain attributes whose paths mirror the
Hugging Face names (one table in `hf/names.py` maps them), and `nnx.split`/`nnx.merge` give a
pure (graphdef, state) view for jit, sharding and Orbax.

Decoder layers are *stacked*: every layer parameter has a leading `layers` axis.  One
parameter tree therefore serves both execution modes, `scan_layers=True` (lax.scan: one
layer compiled once, fast compiles for deep models) and `scan_layers=False` (unrolled),
and training, conversion and checkpoints all share it.  Layers of different attention
kinds (full vs sliding window) run as separate consecutive scans.
"""

from __future__ import annotations

import dataclasses
import functools
import itertools
import math

import jax
import jax.numpy as jnp
from flax import nnx
from jax.ad_checkpoint import checkpoint_name

from qwen_jax import rope as rope_lib
from qwen_jax.attention import DcaContext
from qwen_jax.config import QwenConfig
from qwen_jax.kv_cache import KVCache
from qwen_jax.layers.attention import ATTENTION_NAMES, Attention
from qwen_jax.layers.embedding import Embed
from qwen_jax.layers.linear import Linear
from qwen_jax.layers.mlp import MLP
from qwen_jax.layers.moe import RouterStats, SparseMoE
from qwen_jax.layers.normalization import RMSNorm
from qwen_jax.sharding import axis_size, constrain

ATTENTION_RESIDUAL = "attention_residual"  # checkpoint name of x + attention(x), the MLP block's input

# `model.remat` -> what a decoder layer keeps for the backward pass (the rest is recomputed there).
# save_attention keeps the attention block's projections, output and residual (ATTENTION_NAMES,
# about 3.3 x [seq, embed] per layer for Qwen2-7B) and recomputes only norms, RoPE, the attention kernel's forward
# and the MLP's gate/up matmuls, whose [seq, intermediate] outputs are the largest activations.
REMAT_POLICIES = {
    "full": jax.checkpoint_policies.nothing_saveable,
    "dots": jax.checkpoint_policies.checkpoint_dots,
    "dots_no_batch": jax.checkpoint_policies.checkpoint_dots_with_no_batch_dims,
    "save_attention": jax.checkpoint_policies.save_only_these_names(*ATTENTION_NAMES, ATTENTION_RESIDUAL),
}


def unstack_layers(stacked) -> list:
    """The per-layer trees of a stacked tree (leaves `[num_layers, ...]`): `out[i]` holds `leaf[i]`.

    Why a custom VJP: autodiff of `num_layers` slices `a[i]` gives each layer's cotangent
    zero-padded to the whole stack and sums the padded arrays, so every gradient element of a
    stacked parameter is assembled from `num_layers` operands in one memory-bound pass.  The
    backward here is one `jnp.stack` (a concatenate) of the per-layer cotangents, which XLA
    fuses into the consumers (gradient norm, optimizer update).  Same values, exactly.  Being a
    custom VJP, it has no forward-mode rule: `jax.jvp` / `jax.jacfwd` of an unrolled model fail
    (use `scan_layers=True` for forward-mode differentiation).  One custom VJP per leaf: a leaf
    that is not differentiated (a frozen LoRA base) gives slices that are not differentiated
    either, so no weight gradient is ever traced for it.
    """
    sizes = {a.shape[0] for a in jax.tree.leaves(stacked)}
    if len(sizes) != 1:
        raise ValueError(f"unstack_layers: leaves disagree on the leading (layer) axis: sizes {sorted(sizes)}")
    leaves, treedef = jax.tree.flatten(stacked)
    per_leaf = [_unstack_array(a) for a in leaves]
    return [jax.tree.unflatten(treedef, [slices[i] for slices in per_leaf]) for i in range(sizes.pop())]


@jax.custom_vjp
def _unstack_array(a) -> tuple:
    return tuple(a[i] for i in range(a.shape[0]))


def _unstack_fwd(a):
    return _unstack_array(a), None


def _unstack_bwd(_, cotangents):
    return (jnp.stack(cotangents),)


_unstack_array.defvjp(_unstack_fwd, _unstack_bwd)


def ring_size(cfg: QwenConfig) -> int:
    """Size of the `seq` mesh axis the ring runs over (1 when ring attention is off or no mesh is set)."""
    if cfg.attention != "ring":
        return 1
    return axis_size("seq")


def layer_stacks(cfg: QwenConfig) -> dict[str, tuple[int, ...]]:
    """Decoder layer indices per parameter stack.  Layers of one stack share parameter shapes:
    `layers` holds every layer of a dense model and the sparse (mixture-of-experts) layers of a
    MoE model; `dense_layers` the dense-MLP layers of a MoE model (`mlp_only_layers`,
    `decoder_sparse_step`), absent when there are none."""
    every = tuple(range(cfg.num_hidden_layers))
    sparse = tuple(i for i in every if cfg.is_sparse(i))
    if not sparse:
        return {"layers": every}
    dense = tuple(i for i in every if not cfg.is_sparse(i))
    return {"layers": sparse, "dense_layers": dense} if dense else {"layers": sparse}


class DecoderLayer(nnx.Module):
    """`layer(x, ...) -> (x, RouterStats or None)`: attention then a SwiGLU MLP or (sparse) a SparseMoE."""

    def __init__(self, cfg: QwenConfig, *, sparse: bool = False, rngs: nnx.Rngs):
        dtype, pdtype = jnp.dtype(cfg.dtype), jnp.dtype(cfg.param_dtype)
        e = cfg.hidden_size
        self.input_layernorm = RMSNorm(e, cfg.rms_norm_eps, param_dtype=pdtype, rngs=rngs)
        self.self_attn = Attention(cfg, dtype=dtype, param_dtype=pdtype, rngs=rngs)
        self.post_attention_layernorm = RMSNorm(e, cfg.rms_norm_eps, param_dtype=pdtype, rngs=rngs)
        if sparse:
            self.mlp = SparseMoE(cfg, dtype=dtype, param_dtype=pdtype, rngs=rngs)
        else:
            self.mlp = MLP(e, cfg.intermediate_size, init_std=cfg.initializer_range, dtype=dtype,
                           param_dtype=pdtype, rngs=rngs)

    def __call__(self, x, *, rope, positions, segment_ids, sliding_window, impl):
        h = self.self_attn(self.input_layernorm(x), rope=rope, positions=positions, segment_ids=segment_ids,
                           sliding_window=sliding_window, impl=impl)
        x = checkpoint_name(x + h, ATTENTION_RESIDUAL)
        stats = None
        if isinstance(self.mlp, SparseMoE):
            h, stats = self.mlp(self.post_attention_layernorm(x), None if segment_ids is None else segment_ids > 0)
        else:
            h = self.mlp(self.post_attention_layernorm(x))
        return constrain(x + h, ("batch", "length", "act_embed")), stats

    def decode(self, x, *, layer_cache, **attention_kw):
        """`__call__` over a KV cache (generation): returns (x, updated layer cache)."""
        h, layer_cache = self.self_attn.decode(self.input_layernorm(x), layer_cache=layer_cache, **attention_kw)
        x = x + h
        h = self.mlp(self.post_attention_layernorm(x))
        if isinstance(self.mlp, SparseMoE):  # generation needs no router statistics
            h = h[0]
        return constrain(x + h, ("batch", "length", "act_embed")), layer_cache


def _layer_stack(cfg: QwenConfig, n: int, sparse: bool, rngs: nnx.Rngs) -> DecoderLayer:
    """`n` decoder layers of one kind with stacked parameters (leading `layers` axis)."""
    @nnx.split_rngs(splits=n)
    @nnx.vmap(in_axes=(0,), out_axes=0)
    def make_layers(layer_rngs):
        return DecoderLayer(cfg, sparse=sparse, rngs=layer_rngs)

    return make_layers(rngs)


class Qwen(nnx.Module):
    """`model(input_ids, positions=None, segment_ids=None) -> logits [batch, seq, vocab]` (float32)."""

    def __init__(self, cfg: QwenConfig, *, rngs: nnx.Rngs):
        self.cfg = cfg
        dtype, pdtype = jnp.dtype(cfg.dtype), jnp.dtype(cfg.param_dtype)
        self.embed_tokens = Embed(cfg.vocab_size, cfg.hidden_size, init_std=cfg.initializer_range, dtype=dtype,
                                  param_dtype=pdtype, rngs=rngs)

        for name, indices in layer_stacks(cfg).items():
            setattr(self, name, _layer_stack(cfg, len(indices), cfg.is_sparse(indices[0]), rngs))
        self.norm = RMSNorm(cfg.hidden_size, cfg.rms_norm_eps, param_dtype=pdtype, rngs=rngs)
        if not cfg.tie_word_embeddings:
            self.lm_head = Linear((cfg.hidden_size,), (cfg.vocab_size,), in_axes=("embed",), out_axes=("vocab",),
                                  use_bias=False, init_std=cfg.initializer_range, dtype=dtype, param_dtype=pdtype,
                                  rngs=rngs)

    # ---- pieces, so training can compute a chunked loss from hidden states ----
    def hidden_states(self, input_ids, positions=None, segment_ids=None, *, zigzag=False):
        """Final-norm hidden states [batch, seq, embed] in the compute dtype (see `hidden_states_and_router`)."""
        return self.hidden_states_and_router(input_ids, positions, segment_ids, zigzag=zigzag)[0]

    def hidden_states_and_router(self, input_ids, positions=None, segment_ids=None, *, zigzag=False):
        """(final-norm hidden states [batch, seq, embed], RouterStats summed over the sparse layers or
        None for a dense model).  The router statistics count tokens with segment id > 0.

        With ring attention on a `seq` mesh axis of size n, the sequence must be in zig-zag
        order (device i holds chunks i and 2n-1-i: equal causal work everywhere).  Inputs in
        natural order are permuted here and the output permuted back; a trainer that has
        already permuted tokens, positions, segment ids and targets together passes
        `zigzag=True` (then `positions` are required: they cannot be regenerated).
        """
        cfg = self.cfg
        b, t = input_ids.shape
        ring = ring_size(cfg)
        if zigzag and positions is None:
            raise ValueError("zigzag=True needs the permuted positions (arange after permutation is wrong)")
        if positions is None:
            positions = jnp.broadcast_to(jnp.arange(t, dtype=jnp.int32), (b, t))
        if ring > 1 and not zigzag:
            from qwen_jax.attention.ring import from_zigzag, to_zigzag

            permute = lambda x: None if x is None else to_zigzag(x, ring, axis=1)
            hidden, stats = self.hidden_states_and_router(permute(input_ids), permute(positions),
                                                          permute(segment_ids), zigzag=True)
            return from_zigzag(hidden, ring, axis=1), stats
        x = self.embed_tokens(input_ids)
        rope = self._rope(positions, x.dtype)
        stacks = layer_stacks(cfg)
        where = {i: (name, k) for name, indices in stacks.items() for k, i in enumerate(indices)}
        split = {name: nnx.split(getattr(self, name)) for name in stacks}
        # unrolled: per-layer trees, unstacked once for all groups (see unstack_layers); scanned: stacked slices
        unstacked = None if cfg.scan_layers else {name: unstack_layers(st) for name, (_, st) in split.items()}
        total = None
        runs = itertools.groupby(range(cfg.num_hidden_layers), key=lambda i: (where[i][0], cfg.layer_window(i)))
        for (name, window), group in runs:
            group = list(group)
            start, n = where[group[0]][1], len(group)
            graphdef, state = split[name]
            if unstacked is None:
                run = jax.tree.map(lambda a, s=start, n=n: a[s:s + n], state)
            else:
                run = unstacked[name][start:start + n]
            x, stats = self._run_layers(graphdef, run, x, rope=rope, positions=positions, segment_ids=segment_ids,
                                        sliding_window=window)
            if stats is not None:
                total = stats if total is None else jax.tree.map(jnp.add, total, stats)
        return self.norm(x), total

    def logits(self, hidden):
        """[batch, seq, vocab] logits in float32 from final hidden states."""
        if self.cfg.tie_word_embeddings:
            out = self.embed_tokens.attend(hidden)
        else:
            kernel = self.lm_head.kernel.value.astype(hidden.dtype)
            out = jnp.einsum("bte,ev->btv", hidden, kernel, preferred_element_type=jnp.float32)
        return constrain(out, ("batch", "length", "act_vocab"))

    def output_embedding(self):
        """(output projection, vocab_major): the tied embedding as stored ([vocab, embed], True) or
        the lm_head kernel ([embed, vocab], False).  Not transposed, so its gradient needs no transpose."""
        if self.cfg.tie_word_embeddings:
            return self.embed_tokens.embedding.value, True
        return self.lm_head.kernel.value, False

    def __call__(self, input_ids, positions=None, segment_ids=None):
        return self.logits(self.hidden_states(input_ids, positions, segment_ids))

    def decode(self, input_ids, cache: KVCache) -> tuple[jax.Array, KVCache]:
        """Generation: run `input_ids` [batch, t] at the cache's next t slots (prefill: the
        left-padded prompts; decode: t = 1).  Returns the float32 logits of the last slot
        [batch, vocab] and the cache with these tokens written.  Layers run unrolled, each
        updating its own buffers in place (`qwen_jax.kv_cache`)."""
        cfg = self.cfg
        positions = cache.positions(input_ids.shape[1])
        x = self.embed_tokens(input_ids)
        if cfg.dca is None and cfg.rope_type == "dynamic":  # each row's own length, as generating it alone
            rope = jax.tree.map(lambda a: a[:, 0], jax.vmap(lambda p: self._rope(p[None], x.dtype))(positions))
        else:
            rope = self._rope(positions, x.dtype)
        stacks = {name: nnx.split(getattr(self, name)) for name in layer_stacks(cfg)}
        where = {i: (name, j) for name, indices in layer_stacks(cfg).items() for j, i in enumerate(indices)}
        written = []
        for i in range(cfg.num_hidden_layers):
            name, j = where[i]
            graphdef, state = stacks[name]
            layer = nnx.merge(graphdef, jax.tree.map(lambda a, j=j: a[j], state))
            x, kv = layer.decode(x, rope=rope, positions=positions, cache=cache, sliding_window=cfg.layer_window(i),
                                 layer_cache=(cache.keys[i], cache.values[i]))
            written.append(kv)
        logits = self.logits(self.norm(x[:, -1:]))[:, 0]
        keys, values = (tuple(kv[j] for kv in written) for j in (0, 1))
        return logits, dataclasses.replace(cache, keys=keys, values=values, index=cache.index + input_ids.shape[1])

    # ---- internals ----
    def _rope(self, positions, dtype):
        cfg = self.cfg
        if cfg.dca is not None:
            dca = cfg.dca
            inv_freq = rope_lib.default_inv_freq(cfg.rope_theta, cfg.head_dim)
            return DcaContext(inv_freq, int(dca["chunk_size"]), int(dca["local_size"]),
                              int(dca.get("original_max_position_embeddings") or 0))
        return rope_lib.rope_tables(cfg.rope, cfg.head_dim, cfg.max_position_embeddings, positions, dtype)

    def _run_layers(self, graphdef, layers, x, *, sliding_window, **kw) -> tuple[jax.Array, RouterStats | None]:
        """Layers of one kind (attention window, MLP or MoE): `layers` is a stacked state (scan) or a list
        of per-layer states.  Returns x and the run's summed router statistics (None for dense layers)."""
        impl = self.cfg.attention

        def one_layer(x, layer_state):
            layer = nnx.merge(graphdef, layer_state)
            return layer(x, sliding_window=sliding_window, impl=impl, **kw)

        if self.cfg.remat != "none":
            # unrolled layers need prevent_cse: XLA would otherwise merge the backward's recomputation
            # with the forward pass and keep every activation (inside a scan it cannot)
            one_layer = jax.checkpoint(one_layer, policy=REMAT_POLICIES[self.cfg.remat],
                                       prevent_cse=not self.cfg.scan_layers)
        if self.cfg.scan_layers:
            x, stats = jax.lax.scan(one_layer, x, layers)
            return x, None if stats is None else jax.tree.map(lambda a: jnp.sum(a, axis=0), stats)
        total = None
        for layer_state in layers:
            x, stats = one_layer(x, layer_state)
            if stats is not None:
                total = stats if total is None else jax.tree.map(jnp.add, total, stats)
        return x, total


def num_params(cfg: QwenConfig, include_embedding: bool = True, active: bool = False) -> int:
    """Parameter count, read off the model's abstract state (`nnx.eval_shape`: nothing is allocated), so it is
    the count of the parameters the model really has.  `active=True`: what one token touches in a
    mixture-of-experts model (every dense weight, the router, the shared expert and `num_experts_per_tok` routed
    experts per sparse layer); equals the total for a dense model.  `include_embedding=False` leaves out the
    input embedding and the untied output projection."""
    total = 0
    for path, size in param_sizes(cfg):
        if not include_embedding and path[0] in ("embed_tokens", "lm_head"):
            continue
        if active and "experts" in path:  # routed experts: stacked [..., num_experts, ...]
            size = size // cfg.num_experts * cfg.num_experts_per_tok
        total += size
    return total


@functools.lru_cache(maxsize=64)
def param_sizes(cfg: QwenConfig) -> tuple[tuple[tuple[str, ...], int], ...]:
    """(path, element count) of every parameter of `Qwen(cfg)`; one abstract evaluation per config."""
    state = nnx.state(nnx.eval_shape(lambda: Qwen(cfg, rngs=nnx.Rngs(0))), nnx.Param)
    return tuple((tuple(str(k) for k in path), math.prod(leaf.shape)) for path, leaf in nnx.to_flat_state(state))
