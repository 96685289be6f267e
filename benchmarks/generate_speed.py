"""Decode speed: `qwen_jax.generate` vs transformers' `generate`, same shapes, same run, one accelerator.

    python benchmarks/generate_speed.py [--presets qwen2-0.5b,qwen2-1.5b] [--prompt_len 512] [--new 256]
        [--batches 1,32] [--dtype bfloat16] [--reps 3] [--hf_reps 2] [--skip_torch]
        [--profile DIR] [--profile_new 32] [--out FILE]

Random weights (bf16 parameters and compute), random prompt ids, greedy, no stop ids (every row
makes exactly `--new` tokens).  Each measurement: one untimed call (compilation / warm-up; for
transformers a short 8-token one), then the median of `--reps` (transformers: `--hf_reps`) timed
calls of the whole generation (prefill included).  tokens/s = batch * new / seconds.

`--profile DIR`: afterwards, per preset, traces one batch-1 generation of `--profile_new` tokens
with `jax.profiler` into DIR and prints, per decode step, the kernels by
category (count and time: gemm, attention, memcpy, other = XLA fusions) and the top 15 kernels
(benchmarks/profile_step.py's parser).  Only the decode loop's module is counted when the
events name their module.  On CPU it reports the host's XLA op events instead.

Memory-bandwidth bound at batch 1: each decode step must read every parameter once, so
tokens/s <= copy_rate / parameter_bytes, with copy_rate the measured read bandwidth of a
large on-device copy (bytes read per second by `x + 0` over a 4 GiB buffer).  "% of bound"
is ours / that bound.  transformers: `Qwen2ForCausalLM` with SDPA, bf16, static-free default
cache, `do_sample=False`, `min_new_tokens=max_new_tokens`.

Smoke test on CPU: `--presets tiny --prompt_len 16 --new 8 --batches 1,2 --skip_torch`.
Results: table on stdout, JSON in benchmarks/results/generate_speed.json (and --out).
"""

from __future__ import annotations

import argparse
import datetime
import json
import os
import statistics
import sys
import time

os.environ.setdefault("XLA_PYTHON_CLIENT_PREALLOCATE", "false")  # leave memory for torch in the same process
sys.path.insert(0, os.path.join(os.path.dirname(__file__), ".."))
sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))  # profile_step

import jax  # noqa: E402
import jax.numpy as jnp  # noqa: E402
import numpy as np  # noqa: E402
from flax import nnx  # noqa: E402

import qwen_jax  # noqa: E402
from qwen_jax.config import config_from_dict  # noqa: E402
from qwen_jax.model import num_params  # noqa: E402


def median_time(fn, reps: int, warmup: bool = True) -> float:
    if warmup:
        fn()
    times = []
    for _ in range(reps):
        t0 = time.perf_counter()
        fn()
        times.append(time.perf_counter() - t0)
    return statistics.median(times)


