"""Trainer pieces in-process: schedule, decay mask, freezing (bit-identity), sharding, config errors."""

from __future__ import annotations

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from configs.base import get_config
from qwen_jax import sharding
from qwen_jax.config import attention_flops_per_token, config_from_dict
from qwen_jax.metrics import flops_per_token, matmul_params, peak_flops_per_device
from qwen_jax.presets import get_preset
from qwen_jax.trainer import optimizer as opt
from qwen_jax.trainer import train_step as ts
from qwen_jax.trainer.loss import reference_loss
from qwen_jax.trainer.synthetic import SyntheticBatches

VOCAB, SEQ, BATCH = 512, 64, 8


def tiny_cfg(**kw):
    return config_from_dict(get_preset("tiny"), vocab_size=VOCAB, dtype="float32", **kw)


# ---------------------------------------------------------------- optimizer pieces
def test_schedule_warmup_then_decay():
    s = opt.make_schedule(1.0, 100, 10, "cosine", 0.1)
    assert float(s(0)) == 0.0 and abs(float(s(10)) - 1.0) < 1e-6
    assert abs(float(s(100)) - 0.1) < 1e-6 and float(s(50)) < 1.0
    lin = opt.make_schedule(1.0, 100, 0, "linear", 0.0)
    assert abs(float(lin(50)) - 0.5) < 1e-6
    with pytest.raises(ValueError, match="schedule"):
        opt.make_schedule(1.0, 10, 0, "bogus")


def test_decay_mask_excludes_norms_and_biases():
    params = {"layers": {"input_layernorm": {"scale": 0}, "self_attn": {"q_proj": {"kernel": 0, "bias": 0}}},
              "embed_tokens": {"embedding": 0}, "norm": {"scale": 0}}
    m = opt.decay_mask(params)
    assert m["layers"]["self_attn"]["q_proj"] == {"kernel": True, "bias": False}
    assert not m["norm"]["scale"] and not m["layers"]["input_layernorm"]["scale"] and m["embed_tokens"]["embedding"]


def test_freeze_misconfiguration_is_an_error():
    params = jax.eval_shape(lambda: ts.param_shardings(tiny_cfg(), sharding.make_mesh({"fsdp": -1}))[1])
    with pytest.raises(opt.FreezeError, match="matches no parameter"):
        opt.resolve_freeze(params, freeze="layers/mlp/gate_projj")
    with pytest.raises(opt.FreezeError, match="invalid regex"):
        opt.resolve_freeze(params, freeze="(")
    with pytest.raises(opt.FreezeError, match="exceeds"):
        opt.resolve_freeze(params, freeze_layers=3)
    with pytest.raises(opt.FreezeError, match="nothing would train"):
        opt.resolve_freeze(params, freeze=".")
    spec = opt.resolve_freeze(params, freeze_layers=1)
    counts = spec.summary(params)
    assert counts["frozen_paths"][0] == "embed_tokens/embedding"
    assert "layers/mlp/gate_proj/kernel[:1]" in counts["frozen_paths"]
    assert counts["trainable"] + counts["frozen"] == counts["total"] > counts["trainable"] > 0


