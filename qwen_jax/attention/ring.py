"""Ring attention: sequence parallelism over the `seq` mesh axis (spec §5).

`ring_attention(q, k, v, ...)` takes *global* arrays whose seq dimension is sharded over the
`seq` mesh axis and runs a `jax.shard_map` over that axis.  Each device keeps its queries;
K/V blocks (with their segment ids) travel around the ring with `lax.ppermute` (device i
sends to i+1; at step t device d holds the block of device `src = (d - t) mod n`).  Each step
is one call of the block kernel of `blockwise.py` (online softmax over key sub-blocks), and
the per-step `(out, lse)` are merged in float32 with the LSE rule of §5.2(b).  The backward
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

from qwen_jax.attention.blockwise import BlockAux, BlockSpec, attention_bwd, attention_fwd, blockwise_attention

LAYOUTS = ("zigzag", "contiguous")

# step kinds (lax.switch index)
_ALL, _KV_FIRST_HALF, _Q_SECOND_HALF, _SKIP = 0, 1, 2, 3


# ----------------------------------------------------------------------------------------------
# zig-zag permutation helpers (host side, spec §5.4)


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
    """Unmasked causal (q, k) pairs each device computes (spec §5.3 balance numbers)."""
    tl = seq_len // n
    counts = []
    for d in range(n):
        qi = np.asarray(local_indices(layout, d, n, tl))
        counts.append(sum(int((qi[:, None] >= np.asarray(local_indices(layout, s, n, tl))[None, :]).sum())
                          for s in range(n)))
    return counts


# ----------------------------------------------------------------------------------------------
# the per-device ring (runs inside shard_map)


def _step_kind(layout, t, d, n):
    src = (d - t) % n
    if layout == "contiguous":
        return jnp.where(t == 0, _ALL, jnp.where(src < d, _ALL, _SKIP))
    return jnp.where(t == 0, _ALL, jnp.where(src < d, _KV_FIRST_HALF, _Q_SECOND_HALF))


def _split(x, half, first):
    if x is None:
        return None
    return x[:, :half] if first else x[:, half:]


class _Ring:
    def __init__(self, axis_name, n, layout, spec: BlockSpec):
        self.axis_name, self.n, self.layout, self.spec = axis_name, n, layout, spec
        self.perm = [(i, (i + 1) % n) for i in range(n)]

    def send(self, tree):
        return jax.tree.map(lambda x: lax.ppermute(x, self.axis_name, self.perm), tree)

    def indices(self, d, tl):
        return local_indices(self.layout, d, self.n, tl)

    # ---- forward of one step: (out f32 [b,tl,h,d], lse [b,tl,h]) of local q vs the held kv
    def step_fwd(self, kind, q, k, v, q_seg, kv_seg, q_idx, kv_idx):
        half = q.shape[1] // 2
        spec = self.spec

        def run(qq, kk, vv, qs, ks, qi, ki):
            return attention_fwd((qq,), kk, vv, BlockAux(q_index=qi, kv_index=ki, q_seg=qs, kv_seg=ks), spec)

        def all_():
            return run(q, k, v, q_seg, kv_seg, q_idx, kv_idx)

        def kv_first_half():
            return run(q, k[:, :half], v[:, :half], q_seg, _split(kv_seg, half, True), q_idx, kv_idx[:half])

        def q_second_half():
            o, lse = run(q[:, half:], k, v, _split(q_seg, half, False), kv_seg, q_idx[half:], kv_idx)
            return (jnp.concatenate([jnp.zeros_like(o), o], axis=1),
                    jnp.concatenate([jnp.full_like(lse, -jnp.inf), lse], axis=1))

        def skip():
            b, tl, h, dd = q.shape
            return jnp.zeros((b, tl, h, dd), jnp.float32), jnp.full((b, tl, h), -jnp.inf, jnp.float32)

        return lax.switch(kind, [all_, kv_first_half, q_second_half, skip])

    # ---- backward of one step: (dq f32 [b,tl,h,d], dk, dv f32 [b,tl,kv,d])
    def step_bwd(self, kind, q, k, v, q_seg, kv_seg, q_idx, kv_idx, out, lse, dout):
        half = q.shape[1] // 2
        spec = self.spec

        def run(qq, kk, vv, qs, ks, qi, ki, o, ls, do):
            aux = BlockAux(q_index=qi, kv_index=ki, q_seg=qs, kv_seg=ks)
            (dq,), dk, dv = attention_bwd((qq,), kk, vv, aux, spec, o, ls, do)
            return dq, dk, dv

        def all_():
            return run(q, k, v, q_seg, kv_seg, q_idx, kv_idx, out, lse, dout)

        def kv_first_half():
            dq, dk, dv = run(q, k[:, :half], v[:, :half], q_seg, _split(kv_seg, half, True), q_idx, kv_idx[:half],
                             out, lse, dout)
            return dq, jnp.concatenate([dk, jnp.zeros_like(dk)], 1), jnp.concatenate([dv, jnp.zeros_like(dv)], 1)

        def q_second_half():
            dq, dk, dv = run(q[:, half:], k, v, _split(q_seg, half, False), kv_seg, q_idx[half:], kv_idx,
                             out[:, half:], lse[:, half:], dout[:, half:])
            return jnp.concatenate([jnp.zeros_like(dq), dq], 1), dk, dv

        def skip():
            return (jnp.zeros(q.shape, jnp.float32), jnp.zeros(k.shape, jnp.float32),
                    jnp.zeros(v.shape, jnp.float32))

        return lax.switch(kind, [all_, kv_first_half, q_second_half, skip])

    # ---- whole ring
    def forward(self, q, k, v, seg):
        n, tl = self.n, q.shape[1]
        d = lax.axis_index(self.axis_name)
        q_idx = self.indices(d, tl)
        b, _, h, hd = q.shape

        def body(t, carry):
            out, lse, kv = carry
            kk, vv, ks = kv
            nxt = self.send(kv)  # issued before the compute so the transfer can overlap it
            src = (d - t) % n
            o_b, l_b = self.step_fwd(_step_kind(self.layout, t, d, n), q, kk, vv, seg, ks, q_idx,
                                     self.indices(src, tl))
            # LSE merge (spec §5.2b), -inf safe
            new = jnp.logaddexp(lse, l_b)
            ok = jnp.isfinite(new)
            new_safe = jnp.where(ok, new, 0.0)
            wa = jnp.where(ok, jnp.exp(lse - new_safe), 0.0)[..., None]
            wb = jnp.where(ok, jnp.exp(l_b - new_safe), 0.0)[..., None]
            return wa * out + wb * o_b, new, nxt

        init = (jnp.zeros((b, tl, h, hd), jnp.float32), jnp.full((b, tl, h), -jnp.inf, jnp.float32), (k, v, seg))
        out, lse, _ = lax.fori_loop(0, n, body, init)
        return out, lse

    def backward(self, q, k, v, seg, out, lse, dout):
        n, tl = self.n, q.shape[1]
        d = lax.axis_index(self.axis_name)
        q_idx = self.indices(d, tl)

        def body(t, carry):
            dq, kv, dkv = carry
            kk, vv, ks = kv
            nxt = self.send(kv)
            src = (d - t) % n
            dq_b, dk_b, dv_b = self.step_bwd(_step_kind(self.layout, t, d, n), q, kk, vv, seg, ks, q_idx,
                                             self.indices(src, tl), out, lse, dout)
            # the dK/dV accumulators travel with K/V: after n sends they are back on their owner
            dkv = self.send((dkv[0] + dk_b, dkv[1] + dv_b))
            return dq + dq_b, nxt, dkv

        zeros_kv = jnp.zeros(k.shape, jnp.float32)
        init = (jnp.zeros(q.shape, jnp.float32), (k, v, seg), (zeros_kv, zeros_kv))
        dq, _, (dk, dv) = lax.fori_loop(0, n, body, init)
        return dq, dk, dv


def _make_local_fn(axis_name, n, layout, spec: BlockSpec, has_seg: bool):
    ring = _Ring(axis_name, n, layout, spec)

    @jax.custom_vjp
    def local(q, k, v, seg):
        out, _ = ring.forward(q, k, v, seg)
        return out.astype(q.dtype)

    def fwd(q, k, v, seg):
        out, lse = ring.forward(q, k, v, seg)
        out = out.astype(q.dtype)
        return out, (q, k, v, seg, out, lse)

    def bwd(res, dout):
        q, k, v, seg, out, lse = res
        dq, dk, dv = ring.backward(q, k, v, seg, out, lse, dout)
        dseg = None if seg is None else np.zeros(seg.shape, jax.dtypes.float0)
        return dq.astype(q.dtype), dk.astype(k.dtype), dv.astype(v.dtype), dseg

    local.defvjp(fwd, bwd)
    if has_seg:
        return local
    return lambda q, k, v: local(q, k, v, None)


def _axis_size(mesh, name):
    return int(mesh.shape[name]) if name in mesh.shape else 1


def _specs(mesh, q, k, axis_name):
    """PartitionSpecs: batch over (data, fsdp), seq over `axis_name`, heads over tensor (if it divides both)."""
    batch_axes = []
    size = 1
    for name in ("data", "fsdp"):
        s = _axis_size(mesh, name)
        if name != axis_name and s > 1 and q.shape[0] % (size * s) == 0:
            batch_axes.append(name)
            size *= s
    batch = None if not batch_axes else batch_axes[0] if len(batch_axes) == 1 else tuple(batch_axes)
    tp = _axis_size(mesh, "tensor")
    heads = "tensor" if (axis_name != "tensor" and tp > 1 and q.shape[2] % tp == 0 and k.shape[2] % tp == 0) else None
    return P(batch, axis_name, heads, None), P(batch, axis_name)


def ring_attention(q, k, v, *, segment_ids=None, sliding_window=None, scale=None, block_size=512, mesh=None,
                   axis_name="seq", layout="zigzag"):
    """Causal self-attention sequence-parallel over mesh axis `axis_name` (global arrays in, global out).

    q [batch, seq, heads, head_dim], k/v [batch, seq, kv_heads, head_dim], `segment_ids`
    [batch, seq]; seq sharded over `axis_name` (batch over data/fsdp and heads over tensor are
    kept).  With `layout="zigzag"` the inputs must already be in zig-zag order (`to_zigzag`,
    applied together to tokens, positions, segment ids and targets); the output is in the same
    order.  `mesh`: default the mesh set with `jax.set_mesh` (abstract mesh).  Without a mesh or
    with a seq axis of size 1 this is `blockwise_attention`.
    """
    if layout not in LAYOUTS:
        raise ValueError(f"unknown ring layout {layout!r}; expected one of {LAYOUTS}")
    if mesh is None:
        mesh = jax.sharding.get_abstract_mesh()
    n = 1 if mesh is None or mesh.empty else _axis_size(mesh, axis_name)
    if n == 1:
        return blockwise_attention(q, k, v, segment_ids=segment_ids, sliding_window=sliding_window, scale=scale,
                                   block_size=block_size)
    t, hd = q.shape[1], q.shape[3]
    if q.shape[2] % k.shape[2]:
        raise ValueError(f"query heads {q.shape[2]} not a multiple of kv heads {k.shape[2]}")
    if layout == "zigzag" and t % (2 * n):
        raise ValueError(f"zigzag ring attention needs seq % (2 * ring size) == 0; got seq={t}, ring size={n}")
    if t % n:
        raise ValueError(f"ring attention needs seq % ring size == 0; got seq={t}, ring size={n}")
    scale = hd**-0.5 if scale is None else float(scale)
    tl = t // n
    blk = max(1, min(int(block_size), tl // 2 if layout == "zigzag" else tl))
    spec = BlockSpec(scale=scale, block_q=blk, block_k=blk,
                     sliding_window=None if sliding_window is None else int(sliding_window))
    x_spec, seg_spec = _specs(mesh, q, k, axis_name)
    has_seg = segment_ids is not None
    local = _make_local_fn(axis_name, n, layout, spec, has_seg)
    in_specs = (x_spec, x_spec, x_spec) + ((seg_spec,) if has_seg else ())
    args = (q, k, v) + ((segment_ids.astype(jnp.int32),) if has_seg else ())
    # check_vma=False: the custom_vjp's fwd/bwd run ppermute/axis_index on values whose
    # varying-manual-axes type the custom_vjp rule does not propagate (spec §5.9).
    fn = jax.shard_map(local, mesh=mesh, in_specs=in_specs, out_specs=x_spec, check_vma=False)
    return fn(*args)


__all__ = ["ring_attention", "zigzag_permutation", "zigzag_inverse_permutation", "to_zigzag", "from_zigzag",
           "local_indices", "work_per_device"]
