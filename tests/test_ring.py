"""Ring attention (shard_map over the `seq` axis of the 8 virtual CPU devices) == dense reference.

Forward and gradients (dq, dk, dv) against `reference.xla_attention`, float32, relative error
<= 1e-5 (docs/long_context.md §Checks); zig-zag permutation and work balance (§Zigzag).
"""

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from attention_helpers import make_qkv, rel_err

from qwen_jax.attention.dca import dca_dense
from qwen_jax.attention.reference import xla_attention
from qwen_jax.attention.ring import (
    from_zigzag,
    ring_attention,
    ring_dca_attention,
    step_work_per_device,
    to_zigzag,
    work_per_device,
    zigzag_inverse_permutation,
    zigzag_permutation,
)
from qwen_jax.rope import apply_rope, cos_sin, default_inv_freq
from qwen_jax.sharding import make_mesh

TOL = 1e-5
T = 48  # divisible by 2n for n = 2, 3, 4, 6, 8






def packed(b, t, seed=0):
    """Documents of random lengths (crossing shard boundaries) + a padding tail (id 0); per-doc positions."""
    rng = np.random.default_rng(seed)
    seg = np.zeros((b, t), np.int32)
    pos = np.zeros((b, t), np.int32)
    for r in range(b):
        cuts = np.sort(rng.choice(np.arange(3, t - 6), size=3, replace=False))
        ids = np.searchsorted(cuts, np.arange(t), side="right") + 1
        ids[t - 4:] = 0
        seg[r] = ids
        for i in range(t):
            pos[r, i] = 0 if i == 0 or ids[i] != ids[i - 1] else pos[r, i - 1] + 1
    return jnp.asarray(seg), jnp.asarray(pos)


def out_and_grads(fn, q, k, v, seed=1):
    out, vjp = jax.vjp(fn, q, k, v)
    dout = jnp.asarray(np.random.default_rng(seed).standard_normal(out.shape), jnp.float32)
    return out, vjp(dout)


def seq_mesh(n):
    return make_mesh({"seq": n}, devices=jax.devices()[:n])


# ---------------------------------------------------------------------------------------------
# permutation and balance


def test_zigzag_permutation_example():
    perm = zigzag_permutation(32, 4)
    per_dev = perm.reshape(4, 8)
    assert per_dev[0].tolist() == [0, 1, 2, 3, 28, 29, 30, 31]
    assert per_dev[1].tolist() == [4, 5, 6, 7, 24, 25, 26, 27]
    assert per_dev[2].tolist() == [8, 9, 10, 11, 20, 21, 22, 23]
    assert per_dev[3].tolist() == list(range(12, 20))
    inv = zigzag_inverse_permutation(32, 4)
    np.testing.assert_array_equal(perm[inv], np.arange(32))
    x = np.arange(2 * 32 * 3).reshape(2, 32, 3)
    np.testing.assert_array_equal(from_zigzag(to_zigzag(x, 4), 4), x)
    np.testing.assert_array_equal(np.asarray(from_zigzag(to_zigzag(jnp.asarray(x), 4), 4)), x)
    with pytest.raises(ValueError, match="2 \\* n"):
        zigzag_permutation(30, 4)


def test_zigzag_positions_are_permuted_with_tokens():
    """RoPE positions must be the original positions of the permuted tokens (docs/long_context.md §Zigzag)."""
    n, t = 4, 32
    tokens = np.arange(100, 100 + t)[None]
    positions = np.arange(t)[None]
    zt, zp = to_zigzag(tokens, n), to_zigzag(positions, n)
    np.testing.assert_array_equal(zt - 100, zp)  # token <-> position pairing preserved
    regenerated = np.arange(t)[None]  # the bug: positions generated after the permutation
    assert not np.array_equal(zt - 100, regenerated)

    # end to end: RoPE with permuted positions + zig-zag ring == dense RoPE attention; the bug differs
    q, k, v = make_qkv(1, t, 2, 1, 8, seed=5)
    inv_freq = default_inv_freq(1e4, 8)

    def rope(x, pos):
        cos, sin = cos_sin(jnp.asarray(pos), inv_freq, 1.0, x.dtype)
        return apply_rope(x, cos, sin)

    want = xla_attention(rope(q, positions), rope(k, positions), v)
    mesh = seq_mesh(n)
    ring = jax.jit(lambda q, k, v: ring_attention(q, k, v, mesh=mesh, block_size=4))
    zq, zk, zv = (to_zigzag(x, n) for x in (q, k, v))
    good = from_zigzag(ring(rope(zq, zp), rope(zk, zp), zv), n)
    bad = from_zigzag(ring(rope(zq, regenerated), rope(zk, regenerated), zv), n)
    assert rel_err(good, want) <= TOL
    assert rel_err(bad, want) > 1e-2


