"""Attention implementations side by side on one accelerator: forward+backward speed and accuracy.

Run on a GPU (or TPU):  python benchmarks/attention_kernels.py [--seqs 4096,16384] [--packed] [--impls ...]

Variants: `causal` (one document per row) and, with `--packed`, packed rows: `packed4` (4 equal
documents) and `sft` (documents of 256, 512, 768 or 1024 tokens, as in chat fine-tuning, then
padding id 0).  For each implementation (`xla`, `cudnn`, `blockwise`, tokamax `mosaic_gpu` /
`triton`; on packed rows also `cudnn_packed` = the packed kernel without the over-the-bound check,
`cudnn_tight` = the same with the bound set to the row's document count rounded up to 8 instead of
`default_max_segments`, `cudnn_mask` = the dense-mask path, and `cudnn_docs` = the causal kernel on
the same documents laid out as one batch of equal-length rows per length, no packing: what the
documents cost unpacked) and sequence length: median time of a jitted forward+backward (bf16
inputs), achieved TFLOP/s, and the relative error ||x - ref|| / ||ref|| of the output and of
dQ/dK/dV against float32 attention with the same segment ids (`reference` / `blockwise`).
FLOPs count only the computed triangles: forward = 2 matmuls x 2 FLOPs x B*H*D * sum over
documents of len^2 / 2 (T^2 / 2 for causal); backward = 2.5x forward (FlashAttention-2
accounting); total = 3.5x forward.  For packed rows `vs causal` is the TFLOP/s over that of the
causal kernel at the same row length, `vs docs` over that of `cudnn_docs` (the same documents).
The bf16 matmul rate measured in the same run is printed as the ceiling.  Writes JSON to
benchmarks/results/attention_kernels.json (and to --out).
"""

from __future__ import annotations

import argparse
import datetime
import functools
import json
import os
import statistics
import sys
import time

sys.path.insert(0, os.path.join(os.path.dirname(__file__), ".."))

import jax  # noqa: E402
import jax.numpy as jnp  # noqa: E402
import numpy as np  # noqa: E402

from qwen_jax.attention.blockwise import blockwise_attention  # noqa: E402
from qwen_jax.attention.kernels import (  # noqa: E402
    cudnn_attention,
    cudnn_packed_attention,
    cudnn_packed_supported,
    default_max_segments,
    packed_segments,
    tokamax_attention,
)
from qwen_jax.attention.reference import xla_attention  # noqa: E402


def timed(fn, *args, repeats=10):
    out = fn(*args)
    jax.block_until_ready(out)
    times = []
    for _ in range(repeats):
        t0 = time.perf_counter()
        jax.block_until_ready(fn(*args))
        times.append(time.perf_counter() - t0)
    return statistics.median(times), out


def matmul_tflops(n=8192):
    a = jax.random.normal(jax.random.key(0), (n, n), jnp.bfloat16)
    b = jax.random.normal(jax.random.key(1), (n, n), jnp.bfloat16)
    f = jax.jit(lambda a, b: a @ b)
    t, _ = timed(f, a, b, repeats=20)
    return 2 * n**3 / t / 1e12


MAX_SEQ = {"xla": 8192, "cudnn_mask": 16384}  # longer rows: [T, T] arrays too large / too slow to be worth it


def implementations(packed: bool):
    """name -> attn(q, k, v, seg); the packed-only ones are listed for packed rows alone."""
    impls = {
        "xla": lambda q, k, v, seg: xla_attention(q, k, v, segment_ids=seg),
        "blockwise": lambda q, k, v, seg: blockwise_attention(q, k, v, segment_ids=seg, block_size=512),
    }
    if jax.default_backend() == "gpu":
        impls["cudnn"] = lambda q, k, v, seg: cudnn_attention(q, k, v, segment_ids=seg)
        if packed:
            impls["cudnn_packed"] = packed_without_check
            impls["cudnn_tight"] = functools.partial(packed_without_check, tight=True)
            impls["cudnn_mask"] = lambda q, k, v, seg: cudnn_attention(q, k, v, segment_ids=seg, max_segments=0)
    for name in ("mosaic_gpu", "triton", "mosaic_tpu"):
        impls[f"tokamax_{name}"] = (lambda n: lambda q, k, v, seg: tokamax_attention(
            q, k, v, segment_ids=seg, implementation=(n,)))(name)
    return impls


