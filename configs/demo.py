"""Demo config: the bundled chat dataset, short sequences, a small batch.

    python -m qwen_jax.data --config=configs/demo.py --show 3
"""

import ml_collections

from qwen_jax.data import default_config


def get_config() -> ml_collections.ConfigDict:
    config = ml_collections.ConfigDict()
    config.data = default_config()
    config.data.seq_len = 256
    config.data.global_batch_size = 8
    config.data.seed = 0
    return config
