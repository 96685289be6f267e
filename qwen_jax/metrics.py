"""Training metrics: FLOPs/MFU convention, stdout progress line, metrics.jsonl, TensorBoard.

FLOPs convention (per *processed* token, i.e. every position of the packed [batch, seq_len]
batch, padding included):

    flops_per_token = 6 * N_matmul + 3 * attention_flops_per_token(cfg, seq_len, causal=True)

* `N_matmul`: parameters that take part in matmuls — every decoder parameter plus the output
  projection (`vocab * hidden`, counted even when tied to the embedding), *excluding* the
  embedding lookup (a gather, no FLOPs).  Norm scales and biases are included (negligible).
  6 = 2 (multiply-add) * 3 (forward + backward, the backward pass costing twice the forward).
* attention scores: `qwen_jax.config.attention_flops_per_token` = 2 * 2 * L * H * D * T forward
  (QK^T and PV), halved for the causal mask (only the lower triangle is useful work), then
  * 3 for forward + backward: 6 * L * H * D * T per token in total (= 12 * L * H * D * T / 2),
  with T = seq_len, the packed row length.
* MFU = flops_per_token * tokens_per_sec / (peak_flops_per_device * devices).  Rematerialised
  recomputation is not counted (it is "model" FLOPs utilisation).

`flops_per_token(cfg, T, causal=False)` is the other convention in use (PaLM's appendix B, and the
reference figures of this project's GPU-speed issue): attention counted as if unmasked,
12 * L * H * D * T per token.  It gives higher MFU for the same step; the trainer logs the causal
one, and `benchmarks/train_throughput.py` prints both, labelled.
"""

from __future__ import annotations

import json
import os
import sys

import jax

from qwen_jax.config import QwenConfig, attention_flops_per_token, num_params

# Dense bf16 peak FLOP/s per device, by substring of `jax.Device.device_kind` (first match wins).
PEAK_FLOPS = (
    ("H200", 989e12),
    ("H100", 989e12),
    ("A100", 312e12),
    ("TPU v5 lite", 197e12),
    ("TPU v5e", 197e12),
    ("TPU v5p", 459e12),
    ("TPU v5", 459e12),
    ("TPU v6", 918e12),
    ("TPU v4", 275e12),
)


def matmul_params(cfg: QwenConfig) -> int:
    """Parameters in the matmuls of one token: decoder (mixture-of-experts: the *active* ones) + output projection."""
    return num_params(cfg, include_embedding=False, active=True) + cfg.vocab_size * cfg.hidden_size


def flops_per_token(cfg: QwenConfig, seq_len: int, causal: bool = True) -> float:
    """Training (forward + backward) model FLOPs per token; see the module docstring (`causal=False`: PaLM's)."""
    return 6.0 * matmul_params(cfg) + 3.0 * attention_flops_per_token(cfg, seq_len, causal=causal)


def peak_flops_per_device(override: float = 0.0, device=None) -> float | None:
    """Peak FLOP/s of one device: the override if > 0, else the table; None when unknown (CPU)."""
    if override and override > 0:
        return float(override)
    kind = (device or jax.devices()[0]).device_kind
    for key, value in PEAK_FLOPS:
        if key.lower() in kind.lower():
            return value
    return None


class MetricsLogger:
    """Progress line on stdout, one JSON line per step in `metrics.jsonl`, TensorBoard scalars under `train/`.

    Only process 0 writes.  Floats in metrics.jsonl are Python's exact repr of the float32 values.
    """

    def __init__(self, workdir: str, *, peak_flops: float | None, num_devices: int, log_every: int = 1,
                 enabled: bool = True):
        self.enabled = enabled
        self.peak_total = peak_flops * num_devices if peak_flops else None
        self.log_every = max(1, int(log_every))
        self.writer = None
        self.jsonl = None
        if enabled:
            os.makedirs(workdir, exist_ok=True)
            self.jsonl = open(os.path.join(workdir, "metrics.jsonl"), "a", encoding="utf-8")  # noqa: SIM115
            from tensorboardX import SummaryWriter

            self.writer = SummaryWriter(logdir=os.path.join(workdir, "tensorboard"))

    def log(self, step: int, metrics: dict, *, step_time: float, tokens: int, total_steps: int,
            flops_per_token: float) -> dict:
        out = {k: float(v) for k, v in metrics.items()}
        out["step_time"] = step_time
        out["tokens_per_sec"] = tokens / step_time if step_time > 0 else 0.0
        out["mfu"] = (flops_per_token * out["tokens_per_sec"] / self.peak_total) if self.peak_total else None
        if not self.enabled:
            return out
        self.jsonl.write(json.dumps({"step": step, **out}) + "\n")
        self.jsonl.flush()
        for key, value in out.items():
            if value is not None:
                self.writer.add_scalar(f"train/{key}", value, step)
        if step % self.log_every == 0 or step == total_steps:
            mfu = f"{100 * out['mfu']:.1f}%" if out["mfu"] is not None else "n/a"
            print(f"step {step}/{total_steps} | loss {out['loss']:.4f} | grad_norm {out['grad_norm']:.3f} | "
                  f"lr {out['learning_rate']:.2e} | {out['tokens_per_sec']:,.0f} tok/s | mfu {mfu} | "
                  f"{1000 * step_time:.0f} ms/step", flush=True)
        return out

    def flush(self):
        if self.writer is not None:
            self.writer.flush()

    def close(self):
        if self.enabled:
            self.writer.close()
            self.jsonl.close()


def say(*args) -> None:
    """print on process 0 only (launch information)."""
    if jax.process_index() == 0:
        print(*args, flush=True, file=sys.stdout)
