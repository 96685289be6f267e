"""Training throughput on one GPU: our jitted train step vs transformers + PyTorch, same shapes, same run.

    python benchmarks/train_throughput.py [--shapes 0.5b:4096x4,0.5b:16384x1,1.5b:4096x2,1.5b:16384x1]

Each (framework, shape, variant) runs in its own subprocess (so one framework's memory pool
never limits the other) on random tokens:

* ours: `qwen_jax.trainer` step (bf16 compute over fp32 master parameters, AdamW, chunked
  cross-entropy, donated state), attention and remat variants from --variants;
* theirs: `transformers.Qwen2ForCausalLM` with SDPA attention, fp32 parameters under bf16
  autocast, `torch.optim.AdamW(fused=True)`, loss from `labels`; gradient checkpointing is
  switched on only if the plain run runs out of memory (as a user would).

Reported per row: tokens/s and step time (median of --steps timed steps after warm-up), peak
device memory, MFU against 989 TFLOP/s (H100/H200 dense bf16) and against the bf16 matmul
rate measured in this run, and ours/theirs.  Model FLOPs per token (both frameworks):
6 * N_matmul + 3 * causal attention forward FLOPs, N_matmul = all decoder parameters plus
the output projection (the embedding lookup is no matmul); causal attention forward =
2 * 2 * L * H * D * T / 2 per token (half the score matrix).  Results: table on stdout,
JSON in benchmarks/results/train_throughput.json (and --out).
"""

from __future__ import annotations

import argparse
import datetime
import json
import os
import statistics
import subprocess
import sys
import time

ROOT = os.path.abspath(os.path.join(os.path.dirname(__file__), ".."))
sys.path.insert(0, ROOT)

PRESETS = {"0.5b": "qwen2-0.5b", "1.5b": "qwen2-1.5b", "7b": "qwen2-7b"}
PEAK = 989e12


def parse_shape(text: str):
    size, rest = text.split(":")
    seq, batch = rest.split("x")
    return PRESETS[size], int(seq), int(batch)


# ------------------------------------------------------------------ workers
def matmul_rate_jax(n=8192, reps=20):
    import jax
    import jax.numpy as jnp

    a = jax.random.normal(jax.random.key(0), (n, n), jnp.bfloat16)
    b = jax.random.normal(jax.random.key(1), (n, n), jnp.bfloat16)
    f = jax.jit(lambda a, b: a @ b)
    f(a, b).block_until_ready()
    times = []
    for _ in range(reps):
        t0 = time.perf_counter()
        f(a, b).block_until_ready()
        times.append(time.perf_counter() - t0)
    return 2 * n**3 / statistics.median(times)


def worker_jax(preset, seq, batch, variant, steps):
    import jax
    import numpy as np

    from configs.base import get_config
    from configs.model_presets import get_preset
    from qwen_jax import sharding
    from qwen_jax.config import config_from_dict
    from qwen_jax.metrics import flops_per_token
    from qwen_jax.trainer import optimizer as opt
    from qwen_jax.trainer import train_step as ts

    attention, remat, scan, chunk = variant.split("/")
    cfg = config_from_dict(get_preset(preset), dtype="bfloat16", param_dtype="float32", attention=attention,
                           remat=remat, scan_layers=scan == "scan")
    mesh = sharding.make_mesh({"fsdp": 1})
    c = get_config()
    graphdef, abstract, p_sh = ts.param_shardings(cfg, mesh)
    params = ts.init_params(cfg, 0, p_sh)
    spec = opt.resolve_freeze(params)
    tx, sched = opt.make_optimizer(params, c.optimizer, 1000, spec)
    state_sh = ts.state_shardings(tx, abstract, p_sh, mesh)
    state = ts.init_state(params, tx, 0, state_sh)
    del params
    keys = ("input_ids", "targets", "loss_mask")  # one document per row: no positions/segments needed
    batch_sh = ts.batch_shardings(mesh, batch, seq, keys=keys)
    step = ts.make_train_step(graphdef, tx, sched, spec, mesh=mesh, state_sh=state_sh, batch_sh=batch_sh,
                              chunk_size=int(chunk))
    rng = np.random.default_rng(0)

    def make_batch():
        ids = rng.integers(0, cfg.vocab_size, (batch, seq + 1), dtype=np.int32)
        host = {"input_ids": ids[:, :-1], "targets": ids[:, 1:], "loss_mask": np.ones((batch, seq), np.float32)}
        return {k: jax.device_put(v, batch_sh[k]) for k, v in host.items()}

    batches = [make_batch() for _ in range(3)]
    t0 = time.perf_counter()
    state, m = step(state, batches[0])
    jax.block_until_ready(m)
    compile_s = time.perf_counter() - t0
    for i in range(2):
        state, m = step(state, batches[i % 3])
    jax.block_until_ready(m)
    times = []
    for i in range(steps):
        t0 = time.perf_counter()
        state, m = step(state, batches[i % 3])
        jax.block_until_ready(m)
        times.append(time.perf_counter() - t0)
    stats = jax.devices()[0].memory_stats() or {}
    return dict(step_s=statistics.median(times), compile_s=compile_s, loss=float(m["loss"]),
                peak_gib=stats.get("peak_bytes_in_use", 0) / 2**30, flops_per_token=flops_per_token(cfg, seq),
                matmul_flops=matmul_rate_jax(), device=jax.devices()[0].device_kind, jax=jax.__version__)


