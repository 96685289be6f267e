"""Input pipeline on grain: chat SFT, continuation and pretraining data, packed, masked, resumable.

Trainer API::

    from qwen_jax.data import default_config, make_pipeline
    pipeline = make_pipeline(config.data, process_index=jax.process_index(), process_count=jax.process_count())
    it = pipeline.iterator()            # counts steps itself, starting at 0 (or iterator(start_step))
    batch = next(it)                    # dict of numpy [per_process_batch, seq_len]: input_ids, positions,
                                        # segment_ids, targets, loss_mask
    state = it.get_state()              # JSON-able; or orbax: grain.checkpoint.CheckpointSave(it)
    it = make_pipeline(...).iterator(); it.set_state(state)   # resumes bit-identically

See ``qwen_jax/data/pipeline.py`` and docs/data.md.
"""

from qwen_jax.data.config import default_config
from qwen_jax.data.errors import DataError
from qwen_jax.data.pipeline import BatchIterator, Pipeline, make_pipeline
from qwen_jax.data.schedule import Stage, parse_schedule
from qwen_jax.data.tokenization import QWEN2_CHATML_TEMPLATE, BadRecordError

__all__ = ["BadRecordError", "BatchIterator", "DataError", "Pipeline", "QWEN2_CHATML_TEMPLATE", "Stage",
           "default_config", "make_pipeline", "parse_schedule"]
