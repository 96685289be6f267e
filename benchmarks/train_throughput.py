"""Training throughput on one GPU: our jitted train step vs transformers + PyTorch, same shapes, same run.

    python benchmarks/train_throughput.py [--shapes 0.5b:4096x4,0.5b:16384x1,1.5b:4096x2,1.5b:16384x1]
    python benchmarks/train_throughput.py --skip_torch --shapes tiny:128x2 --variants xla/none/noscan/64 --steps 2

Each (framework, shape, variant) runs in its own subprocess (so one framework's memory pool
never limits the other) on random tokens:

* ours: `qwen_jax.trainer` step (bf16 compute over fp32 master parameters, AdamW, chunked
  cross-entropy, donated state), attention and remat variants from --variants;
* theirs: `transformers.Qwen2ForCausalLM` with SDPA attention, fp32 parameters under bf16
  autocast, `torch.optim.AdamW(fused=True)`, loss from `labels`; gradient checkpointing is
  switched on only if the plain run runs out of memory (as a user would).

A jax variant is `attention/remat/scan|noscan/loss_chunk[/flags]`.  The optional 5th field names
the XLA_FLAGS of that variant's subprocess: `default` (`--xla_gpu_enable_latency_hiding_scheduler=true`),
`none` (XLA's own defaults) or a name given with `--xla_flags_variants 'name=FLAGS;name2=FLAGS'`
(or a JSON object); the named flags replace the inherited XLA_FLAGS.  Without a 5th field the
subprocess keeps the caller's XLA_FLAGS, or `default` when none is set.  Shapes are
`size:SEQxBATCH`, size one of PRESETS below or any name of `qwen_jax.presets` (`tiny` is
a 2-layer model for CPU smoke tests).  Other scripts build the same step with `build_jax_step`.

Step time, both frameworks alike: after warm-up, --blocks blocks of --steps steps each are run
back to back with one device sync at the end of a block (as a training loop runs: the host
queues step i+1 while step i computes); the step time is the median over blocks of block time /
--steps.  `step_s_synced` (median of --steps steps each followed by a sync, so every step also
pays the host's dispatch latency) is reported beside it.

Reported per row: tokens/s and step time, peak
device memory, MFU against 989 TFLOP/s (H100/H200 dense bf16) and against the bf16 matmul
rate measured in this run, and ours/theirs.  The matmul rate (both frameworks, same method):
one call = 10 chained bf16 matmuls x_{i+1} = x_i @ B_i (distinct B_i with N(0, 1/k) entries, so
nothing can be hoisted, merged or overflow), timed between device syncs, median of 10 calls;
the best of the shapes m x k x k in MATMUL_SHAPES is the ceiling (`matmul_flops`, per shape in
`matmul_by_shape`).  Model FLOPs per token (both frameworks): 6 * N_matmul + 3 * causal
attention forward FLOPs, N_matmul = all decoder parameters plus the output projection (the
embedding lookup is no matmul); causal attention forward = 2 * 2 * L * H * D * T / 2 per token
(half the score matrix).  MFUfull counts attention unmasked (12 * L * H * D * T per token,
PaLM's convention, the one behind the PyTorch reference figures).  Results: table on stdout, JSON in
benchmarks/results/train_throughput.json (and --out).
"""

from __future__ import annotations

import argparse
import datetime
import json
import math
import os
import statistics
import sys
import time

ROOT = os.path.abspath(os.path.join(os.path.dirname(__file__), ".."))
sys.path.insert(0, ROOT)
sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
from bench_common import run_result_subprocess, torch_lm_step, torch_step_times  # noqa: E402  (benchmarks/ on sys.path)

PRESETS = {"0.5b": "qwen2-0.5b", "1.5b": "qwen2-1.5b", "7b": "qwen2-7b", "tiny": "tiny"}
PEAK = 989e12
DEFAULT_XLA_FLAGS = "--xla_gpu_enable_latency_hiding_scheduler=true"
BUILTIN_XLA_FLAGS = {"default": DEFAULT_XLA_FLAGS, "none": ""}
MATMUL_SHAPES = ((8192, 8192), (4096, 8192))  # (m, k): x is m x k, each B_i is k x k (m <= k: see matmul_rate_jax)
MATMUL_SHAPES_CPU = ((256, 512),)
MATMUL_CHAIN, MATMUL_REPS = 10, 10


