"""Every training config key, with its default and meaning.  Other training configs start from here.

    python -m qwen_jax.train --config=configs/base.py --workdir=/tmp/run --config.total_steps=100

Every key can be overridden on the command line (`--config.optimizer.learning_rate=3e-4`; list
keys as JSON: `--config.data.sources='[{"path": "a.jsonl", "kind": "text"}]'`); an unknown key or
a value of the wrong type is an error that names the key and lists the valid ones.  The `data`
block is the data pipeline's (`qwen_jax.data.default_config()`).
"""

from __future__ import annotations

import ml_collections

from qwen_jax.lora import DEFAULT_TARGETS


def data_config() -> ml_collections.ConfigDict:
    """The data pipeline's defaults (`qwen_jax.data.default_config()`)."""
    from qwen_jax.data import default_config

    return default_config()


def get_config() -> ml_collections.ConfigDict:
    c = ml_collections.ConfigDict()
    # ---- run length, checkpoints, logging
    c.seed = 0  # parameter init (random init) and the training RNG
    c.total_steps = 100  # optimizer steps (one step = one global batch, all microbatches)
    c.save_every = 50  # checkpoint every N steps (asynchronous), plus the last step and on SIGTERM / SIGINT
    c.keep_checkpoints = 3  # keep the last K checkpoints (>= 1)
    c.async_checkpointing = True
    c.nonfinite = "stop"  # non-finite loss / grad norm / lr: "stop" before saving that state, or "skip" the update
    c.log_every = 1  # progress line every N steps (metrics.jsonl and TensorBoard get every step)
    c.peak_flops_per_device = 0.0  # FLOP/s for MFU; 0 = look up the device kind (CPU: MFU n/a)

    # ---- model: where the initial parameters come from
    c.model = ml_collections.ConfigDict()
    c.model.preset = "tiny"  # qwen_jax/presets.py name, used when init_from is empty
    c.model.init_from = ""  # "" = random init of the preset; a Hugging Face folder; or an Orbax checkpoint dir
    c.model.init_step = -1  # Orbax init_from: which step (-1 = latest)
    c.model.overrides = ""  # architecture overrides, "key=value,key=value" (e.g. "vocab_size=512")
    c.model.dtype = "bfloat16"  # compute dtype (activations, matmul inputs)
    c.model.param_dtype = "float32"  # master parameter dtype (optimizer state follows it)
    c.model.attention = "auto"  # auto (cuDNN on GPU in 16-bit, else xla) | xla | blockwise | cudnn | kernel | ring
    c.model.remat = "none"  # none | full | dots | dots_no_batch | save_attention (docs/training.md)
    c.model.moe_dispatch = "all_to_all"  # mesh expert > 1: all_to_all (routed rows) | all_gather (docs/moe.md)
    c.model.moe_matmul = "auto"  # MoE experts: auto (Mosaic-GPU on Hopper in 16-bit, else xla) | xla | mosaic_gpu
    c.model.scan_layers = False  # lax.scan over decoder layers: faster compiles for deep models

    # ---- mesh: sizes of the named axes; one may be -1 (= the remaining devices)
    c.mesh = ml_collections.ConfigDict({"data": 1, "fsdp": -1, "expert": 1, "tensor": 1, "seq": 1})

    # ---- optimizer: AdamW, warmup then cosine/linear/constant decay, global-norm clipping
    c.optimizer = ml_collections.ConfigDict()
    c.optimizer.learning_rate = 3e-4  # peak
    c.optimizer.schedule = "cosine"  # cosine | linear | constant (after warmup)
    c.optimizer.warmup_steps = 10
    c.optimizer.min_lr_ratio = 0.1  # final lr = learning_rate * min_lr_ratio
    c.optimizer.b1 = 0.9
    c.optimizer.b2 = 0.95
    c.optimizer.eps = 1e-8
    c.optimizer.weight_decay = 0.1  # decoupled; never applied to norm scales or biases
    c.optimizer.grad_clip = 1.0  # global-norm clip (0 = off)

    # ---- loss
    c.loss = ml_collections.ConfigDict()
    c.loss.chunk_size = 1024  # tokens per sequence chunk of the output projection (bounds logits memory)
    c.loss.z_loss = 0.0  # weight of mean(logsumexp^2) over loss tokens (0 = off)
    c.loss.router_z_loss = 0.0  # MoE: weight of the router z-loss (the load-balancing weight is router_aux_loss_coef)
    c.grad_accum_steps = 1  # microbatches per step (global_batch_size must divide by it)

    # ---- freezing (trainable = everything not frozen; a pattern that matches nothing is an error)
    c.freeze = ""  # regex (re.search) over parameter paths like "layers/mlp/gate_proj/kernel"
    c.freeze_layers = 0  # shorthand: freeze the embeddings and the first N decoder layers

    # ---- LoRA (docs/lora.md): adapters on the projections, the base frozen with no optimizer state
    c.lora = ml_collections.ConfigDict()
    c.lora.rank = 0  # adapter rank r (0 = off: full fine-tuning)
    c.lora.alpha = 16.0  # the adapter output is scaled by alpha / rank
    c.lora.dropout = 0.0  # dropout on the adapter input (training only), as PEFT's lora_dropout
    c.lora.targets = DEFAULT_TARGETS  # regex over "/"-prefixed kernel paths; default: all attention + MLP projections
    c.lora.base_dtype = "keep"  # storage dtype of the frozen base: keep (= model.param_dtype) | bfloat16 | float16
    c.lora.export = "both"  # at the end: merged (<workdir>/hf_export) | adapter (<workdir>/hf_adapter) | both
    c.lora.init_from = ""  # a PEFT adapter folder to continue training (its rank, alpha and targets win)

    # ---- data: the pipeline's own block; `synthetic_data` replaces it with random tokens
    c.data = data_config()
    c.synthetic_data = False  # random tokens from (seed, step): tests and throughput runs
    # packed: one or two sequences a row, then padding (segment ids, as packed chat data) | full_rows: one
    # sequence fills each row, no segment ids (the step harness's batches: benchmarks/train_throughput.py)
    c.synthetic_layout = "packed"

    # ---- held-out evaluation (qwen_jax/evaluate.py): loss and perplexity, logged as eval/loss, eval/perplexity
    c.eval = ml_collections.ConfigDict()
    c.eval.sources = []  # like data.sources: [{"path": ..., "kind": "chat"|"continuation"|"text"}]; [] = off
    c.eval.every = 0  # evaluate every N steps (0 = off)
    c.eval.batches = 4  # the same first N held-out batches every time (global batches of data.global_batch_size)

    # ---- end of training
    c.export_hf = True  # export a Hugging Face folder at the end
    c.export_hf_dir = ""  # "" = <workdir>/hf_export
    return c
