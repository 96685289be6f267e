"""Training throughput of the product: `python -m qwen_jax.train` itself, against PyTorch peers, same run.

    python benchmarks/launcher_throughput.py [--shapes 0.5b:4096x4,0.5b:16384x1,1.5b:4096x2,1.5b:16384x1]
        [--data synthetic,bundled,spread] [--peers torch,liger,harness] [--steps 20 --warmup 5]
    python benchmarks/launcher_throughput.py --shapes tiny:128x2 --data synthetic,bundled --peers harness \
        --steps 4 --warmup 2          # CPU smoke test

`benchmarks/train_throughput.py` builds its own step on random tokens already on the device: a bound.
This script measures what a user gets: for each shape it launches the real trainer in a subprocess
(`configs/base.py` with the preset, seq_len and batch, the default attention, no export) and reads the
tokens/s from the run's own `metrics.jsonl` (total tokens over the summed step times of the steps after
--warmup), on

* `synthetic`: random tokens (`synthetic_data=True`), one document per row;
* `bundled`: the bundled chat set, tokenized with the real Qwen tokenizer and chat template, packed;
* `spread`: a generated chat set with a long-tailed length spread (`benchmarks/make_chat_data.py`), packed.

Peers in the same run, each its own subprocess (the `train_throughput.py` workers): `torch`
(transformers + PyTorch, SDPA, bf16 autocast over fp32 parameters, fused AdamW), `liger` (the same with
Liger kernels patched in), `harness` (our step as `train_throughput.py` builds it; the trainer should be
within a few percent of it).  Peers train on random tokens, one document per row.

Reported per row: tokens/s, step ms, peak device GiB (the trainer's from its metrics when logged, the
workers' from the allocator), the trainer's peak host RSS, MFU (causal convention, vs 989 TFLOP/s; see
qwen_jax/metrics.py) and the ratio to plain PyTorch.  JSON in benchmarks/results/launcher_throughput.json
(and --out).
"""

from __future__ import annotations

import argparse
import datetime
import json
import os
import resource
import shutil
import subprocess
import sys
import tempfile

ROOT = os.path.abspath(os.path.join(os.path.dirname(__file__), ".."))
sys.path.insert(0, ROOT)
sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
from train_throughput import DEFAULT_XLA_FLAGS, PEAK, parse_shape, run_worker  # noqa: E402

DATA_KINDS = ("synthetic", "bundled", "spread")
PEERS = ("torch", "liger", "harness")


def trainer_command(preset: str, seq: int, batch: int, data: str, steps: int, workdir: str,
                    spread_path: str | None, extra: list[str]) -> list[str]:
    cmd = [sys.executable, "-m", "qwen_jax.train", "--config=configs/base.py", f"--workdir={workdir}",
           f"--config.model.preset={preset}", f"--config.data.seq_len={seq}",
           f"--config.data.global_batch_size={batch}", f"--config.total_steps={steps}",
           f"--config.save_every={10 * steps}", "--config.export_hf=False", "--config.log_every=5"]
    if data == "synthetic":
        cmd.append("--config.synthetic_data=True")
    elif data == "spread":
        cmd.append("--config.data.sources=" + json.dumps([{"path": spread_path, "kind": "chat", "weight": 1.0}]))
    return cmd + list(extra)


def read_metrics(path: str, warmup: int) -> dict:
    """Throughput of the steps after `warmup`: total tokens / summed step time, and the last logged peaks."""
    rows = []
    with open(path, encoding="utf-8") as f:
        for line in f:
            rows.append(json.loads(line))
    timed = [r for r in rows if r["step"] > warmup and "step_time" in r]  # not eval lines
    if not timed:
        raise ValueError(f"{path}: no step after the {warmup} warm-up steps")
    seconds = sum(r["step_time"] for r in timed)
    tokens = sum(r["tokens_per_sec"] * r["step_time"] for r in timed)
    out = {"steps_timed": len(timed), "tokens_per_s": tokens / seconds, "step_s": seconds / len(timed),
           "loss": timed[-1]["loss"]}
    for key in ("device_peak_gib", "host_peak_rss_gib"):
        values = [r[key] for r in rows if r.get(key) is not None]
        if values:
            out[key] = max(values)
    return out


