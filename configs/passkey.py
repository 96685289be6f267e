"""A small Qwen2 trained from scratch on synthetic passkey retrieval at 1024 tokens (one GPU, a few minutes).

    python -m qwen_jax.train --config=configs/passkey.py --workdir=/tmp/passkey        # GPU
    python -m qwen_jax.train --config=configs/passkey.py:tiny --workdir=/tmp/passkey   # CPU smoke test

The data is the `passkey` source (qwen_jax/data/passkey.py): the prompts `qwen_jax.evals.niah --task passkey`
asks, 128 to 1016 tokens long, packed into 1024-token rows, trained on the answer digits only.  The model
(4 layers, hidden 256, 4 heads of 64, the real Qwen tokenizer and 151,936-word vocabulary, tied embeddings;
about 43M parameters, 39M of them the embedding) has `max_position_embeddings` 1024, the length it is
trained at, so YaRN's default original length is the training length.  `benchmarks/passkey_niah.py` trains
it and then evaluates at 1x to 4x that length plainly, with YaRN and with Dual Chunk Attention.
"""

import ml_collections

from configs.base import get_config as base_config

TRAIN_LENGTH = 1024
MODEL = ("hidden_size=256,intermediate_size=1024,num_hidden_layers=4,num_attention_heads=4,num_key_value_heads=2,"
         "head_dim=64,rope_theta=10000.0,max_position_embeddings={length}")
TINY_MODEL = "rope_theta=10000.0,max_position_embeddings={length}"  # the tiny preset's shape


def passkey_source(seed: int, max_length: int, min_length: int) -> dict:
    return {"kind": "passkey", "seed": seed, "min_length": min_length, "max_length": max_length, "key_digits": 5}


def get_config(variant: str = "") -> ml_collections.ConfigDict:
    if variant not in ("", "tiny"):
        raise ValueError(f"configs/passkey.py: unknown variant {variant!r} (use configs/passkey.py or :tiny)")
    tiny = variant == "tiny"
    length = 128 if tiny else TRAIN_LENGTH
    config = base_config()
    config.model.preset = "tiny"
    # max_position_embeddings = the train length: YaRN's default original length when evaluating
    config.model.overrides = (TINY_MODEL if tiny else MODEL).format(length=length)
    config.model.dtype = "float32" if tiny else "bfloat16"
    config.total_steps = 4 if tiny else 2000
    config.save_every = config.total_steps
    config.keep_checkpoints = 1
    config.log_every = 1 if tiny else 100
    config.optimizer.learning_rate = 1e-3
    config.optimizer.warmup_steps = 2 if tiny else 100
    config.optimizer.weight_decay = 0.01
    config.loss.chunk_size = length
    config.data.seq_len = length
    config.data.global_batch_size = 4 if tiny else 32
    config.data.worker_count = 0 if tiny else 4  # tokenizing ~50 prompts a step must keep up with the GPU
    # the answer (" " + 5 digits) must fit behind the longest prompt in one row
    config.data.sources = [passkey_source(0, length - 8, 32 if tiny else 128)]
    config.eval.sources = [passkey_source(1, length - 8, 32 if tiny else 128)]  # held-out keys and depths
    config.eval.every = 0 if tiny else 1000
    config.eval.batches = 2
    return config
