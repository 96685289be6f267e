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
PyTorch reference MFU figures in benchmarks/README.md): attention counted as if unmasked,
12 * L * H * D * T per token.  It gives higher MFU for the same step; the trainer logs the causal
one, and `benchmarks/train_throughput.py` prints both, labelled.
"""

from __future__ import annotations

import json
import os
import sys
import time

import jax

from qwen_jax.atomic import atomic_replace
from qwen_jax.config import QwenConfig, attention_flops_per_token
from qwen_jax.model import num_params

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


class EventWriter:
    """TensorBoard scalars written synchronously with tensorboardX's record writer.

    SummaryWriter queues events to a background process and its `flush()` does not drain that
    queue, so a SIGKILL loses up to `flush_secs` of steps; here `flush()` means on disk.  The first
    event is TensorBoard's purge marker: a `SessionLog.START` at `purge_step` makes TensorBoard
    drop the events of earlier files from that step on (the steps a resume replays).
    """

    def __init__(self, logdir: str, purge_step: int):
        from tensorboardX.event_file_writer import EventsWriter
        from tensorboardX.proto.event_pb2 import Event, SessionLog

        os.makedirs(logdir, exist_ok=True)
        self._event = Event
        self._writer = EventsWriter(os.path.join(logdir, "events"), filename_suffix=f".{os.getpid()}")
        self._writer.write_event(Event(wall_time=time.time(), step=purge_step,
                                       session_log=SessionLog(status=SessionLog.START)))

    def scalars(self, step: int, values: dict) -> None:
        from tensorboardX.proto.summary_pb2 import Summary

        summary = Summary(value=[Summary.Value(tag=tag, simple_value=value) for tag, value in values.items()])
        self._writer.write_event(self._event(wall_time=time.time(), step=step, summary=summary))

    def flush(self) -> None:
        self._writer.flush()

    def close(self) -> None:
        self._writer.close()


def truncate_jsonl(path: str, last_step: int) -> int:
    """Keep only the records of steps <= last_step (and drop a torn last line); atomic. Returns lines dropped."""
    if not os.path.exists(path):
        return 0
    with open(path, "rb") as f:
        lines = f.read().split(b"\n")
    keep, dropped = [], 0
    for line in lines:
        if not line.strip():
            continue
        try:
            step = json.loads(line)["step"]
        except (ValueError, KeyError, TypeError):
            step = None
        if step is not None and step <= last_step:
            keep.append(line + b"\n")
        else:
            dropped += 1
    if dropped:
        atomic_replace(path, lambda f: f.writelines(keep), durable=True)
    return dropped


class MetricsLogger:
    """Progress line on stdout, one JSON line per step in `metrics.jsonl`, TensorBoard scalars under `train/`.

    Only process 0 writes.  Floats in metrics.jsonl are Python's exact repr of the float32 values.
    `resume_step`: the step the run starts from (0 for a fresh run).  Records after it (logged by an
    interrupted run past its last checkpoint) are cut from metrics.jsonl and purged from TensorBoard,
    so each step appears exactly once in both.  `flush()` (called at every checkpoint) makes
    everything logged so far durable.
    """

    def __init__(self, workdir: str, *, peak_flops: float | None, num_devices: int, log_every: int = 1,
                 enabled: bool = True, resume_step: int = 0, host_memory: HostMemory | None = None):
        self.enabled = enabled
        self.host_memory = host_memory  # the run's per-phase host RSS (its peak is the logged host peak)
        self.peak_total = peak_flops * num_devices if peak_flops else None
        self.log_every = max(1, int(log_every))
        self.writer = None
        self.jsonl = None
        self.window = [0, 0, 0.0]  # steps, tokens and seconds since the last printed line
        if enabled:
            os.makedirs(workdir, exist_ok=True)
            path = os.path.join(workdir, "metrics.jsonl")
            truncate_jsonl(path, resume_step)
            self.jsonl = open(path, "a", encoding="utf-8")  # noqa: SIM115
            self.writer = EventWriter(os.path.join(workdir, "tensorboard"), purge_step=resume_step + 1)

    def log(self, step: int, metrics: dict, *, step_time: float, tokens: int, total_steps: int,
            flops_per_token: float) -> dict:
        out = {k: float(v) for k, v in metrics.items()}
        out["step_time"] = step_time
        out["tokens_per_sec"] = tokens / step_time if step_time > 0 else 0.0
        out["mfu"] = (flops_per_token * out["tokens_per_sec"] / self.peak_total) if self.peak_total else None
        if not self.enabled:
            return out
        if step % self.log_every == 0 or step == total_steps:
            out.update(memory_peaks(self.host_memory))
        self.jsonl.write(json.dumps({"step": step, **out}) + "\n")
        self.jsonl.flush()
        self.writer.scalars(step, {f"train/{key}": value for key, value in out.items() if value is not None})
        self.window = [self.window[0] + 1, self.window[1] + tokens, self.window[2] + step_time]
        if step % self.log_every == 0 or step == total_steps:
            # the printed speed is the window's since the last line: one step's wall interval is not a
            # step's cost when a checkpoint or eval sync lands between two steps' metrics
            (window_steps, window_tokens, window_s), self.window = self.window, [0, 0, 0.0]
            rate = window_tokens / window_s if window_s > 0 else 0.0
            mfu = f"{100 * flops_per_token * rate / self.peak_total:.1f}%" if self.peak_total else "n/a"
            print(f"step {step}/{total_steps} | loss {out['loss']:.4f} | grad_norm {out['grad_norm']:.3f} | "
                  f"lr {out['learning_rate']:.2e} | {rate:,.0f} tok/s | mfu {mfu} | "
                  f"{1000 * window_s / window_steps:.0f} ms/step", flush=True)
        return out

    def log_scalars(self, step: int, scalars: dict, *, label: str = "", echo: bool = True) -> None:
        """Scalars beside the training metrics (e.g. `eval/loss`): a metrics.jsonl line, TensorBoard, and with
        `echo` one line on stdout."""
        if not self.enabled:
            return
        values = {k: float(v) for k, v in scalars.items()}
        self.jsonl.write(json.dumps({"step": step, **values}) + "\n")
        self.jsonl.flush()
        self.writer.scalars(step, values)
        if not echo:
            return
        text = " | ".join(f"{k} {v:.4f}" for k, v in values.items())
        print(f"step {step}{' ' + label if label else ''} | {text}", flush=True)

    def flush(self):
        if self.enabled:
            self.jsonl.flush()
            os.fsync(self.jsonl.fileno())
            self.writer.flush()

    def close(self):
        if self.enabled and self.jsonl is not None:
            self.flush()
            self.writer.close()
            self.jsonl.close()
            self.jsonl = None


def memory_peaks(host_memory: HostMemory | None = None) -> dict:
    """Peak device memory of this process's devices (GiB, where the backend reports it) and the process's
    peak host RSS (GiB): logged at log steps so every run records what it needed.  Pass the run's
    `host_memory` where one resets the kernel's peak between phases: its whole-run maximum is then the
    peak; without it the kernel's peak since the last reset is reported."""
    out = {"host_peak_rss_gib": (host_memory or HostMemory()).process_peak_gib()}
    try:
        peaks = [(d.memory_stats() or {}).get("peak_bytes_in_use") for d in jax.local_devices()]
    except Exception:  # noqa: BLE001 - not every backend reports memory statistics
        peaks = []
    peaks = [p for p in peaks if p is not None]
    if peaks:
        out["device_peak_gib"] = max(peaks) / 2**30
    return out


