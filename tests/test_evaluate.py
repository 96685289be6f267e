"""Held-out evaluation: the trainer's loss against transformers' cross-entropy, buckets against numpy."""

from __future__ import annotations

import jax
import jax.numpy as jnp
import ml_collections
import numpy as np
import pytest
import torch
from flax import nnx
from hf_fixtures import make_hf_model, random_ids

import qwen_jax
from qwen_jax import evaluate as ev
from qwen_jax.sharding import make_mesh, state_shardings


@pytest.fixture(scope="module")
def tiny(tmp_path_factory):
    folder = str(tmp_path_factory.mktemp("tiny"))
    hf = make_hf_model(folder, initializer_range=0.3)
    return qwen_jax.from_pretrained(folder), hf


def _hf_token_nll(hf, ids):
    with torch.no_grad():
        logits = hf(torch.as_tensor(ids)).logits[:, :-1].double()
    return torch.nn.functional.cross_entropy(logits.reshape(-1, logits.shape[-1]),
                                             torch.as_tensor(ids[:, 1:]).reshape(-1),
                                             reduction="none").reshape(ids.shape[0], -1).numpy()


def _batches(ids, lengths):
    """Pipeline-format batches: each row one document of `lengths[r]` tokens, padding masked."""
    b, t = ids.shape
    mask = (np.arange(t - 1)[None] < (np.asarray(lengths)[:, None] - 1)).astype(np.float32)
    seg = (np.arange(t - 1)[None] < np.asarray(lengths)[:, None]).astype(np.int32)
    return {"input_ids": ids[:, :-1].astype(np.int32), "targets": ids[:, 1:].astype(np.int32), "loss_mask": mask,
            "positions": np.broadcast_to(np.arange(t - 1, dtype=np.int32), (b, t - 1)).copy(), "segment_ids": seg}


def test_evaluator_loss_equals_transformers(tiny):
    """Mean loss over several batches (trainer's fused chunked loss) equals transformers' CE, on and off a mesh."""
    model, hf = tiny
    ids = [random_ids(4, 24, seed=s) for s in (1, 2)]
    lengths = [[24, 24, 17, 9], [24, 12, 24, 3]]
    batches = [_batches(i, n) for i, n in zip(ids, lengths, strict=True)]
    nll = np.concatenate([_hf_token_nll(hf, i)[b["loss_mask"] > 0] for i, b in zip(ids, batches, strict=True)])
    graphdef, state = nnx.split(model)
    for mesh in (None, make_mesh({"data": 2, "fsdp": 2, "tensor": 2})):
        # as the training loop holds them: a pure dict, sharded over the mesh
        params = nnx.to_pure_dict(jax.device_put(state, state_shardings(state, mesh)) if mesh else state)
        result = ev.Evaluator(graphdef, lambda: iter(batches), num_batches=2, mesh=mesh, chunk_size=8)(params)
        assert result["tokens"] == len(nll)
        np.testing.assert_allclose(result["loss"], nll.mean(), rtol=1e-5)
        np.testing.assert_allclose(result["perplexity"], np.exp(nll.mean()), rtol=1e-5)


def test_token_losses_and_buckets(tiny):
    model, hf = tiny
    ids = random_ids(3, 30, seed=5)
    want = _hf_token_nll(hf, ids)
    got = np.asarray(ev.token_losses(model, jnp.asarray(ids), chunk_size=7))
    np.testing.assert_allclose(got, want, rtol=1e-5, atol=1e-5 * np.abs(want).max())
    docs = [ids[0].tolist(), ids[1, :11].tolist(), ids[2, :20].tolist()]
    report = ev.evaluate_documents(model, docs, seq_len=25, edges=[0, 5, 16], batch_size=2)
    nll = np.concatenate([want[0, :24], want[1, :10], want[2, :19]])
    pos = np.concatenate([np.arange(1, 25), np.arange(1, 11), np.arange(1, 20)])
    for row, lo, hi in zip(report["buckets"], (0, 5, 16), (5, 16, 10**9), strict=True):
        sel = (pos >= lo) & (pos < hi)
        assert row["tokens"] == sel.sum()
        np.testing.assert_allclose(row["loss"], nll[sel].mean(), rtol=1e-5)
    np.testing.assert_allclose(report["overall"]["loss"], nll.mean(), rtol=1e-5)


def test_eval_config_keys():
    from configs.base import get_config

    c = get_config()
    assert (list(c.eval.sources), c.eval.every, c.eval.batches) == ([], 0, 4)
    assert ev.make_evaluator(c, None) is None  # off by default
    c.eval.sources = [{"path": "held_out.jsonl", "kind": "text"}]
    data = ev.eval_data_config(c)
    assert data.sources == [{"path": "held_out.jsonl", "kind": "text"}] and data.shuffle is False
    assert c.data.sources != data.sources  # the training block is untouched
    assert isinstance(data, ml_collections.ConfigDict)


@pytest.mark.slow
def test_trainer_logs_eval_loss_equal_to_the_exported_model(tmp_path):
    """`config.eval` in a real run: eval/loss and eval/perplexity at every `eval.every` steps and the last, in
    metrics.jsonl and TensorBoard; the last value equals the Evaluator applied to the exported folder."""
    import json

    import train_launch as tl
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

    from configs.demo import get_config
    from qwen_jax.evaluate import make_evaluator

    workdir = tmp_path / "run"
    sources = json.dumps([{"path": "bundled:chat.jsonl", "kind": "chat", "weight": 1.0}])
    result = tl.run(workdir, "--config=configs/demo.py", "--config.total_steps=5", "--config.save_every=5",
                    f"--config.eval.sources={sources}", "--config.eval.every=2", "--config.eval.batches=2",
                    devices=1, timeout=600)
    assert result.returncode == 0, result.stdout + result.stderr
    evals = [r for r in tl.all_records(workdir) if "eval/loss" in r]
    assert [r["step"] for r in evals] == [2, 4, 5]
    for r in evals:
        np.testing.assert_allclose(r["eval/perplexity"], np.exp(r["eval/loss"]), rtol=1e-6)
    assert evals[-1]["eval/loss"] < evals[0]["eval/loss"]  # the model learns the held-out chats too
    acc = EventAccumulator(str(workdir / "tensorboard"))
    acc.Reload()
    assert [e.step for e in acc.Scalars("eval/loss")] == [2, 4, 5]

    config = get_config()
    config.eval.sources = json.loads(sources)
    config.eval.every, config.eval.batches = 2, 2
    model = qwen_jax.from_pretrained(str(workdir / "hf_export"), dtype="float32")
    graphdef, state = nnx.split(model)
    ours = make_evaluator(config, graphdef)(nnx.to_pure_dict(state))
    np.testing.assert_allclose(ours["loss"], evals[-1]["eval/loss"], rtol=2e-5)
