"""Training throughput of the product: `python -m qwen_jax.train` itself, against PyTorch peers, same run.

    python benchmarks/launcher_throughput.py [--shapes 0.5b:4096x4,0.5b:16384x1,1.5b:4096x2,1.5b:16384x1]
        [--data synthetic,bundled,spread] [--peers torch,liger,harness] [--steps 20 --warmup 5] [--budget 400]
    python benchmarks/launcher_throughput.py --shapes qwen2-57b-a14b@2:4096x2,qwen3-30b-a3b@6:4096x2 \\
        --data synthetic --peers torch --steps 6 --warmup 3 --budget 380     # mixture of experts, one H200
    python benchmarks/launcher_throughput.py --shapes tiny:128x2 --data synthetic,bundled --peers harness \\
        --steps 4 --warmup 2          # CPU smoke test
    python benchmarks/launcher_throughput.py --shapes qwen3-30b-a3b@1:64x2 --data synthetic --peers torch,harness \\
        --harness_variant xla/none/noscan/64 --steps 2 --warmup 1 --model_overrides hidden_size=64,\\
intermediate_size=128,moe_intermediate_size=32,num_attention_heads=4,num_key_value_heads=2,head_dim=16,\\
num_experts=8,num_experts_per_tok=2,vocab_size=512       # CPU smoke test, MoE

`benchmarks/train_throughput.py` builds its own step on random tokens already on the device: a bound.
This script measures what a user gets: for each shape it launches the real trainer in a subprocess
(`configs/base.py` with the preset, seq_len and batch, the default attention, remat and
`model.moe_matmul`, no export) and reads the tokens/s from the run's own `metrics.jsonl` (total tokens
over the summed step times of the steps after --warmup), on

* `synthetic`: the trainer's synthetic batches (`synthetic_data=True`): two packed sequences of a quarter to a
  half of the row each, then padding (less attention than the peers' full causal rows);
* `full_rows`: the trainer's synthetic batches with `synthetic_layout=full_rows`: one document fills each row,
  no segment ids, every token counted: the step harness's batches, so `trainer full_rows vs harness` (printed
  under the table) compares the launcher's step with the harness's on the same work;
* `bundled`: the bundled chat set, tokenized with the real Qwen tokenizer and chat template, packed;
* `spread`: a generated chat set with a long-tailed length spread (`benchmarks/make_chat_data.py`), packed.

A shape is `size[@layers]:SEQxBATCH`: size a PRESETS key of train_throughput.py or a `qwen_jax.presets`
name; `@layers` cuts a mixture-of-experts preset to its first `layers` decoder layers
(`--config.model.overrides=num_hidden_layers=N` for the trainer; the full models do not fit one GPU
with AdamW state).  `--model_overrides` adds architecture overrides to every model (CPU smoke runs).

The trainer is stopped (SIGKILL to its process group) once its last step is in metrics.jsonl: the
end-of-run checkpoint it then writes (parameters and AdamW moments, 12 bytes a parameter, 61 GB for
a 5B model) is not part of the step and would fill the benchmark machine's disk.

Peers in the same run, each its own subprocess, on random tokens, one document per row: `torch`
(transformers + PyTorch, SDPA, bf16 autocast over fp32 parameters, fused AdamW; for MoE shapes the
`benchmarks/moe_speed.py` worker: fused 3-D experts with torch._grouped_mm, router aux loss on),
`liger` (dense only: the same with Liger kernels patched in), `harness` (our step as
`train_throughput.py` builds it, for MoE shapes as `moe_speed.py` does; the trainer should be within a
few percent of it).  A torch run that runs out of memory is retried with gradient checkpointing.

Each shape runs the trainer first (the least predictable start-up: compilation), then the peers.
`--budget S` bounds the whole call: each run's timeout is what is left of S minus --reserve seconds
for every run still queued after it (a run with under 20 s is skipped), so a slow run cannot starve
the rows after it of their line.  A failed, timed-out or skipped run is a table line saying why; a
timed-out trainer that logged timed steps is reported from them, marked partial.

Reported per row: tokens/s, step ms, peak device GiB (the trainer's from its metrics, the workers'
from the allocator), the trainer's peak host RSS (and its per-phase peaks `host/<phase>_peak_gib` that
reached metrics.jsonl before it was stopped: init and first_step), MFU (causal convention, vs 989 TFLOP/s; for MoE
shapes on *active* parameters, `num_params(active=True)`; see qwen_jax/metrics.py) and the ratio to
PyTorch.  JSON in benchmarks/results/launcher_throughput.json and --out (there also each row as it
finishes, launcher_throughput.jsonl, and the table, launcher_throughput.txt).
"""

