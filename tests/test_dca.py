"""Dual Chunk Attention (vLLM semantics, docs/long_context.md §DCA) against the worked example of §DCA-example and
an independent float64 numpy dense oracle written here from the §DCA-positions / §DCA-scaling formulas."""

import math

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from attention_helpers import rel_err

from qwen_jax.attention import DcaContext, dca
from qwen_jax.attention.dca import (
    dca_blockwise,
    dca_branch,
    dca_dense,
    dca_key_positions,
    dca_length_scale,
    dca_query_positions,
    dca_seen_distance,
    document_lengths,
)
from qwen_jax.attention.reference import xla_attention
from qwen_jax.rope import apply_rope, cos_sin, default_inv_freq

THETA = 1e4

# docs/long_context.md §DCA-example: chunk_size=8, local_size=2, T=20 (rows = query i, columns = key j, "." = masked)
SEEN_MATRIX = """
  0:  0  .  .  .  .  .  .  .  .  .  .  .  .  .  .  .  .  .  .  .
  1:  1  0  .  .  .  .  .  .  .  .  .  .  .  .  .  .  .  .  .  .
  2:  2  1  0  .  .  .  .  .  .  .  .  .  .  .  .  .  .  .  .  .
  3:  3  2  1  0  .  .  .  .  .  .  .  .  .  .  .  .  .  .  .  .
  4:  4  3  2  1  0  .  .  .  .  .  .  .  .  .  .  .  .  .  .  .
  5:  5  4  3  2  1  0  .  .  .  .  .  .  .  .  .  .  .  .  .  .
  6:  6  5  4  3  2  1  0  .  .  .  .  .  .  .  .  .  .  .  .  .
  7:  7  6  5  4  3  2  1  0  .  .  .  .  .  .  .  .  .  .  .  .
  8:  8  7  6  5  4  3  2  1  0  .  .  .  .  .  .  .  .  .  .  .
  9:  8  7  6  5  4  3  3  2  1  0  .  .  .  .  .  .  .  .  .  .
 10:  8  7  6  5  4  3  4  3  2  1  0  .  .  .  .  .  .  .  .  .
 11:  8  7  6  5  4  3  5  4  3  2  1  0  .  .  .  .  .  .  .  .
 12:  8  7  6  5  4  3  6  5  4  3  2  1  0  .  .  .  .  .  .  .
 13:  8  7  6  5  4  3  7  6  5  4  3  2  1  0  .  .  .  .  .  .
 14:  8  7  6  5  4  3  8  7  6  5  4  3  2  1  0  .  .  .  .  .
 15:  8  7  6  5  4  3  8  7  6  5  4  3  3  2  1  0  .  .  .  .
 16:  8  7  6  5  4  3  8  7  6  5  4  3  4  3  2  1  0  .  .  .
 17:  8  7  6  5  4  3  8  7  6  5  4  3  5  4  3  2  1  0  .  .
 18:  8  7  6  5  4  3  8  7  6  5  4  3  6  5  4  3  2  1  0  .
 19:  8  7  6  5  4  3  8  7  6  5  4  3  7  6  5  4  3  2  1  0
"""

# §DCA-example selected pairs: (i, j) -> (branch, Pq, Pk, seen, true)
PAIRS = {
    (19, 19): ("intra", 1, 1, 0, 0), (19, 18): ("intra", 1, 0, 1, 1), (19, 17): ("succ", 7, 5, 2, 2),
    (19, 12): ("succ", 7, 0, 7, 7), (19, 11): ("inter", 8, 5, 3, 8), (19, 6): ("inter", 8, 0, 8, 13),
    (19, 0): ("inter", 8, 0, 8, 19), (16, 11): ("succ", 8, 5, 3, 5), (16, 6): ("succ", 8, 0, 8, 10),
    (13, 11): ("succ", 7, 5, 2, 2), (14, 6): ("succ", 8, 0, 8, 8), (15, 5): ("inter", 8, 5, 3, 10),
    (12, 0): ("inter", 8, 0, 8, 12), (7, 0): ("succ", 7, 0, 7, 7), (6, 5): ("succ", 6, 5, 1, 1),
    (5, 0): ("intra", 5, 0, 5, 5),
}
BRANCHES = ("intra", "succ", "inter")




