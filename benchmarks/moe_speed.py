"""Mixture-of-experts training speed on one GPU: our train step vs transformers + PyTorch, same shape, same run.

    python benchmarks/moe_speed.py                       # Qwen3-30B-A3B x6 layers, Qwen2-57B-A14B x2 layers
    python benchmarks/moe_speed.py --shapes qwen3-30b-a3b@6:4096x2 --variants cudnn/none/noscan/2048
    python benchmarks/moe_speed.py --shapes qwen3-30b-a3b@1:64x2 --variants xla/none/noscan/64 \\
        --overrides hidden_size=64,intermediate_size=128,moe_intermediate_size=32,num_attention_heads=4,\\
num_key_value_heads=2,head_dim=16,num_experts=8,num_experts_per_tok=2,vocab_size=512 --steps 2 --blocks 1  # CPU

A shape is `preset@layers:SEQxBATCH`: a MoE preset of `qwen_jax.presets` cut to `layers`
decoder layers (the full models do not fit one H200 with AdamW state), `--overrides` applied to
its config.json.  Each (framework, shape, variant) runs in its own subprocess on random tokens:

* ours: the trainer's step (`benchmarks/train_throughput.build_jax_step`: bf16 compute over fp32
  master parameters, AdamW, chunked cross-entropy, dropless `ragged_dot` experts, router
  load-balancing loss with the config's router_aux_loss_coef), variants as in train_throughput.py
  (`attention/remat/scan|noscan/loss_chunk`);
* theirs: `transformers.Qwen2MoeForCausalLM` / `Qwen3MoeForCausalLM` (v5: experts as fused 3-D
  tensors, `experts_implementation` "grouped_mm" = torch._grouped_mm, its default; SDPA attention),
  fp32 parameters under bf16 autocast, `torch.optim.AdamW(fused=True)`, loss from `labels` plus
  the router aux loss (`output_router_logits=True`, as ours); gradient checkpointing only if the
  plain run runs out of memory.

Timing as train_throughput.py: median over --blocks blocks of --steps back-to-back steps.
MFU counts *active* parameters: FLOPs/token = 6 * N_active + 3 * causal attention forward, with
N_active = attention, norms, router, shared expert and `num_experts_per_tok` routed experts per
layer plus the output projection (`qwen_jax.metrics.flops_per_token`, `num_params(active=True)`),
against 989 TFLOP/s (H100/H200 dense bf16).  Results: table on stdout, JSON in
benchmarks/results/moe_speed.json (and --out).
"""

from __future__ import annotations

import argparse
import datetime
import json
import os
import statistics
import sys
import time

ROOT = os.path.abspath(os.path.join(os.path.dirname(__file__), ".."))
sys.path.insert(0, ROOT)
sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
from bench_common import run_result_subprocess  # noqa: E402  (benchmarks/ on sys.path)

PEAK = 989e12
DEFAULT_SHAPES = "qwen3-30b-a3b@6:4096x2,qwen2-57b-a14b@2:4096x2"
DEFAULT_XLA_FLAGS = "--xla_gpu_enable_latency_hiding_scheduler=true"


def parse_shape(text: str) -> tuple[str, int, int, int]:
    """`preset@layers:SEQxBATCH` -> (preset, layers, seq, batch)."""
    try:
        model, dims = text.split(":")
        preset, layers = model.split("@")
        seq, batch = dims.lower().split("x")
        return preset, int(layers), int(seq), int(batch)
    except ValueError:
        raise ValueError(f"shape {text!r}: expected preset@layers:SEQxBATCH, e.g. qwen3-30b-a3b@6:4096x2") from None


def parse_overrides(text: str) -> dict:
    """`key=value,key=value` (values as JSON where they parse, else strings)."""
    out = {}
    for item in filter(None, (s.strip() for s in text.split(","))):
        key, sep, value = item.partition("=")
        if not sep or not key:
            raise ValueError(f"--overrides item {item!r}: expected key=value")
        try:
            out[key] = json.loads(value)
        except json.JSONDecodeError:
            out[key] = value
    return out


def hf_config(shape: str, overrides: dict) -> dict:
    """The config.json of a shape: the preset cut to its layer count, overrides applied."""
    from qwen_jax.presets import get_preset

    preset, layers, _, _ = parse_shape(shape)
    raw = get_preset(preset)
    if raw.get("model_type") not in ("qwen2_moe", "qwen3_moe"):
        raise ValueError(f"shape {shape!r}: {preset} is not a mixture-of-experts preset")
    raw.update(num_hidden_layers=layers, max_window_layers=layers, **overrides)
    return raw


