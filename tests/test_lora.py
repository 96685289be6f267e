"""LoRA against peft: exported adapters and merged folders give peft's logits, PEFT adapters import, exact resume."""

from __future__ import annotations

import dataclasses
import json
import os
import signal
import subprocess
import sys
import time

import jax
import jax.numpy as jnp
import numpy as np
import pytest
import torch
from flax import nnx
from hf_fixtures import hf_logits, make_hf_model, random_ids
from transformers import AutoModelForCausalLM

import qwen_jax
from qwen_jax import checkpoint_format as cf
from qwen_jax import lora as lora_lib
from qwen_jax.config import load_hf_config
from qwen_jax.trainer import optimizer as opt_lib
from tests import train_launch as tl

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
TORCH_TOL = 1e-5  # torch vs torch (peft on the base vs the merged folder), float32
JAX_TOL = 1e-4  # ours vs torch, as tests/test_model_parity.py


def _peft():
    import peft

    return peft


def _hf(folder):
    return AutoModelForCausalLM.from_pretrained(folder, dtype=torch.float32, attn_implementation="eager").eval()


def _peft_logits(base_dir, adapter_dir, ids):
    peft = _peft()
    model = peft.PeftModel.from_pretrained(_hf(base_dir), adapter_dir).eval()
    return hf_logits(model, ids)


def _our_logits(cfg, spec, params, ids):
    spec = dataclasses.replace(spec, dropout=0.0)  # evaluation: no dropout keys in the graph
    graphdef = lora_lib.abstract_model(cfg, spec)[0]
    model = nnx.merge(graphdef, jax.tree.map(jnp.asarray, params))
    return np.asarray(jax.jit(lambda m, x: m(x))(model, jnp.asarray(ids, jnp.int32)))


def _maxdiff(a, b):
    return float(np.max(np.abs(np.asarray(a, np.float64) - np.asarray(b, np.float64))))


@pytest.fixture(scope="module")
def base(tmp_path_factory):
    folder = str(tmp_path_factory.mktemp("base"))
    make_hf_model(folder, vocab_size=512)
    return folder


# ---------------------------------------------------------------- counts, optimizer state, layouts (in process)
@pytest.mark.parametrize("modules", [None, ["q_proj", "v_proj"], ["o_proj", "down_proj"]])
def test_trainable_counts_equal_peft(base, modules):
    peft = _peft()
    targets = lora_lib.DEFAULT_TARGETS if modules is None else lora_lib.peft_targets_regex(
        {"target_modules": modules}, "test")
    spec = lora_lib.LoraSpec(rank=4, alpha=8.0, targets=targets)
    cfg = load_hf_config(base)
    _, abstract, _ = lora_lib.abstract_model(cfg, spec)
    abstract = nnx.to_pure_dict(abstract)
    freeze = lora_lib.freeze_base(opt_lib.resolve_freeze(abstract), abstract, spec)
    ours = freeze.summary(abstract)
    all_modules = ["q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj"]
    ref = peft.get_peft_model(_hf(base), peft.LoraConfig(r=4, lora_alpha=8, target_modules=modules or all_modules))
    trainable, total = ref.get_nb_trainable_parameters()
    assert ours["trainable"] == trainable and ours["total"] == total, (ours, trainable, total)


def test_base_has_no_optimizer_state_and_bf16_base(base):
    cfg = load_hf_config(base, param_dtype="bfloat16")
    spec = lora_lib.LoraSpec(rank=4, alpha=8.0, base_dtype="bfloat16")
    _, abstract, _ = lora_lib.abstract_model(cfg, spec)
    abstract = nnx.to_pure_dict(abstract)
    freeze = lora_lib.freeze_base(opt_lib.resolve_freeze(abstract), abstract, spec)
    opt_cfg = type("O", (), dict(learning_rate=1e-3, warmup_steps=0, schedule="constant", min_lr_ratio=1.0, b1=0.9,
                                 b2=0.95, eps=1e-8, weight_decay=0.1, grad_clip=1.0))
    tx, _ = opt_lib.make_optimizer(abstract, opt_cfg, 10, freeze)
    state = jax.eval_shape(tx.init, abstract)
    moments = lora_lib.flatten(state.mu)
    assert moments and all(lora_lib.is_adapter(p) for p in moments)
    assert sorted(moments) == sorted(p for p in lora_lib.flatten(abstract) if lora_lib.is_adapter(p))
    for path, leaf in lora_lib.flatten(abstract).items():
        assert leaf.dtype == (jnp.float32 if lora_lib.is_adapter(path) else jnp.bfloat16), path