def run_trainer(preset, seq, batch, data, steps, warmup, timeout, spread_path, extra) -> dict:
    workdir = tempfile.mkdtemp(prefix="launcher_bench_")
    cmd = trainer_command(preset, seq, batch, data, steps + warmup, os.path.join(workdir, "run"), spread_path,
                          extra)
    env = dict(os.environ, XLA_PYTHON_CLIENT_MEM_FRACTION="0.92", TOKENIZERS_PARALLELISM="false",
               PYTHONPATH=ROOT + os.pathsep + os.environ.get("PYTHONPATH", ""))
    env.setdefault("XLA_FLAGS", DEFAULT_XLA_FLAGS)
    rss_before = resource.getrusage(resource.RUSAGE_CHILDREN).ru_maxrss
    try:
        p = subprocess.run(cmd, capture_output=True, text=True, timeout=timeout, env=env, cwd=ROOT)
        if p.returncode != 0:
            tail = (p.stderr or p.stdout).strip().splitlines()[-3:]
            return {"error": " | ".join(tail)[:400], "command": " ".join(cmd)}
        out = read_metrics(os.path.join(workdir, "run", "metrics.jsonl"), warmup)
    except subprocess.TimeoutExpired:
        return {"error": f"timeout after {timeout}s", "command": " ".join(cmd)}
    finally:
        shutil.rmtree(workdir, ignore_errors=True)
    rss = resource.getrusage(resource.RUSAGE_CHILDREN).ru_maxrss
    if "host_peak_rss_gib" not in out and rss > rss_before:  # children's max: only a new max is this run's
        out["host_peak_rss_gib"] = rss / 2**20
    out["command"] = " ".join(cmd[1:])
    return out


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--shapes", default="0.5b:4096x4,0.5b:16384x1,1.5b:4096x2,1.5b:16384x1")
    p.add_argument("--data", default="synthetic,spread", help=f"comma-separated, of {', '.join(DATA_KINDS)}")
    p.add_argument("--peers", default="torch,liger,harness", help=f"comma-separated, of {', '.join(PEERS)} "
                                                                  "(or empty)")
    p.add_argument("--harness_variant", default="cudnn/none/noscan/2048")
    p.add_argument("--steps", type=int, default=20, help="timed trainer steps (peers: steps per timed block)")
    p.add_argument("--warmup", type=int, default=5, help="trainer steps not timed (compilation, first batches)")
    p.add_argument("--spread_examples", type=int, default=20000)
    p.add_argument("--timeout", type=int, default=600)
    p.add_argument("--trainer_args", default="", help="extra --config.* flags for every trainer run")
    p.add_argument("--out", default=os.environ.get("OUT", ""))
    args = p.parse_args(argv)
    data_kinds = [d for d in (x.strip() for x in args.data.split(",")) if d]
    peers = [x for x in (y.strip() for y in args.peers.split(",")) if x]
    bad = [d for d in data_kinds if d not in DATA_KINDS] + [x for x in peers if x not in PEERS]
    if bad or args.steps < 1 or args.warmup < 1:
        p.error(f"unknown --data/--peers value(s) {bad}" if bad else "--steps and --warmup must be >= 1")
    from qwen_jax.config import config_from_dict
    from qwen_jax.metrics import flops_per_token
    from qwen_jax.presets import get_preset
    shapes = [s.strip() for s in args.shapes.split(",") if s.strip()]
    for shape in shapes:
        try:
            get_preset(parse_shape(shape)[0])
        except Exception as e:  # noqa: BLE001
            p.error(f"--shapes {shape!r}: {e}")

    spread_path = None
    if "spread" in data_kinds:
        spread_path = os.path.join(tempfile.gettempdir(), f"chat_spread_{args.spread_examples}.jsonl")
        if not os.path.exists(spread_path):
            subprocess.run([sys.executable, os.path.join(ROOT, "benchmarks", "make_chat_data.py"), "--out",
                            spread_path, "--examples", str(args.spread_examples)], check=True)

    rows = []
    for shape in shapes:
        preset, seq, batch = parse_shape(shape)
        fpt = flops_per_token(config_from_dict(get_preset(preset)), seq)
        shape_rows = []
        for peer in peers:
            if peer == "harness":
                r = run_worker("jax", shape, args.harness_variant, args.steps, args.timeout, blocks=2)
                variant = args.harness_variant
            else:
                variant = "plain" if peer == "torch" else "liger"
                r = run_worker("torch", shape, variant, args.steps, args.timeout, blocks=2)
                if r.get("error") == "out of memory" and peer == "torch":
                    r = run_worker("torch", shape, "ckpt", args.steps, args.timeout, blocks=2)
                    variant = "grad ckpt"
            if "error" not in r:
                r["tokens_per_s"] = seq * batch / r["step_s"]
                r["device_peak_gib"] = r.pop("peak_gib", None)
            shape_rows.append({"shape": shape, "who": peer, "variant": variant, **r})
            print(json.dumps(shape_rows[-1]), flush=True)
        for data in data_kinds:
            r = run_trainer(preset, seq, batch, data, args.steps, args.warmup, args.timeout, spread_path,
                            args.trainer_args.split())
            shape_rows.append({"shape": shape, "who": "trainer", "variant": data, **r})
            print(json.dumps(shape_rows[-1]), flush=True)
        torch_row = next((r for r in shape_rows if r["who"] == "torch" and "error" not in r), None)
        for r in shape_rows:
            if "error" in r:
                continue
            r["mfu_989"] = fpt * r["tokens_per_s"] / PEAK
            if torch_row is not None:
                r["vs_torch"] = r["tokens_per_s"] / torch_row["tokens_per_s"]
        rows += shape_rows

    result = {"date": datetime.date.today().isoformat(), "rows": rows,
              "convention": "tokens/s of processed tokens (padding included); MFU: 6*N_matmul + 3*causal "
                            "attention fwd FLOPs per token, vs 989e12"}
    for folder in filter(None, [os.path.join(ROOT, "benchmarks", "results"), args.out]):
        os.makedirs(folder, exist_ok=True)
        with open(os.path.join(folder, "launcher_throughput.json"), "w") as f:
            json.dump(result, f, indent=1)
    device = next((r.get("device") for r in rows if r.get("device")), "?")
    print(f"\n{datetime.date.today()}  {device}")
    print(f"{'shape':<15}{'who':<9}{'variant':<24}{'tok/s':>9}{'step ms':>9}{'dev GiB':>9}{'RSS GiB':>9}"
          f"{'MFU':>7}{'vs torch':>9}")
    for r in rows:
        if "error" in r:
            print(f"{r['shape']:<15}{r['who']:<9}{r['variant']:<24}  {r['error'][:90]}")
            continue
        dev, rss, ratio = r.get("device_peak_gib"), r.get("host_peak_rss_gib"), r.get("vs_torch")
        dev = "-" if dev is None else f"{dev:.1f}"
        rss = "-" if rss is None else f"{rss:.1f}"
        ratio = "" if ratio is None else f"{ratio:.2f}"
        print(f"{r['shape']:<15}{r['who']:<9}{r['variant']:<24}{r['tokens_per_s']:>9.0f}{r['step_s'] * 1e3:>9.1f}"
              f"{dev:>9}{rss:>9}{100 * r['mfu_989']:>6.1f}%{ratio:>9}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