def worker_jax(shape, overrides, variant, steps, blocks):
    import jax
    from train_throughput import block_times, build_jax_step, run_steps

    _, _, seq, batch = parse_shape(shape)
    step, state, batches, _ = build_jax_step(hf_config(shape, overrides), seq, batch, variant)
    t0 = time.perf_counter()
    state, m, _ = run_steps(step, state, batches, 1)
    compile_s = time.perf_counter() - t0
    state, m, synced = run_steps(step, state, batches, steps)
    state, m, per_block = block_times(step, state, batches, steps, blocks)
    stats = jax.devices()[0].memory_stats() or {}
    return dict(step_s=statistics.median(per_block), step_s_synced=statistics.median(synced), compile_s=compile_s,
                loss=float(m["loss"]), router_aux_loss=float(m["router_aux_loss"]),
                peak_gib=stats.get("peak_bytes_in_use", 0) / 2**30, device=jax.devices()[0].device_kind,
                jax=jax.__version__)


def worker_torch(shape, overrides, variant, steps, blocks):
    import torch
    import transformers

    raw = hf_config(shape, overrides)
    _, _, seq, batch = parse_shape(shape)
    name = {"qwen2_moe": "Qwen2Moe", "qwen3_moe": "Qwen3Moe"}[raw["model_type"]]
    device = "cuda" if torch.cuda.is_available() else "cpu"
    torch.manual_seed(0)
    config = getattr(transformers, f"{name}Config")(**{k: v for k, v in raw.items()
                                                      if k not in ("architectures", "torch_dtype")})
    config.output_router_logits = True
    config._attn_implementation = "sdpa"
    with torch.device(device):  # initialise on the accelerator: billions of parameters on one CPU thread take minutes
        model = getattr(transformers, f"{name}ForCausalLM")(config)
    if variant == "ckpt":
        model.gradient_checkpointing_enable()
    model.train()
    optimizer = torch.optim.AdamW(model.parameters(), lr=1e-5, fused=True)
    batches = [torch.randint(0, raw["vocab_size"], (batch, seq), device=device) for _ in range(3)]
    sync = torch.cuda.synchronize if device == "cuda" else (lambda: None)

    def one(ids):
        with torch.autocast(device, dtype=torch.bfloat16):
            out = model(input_ids=ids, labels=ids)
        out.loss.backward()
        optimizer.step()
        optimizer.zero_grad(set_to_none=True)
        return out

    for i in range(3):
        one(batches[i])
    sync()
    if device == "cuda":
        torch.cuda.reset_peak_memory_stats()
    synced = []
    for i in range(steps):
        sync()
        t0 = time.perf_counter()
        out = one(batches[i % 3])
        sync()
        synced.append(time.perf_counter() - t0)
    per_block = []
    for _ in range(blocks):
        t0 = time.perf_counter()
        for i in range(steps):
            out = one(batches[i % 3])
        sync()
        per_block.append((time.perf_counter() - t0) / steps)
    peak = torch.cuda.max_memory_allocated() / 2**30 if device == "cuda" else 0.0
    return dict(step_s=statistics.median(per_block), step_s_synced=statistics.median(synced),
                loss=float(out.loss - config.router_aux_loss_coef * out.aux_loss), router_aux_loss=float(out.aux_loss),
                peak_gib=peak, experts_implementation=model.config._experts_implementation,
                device=torch.cuda.get_device_name() if device == "cuda" else "cpu", torch=torch.__version__)


def run_worker(framework, shape, overrides_text, variant, steps, blocks, timeout):
    cmd = [sys.executable, __file__, "--worker", framework, "--shapes", shape, "--overrides", overrides_text,
           "--variant", variant, "--steps", str(steps), "--blocks", str(blocks)]
    env = dict(os.environ, XLA_PYTHON_CLIENT_MEM_FRACTION="0.92", TOKENIZERS_PARALLELISM="false")
    env.setdefault("XLA_FLAGS", DEFAULT_XLA_FLAGS)
    return run_result_subprocess(cmd, env, timeout, ROOT)


