"""MoE grouped matmul on one GPU: `mosaic_gpu` (Pallas Mosaic-GPU kernels, Hopper) vs `xla` (`jax.lax.ragged_dot`).

    python benchmarks/grouped_matmul_check.py                      # small + Qwen3-30B-A3B expert shape, < 120 s
    python benchmarks/grouped_matmul_check.py --shapes small --impls xla --budget 60   # CPU smoke test

For each shape, bf16 inputs x [m, k], w [g, k, n], an output cotangent dy [m, n] and random
imbalanced group sizes (log-normal shares, some groups empty; the small shape also leaves rows
past the last group, as the expert-parallel layout does).  Each implementation runs in its own
subprocess (`qwen_jax.layers.grouped_matmul.grouped_matmul` forward plus both gradients, one
jitted function): compile seconds, XLA's temp-buffer size, the median of --reps fwd+bwd runs
after one warm-up, and the process's device peak (`memory_stats()['peak_bytes_in_use']`,
inputs included).  Errors: relative Frobenius error of out / dx / dw against a float32 numpy
reference on the same bf16-rounded inputs (per-group matmuls), and the largest elementwise
difference from the `xla` result relative to its largest magnitude.  A case that fails
(Mosaic compile error, out of memory, the time budget) prints one `error:` line and the rest
go on; cases share --budget seconds (a case gets what is left, less 10 s for the report).  Shapes:

* small: m=1000, k=200, n=300, g=6 (nothing aligned to the kernels' 128: exercises the padding);
* qwen3-30b-a3b: one expert projection of a 4096x2 token step, m = 4096*2*8 = 65536, k=2048
  (hidden), n=768 (moe_intermediate), g=128.

JSON: benchmarks/results/grouped_matmul_check.json (and --out).
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import sys
import tempfile
import time

import ml_dtypes
import numpy as np

ROOT = os.path.abspath(os.path.join(os.path.dirname(__file__), ".."))
sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
from bench_common import run_result_subprocess  # noqa: E402  (benchmarks/ on sys.path)

SHAPES = {  # m, k, n, groups, empty groups, rows past the last group
    "small": (1000, 200, 300, 6, 1, 24),
    "qwen3-30b-a3b": (65536, 2048, 768, 128, 8, 0),
}
IMPLS = ("mosaic_gpu", "xla")
GIB = 2.0**30
REPORT_RESERVE_S = 10.0  # of --budget, kept for loading the last case's arrays and the error norms


def one_line(error: BaseException) -> str:
    lines = [x.strip() for x in str(error).splitlines() if x.strip()]
    return f"{type(error).__name__}: {' / '.join(lines[:3])}"[:400]


def group_sizes(rng, rows: int, groups: int, empty: int) -> np.ndarray:
    """Log-normal shares of `rows` over `groups`, `empty` of them (the first and last included) empty."""
    share = rng.lognormal(0.0, 1.0, groups)
    if empty:
        zero = [0, groups - 1, *rng.choice(np.arange(1, groups - 1), max(empty - 2, 0), replace=False)][:empty]
        share[zero] = 0.0
    sizes = np.floor(share / share.sum() * rows).astype(np.int64)
    sizes[np.argmax(sizes)] += rows - sizes.sum()
    return sizes.astype(np.int32)


def to_bits(a) -> np.ndarray:
    """bf16 values as their uint16 bits (what np.savez stores without pickling)."""
    return np.asarray(a).astype(ml_dtypes.bfloat16).view(np.uint16)


def from_bits(bits: np.ndarray) -> np.ndarray:
    return bits.view(ml_dtypes.bfloat16).astype(np.float32)


def make_inputs(shape: str, seed: int = 0) -> dict:
    """bf16 inputs (as bits) and group sizes of a shape."""
    m, k, n, g, empty, tail = SHAPES[shape]
    rng = np.random.default_rng(seed)
    return dict(x=to_bits(rng.standard_normal((m, k), np.float32)),
                w=to_bits(rng.standard_normal((g, k, n), np.float32) / np.float32(np.sqrt(k))),
                dy=to_bits(rng.standard_normal((m, n), np.float32)),
                sizes=group_sizes(rng, m - tail, g, empty))


def reference(inputs: dict) -> dict:
    """out, dx, dw in float32 numpy, one matmul per group; rows past the groups are zero."""
    x, w, dy = (from_bits(inputs[name]) for name in ("x", "w", "dy"))
    sizes = inputs["sizes"]
    out = np.zeros((x.shape[0], w.shape[2]), np.float32)
    dx = np.zeros_like(x)
    dw = np.zeros_like(w)
    start = 0
    for g, size in enumerate(sizes):
        rows = slice(start, start + int(size))
        out[rows] = x[rows] @ w[g]
        dx[rows] = dy[rows] @ w[g].T
        dw[g] = x[rows].T @ dy[rows]
        start += int(size)
    return dict(out=out, dx=dx, dw=dw)


def child(spec_path: str) -> None:
    """One implementation on one shape: prints `RESULT <json>`, saves out/dx/dw (bf16 bits) to spec['result']."""
    with open(spec_path) as f:
        spec = json.load(f)
    try:
        import jax
        import jax.numpy as jnp

        from qwen_jax.layers.grouped_matmul import grouped_matmul

        data = np.load(spec["inputs"])
        x, w, dy = (jnp.asarray(data[name].view(ml_dtypes.bfloat16)) for name in ("x", "w", "dy"))
        sizes = jnp.asarray(data["sizes"], jnp.int32)
        impl = spec["impl"]

        @jax.jit
        def fwd_bwd(x, w, sizes, dy):
            out, vjp = jax.vjp(lambda x, w: grouped_matmul(x, w, sizes, implementation=impl), x, w)
            return (out, *vjp(dy))

        t0 = time.perf_counter()
        compiled = fwd_bwd.lower(x, w, sizes, dy).compile()
        compile_s = time.perf_counter() - t0
        analysis = compiled.memory_analysis()
        temp = getattr(analysis, "temp_size_in_bytes", None) if analysis is not None else None
        result = jax.block_until_ready(compiled(x, w, sizes, dy))  # warm-up
        times = []
        start = time.perf_counter()
        while len(times) < spec["reps"] and (time.perf_counter() - start < spec["time_cap"] or len(times) < 1):
            t0 = time.perf_counter()
            jax.block_until_ready(compiled(x, w, sizes, dy))
            times.append(time.perf_counter() - t0)
        stats = jax.devices()[0].memory_stats() or {}
        np.savez(spec["result"], **{name: to_bits(a) for name, a in zip(("out", "dx", "dw"), result, strict=True)})
        print("RESULT " + json.dumps(dict(
            device=jax.devices()[0].device_kind, compile_s=compile_s, ms=1e3 * statistics.median(times),
            reps=len(times), temp_gib=None if temp is None else temp / GIB,
            peak_gib=stats["peak_bytes_in_use"] / GIB if "peak_bytes_in_use" in stats else None)))
    except Exception as e:  # a Mosaic compile error, out of memory: one line, the parent goes on
        error = one_line(e)
        if spec["impl"] == "mosaic_gpu":
            try:
                error = f"{error} [kernels alone: {diagnose_kernels(*np.load(spec['inputs'])['w'].shape)}]"
            except Exception as again:
                error = f"{error} [diagnosis failed: {one_line(again)}]"
        print("RESULT " + json.dumps({"error": error}))


def diagnose_kernels(g: int, k: int, n: int, m: int = 1024) -> str:
    """Which of the three Mosaic kernels compiles, each alone on aligned zeros (to tell which one fails)."""
    import jax
    import jax.numpy as jnp

    from qwen_jax.layers.grouped_matmul import KERNEL_ALIGN, MOSAIC_KERNELS, round_up

    k, n = round_up(k, KERNEL_ALIGN), round_up(n, KERNEL_ALIGN)
    x, dy = jnp.zeros((m, k), jnp.bfloat16), jnp.zeros((m, n), jnp.bfloat16)
    w = jnp.zeros((g, k, n), jnp.bfloat16)
    sizes = jnp.full((g,), m // g, jnp.int32).at[0].add(m - (m // g) * g)
    parts = []
    for name, kernel, args in (("forward", MOSAIC_KERNELS.forward, (x, w)),
                               ("input_grad", MOSAIC_KERNELS.input_grad, (dy, w)),
                               ("weight_grad", MOSAIC_KERNELS.weight_grad, (x, dy))):
        try:
            jax.jit(kernel).lower(*args, sizes).compile()
            parts.append(f"{name} ok")
        except Exception as e:
            parts.append(f"{name} fails: {one_line(e)[:150]}")
    return "; ".join(parts)


def rel_error(got: np.ndarray, ref: np.ndarray) -> float:
    return float(np.linalg.norm(got - ref) / max(np.linalg.norm(ref), 1e-30))


def max_rel_diff(got: np.ndarray, ref: np.ndarray) -> float:
    return float(np.max(np.abs(got - ref)) / max(np.max(np.abs(ref)), 1e-30))


def fmt(value, spec: str) -> str:
    return "-" if value is None else format(value, spec)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--shapes", default=",".join(SHAPES), help=f"comma-separated, of {list(SHAPES)}")
    parser.add_argument("--impls", default=",".join(IMPLS), help="comma-separated grouped_matmul implementations")
    parser.add_argument("--reps", type=int, default=10)
    parser.add_argument("--budget", type=float, default=105.0, help="seconds for all cases together")
    parser.add_argument("--time_cap", type=float, default=8.0, help="seconds of timed runs per case (>= 1 run)")
    parser.add_argument("--out", default=os.path.join(ROOT, "benchmarks", "results", "grouped_matmul_check.json"))
    parser.add_argument("--child", help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.child:
        return child(args.child)
    shapes = args.shapes.split(",")
    impls = args.impls.split(",")
    for name in shapes:
        if name not in SHAPES:
            parser.error(f"--shapes: unknown shape {name!r} (one of {list(SHAPES)})")
    deadline = time.monotonic() + args.budget
    env = {**os.environ, "PYTHONPATH": ROOT + os.pathsep + os.environ.get("PYTHONPATH", "")}
    rows = []
    with tempfile.TemporaryDirectory() as tmp:
        for shape in shapes:
            inputs = make_inputs(shape)
            path = os.path.join(tmp, f"{shape}.npz")
            np.savez(path, **inputs)
            ref = reference(inputs)
            results = {}
            for impl in impls:
                left = deadline - time.monotonic() - REPORT_RESERVE_S
                row = dict(shape=shape, impl=impl, m=SHAPES[shape][0], k=SHAPES[shape][1], n=SHAPES[shape][2],
                           groups=SHAPES[shape][3], empty_groups=int(np.sum(inputs["sizes"] == 0)))
                if left < 5:
                    row["error"] = "skipped: --budget spent"
                else:
                    spec = dict(inputs=path, impl=impl, reps=args.reps, time_cap=args.time_cap,
                                result=os.path.join(tmp, f"{shape}_{impl}.npz"))
                    spec_path = os.path.join(tmp, f"{shape}_{impl}.json")
                    with open(spec_path, "w") as f:
                        json.dump(spec, f)
                    row |= run_result_subprocess([sys.executable, os.path.abspath(__file__), "--child", spec_path],
                                                 env=env, timeout=left, cwd=ROOT)
                    if "error" not in row:
                        results[impl] = {name: from_bits(a) for name, a in np.load(spec["result"]).items()}
                        for name in ("out", "dx", "dw"):
                            row[f"err_{name}"] = rel_error(results[impl][name], ref[name])
                if "error" in row:
                    print(f"error: {impl} on {shape}: {row['error']}", flush=True)
                rows.append(row)
            if "xla" in results:
                for row in rows:
                    if row["shape"] == shape and row["impl"] in results:
                        row["vs_xla"] = max(max_rel_diff(results[row["impl"]][name], results["xla"][name])
                                            for name in ("out", "dx", "dw"))
    if os.path.isdir(args.out):  # a results folder (the device's $OUT), as the other benchmarks take
        args.out = os.path.join(args.out, "grouped_matmul_check.json")
    os.makedirs(os.path.dirname(os.path.abspath(args.out)), exist_ok=True)
    with open(args.out + ".tmp", "w") as f:
        json.dump(rows, f, indent=1)
    os.replace(args.out + ".tmp", args.out)
    device = next((r["device"] for r in rows if "device" in r), "?")
    print(f"\ngrouped matmul fwd+bwd on {device}; errors: relative Frobenius vs float32 numpy; vs_xla: max |diff| / "
          "max |xla| over out, dx, dw")
    print("| shape | impl | compile s | fwd+bwd ms | reps | peak GiB | XLA temp GiB | err out | err dx | err dw "
          "| vs_xla |")
    print("| --- | --- | ---: | ---: | ---: | ---: | ---: | ---: | ---: | ---: | ---: |")
    for r in rows:
        if "error" in r:
            print(f"| {r['shape']} | {r['impl']} | {r['error'][:120]} |")
            continue
        print(f"| {r['shape']} | {r['impl']} | {r['compile_s']:.1f} | {r['ms']:.2f} | {r['reps']} | "
              f"{fmt(r['peak_gib'], '.2f')} | {fmt(r['temp_gib'], '.2f')} | {r['err_out']:.2e} | {r['err_dx']:.2e} | "
              f"{r['err_dw']:.2e} | {fmt(r.get('vs_xla'), '.2e')} |")


if __name__ == "__main__":
    main()