def parse_shape(text: str):
    """`size:SEQxBATCH` -> (preset name, seq, batch); size is a PRESETS key or a model preset name."""
    size, rest = text.split(":")
    seq, batch = rest.lower().split("x")
    return PRESETS.get(size, size), int(seq), int(batch)


def parse_variant(variant: str):
    """`attention/remat/scan|noscan/chunk[/flags]` -> (attention, remat, scan: bool, chunk: int, flags name or None)."""
    parts = variant.split("/")
    if len(parts) not in (4, 5) or parts[2] not in ("scan", "noscan"):
        raise ValueError(f"variant {variant!r}: expected attention/remat/scan|noscan/loss_chunk[/xla_flags_name]")
    return parts[0], parts[1], parts[2] == "scan", int(parts[3]), (parts[4] if len(parts) == 5 else None)


def parse_xla_flags_variants(text: str) -> dict:
    """`name=FLAGS;name2=FLAGS` (or a JSON object) -> {name: flags}, on top of BUILTIN_XLA_FLAGS."""
    table = dict(BUILTIN_XLA_FLAGS)
    text = (text or "").strip()
    if text.startswith("{"):
        table.update({str(k): str(v) for k, v in json.loads(text).items()})
    elif text:
        for item in filter(None, (x.strip() for x in text.split(";"))):
            name, sep, flags = item.partition("=")
            if not sep or not name.strip():
                raise ValueError(f"--xla_flags_variants item {item!r}: expected name=FLAGS")
            table[name.strip()] = flags.strip()
    return table


def xla_flags_for(variant: str, table: dict, inherited: str | None = None) -> str:
    """XLA_FLAGS of a jax variant's process: the named set, else `inherited` (the caller's), else the default."""
    name = parse_variant(variant)[4]
    if name is None:
        return DEFAULT_XLA_FLAGS if inherited is None else inherited
    if name not in table:
        raise ValueError(f"variant {variant!r}: unknown XLA flags name {name!r} (known: {', '.join(table)})")
    return table[name]


# ------------------------------------------------------------------ shared building blocks
def build_jax_step(preset_or_cfg, seq: int, batch: int, variant: str, n_batches: int = 3, seed: int = 0,
                   ring: int = 1, mesh_shape: dict | None = None):
    """Our jitted train step on one device, as benchmarked: `(step, state, batches, cfg)`.

    `preset_or_cfg`: a PRESETS key, a `qwen_jax.presets` name, a Hugging Face config dict or
    a `QwenConfig`; the variant's attention / remat / scan and bf16 compute over fp32 parameters
    are applied to it.  `step(state, batch) -> (state, metrics)` donates `state`; `batches` are
    `n_batches` random-token batches (one document per row) already on the device.
    `ring` > 1: a mesh {seq: ring} over the first `ring` devices (use attention "ring"); batches
    carry positions and are permuted to the zig-zag layout, as the trainer does.  `mesh_shape`
    (e.g. {"seq": 4, "fsdp": 2}) replaces {seq: ring}: a mesh over the first prod(sizes) devices,
    the ring over its `seq` axis, the batch split over data x fsdp.
    """
    import jax
    import numpy as np

    from configs.base import get_config
    from qwen_jax import sharding
    from qwen_jax.config import QwenConfig, config_from_dict
    from qwen_jax.presets import get_preset
    from qwen_jax.trainer import optimizer as opt
    from qwen_jax.trainer import train_step as ts

    attention, remat, scan, chunk, _ = parse_variant(variant)
    run = dict(dtype="bfloat16", param_dtype="float32", attention=attention, remat=remat, scan_layers=scan)
    if isinstance(preset_or_cfg, QwenConfig):
        cfg = preset_or_cfg.replace(**run)
    else:
        raw = get_preset(PRESETS.get(preset_or_cfg, preset_or_cfg)) if isinstance(preset_or_cfg, str) else preset_or_cfg
        cfg = config_from_dict(raw, **run)
    mesh_shape = dict(mesh_shape or {"seq": ring})
    ring = int(mesh_shape.get("seq", 1))
    mesh = sharding.make_mesh(mesh_shape, devices=jax.devices()[:math.prod(mesh_shape.values())])
    c = get_config()
    graphdef, abstract, p_sh = ts.param_shardings(cfg, mesh)
    params = ts.init_params(cfg, seed, p_sh)
    spec = opt.resolve_freeze(params)
    tx, sched = opt.make_optimizer(params, c.optimizer, 1000, spec)
    state_sh = ts.state_shardings(tx, abstract, p_sh, mesh)
    state = ts.init_state(params, tx, seed, state_sh)
    del params
    keys = ts.full_row_keys(ring)  # one document per row (the launcher's `synthetic_layout=full_rows` batches)
    batch_sh = ts.batch_shardings(mesh, batch, seq, keys=keys)
    step = ts.make_train_step(graphdef, tx, sched, spec, mesh=mesh, state_sh=state_sh, batch_sh=batch_sh,
                              chunk_size=chunk, zigzag=ring > 1)
    rng = np.random.default_rng(seed)

    def make_batch():
        ids = rng.integers(0, cfg.vocab_size, (batch, seq + 1), dtype=np.int32)
        host = {"input_ids": ids[:, :-1], "targets": ids[:, 1:], "loss_mask": np.ones((batch, seq), np.float32)}
        if ring > 1:
            host["positions"] = np.broadcast_to(np.arange(seq, dtype=np.int32), (batch, seq))
            host = ts.permute_batch_for_ring(host, ring)
        return {k: jax.device_put(v, batch_sh[k]) for k, v in host.items()}

    return step, state, [make_batch() for _ in range(n_batches)], cfg


