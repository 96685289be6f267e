"""One attention interface for the model; the implementation is chosen by name in `registry.py`.

    attend(q, k, v, impl=..., segment_ids=..., sliding_window=...) -> out

q [batch, seq, heads, head_dim]; k, v [batch, seq, kv_heads, head_dim] (GQA: K/V are never
repeated in memory).  Causal, packed segments never attend to each other, optional sliding
window (transformers' rule: 0 <= q - k < window).  Implementations (each registers itself with
its capabilities; `registry.names()` is the list `model.attention` is validated against):

* `xla`: plain full attention (`reference.py`), the oracle for every other path;
* `cudnn`: cuDNN flash attention (GPU, bf16/fp16); packed documents through cuDNN's packed layout;
* `blockwise`: online softmax over key blocks, O(seq * block) memory (`blockwise.py`);
* `ring`: sequence parallel over the `seq` mesh axis (`ring.py`);
* `kernel`: the fastest fused GPU/TPU kernel available (`kernels.py`);
* `auto`: the best available on the current platform (`registry.resolve`).

Dual Chunk Attention needs the *unrotated* q/k (three query rotations), so it has its own
entry point `dca(...)` driven by a `DcaContext`; the registry says which DCA path each name takes.
"""

from __future__ import annotations

import dataclasses

import numpy as np

# Every implementation module is imported here so that the registry is complete whenever any
# part of the package is used (importing a submodule runs this file first).  The `dca` submodule
# is imported under another name *before* the `dca()` function below is defined: the first
# import of a submodule binds it as a package attribute, which would otherwise replace the function.
from qwen_jax.attention import blockwise, kernels, reference, registry, ring  # noqa: F401
from qwen_jax.attention import dca as dca_module
from qwen_jax.attention.registry import resolve as resolve_impl

__all__ = ["DcaContext", "attend", "dca", "resolve_impl"]


@dataclasses.dataclass(frozen=True, eq=False)
class DcaContext:
    """What DCA needs besides q/k/v: default RoPE frequencies and the dual_chunk_attention_config."""

    inv_freq: np.ndarray
    chunk_size: int
    local_size: int
    original_max_position_embeddings: int


def attend(q, k, v, *, impl="xla", segment_ids=None, sliding_window=None, scale=None, block_size=512,
           max_segments=None):
    """`impl` from the registry (`auto` resolved for q's dtype).  `max_segments`: static bound on
    packed documents per row for cuDNN's packed layout (`kernels.cudnn_attention`; None = derived
    from the sequence length); `block_size`: blockwise and ring key/query block."""
    return registry.attend(q, k, v, impl=impl, segment_ids=segment_ids, sliding_window=sliding_window, scale=scale,
                           block_size=block_size, max_segments=max_segments)


def dca(q, k, v, *, ctx: DcaContext, positions, segment_ids=None, impl="xla", block_size=512):
    """Dual Chunk Attention on unrotated q/k (docs/long_context.md §DCA)."""
    return dca_module.dca_attention(q, k, v, positions=positions, segment_ids=segment_ids, inv_freq=ctx.inv_freq,
                                    chunk_size=ctx.chunk_size, local_size=ctx.local_size,
                                    original_max_position_embeddings=ctx.original_max_position_embeddings,
                                    impl=impl, block_size=block_size)
