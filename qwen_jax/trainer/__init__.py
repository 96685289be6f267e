"""Training pieces: optimizer (schedule, masks, freezing), fused chunked loss, jitted train step, synthetic data,
and the run itself (`loop.py`) with its hooks (`hooks.py`: metrics, evaluation, export) and exit codes (`errors.py`).

`qwen_jax/train.py` is the command line that calls `loop.run`; `qwen_jax/checkpoint.py` and
`qwen_jax/metrics.py` hold checkpointing and metrics.
"""
