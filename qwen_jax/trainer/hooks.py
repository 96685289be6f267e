"""What plugs into the training loop (`qwen_jax/trainer/loop.py`): metrics, evaluation, export, and any
later feature, each a `Hook`.

The loop owns what decides whether a run goes on (the step, non-finite checks, checkpoints,
preemption); a hook only reacts.  Per step, in this order:

1. the step is dispatched to the device; the previous step's metrics are fetched and handed to
   `on_step_end(step, metrics, info)` of every hook (one step behind: the device already has the
   next step queued, so fetching does not stall it);
2. `on_state(step, loop)`: `loop.state` is the state after `step` (on device); a hook that reads it
   calls `loop.sync()` first, which fetches this step's metrics (so a diverged state is never used);
3. when a checkpoint of `step` is due: `on_checkpoint(step)` before its save starts;
4. after the last step and its checkpoint: `on_finish(step, completed)`; `close()` always, also
   when the run fails.
"""

from __future__ import annotations

import dataclasses
from typing import Any, Protocol


@dataclasses.dataclass(frozen=True)
class StepInfo:
    """What the loop measured for one step, beside its metrics."""

    step_time: float  # seconds since the previous step's metrics arrived
    tokens: int  # tokens in the global batch
    seq_len: int  # the batch's row length (the data schedule may change it)


class LoopView(Protocol):
    """The part of the loop a hook may use in `on_state`."""

    state: Any  # the train state after the current step (on device)

    def sync(self) -> None:
        """Fetch and check the current step's metrics (waits for the step)."""


class Hook:
    """A no-op for every event: subclass it and override what you need (see the module docstring for the order)."""

    def on_step_end(self, step: int, metrics: dict, info: StepInfo) -> None:
        """The host metrics of `step` (floats; `finite` already removed)."""

    def on_state(self, step: int, loop: LoopView) -> None:
        """After `step` was dispatched; `loop.state` is the state after it."""

    def on_checkpoint(self, step: int) -> None:
        """A checkpoint of `step` is about to be saved."""

    def on_finish(self, step: int, completed: bool) -> None:
        """The loop ended at `step` with its checkpoints written; `completed`: `total_steps` was reached."""

    def close(self) -> None:
        """Release what the hook holds; called once whatever happened (may follow `on_finish`)."""


class Hooks(Hook):
    """Several hooks as one: each event goes to every hook, in list order."""

    def __init__(self, hooks):
        self.hooks = list(hooks)

    def on_step_end(self, step, metrics, info):
        for hook in self.hooks:
            hook.on_step_end(step, metrics, info)

    def on_state(self, step, loop):
        for hook in self.hooks:
            hook.on_state(step, loop)

    def on_checkpoint(self, step):
        for hook in self.hooks:
            hook.on_checkpoint(step)

    def on_finish(self, step, completed):
        for hook in self.hooks:
            hook.on_finish(step, completed)

    def close(self):
        for hook in self.hooks:
            hook.close()


class MetricsHook(Hook):
    """Each step's metrics to the `MetricsLogger` (stdout, metrics.jsonl, TensorBoard); made durable before each
    checkpoint, so a resumed run's log never lacks a step its checkpoint holds."""

    def __init__(self, logger, cfg, total_steps: int):
        self.logger, self.cfg, self.total_steps = logger, cfg, total_steps

    def on_step_end(self, step, metrics, info):
        from qwen_jax.metrics import flops_per_token

        self.logger.log(step, metrics, step_time=info.step_time, tokens=info.tokens, total_steps=self.total_steps,
                        flops_per_token=flops_per_token(self.cfg, info.seq_len))

    def on_checkpoint(self, step):
        self.logger.flush()

    def on_finish(self, step, completed):
        self.logger.flush()  # closed by `close`: the loop still logs the run's host memory after the export

    def close(self):
        self.logger.close()


