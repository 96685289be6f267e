"""Ring attention: sequence parallelism over the `seq` mesh axis (docs/long_context.md §Ring).

`ring_attention(q, k, v, ...)` takes *global* arrays whose seq dimension is sharded over the
`seq` mesh axis and runs a `jax.shard_map` over that axis.  Each device keeps its queries;
K/V blocks (with their segment ids) travel around the ring with `lax.ppermute` (device i
sends to i+1; at step t device d holds the block of device `src = (d - t) mod n`).  Each step
is one call of a per-step core, the blockwise kernel of `blockwise.py` (online softmax over
key sub-blocks, any mask) or, for plain causal attention on GPU, cuDNN flash attention
(`kernels.cudnn_block_*`: causal on the diagonal step, unmasked elsewhere), and
the per-step `(out, lse)` are merged in float32 with the LSE rule (docs/long_context.md §LSE-merge).  The backward
(`custom_vjp` around the whole ring) recomputes every step with the *final* LSE and sends the
dK/dV accumulators around the ring together with K/V: n permutes, so they land home.

Layouts (the order of tokens along the global seq axis of the *inputs*):

* `zigzag` (default, load balanced): the global array is in zig-zag order — with chunks of
  `c = T / (2n)` tokens, device d holds original chunks d and 2n-1-d.  Build it with
  `to_zigzag` (tokens, positions, segment ids, targets and loss mask together, after shifting
  the targets) and undo it with `from_zigzag`.  Per step only half a block is computed:
  `src < d` → all local queries vs the first half of the received K/V; `src > d` → the second
  half of the local queries vs all received K/V (selected with `lax.switch`).
* `contiguous`: natural order, device d holds `[d T/n, (d+1) T/n)`; blocks with `src > d` are
  skipped (imbalanced: device n-1 does n blocks of work, device 0 one).

GQA: K/V travel with `kv_heads` heads and are never repeated.  Masks are computed from the
global (original) token indices, so causal, sliding-window and packed-segment masks are exact
for any layout; fully masked rows give output 0 and zero gradients.
"""

from __future__ import annotations

import jax
import jax.numpy as jnp
import numpy as np
from jax import lax
from jax.sharding import PartitionSpec as P

from qwen_jax.attention import registry
from qwen_jax.attention.blockwise import (
    BlockAux,
    BlockSpec,
    attention_bwd,
    attention_fwd,
    blockwise_attention,
    zero_cotangent,
)
from qwen_jax.attention.dca_core import broadcast_rows, check_dca_inputs, dca_blockwise, dca_rotations, dca_row_scale
from qwen_jax.sharding import axis_size

LAYOUTS = ("zigzag", "contiguous")

# step kinds (lax.switch index); _DIAG is step 0 (a device's own block: causal on the diagonal)
_ALL, _KV_FIRST_HALF, _Q_SECOND_HALF, _SKIP, _DIAG = 0, 1, 2, 3, 4


# ----------------------------------------------------------------------------------------------
# zig-zag permutation helpers (host side, docs/long_context.md §Zigzag)


def zigzag_permutation(seq_len: int, n: int) -> np.ndarray:
    """Index array `perm` with `x_zigzag = x[perm]`: device d gets chunks d and 2n-1-d of 2n chunks."""
    if seq_len % (2 * n):
        raise ValueError(f"zigzag layout needs seq_len % (2 * n) == 0, got seq_len={seq_len}, n={n}")
    c = seq_len // (2 * n)
    parts = []
    for d in range(n):
        parts.append(np.arange(d * c, (d + 1) * c))
        parts.append(np.arange((2 * n - 1 - d) * c, (2 * n - d) * c))
    return np.concatenate(parts).astype(np.int32)


def zigzag_inverse_permutation(seq_len: int, n: int) -> np.ndarray:
    """Inverse of `zigzag_permutation`: `x = x_zigzag[inv]`."""
    return np.argsort(zigzag_permutation(seq_len, n)).astype(np.int32)


def to_zigzag(x, n: int, axis: int = 1):
    """Permute `x` (numpy or jax) along `axis` into the zig-zag ring layout."""
    perm = zigzag_permutation(x.shape[axis], n)
    return np.take(x, perm, axis=axis) if isinstance(x, np.ndarray) else jnp.take(x, perm, axis=axis)


