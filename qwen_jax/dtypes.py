"""Floating-point dtype names: the one table of what users may write (`bf16`, `fp32`, ...) and what
safetensors headers say (`BF16`, `F32`, ...), mapped to numpy dtypes (bfloat16 from `ml_dtypes`)."""

from __future__ import annotations

from typing import Any

import ml_dtypes
import numpy as np

FLOAT_DTYPES = ("float32", "bfloat16", "float16")  # what a model computes or stores its parameters in
ALIASES = {"fp32": "float32", "f32": "float32", "bf16": "bfloat16", "fp16": "float16", "f16": "float16"}
SAFETENSORS_CODES = {"BF16": "bfloat16", "F16": "float16", "F32": "float32", "F64": "float64"}


def dtype_name(value: Any) -> str:
    """The canonical name of a dtype given as an alias (`bf16`), a name, a numpy/JAX dtype or a scalar type.
    Unknown names come back unchanged (for the caller's own error message)."""
    name = getattr(value, "__name__", None) or getattr(value, "name", None) or str(value)
    return ALIASES.get(name.lower(), name)


def numpy_dtype(value: Any) -> np.dtype:
    """The numpy dtype of a name, alias or dtype (`bfloat16` is ml_dtypes' bfloat16)."""
    name = dtype_name(value)
    return np.dtype(ml_dtypes.bfloat16 if name == "bfloat16" else name)


def from_safetensors(code: str) -> np.dtype | None:
    """The numpy dtype of a safetensors dtype code (`BF16`); None for codes without a float mapping here."""
    return numpy_dtype(SAFETENSORS_CODES[code]) if code in SAFETENSORS_CODES else None


def to_safetensors(dtype: Any) -> str | None:
    """The safetensors dtype code of a dtype (None if it has none here)."""
    return {v: k for k, v in SAFETENSORS_CODES.items()}.get(np.dtype(dtype).name)
