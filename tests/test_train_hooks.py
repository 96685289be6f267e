"""The training loop's hooks (`qwen_jax/trainer/hooks.py`), by an in-process run with an extra recording hook:
which events arrive, in which order, with which values, against the run's own metrics.jsonl."""

from __future__ import annotations

import json
import math

from configs.base import get_config
from qwen_jax.trainer.hooks import Hook
from qwen_jax.trainer.loop import run

TOTAL, SAVE_EVERY, BATCH, SEQ = 4, 2, 8, 32


class Recorder(Hook):
    def __init__(self):
        self.events = []
        self.losses = {}

    def on_step_end(self, step, metrics, info):
        self.events.append(("metrics", step))
        self.losses[step] = metrics["loss"]
        assert info.tokens == BATCH * SEQ and info.seq_len == SEQ and info.step_time > 0

    def on_state(self, step, loop):
        if step == 3:  # a hook that reads the state first syncs: this step's metrics arrive before it goes on
            loop.sync()
            assert int(loop.state["step"]) == 3
        self.events.append(("state", step))

    def on_checkpoint(self, step):
        self.events.append(("checkpoint", step))

    def on_finish(self, step, completed):
        self.events.append(("finish", step, completed))

    def close(self):
        self.events.append(("close",))


def test_hooks_see_every_step_in_order_and_the_logged_metrics(tmp_path):
    c = get_config()
    c.synthetic_data = True
    c.model.overrides = "vocab_size=512"
    c.model.dtype = "float32"
    c.mesh.fsdp = -1
    c.data.seq_len, c.data.global_batch_size = SEQ, BATCH
    c.total_steps, c.save_every, c.export_hf = TOTAL, SAVE_EVERY, False
    recorder = Recorder()
    assert run(c, str(tmp_path / "w"), hooks=[recorder]) == 0
    assert recorder.events == [
        ("state", 1),
        ("metrics", 1), ("state", 2), ("metrics", 2), ("checkpoint", 2),  # a checkpoint waits for its metrics
        ("metrics", 3), ("state", 3),  # synced by the hook itself
        ("state", 4), ("metrics", 4), ("checkpoint", 4),
        ("finish", 4, True), ("close",),
    ]
    logged = [json.loads(line) for line in (tmp_path / "w" / "metrics.jsonl").read_text().splitlines()]
    logged = [r for r in logged if "loss" in r]  # not the host-memory phase records
    assert [r["step"] for r in logged] == [1, 2, 3, 4]
    assert all(math.isfinite(r["loss"]) for r in logged)
    assert {r["step"]: r["loss"] for r in logged} == recorder.losses


def test_packed_attention_watch_names_the_bound_that_would_fit():
    """Rows over the packed-layout bound are measured on the host batches, counted as the batches are
    consumed, reported once with the bound that fits, then summed up at the end; a run whose attention
    has no bound, or a model that never takes the packed layout, says nothing."""
    import numpy as np

    from qwen_jax.config import config_from_dict
    from qwen_jax.presets import get_preset
    from qwen_jax.trainer.hooks import PackedAttentionWatch

    def batch(*runs_per_row):  # rows of 64 tokens holding the given numbers of runs
        return {"segment_ids": np.stack([np.repeat(np.arange(1, n + 1), -(-64 // n))[:64] for n in runs_per_row])}

    lines = []
    watch = PackedAttentionWatch(lambda length: 8 if length == 64 else None, lines.append)
    ahead = [watch.measure(b) for b in (batch(3, 8), batch(2, 11), {"segment_ids": np.ones((2, 32), np.int32)})]
    assert ahead == [(8, 8), (11, 8), None] and lines == []  # measuring alone reports nothing
    for measured in ahead:
        watch.consumed(measured)
    assert len(lines) == 1
    assert lines[0].startswith("warning: a packed row holds 11 documents, over the packed-attention bound of 8")
    assert "attention_max_segments=11" in lines[0]
    watch.consumed(watch.measure(batch(13, 1)))
    watch.on_finish(3, completed=True)
    assert len(lines) == 2 and "2 of 3 batches had a row over 8 documents" in lines[1], lines
    assert "most in a row: 13" in lines[1]

    cfg = config_from_dict(get_preset("tiny"), dtype="bfloat16", attention="cudnn")
    quiet = []
    for watch in (PackedAttentionWatch(lambda length: None, quiet.append),
                  PackedAttentionWatch.for_model(cfg, 1, quiet.append),  # CPU: no packed layout here
                  PackedAttentionWatch.for_model(cfg, 2, quiet.append)):  # ring attention: no bound
        watch.consumed(watch.measure(batch(40, 50)))
        watch.on_finish(1, completed=True)
    assert quiet == []
