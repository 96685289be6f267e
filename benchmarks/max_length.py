"""Longest sequence whose Qwen2-0.5B-shaped training step fits on one GPU, per attention implementation.

    python benchmarks/max_length.py [--impls cudnn,blockwise,xla] [--seqs 32768,65536,...] [--run cudnn]

For each implementation and length the full train step (AdamW, fp32 master weights, bf16
compute, full remat, scanned layers, chunked loss, batch 1) is *compiled only*, on abstract
inputs, and XLA's buffer assignment (`compiled.memory_analysis()`: arguments + outputs +
temporaries - aliased/donated) says how much device memory it needs; nothing is executed, so
slow paths (the XLA reference at 128k would take minutes per step) are sized in seconds.  A
length "fits" when that total is under the device's memory limit (`bytes_limit` of the memory
pool, or `--limit_gib`: to size a smaller card of the same architecture from a larger one; XLA's
scheduler bounds live memory by a fraction of the card, so the larger card's figure is an upper
bound).  `--run IMPL` then executes two steps of IMPL at its longest fitting length to confirm
the estimate against the measured `peak_bytes_in_use`.  Each length runs in its own subprocess.
Table on stdout, JSON in benchmarks/results/max_length.json (and $OUT).
"""

from __future__ import annotations

import argparse
import datetime
import json
import os
import sys
import time

ROOT = os.path.abspath(os.path.join(os.path.dirname(__file__), ".."))
sys.path.insert(0, ROOT)
sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
from bench_common import run_result_subprocess  # noqa: E402  (benchmarks/ on sys.path)


def worker(impl, seq, variant, preset, execute):
    import jax
    import jax.numpy as jnp
    import numpy as np

    from configs.base import get_config
    from qwen_jax import sharding
    from qwen_jax.config import config_from_dict
    from qwen_jax.presets import get_preset
    from qwen_jax.trainer import optimizer as opt
    from qwen_jax.trainer import train_step as ts

    remat, scan, chunk = variant.split("/")
    cfg = config_from_dict(get_preset(preset), dtype="bfloat16", param_dtype="float32", attention=impl,
                           remat=remat, scan_layers=scan == "scan", attention_block_size=1024)
    mesh = sharding.make_mesh({"fsdp": 1}, devices=jax.devices()[:1])
    graphdef, abstract, p_sh = ts.param_shardings(cfg, mesh)
    spec = opt.resolve_freeze(abstract)
    tx, sched = opt.make_optimizer(abstract, get_config().optimizer, 1000, spec)
    state_sh = ts.state_shardings(tx, abstract, p_sh, mesh)
    keys = ts.FULL_ROW_KEYS
    batch_sh = ts.batch_shardings(mesh, 1, seq, keys=keys)
    step = ts.make_train_step(graphdef, tx, sched, spec, mesh=mesh, state_sh=state_sh, batch_sh=batch_sh,
                              chunk_size=int(chunk))
    state_abs = ts.abstract_state(tx, abstract, state_sh)
    batch_abs = {k: jax.ShapeDtypeStruct((1, seq), jnp.float32 if k == "loss_mask" else jnp.int32,
                                         sharding=batch_sh[k]) for k in keys}
    t0 = time.perf_counter()
    with jax.set_mesh(mesh):
        compiled = step.jitted.lower(state_abs, batch_abs).compile()
    compile_s = time.perf_counter() - t0
    m = compiled.memory_analysis()
    need = (m.argument_size_in_bytes + m.output_size_in_bytes + m.temp_size_in_bytes - m.alias_size_in_bytes)
    stats = jax.devices()[0].memory_stats() or {}
    res = {"need_gib": need / 2**30, "temp_gib": m.temp_size_in_bytes / 2**30,
           "args_gib": m.argument_size_in_bytes / 2**30, "limit_gib": stats.get("bytes_limit", 0) / 2**30,
           "compile_s": compile_s, "device": jax.devices()[0].device_kind}
    if execute:
        params = ts.init_params(cfg, 0, p_sh)
        state = ts.init_state(params, tx, 0, state_sh)
        del params
        rng = np.random.default_rng(0)
        ids = rng.integers(0, cfg.vocab_size, (1, seq + 1), dtype=np.int32)
        host = {"input_ids": ids[:, :-1], "targets": ids[:, 1:], "loss_mask": np.ones((1, seq), np.float32)}
        batch = {k: jax.device_put(v, batch_sh[k]) for k, v in host.items()}
        times = []
        for _ in range(2):
            t0 = time.perf_counter()
            state, metrics = step(state, batch)
            jax.block_until_ready(metrics)
            times.append(time.perf_counter() - t0)
        stats = jax.devices()[0].memory_stats() or {}
        res.update(step_s=times[-1], peak_gib=stats.get("peak_bytes_in_use", 0) / 2**30, loss=float(metrics["loss"]))
    return res


