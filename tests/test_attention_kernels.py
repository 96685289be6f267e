"""The fused-kernel path's mask plumbing on CPU (the kernels themselves need a GPU: benchmarks/attention_kernels.py)."""

from __future__ import annotations

import jax.numpy as jnp
import numpy as np
import pytest

from qwen_jax.attention import attend, resolve_impl
from qwen_jax.attention.kernels import kernel_attention, segment_starts
from qwen_jax.attention.masks import attention_mask


def test_segment_starts_give_the_packed_document_mask():
    seg = jnp.asarray([[1, 1, 2, 2, 2, 3, 0, 0], [5, 5, 5, 5, 5, 5, 5, 5]], jnp.int32)
    starts = segment_starts(seg)
    np.testing.assert_array_equal(starts, [[0, 0, 2, 2, 2, 5, 6, 6], [0] * 8])
    # k_start + causality (what the tokamax kernel is given) equals the segment mask
    idx = np.arange(8)
    from_starts = (idx[None, None, :] >= np.asarray(starts)[:, :, None]) & (idx[None, None, :] <= idx[None, :, None])
    np.testing.assert_array_equal(from_starts, attention_mask(8, 8, q_segment_ids=seg, kv_segment_ids=seg))


def test_kernel_and_auto_fall_back_to_reference_on_cpu():
    rng = np.random.default_rng(0)
    q = jnp.asarray(rng.standard_normal((1, 12, 4, 8)), jnp.float32)
    k, v = (jnp.asarray(rng.standard_normal((1, 12, 2, 8)), jnp.float32) for _ in range(2))
    seg = jnp.asarray([[1] * 5 + [2] * 7], jnp.int32)
    assert resolve_impl("auto", jnp.bfloat16) == "xla"  # CPU
    ref = attend(q, k, v, impl="xla", segment_ids=seg, sliding_window=4)
    np.testing.assert_array_equal(kernel_attention(q, k, v, segment_ids=seg, sliding_window=4), ref)
    with pytest.raises(ValueError, match="unknown attention implementation"):
        attend(q, k, v, impl="flash9")
