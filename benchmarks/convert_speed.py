"""Benchmark: qwen-convert both ways at Qwen2 sizes, beside transformers' own load/save, in one run.

    python benchmarks/convert_speed.py --model qwen2-0.5b [--dtype bf16|fp32] [--workdir /tmp/convert_bench]

Each step runs in its own subprocess; wall time is measured inside it around the call alone
(imports excluded, as for transformers); peak RSS is that child's own VmHWM (the config linter,
a grandchild of orbax-to-hf, is not included):

1. write a random Hugging Face folder of the model's shape with safetensors directly (no model in memory);
2. `qwen-convert hf-to-orbax` (call `qwen_jax.hf.convert.main`);
3. `qwen-convert orbax-to-hf` of that checkpoint, then a full bit-identity check against the source;
4. a trainer-style checkpoint (`StandardSave` of the parameters as jax arrays with the trainer's
   `checkpoint_format.params_save_args`: one chunk per layer) and `qwen-convert orbax-to-hf` of it;
5. transformers `from_pretrained` of the source, and `from_pretrained` + `save_pretrained`.

GB/s = model bytes / seconds (10^9 bytes); CPU s = process CPU time of the timed call (all
threads), which says more than wall time on a shared machine.  Prints a table and writes
benchmarks/results/convert_speed_<model>_<dtype>.json.
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import shutil
import subprocess
import sys
import time

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))

_QWEN2 = {
    "architectures": ["Qwen2ForCausalLM"], "model_type": "qwen2", "hidden_act": "silu", "rms_norm_eps": 1e-6,
    "rope_theta": 1000000.0, "use_sliding_window": False, "bos_token_id": 151643, "eos_token_id": 151643,
    "initializer_range": 0.02, "use_cache": True,
}
MODELS = {
    "qwen2-0.5b": {**_QWEN2, "vocab_size": 151936, "hidden_size": 896, "intermediate_size": 4864,
                   "num_hidden_layers": 24, "num_attention_heads": 14, "num_key_value_heads": 2,
                   "max_position_embeddings": 131072, "sliding_window": 131072, "max_window_layers": 24,
                   "tie_word_embeddings": True},
    "qwen2-1.5b": {**_QWEN2, "vocab_size": 151936, "hidden_size": 1536, "intermediate_size": 8960,
                   "num_hidden_layers": 28, "num_attention_heads": 12, "num_key_value_heads": 2,
                   "max_position_embeddings": 131072, "sliding_window": 131072, "max_window_layers": 28,
                   "tie_word_embeddings": True},
    "qwen2-7b": {**_QWEN2, "vocab_size": 152064, "hidden_size": 3584, "intermediate_size": 18944,
                 "num_hidden_layers": 28, "num_attention_heads": 28, "num_key_value_heads": 4,
                 "max_position_embeddings": 131072, "sliding_window": 131072, "max_window_layers": 28,
                 "tie_word_embeddings": False},
}
DTYPES = {"bf16": ("bfloat16", "BF16"), "fp32": ("float32", "F32")}
GENERATION = {"bos_token_id": 151643, "eos_token_id": [151645, 151643], "do_sample": True, "temperature": 0.7}


def hf_entries(config: dict) -> list[tuple[str, tuple[int, ...]]]:
    """(name, shape) of every tensor of the Hugging Face folder, in transformers' order (embeddings, layers, rest)."""
    sys.path.insert(0, REPO)
    from qwen_jax.config import config_from_dict
    from qwen_jax.hf.models import abstract_model, flat_paths
    from qwen_jax.hf.names import hf_names, hf_shape, param_table

    cfg = config_from_dict(config)
    abstract = flat_paths(abstract_model(cfg)[1])
    entries = []
    for spec in param_table(cfg):
        shape = tuple(abstract[spec.path].shape)
        entries += [(name, hf_shape(spec, shape[1:] if spec.stacked else shape))
                    for name in hf_names(spec, cfg.num_hidden_layers)]
    return sorted(entries, key=lambda e: _layer_key(e[0]))


