"""Held-out loss and perplexity: during training (`Evaluator`) and from the command line.

Training: `config.eval` names held-out `sources` (same form as `data.sources`), `every` (steps;
0 = off) and `batches`.  `make_evaluator` builds a second data pipeline over those sources
(not shuffled, same tokenizer, sequence length and batch size as training) and every call
reads the *same* first `batches` batches again, so successive numbers are comparable.  The
loss is the trainer's own (`trainer.loss.model_loss_sums`: the fused chunked cross-entropy,
summed over loss tokens), divided by the number of loss tokens of all batches together:
`loss` = mean next-token NLL, `perplexity` = exp(loss).

Command line::

    python -m qwen_jax.evaluate --model DIR|CKPT [--step N] --data FILE.jsonl [--seq_len N]
        [--buckets 0,1024,2048,...] [--batch_size B] [--json OUT.json]

Each line of FILE.jsonl is a document: `{"text": ...}` (tokenized with the model folder's
tokenizer) or `{"input_ids": [...]}`.  A document is one row, cut to `--seq_len`, positions
from 0, every next token scored.  The report splits tokens by the *position of the predicted
token* into buckets `[b_i, b_i+1)`, so quality past the trained window (and with YaRN/DCA
set in the model's config.json) shows per bucket.  Bad input: one line `error: ...`, exit 2.
"""

from __future__ import annotations

import copy
import math
import os
import sys
from collections.abc import Iterable, Sequence

import jax
import jax.numpy as jnp
import numpy as np
from flax import nnx

from qwen_jax.atomic import atomic_write_json
from qwen_jax.cli import Parser, UsageError, load_model, read_jsonl
from qwen_jax.sharding import batch_sharding
from qwen_jax.trainer.loss import logsumexp_one_pass, model_loss_sums

EVAL_KEYS = ("input_ids", "positions", "segment_ids", "targets", "loss_mask")


# ---------------------------------------------------------------------------------------------- library


def loss_sums(graphdef, params, batch, *, chunk_size: int = 1024):
    """(NLL sum, loss-token count) of one batch dict, with the trainer's loss."""
    model = nnx.merge(graphdef, params)
    _, nll, _ = model_loss_sums(model, batch, chunk_size=chunk_size)
    return nll, jnp.sum(batch["loss_mask"].astype(jnp.float32))


def summarize(nll_sum: float, tokens: float) -> dict:
    """{"loss": mean NLL, "perplexity": exp(loss), "tokens": count}; NaN when there are no tokens."""
    loss = nll_sum / tokens if tokens > 0 else float("nan")
    return {"loss": loss, "perplexity": math.exp(loss) if loss < 700 else float("inf"), "tokens": tokens}


class Evaluator:
    """`evaluator(params) -> {"loss", "perplexity", "tokens"}` over the same `num_batches` batches each call.

    `make_batches()` returns a fresh iterator of per-process numpy batch dicts; global arrays are
    assembled with the batch sharding of `mesh` (as the training loop does).
    """

    def __init__(self, graphdef, make_batches, *, num_batches: int, mesh=None, chunk_size: int = 1024):
        self.make_batches, self.num_batches, self.mesh = make_batches, int(num_batches), mesh
        self._sums = jax.jit(lambda p, b: loss_sums(graphdef, p, b, chunk_size=chunk_size))

    def __call__(self, params) -> dict:
        nll, tokens = 0.0, 0.0
        batches = self.make_batches()
        for _ in range(self.num_batches):
            local = next(batches)
            if self.mesh is not None:
                shape = (local["input_ids"].shape[0] * jax.process_count(), local["input_ids"].shape[1])
                sharding = batch_sharding(self.mesh, 2, shape)
                batch = {k: jax.make_array_from_process_local_data(sharding, np.asarray(local[k])) for k in EVAL_KEYS}
                with jax.set_mesh(self.mesh):
                    n, t = self._sums(params, batch)
            else:
                n, t = self._sums(params, {k: jnp.asarray(local[k]) for k in EVAL_KEYS})
            nll, tokens = nll + float(n), tokens + float(t)
        return summarize(nll, tokens)