def worker_torch(preset, seq, batch, variant, steps):
    import torch
    from transformers import Qwen2Config, Qwen2ForCausalLM

    from configs.model_presets import get_preset
    from qwen_jax.config import config_from_dict
    from qwen_jax.metrics import flops_per_token

    hf = get_preset(preset)
    cfg = config_from_dict(hf)
    torch.manual_seed(0)
    config = Qwen2Config(**{k: v for k, v in hf.items() if k not in ("architectures", "torch_dtype")})
    config._attn_implementation = "sdpa"
    model = Qwen2ForCausalLM(config).cuda()
    if variant == "ckpt":
        model.gradient_checkpointing_enable()
    model.train()
    optimizer = torch.optim.AdamW(model.parameters(), lr=1e-5, fused=True)
    batches = [torch.randint(0, cfg.vocab_size, (batch, seq), device="cuda") for _ in range(3)]

    def one(ids):
        with torch.autocast("cuda", dtype=torch.bfloat16):
            loss = model(input_ids=ids, labels=ids).loss
        loss.backward()
        optimizer.step()
        optimizer.zero_grad(set_to_none=True)
        return loss

    for i in range(3):
        one(batches[i])
    torch.cuda.synchronize()
    torch.cuda.reset_peak_memory_stats()
    times = []
    for i in range(steps):
        torch.cuda.synchronize()
        t0 = time.perf_counter()
        loss = one(batches[i % 3])
        torch.cuda.synchronize()
        times.append(time.perf_counter() - t0)
    a = torch.randn(8192, 8192, device="cuda", dtype=torch.bfloat16)
    b = torch.randn(8192, 8192, device="cuda", dtype=torch.bfloat16)
    for _ in range(3):
        a @ b
    torch.cuda.synchronize()
    mm = []
    for _ in range(20):
        t0 = time.perf_counter()
        a @ b
        torch.cuda.synchronize()
        mm.append(time.perf_counter() - t0)
    return dict(step_s=statistics.median(times), loss=float(loss), peak_gib=torch.cuda.max_memory_allocated() / 2**30,
                flops_per_token=flops_per_token(cfg, seq), matmul_flops=2 * 8192**3 / statistics.median(mm),
                device=torch.cuda.get_device_name(), torch=torch.__version__)


# ------------------------------------------------------------------ driver
def run_worker(framework, shape, variant, steps, timeout):
    cmd = [sys.executable, __file__, "--worker", framework, "--shape", shape, "--variant", variant,
           "--steps", str(steps)]
    env = dict(os.environ, XLA_PYTHON_CLIENT_MEM_FRACTION="0.92", TOKENIZERS_PARALLELISM="false")
    env.setdefault("XLA_FLAGS", "--xla_gpu_enable_latency_hiding_scheduler=true")
    try:
        p = subprocess.run(cmd, capture_output=True, text=True, timeout=timeout, env=env, cwd=ROOT)
    except subprocess.TimeoutExpired:
        return {"error": f"timeout after {timeout}s"}
    for line in reversed(p.stdout.splitlines()):
        if line.startswith("RESULT "):
            return json.loads(line[7:])
    tail = (p.stderr or p.stdout).strip().splitlines()
    oom = any("RESOURCE_EXHAUSTED" in x or "OutOfMemory" in x or "out of memory" in x for x in tail)
    return {"error": "out of memory" if oom else (tail[-1][:200] if tail else f"exit {p.returncode}")}


