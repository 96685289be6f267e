"""Training pieces: optimizer (schedule, masks, freezing), fused chunked loss, jitted train step, synthetic data.

`qwen_jax/train.py` is the launcher that puts them together; `qwen_jax/checkpoint.py` and
`qwen_jax/metrics.py` hold checkpointing and metrics.
"""