def run_worker(impl, seq, args, execute=False):
    cmd = [sys.executable, __file__, "--worker", "--impl", impl, "--seq", str(seq), "--variant", args.variant,
           "--preset", args.preset] + (["--execute"] if execute else [])
    env = dict(os.environ, XLA_PYTHON_CLIENT_MEM_FRACTION="0.92")
    return run_result_subprocess(cmd, env, args.timeout, ROOT)


def main():
    p = argparse.ArgumentParser()
    p.add_argument("--impls", default="cudnn,blockwise,xla")
    p.add_argument("--seqs", default="32768,65536,131072,262144,524288")
    p.add_argument("--variant", default="full/scan/4096", help="remat/scan|noscan/loss chunk")
    p.add_argument("--preset", default="qwen2-0.5b")
    p.add_argument("--run", default="", help="implementations to execute at their longest fitting length")
    p.add_argument("--limit_gib", type=float, default=0.0,
                   help="judge 'fits' against this many GiB instead of this device's pool (e.g. 73.0: an 80 GB "
                        "H100's pool at XLA_PYTHON_CLIENT_MEM_FRACTION=0.92)")
    p.add_argument("--timeout", type=int, default=300)
    p.add_argument("--worker", action="store_true")
    p.add_argument("--execute", action="store_true")
    p.add_argument("--impl")
    p.add_argument("--seq", type=int)
    p.add_argument("--out", default=os.environ.get("OUT", ""))
    args = p.parse_args()
    if args.limit_gib < 0:
        p.error(f"--limit_gib must be >= 0 (0: this device's pool), got {args.limit_gib}")
    if args.worker:
        print("RESULT " + json.dumps(worker(args.impl, args.seq, args.variant, args.preset, args.execute)), flush=True)
        return
    rows = []
    for impl in args.impls.split(","):
        longest = None
        for seq in [int(s) for s in args.seqs.split(",")]:
            r = {"impl": impl, "seq": seq, **run_worker(impl, seq, args)}
            if args.limit_gib:
                r["limit_gib"] = args.limit_gib
            r["fits"] = "error" not in r and (not r["limit_gib"] or r["need_gib"] <= r["limit_gib"])
            rows.append(r)
            print(json.dumps(r), flush=True)
            if not r["fits"]:
                break
            longest = seq
        if impl in args.run.split(",") and longest:
            r = {"impl": impl, "seq": longest, "executed": True, **run_worker(impl, longest, args, execute=True)}
            r["fits"] = "error" not in r
            rows.append(r)
            print(json.dumps(r), flush=True)
    result = {"date": datetime.date.today().isoformat(), "variant": args.variant, "preset": args.preset, "rows": rows}
    for folder in filter(None, [os.path.join(ROOT, "benchmarks", "results"), args.out]):
        os.makedirs(folder, exist_ok=True)
        with open(os.path.join(folder, "max_length.json"), "w") as f:
            json.dump(result, f, indent=1)
    device = next((r.get("device") for r in rows if r.get("device")), "?")
    print(f"\n{datetime.date.today()}  {device}  {args.preset}  variant {args.variant}")
    print(f"{'impl':<11}{'seq':>9}{'need GiB':>10}{'limit GiB':>10}{'fits':>6}{'ran: peak GiB':>15}{'step s':>8}")
    for r in rows:
        if "error" in r:
            print(f"{r['impl']:<11}{r['seq']:>9}  {r['error'][:80]}")
            continue
        ran = f"{r['peak_gib']:.1f}" if "peak_gib" in r else ""
        step = f"{r['step_s']:.2f}" if "step_s" in r else ""
        fits = "yes" if r["fits"] else "no"
        print(f"{r['impl']:<11}{r['seq']:>9}{r['need_gib']:>10.1f}{r['limit_gib']:>10.1f}{fits:>6}{ran:>15}{step:>8}")


if __name__ == "__main__":
    main()
