"""The attention registry: names, capabilities, `auto`, the DCA path and the ring core it decides."""

from __future__ import annotations

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from qwen_jax.attention import attend, registry
from qwen_jax.attention.reference import xla_attention
from qwen_jax.config import ConfigError, QwenConfig


def test_names_are_the_valid_model_attention_values():
    assert set(registry.names()) == {"auto", "xla", "cudnn", "blockwise", "ring", "kernel"}
    QwenConfig(num_hidden_layers=1).validate()  # the default (`xla`) is valid
    with pytest.raises(ConfigError, match=r"'attention'.*must be one of \('auto', 'blockwise'"):
        QwenConfig(num_hidden_layers=1, attention="flash").validate()


@pytest.mark.parametrize(("dtype", "platform", "want"), [
    (jnp.bfloat16, "gpu", "cudnn"), (jnp.float16, "gpu", "cudnn"), (jnp.float32, "gpu", "xla"), (None, "gpu", "xla"),
    (jnp.bfloat16, "cpu", "xla"), (jnp.bfloat16, "tpu", "xla"), (jnp.float32, "cpu", "xla"),
])
def test_auto_is_cudnn_on_gpu_in_16_bit_else_xla(dtype, platform, want):
    assert registry.resolve("auto", dtype, platform) == want
    assert registry.resolve("blockwise", dtype, platform) == "blockwise"  # a named choice is kept


def test_unknown_names_are_refused():
    with pytest.raises(ValueError, match="unknown attention implementation 'flash'"):
        registry.resolve("flash")
    with pytest.raises(ValueError, match="registered twice"):
        registry.register(registry.get("xla"))


def test_dca_path_per_name():
    assert {n: registry.dca_path(n) for n in registry.names()} == {
        "auto": "dense", "xla": "dense", "cudnn": "blockwise", "blockwise": "blockwise", "kernel": "blockwise",
        "ring": "ring"}


def test_ring_core_choice():
    seg = jnp.zeros((1, 4), jnp.int32)
    assert registry.ring_cores() == ("auto", "blockwise", "cudnn", "dense")
    auto = registry.ring_core("auto", jnp.bfloat16).name
    assert auto == ("cudnn" if jax.default_backend() == "gpu" else "blockwise")
    assert registry.ring_core("auto", jnp.bfloat16, segment_ids=seg).name == "blockwise"
    assert registry.ring_core("auto", jnp.float32).name == "blockwise"
    assert registry.ring_core("dense", jnp.float32).fwd is not None
    with pytest.raises(ValueError, match="plain causal attention only"):
        registry.ring_core("dense", jnp.float32, sliding_window=4)


@pytest.mark.parametrize("name", ["auto", "xla", "blockwise", "ring", "kernel"])
def test_every_name_that_runs_on_cpu_matches_the_reference(name):
    """Segments and a sliding window through each registered entry (ring without a mesh: one device)."""
    q, k, v = (jax.random.normal(key, (2, 24, h, 8)) for key, h in zip(jax.random.split(jax.random.key(1), 3),
                                                                      (4, 2, 2), strict=True))
    seg = jnp.asarray([[1] * 10 + [2] * 14, [1] * 24], jnp.int32)
    got = attend(q, k, v, impl=name, segment_ids=seg, sliding_window=7, block_size=8)
    want = xla_attention(q, k, v, segment_ids=seg, sliding_window=7)
    assert float(np.max(np.abs(np.asarray(got) - np.asarray(want)))) < 1e-5