def run_steps(step, state, batches, n: int, timed: bool = True):
    """`n` steps over `batches` round-robin; `(state, metrics, seconds per step)` (each step synced if `timed`)."""
    import jax

    times, m = [], None
    for i in range(n):
        t0 = time.perf_counter()
        state, m = step(state, batches[i % len(batches)])
        if timed:
            jax.block_until_ready(m)
            times.append(time.perf_counter() - t0)
    jax.block_until_ready(m)
    return state, m, times


def block_times(step, state, batches, n: int, blocks: int):
    """`(state, metrics, [seconds per step of each block])`: `blocks` runs of `n` back-to-back steps, one sync each."""
    import jax

    per_step, m = [], None
    for _ in range(blocks):
        t0 = time.perf_counter()
        for i in range(n):
            state, m = step(state, batches[i % len(batches)])
        jax.block_until_ready((state, m))
        per_step.append((time.perf_counter() - t0) / n)
    return state, m, per_step


def _best_rate(rates: dict):
    return max(rates.values()), rates


def matmul_rate_jax(shapes=None, chain=MATMUL_CHAIN, reps=MATMUL_REPS):
    """(best bf16 FLOP/s, {"MxKxK": FLOP/s}) of `chain` chained matmuls per jitted call (see the module docstring).

    The chain is unrolled at trace time (straight-line HLO: no while loop, so no per-iteration
    predicate copy to the host), each matmul consumes the previous result, and the B_i are
    distinct with m <= k, so XLA can neither CSE nor profitably re-associate them.
    """
    import jax
    import jax.numpy as jnp

    if shapes is None:
        shapes = MATMUL_SHAPES_CPU if jax.default_backend() == "cpu" else MATMUL_SHAPES
    rates = {}
    for m, k in shapes:
        keys = jax.random.split(jax.random.key(0), chain + 1)
        x = jax.random.normal(keys[0], (m, k), jnp.bfloat16)
        bs = [(jax.random.normal(kk, (k, k), jnp.float32) / math.sqrt(k)).astype(jnp.bfloat16) for kk in keys[1:]]

        @jax.jit
        def f(x, *bs):
            for b in bs:
                x = x @ b
            return x

        for _ in range(2):
            f(x, *bs).block_until_ready()
        times = []
        for _ in range(reps):
            t0 = time.perf_counter()
            f(x, *bs).block_until_ready()
            times.append(time.perf_counter() - t0)
        rates[f"{m}x{k}x{k}"] = 2 * m * k * k * chain / statistics.median(times)
        del x, bs
    return _best_rate(rates)


