"""Each private third-party API in qwen_jax/compat.py resolves on the installed versions and does its job.

On CPU: the symbols resolve (or fail with the typed `PrivateApiError`), the cuDNN backward
primitive accepts our operand list (abstract evaluation needs no GPU), and the Orbax helpers
build what Orbax itself builds.  On a GPU the cuDNN block pair is compared with the XLA one.
"""

from __future__ import annotations

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from qwen_jax import compat
from qwen_jax.attention.reference import dense_block_bwd, dense_block_fwd

ON_GPU = jax.default_backend() == "gpu"


def test_missing_private_symbols_fail_typed():
    with pytest.raises(compat.PrivateApiError, match="absent"):
        compat.cudnn_mask_type("NO_SUCH_MASK")


def test_cudnn_symbols_resolve():
    assert {compat.cudnn_mask_type(n).name for n in ("NO_MASK", "CAUSAL", "PADDING_CAUSAL")} == \
        {"NO_MASK", "CAUSAL", "PADDING_CAUSAL"}
    assert compat.cudnn_packed_api()
    assert compat.cudnn_block_api()
    if not ON_GPU:
        with pytest.raises(RuntimeError, match="cuDNN"):  # the check itself resolves; no cuDNN on CPU
            compat.cudnn_version()


def test_cudnn_backward_operands_match_the_primitive():
    """Abstract evaluation binds the primitive with our operands and parameters (no GPU needed)."""
    q = jax.ShapeDtypeStruct((2, 8, 4, 16), jnp.bfloat16)
    stat = jax.ShapeDtypeStruct((2, 4, 8), jnp.float32)
    grads = jax.eval_shape(lambda q, s: compat.cudnn_attention_bwd(q, q, q, s, q, q, scale=0.25, mask="CAUSAL"),
                           q, stat)
    assert [(g.shape, g.dtype) for g in grads] == [((2, 8, 4, 16), jnp.bfloat16)] * 3


@pytest.mark.skipif(not ON_GPU, reason="cuDNN kernels need a GPU")
@pytest.mark.parametrize("causal", [True, False])
def test_cudnn_block_pair_matches_xla(causal):
    from qwen_jax.attention.kernels import cudnn_block_bwd, cudnn_block_fwd

    keys = jax.random.split(jax.random.key(0), 4)
    q, k, v, dout = (jax.random.normal(kk, (2, 128, 4, 64), jnp.bfloat16) for kk in keys)
    out, lse = cudnn_block_fwd(q, k, v, causal=causal, scale=0.125)
    ref_out, ref_lse = dense_block_fwd(q, k, v, causal=causal, scale=0.125)
    np.testing.assert_allclose(out, ref_out, atol=2e-2)
    np.testing.assert_allclose(lse, ref_lse, atol=2e-2)
    got = cudnn_block_bwd(q, k, v, ref_out, ref_lse, dout, causal=causal, scale=0.125)
    want = dense_block_bwd(q, k, v, ref_out, ref_lse, dout, causal=causal, scale=0.125)
    for g, w in zip(got, want, strict=True):
        np.testing.assert_allclose(g, w, atol=5e-2)


def test_tokamax_symbols_resolve_or_fail_typed():
    from qwen_jax.attention.kernels import tokamax_available

    if not tokamax_available():
        with pytest.raises(compat.PrivateApiError):
            compat.tokamax_kernels()
        return
    assert compat.tokamax_kernels()
    mask = compat.tokamax_mask(None, is_causal=True)
    assert mask.is_causal


def test_orbax_helpers_build_what_orbax_builds(tmp_path):
    import orbax.checkpoint as ocp
    import tensorstore as ts

    assert issubclass(compat.orbax_numpy_handler(), ocp.type_handlers.NumpyHandler)
    assert compat.orbax_save_args() == ocp.SaveArgs()
    registry = compat.orbax_type_handler_registry((bytes, ocp.type_handlers.NumpyHandler()))
    assert isinstance(registry.get(bytes), ocp.type_handlers.NumpyHandler)
    assert isinstance(registry.get(np.ndarray), ocp.type_handlers.NumpyHandler)  # the defaults follow
    spec = compat.orbax_array_read_spec(str(tmp_path), "a.b", use_zarr3=False, use_ocdbt=True)
    assert spec["kvstore"]["driver"] == "ocdbt" and spec["kvstore"]["path"] == "a.b"
    assert isinstance(compat.orbax_ts_context(use_ocdbt=True), ts.Context)


@pytest.mark.parametrize("handler_init", ["installed", "without_deepcopy_host_arrays"])
def test_streaming_save_works_with_either_numpy_handler_signature(tmp_path, monkeypatch, handler_init):
    """Orbax 0.12.4 (the GPU machines') has no `deepcopy_host_arrays`; 0.12.8 copies host arrays unless told
    not to.  The streaming save passes the argument only where it exists and writes the same checkpoint."""
    from qwen_jax import checkpoint_format as cf

    handler = compat.orbax_numpy_handler()
    if handler_init == "without_deepcopy_host_arrays":
        installed = handler.__init__

        def older_init(self, metadata_key=None, ocdbt_process_id=None):  # orbax 0.12.4's signature
            installed(self, metadata_key=metadata_key, ocdbt_process_id=ocdbt_process_id)

        monkeypatch.setattr(handler, "__init__", older_init)
        assert compat.orbax_numpy_handler_kwargs() == {}
    else:
        assert compat.orbax_numpy_handler_kwargs() == {"deepcopy_host_arrays": False}
    w = np.arange(24, dtype=np.float32).reshape(4, 6)
    lazy = {"w": cf.LazyArray(w.shape, np.dtype(np.float32), 0, 2, lambda k: w[2 * k:2 * k + 2])}
    cf.save_params_streaming(str(tmp_path / "ckpt"), 0, lazy)
    restored = cf.restore_params(str(tmp_path / "ckpt"), 0)
    np.testing.assert_array_equal(np.asarray(restored["w"]), w)
