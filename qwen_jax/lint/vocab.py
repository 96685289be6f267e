"""QL-VOC: vocab_size against the tokenizer in the folder (or the Qwen family's) and the released padded sizes."""

from __future__ import annotations

from qwen_jax.lint.core import CONFIG, ERROR, WARNING
from qwen_jax.lint.facts import FAMILY_TOKENIZER_MIN, PADDED_VOCABS, QWEN_BPE_SIZE
from qwen_jax.lint.rules import VOC_01, VOC_02, VOC_03


def check_vocab(ctx):
    f = ctx.folder
    qwen = ctx.family is not None
    vocab = ctx.vocab
    if vocab is not None:
        tsize, tsrc = ctx.tokenizer_size, "tokenizer"
        if tsize is None and qwen and vocab >= QWEN_BPE_SIZE:
            tsize, tsrc = FAMILY_TOKENIZER_MIN[ctx.family], f"{ctx.family.capitalize()} tokenizer"
        if tsize is not None and vocab < tsize:
            top = ctx.name(tsize - 1)
            f.add(VOC_01, ERROR, CONFIG, ("vocab_size",),
                  f"vocab_size {vocab} < {tsrc} size {tsize}: ids up to {top} fall outside the embedding matrix",
                  f"resize the embeddings to at least {tsize} (released checkpoints use 151936/152064)")
        if qwen and vocab >= QWEN_BPE_SIZE and vocab not in PADDED_VOCABS:
            f.add(VOC_02, WARNING, CONFIG, ("vocab_size",),
                  f"vocab_size {vocab} is not a released Qwen size (151936/152064): embeddings were resized; the "
                  "saved weights, LoRA adapters and downstream tools must all use this shape",
                  "keep the released padded size unless the weights really were resized")
        elif qwen and vocab < QWEN_BPE_SIZE and ctx.tokenizer_size is None:
            f.add(VOC_03, WARNING, CONFIG, ("vocab_size",),
                  f"vocab_size {vocab} is below the {QWEN_BPE_SIZE} Qwen BPE tokens: Qwen token ids index past the "
                  "embedding unless the model uses its own tokenizer", "use the released vocab_size")