class EvalHook(Hook):
    """Held-out loss and perplexity every `every` steps and at the last step, logged as `eval/*` scalars."""

    def __init__(self, evaluator, logger, every: int, total_steps: int):
        self.evaluator, self.logger, self.every, self.total_steps = evaluator, logger, every, total_steps

    def on_state(self, step, loop):
        from qwen_jax.trainer.errors import on_device_errors

        if step % self.every and step != self.total_steps:
            return
        loop.sync()  # this step's own metrics first: a diverged state is not evaluated
        ev = on_device_errors(lambda: self.evaluator(loop.state["params"]), step)
        self.logger.log_scalars(step, {"eval/loss": ev["loss"], "eval/perplexity": ev["perplexity"]}, label="eval")


class PackedAttentionWatch(Hook):
    """Says when packed rows hold more documents than cuDNN's packed layout is compiled for.

    Such a step is still exact but runs the blockwise fallback in every layer, several times the
    packed kernel's cost (at 16k tokens a row, about 10x): left silent, a few such rows make a run
    look slow for no visible reason.  `measure(local_batch)` (pure; the prefetch thread) gives the
    batch's most documents in a row and the bound, `consumed(measure)` (the loop, as the batch is
    trained on) counts it; the first batch over the bound prints one line naming the
    `model.attention_max_segments` that would fit, the end of the run a count.  Each process
    counts and reports its own rows: the fallback is decided over the global batch, so a row on
    any process slows every step.
    """

    def __init__(self, bound_for_length, report):
        self.bound_for_length, self.report = bound_for_length, report
        self.batches = self.over = self.most = 0
        self.bound = None

    @classmethod
    def for_model(cls, cfg, ring: int, report) -> PackedAttentionWatch:
        """The watch of a model: no bound under ring attention or DCA, or with no full-attention layer
        (sliding-window layers take a dense mask); else `kernels.packed_layout_bound` per row length."""
        from qwen_jax.attention.kernels import packed_layout_bound

        full_layers = any(cfg.layer_window(i) is None for i in range(cfg.num_hidden_layers))
        if ring > 1 or cfg.dca is not None or not full_layers:
            return cls(lambda length: None, report)
        return cls(lambda length: packed_layout_bound(cfg.attention, cfg.dtype, length, cfg.attention_max_segments),
                   report)

    def measure(self, local: dict) -> tuple[int, int] | None:
        """(most documents in a row, bound) of a host batch; None when its rows are not held to a bound."""
        from qwen_jax.attention.kernels import runs_per_row

        segment_ids = local.get("segment_ids")
        bound = None if segment_ids is None else self.bound_for_length(segment_ids.shape[1])
        return None if bound is None else (int(runs_per_row(segment_ids).max()), bound)

    def consumed(self, measured: tuple[int, int] | None) -> None:
        if measured is None:
            return
        runs, bound = measured
        self.batches += 1
        self.most = max(self.most, runs)
        if runs > bound:
            self.over += 1
            self.bound = bound
            if self.over == 1:
                self.report(f"warning: a packed row holds {runs} documents, over the packed-attention bound of "
                            f"{bound}: such steps run the exact blockwise fallback, several times slower "
                            f"(--config.model.overrides=attention_max_segments={runs} would fit it)")

    def on_finish(self, step, completed):
        if self.over:
            self.report(f"packed attention: {self.over} of {self.batches} batches had a row over {self.bound} "
                        f"documents and ran the blockwise fallback (most in a row: {self.most})")


class ExportHook(Hook):
    """At the end of a completed run, the Hugging Face exports (`qwen_jax/trainer/export.py`)."""

    def __init__(self, ckpt_dir: str, workdir: str, export_dir: str, lora):
        self.ckpt_dir, self.workdir, self.export_dir, self.lora = ckpt_dir, workdir, export_dir, lora

    def on_finish(self, step, completed):
        from qwen_jax.trainer.export import export_run

        if completed:
            export_run(self.ckpt_dir, self.workdir, self.export_dir, step, self.lora)