# ---------------------------------------------------------------- one sharded, frozen, accumulating step
@pytest.fixture(scope="module")
def frozen_run():
    """8 devices (fsdp 4 x tensor 2), freeze embeddings + layer 0 + every q_proj, 2 microbatches, 4 steps."""
    c = get_config()
    c.optimizer.warmup_steps = 0
    c.optimizer.learning_rate = 1e-2
    cfg = tiny_cfg()
    mesh = sharding.make_mesh({"fsdp": 4, "tensor": 2})
    graphdef, abstract, p_sh = ts.param_shardings(cfg, mesh)
    params = ts.init_params(cfg, 0, p_sh)
    spec = opt.resolve_freeze(params, freeze=r"q_proj", freeze_layers=1)
    tx, sched = opt.make_optimizer(params, c.optimizer, 10, spec)
    state_sh = ts.state_shardings(tx, abstract, p_sh, mesh)
    state = ts.init_state(params, tx, 0, state_sh)
    before = jax.tree.map(np.asarray, state["params"])
    batch_sh = ts.batch_shardings(mesh, BATCH, SEQ)
    step = ts.make_train_step(graphdef, tx, sched, spec, mesh=mesh, state_sh=state_sh, batch_sh=batch_sh,
                              chunk_size=24, grad_accum_steps=2)
    data = SyntheticBatches(BATCH, SEQ, VOCAB)
    losses = []
    for _ in range(4):
        batch = {k: jax.device_put(v, batch_sh[k]) for k, v in next(data).items()}
        state, metrics = step(state, batch)
        losses.append(float(metrics["loss"]))
    return dict(cfg=cfg, mesh=mesh, state=state, before=before, after=jax.tree.map(np.asarray, state["params"]),
                losses=losses, spec=spec, state_sh=state_sh, graphdef=graphdef, data=data)


def test_frozen_parameters_bit_identical_others_change(frozen_run):
    before, after = opt.flat_params(frozen_run["before"]), opt.flat_params(frozen_run["after"])
    frozen = frozen_run["spec"].frozen
    assert frozen["layers/self_attn/q_proj/kernel"] == opt.ALL and frozen["layers/mlp/up_proj/kernel"] == 1
    for path, old in before.items():
        new = after[path]
        n = frozen.get(path, 0)
        if n == opt.ALL:
            assert np.array_equal(old, new), path
        elif n:
            assert np.array_equal(old[:n], new[:n]), path
            assert not np.any(old[n:] == new[n:]) or path.endswith("scale"), path
            assert not np.array_equal(old[n:], new[n:]), path
        else:
            assert not np.array_equal(old, new), path


def test_frozen_leaves_have_no_optimizer_state(frozen_run):
    leaves = jax.tree_util.tree_leaves_with_path(frozen_run["state"]["opt_state"])
    paths = [opt.path_str(p) for p, _ in leaves]
    assert not any("q_proj" in p or "embed_tokens" in p for p in paths)
    assert any("mlp/up_proj/kernel" in p for p in paths)


def test_state_is_sharded(frozen_run):
    params = frozen_run["state"]["params"]
    kernel = params["layers"]["mlp"]["gate_proj"]["kernel"]
    assert kernel.sharding.spec == jax.sharding.PartitionSpec(None, "fsdp", "tensor")
    mu = [x for p, x in jax.tree_util.tree_leaves_with_path(frozen_run["state"]["opt_state"])
          if opt.path_str(p).endswith("mu/layers/mlp/gate_proj/kernel")]
    assert len(mu) == 1 and mu[0].sharding.spec == kernel.sharding.spec
    assert len(mu[0].addressable_shards) == 8 and mu[0].addressable_shards[0].data.shape == (2, 16, 64)


def test_sharded_accumulated_loss_matches_plain_forward(frozen_run):
    """Loss of step 1 (8 devices, 2 microbatches, chunked) equals the unsharded full-logits loss at init."""
    from flax import nnx

    data = SyntheticBatches(BATCH, SEQ, VOCAB)
    batch = data.global_batch(0)
    model = nnx.merge(frozen_run["graphdef"], jax.tree.map(jnp.asarray, frozen_run["before"]))
    logits = model(batch["input_ids"], batch["positions"], batch["segment_ids"])
    ref = float(reference_loss(logits, batch["targets"], batch["loss_mask"]))
    np.testing.assert_allclose(frozen_run["losses"][0], ref, rtol=2e-6)


# ---------------------------------------------------------------- metrics
def test_flops_convention():
    cfg = config_from_dict(get_preset("Qwen2.5-0.5B") if "Qwen2.5-0.5B" in _presets() else get_preset("tiny"))
    n = matmul_params(cfg)
    assert flops_per_token(cfg, 4096) == 6 * n + 3 * attention_flops_per_token(cfg, 4096)
    # causal attention, fwd+bwd: 12 * L * H * D * T / 2
    L, H, D = cfg.num_hidden_layers, cfg.num_attention_heads, cfg.head_dim
    assert 3 * attention_flops_per_token(cfg, 4096) == 12 * L * H * D * 4096 / 2
    # PaLM's convention (unmasked attention), the one the PyTorch reference MFU figures use
    assert flops_per_token(cfg, 4096, causal=False) == 6 * n + 12 * L * H * D * 4096
    assert peak_flops_per_device(123.0) == 123.0
    assert peak_flops_per_device() is None  # CPU: MFU n/a