def main():
    p = argparse.ArgumentParser()
    p.add_argument("--shapes", default="0.5b:4096x4,0.5b:16384x1,1.5b:4096x2,1.5b:16384x1")
    p.add_argument("--variants", default="cudnn/none/noscan/2048,cudnn/dots_no_batch/noscan/2048,cudnn/full/scan/2048")
    p.add_argument("--steps", type=int, default=10)
    p.add_argument("--timeout", type=int, default=400)
    p.add_argument("--skip_torch", action="store_true")
    p.add_argument("--worker", choices=["jax", "torch"])
    p.add_argument("--shape")
    p.add_argument("--variant", default="")
    p.add_argument("--out", default=os.environ.get("OUT", ""))
    args = p.parse_args()
    if args.worker:
        preset, seq, batch = parse_shape(args.shape)
        fn = worker_jax if args.worker == "jax" else worker_torch
        print("RESULT " + json.dumps(fn(preset, seq, batch, args.variant, args.steps)), flush=True)
        return

    rows = []
    for shape in args.shapes.split(","):
        preset, seq, batch = parse_shape(shape)
        tokens = seq * batch
        theirs = None
        if not args.skip_torch:
            theirs = run_worker("torch", shape, "plain", args.steps, args.timeout)
            if theirs.get("error") == "out of memory":
                theirs = run_worker("torch", shape, "ckpt", args.steps, args.timeout)
                theirs["variant"] = "grad ckpt"
            rows.append({"framework": "pytorch", "shape": shape, "variant": theirs.pop("variant", "plain"), **theirs})
            print(json.dumps(rows[-1]), flush=True)
        best = None
        for variant in args.variants.split(","):
            ours = run_worker("jax", shape, variant, args.steps, args.timeout)
            rows.append({"framework": "qwen_jax", "shape": shape, "variant": variant, **ours})
            print(json.dumps(rows[-1]), flush=True)
            if "error" not in ours and (best is None or ours["step_s"] < best["step_s"]):
                best = ours
        for r in rows:
            if r["shape"] == shape and "error" not in r:
                r["tokens_per_s"] = tokens / r["step_s"]
                r["mfu_989"] = r["flops_per_token"] * r["tokens_per_s"] / PEAK
                r["mfu_matmul"] = r["flops_per_token"] * r["tokens_per_s"] / r["matmul_flops"]
                if theirs and "error" not in theirs and r["framework"] == "qwen_jax":
                    r["ratio"] = theirs["step_s"] / r["step_s"]
    result = {"date": datetime.date.today().isoformat(), "rows": rows,
              "convention": "FLOPs/token = 6*N_matmul + 3*causal attention fwd (2*2*L*H*D*T/2); MFU vs 989e12 "
                            "and vs the bf16 8192^3 matmul rate measured in the same run"}
    for folder in filter(None, [os.path.join(ROOT, "benchmarks", "results"), args.out]):
        os.makedirs(folder, exist_ok=True)
        with open(os.path.join(folder, "train_throughput.json"), "w") as f:
            json.dump(result, f, indent=1)
    device = next((r.get("device") for r in rows if r.get("device")), "?")
    print(f"\n{datetime.date.today()}  {device}")
    print(f"{'shape':<15}{'framework':<10}{'variant':<28}{'tok/s':>9}{'step ms':>9}{'peak GiB':>9}"
          f"{'MFU989':>8}{'MFUmm':>7}{'ours/pt':>8}")
    for r in rows:
        if "error" in r:
            print(f"{r['shape']:<15}{r['framework']:<10}{r['variant']:<28}  {r['error'][:60]}")
            continue
        ratio = f"{r['ratio']:.2f}" if "ratio" in r else ""
        print(f"{r['shape']:<15}{r['framework']:<10}{r['variant']:<28}{r['tokens_per_s']:>9.0f}"
              f"{r['step_s'] * 1e3:>9.1f}{r['peak_gib']:>9.1f}{100 * r['mfu_989']:>7.1f}%"
              f"{100 * r['mfu_matmul']:>6.1f}%{ratio:>8}")


if __name__ == "__main__":
    main()
