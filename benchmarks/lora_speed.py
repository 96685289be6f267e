"""LoRA fine-tuning speed and memory on one GPU: our train step vs transformers + PEFT, same shapes, same run.

    python benchmarks/lora_speed.py                      # Qwen2-7B, rank 16 on all projections, bf16 base, 4096 x 1
    python benchmarks/lora_speed.py --tiny               # CPU smoke test of both workers (tiny model, no results file)

Both frameworks train the same thing on random tokens: a randomly initialised model whose
weights are created in bf16 on the device and frozen, LoRA adapters of rank --rank (alpha = 2 * rank,
no dropout) on q/k/v/o/gate/up/down_proj kept in float32, AdamW on the adapters only, bf16 compute.

* ours: the launcher's path (`qwen_jax.train.run`) without the loop around it: `config.lora` read by
  `lora.spec_from_config`, the base in `lora.base_dtype=bfloat16`, `freeze_base`, and the trainer's jitted
  step (`qwen_jax.trainer.train_step.make_train_step`; base not differentiated, no optimizer state for it);
  attention / remat / scan / loss chunk from --variants (as benchmarks/train_throughput.py);
* theirs: `transformers.Qwen2ForCausalLM` created in bf16 on the device with SDPA +
  `peft.get_peft_model(LoraConfig(...))` (PEFT keeps the adapters in float32), bf16 autocast,
  `torch.optim.AdamW(fused=True)` on the trainable parameters, loss from `labels`; --torch_variants
  `plain` and `ckpt` (gradient checkpointing, what fits a 24 GiB card).

Each (framework, shape, variant) runs in its own subprocess, ours first; --deadline_s bounds the whole run
(a worker gets the time left, rows not reached say so) so one 600 s GPU call always ends with the table.
Step time = median over --blocks blocks of --steps back-to-back steps (one sync per block); peak
device memory from the allocator (jax `memory_stats()['peak_bytes_in_use']`, torch `max_memory_allocated`),
over the whole process (init and steps); `fits` compares it with --fit_gib (24).  Ours also reports the
peak after init alone (`peak_init_gib`, "init GiB") and the step's planned peak from XLA's memory analysis of
the compiled step (`step_gib` = arguments + outputs - donated + temporaries, "plan GiB").  Results: table on
stdout, JSON in benchmarks/results/lora_speed.json (not with --tiny) and in --out.
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
from bench_common import run_result_subprocess, torch_lm_step, torch_step_times  # noqa: E402  (benchmarks/ on sys.path)
from train_throughput import (  # noqa: E402
    DEFAULT_XLA_FLAGS,
    PRESETS,
    block_times,
    parse_shape,
    parse_variant,
    run_steps,
)

PROJECTIONS = ["q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj"]


def build_lora_step(preset: str, seq: int, batch: int, variant: str, rank: int, seed: int = 0):
    """Our jitted LoRA train step on one device, built as `qwen_jax.train.run` builds it:
    `(step, state, batches, trainable parameter count)`."""
    import jax
    import numpy as np

    from configs.base import get_config
    from qwen_jax import lora as lora_lib
    from qwen_jax import sharding
    from qwen_jax.config import config_from_dict
    from qwen_jax.presets import get_preset
    from qwen_jax.trainer import optimizer as opt
    from qwen_jax.trainer import train_step as ts

    attention, remat, scan, chunk, _ = parse_variant(variant)
    c = get_config()
    c.lora.rank, c.lora.alpha, c.lora.base_dtype = rank, 2.0 * rank, "bfloat16"
    spec = lora_lib.spec_from_config(c.lora)
    cfg = config_from_dict(get_preset(preset), dtype="bfloat16", param_dtype="float32", attention=attention,
                           remat=remat, scan_layers=scan)
    cfg, _ = lora_lib.base_config(cfg, {}, spec)
    mesh = sharding.make_mesh({"fsdp": 1}, devices=jax.devices()[:1])
    graphdef, abstract, p_sh = ts.param_shardings(cfg, mesh, spec)
    freeze = lora_lib.freeze_base(opt.resolve_freeze(abstract), abstract, spec)
    tx, sched = opt.make_optimizer(abstract, c.optimizer, 1000, freeze)
    state_sh = ts.state_shardings(tx, abstract, p_sh, mesh)
    params = ts.init_params(cfg, seed, lora_lib.base_only(p_sh))  # created in bf16 on the device
    params = lora_lib.add_adapters(params, cfg, spec, abstract, p_sh, seed)
    state = ts.init_state(params, tx, seed, state_sh)
    del params
    keys = ts.FULL_ROW_KEYS
    batch_sh = ts.batch_shardings(mesh, batch, seq, keys=keys)
    step = ts.make_train_step(graphdef, tx, sched, freeze, mesh=mesh, state_sh=state_sh, batch_sh=batch_sh,
                              chunk_size=chunk, dropout_keys=lora_lib.dropout_key_fn(cfg, spec))
    rng = np.random.default_rng(seed)

    def make_batch():
        ids = rng.integers(0, cfg.vocab_size, (batch, seq + 1), dtype=np.int32)
        host = {"input_ids": ids[:, :-1], "targets": ids[:, 1:], "loss_mask": np.ones((batch, seq), np.float32)}
        return {k: jax.device_put(v, batch_sh[k]) for k, v in host.items()}

    base_dtypes = {str(v.dtype) for p, v in lora_lib.flatten(state["params"]).items() if not lora_lib.is_adapter(p)}
    assert base_dtypes == {"bfloat16"}, base_dtypes  # what the benchmark claims to measure
    return step, state, [make_batch() for _ in range(3)], freeze.summary(abstract)["trainable"]


def compiled_step(step, state, batch):
    """(step running the AOT-compiled executable, compile seconds, its memory analysis in GiB).

    `step_gib` = arguments + outputs - donated aliases + temporaries: the step's own peak as XLA planned
    it, which the allocator's peak (`peak_gib`, since the process started) cannot isolate from init."""
    import jax

    t0 = time.perf_counter()
    with jax.set_mesh(step.mesh):
        compiled = step.jitted.lower(state, batch).compile()
    compile_s = time.perf_counter() - t0
    m = compiled.memory_analysis()
    gib = {k: getattr(m, f"{k}_size_in_bytes") / 2**30 for k in ("argument", "output", "alias", "temp")} if m else {}
    if gib:
        gib["step"] = gib["argument"] + gib["output"] - gib["alias"] + gib["temp"]

    def run(state, batch):
        with jax.set_mesh(step.mesh):
            return compiled(state, batch)

    return run, compile_s, gib