def test_bad_settings_are_errors_naming_the_key(base):
    cfg = load_hf_config(base)
    with pytest.raises(lora_lib.LoraError, match="lora.targets"):
        lora_lib.abstract_model(cfg, lora_lib.LoraSpec(rank=4, alpha=8.0, targets="norm"))
    for key, value in (("rank", -1), ("dropout", 1.0), ("export", "zip"), ("base_dtype", "int8")):
        with pytest.raises(lora_lib.LoraError, match=f"lora.{key}"):
            lora_lib.spec_from_config({"rank": 4, key: value})
    assert lora_lib.spec_from_config({"rank": 0}) is None


def test_dropout_is_on_the_adapter_input_like_peft():
    """With the same keep-mask, our delta equals PEFT's lora_B(lora_A(dropout(x))) * scale (mask on x, not on x A)."""
    from qwen_jax.layers.linear import lora_delta

    rng = np.random.default_rng(0)
    x, a, b = rng.normal(size=(2, 5, 8)), rng.normal(size=(8, 3)), rng.normal(size=(3, 4, 2))
    key = jax.random.key_data(jax.random.key(7))
    ours = np.asarray(lora_delta(jnp.float32(x), jnp.float32(a), jnp.float32(b), scale=1.5, dtype=jnp.float32,
                                 dropout=0.25, key=key))
    keep = np.asarray(jax.random.bernoulli(jax.random.wrap_key_data(key), 0.75, x.shape))
    torch_a, torch_b = torch.nn.Linear(8, 3, bias=False), torch.nn.Linear(3, 8, bias=False)
    peft_a, peft_b = lora_lib.to_peft(a, b)
    with torch.no_grad():
        torch_a.weight.copy_(torch.as_tensor(peft_a))
        torch_b.weight.copy_(torch.as_tensor(peft_b))
        ref = torch_b(torch_a(torch.as_tensor(x * keep / 0.75, dtype=torch.float32))).numpy() * 1.5
    np.testing.assert_allclose(ours.reshape(2, 5, 8), ref, rtol=1e-5, atol=1e-6)
    plain = np.asarray(lora_delta(jnp.float32(x), jnp.float32(a), jnp.float32(b), scale=1.5, dtype=jnp.float32))
    assert not np.allclose(ours, plain)  # the mask did something


def test_dropout_keys_differ_per_layer_and_projection(base):
    cfg = load_hf_config(base)
    keys = lora_lib.dropout_key_fn(cfg, lora_lib.LoraSpec(rank=2, alpha=2.0, dropout=0.1))(jax.random.PRNGKey(3))
    rows = [tuple(k) for leaf in lora_lib.flatten(keys).values() for k in np.asarray(leaf)]
    assert len(rows) == 7 * cfg.num_hidden_layers == len(set(rows))


@pytest.mark.slow
def test_launch_with_bad_lora_targets_exits_2_naming_the_key(tmp_path):
    workdir = tmp_path / "run"
    result = tl.run(workdir, "--config.lora.rank=4", "--config.lora.targets=norm", devices=1, timeout=300)
    assert result.returncode == 2, result.stdout + result.stderr
    assert "error: config key 'lora.targets'" in result.stderr and "Traceback" not in result.stderr
    assert not workdir.exists()


