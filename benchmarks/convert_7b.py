"""Benchmark: convert a Qwen2-7B-shaped random bf16 checkpoint (~15 GB) both ways; compare with transformers.

    python benchmarks/convert_7b.py [--workdir /tmp/convert_bench] [--keep]

Steps, each in its own subprocess, with wall time and peak RSS (`os.wait4` rusage of that child):

1. write the random Hugging Face folder tensor by tensor (4 safetensors shards; no model in memory);
2. `qwen-convert hf-to-orbax`;
3. `qwen-convert orbax-to-hf` (then a sampled bit-identity check against the source);
4. transformers `AutoModelForCausalLM.from_pretrained(..., dtype=bfloat16)` + `save_pretrained` on the source.

Prints a table and writes benchmarks/results/convert_7b.json.  Needs ~50 GB of free disk
(source + Orbax + export + transformers export; each is deleted once no longer needed).
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

QWEN2_7B = {
    "architectures": ["Qwen2ForCausalLM"],
    "model_type": "qwen2",
    "vocab_size": 152064,
    "hidden_size": 3584,
    "intermediate_size": 18944,
    "num_hidden_layers": 28,
    "num_attention_heads": 28,
    "num_key_value_heads": 4,
    "hidden_act": "silu",
    "max_position_embeddings": 131072,
    "rms_norm_eps": 1e-6,
    "rope_theta": 1000000.0,
    "tie_word_embeddings": False,
    "use_sliding_window": False,
    "sliding_window": 131072,
    "max_window_layers": 28,
    "bos_token_id": 151643,
    "eos_token_id": 151643,
    "initializer_range": 0.02,
    "torch_dtype": "bfloat16",
    "use_cache": True,
}
GENERATION = {"bos_token_id": 151643, "eos_token_id": [151645, 151643], "do_sample": True, "temperature": 0.7}


def make_source(folder: str, shard_bytes: int = 5 * 10**9) -> int:
    """Random finite bf16 tensors, streamed into shards with our SafetensorsWriter; returns total bytes."""
    import ml_dtypes
    import numpy as np

    sys.path.insert(0, REPO)
    from qwen_jax.config import config_from_dict
    from qwen_jax.hf_io import SafetensorsWriter, abstract_model, flat_paths, hf_names, hf_shape, param_table

    cfg = config_from_dict(QWEN2_7B)
    _, state = abstract_model(cfg)
    abstract = flat_paths(state)
    entries = []
    for spec in param_table(cfg):
        shape = tuple(abstract[spec.path].shape)
        for name in hf_names(spec, cfg.num_hidden_layers):
            entries.append((name, hf_shape(spec, shape[1:] if spec.stacked else shape)))
    entries.sort(key=lambda e: _layer_key(e[0]))
    bf16 = np.dtype(ml_dtypes.bfloat16)
    shards, current, size = [], [], 0
    for name, shape in entries:
        n = int(np.prod(shape)) * 2
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
        writer = SafetensorsWriter(os.path.join(folder, fname), [(n, s, bf16) for n, s in shard])
        for name, shape in shard:
            rows = shape[0]
            step = max(1, (64 << 20) // max(1, int(np.prod(shape[1:])) * 2))
            for r in range(0, rows, step):
                part = (rows if len(shape) == 1 else min(step, rows - r),) + tuple(shape[1:])
                if len(shape) == 1 and r > 0:
                    break
                bits = rng.integers(0, 1 << 16, size=part, dtype=np.uint16)
                bits = (bits & 0x807F) | 0x3C00  # random sign and mantissa, exponent 2^-7: finite, small
                writer.write(name, bits.view(bf16))
            weight_map[name] = fname
            total += int(np.prod(shape)) * 2
        writer.close()
    with open(os.path.join(folder, "model.safetensors.index.json"), "w") as f:
        json.dump({"metadata": {"total_size": total}, "weight_map": weight_map}, f, indent=2)
    with open(os.path.join(folder, "config.json"), "w") as f:
        json.dump(QWEN2_7B, f, indent=2)
    with open(os.path.join(folder, "generation_config.json"), "w") as f:
        json.dump(GENERATION, f, indent=2)
    return total


def _layer_key(name: str):
    parts = name.split(".")
    if len(parts) > 2 and parts[1] == "layers":
        return (1, int(parts[2]), name)
    return (0 if "embed" in name else 2, 0, name)


def measure(cmd: list[str], label: str) -> dict:
    """Run cmd; wall seconds and peak RSS (GiB) of that child alone (os.wait4)."""
    print(f"[{label}] {' '.join(cmd)}", flush=True)
    t0 = time.perf_counter()
    proc = subprocess.Popen(cmd, cwd=REPO, env={**os.environ, "JAX_PLATFORMS": "cpu", "PYTHONPATH": REPO})
    _, status, usage = os.wait4(proc.pid, 0)
    wall = time.perf_counter() - t0
    code = os.waitstatus_to_exitcode(status)
    if code != 0:
        raise SystemExit(f"{label} failed with exit status {code}")
    result = {"step": label, "wall_s": round(wall, 1), "peak_rss_gib": round(usage.ru_maxrss / 2**20, 2)}
    print(f"[{label}] {result}", flush=True)
    return result


TRANSFORMERS_ROUNDTRIP = """
import sys, time, torch, transformers
t = time.perf_counter()
m = transformers.AutoModelForCausalLM.from_pretrained(sys.argv[1], dtype=torch.bfloat16)
t_load = time.perf_counter() - t
t = time.perf_counter()
m.save_pretrained(sys.argv[2])
print(f"transformers load {t_load:.1f}s save {time.perf_counter() - t:.1f}s", flush=True)
"""

CHECK_IDENTICAL = """
import sys
sys.path.insert(0, sys.argv[3])
from qwen_jax.hf_io import TensorReader
a, b = TensorReader(sys.argv[1]), TensorReader(sys.argv[2])
assert set(a.files) == set(b.files), sorted(set(a.files) ^ set(b.files))
names = sorted(a.files)
sample = [n for n in names if "layers" not in n] + [n for n in names if ".layers.27." in n or ".layers.0." in n]
for n in sample:
    x, y = a.read(n), b.read(n)
    assert x.dtype == y.dtype and x.shape == y.shape and x.tobytes() == y.tobytes(), n
