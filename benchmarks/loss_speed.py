"""Chunked output projection + cross-entropy on one accelerator: fused (custom_vjp) vs jax.checkpoint chunks.

    python benchmarks/loss_speed.py [--shapes 896x4x4096,1536x2x4096,3584x1x8192] [--chunk 2048]

Shapes are embed x batch x seq; vocab 151,936 (Qwen2).  Hidden states bf16, output projection
float32 (master parameters), every token a loss token but ~10%.  For each shape and
implementation: median time of a jitted value_and_grad w.r.t. (hidden, w_out) ("train") and of
the loss alone ("eval"), XLA's temporary memory of the train program, and the gradient
difference between the two implementations (relative norm).  "checkpointed" is the previous
`qwen_jax.trainer.loss.chunked_cross_entropy` (each chunk under `jax.checkpoint`, backward by
autodiff, 4 vocab matmuls per chunk), kept here as the baseline; "fused" is
`fused_cross_entropy` (3 matmuls per chunk, gradients computed in the forward pass).
TFLOP/s counts 3 vocab matmuls of 2*b*t*e*V FLOPs for train, 1 for eval, for both.
Results: table on stdout, JSON in benchmarks/results/loss_speed.json (and --out).
"""

from __future__ import annotations

import argparse
import datetime
import json
import os
import statistics
import sys
import time

sys.path.insert(0, os.path.join(os.path.dirname(__file__), ".."))

import jax  # noqa: E402
import jax.numpy as jnp  # noqa: E402
import numpy as np  # noqa: E402

from qwen_jax.sharding import constrain  # noqa: E402
from qwen_jax.trainer.loss import _chunks, fused_cross_entropy  # noqa: E402

VOCAB = 151936


def checkpointed_cross_entropy(hidden, w_out, targets, loss_mask, *, chunk_size: int = 1024):
    """The previous implementation: (nll sum, z sum), each chunk under jax.checkpoint, autodiff backward."""
    hs, ts, ms = _chunks(hidden, targets, loss_mask, chunk_size)  # the same chunking as the fused loss

    @jax.checkpoint
    def chunk(w, h, tgt, m):
        logits = jnp.einsum("bce,ev->bcv", h, w.astype(h.dtype), preferred_element_type=jnp.float32)
        logits = constrain(logits, ("batch", "length", "act_vocab"))
        lse = jax.nn.logsumexp(logits, axis=-1)
        target_logit = jnp.take_along_axis(logits, tgt[..., None].astype(jnp.int32), axis=-1)[..., 0]
        return jnp.sum((lse - target_logit) * m), jnp.sum(jnp.square(lse) * m)

    def body(carry, xs):
        nll, z = chunk(w_out, *xs)
        return (carry[0] + nll, carry[1] + z), None

    zero = jnp.zeros((), jnp.float32)
    (nll, z), _ = jax.lax.scan(body, (zero, zero), (hs, ts, ms))
    return nll, z


def objectives(chunk, z_weight):
    def checkpointed(h, w, tgt, m):
        nll, z = checkpointed_cross_entropy(h, w, tgt, m, chunk_size=chunk)
        return (nll + z_weight * z) / jnp.sum(m)

    def fused(h, w, tgt, m):
        return fused_cross_entropy(h, w, tgt, m, chunk_size=chunk, z_weight=z_weight)[0] / jnp.sum(m)

    return {"checkpointed": checkpointed, "fused": fused}


def timed(fn, *args, repeats):
    jax.block_until_ready(fn(*args))
    times = []
    for _ in range(repeats):
        t0 = time.perf_counter()
        jax.block_until_ready(fn(*args))
        times.append(time.perf_counter() - t0)
    return statistics.median(times)


def run_shape(e, b, t, chunk, z_weight, repeats):
    k = jax.random.split(jax.random.key(0), 4)
    h = jax.random.normal(k[0], (b, t, e), jnp.bfloat16)
    w = 0.02 * jax.random.normal(k[1], (e, VOCAB), jnp.float32)
    tgt = jax.random.randint(k[2], (b, t), 0, VOCAB)
    mask = (jax.random.uniform(k[3], (b, t)) > 0.1).astype(jnp.float32)
    mm = 2 * b * t * e * VOCAB
    rows, grads = [], {}
    for name, f in objectives(chunk, z_weight).items():
        train = jax.jit(jax.value_and_grad(f, (0, 1)))
        evaluate = jax.jit(f)
        mem = train.lower(h, w, tgt, mask).compile().memory_analysis()
        temp = getattr(mem, "temp_size_in_bytes", None) if mem is not None else None
        t_train = timed(train, h, w, tgt, mask, repeats=repeats)
        t_eval = timed(evaluate, h, w, tgt, mask, repeats=repeats)
        loss, g = train(h, w, tgt, mask)
        grads[name] = (float(loss), [np.asarray(x, np.float32) for x in g])
        rows.append({"embed": e, "batch": b, "seq": t, "chunk": chunk, "impl": name,
                     "train_ms": 1e3 * t_train, "eval_ms": 1e3 * t_eval,
                     "train_tflops": 3 * mm / t_train / 1e12, "eval_tflops": mm / t_eval / 1e12,
                     "train_temp_gib": None if temp is None else temp / 2**30})
    (l0, g0), (l1, g1) = grads["checkpointed"], grads["fused"]
    diff = {"loss_rel": abs(l1 - l0) / abs(l0),
            "d_hidden_rel": float(np.linalg.norm(g1[0] - g0[0]) / np.linalg.norm(g0[0])),
            "d_w_rel": float(np.linalg.norm(g1[1] - g0[1]) / np.linalg.norm(g0[1]))}
    for r in rows:
        r.update(diff)
    return rows


def main():
    p = argparse.ArgumentParser()
    p.add_argument("--shapes", default="896x4x4096,1536x2x4096,3584x1x8192")
    p.add_argument("--chunk", type=int, default=2048)
    p.add_argument("--z_weight", type=float, default=0.0)
    p.add_argument("--repeats", type=int, default=10)
    p.add_argument("--out", default=os.environ.get("OUT", ""))
    a = p.parse_args()
    rows = []
    for s in a.shapes.split(","):
        e, b, t = (int(x) for x in s.split("x"))
        rows += run_shape(e, b, t, a.chunk, a.z_weight, a.repeats)
    print("| embed | batch x seq | impl | train ms | train TFLOP/s | eval ms | train temp GiB | grad diff (h, W) |")
    print("| ---: | ---: | --- | ---: | ---: | ---: | ---: | ---: |")
    for r in rows:
        temp = "n/a" if r["train_temp_gib"] is None else f"{r['train_temp_gib']:.2f}"
        print(f"| {r['embed']} | {r['batch']} x {r['seq']} | {r['impl']} | {r['train_ms']:.2f} | "
              f"{r['train_tflops']:.0f} | {r['eval_ms']:.2f} | {temp} | "
              f"{r['d_hidden_rel']:.1e}, {r['d_w_rel']:.1e} |")
    result = {"date": datetime.date.today().isoformat(), "device": str(jax.devices()[0].device_kind),
              "jax": jax.__version__, "vocab": VOCAB, "z_weight": a.z_weight, "rows": rows}
    for d in {os.path.join(os.path.dirname(__file__), "results"), a.out} - {""}:
        os.makedirs(d, exist_ok=True)
        with open(os.path.join(d, "loss_speed.json"), "w") as f:
            json.dump(result, f, indent=1)


if __name__ == "__main__":
    main()
