"""Long-context retrieval: passkey and needle-in-a-haystack over a grid of lengths x depths.

    python -m qwen_jax.evals.niah --model DIR|CKPT [--step N] [--task passkey|needle]
        [--lengths 1024,2048,4096] [--depths 0,0.25,0.5,0.75,1] [--trials 4] [--seed 0]
        [--chat] [--dtype float32|bfloat16] [--rope_scaling yarn:FACTOR[:ORIGINAL] | --dca chunk=N[,local=M]]
        [--title TEXT] --out DIR

* passkey (Mohtashami & Jaggi 2023): a random 5-digit key hidden in repeated filler
  ("The grass is green. The sky is blue. ..."); the model must continue
  "What is the pass key? The pass key is" with the key.
* needle: a "special magic number" sentence hidden in varied synthetic filler, asked for the same way.

For each (length, depth) cell, `--trials` prompts of `length` tokens (the needle's first token
at `depth` of the haystack) are generated greedily in one batch; a trial succeeds when the
reply contains the key.  Writes `<out>/niah.json` (grid of accuracies, every trial's reply)
and `<out>/niah.png` (heatmap: depth x length); a progress line per cell on stderr.  With
`--chat` the prompt is one user turn in the tokenizer's chat template.  Bad input: one line
`error: ...`, exit 2.  YaRN / DCA are whatever the model folder's config.json says, unless overridden:

* `--rope_scaling yarn:4` (or `linear:F`, `dynamic:F`): that RoPE scaling with factor F; YaRN's original length
  is the third field, else the model's `max_position_embeddings` (the length it was trained at).
* `--dca chunk=N[,local=M][,original=L0]`: Dual Chunk Attention (docs/long_context.md §DCA) with chunk size N,
  local window M (default N // 8) and, when L0 is given, its length-dependent temperature.
"""

from __future__ import annotations

import io
import json
import os
import sys
import time

import numpy as np

from qwen_jax.atomic import atomic_write_json, atomic_write_text
from qwen_jax.cli import Parser, UsageError, load_model
from qwen_jax.evals.prompts import TASKS, build_prompt


def run_grid(model, tok, *, task: str, lengths, depths, trials: int, seed: int, chat: bool, log=sys.stderr) -> dict:
    from qwen_jax.generation import generate

    rng = np.random.default_rng(seed)
    acc = np.zeros((len(depths), len(lengths)))
    cells = []
    t0 = time.perf_counter()
    for j, length in enumerate(lengths):
        for i, depth in enumerate(depths):
            keys = rng.integers(10000, 100000, trials).tolist()
            prompts = [build_prompt(tok, task, length, depth, k, chat=chat) for k in keys]
            replies = generate(model, prompts, max_new_tokens=8, stop_ids=[])
            texts = [tok.decode(r, skip_special_tokens=True) for r in replies]
            hits = [str(k) in t for k, t in zip(keys, texts, strict=True)]
            acc[i, j] = float(np.mean(hits))
            cells.append({"length": length, "depth": depth, "keys": keys, "replies": texts, "accuracy": acc[i, j]})
            done = j * len(depths) + i + 1
            print(f"niah {task}: length {length} depth {depth:.2f}: {100 * acc[i, j]:.0f}% "
                  f"[{done}/{len(lengths) * len(depths)}, {time.perf_counter() - t0:.0f}s]", file=log, flush=True)
    return {"task": task, "lengths": list(lengths), "depths": list(depths), "trials": trials,
            "accuracy": acc.tolist(), "cells": cells}


def heatmap_png(result: dict, title: str) -> bytes:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    acc = np.asarray(result["accuracy"])
    fig, ax = plt.subplots(figsize=(1.2 + 0.9 * acc.shape[1], 1.0 + 0.5 * acc.shape[0]))
    im = ax.imshow(acc, vmin=0, vmax=1, cmap="RdYlGn", aspect="auto")
    ax.set_xticks(range(acc.shape[1]), [str(x) for x in result["lengths"]])
    ax.set_yticks(range(acc.shape[0]), [f"{d:.0%}" for d in result["depths"]])
    ax.set_xlabel("context length (tokens)")
    ax.set_ylabel("needle depth")
    ax.set_title(title, fontsize=9)
    for (i, j), v in np.ndenumerate(acc):
        ax.text(j, i, f"{v:.0%}", ha="center", va="center", fontsize=7)
    fig.colorbar(im, ax=ax, fraction=0.05)
    fig.tight_layout()
    buf = io.BytesIO()
    fig.savefig(buf, format="png", dpi=120)
    plt.close(fig)
    return buf.getvalue()


def _ints(text: str, flag: str) -> list[int]:
    try:
        values = [int(x) for x in text.split(",") if x.strip()]
    except ValueError:
        raise UsageError(f"{flag} {text!r}: expected comma-separated integers") from None
    if not values or min(values) < 16:
        raise UsageError(f"{flag} {text!r}: need lengths >= 16")
    return values


def _fractions(text: str) -> list[float]:
    try:
        values = [float(x) for x in text.split(",") if x.strip()]
    except ValueError:
        raise UsageError(f"--depths {text!r}: expected comma-separated numbers") from None
    if not values or not all(0 <= v <= 1 for v in values):
        raise UsageError(f"--depths {text!r}: depths are fractions in [0, 1]")
    return values


