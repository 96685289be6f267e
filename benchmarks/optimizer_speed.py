"""Optimizer update alone: time and memory traffic of the AdamW step on a model's parameter tree.

    python benchmarks/optimizer_speed.py [--preset qwen2-1.5b]

Times, on fp32 parameters/moments shaped like the preset's model (stacked layers), the jitted
update the train step runs (`make_optimizer` -> `fused_adamw`: freeze masks, global-norm
clipping, masked AdamW, then `optax.apply_updates`) against the same optimizer as a chain of
optax transformations (`optax_chain`), with and without clipping.  Reported: ms per update, x the
ideal time of one fused pass (read p, g, m, v; write p, m, v: 28 bytes per parameter) at the copy
rate measured in the same run, and the bytes accessed per parameter from XLA's cost analysis of
the compiled update.  Table on stdout.
"""

from __future__ import annotations

import argparse
import os
import statistics
import sys
import time

ROOT = os.path.abspath(os.path.join(os.path.dirname(__file__), ".."))
sys.path.insert(0, ROOT)
sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
from bench_common import timed  # noqa: E402  (benchmarks/ on sys.path)


def main():
    import jax
    import jax.numpy as jnp
    import optax
    from flax import nnx

    from configs.base import get_config
    from qwen_jax.config import config_from_dict
    from qwen_jax.hf.models import abstract_model
    from qwen_jax.presets import get_preset
    from qwen_jax.trainer import optimizer as opt

    p = argparse.ArgumentParser()
    p.add_argument("--preset", default="qwen2-1.5b")
    args = p.parse_args()
    cfg = config_from_dict(get_preset(args.preset), param_dtype="float32")

    _, abstract = abstract_model(cfg)
    shapes = nnx.to_pure_dict(abstract)
    params = jax.tree.map(lambda a: jnp.full(a.shape, 0.01, jnp.float32), shapes)
    grads = jax.tree.map(lambda a: jnp.full(a.shape, 1e-3, jnp.float32), shapes)
    n = sum(x.size for x in jax.tree.leaves(params))
    rows = []

    def run(f, params, state):
        params, state, g = f(params, grads, state)  # compile; donated buffers are fed back in
        times = []
        for _ in range(10):
            t0 = time.perf_counter()
            params, state, g = f(params, grads, state)
            jax.block_until_ready(g)
            times.append(time.perf_counter() - t0)
        return statistics.median(times)

    spec = opt.resolve_freeze(params)
    for clip in (1.0, 0.0):
        c = get_config().optimizer
        c.grad_clip = clip
        fused, schedule = opt.make_optimizer(params, c, 1000, spec)
        chain = opt.optax_chain(params, c, schedule, spec)
        for name, tx in (("optax chain", chain), ("fused_adamw (default)", fused)):
            def step(params, grads, state, tx=tx):
                updates, state = tx.update(grads, state, params)
                return optax.apply_updates(params, updates), state, optax.global_norm(grads)

            f = jax.jit(step, donate_argnums=(0, 2))
            traffic = f.lower(params, grads, tx.init(params)).compile().cost_analysis() or {}
            if isinstance(traffic, list):  # older jax: one dict per computation
                traffic = traffic[0] if traffic else {}
            ms = run(f, params, tx.init(params))
            rows.append((f"{name}, clip={clip}", ms, traffic.get("bytes accessed", float("nan")) / n))
            params = jax.tree.map(lambda a: jnp.full(a.shape, 0.01, jnp.float32), shapes)

    x = jnp.ones((n,), jnp.float32)
    copy = timed(jax.jit(lambda x: x * 2.0), x, reps=10)
    bw = 8 * n / copy
    ideal = 28 * n / bw
    print(f"\n{jax.devices()[0].device_kind}  {args.preset}: {n / 1e9:.2f}B fp32 parameters; "
          f"copy rate {bw / 1e12:.2f} TB/s; one fused AdamW pass (28 B/param) at that rate: {ideal * 1e3:.1f} ms")
    print(f"{'update':<34}{'ms':>8}{'x ideal':>9}{'XLA bytes/param':>17}")
    for name, s, bpp in rows:
        print(f"{name:<34}{s * 1e3:>8.1f}{s / ideal:>9.2f}{bpp:>17.1f}")


if __name__ == "__main__":
    main()