print(f"bit-identical: {len(sample)} sampled tensors of {len(names)}", flush=True)
"""


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--workdir", default="/tmp/convert_bench")
    p.add_argument("--keep", action="store_true", help="keep the big folders afterwards")
    p.add_argument("--skip_transformers", action="store_true")
    args = p.parse_args()
    work = args.workdir
    shutil.rmtree(work, ignore_errors=True)
    os.makedirs(work)
    hf, ox, out, tf = (os.path.join(work, n) for n in ("hf", "orbax", "hf_out", "tf_out"))
    py = sys.executable
    rows = []
    try:
        t0 = time.perf_counter()
        total = make_source(hf)
        rows.append({"step": "make random source", "wall_s": round(time.perf_counter() - t0, 1),
                     "peak_rss_gib": None})
        print(f"source: {total / 1e9:.2f} GB", flush=True)
        rows.append(measure([py, "-m", "tools.convert", "hf-to-orbax", "--hf_dir", hf, "--out_dir", ox],
                            "qwen-convert hf-to-orbax"))
        rows.append(measure([py, "-m", "tools.convert", "orbax-to-hf", "--ckpt", ox, "--out_dir", out],
                            "qwen-convert orbax-to-hf"))
        subprocess.run([py, "-c", CHECK_IDENTICAL, hf, out, REPO], check=True)
        shutil.rmtree(out)
        shutil.rmtree(ox)
        if not args.skip_transformers:
            rows.append(measure([py, "-c", TRANSFORMERS_ROUNDTRIP, hf, tf],
                                "transformers from_pretrained + save_pretrained"))
            shutil.rmtree(tf, ignore_errors=True)
    finally:
        if not args.keep:
            shutil.rmtree(work, ignore_errors=True)
    result = {
        "model": "Qwen2-7B shape, random bf16", "source_bytes": total,
        "machine": {"cpus": os.cpu_count(), "mem_gib": round(os.sysconf("SC_PAGE_SIZE") * os.sysconf("SC_PHYS_PAGES")
                                                             / 2**30, 1), "python": platform.python_version()},
        "rows": rows,
    }
    os.makedirs(os.path.join(REPO, "benchmarks", "results"), exist_ok=True)
    with open(os.path.join(REPO, "benchmarks", "results", "convert_7b.json"), "w") as f:
        json.dump(result, f, indent=2)
    print(f"\n{'step':50s} {'wall s':>8s} {'peak RSS GiB':>13s}")
    for r in rows:
        rss = "-" if r["peak_rss_gib"] is None else f"{r['peak_rss_gib']:.2f}"
        print(f"{r['step']:50s} {r['wall_s']:8.1f} {rss:>13s}")


if __name__ == "__main__":
    main()