def test_work_balance_numbers():
    assert work_per_device(32, 4, "contiguous") == [36, 100, 164, 228]
    assert work_per_device(32, 4, "zigzag") == [132, 132, 132, 132]
    # pairs the ring actually evaluates (half-block steps for zigzag, skipped blocks for contiguous)
    tl = 32 // 4
    assert step_work_per_device(32, 4, "zigzag") == [tl * tl + 3 * tl * tl // 2] * 4
    assert step_work_per_device(32, 4, "contiguous") == [tl * tl * (d + 1) for d in range(4)]
    for n in (2, 3, 6, 8):
        assert len(set(step_work_per_device(48, n, "zigzag"))) == 1


# ---------------------------------------------------------------------------------------------
# ring == dense reference (forward + gradients)

CASES = [
    # (n, layout, h, kv, segments, window)
    (2, "zigzag", 4, 2, False, None),
    (3, "zigzag", 4, 1, True, None),
    (4, "zigzag", 4, 2, True, 7),
    (6, "zigzag", 4, 2, True, None),
    (8, "zigzag", 4, 2, False, None),
    (8, "zigzag", 4, 1, True, 11),
    (2, "contiguous", 4, 1, True, None),
    (4, "contiguous", 4, 4, False, 9),
    (8, "contiguous", 4, 2, True, None),
]


@pytest.mark.parametrize("n,layout,h,kv,segments,window", CASES)
def test_ring_matches_reference(n, layout, h, kv, segments, window):
    b, d = 2, 8
    q, k, v = make_qkv(b, T, h, kv, d, seed=n)
    seg = packed(b, T, seed=n)[0] if segments else None
    mesh = seq_mesh(n)
    perm = (lambda x: to_zigzag(x, n)) if layout == "zigzag" else (lambda x: x)
    unperm = (lambda x: from_zigzag(x, n)) if layout == "zigzag" else (lambda x: x)
    zseg = None if seg is None else perm(seg)

    @jax.jit
    def run(q, k, v):
        got = out_and_grads(lambda q, k, v: unperm(ring_attention(perm(q), perm(k), perm(v), segment_ids=zseg,
                                                                  sliding_window=window, mesh=mesh, layout=layout,
                                                                  block_size=4)), q, k, v)
        want = out_and_grads(lambda q, k, v: xla_attention(q, k, v, segment_ids=seg, sliding_window=window), q, k, v)
        return got, want

    (o, grads), (ro, rgrads) = run(q, k, v)
    assert rel_err(o, ro) <= TOL
    for g, rg, x in zip(grads, rgrads, (q, k, v), strict=True):
        assert g.shape == x.shape  # dk/dv keep kv_heads
        assert np.all(np.isfinite(np.asarray(g)))
        assert rel_err(g, rg) <= TOL


def test_ring_uses_set_mesh_with_batch_axis():
    """No mesh argument: the mesh from jax.set_mesh; batch stays sharded over `data`."""
    n = 4
    mesh = make_mesh({"data": 2, "seq": n})
    q, k, v = make_qkv(2, T, 4, 2, 8, seed=7)
    seg = packed(2, T, seed=7)[0]
    want = xla_attention(q, k, v, segment_ids=seg)
    with jax.set_mesh(mesh):
        out = jax.jit(lambda q, k, v, s: ring_attention(q, k, v, segment_ids=s, block_size=8))(
            *(to_zigzag(x, n) for x in (q, k, v, seg)))
    assert rel_err(from_zigzag(out, n), want) <= TOL


def test_ring_size_one_falls_back_and_errors():
    q, k, v = make_qkv(1, 20, 2, 1, 8)
    out = ring_attention(q, k, v, mesh=seq_mesh(1), block_size=8)
    assert rel_err(out, xla_attention(q, k, v)) <= TOL
    q, k, v = make_qkv(1, 20, 2, 1, 8)
    with pytest.raises(ValueError, match="zigzag"):
        ring_attention(q, k, v, mesh=seq_mesh(4))  # 20 % 8 != 0
    with pytest.raises(ValueError, match="layout"):
        ring_attention(q, k, v, mesh=seq_mesh(2), layout="stripe")


def test_ring_dca_matches_dense_dca():
    """DCA composes with the ring: keys rotated once, three local query rotations, positions travel."""
    n, b, d = 3, 2, 8
    q, k, v = make_qkv(b, T, 4, 2, d, seed=11)
    seg, pos = packed(b, T, seed=11)
    kw = dict(inv_freq=default_inv_freq(1e4, d), chunk_size=8, local_size=2, original_max_position_embeddings=6)
    mesh = seq_mesh(n)
    z = (lambda x: to_zigzag(x, n))

    @jax.jit
    def run(q, k, v):
        got = out_and_grads(lambda q, k, v: from_zigzag(ring_dca_attention(
            z(q), z(k), z(v), positions=z(pos), segment_ids=z(seg), mesh=mesh, block_size=4, **kw), n), q, k, v)
        want = out_and_grads(lambda q, k, v: dca_dense(q, k, v, positions=pos, segment_ids=seg, **kw), q, k, v)
        return got, want

    (o, grads), (ro, rgrads) = run(q, k, v)
    assert rel_err(o, ro) <= TOL
    for g, rg in zip(grads, rgrads, strict=True):
        assert rel_err(g, rg) <= TOL


@pytest.mark.parametrize("n,layout,kv", [(2, "zigzag", 2), (3, "zigzag", 1), (4, "contiguous", 2)])
def test_ring_fused_core_matches_reference(n, layout, kv):
    """The fused-kernel ring path (cuDNN on GPU) with its XLA twin `dense`: forward and gradients.

    Same contract as `kernels.cudnn_block_fwd/bwd`: the diagonal step causal, the others unmasked,
    the backward fed the final out/LSE.  `benchmarks/ring_scaling.py --check` runs the cuDNN pair.
    """
    b, h, d = 2, 4, 8
    q, k, v = make_qkv(b, T, h, kv, d, seed=20 + n)
    mesh = seq_mesh(n)
    perm = (lambda x: to_zigzag(x, n)) if layout == "zigzag" else (lambda x: x)
    unperm = (lambda x: from_zigzag(x, n)) if layout == "zigzag" else (lambda x: x)

    @jax.jit
    def run(q, k, v):
        got = out_and_grads(lambda q, k, v: unperm(ring_attention(perm(q), perm(k), perm(v), mesh=mesh,
                                                                  layout=layout, core="dense")), q, k, v)
        want = out_and_grads(xla_attention, q, k, v)
        return got, want

    (o, grads), (ro, rgrads) = run(q, k, v)
    assert rel_err(o, ro) <= TOL
    for g, rg in zip(grads, rgrads, strict=True):
        assert rel_err(g, rg) <= TOL


def test_ring_core_choice():
    from qwen_jax.attention.ring import resolve_core

    assert resolve_core("auto", jnp.bfloat16) == ("cudnn" if jax.default_backend() == "gpu" else "blockwise")
    assert resolve_core("auto", jnp.bfloat16, segment_ids=jnp.zeros((1, 4), jnp.int32)) == "blockwise"
    with pytest.raises(ValueError, match="sliding_window"):
        resolve_core("cudnn", jnp.bfloat16, sliding_window=4)
    with pytest.raises(ValueError, match="unknown ring core"):
        resolve_core("flash", jnp.bfloat16)
