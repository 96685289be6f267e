"""Batch-1 decode's matrix-vector products: how XLA emits them and what each weight layout reads per second.

    python benchmarks/decode_matvec.py [--layers 24 --embed 896 --hidden 4864]   # Qwen2-0.5B's MLP

At batch 1 a decode step is a chain of matrix-vector products over every weight, so its speed is
the rate at which those products read their weights.  This runs the MLPs of `--layers` decoder
layers (distinct weights, bf16, 3 x layers x embed x hidden x 2 bytes: more than the L2 cache) as
one jitted chain, h = silu(x Wg) * (x Wu), x = x + h Wd, for 1 and 8 rows and three layouts:
the model's own ([in, out], contracted over the major axis), transposed ([out, in], PyTorch's
layout, contracted over the minor axis) and gate|up fused into one [in, 2 x hidden] kernel.
Reports the median time of 20 calls, weight bytes / time, and what the compiled HLO holds (cuBLAS
or Triton GEMM fusions, reductions).  Compare GB/s with `generate_speed.py`'s copy rate.
"""

from __future__ import annotations

import argparse
import re
import statistics
import time

import jax
import jax.numpy as jnp


def contract(x, w, axis):
    return jax.lax.dot_general(x, w, (((x.ndim - 1,), (axis,)), ((), ())))


def mlp_chain(x, weights, *, layout, hidden):
    gate, up, down = weights
    for i in range(gate.shape[0]):
        if layout == "fused gate|up":
            gu = contract(x, gate[i], 0)
            g, u = gu[..., :hidden], gu[..., hidden:]
        else:
            axis = 1 if layout == "transposed [out,in]" else 0
            g, u = contract(x, gate[i], axis), contract(x, up[i], axis)
        h = (jax.nn.silu(g) * u).astype(x.dtype)
        x = contract(h, down[i], 1 if layout == "transposed [out,in]" else 0).astype(x.dtype) + x
    return x


def main():
    p = argparse.ArgumentParser()
    p.add_argument("--layers", type=int, default=24)
    p.add_argument("--embed", type=int, default=896)
    p.add_argument("--hidden", type=int, default=4864)
    p.add_argument("--reps", type=int, default=20)
    args = p.parse_args()
    n, e, f = args.layers, args.embed, args.hidden
    keys = jax.random.split(jax.random.key(0), 4)
    gate, up, down = (jax.random.normal(k, s, jnp.bfloat16) * 0.02
                      for k, s in zip(keys[:3], [(n, e, f), (n, e, f), (n, f, e)], strict=True))
    layouts = {
        "model [in,out]": (gate, up, down),
        "transposed [out,in]": (jnp.swapaxes(gate, 1, 2), jnp.swapaxes(up, 1, 2), jnp.swapaxes(down, 1, 2)),
        "fused gate|up": (jnp.concatenate([gate, up], -1), None, down),
    }
    nbytes = 3 * n * e * f * 2
    print(f"{jax.devices()[0].device_kind}, jax {jax.__version__}: {n} MLPs {e}x{f}, {nbytes / 1e6:.0f} MB of weights")
    print(f"{'layout':<22}{'rows':>5}{'ms':>9}{'GB/s':>8}  compiled")
    for layout, weights in layouts.items():
        for rows in (1, 8):
            x = jax.random.normal(keys[3], (rows, 1, e), jnp.bfloat16)
            fn = jax.jit(lambda x, w, layout=layout: mlp_chain(x, w, layout=layout, hidden=f))
            text = fn.lower(x, weights).compile().as_text()
            kinds = {name: len(re.findall(pattern, text)) for name, pattern in
                     (("custom fusions (GEMM)", r"kind=kCustom"), ("reductions", r"\breduce\("))}
            jax.block_until_ready(fn(x, weights))
            times = []
            for _ in range(args.reps):
                t0 = time.perf_counter()
                jax.block_until_ready(fn(x, weights))
                times.append(time.perf_counter() - t0)
            t = statistics.median(times)
            print(f"{layout:<22}{rows:>5}{t * 1e3:>9.3f}{nbytes / t / 1e9:>8.0f}  {kinds}", flush=True)


if __name__ == "__main__":
    main()