def main():
    p = argparse.ArgumentParser()
    p.add_argument("--shapes", default=DEFAULT_SHAPES, help="comma-separated preset@layers:SEQxBATCH")
    p.add_argument("--variants", default="cudnn/none/noscan/2048,cudnn/dots_no_batch/noscan/2048",
                   help="comma-separated attention/remat/scan|noscan/loss_chunk (see train_throughput.py)")
    p.add_argument("--overrides", default="", help="config.json overrides key=value,... (e.g. for a CPU smoke run)")
    p.add_argument("--steps", type=int, default=10, help="steps per timed block (and synced steps)")
    p.add_argument("--blocks", type=int, default=3)
    p.add_argument("--timeout", type=int, default=900)
    p.add_argument("--skip_torch", action="store_true")
    p.add_argument("--worker", choices=["jax", "torch"])
    p.add_argument("--variant", default="")
    p.add_argument("--out", default=os.environ.get("OUT", ""))
    args = p.parse_args()
    try:  # every input checked before the first (expensive) subprocess
        overrides = parse_overrides(args.overrides)
        shapes = [s.strip() for s in args.shapes.split(",") if s.strip()]
        configs = {s: hf_config(s, overrides) for s in shapes}
    except (ValueError, KeyError) as e:
        p.error(str(e).strip("'\""))
    if args.steps < 1 or args.blocks < 1:
        p.error("--steps and --blocks must be >= 1")
    if args.worker:
        fn = worker_jax if args.worker == "jax" else worker_torch
        print("RESULT " + json.dumps(fn(shapes[0], overrides, args.variant, args.steps, args.blocks)), flush=True)
        return

    from qwen_jax.config import config_from_dict
    from qwen_jax.metrics import flops_per_token
    from qwen_jax.model import num_params

    rows = []
    for shape in shapes:
        _, _, seq, batch = parse_shape(shape)
        cfg = config_from_dict(configs[shape])
        common = {"flops_per_token": flops_per_token(cfg, seq), "total_params": num_params(cfg),
                  "active_params": num_params(cfg, active=True)}
        theirs = None
        if not args.skip_torch:
            theirs = run_worker("torch", shape, args.overrides, "plain", args.steps, args.blocks, args.timeout)
            if theirs.get("error") == "out of memory":
                theirs = run_worker("torch", shape, args.overrides, "ckpt", args.steps, args.blocks, args.timeout)
                theirs["variant"] = "grad ckpt"
            rows.append({"framework": "pytorch", "shape": shape, "variant": theirs.pop("variant", "plain"), **theirs})
            print(json.dumps(rows[-1]), flush=True)
        for variant in [v.strip() for v in args.variants.split(",") if v.strip()]:
            ours = run_worker("jax", shape, args.overrides, variant, args.steps, args.blocks, args.timeout)
            rows.append({"framework": "qwen_jax", "shape": shape, "variant": variant, **ours})
            print(json.dumps(rows[-1]), flush=True)
        for r in rows:
            if r["shape"] == shape and "error" not in r:
                r.update(common)
                r["tokens_per_s"] = seq * batch / r["step_s"]
                r["mfu_active_989"] = r["flops_per_token"] * r["tokens_per_s"] / PEAK
                if theirs and "error" not in theirs and r["framework"] == "qwen_jax":
                    r["ratio"] = theirs["step_s"] / r["step_s"]
    result = {"date": datetime.date.today().isoformat(), "rows": rows,
              "convention": "FLOPs/token = 6*N_active + 3*causal attention fwd (2*2*L*H*D*T/2); N_active = "
                            "num_params(active=True) without the embedding lookup + the output projection; "
                            "MFU vs 989e12"}
    for folder in filter(None, [os.path.join(ROOT, "benchmarks", "results"), args.out]):
        os.makedirs(folder, exist_ok=True)
        with open(os.path.join(folder, "moe_speed.json"), "w") as f:
            json.dump(result, f, indent=1)
    print(f"\n{'shape':<28}{'framework':<10}{'variant':<30}{'tok/s':>9}{'step ms':>9}{'peak GiB':>9}"
          f"{'MFUact':>8}{'ours/pt':>8}")
    for r in rows:
        if "error" in r:
            print(f"{r['shape']:<28}{r['framework']:<10}{r['variant']:<30}  {r['error'][:60]}")
            continue
        ratio = f"{r['ratio']:.2f}" if "ratio" in r else ""
        print(f"{r['shape']:<28}{r['framework']:<10}{r['variant']:<30}{r['tokens_per_s']:>9.0f}"
              f"{r['step_s'] * 1e3:>9.1f}{r['peak_gib']:>9.1f}{r['mfu_active_989']:>8.3f}{ratio:>8}")


if __name__ == "__main__":
    main()