def _layer_key(name: str):
    parts = name.split(".")
    if len(parts) > 2 and parts[1] == "layers":
        return (1, int(parts[2]), name)
    return (0 if "embed" in name else 2, 0, name)


def random_tensor(rng, shape, dtype: str):
    """Finite values with weight-like statistics (random sign and mantissa, a few exponents)."""
    import ml_dtypes
    import numpy as np

    if dtype == "bfloat16":
        bits = rng.integers(0, 1 << 16, size=shape, dtype=np.uint16)
        return ((bits & 0x80FF) | 0x3C00).view(ml_dtypes.bfloat16)  # |x| in [2^-7, 2^-5)
    return (rng.standard_normal(size=shape, dtype=np.float32) * np.float32(0.02))


def make_source(folder: str, config: dict, dtype: str, shard_bytes: int = 5 * 10**9) -> int:
    """Random tensors written shard by shard with `safetensors.numpy.save_file`; returns total bytes."""
    import numpy as np
    from safetensors.numpy import save_file

    itemsize = 2 if dtype == "bfloat16" else 4
    shards, current, size = [], [], 0
    for name, shape in hf_entries(config):
        n = int(np.prod(shape)) * itemsize
        if current and size + n > shard_bytes:
            shards.append(current)
            current, size = [], 0
        current.append((name, shape))
        size += n
    shards.append(current)
    os.makedirs(folder, exist_ok=True)
    rng = np.random.default_rng(0)
    weight_map, total = {}, 0
    for si, shard in enumerate(shards):
        fname = f"model-{si + 1:05d}-of-{len(shards):05d}.safetensors"
        tensors = {name: random_tensor(rng, shape, dtype) for name, shape in shard}
        save_file(tensors, os.path.join(folder, fname), metadata={"format": "pt"})
        weight_map.update({name: fname for name in tensors})
        total += sum(t.nbytes for t in tensors.values())
        del tensors
    with open(os.path.join(folder, "model.safetensors.index.json"), "w") as f:
        json.dump({"metadata": {"total_size": total}, "weight_map": weight_map}, f, indent=2)
    with open(os.path.join(folder, "config.json"), "w") as f:
        json.dump({**config, "torch_dtype": dtype}, f, indent=2)
    with open(os.path.join(folder, "generation_config.json"), "w") as f:
        json.dump(GENERATION, f, indent=2)
    return total


# Child programs: each prints one line "RESULT <json>": seconds and CPU seconds of the timed call, and the
# child's own peak RSS (VmHWM; wait4's ru_maxrss would also count the pages of the parent it was forked from).
PEAK_RSS = """
def peak_rss_gib():
    with open("/proc/self/status") as f:
        return next(int(line.split()[1]) for line in f if line.startswith("VmHWM:")) / 2**20
"""
QWEN_CONVERT = PEAK_RSS + """
import json, sys, time
sys.path.insert(0, sys.argv[1])
import orbax.checkpoint, tensorstore  # imports outside the timed call, as torch for transformers
from qwen_jax import checkpoint_format
from qwen_jax.hf import convert
t, c = time.perf_counter(), time.process_time()
code = convert.main(sys.argv[2:])
print("RESULT " + json.dumps({"seconds": time.perf_counter() - t, "cpu_s": time.process_time() - c,
                             "peak_rss_gib": peak_rss_gib()}), flush=True)
sys.exit(code)
"""

TRAINER_CHECKPOINT = PEAK_RSS + """
import json, os, sys, time
sys.path.insert(0, sys.argv[1])
import jax, orbax.checkpoint as ocp
from qwen_jax import checkpoint_format as cf
params = jax.tree.map(jax.numpy.asarray, cf.restore_params(sys.argv[2]))
options = ocp.CheckpointManagerOptions(enable_async_checkpointing=False, create=True)
t, c = time.perf_counter(), time.process_time()
with ocp.CheckpointManager(sys.argv[3], options=options) as mngr:
    save = ocp.args.StandardSave(params, save_args=cf.params_save_args(params))  # as the trainer saves
    mngr.save(1, args=ocp.args.Composite(params=save))
    mngr.wait_until_finished()
for name in os.listdir(sys.argv[2]):
    if not name.isdigit():
        os.link(os.path.join(sys.argv[2], name), os.path.join(sys.argv[3], name))
print("RESULT " + json.dumps({"seconds": time.perf_counter() - t, "cpu_s": time.process_time() - c,
                             "peak_rss_gib": peak_rss_gib()}), flush=True)
"""