from __future__ import annotations

import argparse
import contextlib
import datetime
import json
import os
import re
import resource
import shutil
import signal
import subprocess
import sys
import tempfile
import time

ROOT = os.path.abspath(os.path.join(os.path.dirname(__file__), ".."))
sys.path.insert(0, ROOT)
sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
from bench_common import failure_summary  # noqa: E402
from moe_speed import run_worker as run_moe_worker  # noqa: E402
from train_throughput import DEFAULT_XLA_FLAGS, PEAK, parse_shape, run_worker  # noqa: E402

DATA_KINDS = ("synthetic", "full_rows", "bundled", "spread")
PEERS = ("torch", "liger", "harness")
MIN_RUN_S = 20  # a run given less (--budget nearly spent) is skipped


def parse_launch_shape(text: str) -> tuple[str, int | None, int, int]:
    """`size[@layers]:SEQxBATCH` -> (preset name, layers or None, seq, batch)."""
    size, sep, dims = text.partition(":")
    name, at, layers = size.partition("@")
    try:
        preset, seq, batch = parse_shape(f"{name}:{dims}")
        return preset, (int(layers) if at else None), seq, batch
    except ValueError:
        raise ValueError(f"shape {text!r}: expected size[@layers]:SEQxBATCH, e.g. qwen3-30b-a3b@6:4096x2") from None


def overrides_text(layers: int | None, extra: str) -> str:
    """The `model.overrides` of a shape: its layer cut, then --model_overrides."""
    return ",".join(filter(None, [f"num_hidden_layers={layers}" if layers else "", extra.strip()]))


def trainer_command(preset: str, seq: int, batch: int, data: str, steps: int, workdir: str,
                    spread_path: str | None, extra: list[str], model_overrides: str = "") -> list[str]:
    cmd = [sys.executable, "-m", "qwen_jax.train", "--config=configs/base.py", f"--workdir={workdir}",
           f"--config.model.preset={preset}", f"--config.data.seq_len={seq}",
           f"--config.data.global_batch_size={batch}", f"--config.total_steps={steps}",
           f"--config.save_every={10 * steps}", "--config.export_hf=False", "--config.log_every=5"]
    if model_overrides:
        cmd.append(f"--config.model.overrides={model_overrides}")
    if data in ("synthetic", "full_rows"):
        cmd.append("--config.synthetic_data=True")
    if data == "full_rows":
        cmd.append("--config.synthetic_layout=full_rows")
    elif data == "spread":
        cmd.append("--config.data.sources=" + json.dumps([{"path": spread_path, "kind": "chat", "weight": 1.0}]))
    return cmd + list(extra)


def metric_rows(path: str) -> list[dict]:
    """The complete lines of a metrics.jsonl (a line still being written is left out)."""
    if not os.path.exists(path):
        return []
    with open(path, encoding="utf-8") as f:
        text = f.read()
    return [json.loads(line) for line in text.split("\n")[:-1] if line.strip()]


def last_step(path: str) -> int:
    return max((r["step"] for r in metric_rows(path) if "step_time" in r), default=0)


