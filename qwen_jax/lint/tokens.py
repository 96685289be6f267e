"""QL-TOK: special-token ids: inside the vocabulary, a bos that is not a stop token, no non-terminator in the eos
list."""

from __future__ import annotations

from qwen_jax.lint.core import CONFIG, ERROR, GENCONFIG, WARNING, id_list, is_int
from qwen_jax.lint.facts import ENDOFTEXT, IM_END, IM_START, QWEN_BPE_SIZE, TERMINATORS
from qwen_jax.lint.rules import TOK_01, TOK_02, TOK_03


def check_tokens(ctx):
    f, cfg, gen = ctx.folder, ctx.cfg, ctx.gen
    if cfg is None and gen is None:
        return
    qwen = ctx.family is not None
    vocab = ctx.vocab
    stop = ctx.stop
    # --- special ids against vocab_size
    if vocab is not None:
        for name, data in ((CONFIG, cfg), (GENCONFIG, gen)):
            if data is None:
                continue
            for key in ("bos_token_id", "eos_token_id", "pad_token_id"):
                for i, tid in enumerate(id_list(data.get(key)) or []):
                    if tid >= vocab or tid < 0:
                        path = (key, i) if isinstance(data.get(key), list) else (key,)
                        f.add(TOK_01, ERROR, name, path,
                              f"{key} {ctx.name(tid)} is outside the vocabulary (vocab_size {vocab}): index out of "
                              "range in the embedding", "use an id below vocab_size")
    # --- non-terminators in the eos lists
    for name, data in ((CONFIG, cfg), (GENCONFIG, gen)):
        ids = id_list(data.get("eos_token_id")) if data is not None else None
        for i, tid in enumerate(ids or []):
            path = ("eos_token_id", i) if isinstance(data.get("eos_token_id"), list) else ("eos_token_id",)
            tname = ctx.tok_names.get(tid)
            if tid in TERMINATORS or not qwen:
                continue
            if tname is not None:
                f.add(TOK_03, ERROR, name, path,
                      f"eos_token_id contains {ctx.name(tid)}, which is not a terminator: generation stops "
                      f"{'at the start of a turn' if tid == IM_START else 'in the middle of the output'}",
                      f"remove {tid} from the eos list")
            elif 0 <= tid < QWEN_BPE_SIZE:
                f.add(TOK_03, WARNING, name, path,
                      f"eos_token_id contains ordinary text token {tid}: generation stops whenever it is produced",
                      f"remove {tid} (use stop strings at serving time instead)")
    # --- bos
    if qwen:
        for name, data in ((CONFIG, cfg), (GENCONFIG, gen)):
            bos = data.get("bos_token_id") if data is not None else None
            if is_int(bos) and bos != ENDOFTEXT and (bos in stop or bos == IM_END):
                f.add(TOK_02, ERROR, name, ("bos_token_id",),
                      f"bos_token_id {ctx.name(bos)} is a stop token: runtimes that prepend bos start every prompt "
                      "with end-of-turn (Qwen uses bos 151643 and adds none)", f"set bos_token_id to {ENDOFTEXT}")