def eval_data_config(config):
    """`config.data` with the held-out `config.eval.sources`, in file order (no shuffling), one fixed length."""
    data = copy.deepcopy(config.data)
    with data.unlocked():
        data.sources = [dict(s) for s in config.eval.sources]
        data.shuffle = False
        data.num_epochs = None
        data.seq_len_schedule = ""
    return data


def make_evaluator(config, graphdef, *, mesh=None, process_index: int = 0, process_count: int = 1):
    """The training run's evaluator, or None when `config.eval.every` is 0 (or no sources are set)."""
    if int(config.eval.every) <= 0 or not list(config.eval.sources):
        return None
    from qwen_jax.data import make_pipeline

    pipeline = make_pipeline(eval_data_config(config), process_index=process_index, process_count=process_count)
    return Evaluator(graphdef, pipeline.iterator, num_batches=int(config.eval.batches), mesh=mesh,
                     chunk_size=int(config.loss.chunk_size))


def token_losses(model, input_ids, positions=None, *, chunk_size: int = 1024):
    """Per-token next-token NLL [batch, seq - 1] (float32): entry j scores input_ids[:, j + 1].

    Projects `chunk_size` positions at a time (never the whole [batch, seq, vocab] logits).
    """
    hidden = model.hidden_states(input_ids, positions)[:, :-1]
    targets = input_ids[:, 1:]
    b, t, e = hidden.shape
    c = max(1, min(chunk_size, t))
    pad = (-t) % c
    hs = jnp.pad(hidden, ((0, 0), (0, pad), (0, 0))).reshape(b, -1, c, e).swapaxes(0, 1)
    ts = jnp.pad(targets, ((0, 0), (0, pad))).reshape(b, -1, c).swapaxes(0, 1)

    def one(args):
        h, tgt = args
        logits = model.logits(h)
        return logsumexp_one_pass(logits) - jnp.take_along_axis(logits, tgt[..., None], axis=-1)[..., 0]

    return jax.lax.map(one, (hs, ts)).swapaxes(0, 1).reshape(b, -1)[:, :t]


def bucket_table(nll: np.ndarray, target_positions: np.ndarray, mask: np.ndarray, edges: Sequence[int]) -> list:
    """Loss and perplexity per position bucket [edges[i], edges[i+1]) (the last one open-ended)."""
    nll, pos, mask = (np.asarray(a).reshape(-1) for a in (nll, target_positions, mask))
    rows = []
    for i, lo in enumerate(edges):
        hi = edges[i + 1] if i + 1 < len(edges) else None
        sel = (mask > 0) & (pos >= lo) & (pos < hi if hi is not None else True)
        stats = summarize(float(np.sum(nll[sel], dtype=np.float64)), float(np.sum(sel)))
        rows.append({"from": int(lo), "to": None if hi is None else int(hi), **stats})
    return rows


def evaluate_documents(model, documents: Iterable[Sequence[int]], *, seq_len: int, edges: Sequence[int],
                       batch_size: int = 8, chunk_size: int = 1024) -> dict:
    """{"overall": stats, "buckets": bucket_table} over token-id documents (each one row, cut to seq_len)."""
    docs = [list(d)[:seq_len] for d in documents]
    docs = [d for d in docs if len(d) >= 2]
    width = max(len(d) for d in docs)
    graphdef, state = nnx.split(model)
    score = jax.jit(lambda s, ids: token_losses(nnx.merge(graphdef, s), ids, chunk_size=chunk_size))
    all_nll, all_pos, all_mask = [], [], []
    for i in range(0, len(docs), batch_size):
        group = docs[i:i + batch_size]
        ids = np.zeros((batch_size, width), np.int32)
        mask = np.zeros((batch_size, width - 1), np.float32)
        for r, d in enumerate(group):
            ids[r, :len(d)] = d
            mask[r, :len(d) - 1] = 1.0
        all_nll.append(np.asarray(score(state, jnp.asarray(ids))))
        all_pos.append(np.broadcast_to(np.arange(1, width), mask.shape))
        all_mask.append(mask)
    nll, pos, mask = (np.concatenate(a) for a in (all_nll, all_pos, all_mask))
    overall = summarize(float(np.sum(nll * mask, dtype=np.float64)), float(np.sum(mask)))
    return {"overall": overall, "buckets": bucket_table(nll, pos, mask, edges), "documents": len(docs)}


# ---------------------------------------------------------------------------------------------- CLI