# ---------------------------------------------------------------- a PEFT adapter made by peft (non-zero B)
@pytest.fixture(scope="module")
def peft_adapter(base, tmp_path_factory):
    peft = _peft()
    torch.manual_seed(1)
    config = peft.LoraConfig(r=4, lora_alpha=12, target_modules=["q_proj", "k_proj", "v_proj", "o_proj", "up_proj",
                                                                   "down_proj"], init_lora_weights=False)
    model = peft.get_peft_model(_hf(base), config)
    folder = str(tmp_path_factory.mktemp("peft_adapter"))
    model.save_pretrained(folder)
    return folder


def test_import_peft_adapter_reproduces_peft_logits(base, peft_adapter, tmp_path):
    ids = random_ids(2, 20, vocab=512)
    ref = _peft_logits(base, peft_adapter, ids)
    spec = lora_lib.spec_from_config({"rank": 0, "init_from": peft_adapter})
    assert spec.rank == 4 and spec.scale == 3.0
    cfg = load_hf_config(base)
    _, abstract, _ = lora_lib.abstract_model(cfg, spec)
    abstract = nnx.to_pure_dict(abstract)
    base_params = nnx.to_pure_dict(nnx.state(qwen_jax.from_pretrained(base), nnx.Param))
    dev = jax.sharding.SingleDeviceSharding(jax.devices()[0])
    params = lora_lib.add_adapters(base_params, cfg, spec, abstract, jax.tree.map(lambda _: dev, abstract), 0)
    assert float(jnp.max(jnp.abs(params["layers"]["self_attn"]["q_proj"]["lora_b"]))) > 0
    ours = _our_logits(cfg, spec, params, ids)
    err = _maxdiff(ours, ref)
    print(f"[lora] imported peft adapter: max |ours - peft| = {err:.2e}")
    assert err <= JAX_TOL

    # merged in memory (no adapters left): the same logits as the adapters applied on the fly
    merged = lora_lib.merged_params(params, spec)
    assert not any(lora_lib.is_adapter(p) for p in lora_lib.flatten(merged))
    graphdef = nnx.split(nnx.eval_shape(lambda: qwen_jax.Qwen(cfg, rngs=nnx.Rngs(0))))[0]
    plain = np.asarray(jax.jit(lambda m, x: m(x))(nnx.merge(graphdef, merged), jnp.asarray(ids, jnp.int32)))
    assert _maxdiff(plain, ours) <= 1e-5

    # qwen-convert merge-lora: the merged folder gives peft's logits too
    out = str(tmp_path / "merged")
    proc = subprocess.run([sys.executable, "-m", "tools.convert", "merge-lora", "--base", base, "--adapter",
                           peft_adapter, "--out", out], cwd=ROOT, env=tl.env(1), capture_output=True, text=True)
    assert proc.returncode == 0, proc.stderr
    err = _maxdiff(hf_logits(_hf(out), ids), ref)
    print(f"[lora] merge-lora folder vs peft: max |diff| = {err:.2e}")
    assert err <= TORCH_TOL
    again = subprocess.run([sys.executable, "-m", "tools.convert", "merge-lora", "--base", base, "--adapter",
                            peft_adapter, "--out", out], cwd=ROOT, env=tl.env(1), capture_output=True, text=True)
    assert again.returncode == 1 and "error: " in again.stderr and "--overwrite" in again.stderr


# ---------------------------------------------------------------- training runs (subprocesses)
RUN_ARGS = [
    "--config.lora.rank=4", "--config.lora.alpha=8", "--config.lora.dropout=0.1", "--config.grad_accum_steps=2",
    "--config.total_steps=6", "--config.save_every=2", "--config.export_hf=true",
    "--config.optimizer.learning_rate=1e-2",
]


@pytest.fixture(scope="module")
def trained(base, tmp_path_factory):
    workdir = str(tmp_path_factory.mktemp("lora_run"))
    result = tl.run(workdir, f"--config.model.init_from={base}", *RUN_ARGS)
    assert result.returncode == 0, result.stdout + result.stderr
    return workdir, tl.losses(workdir), result.stdout