def matmul_rate_torch(shapes=MATMUL_SHAPES, chain=MATMUL_CHAIN, reps=MATMUL_REPS, device="cuda"):
    """Same measurement as `matmul_rate_jax` with torch (eager: the chain is launched asynchronously)."""
    import torch

    def sync():
        if device == "cuda":
            torch.cuda.synchronize()

    rates = {}
    gen = torch.Generator(device=device).manual_seed(0)
    for m, k in shapes:
        x0 = torch.randn(m, k, device=device, dtype=torch.bfloat16, generator=gen)
        bs = [(torch.randn(k, k, device=device, generator=gen) / math.sqrt(k)).to(torch.bfloat16) for _ in range(chain)]

        def f(x0=x0, bs=bs):
            x = x0
            for b in bs:
                x = x @ b
            return x

        for _ in range(2):
            f()
        sync()
        times = []
        for _ in range(reps):
            sync()
            t0 = time.perf_counter()
            f()
            sync()
            times.append(time.perf_counter() - t0)
        rates[f"{m}x{k}x{k}"] = 2 * m * k * k * chain / statistics.median(times)
        del x0, bs
    return _best_rate(rates)


# ------------------------------------------------------------------ workers
def worker_jax(preset, seq, batch, variant, steps, blocks):
    import jax

    step, state, batches, cfg = build_jax_step(preset, seq, batch, variant)
    t0 = time.perf_counter()
    state, m, _ = run_steps(step, state, batches, 1)
    compile_s = time.perf_counter() - t0
    state, m, _ = run_steps(step, state, batches, 2, timed=False)
    state, m, synced = run_steps(step, state, batches, steps)
    state, m, per_block = block_times(step, state, batches, steps, blocks)
    stats = jax.devices()[0].memory_stats() or {}
    loss = float(m["loss"])
    del state, batches, m
    mm, mm_by_shape = matmul_rate_jax()
    return dict(step_s=statistics.median(per_block), step_s_blocks=per_block, step_s_synced=statistics.median(synced),
                compile_s=compile_s, loss=loss, peak_gib=stats.get("peak_bytes_in_use", 0) / 2**30,
                matmul_flops=mm, matmul_by_shape=mm_by_shape, device=jax.devices()[0].device_kind,
                jax=jax.__version__, xla_flags=os.environ.get("XLA_FLAGS", ""))


def _torch_train_times(hf: dict, cfg, seq, batch, variant, steps, blocks):
    """(synced seconds per step, [seconds per step of each back-to-back block], last loss, peak GiB) of
    transformers' training step; its memory is freed on return."""
    import torch
    from transformers import Qwen2Config, Qwen2ForCausalLM

    torch.manual_seed(0)
    if variant == "liger":  # Liger's fused RMSNorm, RoPE, SwiGLU and linear cross-entropy, patched into transformers
        from liger_kernel.transformers import apply_liger_kernel_to_qwen2

        apply_liger_kernel_to_qwen2()
    config = Qwen2Config(**{k: v for k, v in hf.items() if k not in ("architectures", "torch_dtype")})
    config._attn_implementation = "sdpa"
    model = Qwen2ForCausalLM(config).cuda()
    if variant == "ckpt":
        model.gradient_checkpointing_enable()
    model.train()
    optimizer = torch.optim.AdamW(model.parameters(), lr=1e-5, fused=True)
    batches = [torch.randint(0, cfg.vocab_size, (batch, seq), device="cuda") for _ in range(3)]
    times, per_block, loss = torch_step_times(torch_lm_step(model, optimizer), batches, steps, blocks)
    return times, per_block, loss, torch.cuda.max_memory_allocated() / 2**30


def worker_torch(preset, seq, batch, variant, steps, blocks):
    import gc

    import torch

    from qwen_jax.config import config_from_dict
    from qwen_jax.presets import get_preset

    hf = get_preset(preset)
    cfg = config_from_dict(hf)
    synced, per_block, loss, peak_gib = _torch_train_times(hf, cfg, seq, batch, variant, steps, blocks)
    gc.collect()
    torch.cuda.empty_cache()
    mm, mm_by_shape = matmul_rate_torch()
    return dict(step_s=statistics.median(per_block), step_s_blocks=per_block, step_s_synced=statistics.median(synced),
                loss=loss, peak_gib=peak_gib, matmul_flops=mm, matmul_by_shape=mm_by_shape,
                device=torch.cuda.get_device_name(), torch=torch.__version__)