def packed_without_check(q, k, v, seg, tight=False):
    """The packed cuDNN kernel alone (no run-time check of the bound, no fallback branch).

    `tight`: the bound is the row's run count rounded up to 8 (read from the concrete ids
    before tracing), to see how much of the kernel's time the default bound's empty slots cost."""
    bound = default_max_segments(q.shape[1])
    if tight:
        bound = -(-max(len(n) for n in run_lengths(np.asarray(seg))) // 8) * 8
    seqlens, offsets, _ = packed_segments(seg, bound)
    return cudnn_packed_attention(q, k, v, seqlens, offsets, scale=q.shape[-1] ** -0.5)


def time_documents_as_batches(q, k, v, dout, seg_np):
    """(fwd ms, fwd+bwd ms) of the causal kernel on a packed row's documents (padding dropped),
    laid out as one [count, length] batch per document length: the same attention FLOPs without
    packing, the peer a packed row must match.  The batches are gathered before timing."""
    groups = {}
    for row, lengths in enumerate(run_lengths(seg_np)):
        starts = np.concatenate([[0], np.cumsum(lengths)[:-1]])
        for s, n in zip(starts, lengths, strict=True):
            if seg_np[row, s] != 0:
                groups.setdefault(int(n), []).append(row * seg_np.shape[1] + s + np.arange(n))
    flat = [x.reshape(-1, *x.shape[2:]) for x in (q, k, v, dout)]
    batches = [tuple(x[np.stack(idx)] for x in flat) for idx in groups.values()]

    def fwd(batches):
        return [cudnn_attention(q_, k_, v_) for q_, k_, v_, _ in batches]

    def fwd_bwd(batches):
        outs = []
        for q_, k_, v_, d_ in batches:
            out, vjp = jax.vjp(lambda a, b, c: cudnn_attention(a, b, c), q_, k_, v_)
            outs.append((out, vjp(d_)))
        return outs

    t_fwd, _ = timed(jax.jit(fwd), batches)
    t_all, _ = timed(jax.jit(fwd_bwd), batches)
    return t_fwd * 1e3, t_all * 1e3


def segment_rows(variant: str, b: int, t: int, seed: int):
    """[b, t] int32 segment ids of a packed variant (ids 1, 2, ... per document, 0 = padding)."""
    rng = np.random.default_rng(seed)
    rows = []
    for _ in range(b):
        if variant == "packed4":
            lengths = [t // 4] * 4
        else:  # sft: chat-sized documents, first-fit leaves a little padding at the end
            lengths = []
            while sum(lengths) + 1024 <= t:
                lengths.append(256 * int(rng.integers(1, 5)))
            lengths = lengths or [t // 2]
        ids = np.concatenate([np.full(n, i + 1, np.int32) for i, n in enumerate(lengths)])
        rows.append(np.concatenate([ids, np.zeros(t - len(ids), np.int32)]))
    return np.stack(rows)


def run_lengths(seg: np.ndarray) -> list[np.ndarray]:
    out = []
    for row in seg:
        edges = np.flatnonzero(np.diff(row)) + 1
        out.append(np.diff(np.concatenate([[0], edges, [len(row)]])))
    return out


def _apply(impl, seg, q, k, v):
    return impl(q, k, v, seg)


def rel(a, b):
    a, b = np.asarray(a, np.float64), np.asarray(b, np.float64)
    return float(np.linalg.norm(a - b) / np.linalg.norm(b))


def check_packed(t=2048, heads=16, kv_heads=2, head_dim=128):
    """Packed cuDNN vs float32 reference on two different packed rows (batch 2), in and over the bound.

    Returns {case: {out/dq/dk/dv: (relative error, max abs error)}}; `over_bound` uses a bound of 2
    runs, so the run-time check sends it to the blockwise fallback.
    """
    seg = jnp.asarray(np.concatenate([segment_rows("sft", 1, t, seed=1), segment_rows("packed4", 1, t, seed=2)]))
    seg = seg.at[1, -t // 16:].set(0)  # row 1: four documents, the last cut short by padding
    keys = jax.random.split(jax.random.key(7), 4)
    q = jax.random.normal(keys[0], (2, t, heads, head_dim), jnp.bfloat16)
    k = jax.random.normal(keys[1], (2, t, kv_heads, head_dim), jnp.bfloat16)
    v = jax.random.normal(keys[2], (2, t, kv_heads, head_dim), jnp.bfloat16)
    dout = jax.random.normal(keys[3], (2, t, heads, head_dim), jnp.bfloat16)

    def out_grads(attn, dtype):
        @jax.jit
        def run(q, k, v, dout):
            out, vjp = jax.vjp(attn, *(x.astype(dtype) for x in (q, k, v)))
            return (out, *vjp(dout.astype(dtype)))
        return run(q, k, v, dout)

    ref = out_grads(lambda q, k, v: xla_attention(q, k, v, segment_ids=seg), jnp.float32)
    report = {}
    for case, bound in (("packed", None), ("over_bound", 2)):
        got = out_grads(lambda q, k, v, bound=bound: cudnn_attention(q, k, v, segment_ids=seg, max_segments=bound),
                        jnp.bfloat16)
        report[case] = {n: (rel(g, r), float(jnp.max(jnp.abs(g.astype(jnp.float32) - r))))
                        for n, g, r in zip(("out", "dq", "dk", "dv"), got, ref, strict=True)}
    return report


def main():
    p = argparse.ArgumentParser()
    p.add_argument("--seqs", default="4096,16384")
    p.add_argument("--heads", type=int, default=16)
    p.add_argument("--kv_heads", type=int, default=2)
    p.add_argument("--head_dim", type=int, default=128)
    p.add_argument("--packed", action="store_true", help="also time packed rows (packed4, sft)")
    p.add_argument("--impls", default="", help="comma-separated implementations to run (default: all)")
    p.add_argument("--check", action="store_true", help="first compare packed cuDNN with the reference (batch 2)")
    p.add_argument("--out", default=os.environ.get("OUT", ""))
    args = p.parse_args()
    from absl import flags

    flags.FLAGS.mark_as_parsed()  # tokamax reads absl flags; ours are argparse
    wanted = set(filter(None, args.impls.split(",")))
    device = jax.devices()[0].device_kind
    ceiling = matmul_tflops()
    print(f"device {device}, jax {jax.__version__}, bf16 matmul {ceiling:.0f} TFLOP/s, "
          f"cuDNN packed layout: {cudnn_packed_supported()}", flush=True)
    check = None
    if args.check:
        check = check_packed(heads=args.heads, kv_heads=args.kv_heads, head_dim=args.head_dim)
        for case, errs in check.items():
            print(f"check {case}: " + "  ".join(f"{n} rel {e[0]:.1e} max {e[1]:.1e}" for n, e in errs.items()),
                  flush=True)
    rows = []
    for t in [int(s) for s in args.seqs.split(",")]:
        b, h, kv, d = 1, args.heads, args.kv_heads, args.head_dim
        keys = jax.random.split(jax.random.key(t), 4)
        q = jax.random.normal(keys[0], (b, t, h, d), jnp.bfloat16)
        k = jax.random.normal(keys[1], (b, t, kv, d), jnp.bfloat16)
        v = jax.random.normal(keys[2], (b, t, kv, d), jnp.bfloat16)
        dout = jax.random.normal(keys[3], (b, t, h, d), jnp.bfloat16)
        variants = [("causal", None)]
        if args.packed:
            variants += [(name, segment_rows(name, b, t, seed=t)) for name in ("packed4", "sft")]
        for variant, seg_np in variants:
            seg = None if seg_np is None else jnp.asarray(seg_np)
            lengths = [np.asarray([t])] * b if seg_np is None else run_lengths(seg_np)
            fwd_flops = 2 * 2 * h * d * sum(float((n.astype(np.float64) ** 2).sum()) for n in lengths) / 2

            def ref_fn(q, k, v, seg=seg):
                # float32 reference; past 4k tokens the blockwise kernel (tested equal to the plain
                # one on CPU) keeps the [T, T] float32 scores out of memory
                q, k, v = (x.astype(jnp.float32) for x in (q, k, v))
                if q.shape[1] <= 4096:
                    return xla_attention(q, k, v, segment_ids=seg)
                return blockwise_attention(q, k, v, segment_ids=seg, block_size=1024)

            def ref_out_grads(q, k, v, dout, ref_fn=ref_fn):
                out, vjp = jax.vjp(ref_fn, q, k, v)
                return out, vjp(dout.astype(jnp.float32))

            ref_out, ref_grads = jax.jit(ref_out_grads)(q, k, v, dout)
            for name, impl in implementations(seg is not None).items():
                if (wanted and name not in wanted) or t > MAX_SEQ.get(name, t):
                    continue
                row = {"impl": name, "seq": t, "variant": variant, "heads": h, "kv_heads": kv, "head_dim": d,
                       "documents": [len(n) for n in lengths], "fwd_flops": fwd_flops}
                try:
                    # cudnn_tight reads the ids on the host
                    attn = functools.partial(_apply, impl, seg_np if name == "cudnn_tight" else seg)

                    def fwd_and_grads(q, k, v, dout, attn=attn):
                        out, vjp = jax.vjp(attn, q, k, v)
                        return out, vjp(dout)

                    fwd_bwd = jax.jit(fwd_and_grads)
                    fwd = jax.jit(attn)
                    t_fwd, out = timed(fwd, q, k, v)
                    t_all, (out2, grads) = timed(fwd_bwd, q, k, v, dout)
                    row.update(fwd_ms=t_fwd * 1e3, fwd_bwd_ms=t_all * 1e3,
                               fwd_tflops=fwd_flops / t_fwd / 1e12, fwd_bwd_tflops=3.5 * fwd_flops / t_all / 1e12,
                               out_rel_err=rel(out, ref_out),
                               **{f"{n}_rel_err": rel(g, r) for n, g, r in zip(("dq", "dk", "dv"), grads, ref_grads,
                                                                               strict=True)})
                except Exception as e:  # report and go on: one unsupported kernel must not hide the rest
                    row["error"] = f"{type(e).__name__}: {str(e).splitlines()[0][:160]}"
                rows.append(row)
                print(json.dumps({k_: v_ for k_, v_ in row.items() if k_ != "documents"}), flush=True)
            if seg is not None and jax.default_backend() == "gpu" and (not wanted or "cudnn_docs" in wanted):
                row = {"impl": "cudnn_docs", "seq": t, "variant": variant, "heads": h, "kv_heads": kv,
                       "head_dim": d, "documents": [len(n) for n in lengths], "fwd_flops": fwd_flops}
                try:
                    fwd_ms, all_ms = time_documents_as_batches(q, k, v, dout, seg_np)
                    row.update(fwd_ms=fwd_ms, fwd_bwd_ms=all_ms, fwd_tflops=fwd_flops / fwd_ms / 1e9,
                               fwd_bwd_tflops=3.5 * fwd_flops / all_ms / 1e9)
                except Exception as e:
                    row["error"] = f"{type(e).__name__}: {str(e).splitlines()[0][:160]}"
                rows.append(row)
                print(json.dumps({k_: v_ for k_, v_ in row.items() if k_ != "documents"}), flush=True)
    causal = {r["seq"]: r["fwd_bwd_tflops"] for r in rows
              if r["impl"] == "cudnn" and r["variant"] == "causal" and "error" not in r}
    unpacked = {(r["seq"], r["variant"]): r["fwd_bwd_tflops"] for r in rows
                if r["impl"] == "cudnn_docs" and "error" not in r}
    for r in rows:
        if r["variant"] != "causal" and "error" not in r and r["seq"] in causal:
            r["vs_causal_cudnn"] = r["fwd_bwd_tflops"] / causal[r["seq"]]
        if (r["seq"], r["variant"]) in unpacked and "error" not in r:
            r["vs_docs_cudnn"] = r["fwd_bwd_tflops"] / unpacked[r["seq"], r["variant"]]
    # cuDNN's log-sum-exp dtype (matters for ring merges)
    lse_note = None
    if jax.default_backend() == "gpu":
        try:
            _, lse = jax.nn.dot_product_attention(q, k, v, is_causal=True, implementation="cudnn",
                                                  return_residual=True)
            lse_note = str(lse.dtype)
        except Exception as e:
            lse_note = f"n/a ({type(e).__name__})"
    result = {"date": datetime.date.today().isoformat(), "device": device, "jax": jax.__version__,
              "bf16_matmul_tflops": ceiling, "cudnn_lse_dtype": lse_note,
              "flops_convention": "fwd = 2*2*B*H*D*sum(doc_len^2)/2 (causal: T^2/2); fwd+bwd = 3.5x fwd",
              "packed_check": check, "rows": rows}
    here = os.path.join(os.path.dirname(__file__), "results")
    os.makedirs(here, exist_ok=True)
    for folder in filter(None, [here, args.out]):
        with open(os.path.join(folder, "attention_kernels.json"), "w") as f:
            json.dump(result, f, indent=1)
    print(f"\n{device}  bf16 matmul {ceiling:.0f} TFLOP/s  cuDNN lse dtype: {lse_note}")
    print(f"{'impl':<18}{'variant':<9}{'seq':>7}{'docs':>5}{'fwd ms':>8}{'f+b ms':>8}{'f+b TF/s':>9}{'vs c':>6}"
          f"{'out err':>9}{'dq err':>9}{'dk err':>9}{'dv err':>9}")
    for r in rows:
        docs = sum(r["documents"])
        if "error" in r:
            print(f"{r['impl']:<18}{r['variant']:<9}{r['seq']:>7}{docs:>5}  {r['error'][:70]}")
            continue
        vs = f"{100 * r['vs_causal_cudnn']:>5.0f}%" if "vs_causal_cudnn" in r else f"{'':>6}"
        vs += f"{100 * r['vs_docs_cudnn']:>7.0f}%" if "vs_docs_cudnn" in r else f"{'':>8}"
        errs = "".join(f"{r[n + '_rel_err']:>9.1e}" for n in ("out", "dq", "dk", "dv")) if "out_rel_err" in r else ""
        print(f"{r['impl']:<18}{r['variant']:<9}{r['seq']:>7}{docs:>5}{r['fwd_ms']:>8.2f}{r['fwd_bwd_ms']:>8.2f}"
              f"{r['fwd_bwd_tflops']:>9.0f}{vs}{errs}")


if __name__ == "__main__":
    main()