TRANSFORMERS_LOAD = PEAK_RSS + """
import json, sys, time, torch, transformers
t, c = time.perf_counter(), time.process_time()
m = transformers.AutoModelForCausalLM.from_pretrained(sys.argv[1], dtype=getattr(torch, sys.argv[2]))
print("RESULT " + json.dumps({"seconds": time.perf_counter() - t, "cpu_s": time.process_time() - c,
                             "peak_rss_gib": peak_rss_gib()}), flush=True)
"""

TRANSFORMERS_SAVE = PEAK_RSS + """
import json, sys, time, torch, transformers
m = transformers.AutoModelForCausalLM.from_pretrained(sys.argv[1], dtype=getattr(torch, sys.argv[2]))
t, c = time.perf_counter(), time.process_time()
m.save_pretrained(sys.argv[3])
print("RESULT " + json.dumps({"seconds": time.perf_counter() - t, "cpu_s": time.process_time() - c,
                             "peak_rss_gib": peak_rss_gib()}), flush=True)
"""

CHECK_IDENTICAL = """
import sys
sys.path.insert(0, sys.argv[3])
from qwen_jax.hf.safetensors_io import TensorReader
a, b = TensorReader(sys.argv[1]), TensorReader(sys.argv[2])
assert set(a.files) == set(b.files), sorted(set(a.files) ^ set(b.files))
for n in sorted(a.files):
    x, y = a.read(n), b.read(n)
    assert x.dtype == y.dtype and x.shape == y.shape and x.tobytes() == y.tobytes(), n
print(f"bit-identical: all {len(a.files)} tensors", flush=True)
"""