# ------------------------------------------------------------------ driver
def run_worker(framework, shape, variant, steps, timeout, xla_flags=None, blocks=3):
    """One worker subprocess; `xla_flags` (jax only) becomes its XLA_FLAGS."""
    cmd = [sys.executable, __file__, "--worker", framework, "--shape", shape, "--variant", variant,
           "--steps", str(steps), "--blocks", str(blocks)]
    env = dict(os.environ, XLA_PYTHON_CLIENT_MEM_FRACTION="0.92", TOKENIZERS_PARALLELISM="false")
    if xla_flags is not None:
        env["XLA_FLAGS"] = xla_flags
    env.setdefault("XLA_FLAGS", DEFAULT_XLA_FLAGS)
    return run_result_subprocess(cmd, env, timeout, ROOT)


def main():
    p = argparse.ArgumentParser()
    p.add_argument("--shapes", default="0.5b:4096x4,0.5b:16384x1,1.5b:4096x2,1.5b:16384x1")
    p.add_argument("--variants", default="cudnn/none/noscan/2048,cudnn/dots_no_batch/noscan/2048,cudnn/full/scan/2048",
                   help="comma-separated attention/remat/scan|noscan/loss_chunk[/xla_flags_name]")
    p.add_argument("--xla_flags_variants", default="",
                   help="'name=FLAGS;name2=FLAGS' or a JSON object: XLA_FLAGS sets a variant's 5th field can name "
                        f"(built in: {json.dumps(BUILTIN_XLA_FLAGS)})")
    p.add_argument("--steps", type=int, default=10, help="steps per timed block (and synced steps)")
    p.add_argument("--blocks", type=int, default=3, help="timed blocks of back-to-back steps")
    p.add_argument("--timeout", type=int, default=400)
    p.add_argument("--skip_torch", action="store_true")
    p.add_argument("--worker", choices=["jax", "torch"])
    p.add_argument("--shape")
    p.add_argument("--variant", default="")
    p.add_argument("--out", default=os.environ.get("OUT", ""))
    args = p.parse_args()
    for flag in ("steps", "blocks"):
        if getattr(args, flag) < 1:
            p.error(f"--{flag} must be >= 1, got {getattr(args, flag)}")
    if args.worker:
        preset, seq, batch = parse_shape(args.shape)
        fn = worker_jax if args.worker == "jax" else worker_torch
        print("RESULT " + json.dumps(fn(preset, seq, batch, args.variant, args.steps, args.blocks)), flush=True)
        return

    # validate everything before the first (expensive) subprocess
    from qwen_jax.config import config_from_dict
    from qwen_jax.metrics import flops_per_token
    from qwen_jax.presets import PRESETS as MODEL_PRESETS
    from qwen_jax.presets import get_preset

    variants = [v.strip() for v in args.variants.split(",") if v.strip()]
    try:
        table = parse_xla_flags_variants(args.xla_flags_variants)
        flags = {v: xla_flags_for(v, table, os.environ.get("XLA_FLAGS")) for v in variants}
    except ValueError as e:  # also json.JSONDecodeError
        p.error(str(e))
    shapes = [s.strip() for s in args.shapes.split(",") if s.strip()]
    for shape in shapes:
        if parse_shape(shape)[0] not in MODEL_PRESETS:
            p.error(f"shape {shape!r}: unknown size (PRESETS keys: {', '.join(PRESETS)}, or a model preset name)")

    rows = []
    for shape in shapes:
        preset, seq, batch = parse_shape(shape)
        tokens = seq * batch
        cfg = config_from_dict(get_preset(preset))  # model FLOPs: the same count for both frameworks
        flops = {"flops_per_token": flops_per_token(cfg, seq),
                 "flops_per_token_full_attention": flops_per_token(cfg, seq, causal=False)}
        theirs = None
        if not args.skip_torch:
            theirs = run_worker("torch", shape, "plain", args.steps, args.timeout, blocks=args.blocks)
            if theirs.get("error") == "out of memory":
                theirs = run_worker("torch", shape, "ckpt", args.steps, args.timeout, blocks=args.blocks)
                theirs["variant"] = "grad ckpt"
            rows.append({"framework": "pytorch", "shape": shape, "variant": theirs.pop("variant", "plain"), **theirs})
            print(json.dumps(rows[-1]), flush=True)
        best = None
        for variant in variants:
            ours = run_worker("jax", shape, variant, args.steps, args.timeout, xla_flags=flags[variant],
                              blocks=args.blocks)
            rows.append({"framework": "qwen_jax", "shape": shape, "variant": variant, **ours})
            rows[-1].setdefault("xla_flags", flags[variant])
            print(json.dumps(rows[-1]), flush=True)
            if "error" not in ours and (best is None or ours["step_s"] < best["step_s"]):
                best = ours
        for r in rows:
            if r["shape"] == shape and "error" not in r:
                r.update(flops)
                r["tokens_per_s"] = tokens / r["step_s"]
                r["mfu_989"] = r["flops_per_token"] * r["tokens_per_s"] / PEAK
                r["mfu_989_full_attention"] = r["flops_per_token_full_attention"] * r["tokens_per_s"] / PEAK
                r["mfu_matmul"] = r["flops_per_token"] * r["tokens_per_s"] / r["matmul_flops"]
                if theirs and "error" not in theirs and r["framework"] == "qwen_jax":
                    r["ratio"] = theirs["step_s"] / r["step_s"]
                    r["ratio_synced"] = theirs["step_s_synced"] / r["step_s_synced"]
    shapes_text = ", ".join(f"{m}x{k}x{k}" for m, k in MATMUL_SHAPES)
    result = {"date": datetime.date.today().isoformat(), "rows": rows,
              "convention": "FLOPs/token = 6*N_matmul + 3*causal attention fwd (2*2*L*H*D*T/2); "
                            "flops_per_token_full_attention: attention unmasked (12*L*H*D*T, PaLM); MFU vs 989e12 "
                            f"and vs the best bf16 matmul rate measured in the same run ({MATMUL_CHAIN} chained "
                            f"matmuls per call, median of {MATMUL_REPS} calls, best of {shapes_text}; "
                            f"{MATMUL_SHAPES_CPU[0][0]}x{MATMUL_SHAPES_CPU[0][1]}x{MATMUL_SHAPES_CPU[0][1]} on CPU)"}
    for folder in filter(None, [os.path.join(ROOT, "benchmarks", "results"), args.out]):
        os.makedirs(folder, exist_ok=True)
        with open(os.path.join(folder, "train_throughput.json"), "w") as f:
            json.dump(result, f, indent=1)
    device = next((r.get("device") for r in rows if r.get("device")), "?")
    mm = ", ".join(f"{r['framework']} {r['matmul_flops'] / 1e12:.3g}" for r in rows if "matmul_flops" in r)
    print(f"\n{datetime.date.today()}  {device}  (bf16 matmul TFLOP/s per row: {mm})")
    print("MFU989: causal attention FLOPs, vs 989 TFLOP/s; MFUfull: attention counted unmasked (PaLM), vs 989; "
          "MFUmm: causal, vs the matmul rate")
    print(f"{'shape':<15}{'framework':<10}{'variant':<28}{'tok/s':>9}{'step ms':>9}{'synced':>8}{'peak GiB':>9}"
          f"{'MFU989':>8}{'MFUfull':>8}{'MFUmm':>7}{'ours/pt':>8}")
    for r in rows:
        if "error" in r:
            print(f"{r['shape']:<15}{r['framework']:<10}{r['variant']:<28}  {r['error'][:60]}")
            continue
        ratio = f"{r['ratio']:.2f}" if "ratio" in r else ""
        print(f"{r['shape']:<15}{r['framework']:<10}{r['variant']:<28}{r['tokens_per_s']:>9.0f}"
              f"{r['step_s'] * 1e3:>9.1f}{r.get('step_s_synced', float('nan')) * 1e3:>8.1f}{r['peak_gib']:>9.1f}"
              f"{100 * r['mfu_989']:>7.1f}%{100 * r['mfu_989_full_attention']:>7.1f}%"
              f"{100 * r['mfu_matmul']:>6.1f}%{ratio:>8}")


if __name__ == "__main__":
    main()
