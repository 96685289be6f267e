"""Synthetic passkey retrieval training data: source kind ``passkey``.

A ``data.sources`` entry ``{"kind": "passkey", "seed": 0, "min_length": 128, "max_length": 1016,
"key_digits": 5, "size": 1000000, "weight": 1.0}`` (no path) yields ``size`` examples; example ``i`` draws
from ``(seed, i)`` alone (so the stream is reproducible and resumable like a file's): a prompt length
uniform in ``[min_length, max_length]``, a depth uniform in [0, 1] and a random ``key_digits``-digit key.
The prompt is exactly what ``qwen_jax.evals.niah`` asks at evaluation (its ``build_prompt``, task
``passkey``: intro, repeated filler with the key sentence at that depth, "What is the pass key? The pass
key is"), so a model trained here is evaluated on the same format.  The target is the answer
``" <key>"`` (Qwen's tokenizer splits digits one per token); only the answer tokens are trained on (loss
mask 1), the prompt is context (mask 0).  No eos is appended: the evaluation reads the first new tokens.
"""

from __future__ import annotations

import dataclasses

import numpy as np

from qwen_jax.data.errors import DataError
from qwen_jax.evals.prompts import build_prompt

KIND = "passkey"
DEFAULTS = {"seed": 0, "min_length": 128, "max_length": 1016, "key_digits": 5, "size": 1_000_000}


def passkey_spec(raw: dict, key: str) -> dict:
    """The checked settings of a ``passkey`` source entry (``key`` names it in errors), defaults filled in."""
    unknown = sorted(set(raw) - set(DEFAULTS) - {"kind", "weight"})
    if unknown:
        raise DataError(f"{key}: unknown field(s) {unknown} for kind 'passkey'; valid: kind, weight, "
                        f"{', '.join(DEFAULTS)}")
    spec = {name: raw.get(name, default) for name, default in DEFAULTS.items()}
    for name, value in spec.items():
        if isinstance(value, bool) or not isinstance(value, int) or value < (0 if name == "seed" else 1):
            raise DataError(f"{key}.{name} must be an integer >= {0 if name == 'seed' else 1}, got {value!r}")
    if spec["min_length"] > spec["max_length"]:
        raise DataError(f"{key}: min_length {spec['min_length']} > max_length {spec['max_length']}")
    if spec["min_length"] < 16:
        raise DataError(f"{key}.min_length must be >= 16 (room for the question), got {spec['min_length']}")
    if spec["key_digits"] > 18:
        raise DataError(f"{key}.key_digits must be <= 18, got {spec['key_digits']}")
    return spec


@dataclasses.dataclass
class PasskeyTrial:
    length: int  # prompt tokens (the answer comes after)
    depth: float  # where the key sentence starts, as a fraction of the filler
    key: int


def draw_trial(spec: dict, i: int) -> PasskeyTrial:
    """Example ``i`` of a source: a function of (seed, i) only."""
    rng = np.random.default_rng([int(spec["seed"]), int(i)])
    digits = int(spec["key_digits"])
    return PasskeyTrial(length=int(rng.integers(spec["min_length"], spec["max_length"] + 1)),
                        depth=float(rng.random()),
                        key=int(rng.integers(10 ** (digits - 1), 10 ** digits)))


class TokenEncoder:
    """The ``encode`` that ``build_prompt`` needs, over a Rust ``tokenizers`` backend (picklable).

    Memoized: a prompt is the same few strings (intro, filler sentence, question) over and over, and
    tokenizing them once is what lets one CPU core feed a GPU at thousands of examples a second."""

    def __init__(self, backend):
        self.backend = backend
        self.memo: dict[str, list[int]] = {}

    def __getstate__(self):
        return {"backend": self.backend, "memo": {}}

    def encode(self, text: str) -> list[int]:
        ids = self.memo.get(text)
        if ids is None:
            ids = self.backend.encode(text, add_special_tokens=False).ids
            if len(self.memo) < 4096:
                self.memo[text] = ids
        return list(ids)


def passkey_example(tok, trial: dict) -> tuple[list[int], list[int]]:
    """(ids, loss mask) of one trial: the evaluation's prompt (mask 0), then the answer " <key>" (mask 1)."""
    prompt = build_prompt(tok, KIND, int(trial["length"]), float(trial["depth"]), int(trial["key"]), chat=False)
    answer = tok.encode(f" {int(trial['key'])}")
    return prompt + answer, [0] * len(prompt) + [1] * len(answer)