def read_metrics(path: str, warmup: int) -> dict:
    """Throughput of the steps after `warmup`: total tokens / summed step time, and the last logged peaks."""
    rows = metric_rows(path)
    timed = [r for r in rows if r["step"] > warmup and "step_time" in r]  # not eval lines
    if not timed:
        raise ValueError(f"{path}: no step after the {warmup} warm-up steps")
    seconds = sum(r["step_time"] for r in timed)
    tokens = sum(r["tokens_per_sec"] * r["step_time"] for r in timed)
    out = {"steps_timed": len(timed), "tokens_per_s": tokens / seconds, "step_s": seconds / len(timed),
           "loss": timed[-1]["loss"]}
    phase_peaks = sorted({k for r in rows for k in r if k.startswith("host/") and k.endswith("_peak_gib")})
    for key in ("device_peak_gib", "host_peak_rss_gib", *phase_peaks):  # host/<phase>_peak_gib: per-phase RSS
        values = [r[key] for r in rows if r.get(key) is not None]
        if values:
            out[key] = max(values)
    return out


def run_trainer(cmd: list[str], workdir: str, total: int, warmup: int, timeout: float) -> dict:
    """Run the trainer until its step `total` is logged (then kill it: the final checkpoint is not timed),
    it exits, or `timeout` passes.  The result of the timed steps, or {"error": ...}."""
    env = dict(os.environ, XLA_PYTHON_CLIENT_MEM_FRACTION="0.92", TOKENIZERS_PARALLELISM="false",
               PYTHONPATH=ROOT + os.pathsep + os.environ.get("PYTHONPATH", ""))
    env.setdefault("XLA_FLAGS", DEFAULT_XLA_FLAGS)
    metrics = os.path.join(workdir, "run", "metrics.jsonl")
    log_path = os.path.join(workdir, "trainer.log")
    rss_before = resource.getrusage(resource.RUSAGE_CHILDREN).ru_maxrss
    t0 = time.monotonic()
    first_step_s = None
    with open(log_path, "w", encoding="utf-8") as log:
        proc = subprocess.Popen(cmd, stdout=log, stderr=subprocess.STDOUT, env=env, cwd=ROOT,
                                start_new_session=True)
        try:
            while True:
                reached = last_step(metrics)
                if first_step_s is None and reached:
                    first_step_s = time.monotonic() - t0
                if proc.poll() is not None or reached >= total or time.monotonic() - t0 > timeout:
                    break
                time.sleep(0.5)
        finally:
            killed = proc.poll() is None
            if killed:
                with contextlib.suppress(ProcessLookupError):  # it exited in between
                    os.killpg(proc.pid, signal.SIGKILL)
            proc.wait()
    wall_s = time.monotonic() - t0
    reached = last_step(metrics)
    with open(log_path, encoding="utf-8", errors="replace") as f:
        lines = f.read().strip().splitlines()
    timing = {"first_step_s": first_step_s, "wall_s": wall_s,
              "stopped": f"killed at step {reached}" if killed else f"exited {proc.returncode}",
              "setup": [x for x in lines if x.startswith(("devices:", "model:", "parameters:"))]}
    kind = re.search(r"^devices: \d+ x (.+?) over", "\n".join(timing["setup"]), re.M)
    if kind:
        timing["device"] = kind.group(1)
    if not killed and proc.returncode != 0:
        return {"error": failure_summary(lines, proc.returncode), **timing}
    try:
        out = read_metrics(metrics, warmup)
    except ValueError:
        why = f"timeout after {timeout:.0f}s" if killed else "exited 0"
        return {"error": f"{why} at step {reached}/{total}", **timing}
    if reached < total:
        out["partial"] = f"timeout after {timeout:.0f}s at step {reached}/{total}"
    rss = resource.getrusage(resource.RUSAGE_CHILDREN).ru_maxrss
    if "host_peak_rss_gib" not in out and rss > rss_before:  # children's max: only a new max is this run's
        out["host_peak_rss_gib"] = rss / 2**20
    return {**out, **timing}


class Budget:
    """Timeouts of the runs of one call: `--timeout` each, and with `--budget` what is left of it minus
    `reserve` seconds for every run still queued (None: too little left, skip the run)."""

    def __init__(self, seconds: float, reserve: float, runs: int, cap: int):
        self.start, self.seconds, self.reserve, self.runs, self.cap = time.monotonic(), seconds, reserve, runs, cap
        self.started = 0

    def elapsed(self) -> float:
        return time.monotonic() - self.start

    def next_run(self) -> None:
        self.started += 1

    def timeout(self) -> int | None:
        """For the current run (a retry within it, e.g. torch after out of memory, asks again)."""
        if not self.seconds:
            return self.cap
        left = self.seconds - self.elapsed() - self.reserve * (self.runs - self.started)
        return min(self.cap, int(left)) if left >= MIN_RUN_S else None