@pytest.mark.slow
def test_exports_match_peft_and_ours_and_base_untouched(base, trained):
    workdir, losses, stdout = trained
    assert sorted(losses) == list(range(1, 7)) and "exported" in stdout
    adapter, merged = os.path.join(workdir, "hf_adapter"), os.path.join(workdir, "hf_export")
    with open(os.path.join(adapter, "adapter_config.json")) as f:
        assert json.load(f)["r"] == 4
    ids = random_ids(2, 20, vocab=512)
    ref = _peft_logits(base, adapter, ids)
    err_merged = _maxdiff(hf_logits(_hf(merged), ids), ref)
    ckpt = os.path.join(workdir, "checkpoints")
    params = cf.restore_params(ckpt)
    b = np.asarray(params["layers"]["self_attn"]["q_proj"]["lora_b"])
    assert np.max(np.abs(b)) > 0  # trained: the adapter is not the identity
    cfg = load_hf_config(ckpt)
    spec = lora_lib.LoraSpec(rank=4, alpha=8.0)
    err_ours = _maxdiff(_our_logits(cfg, spec, params, ids), ref)
    err_base = _maxdiff(hf_logits(_hf(base), ids), ref)
    print(f"[lora] merged vs peft {err_merged:.2e}; ours vs peft {err_ours:.2e}; (base vs peft {err_base:.2e})")
    assert err_merged <= TORCH_TOL and err_ours <= JAX_TOL and err_base > 100 * JAX_TOL

    # every parameter outside the adapters is bit-identical to the base after training
    start = nnx.to_pure_dict(nnx.state(qwen_jax.from_pretrained(base), nnx.Param))
    trained_flat = lora_lib.flatten(params)
    for path, value in lora_lib.flatten(start).items():
        np.testing.assert_array_equal(np.asarray(trained_flat[path]), np.asarray(value), err_msg=path)
    assert {p for p in trained_flat if not lora_lib.is_adapter(p)} == set(lora_lib.flatten(start))


@pytest.mark.slow
def test_sigterm_resume_bit_equal_losses_and_exports(base, trained, tmp_path):
    ref_dir, ref, _ = trained
    workdir = str(tmp_path / "resumed")
    args = (f"--config.model.init_from={base}", *RUN_ARGS)
    proc = tl.launch(workdir, *args)
    deadline = time.time() + 300
    while max(tl.losses(workdir), default=0) < 3:
        assert proc.poll() is None and time.time() < deadline, "first launch ended before step 3"
        time.sleep(0.05)
    proc.send_signal(signal.SIGTERM)
    assert proc.wait(timeout=120) == 0
    stopped_at = max(tl.losses(workdir))
    assert stopped_at < 6
    result = tl.run(workdir, *args)
    assert result.returncode == 0, result.stdout + result.stderr
    assert "resumed from" in result.stdout
    assert tl.losses(workdir) == ref  # bit-equal floats from metrics.jsonl
    for name in ("hf_adapter/adapter_model.safetensors", "hf_export/model.safetensors"):
        with open(os.path.join(workdir, name), "rb") as a, open(os.path.join(ref_dir, name), "rb") as b:
            assert a.read() == b.read(), name


@pytest.mark.slow
def test_tensor_mesh_scan_remat_blockwise_train_the_same(base, trained, tmp_path):
    """Tensor-parallel adapters (A sharded like the kernel's input, B like its output), scanned layers, full remat
    and the blockwise kernel: the same per-step losses as the fsdp / unrolled / xla run (float tolerance)."""
    _, ref, _ = trained
    workdir = str(tmp_path / "tensor")
    result = tl.run(workdir, f"--config.model.init_from={base}", *RUN_ARGS, "--config.mesh.fsdp=1",
                    "--config.mesh.tensor=2", "--config.model.scan_layers=true", "--config.model.remat=full",
                    "--config.model.attention=blockwise", "--config.lora.export=adapter")
    assert result.returncode == 0, result.stdout + result.stderr
    got = tl.losses(workdir)
    np.testing.assert_allclose([got[s] for s in sorted(ref)], [ref[s] for s in sorted(ref)], rtol=2e-5)
    assert os.path.isdir(os.path.join(workdir, "hf_adapter")) and not os.path.exists(
        os.path.join(workdir, "hf_export"))


