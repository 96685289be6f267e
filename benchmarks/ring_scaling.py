"""Ring attention on two GPUs against one GPU holding half the sequence (long context).

    python benchmarks/ring_scaling.py --check                  # cuDNN ring core vs references
    python benchmarks/ring_scaling.py --seqs 65536,131072      # attention + train-step scaling
    python benchmarks/ring_scaling.py --meshes "seq=8;seq=4,fsdp=2" --seqs 131072,262144,524288,1048576
                                                               # 8 GPUs vs the 2-GPU ring, same tokens/GPU

Every measurement runs in its own subprocess (clean memory pool and peak counter):

* `check`: the cuDNN block pair (`kernels.cudnn_block_fwd/bwd`, JAX's internal cuDNN API with
  float32 LSE) against its XLA twin (`reference.dense_block_*`), and ring attention over two GPUs
  (cuDNN core and blockwise core) against float32 full attention: forward and gradients.
* `attn`: attention alone, forward + backward, 16 query / 2 KV heads, head_dim 128, bf16:
  the ring over 2 GPUs at L tokens vs cuDNN on 1 GPU at L/2 and at L.
* `train`: a Qwen2-0.5B-shaped training step (AdamW, chunked loss, remat/scan from --variant):
  `attention="ring"` on a mesh {seq: 2} at L tokens vs `attention="cudnn"` on 1 GPU at L/2.

Scaling efficiency.  With causal attention a device of the 2-GPU ring holding L/2 tokens does
more attention work than one GPU with a sequence of L/2 (its queries see up to L keys), so the
raw step-time ratio T1(L/2) / T2(L) understates the ring.  We report both:

    efficiency = [F(L) / (2 * T2(L))] / [F(L/2) / T1(L/2)]      (model FLOP/s per GPU, ring / single)
    time ratio = T1(L/2) / T2(L)

`--meshes`: train rows on larger meshes (`seq=8`, `seq=4,fsdp=2`, ...).  A mesh row at length L
holds data x fsdp sequences of L tokens (one per data/fsdp rank), so each GPU holds L / seq tokens;
its reference is the 2-GPU ring ({seq: 2}, one sequence) at L' = 2 L / seq, the same tokens per GPU:

    efficiency = [F_mesh / (n_mesh * T_mesh)] / [F(L') / (2 * T2(L'))]   (model FLOP/s per GPU)

with F_mesh = (data x fsdp) * F(L).  Both sides are causal, and a longer ring does more attention
work per token, which FLOP/s per GPU accounts for.

with F(L) = model FLOPs of one sequence of L tokens (`metrics.flops_per_token(cfg, L) * L`, the
causal convention of `train_throughput.py`; attention for `attn` rows: 3.5 * 2*2*H*D*L^2/2).
Results: table on stdout, JSON in benchmarks/results/ring_scaling.json (and $OUT).
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
from bench_common import run_result_subprocess, timed  # noqa: E402  (benchmarks/ on sys.path)

HEADS, KV_HEADS, HEAD_DIM = 16, 2, 128


def _peak_gib():
    import jax

    return max((d.memory_stats() or {}).get("peak_bytes_in_use", 0) for d in jax.local_devices()) / 2**30


def _rel(a, b):
    import jax.numpy as jnp

    a, b = jnp.asarray(a, jnp.float32), jnp.asarray(b, jnp.float32)
    return float(jnp.linalg.norm(a - b) / jnp.maximum(jnp.linalg.norm(b), 1e-30))


# ------------------------------------------------------------------ workers
def worker_check(seq):
    import jax
    import jax.numpy as jnp

    from qwen_jax.attention.blockwise import blockwise_attention
    from qwen_jax.attention.kernels import cudnn_block_bwd, cudnn_block_fwd, cudnn_block_supported
    from qwen_jax.attention.reference import dense_block_bwd, dense_block_fwd
    from qwen_jax.attention.ring import from_zigzag, ring_attention, to_zigzag
    from qwen_jax.sharding import make_mesh

    rows = {"cudnn_block_supported": cudnn_block_supported(jnp.bfloat16)}
    keys = jax.random.split(jax.random.key(0), 4)
    scale = HEAD_DIM**-0.5
    # block pair: causal square and unmasked rectangular blocks, bf16 inputs
    for name, tq, tk, causal in (("diag", 1024, 1024, True), ("kv_half", 1024, 512, False),
                                 ("q_half", 512, 1024, False)):
        q = jax.random.normal(keys[0], (2, tq, HEADS, HEAD_DIM), jnp.bfloat16)
        k = jax.random.normal(keys[1], (2, tk, KV_HEADS, HEAD_DIM), jnp.bfloat16)
        v = jax.random.normal(keys[2], (2, tk, KV_HEADS, HEAD_DIM), jnp.bfloat16)
        do = jax.random.normal(keys[3], (2, tq, HEADS, HEAD_DIM), jnp.bfloat16)
        o_ref, l_ref = jax.jit(lambda q, k, v, c=causal: dense_block_fwd(q, k, v, causal=c, scale=scale))(q, k, v)
        o, lse = jax.jit(lambda q, k, v, c=causal: cudnn_block_fwd(q, k, v, causal=c, scale=scale))(q, k, v)
        # the backward fed the *reference* statistics, as the ring feeds the merged ones
        g_ref = jax.jit(lambda *a, c=causal: dense_block_bwd(*a, causal=c, scale=scale))(
            q, k, v, o_ref.astype(jnp.bfloat16), l_ref, do)
        g = jax.jit(lambda *a, c=causal: cudnn_block_bwd(*a, causal=c, scale=scale))(
            q, k, v, o_ref.astype(jnp.bfloat16), l_ref, do)
        rows[f"block_{name}"] = {"lse_dtype": str(lse.dtype), "lse_max_abs_err": float(jnp.max(jnp.abs(lse - l_ref))),
                                 "out_rel_err": _rel(o, o_ref),
                                 **{f"d{x}_rel_err": _rel(a, b) for x, a, b in zip("qkv", g, g_ref, strict=True)}}
    if len(jax.devices()) < 2:
        return rows
    # ring over 2 GPUs vs float32 attention
    n = 2
    mesh = make_mesh({"seq": n}, devices=jax.devices()[:n])
    shape_q, shape_kv = (1, seq, HEADS, HEAD_DIM), (1, seq, KV_HEADS, HEAD_DIM)
    q = jax.random.normal(keys[0], shape_q, jnp.bfloat16)
    k = jax.random.normal(keys[1], shape_kv, jnp.bfloat16)
    v = jax.random.normal(keys[2], shape_kv, jnp.bfloat16)
    do = jax.random.normal(keys[3], shape_q, jnp.bfloat16)

    def out_grads(fn):
        out, vjp = jax.vjp(fn, q, k, v)
        return out, vjp(do)

    ref = jax.jit(lambda: out_grads(lambda q, k, v: blockwise_attention(
        *(x.astype(jnp.float32) for x in (q, k, v)), block_size=1024)))()
    def z(x):
        return to_zigzag(x, n)

    for core in ("cudnn", "blockwise"):
        got = jax.jit(lambda c=core: out_grads(lambda q, k, v: from_zigzag(
            ring_attention(z(q), z(k), z(v), mesh=mesh, core=c, block_size=1024), n)))()
        rows[f"ring2_{core}_seq{seq}"] = {"out_rel_err": _rel(got[0], ref[0]),
                                          **{f"d{x}_rel_err": _rel(a, b)
                                             for x, a, b in zip("qkv", got[1], ref[1], strict=True)}}
    # cuDNN on one GPU for scale: the error every bf16 kernel has
    one = jax.jit(lambda: out_grads(lambda q, k, v: jax.nn.dot_product_attention(
        q, k, v, is_causal=True, implementation="cudnn")))()
    rows[f"cudnn1_seq{seq}"] = {"out_rel_err": _rel(one[0], ref[0]),
                                **{f"d{x}_rel_err": _rel(a, b) for x, a, b in zip("qkv", one[1], ref[1], strict=True)}}
    return rows


def worker_attn(impl, seq, ngpu):
    import jax
    import jax.numpy as jnp

    from qwen_jax.attention.ring import ring_attention
    from qwen_jax.sharding import batch_sharding, make_mesh

    keys = jax.random.split(jax.random.key(0), 4)
    q = jax.random.normal(keys[0], (1, seq, HEADS, HEAD_DIM), jnp.bfloat16)
    k = jax.random.normal(keys[1], (1, seq, KV_HEADS, HEAD_DIM), jnp.bfloat16)
    v = jax.random.normal(keys[2], (1, seq, KV_HEADS, HEAD_DIM), jnp.bfloat16)
    do = jax.random.normal(keys[3], (1, seq, HEADS, HEAD_DIM), jnp.bfloat16)
    if impl == "cudnn":
        attn = lambda q, k, v: jax.nn.dot_product_attention(q, k, v, is_causal=True, implementation="cudnn")  # noqa: E731
    else:  # ring_cudnn / ring_blockwise; inputs taken as already zig-zag ordered (random data)
        mesh = make_mesh({"seq": ngpu}, devices=jax.devices()[:ngpu])
        s = batch_sharding(mesh, 4, q.shape)
        q, k, v, do = (jax.device_put(x, s) for x in (q, k, v, do))
        core = impl.split("_", 1)[1]
        attn = lambda q, k, v: ring_attention(q, k, v, mesh=mesh, core=core, block_size=1024)  # noqa: E731

    def fwd_bwd(q, k, v, do):
        out, vjp = jax.vjp(attn, q, k, v)
        return vjp(do)

    step_s = timed(jax.jit(fwd_bwd), q, k, v, do)
    return {"step_s": step_s, "peak_gib": _peak_gib(), "flops": 3.5 * 2 * 2 * HEADS * HEAD_DIM * seq * seq / 2,
            "device": jax.devices()[0].device_kind}


def parse_mesh(text: str) -> dict:
    """`seq=4,fsdp=2` -> {"seq": 4, "fsdp": 2} (axes of `qwen_jax.sharding.MESH_AXES`, sizes >= 1)."""
    from qwen_jax.sharding import MESH_AXES

    shape = {}
    for item in filter(None, (x.strip() for x in text.split(","))):
        name, sep, size = (x.strip() for x in item.partition("="))
        if not sep or name not in MESH_AXES or not size.isdigit() or int(size) < 1:
            raise ValueError(f"mesh {text!r}: expected axis=size items with axes {MESH_AXES}, got {item!r}")
        if name in shape:
            raise ValueError(f"mesh {text!r}: axis {name!r} given twice")
        shape[name] = int(size)
    if not shape:
        raise ValueError(f"mesh {text!r} is empty")
    return shape


def mesh_devices(shape: dict) -> int:
    return math.prod(shape.values())


def worker_train(seq, ngpu, variant, steps, preset="qwen2-0.5b", single="cudnn", mesh=""):
    import jax
    from train_throughput import build_jax_step, run_steps  # benchmarks/ is on sys.path

    from qwen_jax.metrics import flops_per_token

    shape = parse_mesh(mesh) if mesh else {"seq": ngpu}
    batch = shape.get("data", 1) * shape.get("fsdp", 1)
    attention = "ring" if shape.get("seq", 1) > 1 else single
    step, state, batches, cfg = build_jax_step(preset, seq, batch, f"{attention}/{variant}", n_batches=2,
                                               mesh_shape=shape)
    t0 = time.perf_counter()
    state, m, _ = run_steps(step, state, batches, 1)
    compile_s = time.perf_counter() - t0
    state, m, _ = run_steps(step, state, batches, 1)
    state, m, times = run_steps(step, state, batches, steps)
    return {"step_s": statistics.median(times), "compile_s": compile_s, "loss": float(m["loss"]),
            "peak_gib": _peak_gib(), "flops": flops_per_token(cfg, seq) * seq * batch, "batch": batch,
            "mesh": shape, "device": jax.devices()[0].device_kind, "jax": jax.__version__}


# ------------------------------------------------------------------ driver
def run_worker(args_list, ngpu, timeout):
    cmd = [sys.executable, __file__, "--worker", *args_list]
    env = dict(os.environ, XLA_PYTHON_CLIENT_MEM_FRACTION="0.92")
    env.setdefault("XLA_FLAGS", "--xla_gpu_enable_latency_hiding_scheduler=true")
    if ngpu == 1:
        env["CUDA_VISIBLE_DEVICES"] = env.get("CUDA_VISIBLE_DEVICES", "0").split(",")[0]
    return run_result_subprocess(cmd, env, timeout, ROOT)


def _efficiency(big, small, n_big=2, n_small=1):
    """(model FLOP/s per GPU of `big` over that of `small`, step time ratio small / big); None if either failed."""
    if "error" in big or "error" in small:
        return None, None
    per_gpu_big = big["flops"] / (n_big * big["step_s"])
    per_gpu_small = small["flops"] / (n_small * small["step_s"])
    return per_gpu_big / per_gpu_small, small["step_s"] / big["step_s"]


def parse_mesh_rows(meshes: str, seqs: str):
    """(`[(text, shape)]`, `[seq]`) of --meshes / --seqs, checked before any (expensive) row runs: ValueError otherwise.

    Each length must split into the 2 * seq zig-zag chunks of every mesh's ring.
    """
    shapes = [(text, parse_mesh(text)) for text in filter(None, (x.strip() for x in meshes.split(";")))]
    try:
        lengths = [int(x) for x in seqs.split(",") if x.strip()]
    except ValueError:
        raise ValueError(f"--seqs {seqs!r}: expected comma-separated integers") from None
    if not shapes or not lengths:
        raise ValueError(f"--meshes {meshes!r} / --seqs {seqs!r}: need at least one mesh and one length")
    for seq in lengths:
        for text, shape in shapes:
            if seq < 1 or seq % (2 * shape.get("seq", 1)):
                raise ValueError(f"--seqs {seq}: not a positive multiple of 2 x the seq axis "
                                 f"({2 * shape.get('seq', 1)}) of mesh {text!r}")
    return shapes, lengths


def mesh_rows(args, shapes, seqs, result):
    """Train rows on each mesh at each length, each against the 2-GPU ring at the same tokens per GPU."""
    common = ["--variant", args.variant, "--steps", str(args.steps), "--preset", args.preset, "--single", args.single]
    refs = {}
    for seq in seqs:
        for text, shape in shapes:
            n, ring = mesh_devices(shape), shape.get("seq", 1)
            ref_seq = 2 * seq // ring
            if ref_seq not in refs:
                refs[ref_seq] = run_worker(["train", "--seq", str(ref_seq), "--mesh", "seq=2", *common], 2,
                                           args.timeout)
                result["train"].append({"impl": "ring, seq=2", "seq": ref_seq, "ngpu": 2, **refs[ref_seq]})
                print(json.dumps(result["train"][-1]), flush=True)
            row = run_worker(["train", "--seq", str(seq), "--mesh", text, *common], n, args.timeout)
            eff, ratio = _efficiency(row, refs[ref_seq], n_big=n, n_small=2)
            result["train"].append({"impl": f"ring, {text}", "seq": seq, "ngpu": n, **row, "efficiency": eff,
                                    "time_ratio": ratio, "reference_seq": ref_seq})
            print(json.dumps(result["train"][-1]), flush=True)


def main():
    p = argparse.ArgumentParser()
    p.add_argument("--check", action="store_true", help="correctness of the cuDNN ring core, then stop")
    p.add_argument("--check_seq", type=int, default=8192)
    p.add_argument("--seqs", default="65536,131072")
    p.add_argument("--attn_seqs", default="", help="attention-only rows (default: --seqs)")
    p.add_argument("--cores", default="cudnn,blockwise", help="ring cores for the attention-only rows")
    p.add_argument("--variant", default="full/scan/4096", help="train step: remat/scan|noscan/loss chunk")
    p.add_argument("--skip_train", action="store_true")
    p.add_argument("--skip_attn", action="store_true")
    p.add_argument("--preset", default="qwen2-0.5b", help="model preset of the train rows (tiny: CPU smoke test)")
    p.add_argument("--single", default="cudnn", help="attention of the 1-GPU train rows (xla for a CPU smoke test)")
    p.add_argument("--steps", type=int, default=3)
    p.add_argument("--timeout", type=int, default=500)
    p.add_argument("--worker")
    p.add_argument("--impl", default="")
    p.add_argument("--seq", type=int, default=0)
    p.add_argument("--ngpu", type=int, default=1)
    p.add_argument("--meshes", default="", help="';'-separated meshes for train rows, e.g. 'seq=8;seq=4,fsdp=2' "
                                                "(each against the 2-GPU ring at the same tokens per GPU)")
    p.add_argument("--mesh", default="", help="worker: the train row's mesh")
    p.add_argument("--out", default=os.environ.get("OUT", ""))
    args = p.parse_args()
    if args.worker:
        if args.worker == "check":
            res = worker_check(args.seq)
        elif args.worker == "attn":
            res = worker_attn(args.impl, args.seq, args.ngpu)
        else:
            res = worker_train(args.seq, args.ngpu, args.variant, args.steps, args.preset, args.single, args.mesh)
        print("RESULT " + json.dumps(res), flush=True)
        return

    result = {"date": datetime.date.today().isoformat(), "attention": [], "train": []}
    if args.meshes:
        try:
            shapes, seqs = parse_mesh_rows(args.meshes, args.seqs)
        except ValueError as e:
            p.error(str(e))
        mesh_rows(args, shapes, seqs, result)
    elif args.check:
        res = run_worker(["check", "--seq", str(args.check_seq)], 2, args.timeout)  # ring rows need 2 GPUs
        result["check"] = res
        print(json.dumps(res, indent=1), flush=True)
    else:
        for seq in [] if args.skip_attn else [int(s) for s in (args.attn_seqs or args.seqs).split(",") if s]:
            one_half = run_worker(["attn", "--impl", "cudnn", "--seq", str(seq // 2)], 1, args.timeout)
            one_full = run_worker(["attn", "--impl", "cudnn", "--seq", str(seq)], 1, args.timeout)
            for r, impl, s in ((one_half, "cudnn 1 GPU", seq // 2), (one_full, "cudnn 1 GPU", seq)):
                result["attention"].append({"impl": impl, "seq": s, "ngpu": 1, **r})
                print(json.dumps(result["attention"][-1]), flush=True)
            for core in args.cores.split(","):
                two = run_worker(["attn", "--impl", f"ring_{core}", "--seq", str(seq), "--ngpu", "2"], 2,
                                 args.timeout)
                eff, ratio = _efficiency(two, one_half)
                result["attention"].append({"impl": f"ring ({core}) 2 GPUs", "seq": seq, "ngpu": 2, **two,
                                            "efficiency": eff, "time_ratio": ratio})
                print(json.dumps(result["attention"][-1]), flush=True)
        if not args.skip_train:
            for seq in [int(s) for s in args.seqs.split(",") if s]:
                common = ["--variant", args.variant, "--steps", str(args.steps), "--preset", args.preset,
                          "--single", args.single]
                one = run_worker(["train", "--seq", str(seq // 2), "--ngpu", "1", *common], 1, args.timeout)
                result["train"].append({"impl": "cudnn 1 GPU", "seq": seq // 2, "ngpu": 1, **one})
                print(json.dumps(result["train"][-1]), flush=True)
                two = run_worker(["train", "--seq", str(seq), "--ngpu", "2", *common], 2, args.timeout)
                eff, ratio = _efficiency(two, one)
                result["train"].append({"impl": "ring 2 GPUs", "seq": seq, "ngpu": 2, **two, "efficiency": eff,
                                        "time_ratio": ratio})
                print(json.dumps(result["train"][-1]), flush=True)
    result["variant"] = args.variant
    name = "ring_scaling_check.json" if args.check else ("ring_scaling_meshes.json" if args.meshes else
                                                         "ring_scaling.json")
    for folder in filter(None, [os.path.join(ROOT, "benchmarks", "results"), args.out]):
        os.makedirs(folder, exist_ok=True)
        with open(os.path.join(folder, name), "w") as f:
            json.dump(result, f, indent=1)
    if args.check:
        return
    device = next((r.get("device") for r in result["attention"] + result["train"] if r.get("device")), "?")
    print(f"\n{datetime.date.today()}  {device}  (train variant {args.variant})")
    ratio_name = "Tref/T" if args.meshes else "T1/T2"  # mesh rows: the 2-GPU reference's step time over the row's
    print(f"{'what':<11}{'impl':<24}{'seq':>8}{'step ms':>10}{'tok/s':>9}{'peak GiB':>9}{'TFLOP/s/GPU':>12}"
          f"{'eff':>7}{ratio_name:>7}")
    for what in ("attention", "train"):
        for r in result[what]:
            if "error" in r:
                print(f"{what:<11}{r['impl']:<24}{r['seq']:>8}  {r['error'][:70]}")
                continue
            tf = r["flops"] / r["step_s"] / r["ngpu"] / 1e12
            eff = f"{100 * r['efficiency']:.0f}%" if r.get("efficiency") else ""
            ratio = f"{r['time_ratio']:.2f}" if r.get("time_ratio") else ""
            tokens = r["seq"] * r.get("batch", 1) / r["step_s"]
            print(f"{what:<11}{r['impl']:<24}{r['seq']:>8}{r['step_s'] * 1e3:>10.1f}{tokens:>9.0f}{r['peak_gib']:>9.1f}"
                  f"{tf:>12.3g}{eff:>7}{ratio:>7}")


if __name__ == "__main__":
    main()