def run_peer(peer: str, shape: str, moe: bool, args, budget: Budget) -> tuple[str, dict]:
    """(variant, result) of one peer on one shape."""
    preset, layers, seq, batch = parse_launch_shape(shape)

    def worker(framework, variant):
        timeout = budget.timeout()
        if timeout is None:
            return {"error": "skipped: --budget spent"}
        if moe:
            from qwen_jax.presets import get_preset

            moe_shape = f"{preset}@{layers or get_preset(preset)['num_hidden_layers']}:{seq}x{batch}"
            return run_moe_worker(framework, moe_shape, args.model_overrides, variant, args.steps, 2, timeout)
        return run_worker(framework, shape, variant, args.steps, timeout, blocks=2)

    if peer == "harness":
        return args.harness_variant, worker("jax", args.harness_variant)
    if peer == "liger":
        if moe:
            return "liger", {"error": "no Liger worker for mixture-of-experts models"}
        return "liger", worker("torch", "liger")
    r = worker("torch", "plain")
    if r.get("error") == "out of memory":
        return "grad ckpt", worker("torch", "ckpt")
    return "plain", r


def table_lines(rows: list[dict], trainer_args: str) -> list[str]:
    device = next((r.get("device") for r in rows if r.get("device")), "?")
    lines = [f"{datetime.date.today()}  {device}",
             "MFU: (6 N + 3 causal attention fwd) FLOPs/token vs 989 TFLOP/s; N = matmul parameters, for MoE "
             "shapes the active ones (num_params(active=True))",
             "trainer: configs/base.py defaults (attention, remat, model.moe_matmul auto), export off, final "
             f"checkpoint not waited for; extra flags: {trainer_args or 'none'}",
             f"{'shape':<26}{'who':<9}{'variant':<24}{'tok/s':>9}{'step ms':>9}{'dev GiB':>9}{'RSS GiB':>9}"
             f"{'MFU':>7}{'vs torch':>9}"]
    for r in rows:
        head = f"{r['shape']:<26}{r['who']:<9}{r['variant']:<24}"
        if "error" in r:
            lines.append(f"{head}  {r['error'][:100]}")
            continue
        dev, rss, ratio = r.get("device_peak_gib"), r.get("host_peak_rss_gib"), r.get("vs_torch")
        dev = "-" if dev is None else f"{dev:.1f}"
        rss = "-" if rss is None else f"{rss:.1f}"
        ratio = "" if ratio is None else f"{ratio:.2f}"
        note = f"  ({r['partial']})" if r.get("partial") else ""
        phases = [(p, r.get(f"host/{p}_peak_gib")) for p in ("init", "first_step", "steady", "checkpoint", "export")]
        if any(v is not None for _, v in phases):
            note += "  RSS peaks " + ", ".join(f"{p.replace('_', ' ')} {v:.1f}" for p, v in phases if v is not None)
        lines.append(f"{head}{r['tokens_per_s']:>9.0f}{r['step_s'] * 1e3:>9.1f}{dev:>9}{rss:>9}"
                     f"{100 * r['mfu_989']:>6.1f}%{ratio:>9}{note}")
    for shape, trainer, harness in trainer_vs_harness(rows):
        lines.append(f"{shape}: trainer full_rows vs harness: {trainer * 1e3:.1f} vs {harness * 1e3:.1f} ms a step "
                     f"({100 * (trainer / harness - 1):+.1f}%)")
    return lines


