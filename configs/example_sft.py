"""A config file of one's own (docs/training.md): start from configs/base.py and set what differs.

    python -m qwen_jax.train --config=configs/example_sft.py --workdir=/tmp/example_sft

Copy it, point `data.sources` at your files and `model.init_from` at a Hugging Face folder.  Command-line
overrides still apply on top (`--config.total_steps=10`; list keys as JSON: `--config.data.sources='[...]'`).
"""

import ml_collections

from configs.base import get_config as base_config


def get_config() -> ml_collections.ConfigDict:
    config = base_config()
    config.model.preset = "tiny"  # or: config.model.init_from = "/models/Qwen2.5-0.5B-Instruct"
    config.model.dtype = "float32"
    config.data.sources = [
        {"path": "bundled:chat.jsonl", "kind": "chat", "weight": 1.0},  # yours: {"path": "/data/sft/*.jsonl", ...}
    ]
    config.data.seq_len = 128
    config.data.global_batch_size = 8
    config.grad_accum_steps = 2
    config.total_steps = 20
    config.save_every = 10
    config.optimizer.learning_rate = 3e-3
    config.optimizer.warmup_steps = 2
    config.loss.chunk_size = 128
    return config
