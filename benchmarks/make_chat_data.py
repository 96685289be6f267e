"""Writes a synthetic chat SFT set with a realistic length spread, for benchmarking the trainer on packed data.

    python benchmarks/make_chat_data.py --out /tmp/chat_spread.jsonl --examples 20000

The bundled demo set (`qwen_jax/data/bundled/chat.jsonl`) holds short question/answer pairs (tens of tokens),
so a 16k-token row packs hundreds of them: an extreme for segment-aware attention, not the common case.  Real
SFT mixtures are long-tailed (most conversations a few hundred tokens, some several thousand), so here each
conversation's length is drawn from a log-normal (median `--median_words`, sigma `--sigma`, clipped to
[`--min_words`, `--max_words`]); the text is drawn from a fixed word list (about 1.3 Qwen tokens a word), and
1-3 turns split it between user and assistant.  Deterministic for a given --seed.
"""

from __future__ import annotations

import argparse
import json
import math
import os
import random
import sys

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

from qwen_jax.atomic import atomic_replace  # noqa: E402

_WORD_TEXT = (
    "the of and to in is that for it as was with be by on not he this are or his from at which but have an they "
    "you were her she there one all we their can has been if more when will would who so no model data train "
    "token length context window attention layer gradient batch answer question explain because therefore "
    "example number value result method system process function memory device compute paper section table "
    "figure sequence position rotary frequency scaling chunk ring shard mesh axis tensor parameter optimizer "
    "learning rate schedule warmup cosine decay checkpoint resume export folder config tokenizer template"
)
WORDS = tuple(_WORD_TEXT.split(" "))


def conversation(rng: random.Random, words: int) -> dict:
    turns = rng.choice((1, 1, 2, 3))
    messages = []
    if rng.random() < 0.3:
        messages.append({"role": "system", "content": "You are a helpful assistant."})
    per_turn = max(2, words // turns)
    for _ in range(turns):
        q = max(1, per_turn // 4)
        messages.append({"role": "user", "content": " ".join(rng.choice(WORDS) for _ in range(q)) + "?"})
        messages.append({"role": "assistant", "content": " ".join(rng.choice(WORDS) for _ in range(per_turn - q))})
    return {"messages": messages}


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--out", required=True)
    p.add_argument("--examples", type=int, default=20000)
    p.add_argument("--median_words", type=float, default=400.0)
    p.add_argument("--sigma", type=float, default=1.0)
    p.add_argument("--min_words", type=int, default=16)
    p.add_argument("--max_words", type=int, default=12000)
    p.add_argument("--seed", type=int, default=0)
    args = p.parse_args(argv)
    if args.examples < 1 or args.median_words <= 0 or args.sigma < 0 or not 1 <= args.min_words <= args.max_words:
        print("error: need --examples >= 1, --median_words > 0, --sigma >= 0, 1 <= --min_words <= --max_words",
              file=sys.stderr)
        return 2
    rng = random.Random(args.seed)
    folder = os.path.dirname(os.path.abspath(args.out))
    if not os.path.isdir(folder) or not os.access(folder, os.W_OK):
        print(f"error: --out {args.out}: folder {folder} does not exist or is not writable", file=sys.stderr)
        return 2
    lengths = []

    def write(f):
        for _ in range(args.examples):
            n = int(min(args.max_words, max(args.min_words, rng.lognormvariate(math.log(args.median_words),
                                                                                  args.sigma))))
            lengths.append(n)
            f.write((json.dumps(conversation(rng, n)) + "\n").encode("utf-8"))

    atomic_replace(args.out, write)
    lengths.sort()
    pct = {q: lengths[int(q / 100 * (len(lengths) - 1))] for q in (10, 50, 90, 99)}
    print(f"wrote {args.out}: {len(lengths)} conversations, words p10/p50/p90/p99 = "
          f"{pct[10]}/{pct[50]}/{pct[90]}/{pct[99]}, {sum(lengths):,} words")
    return 0


if __name__ == "__main__":
    sys.exit(main())