def copy_rate(nbytes: int = 4 << 30) -> float:
    """Bytes read per second by a large elementwise copy on the default device."""
    x = jnp.ones((nbytes // 2,), jnp.bfloat16)
    f = jax.jit(lambda a: a + 0)
    t = median_time(lambda: jax.block_until_ready(f(x)), 5)
    return nbytes / t


def ours(model, prompts, new: int, reps: int) -> float:
    return median_time(lambda: qwen_jax.generate(model, prompts, max_new_tokens=new, stop_ids=[]), reps)


def profile(model, prompt, new: int, trace_dir: str, top: int = 15) -> dict | None:
    """Trace one generation of `new` tokens at batch 1 and report its decode loop per step."""
    import glob

    from profile_step import analyse, load_events, report

    run = lambda: qwen_jax.generate(model, [prompt], max_new_tokens=new, stop_ids=[])
    run()  # compiled (same shapes as traced)
    t0 = time.perf_counter()
    run()
    untraced = time.perf_counter() - t0
    t0 = time.perf_counter()
    with jax.profiler.trace(trace_dir):
        run()
    wall = time.perf_counter() - t0
    files = sorted(glob.glob(os.path.join(trace_dir, "**", "*.xplane.pb"), recursive=True), key=os.path.getmtime)
    events, info = load_events(files[-1]) if files else ([], {})
    loop = [e for e in events if "decode_loop" in str(e["stats"].get("hlo_module", ""))]
    if loop:
        events, info["note"] = loop, (info["note"] + "; " if info["note"] else "") + "decode loop module only"
    if not events:
        print(f"profile: no kernel events in {trace_dir} (planes: {info.get('planes')})")
        return None
    steps = new - 1  # the prefill makes the first token
    r = analyse(events, info, steps, wall / steps, top=top)
    r["untraced_step_ms"] = untraced / steps * 1e3  # whole generation (prefill included) / decode steps
    report(r)
    return r


def theirs(raw: dict, prompts, new: int, reps: int, dtype: str) -> float:
    import torch
    from transformers import Qwen2Config, Qwen2ForCausalLM

    device = "cuda" if torch.cuda.is_available() else "cpu"
    config = Qwen2Config(**{k: v for k, v in raw.items() if k not in ("architectures",)})
    config._attn_implementation = "sdpa"
    model = Qwen2ForCausalLM(config).to(getattr(torch, dtype)).to(device).eval()
    ids = torch.tensor(prompts, device=device)
    mask = torch.ones_like(ids)

    def run(n=new):
        with torch.no_grad():
            model.generate(ids, attention_mask=mask, max_new_tokens=n, min_new_tokens=n, do_sample=False,
                           pad_token_id=0, eos_token_id=None)
        if device == "cuda":
            torch.cuda.synchronize()

    run(8)  # warm-up: kernels and allocator, without paying a whole generation
    t = median_time(run, reps, warmup=False)
    model.to("cpu")
    if device == "cuda":
        torch.cuda.empty_cache()
    return t


def main():
    p = argparse.ArgumentParser()
    p.add_argument("--presets", default="qwen2-0.5b,qwen2-1.5b")
    p.add_argument("--prompt_len", type=int, default=512)
    p.add_argument("--new", type=int, default=256)
    p.add_argument("--batches", default="1,32")
    p.add_argument("--dtype", default="bfloat16")
    p.add_argument("--reps", type=int, default=3)
    p.add_argument("--hf_reps", type=int, default=2)
    p.add_argument("--skip_torch", action="store_true")
    p.add_argument("--profile", default="", help="trace a batch-1 generation per preset into DIR")
    p.add_argument("--profile_new", type=int, default=32)
    p.add_argument("--out", default=None)
    args = p.parse_args()
    from qwen_jax.presets import get_preset

    rate = copy_rate(256 << 20 if jax.default_backend() == "cpu" else 4 << 30)
    rows, profiles = [], []
    start = time.perf_counter()
    for preset in args.presets.split(","):
        raw = get_preset(preset)
        cfg = config_from_dict(raw, dtype=args.dtype, param_dtype=args.dtype)
        param_bytes = num_params(cfg) * jnp.dtype(args.dtype).itemsize
        model = qwen_jax.Qwen(cfg, rngs=nnx.Rngs(0))
        for batch in (int(b) for b in args.batches.split(",")):
            prompts = np.random.default_rng(0).integers(0, cfg.vocab_size, (batch, args.prompt_len)).tolist()
            row = {"preset": preset, "batch": batch, "prompt_len": args.prompt_len, "new": args.new}
            t = ours(model, prompts, args.new, args.reps)
            row["ours_tokens_per_s"] = batch * args.new / t
            if batch == 1:
                row["bound_tokens_per_s"] = rate / param_bytes
                row["pct_of_bound"] = 100 * row["ours_tokens_per_s"] / row["bound_tokens_per_s"]
            hf = None
            if not args.skip_torch:
                try:
                    hf = batch * args.new / theirs(raw, prompts, args.new, args.hf_reps, args.dtype)
                except Exception as e:  # report it and go on with the other shapes
                    hf = f"{type(e).__name__}: {e}"[:300]
            if isinstance(hf, float):
                row["hf_tokens_per_s"] = hf
                row["speedup"] = row["ours_tokens_per_s"] / hf
            elif hf is not None:
                row["hf_error"] = hf
            rows.append(row)
            print(f"[{time.perf_counter() - start:.0f} s] " + json.dumps(row), flush=True)
        if args.profile:
            print(f"\n== profile {preset} batch 1, {args.profile_new} new tokens", flush=True)
            prompt = np.random.default_rng(0).integers(0, cfg.vocab_size, args.prompt_len).tolist()
            trace_dir = os.path.join(args.profile, preset)
            r = profile(model, prompt, args.profile_new, trace_dir)
            if r is not None:
                profiles.append(dict(preset=preset, **{k: r[k] for k in (
                    "events_per_step", "wall_step_ms", "device_busy_ms_per_step", "categories", "top_ops")}))
        del model
    print(f"\ncopy rate {rate / 1e9:.0f} GB/s, device {jax.devices()[0].device_kind}")
    print("| model | batch | ours tok/s | transformers tok/s | ours / transformers | % of bandwidth bound |")
    print("| --- | ---: | ---: | ---: | ---: | ---: |")
    for r in rows:
        hf = f"{r['hf_tokens_per_s']:,.0f}" if "hf_tokens_per_s" in r else "-"
        sp = f"{r['speedup']:.2f}" if "speedup" in r else "-"
        pct = f"{r['pct_of_bound']:.0f}%" if "pct_of_bound" in r else "-"
        print(f"| {r['preset']} | {r['batch']} | {r['ours_tokens_per_s']:,.0f} | {hf} | {sp} | {pct} |")
    result = {"date": datetime.datetime.now(datetime.UTC).isoformat(), "device": jax.devices()[0].device_kind,
              "copy_rate_bytes_per_s": rate, "rows": rows, "profiles": profiles, "args": vars(args)}
    out = args.out or os.path.join(os.path.dirname(__file__), "results", "generate_speed.json")
    os.makedirs(os.path.dirname(out), exist_ok=True)
    with open(out, "w") as f:
        json.dump(result, f, indent=2)


if __name__ == "__main__":
    main()
