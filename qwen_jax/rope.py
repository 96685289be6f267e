"""Rotary position embeddings: inverse frequencies (default, linear, dynamic NTK, YaRN) and rotation.

The math is in docs/long_context.md §RoPE, §Scaling and §YaRN; it follows transformers'
`ROPE_INIT_FUNCTIONS` (v5 semantics: YaRN uses the explicit `factor`).  Conventions that
matter for Hugging Face parity:

* rotate-half ("NeoX") pairing `(j, j + D/2)`, never interleaved;
* angles `position * inv_freq` in float32;
* YaRN's attention factor multiplies both cos and sin (so logits scale by its square);
* cos/sin are cast to the activation dtype before rotating, as transformers does.

Everything here is a pure function of a plain rope dict (`QwenConfig.rope`), so it can be
tested against transformers and float64 numpy values without building a model.
"""

from __future__ import annotations

import math

import jax.numpy as jnp
import numpy as np


def _pos_freqs(theta: float, dim: int) -> np.ndarray:
    """`theta^(2j/dim)` as a correctly rounded float32 (what torch's float32 pow gives).

    numpy's vectorised float32 pow is off by an ulp in ~10% of entries; at position 1e5 one
    ulp of a frequency moves the angle by ~6e-3 rad, so parity needs the exact rounding.
    """
    exponent = np.arange(0, dim, 2, dtype=np.float32) / np.float32(dim)
    return np.power(np.float64(np.float32(theta)), exponent.astype(np.float64)).astype(np.float32)


def default_inv_freq(theta: float, dim: int) -> np.ndarray:
    """`1 / theta^(2j/dim)` in float32, computed as transformers does."""
    return (np.float32(1.0) / _pos_freqs(theta, dim)).astype(np.float32)


def yarn_mscale(scale: float, mscale: float = 1.0) -> float:
    return 1.0 if scale <= 1 else 0.1 * mscale * math.log(scale) + 1.0


def yarn_correction_range(rope: dict, dim: int) -> tuple[float, float]:
    """(low, high) pair indices of YaRN's ramp, docs/long_context.md §YaRN steps 1-2."""
    theta = rope["rope_theta"]
    original = rope["original_max_position_embeddings"]
    beta_fast = rope.get("beta_fast") or 32
    beta_slow = rope.get("beta_slow") or 1

    def correction_dim(rotations):
        return dim * math.log(original / (rotations * 2 * math.pi)) / (2 * math.log(theta))

    low, high = correction_dim(beta_fast), correction_dim(beta_slow)
    if rope.get("truncate", True):
        low, high = math.floor(low), math.ceil(high)
    return max(low, 0), min(high, dim - 1)


def yarn_inv_freq(rope: dict, dim: int, max_position_embeddings: int) -> tuple[np.ndarray, float]:
    factor = rope.get("factor")
    if factor is None:
        factor = max_position_embeddings / rope["original_max_position_embeddings"]
    attention_factor = rope.get("attention_factor")
    if attention_factor is None:
        mscale, mscale_all_dim = rope.get("mscale"), rope.get("mscale_all_dim")
        if mscale and mscale_all_dim:
            attention_factor = yarn_mscale(factor, mscale) / yarn_mscale(factor, mscale_all_dim)
        else:
            attention_factor = yarn_mscale(factor)
    low, high = yarn_correction_range(rope, dim)
    if low == high:
        high += 0.001
    ramp = np.clip((np.arange(dim // 2, dtype=np.float32) - low) / (high - low), 0, 1).astype(np.float32)
    pos_freqs = _pos_freqs(rope["rope_theta"], dim)
    extrapolation = (1.0 / pos_freqs).astype(np.float32)
    interpolation = (1.0 / (np.float32(factor) * pos_freqs)).astype(np.float32)
    extrapolation_weight = (1 - ramp).astype(np.float32)
    inv_freq = interpolation * (1 - extrapolation_weight) + extrapolation * extrapolation_weight
    return inv_freq.astype(np.float32), float(attention_factor)


def inv_freq_and_scaling(rope: dict, dim: int, max_position_embeddings: int) -> tuple[np.ndarray, float]:
    """Static inverse frequencies [dim/2] (float32) and the cos/sin attention scaling.

    Dynamic NTK depends on the sequence length; its static table is the default one, and
    `dynamic_inv_freq` gives the length-dependent version.
    """
    kind = rope.get("rope_type", "default")
    theta = rope["rope_theta"]
    if kind in ("default", "dynamic"):
        return default_inv_freq(theta, dim), 1.0
    if kind == "linear":
        return (default_inv_freq(theta, dim) / np.float32(rope["factor"])).astype(np.float32), 1.0
    if kind == "yarn":
        return yarn_inv_freq(rope, dim, max_position_embeddings)
    raise ValueError(f"unsupported rope_type {kind!r}")


def dynamic_inv_freq(rope: dict, dim: int, max_position_embeddings: int, seq_len) -> jnp.ndarray:
    """Dynamic-NTK inverse frequencies for the (possibly traced) current length `seq_len`.

    transformers recomputes the base as `theta * (s*T/Lmax - (s-1))^(D/(D-2))` with
    `T = max(seq_len, Lmax)`; for T <= Lmax it is the default table.  Stateless here: the
    length of the current call decides (equal to transformers on a fresh model).
    """
    factor = rope["factor"]
    length = jnp.maximum(jnp.asarray(seq_len, jnp.float32), jnp.float32(max_position_embeddings))
    base = rope["rope_theta"] * ((factor * length / max_position_embeddings) - (factor - 1)) ** (dim / (dim - 2))
    exponent = jnp.arange(0, dim, 2, dtype=jnp.float32) / dim
    return 1.0 / (base.astype(jnp.float32) ** exponent)


def cos_sin(positions: jnp.ndarray, inv_freq: jnp.ndarray, scaling: float, dtype) -> tuple[jnp.ndarray, jnp.ndarray]:
    """cos/sin tables [..., seq, dim] for integer positions [..., seq], float32 angles."""
    angles = positions.astype(jnp.float32)[..., None] * jnp.asarray(inv_freq, jnp.float32)
    angles = jnp.concatenate([angles, angles], axis=-1)
    return (jnp.cos(angles) * scaling).astype(dtype), (jnp.sin(angles) * scaling).astype(dtype)


def rotate_half(x: jnp.ndarray) -> jnp.ndarray:
    half = x.shape[-1] // 2
    return jnp.concatenate([-x[..., half:], x[..., :half]], axis=-1)


def apply_rope(x: jnp.ndarray, cos: jnp.ndarray, sin: jnp.ndarray) -> jnp.ndarray:
    """Rotate x [batch, seq, heads, dim] by cos/sin [batch, seq, dim] (rotate-half layout)."""
    cos, sin = cos[..., None, :], sin[..., None, :]
    return x * cos + rotate_half(x) * sin


def rope_tables(rope: dict, dim: int, max_position_embeddings: int, positions: jnp.ndarray, dtype):
    """cos/sin for `positions` [batch, seq] under any supported rope dict (dynamic included)."""
    if rope.get("rope_type") == "dynamic":
        seq_len = jnp.max(positions) + 1
        inv_freq = dynamic_inv_freq(rope, dim, max_position_embeddings, seq_len)
        return cos_sin(positions, inv_freq, 1.0, dtype)
    inv_freq, scaling = inv_freq_and_scaling(rope, dim, max_position_embeddings)
    return cos_sin(positions, inv_freq, scaling, dtype)
