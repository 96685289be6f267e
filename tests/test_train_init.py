"""Starting points: a Hugging Face folder, then an Orbax checkpoint of that run; step-1 losses check the weights."""

from __future__ import annotations

import json

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from flax import nnx

from qwen_jax.checkpoint import restore_params
from qwen_jax.hf.models import from_pretrained
from qwen_jax.trainer import train_step as ts
from qwen_jax.trainer.loss import reference_loss
from qwen_jax.trainer.synthetic import SyntheticBatches
from tests import train_launch as tl
from tests.hf_fixtures import make_hf_model

pytestmark = pytest.mark.slow
ARGS = ["--config.model.overrides=", "--config.total_steps=2", "--config.save_every=1"]


def _loss(model, batch):
    logits = model(batch["input_ids"], batch["positions"], batch["segment_ids"])
    return float(reference_loss(logits, batch["targets"], batch["loss_mask"]))


def test_init_from_hf_then_from_orbax(tmp_path):
    hf = tmp_path / "hf"
    make_hf_model(hf)
    run1 = tmp_path / "from_hf"
    result = tl.run(run1, f"--config.model.init_from={hf}", *ARGS)
    assert result.returncode == 0, result.stdout + result.stderr
    assert "initialised from hf" in result.stdout
    batch0 = SyntheticBatches(8, 64, 256).global_batch(0)
    model = from_pretrained(hf)
    np.testing.assert_allclose(tl.losses(run1)[1], _loss(model, batch0), rtol=2e-5)
    root = run1 / "checkpoints"
    assert json.loads((root / "config.json").read_text()) == json.loads((hf / "config.json").read_text())

    run2 = tmp_path / "from_orbax"
    result = tl.run(run2, f"--config.model.init_from={root}", "--config.model.init_step=2", *ARGS)
    assert result.returncode == 0, result.stdout + result.stderr
    assert "initialised from orbax" in result.stdout
    graphdef, abstract, shardings = ts.param_shardings(model.cfg, jax.sharding.Mesh(jax.devices()[:1], ("x",)))
    shardings = jax.tree.map(lambda _: jax.sharding.SingleDeviceSharding(jax.devices()[0]), abstract)
    params = restore_params(str(root), 2, abstract, shardings)
    trained = nnx.merge(graphdef, jax.tree.map(jnp.asarray, params))
    np.testing.assert_allclose(tl.losses(run2)[1], _loss(trained, batch0), rtol=2e-5)


def test_full_row_synthetic_batches_reach_the_step_whole(tmp_path):
    """--config.synthetic_layout=full_rows: step 1's loss is the model's on one document a row (no segment ids,
    positions 0..seq-1) with every token counted (loss_tokens = batch x seq), as the step harness feeds it."""
    hf = tmp_path / "hf"
    make_hf_model(hf)
    run = tmp_path / "run"
    result = tl.run(run, f"--config.model.init_from={hf}", "--config.synthetic_layout=full_rows", *ARGS)
    assert result.returncode == 0, result.stdout + result.stderr
    batch0 = SyntheticBatches(8, 64, 256, layout="full_rows").global_batch(0)
    model = from_pretrained(hf)
    expected = float(reference_loss(model(batch0["input_ids"]), batch0["targets"], batch0["loss_mask"]))
    first = next(r for r in tl.all_records(run) if r.get("step") == 1 and "loss" in r)
    assert first["loss_tokens"] == 8 * 64
    np.testing.assert_allclose(first["loss"], expected, rtol=2e-5)