# ---------------------------------------------------------------- a bf16 base through a progressive length schedule
SCHEDULE = "32:0,64:3"  # global batch 8 x 32 for steps 1-3, then 4 x 64 (tokens per batch held)
BF16_ARGS = [
    "--config.lora.rank=4", "--config.lora.alpha=8", "--config.lora.base_dtype=bfloat16",
    f"--config.data.seq_len_schedule={SCHEDULE}", "--config.total_steps=6", "--config.save_every=3",
    "--config.export_hf=true", "--config.optimizer.learning_rate=1e-2", "--config.optimizer.warmup_steps=0",
    "--config.optimizer.schedule=constant", "--config.keep_checkpoints=2",
]


@pytest.fixture(scope="module")
def bf16_scheduled(base, tmp_path_factory):
    workdir = str(tmp_path_factory.mktemp("lora_bf16_schedule"))
    result = tl.run(workdir, f"--config.model.init_from={base}", *BF16_ARGS)
    assert result.returncode == 0, result.stdout + result.stderr
    return workdir, result.stdout


@pytest.mark.slow
def test_schedule_changes_the_batch_shape_and_base_stays_bit_identical(base, bf16_scheduled):
    from qwen_jax.data.schedule import parse_schedule
    from qwen_jax.trainer.synthetic import SyntheticBatches

    workdir, stdout = bf16_scheduled
    assert "data schedule: 8 x 32 from step 0, 4 x 64 from step 3" in stdout
    # each step's loss-token count is that of the synthetic batch of its stage's shape (they differ per shape)
    records = {r["step"]: r for r in tl.all_records(workdir) if "loss" in r}
    assert sorted(records) == list(range(1, 7))
    scheduled = SyntheticBatches(8, 32, 512, stages=parse_schedule(SCHEDULE, seq_len=32, global_batch_size=8))
    fixed = SyntheticBatches(8, 32, 512)
    for step, rec in records.items():
        batch = scheduled.global_batch(step - 1)
        assert batch["input_ids"].shape == ((8, 32) if step <= 3 else (4, 64))
        assert rec["loss_tokens"] == float(batch["loss_mask"].sum()), step
        if step > 3:
            assert rec["loss_tokens"] != float(fixed.global_batch(step - 1)["loss_mask"].sum()), step

    # the frozen base (stored in bf16) is bit-identical to the Hugging Face base loaded in bf16
    params = lora_lib.flatten(cf.restore_params(os.path.join(workdir, "checkpoints")))
    start = lora_lib.flatten(nnx.to_pure_dict(nnx.state(qwen_jax.from_pretrained(base, param_dtype="bfloat16"),
                                                        nnx.Param)))
    assert {p for p in params if not lora_lib.is_adapter(p)} == set(start)
    for path, value in start.items():
        assert params[path].dtype == value.dtype == jnp.bfloat16, path
        np.testing.assert_array_equal(np.asarray(params[path]), np.asarray(value), err_msg=path)


