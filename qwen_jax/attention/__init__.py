"""One attention interface for the model; the implementation is chosen by name.

    attend(q, k, v, impl=..., segment_ids=..., sliding_window=...) -> out

q [batch, seq, heads, head_dim]; k, v [batch, seq, kv_heads, head_dim] (GQA: K/V are never
repeated in memory).  Causal, packed segments never attend to each other, optional sliding
window (transformers' rule: 0 <= q - k < window).  Implementations:

* `xla`: plain full attention (`reference.py`), the oracle for every other path;
* `cudnn`: cuDNN flash attention (GPU, bf16/fp16); packed documents through cuDNN's packed layout;
* `blockwise`: online softmax over key blocks, O(seq * block) memory (`blockwise.py`);
* `ring`: sequence parallel over the `seq` mesh axis (`ring.py`);
* `kernel`: the fastest fused GPU/TPU kernel available (`kernels.py`);
* `auto`: the best available on the current platform.

Dual Chunk Attention needs the *unrotated* q/k (three query rotations), so it has its own
entry point `dca(...)` driven by a `DcaContext`.
"""

from __future__ import annotations

import dataclasses

import jax
import numpy as np

# Import the `dca` submodule *before* defining the `dca()` function below: the first import of
# a submodule binds it as a package attribute, which would otherwise replace the function
# (e.g. after the lazy import inside `dca()` itself, a second `attention.dca(...)` call failed).
from qwen_jax.attention import dca as _dca_module  # noqa: F401
from qwen_jax.attention.reference import xla_attention


@dataclasses.dataclass(frozen=True, eq=False)
class DcaContext:
    """What DCA needs besides q/k/v: default RoPE frequencies and the dual_chunk_attention_config."""

    inv_freq: np.ndarray
    chunk_size: int
    local_size: int
    original_max_position_embeddings: int


def resolve_impl(impl: str, dtype=None) -> str:
    """`auto` -> the best implementation for this platform and dtype."""
    if impl != "auto":
        return impl
    platform = jax.default_backend()
    if platform == "gpu" and dtype is not None and np.dtype(dtype).itemsize == 2:
        return "cudnn"
    return "xla"


def attend(q, k, v, *, impl="xla", segment_ids=None, sliding_window=None, scale=None, block_size=512,
           max_segments=None):
    """`max_segments`: static bound on packed documents per row for cuDNN's packed layout
    (`kernels.cudnn_attention`; None = derived from the sequence length)."""
    impl = resolve_impl(impl, q.dtype)
    if impl == "xla":
        return xla_attention(q, k, v, segment_ids=segment_ids, sliding_window=sliding_window, scale=scale)
    if impl == "cudnn":
        from qwen_jax.attention.kernels import cudnn_attention

        return cudnn_attention(q, k, v, segment_ids=segment_ids, sliding_window=sliding_window, scale=scale,
                               max_segments=max_segments)
    if impl == "blockwise":
        from qwen_jax.attention.blockwise import blockwise_attention

        return blockwise_attention(q, k, v, segment_ids=segment_ids, sliding_window=sliding_window, scale=scale,
                                   block_size=block_size)
    if impl == "ring":
        from qwen_jax.attention.ring import ring_attention

        return ring_attention(q, k, v, segment_ids=segment_ids, sliding_window=sliding_window, scale=scale,
                              block_size=block_size)
    if impl == "kernel":
        from qwen_jax.attention.kernels import kernel_attention

        return kernel_attention(q, k, v, segment_ids=segment_ids, sliding_window=sliding_window, scale=scale,
                                max_segments=max_segments)
    raise ValueError(f"unknown attention implementation {impl!r}")


def dca(q, k, v, *, ctx: DcaContext, positions, segment_ids=None, impl="xla", block_size=512):
    """Dual Chunk Attention on unrotated q/k (docs/long_context.md §DCA)."""
    from qwen_jax.attention.dca import dca_attention  # sys.modules lookup: never the package attribute

    return dca_attention(q, k, v, positions=positions, segment_ids=segment_ids, inv_freq=ctx.inv_freq,
                         chunk_size=ctx.chunk_size, local_size=ctx.local_size,
                         original_max_position_embeddings=ctx.original_max_position_embeddings,
                         impl=impl, block_size=block_size)