def measure(label: str, program: str, args: list[str], nbytes: int | None) -> dict:
    """Run a child program; its timed seconds, GB/s over `nbytes`, and its own peak RSS."""
    cmd = [sys.executable, "-c", program, *args]
    print(f"[{label}] {' '.join(args)}", flush=True)
    t0 = time.perf_counter()
    proc = subprocess.Popen(cmd, cwd=REPO, stdout=subprocess.PIPE, text=True,
                            env={**os.environ, "JAX_PLATFORMS": "cpu", "PYTHONPATH": REPO})
    out = proc.stdout.read()
    code = proc.wait()
    wall = time.perf_counter() - t0
    if code != 0:
        raise SystemExit(f"{label} failed with exit status {code}:\n{out[-4000:]}")
    timed = json.loads([line for line in out.splitlines() if line.startswith("RESULT ")][-1][len("RESULT "):])
    row = {"step": label, "seconds": round(timed["seconds"], 2), "cpu_s": round(timed["cpu_s"], 2),
           "process_wall_s": round(wall, 1),
           "gb_per_s": round(nbytes / 1e9 / timed["seconds"], 3) if nbytes else None,
           "peak_rss_gib": round(timed["peak_rss_gib"], 2)}
    print(f"[{label}] {row}", flush=True)
    return row


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--model", default="qwen2-0.5b", choices=sorted(MODELS))
    p.add_argument("--dtype", default="bf16", choices=sorted(DTYPES))
    p.add_argument("--workdir", default="/tmp/convert_bench")
    p.add_argument("--keep", action="store_true", help="keep the folders afterwards")
    p.add_argument("--skip_transformers", action="store_true")
    args = p.parse_args()
    config, dtype = MODELS[args.model], DTYPES[args.dtype][0]
    work = os.path.abspath(args.workdir)
    shutil.rmtree(work, ignore_errors=True)
    os.makedirs(work)
    hf, ox, out, trainer, out2, tf = (os.path.join(work, n) for n in
                                      ("hf", "orbax", "hf_out", "trainer_ckpt", "hf_out_trainer", "tf_out"))
    rows = []
    try:
        t0 = time.perf_counter()
        total = make_source(hf, config, dtype)
        largest = max(int(__import__("math").prod(s)) for _, s in hf_entries(config)) * (2 if args.dtype == "bf16"
                                                                                           else 4)
        print(f"source: {total / 1e9:.2f} GB in {time.perf_counter() - t0:.1f}s; largest tensor "
              f"{largest / 2**30:.2f} GiB", flush=True)
        rows.append(measure("qwen-convert hf-to-orbax", QWEN_CONVERT,
                            [REPO, "hf-to-orbax", "--hf_dir", hf, "--out_dir", ox], total))
        rows.append(measure("qwen-convert orbax-to-hf", QWEN_CONVERT,
                            [REPO, "orbax-to-hf", "--ckpt", ox, "--out_dir", out], total))
        subprocess.run([sys.executable, "-c", CHECK_IDENTICAL, hf, out, REPO], check=True)
        shutil.rmtree(out)
        rows.append(measure("trainer-style StandardSave (setup)", TRAINER_CHECKPOINT, [REPO, ox, trainer], total))
        shutil.rmtree(ox)
        rows.append(measure("qwen-convert orbax-to-hf (trainer checkpoint)", QWEN_CONVERT,
                            [REPO, "orbax-to-hf", "--ckpt", trainer, "--out_dir", out2], total))
        subprocess.run([sys.executable, "-c", CHECK_IDENTICAL, hf, out2, REPO], check=True)
        shutil.rmtree(out2)
        shutil.rmtree(trainer)
        if not args.skip_transformers:
            rows.append(measure("transformers from_pretrained", TRANSFORMERS_LOAD, [hf, dtype], total))
            rows.append(measure("transformers save_pretrained", TRANSFORMERS_SAVE, [hf, dtype, tf], total))
            shutil.rmtree(tf, ignore_errors=True)
    finally:
        if not args.keep:
            shutil.rmtree(work, ignore_errors=True)
    result = {
        "model": f"{args.model} shape, random {dtype}", "source_bytes": total, "largest_tensor_bytes": largest,
        "command": " ".join(["python", "benchmarks/convert_speed.py", *sys.argv[1:]]),
        "date": time.strftime("%Y-%m-%d", time.gmtime()),
        "machine": {"node": platform.node(), "cpus": os.cpu_count(), "python": platform.python_version(),
                    "mem_gib": round(os.sysconf("SC_PAGE_SIZE") * os.sysconf("SC_PHYS_PAGES") / 2**30, 1)},
        "load_average_1min_at_end": round(os.getloadavg()[0], 1),
        "rows": rows,
    }
    os.makedirs(os.path.join(REPO, "benchmarks", "results"), exist_ok=True)
    path = os.path.join(REPO, "benchmarks", "results", f"convert_speed_{args.model}_{args.dtype}.json")
    with open(path, "w") as f:
        json.dump(result, f, indent=2)
        f.write("\n")
    print(f"\n{result['model']}: {total / 1e9:.2f} GB, largest tensor {largest / 2**30:.2f} GiB "
          f"(RSS bound 2x + 1 GiB = {2 * largest / 2**30 + 1:.2f} GiB)")
    print(f"load average at the end: {os.getloadavg()[0]:.1f} on {os.cpu_count()} CPUs")
    print(f"{'step':48s} {'s':>7s} {'CPU s':>7s} {'GB/s':>7s} {'peak RSS GiB':>13s}")
    for r in rows:
        gbs = "-" if r["gb_per_s"] is None else f"{r['gb_per_s']:.2f}"
        print(f"{r['step']:48s} {r['seconds']:7.2f} {r['cpu_s']:7.2f} {gbs:>7s} {r['peak_rss_gib']:13.2f}")
    print(f"wrote {path}")


if __name__ == "__main__":
    main()