@pytest.mark.slow
def test_bf16_base_trains_and_exports_for_peft(base, bf16_scheduled):
    from qwen_jax.data.schedule import parse_schedule
    from qwen_jax.trainer.loss import reference_loss
    from qwen_jax.trainer.synthetic import SyntheticBatches

    workdir, _ = bf16_scheduled
    assert all(np.isfinite(v) for v in tl.losses(workdir).values())
    ckpt = os.path.join(workdir, "checkpoints")
    params = lora_lib.flatten(cf.restore_params(ckpt))
    cfg = load_hf_config(ckpt)

    # the loss decreases: the batches the run trained on, through the model at step 0 (B = 0), 3 and 6
    data = SyntheticBatches(8, 32, 512, stages=parse_schedule(SCHEDULE, seq_len=32, global_batch_size=8))
    batches = [data.global_batch(k) for k in range(6)]
    graphdef = lora_lib.abstract_model(cfg, lora_lib.LoraSpec(rank=4, alpha=8.0))[0]
    forward = jax.jit(lambda m, b: reference_loss(m(b["input_ids"], b["positions"], b["segment_ids"]), b["targets"],
                                                  b["loss_mask"]))

    def mean_loss(flat):
        model = nnx.merge(graphdef, jax.tree.map(jnp.asarray, lora_lib.unflatten(flat)))
        return float(np.mean([forward(model, b) for b in batches]))

    at = {step: mean_loss(lora_lib.flatten(cf.restore_params(ckpt, step))) for step in (3, 6)}
    at[0] = mean_loss({p: (np.zeros_like(v) if p.endswith("lora_b") else v) for p, v in params.items()})
    print(f"[lora] bf16 base: mean loss over the trained batches at steps 0 / 3 / 6: {at[0]:.4f} / {at[3]:.4f} / "
          f"{at[6]:.4f}")
    assert at[6] < at[3] < at[0]

    # storage: the base in bf16 (half the bytes of the float32 Hugging Face base), the adapters in float32
    base_params = {p: v for p, v in params.items() if not lora_lib.is_adapter(p)}
    adapters = {p: v for p, v in params.items() if lora_lib.is_adapter(p)}
    assert len(adapters) == 2 * 7 and all(v.dtype == jnp.float32 for v in adapters.values())
    fp32 = lora_lib.flatten(nnx.to_pure_dict(nnx.state(qwen_jax.from_pretrained(base), nnx.Param)))
    assert all(v.dtype == jnp.float32 for v in fp32.values())
    assert sum(v.nbytes for v in base_params.values()) * 2 == sum(v.nbytes for v in fp32.values())

    # the merged export is a bf16 Hugging Face folder
    merged = os.path.join(workdir, "hf_export")
    with open(os.path.join(merged, "config.json")) as f:
        assert json.load(f)["dtype"] == "bfloat16"
    from safetensors import safe_open

    with safe_open(os.path.join(merged, "model.safetensors"), framework="pt") as f:
        names = list(f.keys())  # noqa: SIM118 (safe_open is not iterable)
        assert names and {f.get_slice(n).get_dtype() for n in names} == {"BF16"}

    # the adapter loads with peft on the bf16-rounded base and gives our logits; the merged folder is close to them
    peft = _peft()
    ids = random_ids(2, 20, vocab=512)
    hf_base = _hf(base)
    with torch.no_grad():  # the parameters only (`.to(bfloat16)` would round the rotary inv_freq buffer too)
        for p in hf_base.parameters():
            p.copy_(p.to(torch.bfloat16).float())
    base_logits = hf_logits(hf_base, ids)
    ref = hf_logits(peft.PeftModel.from_pretrained(hf_base, os.path.join(workdir, "hf_adapter")).eval(), ids)
    ours = _our_logits(cfg, lora_lib.LoraSpec(rank=4, alpha=8.0), lora_lib.unflatten(params), ids)
    err_ours = _maxdiff(ours, ref)
    err_merged = _maxdiff(hf_logits(_hf(merged), ids), ref)
    err_base = _maxdiff(base_logits, ref)
    print(f"[lora] bf16 base: ours vs peft {err_ours:.2e}; merged bf16 folder vs peft {err_merged:.2e}; "
          f"(base vs peft {err_base:.2e})")
    assert err_ours <= JAX_TOL and err_base > 100 * JAX_TOL and err_merged < err_base / 20


