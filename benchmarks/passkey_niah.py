"""Passkey retrieval past the trained window: train a small model at one length, evaluate at 1x to 4x it.

    bash benchmarks/gpu_setup.sh && python benchmarks/passkey_niah.py --out benchmarks/results/passkey_niah
    python benchmarks/passkey_niah.py --tiny --out /tmp/passkey_tiny        # CPU smoke test (minutes, not accuracy)

1. `python -m qwen_jax.train --config=configs/passkey.py` (`:tiny` with --tiny) into `--workdir`: a small Qwen2
   learns the passkey task (qwen_jax/data/passkey.py) at the train length L (1024; tiny 128).
2. `python -m qwen_jax.evals.niah --task passkey` on its Hugging Face export at lengths L..4L x depths, three ways:
   * plain: the model as trained (default RoPE, positions beyond L never seen);
   * yarn:  `--rope_scaling yarn:4` (original length = L, the model's max_position_embeddings);
   * dca:   `--dca chunk=L` (Dual Chunk Attention, local window L // 8: no relative distance above L).
3. Writes into `--out`: `passkey_niah.md` (accuracy per mode x length, averaged over depths), `passkey_<mode>.png`
   (depth x length heatmaps), `<mode>/niah.json` (every trial's reply) and `train.log`.  Progress on stdout.
   The checkpoints stay in `--workdir` (default: a new temporary folder), out of `--out`.

The GPU defaults fit one 600 s call on one H200 with setup and compilation.  Bad input: one line `error: ...`, exit 2.
"""

from __future__ import annotations

import json
import os
import shlex
import shutil
import subprocess
import sys
import tempfile
import time

ROOT = os.path.abspath(os.path.join(os.path.dirname(__file__), ".."))
sys.path.insert(0, ROOT)
from qwen_jax.atomic import atomic_write_text  # noqa: E402
from qwen_jax.cli import Parser, UsageError  # noqa: E402  (the repository root on sys.path)

MODES = ("plain", "yarn", "dca")
GPU = {"train_length": 1024, "depths": "0,0.25,0.5,0.75,1", "trials": 8, "config": "configs/passkey.py"}
TINY = {"train_length": 128, "depths": "0,1", "trials": 1, "config": "configs/passkey.py:tiny"}


def mode_flags(mode: str, train_length: int) -> list[str]:
    """The niah flags of one evaluation mode."""
    return {"plain": [], "yarn": ["--rope_scaling", "yarn:4"], "dca": ["--dca", f"chunk={train_length}"]}[mode]


def train(config: str, workdir: str, steps: int | None, extra: list[str], log_path: str) -> None:
    """Runs the trainer as a user would, its output echoed and kept in `log_path`."""
    cmd = [sys.executable, "-m", "qwen_jax.train", f"--config={config}", f"--workdir={workdir}"]
    if steps is not None:
        cmd += [f"--config.total_steps={steps}", f"--config.save_every={steps}"]
    cmd += extra
    env = {**os.environ, "PYTHONPATH": ROOT + os.pathsep + os.environ.get("PYTHONPATH", "")}
    print("$ " + shlex.join(cmd), flush=True)
    with open(log_path, "w") as log:
        proc = subprocess.Popen(cmd, cwd=ROOT, env=env, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)
        for line in proc.stdout:
            log.write(line)
            if line.startswith(("step ", "eval", "done", "exported", "error", "Traceback")) or "Error" in line:
                print("  train: " + line.rstrip(), flush=True)
        if proc.wait():
            raise SystemExit(f"training failed (exit {proc.returncode}); see {log_path}")


def evaluate(model: str, mode: str, *, train_length: int, lengths: list[int], depths: str, trials: int,
             out: str) -> dict:
    """One `qwen_jax.evals.niah` run (in this process: jax starts once); its niah.json."""
    from qwen_jax.evals import niah

    folder = os.path.join(out, mode)
    argv = ["--model", model, "--task", "passkey", "--lengths", ",".join(map(str, lengths)), "--depths", depths,
            "--trials", str(trials), "--out", folder, "--title", f"passkey, trained at {train_length}: {mode}",
            *mode_flags(mode, train_length)]
    print(f"$ python -m qwen_jax.evals.niah {shlex.join(argv)}", flush=True)
    if niah.main(argv):
        raise SystemExit(f"niah failed for mode {mode}")
    shutil.copyfile(os.path.join(folder, "niah.png"), os.path.join(out, f"passkey_{mode}.png"))
    with open(os.path.join(folder, "niah.json")) as f:
        return json.load(f)


