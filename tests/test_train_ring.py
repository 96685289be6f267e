"""Ring attention inside training: a step on a seq=4 mesh gives the loss, gradients and update of seq=1."""

from __future__ import annotations

import jax
import numpy as np
import pytest

from configs.base import get_config
from qwen_jax import sharding
from qwen_jax.config import config_from_dict
from qwen_jax.presets import get_preset
from qwen_jax.trainer import optimizer as opt
from qwen_jax.trainer import train_step as ts
from qwen_jax.trainer.synthetic import SyntheticBatches

VOCAB, SEQ, BATCH = 512, 64, 4


def run_steps(mesh_shape: dict, attention: str, steps: int = 2):
    c = get_config()
    c.optimizer.warmup_steps = 0
    c.optimizer.learning_rate = 1e-2
    cfg = config_from_dict(get_preset("tiny"), vocab_size=VOCAB, dtype="float32", attention=attention,
                           attention_block_size=8)
    mesh = sharding.make_mesh(mesh_shape, devices=jax.devices()[: int(np.prod(list(mesh_shape.values())))])
    ring = sharding.axis_size("seq", mesh)
    graphdef, abstract, p_sh = ts.param_shardings(cfg, mesh)
    params = ts.init_params(cfg, 0, p_sh)
    spec = opt.resolve_freeze(params)
    tx, sched = opt.make_optimizer(params, c.optimizer, 10, spec)
    state_sh = ts.state_shardings(tx, abstract, p_sh, mesh)
    state = ts.init_state(params, tx, 0, state_sh)
    batch_sh = ts.batch_shardings(mesh, BATCH, SEQ)
    step = ts.make_train_step(graphdef, tx, sched, spec, mesh=mesh, state_sh=state_sh, batch_sh=batch_sh,
                              chunk_size=16, zigzag=ring > 1)
    data = SyntheticBatches(BATCH, SEQ, VOCAB)
    from flax import nnx

    from qwen_jax.trainer.loss import model_loss_sums

    def loss(p, batch):
        return model_loss_sums(nnx.merge(graphdef, p), batch, chunk_size=16, zigzag=ring > 1)[0]

    first = ts.permute_batch_for_ring(SyntheticBatches(BATCH, SEQ, VOCAB).global_batch(0), ring)
    first = {k: jax.device_put(v, batch_sh[k]) for k, v in first.items() if k in ts.BATCH_KEYS}
    with jax.set_mesh(mesh):
        grads = jax.device_get(jax.jit(jax.grad(loss))(state["params"], first))
    out = []
    for _ in range(steps):
        local = ts.permute_batch_for_ring(next(data), ring)
        batch = {k: jax.device_put(v, batch_sh[k]) for k, v in local.items() if k in ts.BATCH_KEYS}
        state, metrics = step(state, batch)
        out.append(jax.device_get(metrics))
    return out, grads


def test_seq4_ring_step_equals_seq1():
    ref_metrics, ref_grads = run_steps({"fsdp": 1}, "xla")
    ring_metrics, ring_grads = run_steps({"fsdp": 2, "seq": 4}, "ring")
    for a, b in zip(ref_metrics, ring_metrics, strict=True):  # two full optimizer steps
        assert float(b["loss"]) == pytest.approx(float(a["loss"]), rel=1e-5)
        assert float(b["grad_norm"]) == pytest.approx(float(a["grad_norm"]), rel=1e-5)
    flat_ref, flat_ring = opt.flat_params(ref_grads), opt.flat_params(ring_grads)
    for path, r in flat_ref.items():  # every gradient, relative to its norm
        err = np.linalg.norm(flat_ring[path] - r) / np.linalg.norm(r)
        assert err <= 1e-5, (path, err)


def test_zigzag_permutation_keeps_rows_together():
    batch = SyntheticBatches(2, 32, VOCAB).global_batch(0)
    permuted = ts.permute_batch_for_ring(batch, 4)
    from qwen_jax.attention.ring import zigzag_permutation

    perm = zigzag_permutation(32, 4)
    for k in ts.BATCH_KEYS:
        np.testing.assert_array_equal(permuted[k], batch[k][:, perm])
    assert ts.permute_batch_for_ring(batch, 1) is batch