def rope_override(text: str) -> dict:
    """`--rope_scaling KIND:FACTOR[:ORIGINAL]` as `QwenConfig` overrides."""
    kind, _, rest = text.partition(":")
    factor_text, _, original_text = rest.partition(":")
    if kind not in ("linear", "dynamic", "yarn"):
        raise UsageError(f"--rope_scaling {text!r}: expected linear|dynamic|yarn:FACTOR (e.g. yarn:4)")
    try:
        factor = float(factor_text)
        original = int(original_text) if original_text else None
    except ValueError:
        raise UsageError(f"--rope_scaling {text!r}: expected {kind}:FACTOR[:ORIGINAL] with a number FACTOR "
                         "and an integer ORIGINAL") from None
    if not factor >= 1:
        raise UsageError(f"--rope_scaling {text!r}: FACTOR must be >= 1")
    if original is not None and (kind != "yarn" or original < 1):
        raise UsageError(f"--rope_scaling {text!r}: ORIGINAL is a positive length, for yarn only")
    rope = {"rope_type": kind, "factor": factor}
    if original is not None:
        rope["original_max_position_embeddings"] = original
    return {"rope_parameters": rope}


def dca_override(text: str) -> dict:
    """`--dca chunk=N[,local=M][,original=L0]` as `QwenConfig` overrides."""
    fields = {}
    for item in text.split(","):
        key, eq, value = item.strip().partition("=")
        if key not in ("chunk", "local", "original") or not eq or key in fields:
            raise UsageError(f"--dca {text!r}: expected chunk=N[,local=M][,original=L0]")
        try:
            fields[key] = int(value)
        except ValueError:
            raise UsageError(f"--dca {text!r}: {key} must be an integer, got {value!r}") from None
    if "chunk" not in fields:
        raise UsageError(f"--dca {text!r}: chunk=N is required")
    chunk, local = fields["chunk"], fields.get("local", fields["chunk"] // 8)
    if not 0 <= local < chunk:
        raise UsageError(f"--dca {text!r}: need 0 <= local < chunk")
    if fields.get("original", 0) < 0:
        raise UsageError(f"--dca {text!r}: original must be >= 0")
    return {"dual_chunk_attention": {"chunk_size": chunk, "local_size": local,
                                     "original_max_position_embeddings": fields.get("original", 0)}}


def frozen(overrides: dict) -> dict:
    """Dict-valued config fields as the sorted item tuples `QwenConfig` holds (it is a jit static argument)."""
    return {k: None if v is None else tuple(sorted(v.items())) for k, v in overrides.items()}


def trained_length(model_dir: str) -> int:
    """`max_position_embeddings` of the folder's (or checkpoint dir's) config.json: YaRN's default original."""
    from qwen_jax.config import ConfigError, load_hf_config

    try:
        return load_hf_config(model_dir).max_position_embeddings
    except ConfigError as e:
        raise UsageError(f"--model {model_dir}: {e}") from None


def main(argv: list[str] | None = None) -> int:
    p = Parser(prog="python -m qwen_jax.evals.niah", description="Passkey / needle retrieval over lengths x depths.")
    p.add_argument("--model", required=True)
    p.add_argument("--step", type=int, default=None)
    p.add_argument("--task", choices=tuple(TASKS), default="passkey")
    p.add_argument("--lengths", default="1024,2048,4096")
    p.add_argument("--depths", default="0,0.25,0.5,0.75,1")
    p.add_argument("--trials", type=int, default=4)
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--chat", action="store_true")
    p.add_argument("--dtype", default="float32", choices=("float32", "bfloat16"))
    p.add_argument("--rope_scaling", default=None, help="override the RoPE scaling: yarn:FACTOR[:ORIGINAL], ...")
    p.add_argument("--dca", default=None, help="override with Dual Chunk Attention: chunk=N[,local=M][,original=L0]")
    p.add_argument("--title", default=None, help="heatmap title (default: the task and the model folder)")
    p.add_argument("--out", required=True, help="folder for niah.json and niah.png")
    try:
        args = p.parse_args(argv)
        lengths, depths = _ints(args.lengths, "--lengths"), _fractions(args.depths)
        if args.trials < 1:
            raise UsageError("--trials must be >= 1")
        if os.path.exists(args.out) and not os.path.isdir(args.out):
            raise UsageError(f"--out {args.out}: not a folder")
        if args.rope_scaling and args.dca:
            raise UsageError("--rope_scaling and --dca are alternatives (DCA keeps the default RoPE frequencies)")
        overrides = {}
        if args.rope_scaling:
            overrides = rope_override(args.rope_scaling)
            rope = overrides["rope_parameters"]
            if rope["rope_type"] == "yarn" and "original_max_position_embeddings" not in rope:
                if not os.path.isdir(args.model):
                    raise UsageError(f"--model {args.model}: not a directory")
                rope["original_max_position_embeddings"] = trained_length(args.model)
            overrides["dual_chunk_attention"] = None  # the scaling alone, whatever the folder says
        elif args.dca:
            overrides = dca_override(args.dca)
        model, tok = load_model(args.model, args.step, args.dtype, tokenizer=True, **frozen(overrides))
    except UsageError as e:
        print(f"error: {e}", file=sys.stderr)
        return 2
    result = run_grid(model, tok, task=args.task, lengths=lengths, depths=depths, trials=args.trials, seed=args.seed,
                      chat=args.chat)
    result["model"] = os.path.abspath(args.model)
    result["overrides"] = overrides
    os.makedirs(args.out, exist_ok=True)
    atomic_write_json(os.path.join(args.out, "niah.json"), result)
    title = args.title or f"{args.task}: {os.path.basename(os.path.abspath(args.model))}"
    atomic_write_text(os.path.join(args.out, "niah.png"), heatmap_png(result, title))
    print(json.dumps({"accuracy": result["accuracy"], "lengths": lengths, "depths": depths}))
    return 0


if __name__ == "__main__":
    sys.exit(main())
