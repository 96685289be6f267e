"""Hugging Face interop: one module per concern.

* `names`          the parameter table: Hugging Face tensor names and layout transforms;
* `safetensors_io` streaming safetensors reading and writing, `CheckpointError`;
* `models`         abstract models, `from_pretrained` and `load_model`;
* `output`         what conversions share: `ConvertError`, progress, the atomic output folder;
* `convert`        hf-to-orbax and the `qwen-convert` command line (`main`);
* `export`         orbax-to-hf: a Hugging Face folder (shards, index, config and side files, linted).
"""
