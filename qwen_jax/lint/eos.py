"""QL-EOS: the effective stop set (generation_config.json's eos, else config.json's) against the chat turn end,
the tokenizer's eos and the pad token."""

from __future__ import annotations

from qwen_jax.lint.core import CONFIG, ERROR, GENCONFIG, TOKCONFIG, WARNING, is_int, token_content
from qwen_jax.lint.facts import ENDOFTEXT, IM_END
from qwen_jax.lint.rules import EOS_01, EOS_02, EOS_03, EOS_04, EOS_05, EOS_06, EOS_07


def check_eos(ctx):
    f, cfg, gen = ctx.folder, ctx.cfg, ctx.gen
    if cfg is None and gen is None:
        return
    qwen = ctx.family is not None
    stop = ctx.stop
    if qwen and not stop and ctx.tok_eos is None:
        name = GENCONFIG if gen is not None else CONFIG
        f.add(EOS_07, ERROR, name, ("eos_token_id",),
              "no eos_token_id anywhere (config, generation_config, tokenizer): generation only ends at "
              "max_new_tokens", f"set eos_token_id ({IM_END} for chat models, {ENDOFTEXT} for base models)")
    turn_end_name = ctx.turn_end or "<|im_end|>"
    turn_end = ctx.tok_ids.get(turn_end_name)
    if ctx.is_chat and turn_end is not None and stop and turn_end not in stop:
        edit = None
        if ctx.stop_source == GENCONFIG and ctx.gen_eos is not None:
            edit = ("set_value", ("eos_token_id",), [turn_end] + [x for x in ctx.gen_eos if x != turn_end])
            fname = GENCONFIG
        elif gen is not None and not ctx.gen_has_eos:
            edit = ("insert_key", (), "eos_token_id", [turn_end] + [x for x in (ctx.cfg_eos or []) if x != turn_end])
            fname = GENCONFIG
        else:
            fname = CONFIG
        f.add(EOS_01, ERROR, ctx.stop_source, ("eos_token_id",),
              f"chat model: the effective stop set {{{', '.join(ctx.name(x) for x in sorted(stop))}}} (from "
              f"{ctx.stop_source}) lacks the turn end {ctx.name(turn_end)}: generation never stops at the end of "
              "a turn",
              f"add {turn_end} to the eos_token_id list in {fname}" if edit or gen is not None else
              f"add a generation_config.json with eos_token_id [{turn_end}, {ENDOFTEXT}]", edit=edit,
              edit_file=GENCONFIG)
    if cfg is not None and ctx.cfg_eos and ctx.gen_has_eos and ctx.gen_eos is not None:
        missing = [x for x in ctx.cfg_eos if x not in ctx.gen_eos]
        if missing:
            f.add(EOS_02, WARNING, CONFIG, ("eos_token_id",),
                  f"config.json eos {', '.join(ctx.name(x) for x in missing)} is not in generation_config.json eos "
                  f"{ctx.gen_eos}: transformers/vLLM stop on the latter, runtimes reading config.json on the former",
                  "make both files list the same stop tokens")
    if ctx.is_chat and cfg is not None and ctx.cfg_eos and turn_end is not None and turn_end not in ctx.cfg_eos:
        sev = WARNING if turn_end in stop else ERROR
        f.add(EOS_03, sev, CONFIG, ("eos_token_id",),
              f"chat model config.json eos_token_id is {', '.join(ctx.name(x) for x in ctx.cfg_eos)}, not the turn "
              f"end {ctx.name(turn_end)}: runtimes that read config.json only never stop at the end of a turn",
              f"set eos_token_id to {turn_end}",
              edit=("set_value", ("eos_token_id",), turn_end) if ctx.cfg_eos == [ENDOFTEXT] and
              not isinstance(cfg.get("eos_token_id"), list) else None)
    if ctx.tok_eos is not None and (stop or ctx.cfg_eos):
        if stop and ctx.tok_eos not in stop:
            f.add(EOS_04, ERROR, TOKCONFIG, ("eos_token",),
                  f"tokenizer eos {ctx.name(ctx.tok_eos)} is not in the stop set "
                  f"{{{', '.join(ctx.name(x) for x in sorted(stop))}}} from {ctx.stop_source}: a model fine-tuned "
                  "with this tokenizer emits a token generation never stops on",
                  f"add {ctx.tok_eos} to eos_token_id (or use the tokenizer that matches the model)")
        if ctx.cfg_eos and ctx.tok_eos not in ctx.cfg_eos:
            f.add(EOS_05, WARNING, TOKCONFIG, ("eos_token",),
                  f"tokenizer eos {ctx.name(ctx.tok_eos)} differs from config.json eos_token_id "
                  f"{', '.join(ctx.name(x) for x in ctx.cfg_eos)}: training and inference use different end tokens",
                  "make tokenizer_config.json and config.json name the same eos")
    # --- pad
    if qwen:
        pads = []
        for name, data in ((CONFIG, cfg), (GENCONFIG, gen)):
            if data is not None and is_int(data.get("pad_token_id")):
                pads.append((name, ("pad_token_id",), data["pad_token_id"]))
        if ctx.tok is not None and token_content(ctx.tok.get("pad_token")) is not None:
            pads.append((TOKCONFIG, ("pad_token",), ctx.tok_ids.get(token_content(ctx.tok.get("pad_token")))))
        for name, path, pid in pads:
            if pid == IM_END and ctx.is_chat:
                f.add(EOS_06, WARNING, name, path,
                      f"pad token is the chat turn end {ctx.name(IM_END)}: collators mask pad labels, so the model "
                      "never learns to emit its stop token", f"use <|endoftext|> ({ENDOFTEXT}) as pad")