def _presets():
    from qwen_jax.presets import preset_names

    return preset_names()


def test_synthetic_batches_split_over_processes():
    whole = SyntheticBatches(8, 32, 100, seed=3).global_batch(5)
    halves = []
    for p in range(2):
        it = SyntheticBatches(8, 32, 100, seed=3, process_index=p, process_count=2)
        it.set_state({"step": 5})
        halves.append(next(it))
    for k, v in whole.items():
        np.testing.assert_array_equal(v, np.concatenate([h[k] for h in halves]))
    assert whole["loss_mask"].sum() > 0 and (whole["segment_ids"] == 0).any()


def test_full_row_synthetic_batches_are_the_harness_batches():
    """layout="full_rows": one rule-following sequence fills each row, every token counts, positions 0..seq-1,
    no segment ids; the step is given only `full_row_keys` (positions too under ring attention)."""
    data = SyntheticBatches(4, 32, 512, seed=5, layout="full_rows")
    batch = data.global_batch(3)
    assert set(batch) == {"input_ids", "targets", "positions", "loss_mask"}
    assert all(x.shape == (4, 32) for x in batch.values())
    np.testing.assert_array_equal(batch["targets"][:, :-1], batch["input_ids"][:, 1:])
    np.testing.assert_array_equal(batch["positions"], np.tile(np.arange(32), (4, 1)))
    assert (batch["loss_mask"] == 1.0).all()
    assert len({tuple(row[:4]) for row in batch["input_ids"]}) == 4  # each row its own sequence
    again = SyntheticBatches(4, 32, 512, seed=5, layout="full_rows").global_batch(3)
    assert all(np.array_equal(batch[k], again[k]) for k in batch)
    assert not np.array_equal(batch["input_ids"], data.global_batch(4)["input_ids"])
    packed = SyntheticBatches(4, 32, 512, seed=5).global_batch(3)
    assert (packed["segment_ids"] == 0).any() and packed["loss_mask"].sum() < 4 * 32
    assert ts.full_row_keys(1) == ("input_ids", "targets", "loss_mask")
    assert ts.full_row_keys(2) == ("input_ids", "targets", "loss_mask", "positions")
    with pytest.raises(ValueError, match="packed | full_rows"):
        SyntheticBatches(4, 32, 512, layout="full")


def test_printed_speed_is_the_log_windows_not_the_last_steps(tmp_path, capsys):
    """The stdout line at a log step reports tokens over wall time since the previous line: a short last
    interval (a checkpoint or eval sync right after the step) must not print an impossible rate."""
    from qwen_jax.metrics import MetricsLogger

    logger = MetricsLogger(str(tmp_path), peak_flops=1e6, num_devices=1, log_every=3)
    metrics = {"loss": 1.0, "grad_norm": 1.0, "learning_rate": 1e-3}
    times = [0.030, 0.034, 0.002, 0.031, 0.029, 0.033]
    logged = [logger.log(step, metrics, step_time=t, tokens=1000, total_steps=6, flops_per_token=10.0)
              for step, t in enumerate(times, start=1)]
    logger.close()
    lines = [line for line in capsys.readouterr().out.splitlines() if line.startswith("step ")]
    assert [line.split("/")[0] for line in lines] == ["step 3", "step 6"]
    for line, window in zip(lines, (times[:3], times[3:]), strict=True):
        rate = 3000 / sum(window)
        assert f"{rate:,.0f} tok/s" in line
        assert f"mfu {100 * 10.0 * rate / 1e6:.1f}%" in line
        assert f"{1000 * sum(window) / 3:.0f} ms/step" in line
    assert logged[2]["tokens_per_sec"] == 1000 / 0.002  # metrics.jsonl keeps each step's own interval