# ---------------------------------------------------------------------------------------------
# independent numpy float64 oracle (§DCA-positions formulas, one softmax over the union of branches)


def np_rope(x, p, d):
    inv = THETA ** (-np.arange(0, d, 2) / d)
    ang = p * inv
    cos, sin = np.concatenate([np.cos(ang)] * 2), np.concatenate([np.sin(ang)] * 2)
    return x * cos + np.concatenate([-x[d // 2:], x[: d // 2]]) * sin


def np_dca(q, k, v, pos, seg, chunk_size, local_size, original=0):
    """q [T, H, D], k/v [T, Hkv, D], pos/seg [T] -> out [T, H, D] (float64, loops)."""
    t, h, d = q.shape
    g = h // k.shape[1]
    lc = chunk_size - local_size
    out = np.zeros((t, h, d))
    for i in range(t):
        r = pos[i] % lc
        pq = (r, min(r + lc, chunk_size), min(2 * lc - 1, chunk_size))
        lseq = pos[seg == seg[i]].max() + 1
        sigma = max(1.0, 0.1 * math.log(lseq / original) + 1.0) if original > 0 else 1.0
        js = [j for j in range(i + 1) if seg[j] == seg[i]]
        for hh in range(h):
            logits = []
            for j in js:
                br = int(np.clip(pos[i] // lc - pos[j] // lc, 0, 2))
                qr = np_rope(q[i, hh], pq[br], d)
                kr = np_rope(k[j, hh // g], pos[j] % lc, d)
                logits.append(qr @ kr * d**-0.5 * sigma**2)
            logits = np.array(logits)
            p = np.exp(logits - logits.max())
            out[i, hh] = (p / p.sum()) @ v[js, hh // g]
    return out


def make_qkv(b, t, h, kv, d, seed=0):
    rng = np.random.default_rng(seed)
    return tuple(rng.standard_normal(s) for s in ((b, t, h, d), (b, t, kv, d), (b, t, kv, d)))


def two_docs(len_a, len_b):
    seg = np.array([1] * len_a + [2] * len_b, np.int32)
    pos = np.concatenate([np.arange(len_a), np.arange(len_b)]).astype(np.int32)
    return seg, pos


def jax_both(q, k, v, pos, seg, chunk_size, local_size, original, d, block_size=4):
    """(dense, blockwise) DCA outputs in one jit."""
    kw = dict(positions=jnp.asarray(pos), segment_ids=None if seg is None else jnp.asarray(seg),
              inv_freq=default_inv_freq(THETA, d), chunk_size=chunk_size, local_size=local_size,
              original_max_position_embeddings=original)
    args = tuple(jnp.asarray(x, jnp.float32) for x in (q, k, v))
    return jax.jit(lambda q, k, v: (dca_dense(q, k, v, **kw), dca_blockwise(q, k, v, block_size=block_size, **kw)))(
        *args)


# ---------------------------------------------------------------------------------------------
# §DCA-example worked example (integer, exact)


def test_worked_example_positions():
    qi, qs, qn = dca_query_positions(np.arange(6), 8, 2)
    assert qi.tolist() == [0, 1, 2, 3, 4, 5]
    assert qs.tolist() == [6, 7, 8, 8, 8, 8]
    assert qn.tolist() == [8] * 6
    pos = np.arange(20)
    kp = dca_key_positions(pos, 8, 2)
    br = dca_branch(pos, pos, 8, 2)
    qpos = np.stack(dca_query_positions(pos, 8, 2))
    for (i, j), (name, pq, pk, seen, true) in PAIRS.items():
        assert BRANCHES[br[i, j]] == name
        assert qpos[br[i, j], i] == pq and kp[j] == pk
        assert pq - pk == seen and i - j == true


def test_seen_distance_matrix_exact():
    want = np.array([[-1 if x == "." else int(x) for x in line.split(":")[1].split()]
                     for line in SEEN_MATRIX.strip().splitlines()])
    got = dca_seen_distance(np.arange(20), 8, 2)
    np.testing.assert_array_equal(got, want)
    assert got.max() == 8  # == chunk_size


# ---------------------------------------------------------------------------------------------
# numerics


def test_dca_matches_numpy_oracle_gqa():
    """T=20, head_dim 8, chunk 8 / local 2, θ=1e4, GQA 4/2: dense and blockwise == float64 oracle."""
    b, t, d = 1, 20, 8
    q, k, v = make_qkv(b, t, 4, 2, d, seed=1)
    pos, seg = np.arange(t), np.zeros(t, np.int32)
    want = np_dca(q[0], k[0], v[0], pos, seg, 8, 2)
    dense, blockwise = jax_both(q, k, v, pos[None], None, 8, 2, 0, d)
    assert rel_err(dense[0], want) <= 2e-6
    assert rel_err(blockwise[0], want) <= 2e-6
    # DCA really differs from plain RoPE attention here (T > Lc)
    plain = np_dca(q[0], k[0], v[0], pos, seg, 1000, 0)
    assert rel_err(plain, want) > 1e-3


@pytest.mark.parametrize("t,chunk_size,local_size", [
    (6, 8, 2), (7, 8, 2), (12, 8, 2), (13, 8, 2),  # T = Lc, Lc + 1, 2Lc, 2Lc + 1
    (17, 8, 0),  # local_size = 0: successive/inter queries all clamp to C
    (13, 8, 4),  # C < 2W + 1: inter position 2Lc - 1 = 7 < C
])
def test_dca_edge_cases_match_oracle(t, chunk_size, local_size):
    d = 8
    q, k, v = make_qkv(1, t, 2, 1, d, seed=t)
    pos = np.arange(t)
    want = np_dca(q[0], k[0], v[0], pos, np.zeros(t, np.int32), chunk_size, local_size)
    dense, blockwise = jax_both(q, k, v, pos[None], None, chunk_size, local_size, 0, d, block_size=3)
    assert rel_err(dense[0], want) <= 2e-6
    assert rel_err(blockwise[0], want) <= 2e-6


@pytest.mark.parametrize("t,chunk_size,local_size", [(6, 8, 2), (16, 20, 4)])
def test_short_sequence_is_plain_rope_attention(t, chunk_size, local_size):
    """T <= chunk_size - local_size: DCA == standard RoPE attention with positions 0..T-1."""
    d = 16
    q, k, v = (jnp.asarray(x, jnp.float32) for x in make_qkv(2, t, 4, 2, d, seed=2))
    pos = jnp.broadcast_to(jnp.arange(t), (2, t))
    cos, sin = cos_sin(pos, default_inv_freq(THETA, d), 1.0, jnp.float32)
    want = xla_attention(apply_rope(q, cos, sin), apply_rope(k, cos, sin), v)
    kw = dict(positions=pos, inv_freq=default_inv_freq(THETA, d), chunk_size=chunk_size, local_size=local_size,
              original_max_position_embeddings=0)
    assert float(jnp.abs(dca_dense(q, k, v, **kw) - want).max()) <= 1e-6
    assert float(jnp.abs(dca_blockwise(q, k, v, block_size=4, **kw) - want).max()) <= 1e-6


def test_length_scaling_constants():
    """σ of docs/long_context.md §DCA-scaling for L0 = 262144 (values in §Checks)."""
    assert dca_length_scale(262144, 262144) == 1.0
    assert dca_length_scale(100, 262144) == 1.0
    assert abs(dca_length_scale(300000, 262144) - 1.0134888503559323) < 1e-12
    assert abs(dca_length_scale(524288, 262144) - 1.0693147180559945) < 1e-12
    assert abs(dca_length_scale(1000000, 262144) - 1.1338861307885257) < 1e-12
    assert abs(dca_length_scale(1000000, 262144) ** 2 - 1.2856977575945736) < 1e-12
    assert abs(dca_length_scale(1010000, 262144) - 1.1348811638738427) < 1e-12
    assert dca_length_scale(10**6, 0) == 1.0
    got = np.asarray(dca_length_scale(jnp.array([300000, 1000000]), 262144))
    np.testing.assert_allclose(got, [1.0134888503559323, 1.1338861307885257], rtol=1e-6)


def test_length_scaling_multiplies_logits_by_sigma_squared():
    t, d = 20, 8
    q, k, v = (jnp.asarray(x, jnp.float32) for x in make_qkv(1, t, 2, 1, d, seed=3))
    kw = dict(positions=jnp.arange(t)[None], inv_freq=default_inv_freq(THETA, d), chunk_size=8, local_size=2)
    sigma = 0.1 * math.log(20 / 8) + 1.0
    scaled = dca_dense(q, k, v, original_max_position_embeddings=8, **kw)
    manual = dca_dense(q, k, v, original_max_position_embeddings=0, scale=d**-0.5 * sigma**2, **kw)
    assert rel_err(scaled, manual) <= 1e-6
    assert rel_err(scaled, dca_dense(q, k, v, original_max_position_embeddings=0, **kw)) > 1e-3


def test_packed_documents_use_per_document_positions_and_lengths():
    """Two packed documents (13 and 11 tokens): each equals DCA on the document alone, with
    σ from the document's own length; array-index positions would give a different result."""
    d, chunk_size, local_size, original = 8, 8, 2, 6
    seg, pos = two_docs(13, 11)
    t = len(seg)
    q, k, v = make_qkv(1, t, 4, 2, d, seed=4)
    want = np_dca(q[0], k[0], v[0], pos, seg, chunk_size, local_size, original)
    dense, blockwise = jax_both(q, k, v, pos[None], seg[None], chunk_size, local_size, original, d)
    assert rel_err(dense[0], want) <= 2e-6
    assert rel_err(blockwise[0], want) <= 2e-6
    alone = np_dca(q[0, 13:], k[0, 13:], v[0, 13:], pos[13:], seg[13:], chunk_size, local_size, original)
    assert rel_err(want[13:], alone) <= 1e-12
    wrong, _ = jax_both(q, k, v, np.arange(t)[None], seg[None], chunk_size, local_size, original, d)
    assert rel_err(wrong[0, 13:], want[13:]) > 1e-3
    np.testing.assert_array_equal(np.asarray(document_lengths(jnp.asarray(pos[None]), jnp.asarray(seg[None])))[0],
                                  [13] * 13 + [11] * 11)


def test_blockwise_gradients_match_dense():
    """Memory-efficient DCA (custom_vjp, three query variants) gradients == autodiff of the dense path."""
    d = 8
    seg, pos = two_docs(15, 9)
    t = len(seg)
    q, k, v = (jnp.asarray(x, jnp.float32) for x in make_qkv(2, t, 4, 1, d, seed=5))
    kw = dict(positions=jnp.asarray(pos)[None], segment_ids=jnp.asarray(seg)[None],
              inv_freq=default_inv_freq(THETA, d), chunk_size=8, local_size=2, original_max_position_embeddings=7)
    dout = jnp.asarray(np.random.default_rng(0).standard_normal((2, t, 4, d)), jnp.float32)

    @jax.jit
    def grads(q, k, v):
        a = jax.vjp(lambda q, k, v: dca_dense(q, k, v, **kw), q, k, v)[1](dout)
        b = jax.vjp(lambda q, k, v: dca_blockwise(q, k, v, block_size=4, **kw), q, k, v)[1](dout)
        return a, b

    ga, gb = grads(q, k, v)
    for x, y in zip(ga, gb, strict=True):
        assert rel_err(y, x) <= 1e-5


def test_dispatch_through_dca_context():
    d, t = 8, 20
    q, k, v = (jnp.asarray(x, jnp.float32) for x in make_qkv(1, t, 2, 1, d, seed=6))
    ctx = DcaContext(default_inv_freq(THETA, d), 8, 2, 0)
    pos = jnp.arange(t)[None]
    want = np_dca(*(np.asarray(x[0], np.float64) for x in (q, k, v)), np.arange(t), np.zeros(t), 8, 2)
    for impl in ("xla", "blockwise"):
        assert rel_err(dca(q, k, v, ctx=ctx, positions=pos, impl=impl, block_size=8)[0], want) <= 2e-6