def worker_jax(preset, seq, batch, variant, steps, blocks, rank):
    import jax

    step, state, batches, trainable = build_lora_step(preset, seq, batch, variant, rank)
    init_stats = jax.devices()[0].memory_stats() or {}
    step, compile_s, planned = compiled_step(step, state, batches[0])
    state, m, _ = run_steps(step, state, batches, 1)
    state, m, _ = run_steps(step, state, batches, 2, timed=False)
    state, m, synced = run_steps(step, state, batches, steps)
    state, m, per_block = block_times(step, state, batches, steps, blocks)
    stats = jax.devices()[0].memory_stats() or {}
    return dict(step_s=statistics.median(per_block), step_s_blocks=per_block, step_s_synced=statistics.median(synced),
                compile_s=compile_s, loss=float(m["loss"]), peak_gib=stats.get("peak_bytes_in_use", 0) / 2**30,
                peak_init_gib=init_stats.get("peak_bytes_in_use", 0) / 2**30,
                step_gib=planned.get("step", 0.0), step_temp_gib=planned.get("temp", 0.0),
                trainable=trainable, device=jax.devices()[0].device_kind, jax=jax.__version__,
                xla_flags=os.environ.get("XLA_FLAGS", ""))


def worker_torch(preset, seq, batch, variant, steps, blocks, rank):
    import peft
    import torch
    from transformers import Qwen2Config, Qwen2ForCausalLM

    from qwen_jax.presets import get_preset

    device = "cuda" if torch.cuda.is_available() else "cpu"
    hf = get_preset(preset)
    torch.manual_seed(0)
    config = Qwen2Config(**{k: v for k, v in hf.items() if k not in ("architectures", "torch_dtype", "dtype")})
    config._attn_implementation = "sdpa"
    with torch.device(device):  # random weights created in bf16 on the device (no float32 copy on the host)
        model = Qwen2ForCausalLM._from_config(config, dtype=torch.bfloat16)
    if variant == "ckpt":
        model.gradient_checkpointing_enable(gradient_checkpointing_kwargs={"use_reentrant": False})
    model = peft.get_peft_model(model, peft.LoraConfig(r=rank, lora_alpha=2 * rank, lora_dropout=0.0,
                                                       target_modules=PROJECTIONS, task_type="CAUSAL_LM"))
    model.train()
    trainable = [p for p in model.parameters() if p.requires_grad]
    assert {p.dtype for p in trainable} == {torch.float32}, {p.dtype for p in trainable}
    optimizer = torch.optim.AdamW(trainable, lr=1e-4, fused=device == "cuda")
    batches = [torch.randint(0, config.vocab_size, (batch, seq), device=device) for _ in range(3)]
    synced, per_block, loss = torch_step_times(torch_lm_step(model, optimizer, device), batches, steps, blocks,
                                               device)
    peak = torch.cuda.max_memory_allocated() / 2**30 if device == "cuda" else 0.0
    return dict(step_s=statistics.median(per_block), step_s_blocks=per_block, step_s_synced=statistics.median(synced),
                loss=loss, peak_gib=peak, trainable=model.get_nb_trainable_parameters()[0],
                gradient_checkpointing=variant == "ckpt",
                device=torch.cuda.get_device_name() if device == "cuda" else "cpu",
                torch=torch.__version__, peft=peft.__version__)


