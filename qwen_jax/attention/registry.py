"""The one table of attention implementations: name -> function + what it can do.

Every choice of attention goes through here: `model.attention` (validated against `names()`),
`attend(impl=...)`, `auto`, the `kernel` fallback, the ring's per-step core and the path Dual
Chunk Attention takes.  Each implementation module registers its own entry next to the code it
describes (`register(...)` at import); the package `qwen_jax.attention` imports them all, and
importing any submodule imports the package first, so the table is complete before any lookup.
This module imports nothing of qwen_jax, which is what keeps the attention modules acyclic.
"""

from __future__ import annotations

import dataclasses
from collections.abc import Callable

import jax
import numpy as np

AUTO = "auto"
# Dual Chunk Attention has no fused kernel: under `auto` it takes the dense path (xla's) up to
# `dca.DENSE_MAX_SEQ` tokens on every platform, the memory-efficient block kernel beyond.
DCA_AUTO = "dense"


@dataclasses.dataclass(frozen=True)
class RingCore:
    """What computes one ring step (`ring.py`), under the name `ring_attention(core=...)` takes.

    `fwd`/`bwd` follow `reference.dense_block_*` (causal-or-unmasked block pair, float32 out/lse,
    backward from the final statistics); None means the blockwise kernel, which takes any mask.
    `supported(dtype)`: run-time check that the core can run here; `auto_rank`: preference under
    `core="auto"` (lower first; None: only when named).
    """

    name: str
    fwd: Callable | None = None
    bwd: Callable | None = None
    masks: bool = False  # segment ids / sliding window / DCA inside the ring
    supported: Callable | None = None
    auto_rank: int | None = None


@dataclasses.dataclass(frozen=True)
class AttentionImpl:
    """One `model.attention` choice.

    `fn(q, k, v, *, segment_ids, sliding_window, scale, **options)`: causal self-attention,
    q [b, t, h, d], k/v [b, t, kv_heads, d]; `options` names the extra keywords it takes.
    `platforms` / `half_precision_only`: where `auto` may pick it (the function itself may run
    elsewhere with its own fallback).  `auto_rank`: preference under `auto` (lower first; None:
    never).  `dca`: how Dual Chunk Attention runs under this choice (`dense`: dense up to
    `dca.DENSE_MAX_SEQ`, `blockwise`: memory-efficient kernel, `ring`: sequence parallel).
    """

    name: str
    fn: Callable
    platforms: frozenset = frozenset({"cpu", "gpu", "tpu"})
    half_precision_only: bool = False
    segment_ids: bool = True
    sliding_window: bool = True
    sequence_parallel: bool = False
    options: tuple[str, ...] = ()
    dca: str = "blockwise"
    ring_core: RingCore | None = None
    auto_rank: int | None = None


_TABLE: dict[str, AttentionImpl] = {}


def register(impl: AttentionImpl) -> AttentionImpl:
    if impl.name in _TABLE or impl.name == AUTO:
        raise ValueError(f"attention implementation {impl.name!r} registered twice")
    _TABLE[impl.name] = impl
    return impl


def names() -> tuple[str, ...]:
    """Every valid `model.attention` value: `auto` and the registered implementations (sorted)."""
    return (AUTO, *sorted(_TABLE))


def get(name: str) -> AttentionImpl:
    if name not in _TABLE:
        raise ValueError(f"unknown attention implementation {name!r}; expected one of {names()}")
    return _TABLE[name]


def runs_here(impl: AttentionImpl, dtype, platform: str) -> bool:
    """`auto` may pick `impl` for inputs of `dtype` (None: unknown) on `platform`."""
    if platform not in impl.platforms:
        return False
    return not impl.half_precision_only or (dtype is not None and np.dtype(dtype).itemsize == 2)


def resolve(name: str, dtype=None, platform: str | None = None) -> str:
    """`auto` -> the best-ranked implementation that runs here (cuDNN on GPU in 16-bit, else xla)."""
    if name != AUTO:
        return get(name).name
    platform = jax.default_backend() if platform is None else platform
    ranked = sorted((i for i in _TABLE.values() if i.auto_rank is not None), key=lambda i: i.auto_rank)
    return next(i.name for i in ranked if runs_here(i, dtype, platform))


def attend(q, k, v, *, impl=AUTO, segment_ids=None, sliding_window=None, scale=None, **options):
    """Run `impl` (resolved for q's dtype); `options` it does not take (block_size, ...) are dropped."""
    entry = get(resolve(impl, q.dtype))
    kw = {key: options[key] for key in entry.options if key in options}
    return entry.fn(q, k, v, segment_ids=segment_ids, sliding_window=sliding_window, scale=scale, **kw)


def dca_path(name: str) -> str:
    """How Dual Chunk Attention runs under `model.attention=name`: dense, blockwise or ring."""
    return DCA_AUTO if name == AUTO else get(name).dca


def ring_cores() -> tuple[str, ...]:
    return (AUTO, *sorted(i.ring_core.name for i in _TABLE.values() if i.ring_core is not None))


def ring_core(name: str, dtype, *, segment_ids=None, sliding_window=None) -> RingCore:
    """The ring's per-step core: `auto` -> the best-ranked one that runs here and takes the masks."""
    cores = {i.ring_core.name: i.ring_core for i in _TABLE.values() if i.ring_core is not None}
    if name != AUTO and name not in cores:
        raise ValueError(f"unknown ring core {name!r}; expected one of {ring_cores()}")
    plain = segment_ids is None and sliding_window is None
    if name == AUTO:
        ranked = sorted((c for c in cores.values() if c.auto_rank is not None), key=lambda c: c.auto_rank)
        return next(c for c in ranked if (plain or c.masks) and (c.supported is None or c.supported(dtype)))
    if not plain and not cores[name].masks:
        raise ValueError(f"ring core {name!r} supports plain causal attention only (no segment_ids, no "
                         "sliding_window); use core='blockwise'")
    return cores[name]
