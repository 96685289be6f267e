"""Optimizer update alone: time and memory traffic of the AdamW step on a model's parameter tree.

    python benchmarks/optimizer_speed.py [--preset qwen2-1.5b]

Times, on fp32 parameters/moments shaped like the preset's model (stacked layers), the jitted
update the train step runs (`trainer.optimizer.make_optimizer`: freeze masks, global-norm
clipping, masked AdamW, `optax.apply_updates`), with and without clipping, and reports the
effective bandwidth against the ideal traffic of one fused pass (read p, g, m, v; write p, m, v:
28 bytes per parameter) and a plain copy rate measured in the same run.  Table on stdout.
"""

from __future__ import annotations

import argparse
import os
import statistics
import sys
import time

ROOT = os.path.abspath(os.path.join(os.path.dirname(__file__), ".."))
sys.path.insert(0, ROOT)


def timed(fn, *args, reps=10):
    import jax

    out = fn(*args)
    jax.block_until_ready(out)
    times = []
    for _ in range(reps):
        t0 = time.perf_counter()
        out = fn(*args)
        jax.block_until_ready(out)
        times.append(time.perf_counter() - t0)
    return statistics.median(times)


def main():
    import jax
    import jax.numpy as jnp
    import optax
    from flax import nnx

    from configs.base import get_config
    from configs.model_presets import get_preset
    from qwen_jax.config import config_from_dict
    from qwen_jax.hf_io import abstract_model
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

    for clip in (1.0, 0.0):
        c = get_config().optimizer
        c.grad_clip = clip
        tx, _ = opt.make_optimizer(params, c, 1000, opt.resolve_freeze(params))

        def step(params, grads, state, tx=tx):
            updates, state = tx.update(grads, state, params)
            return optax.apply_updates(params, updates), state, optax.global_norm(grads)

        rows.append((f"optax chain, clip={clip}", run(jax.jit(step, donate_argnums=(0, 2)), params, tx.init(params))))
        params = jax.tree.map(lambda a: jnp.full(a.shape, 0.01, jnp.float32), shapes)

    # the same math written as one elementwise function per leaf (what a fused kernel does)
    c = get_config().optimizer
    decay = opt.decay_mask(params)

    def fused(params, grads, state):
        mu, nu, count = state
        norm = optax.global_norm(grads)
        scale = c.grad_clip / jnp.maximum(norm, c.grad_clip)
        count = count + 1
        bc1, bc2 = 1 - c.b1 ** count, 1 - c.b2 ** count
        lr = c.learning_rate

        def one(p, g, m, v, d):
            g = g * scale
            m = c.b1 * m + (1 - c.b1) * g
            v = c.b2 * v + (1 - c.b2) * g * g
            u = (m / bc1) / (jnp.sqrt(v / bc2) + c.eps) + (c.weight_decay * p if d else 0.0)
            return p - lr * u, m, v

        out = jax.tree.map(one, params, grads, mu, nu, decay)
        new_p = jax.tree.map(lambda t: t[0], out, is_leaf=lambda t: isinstance(t, tuple))
        new_m = jax.tree.map(lambda t: t[1], out, is_leaf=lambda t: isinstance(t, tuple))
        new_v = jax.tree.map(lambda t: t[2], out, is_leaf=lambda t: isinstance(t, tuple))
        return new_p, (new_m, new_v, count), norm

    zeros = jax.tree.map(jnp.zeros_like, params)
    state0 = (zeros, jax.tree.map(jnp.zeros_like, params), jnp.zeros((), jnp.int32))
    rows.append(("one function per leaf, clip", run(jax.jit(fused, donate_argnums=(0, 2)), params, state0)))
    x = jnp.ones((n,), jnp.float32)
    copy = timed(jax.jit(lambda x: x * 2.0), x)
    bw = 8 * n / copy
    ideal = 28 * n / bw
    print(f"\n{jax.devices()[0].device_kind}  {args.preset}: {n / 1e9:.2f}B fp32 parameters; "
          f"copy rate {bw / 1e12:.2f} TB/s; one fused AdamW pass (28 B/param) at that rate: {ideal * 1e3:.1f} ms")
    print(f"{'update':<32}{'ms':>8}{'x ideal':>9}")
    for name, s in rows:
        print(f"{name:<32}{s * 1e3:>8.1f}{s / ideal:>9.2f}")


if __name__ == "__main__":
    main()