def from_zigzag(x, n: int, axis: int = 1):
    """Undo `to_zigzag`."""
    inv = zigzag_inverse_permutation(x.shape[axis], n)
    return np.take(x, inv, axis=axis) if isinstance(x, np.ndarray) else jnp.take(x, inv, axis=axis)


def local_indices(layout: str, device, n: int, local_len: int):
    """Global (original-order) indices [local_len] of the tokens held by `device` (traced ok)."""
    if layout == "contiguous":
        return device * local_len + jnp.arange(local_len, dtype=jnp.int32)
    c = local_len // 2
    first = device * c + jnp.arange(c, dtype=jnp.int32)
    second = (2 * n - 1 - device) * c + jnp.arange(c, dtype=jnp.int32)
    return jnp.concatenate([first, second])


def work_per_device(seq_len: int, n: int, layout: str) -> list[int]:
    """Unmasked causal (q, k) pairs each device computes (docs/long_context.md §Zigzag balance numbers)."""
    tl = seq_len // n
    counts = []
    for d in range(n):
        qi = np.asarray(local_indices(layout, d, n, tl))
        counts.append(sum(int((qi[:, None] >= np.asarray(local_indices(layout, s, n, tl))[None, :]).sum())
                          for s in range(n)))
    return counts


def step_work_per_device(seq_len: int, n: int, layout: str) -> list[int]:
    """(query, key) pairs each device *evaluates* over the ring, following the step kinds the
    kernel selects (diagonal / first-half KV / second-half queries / skip)."""
    tl = seq_len // n
    sizes = {_ALL: tl * tl, _KV_FIRST_HALF: tl * (tl // 2), _Q_SECOND_HALF: (tl // 2) * tl, _SKIP: 0, _DIAG: tl * tl}
    return [sum(sizes[int(_step_kind(layout, t, d, n))] for t in range(n)) for d in range(n)]


# ----------------------------------------------------------------------------------------------
# the per-device ring (runs inside shard_map)


def _step_kind(layout, t, d, n):
    src = (d - t) % n
    if layout == "contiguous":
        return jnp.where(t == 0, _DIAG, jnp.where(src < d, _ALL, _SKIP))
    return jnp.where(t == 0, _DIAG, jnp.where(src < d, _KV_FIRST_HALF, _Q_SECOND_HALF))


def _sl(tree, lo, hi):
    """Slice every array of `tree` along the seq axis (axis 1; index arrays: axis 0)."""
    return jax.tree.map(lambda x: lax.slice_in_dim(x, lo, hi, axis=1 if x.ndim > 1 else 0), tree)


def _aux(q_idx, kv_idx, qside, kvside):
    q_seg, q_pos, q_scale = qside
    kv_seg, kv_pos = kvside
    return BlockAux(q_index=q_idx, kv_index=kv_idx, q_seg=q_seg, kv_seg=kv_seg, q_pos=q_pos, kv_pos=kv_pos,
                    q_scale=q_scale)


class _Ring:
    """Per-device ring over `axis_name`.  Query side: variants `qs` and `qside = (seg, pos, scale)`;
    travelling key side: `k, v, kvside = (seg, pos)` (None entries allowed).

    `core` (a `registry.RingCore`): what computes one step.  None or `blockwise`: the
    online-softmax kernel of `blockwise.py` with masks from global token indices (segments,
    windows, DCA: anything).  A core with `fwd`/`bwd` (`cudnn`, `dense`): a fused kernel that
    only knows "causal on the diagonal" or "no mask", which is all a ring needs without segments
    or windows: in both layouts the diagonal step is the device's own block (local order is
    increasing), and every other step is either fully visible or, in the zig-zag layout, a fully
    visible half (first half of the keys, or second half of the queries).
    """

    def __init__(self, axis_name, n, layout, spec: BlockSpec, core: registry.RingCore | None = None):
        self.axis_name, self.n, self.layout, self.spec, self.core = axis_name, n, layout, spec, core
        self.perm = [(i, (i + 1) % n) for i in range(n)]
        if core is not None and core.fwd is not None:
            self.step_fwd, self.step_bwd = self._dense_step_fwd, self._dense_step_bwd
            self.block_fwd, self.block_bwd = core.fwd, core.bwd

    # ---- steps through a fused kernel (no segments / window / DCA: checked by the caller)
    def _dense_step_fwd(self, kind, qs, qside, q_idx, kv, kv_idx):
        (q,), (k, v, _) = qs, kv
        tl, half, scale = q.shape[1], q.shape[1] // 2, self.spec.scale
        f = self.block_fwd
        b, _, h, dd = q.shape

        def q_second_half():
            o, lse = f(q[:, half:], k, v, causal=False, scale=scale)
            return (jnp.concatenate([jnp.zeros_like(o), o], axis=1),
                    jnp.concatenate([jnp.full_like(lse, -jnp.inf), lse], axis=1))

        def skip():
            return jnp.zeros((b, tl, h, dd), jnp.float32), jnp.full((b, tl, h), -jnp.inf, jnp.float32)

        return lax.switch(kind, [lambda: f(q, k, v, causal=False, scale=scale),
                                 lambda: f(q, k[:, :half], v[:, :half], causal=False, scale=scale),
                                 q_second_half, skip,
                                 lambda: f(q, k, v, causal=True, scale=scale)])

    def _dense_step_bwd(self, kind, qs, qside, q_idx, kv, kv_idx, out, lse, dout):
        (q,), (k, v, _) = qs, kv
        half, scale = q.shape[1] // 2, self.spec.scale
        f = self.block_bwd

        def pad_kv(x):
            return jnp.concatenate([x, jnp.zeros_like(x)], 1)

        def kv_first_half():
            dq, dk, dv = f(q, k[:, :half], v[:, :half], out, lse, dout, causal=False, scale=scale)
            return (dq,), pad_kv(dk), pad_kv(dv)

        def q_second_half():
            dq, dk, dv = f(q[:, half:], k, v, out[:, half:], lse[:, half:], dout[:, half:], causal=False, scale=scale)
            return (jnp.concatenate([jnp.zeros_like(dq), dq], 1),), dk, dv

        def skip():
            zeros = lambda x: jnp.zeros(x.shape, jnp.float32)  # noqa: E731
            return (zeros(q),), zeros(k), zeros(v)

        def whole(causal):
            def run():
                dq, dk, dv = f(q, k, v, out, lse, dout, causal=causal, scale=scale)
                return (dq,), dk, dv
            return run

        return lax.switch(kind, [whole(False), kv_first_half, q_second_half, skip, whole(True)])

    def send(self, tree):
        return jax.tree.map(lambda x: lax.ppermute(x, self.axis_name, self.perm), tree)

    def indices(self, d, tl):
        return local_indices(self.layout, d, self.n, tl)

    # ---- forward of one step: (out f32 [b,tl,h,d], lse [b,tl,h]) of the local queries vs the held kv
    def step_fwd(self, kind, qs, qside, q_idx, kv, kv_idx):
        tl = qs[0].shape[1]
        half = tl // 2

        def run(qs_, qside_, qi, kv_, ki):
            k, v, kvside = kv_
            return attention_fwd(qs_, k, v, _aux(qi, ki, qside_, kvside), self.spec)

        def all_():
            return run(qs, qside, q_idx, kv, kv_idx)

        def kv_first_half():
            return run(qs, qside, q_idx, _sl(kv, 0, half), kv_idx[:half])

        def q_second_half():
            o, lse = run(_sl(qs, half, tl), _sl(qside, half, tl), q_idx[half:], kv, kv_idx)
            return (jnp.concatenate([jnp.zeros_like(o), o], axis=1),
                    jnp.concatenate([jnp.full_like(lse, -jnp.inf), lse], axis=1))

        def skip():
            b, _, h, dd = qs[0].shape
            return jnp.zeros((b, tl, h, dd), jnp.float32), jnp.full((b, tl, h), -jnp.inf, jnp.float32)

        return lax.switch(kind, [all_, kv_first_half, q_second_half, skip, all_])

    # ---- backward of one step: (dqs f32, dk f32, dv f32) contributed by the held kv
    def step_bwd(self, kind, qs, qside, q_idx, kv, kv_idx, out, lse, dout):
        tl = qs[0].shape[1]
        half = tl // 2

        def run(qs_, qside_, qi, kv_, ki, o, ls, do):
            k, v, kvside = kv_
            return attention_bwd(qs_, k, v, _aux(qi, ki, qside_, kvside), self.spec, o, ls, do)

        def zeros_like_f32(x):
            return jnp.zeros(x.shape, jnp.float32)

        def all_():
            return run(qs, qside, q_idx, kv, kv_idx, out, lse, dout)

        def kv_first_half():
            dqs, dk, dv = run(qs, qside, q_idx, _sl(kv, 0, half), kv_idx[:half], out, lse, dout)
            return dqs, jnp.concatenate([dk, jnp.zeros_like(dk)], 1), jnp.concatenate([dv, jnp.zeros_like(dv)], 1)

        def q_second_half():
            dqs, dk, dv = run(_sl(qs, half, tl), _sl(qside, half, tl), q_idx[half:], kv, kv_idx,
                              *_sl((out, lse, dout), half, tl))
            return tuple(jnp.concatenate([jnp.zeros_like(x), x], 1) for x in dqs), dk, dv

        def skip():
            return tuple(zeros_like_f32(x) for x in qs), zeros_like_f32(kv[0]), zeros_like_f32(kv[1])

        return lax.switch(kind, [all_, kv_first_half, q_second_half, skip, all_])

    # ---- whole ring
    def forward(self, qs, k, v, qside):
        n, tl = self.n, qs[0].shape[1]
        d = lax.axis_index(self.axis_name)
        q_idx = self.indices(d, tl)
        b, _, h, hd = qs[0].shape

        def body(t, carry):
            out, lse, kv = carry
            nxt = self.send(kv)  # issued before the compute so the transfer can overlap it
            src = (d - t) % n
            o_b, l_b = self.step_fwd(_step_kind(self.layout, t, d, n), qs, qside, q_idx, kv, self.indices(src, tl))
            # LSE merge (docs/long_context.md §LSE-merge), -inf safe
            new = jnp.logaddexp(lse, l_b)
            ok = jnp.isfinite(new)
            new_safe = jnp.where(ok, new, 0.0)
            wa = jnp.where(ok, jnp.exp(lse - new_safe), 0.0)[..., None]
            wb = jnp.where(ok, jnp.exp(l_b - new_safe), 0.0)[..., None]
            return wa * out + wb * o_b, new, nxt

        kv0 = (k, v, (qside[0], qside[1]))
        init = (jnp.zeros((b, tl, h, hd), jnp.float32), jnp.full((b, tl, h), -jnp.inf, jnp.float32), kv0)
        out, lse, _ = lax.fori_loop(0, n, body, init)
        return out, lse

    def backward(self, qs, k, v, qside, out, lse, dout):
        n, tl = self.n, qs[0].shape[1]
        d = lax.axis_index(self.axis_name)
        q_idx = self.indices(d, tl)

        def body(t, carry):
            dqs, kv, dkv = carry
            nxt = self.send(kv)
            src = (d - t) % n
            dqs_b, dk_b, dv_b = self.step_bwd(_step_kind(self.layout, t, d, n), qs, qside, q_idx, kv,
                                              self.indices(src, tl), out, lse, dout)
            # the dK/dV accumulators travel with K/V: after n sends they are back on their owner
            dkv = self.send((dkv[0] + dk_b, dkv[1] + dv_b))
            return tuple(a + b_ for a, b_ in zip(dqs, dqs_b, strict=True)), nxt, dkv

        zeros_kv = jnp.zeros(k.shape, jnp.float32)
        kv0 = (k, v, (qside[0], qside[1]))
        init = (tuple(jnp.zeros(x.shape, jnp.float32) for x in qs), kv0, (zeros_kv, zeros_kv))
        dqs, _, (dk, dv) = lax.fori_loop(0, n, body, init)
        return dqs, dk, dv


def _make_local_fn(axis_name, n, layout, spec: BlockSpec, core=None):
    """custom_vjp ring on local shards: (qs, k, v, qside=(seg, pos, scale)) -> out [b, tl, h, d]."""
    ring = _Ring(axis_name, n, layout, spec, core)

    @jax.custom_vjp
    def local(qs, k, v, qside):
        out, _ = ring.forward(qs, k, v, qside)
        return out.astype(qs[0].dtype)

    def fwd(qs, k, v, qside):
        out, lse = ring.forward(qs, k, v, qside)
        out = out.astype(qs[0].dtype)
        return out, (qs, k, v, qside, out, lse)

    def bwd(res, dout):
        qs, k, v, qside, out, lse = res
        dqs, dk, dv = ring.backward(qs, k, v, qside, out, lse, dout)
        return (tuple(dq.astype(q.dtype) for dq, q in zip(dqs, qs, strict=True)), dk.astype(k.dtype),
                dv.astype(v.dtype), jax.tree.map(zero_cotangent, qside))

    local.defvjp(fwd, bwd)
    return local


def _specs(mesh, q, k, axis_name):
    """PartitionSpecs: batch over (data, fsdp), seq over `axis_name`, heads over tensor (if it divides both)."""
    batch_axes = []
    size = 1
    for name in ("data", "fsdp"):
        s = axis_size(name, mesh)
        if name != axis_name and s > 1 and q.shape[0] % (size * s) == 0:
            batch_axes.append(name)
            size *= s
    batch = None if not batch_axes else batch_axes[0] if len(batch_axes) == 1 else tuple(batch_axes)
    tp = axis_size("tensor", mesh)
    heads = "tensor" if (axis_name != "tensor" and tp > 1 and q.shape[2] % tp == 0 and k.shape[2] % tp == 0) else None
    return P(batch, axis_name, heads, None), P(batch, axis_name)


def _ring_size(mesh, axis_name):
    if mesh is None:
        mesh = jax.sharding.get_abstract_mesh()
    n = axis_size(axis_name, mesh)
    return mesh, n


def _ring_call(qs, k, v, *, seg, pos, q_scale, mesh, n, axis_name, layout, spec_kw, block_size, core=None):
    """shard_map the custom_vjp ring over `axis_name`; qs, k, v, seg, pos, q_scale are global arrays."""
    if layout not in LAYOUTS:
        raise ValueError(f"unknown ring layout {layout!r}; expected one of {LAYOUTS}")
    t = qs[0].shape[1]
    if qs[0].shape[2] % k.shape[2]:
        raise ValueError(f"query heads {qs[0].shape[2]} not a multiple of kv heads {k.shape[2]}")
    if layout == "zigzag" and t % (2 * n):
        raise ValueError(f"zigzag ring attention needs seq % (2 * ring size) == 0; got seq={t}, ring size={n}")
    if t % n:
        raise ValueError(f"ring attention needs seq % ring size == 0; got seq={t}, ring size={n}")
    tl = t // n
    blk = max(1, min(int(block_size), tl // 2 if layout == "zigzag" else tl))
    spec = BlockSpec(block_q=blk, block_k=blk, **spec_kw)
    x_spec, row_spec = _specs(mesh, qs[0], k, axis_name)
    local = _make_local_fn(axis_name, n, layout, spec, core)
    nv = len(qs)
    present = [x is not None for x in (seg, pos, q_scale)]
    side = [x for x in (seg, pos, q_scale) if x is not None]

    def flat(*arrays):
        qs_, (k_, v_), rest = arrays[:nv], arrays[nv:nv + 2], list(arrays[nv + 2:])
        qside = tuple(rest.pop(0) if p else None for p in present)
        return local(tuple(qs_), k_, v_, qside)

    # check_vma=False: the custom_vjp's fwd/bwd run ppermute/axis_index on values whose
    # varying-manual-axes type the custom_vjp rule does not propagate (docs/long_context.md §Ring-backward).
    fn = jax.shard_map(flat, mesh=mesh, in_specs=(x_spec,) * (nv + 2) + (row_spec,) * len(side), out_specs=x_spec,
                       check_vma=False)
    return fn(*qs, k, v, *side)


def resolve_core(core: str, dtype, *, segment_ids=None, sliding_window=None) -> str:
    """`auto` -> `cudnn` where a fused block kernel applies (GPU, 16-bit, no segments, no window), else `blockwise`.

    The cores and their capabilities are the attention registry's (`registry.ring_core`).
    """
    return registry.ring_core(core, dtype, segment_ids=segment_ids, sliding_window=sliding_window).name


def ring_attention(q, k, v, *, segment_ids=None, sliding_window=None, scale=None, block_size=512, mesh=None,
                   axis_name="seq", layout="zigzag", core="auto"):
    """Causal self-attention sequence-parallel over mesh axis `axis_name` (global arrays in, global out).

    q [batch, seq, heads, head_dim], k/v [batch, seq, kv_heads, head_dim], `segment_ids`
    [batch, seq]; seq sharded over `axis_name` (batch over data/fsdp and heads over tensor are
    kept).  With `layout="zigzag"` the inputs must already be in zig-zag order (`to_zigzag`,
    applied together to tokens, positions, segment ids and targets); the output is in the same
    order.  `mesh`: default the mesh set with `jax.set_mesh` (abstract mesh).  Without a mesh or
    with a seq axis of size 1 this is `blockwise_attention`.  `core`: the per-step kernel
    (`resolve_core`: cuDNN flash attention on GPU where it applies, else the blockwise kernel).
    """
    mesh, n = _ring_size(mesh, axis_name)
    if n == 1:
        return blockwise_attention(q, k, v, segment_ids=segment_ids, sliding_window=sliding_window, scale=scale,
                                   block_size=block_size)
    scale = q.shape[3] ** -0.5 if scale is None else float(scale)
    seg = None if segment_ids is None else jnp.broadcast_to(jnp.asarray(segment_ids, jnp.int32), q.shape[:2])
    spec_kw = dict(scale=scale, sliding_window=None if sliding_window is None else int(sliding_window))
    core = registry.ring_core(core, q.dtype, segment_ids=segment_ids, sliding_window=sliding_window)
    return _ring_call((q,), k, v, seg=seg, pos=None, q_scale=None, mesh=mesh, n=n, axis_name=axis_name,
                      layout=layout, spec_kw=spec_kw, block_size=block_size, core=core)


def ring_dca_attention(q, k, v, *, positions, segment_ids=None, inv_freq, chunk_size, local_size,
                       original_max_position_embeddings=0, scale=None, block_size=512, mesh=None, axis_name="seq",
                       layout="zigzag"):
    """Dual Chunk Attention (unrotated q/k, see `dca.dca_attention`) sequence-parallel over `axis_name`.

    Keys are rotated once (`p mod Lc`) before the ring, the three query rotations stay local;
    per (query, key) pair the kernel selects the branch from the travelling per-document
    positions, so every ring step is one online-softmax update of the single DCA softmax.
    Inputs in zig-zag order for `layout="zigzag"` (positions permuted with the tokens).
    """
    mesh, n = _ring_size(mesh, axis_name)
    kw = dict(positions=positions, segment_ids=segment_ids, inv_freq=inv_freq, chunk_size=chunk_size,
              local_size=local_size, original_max_position_embeddings=original_max_position_embeddings, scale=scale)
    if n == 1:
        return dca_blockwise(q, k, v, block_size=block_size, **kw)
    positions = check_dca_inputs(q, k, positions, chunk_size, local_size)
    qs, kr = dca_rotations(q, k, positions, inv_freq, chunk_size, local_size)
    seg = broadcast_rows(segment_ids, q)
    q_scale = dca_row_scale(positions, seg, original_max_position_embeddings)
    scale = q.shape[3] ** -0.5 if scale is None else float(scale)
    spec_kw = dict(scale=scale, chunk_len=chunk_size - local_size)
    return _ring_call(qs, kr, v, seg=seg, pos=positions, q_scale=q_scale, mesh=mesh, n=n, axis_name=axis_name,
                      layout=layout, spec_kw=spec_kw, block_size=block_size)


registry.register(registry.AttentionImpl("ring", ring_attention, sequence_parallel=True, options=("block_size",),
                                         dca="ring"))

__all__ = ["ring_attention", "resolve_core", "ring_dca_attention", "zigzag_permutation", "zigzag_inverse_permutation",
           "to_zigzag", "from_zigzag", "local_indices", "work_per_device", "step_work_per_device"]