def build_parser() -> Parser:
    p = Parser(prog="python -m qwen_jax.evaluate", description="Loss and perplexity per position bucket.")
    p.add_argument("--model", required=True, help="Hugging Face folder or training checkpoints dir")
    p.add_argument("--step", type=int, default=None, help="checkpoint step (default: latest)")
    p.add_argument("--data", required=True, help='JSONL: {"text": ...} or {"input_ids": [...]} per line')
    p.add_argument("--seq_len", type=int, default=2048, help="documents are cut to this many tokens")
    p.add_argument("--buckets", default="0,1024,2048,4096,8192,16384,32768",
                   help="comma-separated bucket starts (positions of the predicted token)")
    p.add_argument("--batch_size", type=int, default=8)
    p.add_argument("--dtype", default="float32", choices=("float32", "bfloat16"))
    p.add_argument("--json", default=None, help="also write the report here (JSON)")
    return p


def parse_buckets(text: str) -> list[int]:
    try:
        edges = [int(x) for x in text.split(",") if x.strip()]
    except ValueError:
        raise UsageError(f"--buckets {text!r}: expected comma-separated integers") from None
    if not edges or edges[0] < 0 or any(b <= a for a, b in zip(edges, edges[1:], strict=False)):
        raise UsageError(f"--buckets {text!r}: need increasing non-negative integers")
    return edges


def read_documents(path: str, tokenizer_dir: str, vocab_size: int) -> list[list[int]]:
    tok = None
    docs = []
    for n, record in read_jsonl(path, "--data"):
        if isinstance(record, dict) and isinstance(record.get("input_ids"), list):
            ids = record["input_ids"]
            if not all(isinstance(i, int) and 0 <= i < vocab_size for i in ids):
                raise UsageError(f"--data {path} line {n}: input_ids must be integers in [0, {vocab_size})")
        elif isinstance(record, dict) and isinstance(record.get("text"), str):
            if tok is None:
                if not os.path.exists(os.path.join(tokenizer_dir, "tokenizer.json")):
                    raise UsageError(f"--data {path} line {n}: a text record needs tokenizer files in the model folder")
                from qwen_jax.data.tokenization import load_tokenizer

                tok = load_tokenizer(tokenizer_dir)
            ids = tok.encode(record["text"])
        else:
            raise UsageError(f'--data {path} line {n}: expected {{"text": ...}} or {{"input_ids": [...]}}')
        docs.append(ids)
    if not any(len(d) >= 2 for d in docs):
        raise UsageError(f"--data {path}: no document with at least 2 tokens")
    return docs


def format_table(report: dict) -> str:
    lines = [f"{'positions':>18} {'tokens':>10} {'loss':>9} {'perplexity':>11}"]
    for row in report["buckets"] + [{"from": "all", "to": "", **report["overall"]}]:
        span = f"{row['from']}-{row['to'] if row['to'] is not None else ''}" if row["from"] != "all" else "all"
        if row["tokens"]:
            lines.append(f"{span:>18} {int(row['tokens']):>10} {row['loss']:>9.4f} {row['perplexity']:>11.3f}")
        else:
            lines.append(f"{span:>18} {0:>10} {'-':>9} {'-':>11}")
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> int:
    try:
        args = build_parser().parse_args(argv)
        edges = parse_buckets(args.buckets)
        if args.seq_len < 2 or args.batch_size < 1:
            raise UsageError("need --seq_len >= 2 and --batch_size >= 1")
        if args.json and not os.path.isdir(os.path.dirname(os.path.abspath(args.json))):
            raise UsageError(f"--json {args.json}: its folder does not exist")
        model, _ = load_model(args.model, args.step, args.dtype, tokenizer=False)
        docs = read_documents(args.data, args.model, model.cfg.vocab_size)
    except UsageError as e:
        print(f"error: {e}", file=sys.stderr)
        return 2
    report = evaluate_documents(model, docs, seq_len=args.seq_len, edges=edges, batch_size=args.batch_size)
    report.update(model=os.path.abspath(args.model), data=os.path.abspath(args.data), seq_len=args.seq_len)
    print(format_table(report), flush=True)
    if args.json:
        atomic_write_json(args.json, report)
    return 0


if __name__ == "__main__":
    sys.exit(main())