def test_host_memory_peak_is_reset_between_phases():
    """A phase that allocated and freed 200 MB reports that peak; the next phase (no allocation) a lower one, once
    /proc/self/clear_refs reset the kernel's peak.  The whole run's peak still remembers the 200 MB."""
    from qwen_jax.metrics import HostMemory, memory_peaks

    host = HostMemory(phase="big")
    big = np.ones(200 * 2**20 // 8)  # written, so resident
    del big
    first = host.end("small")
    assert first["phase"] == "big" and first["peak_gib"] >= first["now_gib"] + 0.15 > 0.15
    second = host.end()
    assert second["phase"] == "small" and second["peak_gib"] >= second["now_gib"] > 0
    assert list(host.phases) == ["big", "small"]
    assert memory_peaks(host)["host_peak_rss_gib"] >= first["peak_gib"]
    if not host.resettable:
        pytest.skip("/proc/self/clear_refs is not writable here: peaks are the whole process's")
    assert second["peak_gib"] < first["peak_gib"] - 0.15, (first, second)


def test_host_memory_summary_checks_the_budget():
    from qwen_jax.metrics import HostMemory

    host = HostMemory()
    host.end("steady")
    host.end()
    peak = max(p["peak_gib"] for p in host.phases.values())
    scalars, lines = host.summary(state_bytes=2**30)
    assert scalars["host/budget_gib"] == 5.0 and scalars["host/train_state_gib"] == 1.0
    assert scalars["host/init_peak_gib"] >= scalars["host/init_now_gib"] > 0 and "host/steady_peak_gib" in scalars
    assert lines[0].startswith("host memory peaks: init ") and ("within" in lines[0]) == (peak <= 5.0)
    scalars, lines = host.summary(state_bytes=0, slack_gib=0.0)
    assert len(lines) == 2 and " over" in lines[0] and lines[1].startswith("warning: host memory peak ")


def test_process_state_bytes_counts_replicas_once():
    from jax.sharding import NamedSharding, PartitionSpec

    from qwen_jax.metrics import process_state_bytes

    mesh = sharding.make_mesh({"fsdp": 4}, devices=jax.devices()[:4])
    x = np.zeros((8, 16), np.float32)
    sharded = jax.device_put(x, NamedSharding(mesh, PartitionSpec("fsdp")))
    replicated = jax.device_put(x, NamedSharding(mesh, PartitionSpec()))
    assert len(replicated.addressable_shards) == 4
    assert process_state_bytes({"a": sharded, "b": [replicated]}) == 2 * x.nbytes


def test_unraisable_hook_drops_only_orbax_leftovers():
    """The trainer's `sys.unraisablehook`: Orbax's abandoned coroutines (a damaged step's other reads) and
    TensorStore's "Event loop is closed" callbacks are dropped; anything else reaches the previous hook."""
    import os
    import types

    from qwen_jax.checkpoint import quiet_orbax_leftovers

    def coroutine_from(filename):
        namespace = {}
        exec(compile("async def read():\n    pass\n", filename, "exec"), namespace)
        return namespace["read"]()

    seen = []
    hook = quiet_orbax_leftovers(seen.append)
    orbax_read = coroutine_from(os.path.join(os.sep, "site-packages", "orbax", "checkpoint", "serialization.py"))
    own_read = coroutine_from(os.path.join(os.sep, "site-packages", "qwen_jax", "checkpoint.py"))
    failed = Exception("Encountered error while reading array index")
    events = [types.SimpleNamespace(exc_value=failed, object=orbax_read),
              types.SimpleNamespace(exc_value=RuntimeError("Event loop is closed"), object=None),
              types.SimpleNamespace(exc_value=failed, object=own_read),
              types.SimpleNamespace(exc_value=ValueError("other"), object=None)]
    for event in events:
        hook(event)
    orbax_read.close()
    own_read.close()
    assert seen == events[2:]