class HostMemory:
    """Host RSS per phase of a run: the peak reached during each phase and the RSS when it ended (GiB).

    Linux keeps one peak RSS per process (VmHWM, also what `getrusage` reports); writing "5" to
    /proc/self/clear_refs (Linux >= 4.0) resets it, so a phase's peak is VmHWM read when it ends, after
    which it is reset for the next phase.  The first phase's peak counts from the process start.  Where
    clear_refs is not writable, each phase reports the whole process's peak so far (`resettable` False).
    A phase ended several times (steady steps between checkpoints, each save) keeps its highest peak.
    """

    def __init__(self, phase: str = "init", proc: str = "/proc/self"):
        self.phase = phase  # the phase under way
        self.phases: dict[str, dict] = {}  # name -> {"peak_gib", "now_gib"}, in the order first ended
        self.status_path = os.path.join(proc, "status")
        self.clear_refs = os.path.join(proc, "clear_refs")
        self.resettable = os.access(self.clear_refs, os.W_OK)

    def read(self) -> tuple[float, float | None]:
        """(peak since the last reset, current RSS) in GiB; without /proc, getrusage's peak and no current."""
        try:
            with open(self.status_path, encoding="ascii") as f:
                kib = {k: int(v.split()[0]) for k, v in (line.split(":", 1) for line in f if line.startswith("Vm"))}
            return kib["VmHWM"] / 2**20, kib["VmRSS"] / 2**20
        except (OSError, KeyError, ValueError):
            import resource

            return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 2**20, None

    def end(self, next_phase: str | None = None) -> dict:
        """End the phase under way and start `next_phase`: {"phase", "peak_gib", "now_gib"} of the ended one."""
        peak, now = self.read()
        name, self.phase = self.phase, next_phase
        before = self.phases.get(name, {}).get("peak_gib", 0.0)
        self.phases[name] = {"peak_gib": max(peak, before), "now_gib": now}
        if self.resettable:
            try:
                with open(self.clear_refs, "w", encoding="ascii") as f:
                    f.write("5")
            except OSError:
                self.resettable = False
        return {"phase": name, "peak_gib": peak, "now_gib": now}

    def process_peak_gib(self) -> float:
        """The whole run's peak RSS so far: the phases' peaks and the one under way."""
        return max([self.read()[0], *(p["peak_gib"] for p in self.phases.values())])

    @staticmethod
    def line(record: dict) -> str:
        now = "" if record["now_gib"] is None else f" (now {record['now_gib']:.2f} GiB)"
        return f"host memory: {record['phase'].replace('_', ' ')} peak {record['peak_gib']:.2f} GiB{now}"

    @staticmethod
    def scalars(record: dict) -> dict:
        """metrics.jsonl/TensorBoard scalars of one ended phase: host/<phase>_peak_gib, host/<phase>_now_gib."""
        out = {f"host/{record['phase']}_peak_gib": record["peak_gib"]}
        if record["now_gib"] is not None:
            out[f"host/{record['phase']}_now_gib"] = record["now_gib"]
        return out

    def summary(self, state_bytes: int, slack_gib: float = 4.0) -> tuple[dict, list[str]]:
        """Every phase's scalars and the budget (this process's train state + `slack_gib`), and the lines to
        print: one summary, and a warning when the highest phase peak is over the budget."""
        scalars = {}
        for name, rec in self.phases.items():
            scalars.update(self.scalars({"phase": name, **rec}))
        budget = state_bytes / 2**30 + slack_gib
        scalars.update({"host/train_state_gib": state_bytes / 2**30, "host/budget_gib": budget})
        worst = max(self.phases, key=lambda n: self.phases[n]["peak_gib"])
        peak = self.phases[worst]["peak_gib"]
        flag = "" if self.resettable else " (whole-process peaks: /proc/self/clear_refs is not writable)"
        lines = ["host memory peaks: " + " | ".join(f"{n.replace('_', ' ')} {r['peak_gib']:.2f}"
                                                     for n, r in self.phases.items())
                 + f" GiB; budget {budget:.2f} GiB (train state {state_bytes / 2**30:.2f} + {slack_gib:g}): "
                 + ("within" if peak <= budget else "over") + flag]
        if peak > budget:
            lines.append(f"warning: host memory peak {peak:.2f} GiB ({worst.replace('_', ' ')}) is over the "
                         f"budget of {budget:.2f} GiB (this process's train state + {slack_gib:g} GiB)")
        return scalars, lines


def process_state_bytes(tree) -> int:
    """Bytes of this process's share of the arrays in `tree`: its addressable shards, a shard replicated on
    several local devices counted once (the host copy a checkpoint or export holds)."""
    total = 0
    for leaf in jax.tree.leaves(tree):
        shards = getattr(leaf, "addressable_shards", None)
        if shards is None:
            total += int(getattr(leaf, "nbytes", 0))
            continue
        unique = {repr(shard.index): shard.data.nbytes for shard in shards}
        total += sum(unique.values())
    return total


def say(*args) -> None:
    """print on process 0 only (launch information)."""
    if jax.process_index() == 0:
        print(*args, flush=True, file=sys.stdout)