def trainer_vs_harness(rows: list[dict]) -> list[tuple[str, float, float]]:
    """(shape, trainer step s, harness step s) where both ran on full rows (the like-for-like pair)."""
    out = []
    for shape in dict.fromkeys(r["shape"] for r in rows):
        ok = [r for r in rows if r["shape"] == shape and "error" not in r]
        trainer = next((r for r in ok if r["who"] == "trainer" and r["variant"] == "full_rows"), None)
        harness = next((r for r in ok if r["who"] == "harness"), None)
        if trainer and harness:
            out.append((shape, trainer["step_s"], harness["step_s"]))
    return out


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--shapes", default="0.5b:4096x4,0.5b:16384x1,1.5b:4096x2,1.5b:16384x1",
                   help="comma-separated size[@layers]:SEQxBATCH (@layers: MoE presets only)")
    p.add_argument("--data", default="synthetic,spread", help=f"comma-separated, of {', '.join(DATA_KINDS)}")
    p.add_argument("--peers", default="torch,liger,harness", help=f"comma-separated, of {', '.join(PEERS)} "
                                                                  "(or empty)")
    # the trainer's defaults (configs/base.py: attention auto = cuDNN on GPU, no remat, unrolled layers,
    # loss chunk 1024), so that the harness row times the launcher's step
    p.add_argument("--harness_variant", default="cudnn/none/noscan/1024")
    p.add_argument("--steps", type=int, default=20, help="timed trainer steps (peers: steps per timed block)")
    p.add_argument("--warmup", type=int, default=5, help="trainer steps not timed (compilation, first batches)")
    p.add_argument("--spread_examples", type=int, default=20000)
    p.add_argument("--timeout", type=int, default=600, help="seconds, each run")
    p.add_argument("--budget", type=float, default=0, help="seconds for all runs together (0: no bound)")
    p.add_argument("--reserve", type=float, default=40, help="with --budget: seconds kept for each queued run")
    p.add_argument("--trainer_args", default="", help="extra --config.* flags for every trainer run")
    p.add_argument("--model_overrides", default="", help="architecture overrides key=value,... for every model "
                                                         "(e.g. a tiny MoE for a CPU smoke run)")
    p.add_argument("--out", default=os.environ.get("OUT", ""))
    args = p.parse_args(argv)
    data_kinds = [d for d in (x.strip() for x in args.data.split(",")) if d]
    peers = [x for x in (y.strip() for y in args.peers.split(",")) if x]
    bad = [d for d in data_kinds if d not in DATA_KINDS] + [x for x in peers if x not in PEERS]
    if bad or args.steps < 1 or args.warmup < 1:
        p.error(f"unknown --data/--peers value(s) {bad}" if bad else "--steps and --warmup must be >= 1")
    from qwen_jax.config import MOE_MODEL_TYPES, config_from_dict
    from qwen_jax.metrics import flops_per_token
    from qwen_jax.model import num_params
    from qwen_jax.presets import get_preset
    from qwen_jax.run_config import RunConfigError, parse_model_overrides

    shapes = [s.strip() for s in args.shapes.split(",") if s.strip()]
    configs = {}  # every input checked before the first (expensive) subprocess
    for shape in shapes:
        try:
            preset, layers, seq, batch = parse_launch_shape(shape)
            raw = get_preset(preset)
            moe = raw.get("model_type") in MOE_MODEL_TYPES
            if layers is not None and not moe:
                raise ValueError("@layers is for mixture-of-experts presets (the dense peers build full depth)")
            if layers is not None and not 1 <= layers <= raw["num_hidden_layers"]:
                raise ValueError(f"@layers must be 1..{raw['num_hidden_layers']} (the preset's depth), got {layers}")
            overrides = parse_model_overrides(overrides_text(layers, args.model_overrides))
            configs[shape] = (config_from_dict(raw, source=f"preset {preset!r}", **overrides), moe)
        except (ValueError, KeyError, RunConfigError) as e:
            p.error(f"--shapes {shape!r}: {str(e).strip(chr(39) + chr(34))}")

    budget = Budget(args.budget, args.reserve, len(shapes) * (len(peers) + len(data_kinds)), args.timeout)
    spread_path = None
    if "spread" in data_kinds:
        spread_path = os.path.join(tempfile.gettempdir(), f"chat_spread_{args.spread_examples}.jsonl")
        if not os.path.exists(spread_path):
            subprocess.run([sys.executable, os.path.join(ROOT, "benchmarks", "make_chat_data.py"), "--out",
                            spread_path, "--examples", str(args.spread_examples)], check=True)

    if args.out:
        os.makedirs(args.out, exist_ok=True)
        partial_path = os.path.join(args.out, "launcher_throughput.jsonl")
        open(partial_path, "w").close()

    def record(row):
        print(f"[{budget.elapsed():.0f}s] " + json.dumps(row), flush=True)
        if args.out:
            with open(partial_path, "a", encoding="utf-8") as f:
                f.write(json.dumps(row) + "\n")

    rows = []
    for shape in shapes:
        preset, layers, seq, batch = parse_launch_shape(shape)
        cfg, moe = configs[shape]
        fpt = flops_per_token(cfg, seq)  # active parameters for MoE models
        common = {"flops_per_token": fpt, "moe": moe}
        if moe:
            common.update(total_params=num_params(cfg), active_params=num_params(cfg, active=True))
        shape_rows = []
        for data in data_kinds:
            budget.next_run()
            timeout = budget.timeout()
            print(f"[{budget.elapsed():.0f}s] {shape}: trainer on {data} (timeout {timeout}) ...", flush=True)
            workdir = tempfile.mkdtemp(prefix="launcher_bench_")
            total = args.steps + args.warmup
            cmd = trainer_command(preset, seq, batch, data, total, os.path.join(workdir, "run"), spread_path,
                                  args.trainer_args.split(), overrides_text(layers, args.model_overrides))
            try:
                r = (run_trainer(cmd, workdir, total, args.warmup, timeout) if timeout is not None
                     else {"error": "skipped: --budget spent"})
            except Exception as e:  # noqa: BLE001
                r = {"error": f"{type(e).__name__}: {e}"}
            finally:
                shutil.rmtree(workdir, ignore_errors=True)
            shape_rows.append({"shape": shape, "who": "trainer", "variant": data, **r, "command": " ".join(cmd[1:])})
            record(shape_rows[-1])
        for peer in peers:
            budget.next_run()
            print(f"[{budget.elapsed():.0f}s] {shape}: {peer} ...", flush=True)
            try:
                variant, r = run_peer(peer, shape, moe, args, budget)
            except Exception as e:  # noqa: BLE001 - a row says why, the table still comes
                variant, r = "?", {"error": f"{type(e).__name__}: {e}"}
            if "error" not in r:
                r["tokens_per_s"] = seq * batch / r["step_s"]
                r["device_peak_gib"] = r.pop("peak_gib", None)
            shape_rows.append({"shape": shape, "who": peer, "variant": variant, **r})
            record(shape_rows[-1])
        torch_row = next((r for r in shape_rows if r["who"] == "torch" and "error" not in r), None)
        for r in shape_rows:
            r.update(common)
            if "error" in r:
                continue
            r["mfu_989"] = fpt * r["tokens_per_s"] / PEAK
            if torch_row is not None:
                r["vs_torch"] = r["tokens_per_s"] / torch_row["tokens_per_s"]
        rows += shape_rows

    result = {"date": datetime.date.today().isoformat(), "rows": rows, "trainer_args": args.trainer_args,
              "model_overrides": args.model_overrides, "wall_s": budget.elapsed(),
              "convention": "tokens/s of processed tokens (padding included); MFU: 6*N_matmul + 3*causal "
                            "attention fwd FLOPs per token, vs 989e12; N_matmul of MoE models counts the active "
                            "parameters (num_params(active=True))"}
    lines = table_lines(rows, args.trainer_args)
    for folder in filter(None, [os.path.join(ROOT, "benchmarks", "results"), args.out]):
        os.makedirs(folder, exist_ok=True)
        with open(os.path.join(folder, "launcher_throughput.json"), "w") as f:
            json.dump(result, f, indent=1)
    if args.out:
        with open(os.path.join(args.out, "launcher_throughput.txt"), "w") as f:
            f.write("\n".join(lines) + "\n")
    print("\n" + "\n".join(lines))
    return 0


if __name__ == "__main__":
    sys.exit(main())