def table(results: dict[str, dict], train_length: int) -> str:
    """Markdown: one row per mode, one column per length, accuracy averaged over depths (and trials)."""
    lengths = next(iter(results.values()))["lengths"]
    head = "| mode | " + " | ".join(f"{n} ({n / train_length:g}x)" for n in lengths) + " |"
    rows = [head, "| --- |" + " ---: |" * len(lengths)]
    for mode, r in results.items():
        means = [sum(col) / len(col) for col in zip(*r["accuracy"], strict=True)]
        rows.append(f"| {mode} | " + " | ".join(f"{100 * m:.0f}%" for m in means) + " |")
    return "\n".join(rows) + "\n"


def main(argv: list[str] | None = None) -> int:
    p = Parser(description=__doc__.split("\n\n")[0])
    p.add_argument("--tiny", action="store_true", help="CPU smoke test: tiny model, 128-token training, 2 steps")
    p.add_argument("--out", required=True, help="folder for the table, heatmaps and niah.json files")
    p.add_argument("--workdir", default=None,
                   help="training run folder, checkpoints and hf_export (default: a new temporary folder)")
    p.add_argument("--steps", type=int, default=None, help="training steps (default: the config's)")
    p.add_argument("--train_arg", action="append", default=[],
                   help="extra trainer flag, repeatable (e.g. --train_arg=--config.optimizer.learning_rate=2e-3)")
    p.add_argument("--skip_train", action="store_true", help="evaluate the existing <workdir>/hf_export")
    p.add_argument("--trials", type=int, default=None, help="prompts per (length, depth) cell")
    try:
        args = p.parse_args(argv)
    except UsageError as e:
        print(f"error: {e}", file=sys.stderr)
        return 2
    preset = TINY if args.tiny else GPU
    steps = 2 if args.tiny and args.steps is None else args.steps
    trials = args.trials or preset["trials"]
    for bad, why in ((steps is not None and steps < 1, "--steps must be >= 1"), (trials < 1, "--trials must be >= 1"),
                     (os.path.exists(args.out) and not os.path.isdir(args.out), f"--out {args.out}: not a folder")):
        if bad:
            print(f"error: {why}", file=sys.stderr)
            return 2
    out = os.path.abspath(args.out)
    if args.skip_train and not (args.workdir and os.path.isdir(os.path.join(args.workdir, "hf_export"))):
        print(f"error: --skip_train needs --workdir of a finished run (with hf_export), got {args.workdir!r}",
              file=sys.stderr)
        return 2
    workdir = os.path.abspath(args.workdir or tempfile.mkdtemp(prefix="passkey_niah_"))
    model = os.path.join(workdir, "hf_export")
    os.makedirs(out, exist_ok=True)
    t0 = time.perf_counter()
    L = preset["train_length"]
    if not args.skip_train:
        train(preset["config"], workdir, steps, args.train_arg, os.path.join(out, "train.log"))
        print(f"trained in {time.perf_counter() - t0:.0f}s", flush=True)
    lengths = [L, 2 * L, 3 * L, 4 * L]
    results = {}
    for mode in MODES:
        results[mode] = evaluate(model, mode, train_length=L, lengths=lengths, depths=preset["depths"],
                                 trials=trials, out=out)
        print(f"{mode} done at {time.perf_counter() - t0:.0f}s", flush=True)
    text = (f"Passkey accuracy (% of {trials} trials x {len(preset['depths'].split(','))} depths per cell), "
            f"model trained at {L} tokens ({preset['config']}):\n\n" + table(results, L))
    atomic_write_text(os.path.join(out, "passkey_niah.md"), text)
    print(text + f"\nwrote {out}/passkey_niah.md and passkey_{{{','.join(MODES)}}}.png in "
          f"{time.perf_counter() - t0:.0f}s", flush=True)
    return 0


if __name__ == "__main__":
    sys.exit(main())