# ---------------------------------------------------------------- the same update on any mesh / remat / accumulation
def _lora_updates(mesh_shape: dict, *, remat: str = "none", accum: int = 1, steps: int = 2):
    """(per-step losses, adapters after `steps`, the params) of the trainer's LoRA step on a tiny float32 model
    (8 x 32 batches of synthetic data), on `mesh_shape` over the first devices it needs.

    AdamW with eps 1e-4: with the default 1e-8 a gradient element within float noise of zero takes a sign-like
    step, so summation order alone (accumulation, sharded sums) moves such an element by up to lr."""
    from configs.base import get_config
    from qwen_jax import sharding
    from qwen_jax.config import config_from_dict
    from qwen_jax.presets import get_preset
    from qwen_jax.trainer import train_step as ts
    from qwen_jax.trainer.synthetic import SyntheticBatches

    c = get_config()
    c.optimizer.warmup_steps, c.optimizer.learning_rate, c.optimizer.schedule = 0, 1e-2, "constant"
    c.optimizer.eps = 1e-4
    cfg = config_from_dict(get_preset("tiny"), vocab_size=512, dtype="float32", remat=remat)
    spec = lora_lib.LoraSpec(rank=4, alpha=8.0)
    n = int(np.prod(list(mesh_shape.values())))
    mesh = sharding.make_mesh(mesh_shape, devices=jax.devices()[:n])
    graphdef, abstract, p_sh = ts.param_shardings(cfg, mesh, spec)
    params = lora_lib.add_adapters(ts.init_params(cfg, 0, lora_lib.base_only(p_sh)), cfg, spec, abstract, p_sh, 0)
    freeze = lora_lib.freeze_base(opt_lib.resolve_freeze(abstract), abstract, spec)
    tx, sched = opt_lib.make_optimizer(abstract, c.optimizer, 10, freeze)
    state_sh = ts.state_shardings(tx, abstract, p_sh, mesh)
    state = ts.init_state(params, tx, 0, state_sh)
    batch_sh = ts.batch_shardings(mesh, 8, 32)
    step = ts.make_train_step(graphdef, tx, sched, freeze, mesh=mesh, state_sh=state_sh, batch_sh=batch_sh,
                              chunk_size=16, grad_accum_steps=accum)
    data = SyntheticBatches(8, 32, 512)
    losses = []
    for _ in range(steps):
        state, metrics = step(state, {k: jax.device_put(v, batch_sh[k]) for k, v in next(data).items()})
        losses.append(float(metrics["loss"]))
    adapters = {p: np.asarray(v) for p, v in lora_lib.flatten(state["params"]).items() if lora_lib.is_adapter(p)}
    return losses, adapters, state["params"]


@pytest.fixture(scope="module")
def one_device_update():
    return _lora_updates({"fsdp": 1})


def _assert_same_update(got, ref, what, tol=1e-5):
    """Losses within `tol` relative; every adapter within `tol` of its own norm (both steps moved them)."""
    (got_losses, got_adapters, _), (ref_losses, ref_adapters, _) = got, ref
    np.testing.assert_allclose(got_losses, ref_losses, rtol=tol, err_msg=what)
    worst = max(np.linalg.norm(got_adapters[p] - ref_adapters[p]) / np.linalg.norm(ref_adapters[p])
                for p in ref_adapters)
    print(f"[lora] {what}: losses {got_losses} vs {ref_losses}; worst |adapter - ref| / |ref| {worst:.1e}")
    assert worst <= tol, what
    assert min(np.linalg.norm(ref_adapters[p]) for p in ref_adapters if p.endswith("lora_b")) > 0  # B moved


@pytest.mark.slow
def test_fsdp_tensor_mesh_equals_one_device(one_device_update):
    """8 devices (data 2 x fsdp 2 x tensor 2): adapters sharded like their kernels, the same two steps."""
    got = _lora_updates({"data": 2, "fsdp": 2, "tensor": 2})
    _assert_same_update(got, one_device_update, "data 2 x fsdp 2 x tensor 2 vs one device")
    a, b = got[2]["layers"]["mlp"]["up_proj"]["lora_a"], got[2]["layers"]["mlp"]["up_proj"]["lora_b"]
    assert a.sharding.spec == jax.sharding.PartitionSpec(None, "fsdp", None) and len(a.sharding.device_set) == 8
    assert b.sharding.spec == jax.sharding.PartitionSpec(None, None, "tensor")


@pytest.mark.slow
def test_remat_and_grad_accumulation_give_the_same_update(one_device_update):
    _assert_same_update(_lora_updates({"fsdp": 1}, remat="full"), one_device_update, "remat full vs none")
    _assert_same_update(_lora_updates({"fsdp": 1}, accum=2), one_device_update, "grad accumulation 2 vs 1")