def run_worker(framework, shape, variant, args, timeout):
    if timeout < 30:
        return {"error": "not run: --deadline_s reached"}
    cmd = [sys.executable, __file__, "--worker", framework, "--shape", shape, "--variant", variant,
           "--steps", str(args.steps), "--blocks", str(args.blocks), "--rank", str(args.rank)]
    env = dict(os.environ, XLA_PYTHON_CLIENT_MEM_FRACTION="0.92", TOKENIZERS_PARALLELISM="false")
    env.setdefault("XLA_FLAGS", DEFAULT_XLA_FLAGS)
    return run_result_subprocess(cmd, env, timeout, ROOT)


TINY = dict(shapes="tiny:32x1", variants="xla/none/noscan/16,xla/save_attention/scan/16", steps=1, blocks=1)


def main():
    start = time.monotonic()
    p = argparse.ArgumentParser()
    p.add_argument("--shapes", default="7b:4096x1", help="comma-separated size:SEQxBATCH (train_throughput.py's)")
    p.add_argument("--variants", default="cudnn/save_attention/scan/1024,cudnn/full/scan/1024,cudnn/full/noscan/2048",
                   help="comma-separated attention/remat/scan|noscan/loss_chunk (ours)")
    p.add_argument("--torch_variants", default="plain,ckpt", help="plain | ckpt (gradient checkpointing)")
    p.add_argument("--rank", type=int, default=16)
    p.add_argument("--steps", type=int, default=8, help="steps per timed block (and synced steps)")
    p.add_argument("--blocks", type=int, default=3, help="timed blocks of back-to-back steps")
    p.add_argument("--timeout", type=int, default=300, help="seconds per worker at most")
    p.add_argument("--deadline_s", type=int, default=570, help="seconds for the whole run (workers get what is left)")
    p.add_argument("--fit_gib", type=float, default=24.0, help="the device memory the 'fits' column compares with")
    p.add_argument("--skip_torch", action="store_true")
    p.add_argument("--tiny", action="store_true",
                   help=f"CPU smoke test: {' '.join(f'--{k} {v}' for k, v in TINY.items())}, no results file")
    p.add_argument("--worker", choices=["jax", "torch"])
    p.add_argument("--shape")
    p.add_argument("--variant", default="")
    p.add_argument("--out", default=os.environ.get("OUT", ""))
    args = p.parse_args()
    if args.tiny:
        for key, value in TINY.items():
            setattr(args, key, value)
    for flag in ("steps", "blocks", "rank"):
        if getattr(args, flag) < 1:
            p.error(f"--{flag} must be >= 1, got {getattr(args, flag)}")
    if args.worker:
        preset, seq, batch = parse_shape(args.shape)
        fn = worker_jax if args.worker == "jax" else worker_torch
        result = fn(preset, seq, batch, args.variant, args.steps, args.blocks, args.rank)
        print("RESULT " + json.dumps(result), flush=True)
        return

    from qwen_jax.presets import PRESETS as MODEL_PRESETS

    variants = [v.strip() for v in args.variants.split(",") if v.strip()]
    torch_variants = [] if args.skip_torch else [v.strip() for v in args.torch_variants.split(",") if v.strip()]
    shapes = [s.strip() for s in args.shapes.split(",") if s.strip()]
    try:
        for v in variants:
            parse_variant(v)
    except ValueError as e:
        p.error(str(e))
    for v in torch_variants:
        if v not in ("plain", "ckpt"):
            p.error(f"--torch_variants: {v!r} is not plain | ckpt")
    for shape in shapes:
        if parse_shape(shape)[0] not in MODEL_PRESETS:
            p.error(f"shape {shape!r}: unknown size (PRESETS keys: {', '.join(PRESETS)}, or a model preset name)")

    def time_left():
        return min(args.timeout, args.deadline_s - (time.monotonic() - start))

    rows = []
    for shape in shapes:
        _, seq, batch = parse_shape(shape)
        # ours first (the number this benchmark is for), then peft, then our other variants
        plan = [("jax", v) for v in variants[:1]] + [("torch", v) for v in torch_variants] + [
            ("jax", v) for v in variants[1:]]
        for framework, variant in plan:
            label = {"plain": "plain", "ckpt": "grad ckpt"}.get(variant, variant) if framework == "torch" else variant
            rows.append({"framework": "peft" if framework == "torch" else "qwen_jax", "shape": shape,
                         "variant": label, **run_worker(framework, shape, variant, args, time_left())})
            print(json.dumps(rows[-1]), flush=True)
        done = [r for r in rows if r["shape"] == shape and "error" not in r]
        theirs = min((r for r in done if r["framework"] == "peft"), key=lambda r: r["step_s"], default=None)
        for r in done:
            r["tokens_per_s"] = seq * batch / r["step_s"]
            r["fits"] = bool(r["peak_gib"] and r["peak_gib"] <= args.fit_gib)
            if theirs and r["framework"] == "qwen_jax":
                r["ratio"], r["ratio_vs"] = theirs["step_s"] / r["step_s"], f"peft {theirs['variant']}"
    result = {"date": datetime.date.today().isoformat(), "rank": args.rank, "fit_gib": args.fit_gib, "rows": rows}
    folders = [args.out] if args.tiny else [os.path.join(ROOT, "benchmarks", "results"), args.out]
    for folder in filter(None, folders):
        os.makedirs(folder, exist_ok=True)
        with open(os.path.join(folder, "lora_speed.json"), "w") as f:
            json.dump(result, f, indent=1)
    device = next((r.get("device") for r in rows if r.get("device")), "?")
    print(f"\n{datetime.date.today()}  {device}  LoRA rank {args.rank}, all projections, bf16 frozen base; "
          f"ours/peft = fastest peft step / ours")
    print(f"{'shape':<14}{'framework':<10}{'variant':<30}{'tok/s':>9}{'step ms':>9}{'synced':>8}{'peak GiB':>9}"
          f"{'fits ' + format(args.fit_gib, 'g'):>8}{'init GiB':>9}{'plan GiB':>9}{'trainable':>12}{'ours/peft':>10}")
    for r in rows:
        if "error" in r:
            print(f"{r['shape']:<14}{r['framework']:<10}{r['variant']:<30}  {r['error'][:60]}")
            continue
        ratio = f"{r['ratio']:.2f}" if "ratio" in r else ""
        fits = ("yes" if r["fits"] else "no") if r["peak_gib"] else "n/a"
        print(f"{r['shape']:<14}{r['framework']:<10}{r['variant']:<30}{r['tokens_per_s']:>9.0f}"
              f"{r['step_s'] * 1e3:>9.1f}{r['step_s_synced'] * 1e3:>8.1f}{r['peak_gib']:>9.2f}{fits:>8}"
              f"{r.get('peak_init_gib', 0):>9.2f}{r.get('step_gib', 0):>9.2f}"
              f"{r['trainable']:>12,}{ratio:>10}")

if __name__ == "__main__":
    main()
