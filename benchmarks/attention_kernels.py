"""Attention implementations side by side on one accelerator: causal forward+backward speed and accuracy.

Run on a GPU (or TPU):  python benchmarks/attention_kernels.py [--seqs 4096,16384] [--out DIR]

For each implementation (`xla`, `cudnn`, `blockwise`, tokamax `mosaic_gpu` / `triton`) and
sequence length: median time of a jitted forward+backward (bf16 inputs, float32 reference on
upcast inputs for the error), achieved TFLOP/s, and the relative error
||out - ref|| / ||ref|| of the output and of dQ.  FLOPs convention: causal forward =
2 matmuls x 2 FLOPs x B*H*T*T*D / 2 (half the score matrix); backward = 2.5x forward
(FlashAttention-2 accounting: 5 matmuls instead of 2); total = 3.5x forward.  The bf16
matmul rate measured in the same run is printed as the ceiling.  Writes JSON to
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
from qwen_jax.attention.kernels import cudnn_attention, tokamax_attention  # noqa: E402
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


def implementations():
    impls = {
        "xla": lambda q, k, v, seg: xla_attention(q, k, v, segment_ids=seg),
        "blockwise": lambda q, k, v, seg: blockwise_attention(q, k, v, segment_ids=seg, block_size=512),
    }
    if jax.default_backend() == "gpu":
        impls["cudnn"] = lambda q, k, v, seg: cudnn_attention(q, k, v, segment_ids=seg)
    for name in ("mosaic_gpu", "triton", "mosaic_tpu"):
        impls[f"tokamax_{name}"] = (lambda n: lambda q, k, v, seg: tokamax_attention(
            q, k, v, segment_ids=seg, implementation=(n,)))(name)
    return impls


def _apply(impl, seg, q, k, v):
    return impl(q, k, v, seg)


def rel(a, b):
    a, b = np.asarray(a, np.float64), np.asarray(b, np.float64)
    return float(np.linalg.norm(a - b) / np.linalg.norm(b))


def main():
    p = argparse.ArgumentParser()
    p.add_argument("--seqs", default="4096,16384")
    p.add_argument("--heads", type=int, default=16)
    p.add_argument("--kv_heads", type=int, default=2)
    p.add_argument("--head_dim", type=int, default=128)
    p.add_argument("--packed", action="store_true", help="also time packed batches (4 documents per row)")
    p.add_argument("--out", default=os.environ.get("OUT", ""))
    args = p.parse_args()
    from absl import flags

    flags.FLAGS.mark_as_parsed()  # tokamax reads absl flags; ours are argparse
    device = jax.devices()[0].device_kind
    ceiling = matmul_tflops()
    print(f"device {device}, jax {jax.__version__}, bf16 matmul {ceiling:.0f} TFLOP/s", flush=True)
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
            variants.append(("packed4", jnp.repeat(jnp.arange(1, 5, dtype=jnp.int32), t // 4)[None]))
        fwd_flops = 2 * 2 * b * h * t * t * d / 2
        for variant, seg in variants:
            def ref_fn(q, k, v, seg=seg):
                # float32 reference; past 4k tokens the blockwise kernel (tested equal to the plain
                # one on CPU) keeps the [T, T] float32 scores out of memory
                q, k, v = (x.astype(jnp.float32) for x in (q, k, v))
                if q.shape[1] <= 4096:
                    return xla_attention(q, k, v, segment_ids=seg)
                return blockwise_attention(q, k, v, segment_ids=seg, block_size=1024)

            def ref_out_dq(q, k, v, dout, ref_fn=ref_fn):
                out, vjp = jax.vjp(ref_fn, q, k, v)
                return out, vjp(dout.astype(jnp.float32))[0]

            ref_out, ref_dq = jax.jit(ref_out_dq)(q, k, v, dout)
            for name, impl in implementations().items():
                if name == "xla" and t > 8192:
                    continue
                row = {"impl": name, "seq": t, "variant": variant, "heads": h, "kv_heads": kv, "head_dim": d}
                try:
                    attn = functools.partial(_apply, impl, seg)

                    def fwd_and_grads(q, k, v, dout, attn=attn):
                        out, vjp = jax.vjp(attn, q, k, v)
                        return out, vjp(dout)

                    fwd_bwd = jax.jit(fwd_and_grads)
                    fwd = jax.jit(attn)
                    t_fwd, out = timed(fwd, q, k, v)
                    t_all, (out2, grads) = timed(fwd_bwd, q, k, v, dout)
                    row.update(fwd_ms=t_fwd * 1e3, fwd_bwd_ms=t_all * 1e3,
                               fwd_tflops=fwd_flops / t_fwd / 1e12, fwd_bwd_tflops=3.5 * fwd_flops / t_all / 1e12,
                               out_rel_err=rel(out, ref_out), dq_rel_err=rel(grads[0], ref_dq))
                except Exception as e:  # report and go on: one unsupported kernel must not hide the rest
                    row["error"] = f"{type(e).__name__}: {str(e).splitlines()[0][:160]}"
                rows.append(row)
                print(json.dumps(row), flush=True)
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
              "flops_convention": "causal fwd = 2*2*B*H*T^2*D/2; fwd+bwd = 3.5x fwd", "rows": rows}
    here = os.path.join(os.path.dirname(__file__), "results")
    os.makedirs(here, exist_ok=True)
    for folder in filter(None, [here, args.out]):
        with open(os.path.join(folder, "attention_kernels.json"), "w") as f:
            json.dump(result, f, indent=1)
    print(f"\n{device}  bf16 matmul {ceiling:.0f} TFLOP/s  cuDNN lse dtype: {lse_note}")
    print(f"{'impl':<18}{'variant':<9}{'seq':>7}{'fwd ms':>9}{'f+b ms':>9}{'f+b TF/s':>10}{'% mm':>6}"
          f"{'out err':>10}{'dq err':>10}")
    for r in rows:
        if "error" in r:
            print(f"{r['impl']:<18}{r['variant']:<9}{r['seq']:>7}  {r['error'][:70]}")
            continue
        print(f"{r['impl']:<18}{r['variant']:<9}{r['seq']:>7}{r['fwd_ms']:>9.2f}{r['fwd_bwd_ms']:>9.2f}"
              f"{r['fwd_bwd_tflops']:>10.0f}{100 * r['fwd_bwd_tflops'] / ceiling:>6.0f}"
              f"{r['out_rel_err']:>10.1e}{r['dq_rel_err']:>10.1e}")


if __name__ == "__main__":
    main()
