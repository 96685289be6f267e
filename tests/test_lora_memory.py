"""What a LoRA step differentiates and keeps: the base gets no gradient, remat policies give the same gradients."""

from __future__ import annotations

import re

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from flax import nnx

from qwen_jax import lora as lora_lib
from qwen_jax.config import config_from_dict
from qwen_jax.layers.attention import ATTENTION_NAMES
from qwen_jax.model import ATTENTION_RESIDUAL
from qwen_jax.presets import get_preset
from qwen_jax.trainer.loss import model_loss_sums

SPEC = lora_lib.LoraSpec(rank=4, alpha=8.0)
B, T = 2, 24  # batch and sequence sizes that are no dimension of a tiny kernel (64, 128, 512, heads 4 / 2, 16)


def _batch(vocab):
    ids = jnp.asarray(np.random.default_rng(0).integers(0, vocab, (B, T + 1)), jnp.int32)
    return {"input_ids": ids[:, :-1], "targets": ids[:, 1:], "loss_mask": jnp.ones((B, T), jnp.float32)}


def _adapter_loss(remat: str, scan: bool):
    """(loss of adapters, adapters, batch): a tiny float32 model, random A and B (so every adapter has a gradient)."""
    cfg = config_from_dict(get_preset("tiny"), vocab_size=512, dtype="float32", attention="xla", remat=remat,
                           scan_layers=scan)
    model = lora_lib.build(cfg, SPEC, nnx.Rngs(0))
    graphdef, params = nnx.split(model)
    params = nnx.to_pure_dict(params)
    adapters, base = lora_lib.partition(params, lora_lib.is_adapter)
    keys = iter(jax.random.split(jax.random.PRNGKey(1), 64))
    adapters = jax.tree.map(lambda a: 0.1 * jax.random.normal(next(keys), a.shape, a.dtype), adapters)
    batch = _batch(cfg.vocab_size)

    def loss(adapters):
        return model_loss_sums(nnx.merge(graphdef, lora_lib.combine(adapters, base)), batch, chunk_size=8)[0]

    return loss, adapters, cfg


@pytest.mark.parametrize("scan", [pytest.param(False, marks=pytest.mark.slow), True], ids=["unrolled", "scan"])
def test_remat_policies_give_the_loss_and_adapter_gradients_of_no_remat(scan):
    """save_attention remat against remat none: same loss (1e-6) and adapter gradients (5e-6 of each gradient's
    largest element; float32).  Full remat has its own tests (tests/test_lora.py, tests/test_model_grads.py)."""
    results = {}
    for remat in ("none", "save_attention"):
        loss, adapters, _ = _adapter_loss(remat, scan)
        results[remat] = jax.jit(jax.value_and_grad(loss))(adapters)
    ref_loss, ref_grads = results["none"]
    for remat in ("save_attention",):
        got_loss, got_grads = results[remat]
        np.testing.assert_allclose(got_loss, ref_loss, rtol=1e-6, err_msg=remat)
        flat_ref, flat_got = lora_lib.flatten(ref_grads), lora_lib.flatten(got_grads)
        assert len(flat_ref) == 14  # A and B of 7 projections
        worst = 0.0
        for path, ref in flat_ref.items():
            ref, got = np.asarray(ref), np.asarray(flat_got[path])
            assert np.abs(ref).max() > 0, path
            worst = max(worst, float(np.abs(got - ref).max() / np.abs(ref).max()))
        print(f"[remat] {remat} scan={scan}: loss {float(got_loss)} vs {float(ref_loss)}; worst grad diff {worst:.1e}")
        assert worst <= 5e-6, remat  # float32 summation order of recomputed vs saved values


def test_save_attention_keeps_the_attention_tensors_and_no_mlp_activation(capsys):
    """Unrolled layers under save_attention: the backward keeps q, k, v, the attention output and the residual
    of every layer, and no [batch, seq, intermediate] MLP activation (those are recomputed)."""
    loss, adapters, cfg = _adapter_loss("save_attention", scan=False)
    jax.ad_checkpoint.print_saved_residuals(loss, adapters)
    saved = capsys.readouterr().out.splitlines()
    for name in (*ATTENTION_NAMES, ATTENTION_RESIDUAL):
        assert sum(f"named '{name}'" in line for line in saved) == cfg.num_hidden_layers, name
    mlp = re.compile(rf"^\w+\[{B},{T},{cfg.intermediate_size}\]")
    assert not [line for line in saved if mlp.match(line)]
    loss_none, adapters_none, _ = _adapter_loss("none", scan=False)
    jax.ad_checkpoint.print_saved_residuals(loss_none, adapters_none)
    assert [line for line in capsys.readouterr().out.splitlines() if mlp.match(line)]  # without remat they are kept


def _dot_output_dims(jaxpr_text: str) -> list[tuple[int, ...]]:
    return [tuple(sorted(int(d) for d in dims.split(",") if d))
            for dims in re.findall(r"\w+\[([\d,]*)\] = dot_general\[", jaxpr_text)]


@pytest.mark.parametrize("scan", [False, True], ids=["unrolled", "scan"])
def test_lora_train_step_differentiates_no_base_weight(scan):
    """The trainer's jitted LoRA step (bf16 base, as the benchmark): no matmul produces an array shaped like a
    base weight (a weight gradient) -- only the adapters' weight gradients are computed."""
    from configs.base import get_config
    from qwen_jax import sharding
    from qwen_jax.trainer import optimizer as opt_lib
    from qwen_jax.trainer import train_step as ts

    c = get_config()
    spec = lora_lib.LoraSpec(rank=4, alpha=8.0, base_dtype="bfloat16")
    cfg = config_from_dict(get_preset("tiny"), vocab_size=512, dtype="bfloat16", remat="save_attention",
                           scan_layers=scan)
    cfg, _ = lora_lib.base_config(cfg, {}, spec)
    mesh = sharding.make_mesh({"fsdp": 1}, devices=jax.devices()[:1])
    graphdef, abstract, p_sh = ts.param_shardings(cfg, mesh, spec)
    freeze = lora_lib.freeze_base(opt_lib.resolve_freeze(abstract), abstract, spec)
    tx, sched = opt_lib.make_optimizer(abstract, c.optimizer, 10, freeze)
    state_sh = ts.state_shardings(tx, abstract, p_sh, mesh)
    batch_sh = ts.batch_shardings(mesh, B, T, keys=("input_ids", "targets", "loss_mask"))
    step = ts.make_train_step(graphdef, tx, sched, freeze, mesh=mesh, state_sh=state_sh, batch_sh=batch_sh,
                              chunk_size=8)
    state = ts.abstract_state(tx, abstract, state_sh)
    batch = jax.tree.map(lambda a: jax.ShapeDtypeStruct(a.shape, a.dtype), _batch(cfg.vocab_size))
    with jax.set_mesh(mesh):
        text = str(jax.make_jaxpr(step.jitted)(state, batch))
    dots = set(_dot_output_dims(text))

    def layer_shapes(keep):
        return {tuple(sorted(v.shape[1:] if p.startswith("layers/") else v.shape))
                for p, v in lora_lib.flatten(abstract).items() if keep(p) and v.ndim >= 2}

    base = layer_shapes(lambda p: not lora_lib.is_adapter(p))
    adapters = layer_shapes(lora_lib.is_adapter)
    assert len(base) >= 4 and adapters <= dots  # the adapters' gradients are there: the check can see them
    assert not base & dots, sorted(base & dots)
