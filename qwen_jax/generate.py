"""`python -m qwen_jax.generate`: stream text from a Hugging Face folder or a training checkpoint.

    python -m qwen_jax.generate --model DIR|CKPT [--step N] (--prompt TEXT | --prompts FILE.jsonl)
        [--chat] [--system TEXT] [--max_new_tokens N] [--temperature T] [--top_k K] [--top_p P] [--seed S]

Each reply is printed as it is produced, then why it stopped (a stop id, or the length).
`--chat` (or a `{"messages": [...]}` line) renders the prompt with the tokenizer's chat
template and a generation prompt.  Bad input: one line `error: ...`, exit code 2.

The library call is `qwen_jax.generate(...)` (`qwen_jax.generation`).  Importing this module
rebinds the package attribute `qwen_jax.generate` to it (Python binds a submodule to its
package on first import), so the module is made callable: `qwen_jax.generate(model, ...)`
keeps working either way.
"""

from __future__ import annotations

import sys
import types

from qwen_jax.cli import Parser, UsageError, load_model, read_jsonl
from qwen_jax.generation import generate, resolve_stop_ids, stream


def build_parser() -> Parser:
    p = Parser(prog="python -m qwen_jax.generate", description="Generate text with a Qwen model (KV cache).")
    p.add_argument("--model", required=True, help="Hugging Face folder or training checkpoints dir")
    p.add_argument("--step", type=int, default=None, help="checkpoint step (default: latest)")
    src = p.add_mutually_exclusive_group(required=True)
    src.add_argument("--prompt", help="one prompt (text)")
    src.add_argument("--prompts", help='JSONL file: one {"prompt": text} or {"messages": [...]} per line')
    p.add_argument("--chat", action="store_true", help="wrap prompts in the tokenizer's chat template")
    p.add_argument("--system", default=None, help="system message (with --chat)")
    p.add_argument("--max_new_tokens", type=int, default=256)
    p.add_argument("--temperature", type=float, default=0.0)
    p.add_argument("--top_k", type=int, default=0)
    p.add_argument("--top_p", type=float, default=1.0)
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--dtype", default="float32", choices=("float32", "bfloat16"))
    return p


def read_prompts(path: str) -> list:
    """Prompts of a JSONL file: text (`prompt`) or chat messages (`messages`), in file order."""
    out = []
    for n, record in read_jsonl(path, "--prompts"):
        if isinstance(record, dict) and isinstance(record.get("prompt"), str):
            out.append(record["prompt"])
        elif isinstance(record, dict) and isinstance(record.get("messages"), list):
            out.append(record["messages"])
        else:
            raise UsageError(f'--prompts {path} line {n}: expected {{"prompt": text}} or {{"messages": [...]}}')
    if not out:
        raise UsageError(f"--prompts {path}: no prompts")
    return out


def encode_prompt(tok, prompt, *, chat: bool, system: str | None) -> list[int]:
    if isinstance(prompt, list) or chat:
        messages = prompt if isinstance(prompt, list) else [{"role": "user", "content": prompt}]
        if system is not None and not any(m.get("role") == "system" for m in messages):
            messages = [{"role": "system", "content": system}] + messages
        if not getattr(tok, "chat_template", None):
            raise UsageError("--chat: the model's tokenizer has no chat template")
        return list(tok.apply_chat_template(messages, add_generation_prompt=True, tokenize=True, return_dict=False))
    return tok.encode(prompt)


def _stream_text(tok, ids: list[int], shown: str, out) -> str:
    """Print the part of decode(ids) not shown yet (holding back an incomplete UTF-8 character)."""
    text = tok.decode(ids, skip_special_tokens=True)
    if text.endswith("\ufffd"):
        return shown
    out.write(text[len(shown):] if text.startswith(shown) else text)
    out.flush()
    return text


def main(argv: list[str] | None = None) -> int:
    try:
        args = build_parser().parse_args(argv)
        if args.max_new_tokens < 1:
            raise UsageError(f"--max_new_tokens must be >= 1, got {args.max_new_tokens}")
        if args.temperature < 0 or args.top_k < 0 or not 0 < args.top_p <= 1:
            raise UsageError("need --temperature >= 0, --top_k >= 0 and 0 < --top_p <= 1")
        prompts = [args.prompt] if args.prompt is not None else read_prompts(args.prompts)
        model, tok = load_model(args.model, args.step, args.dtype, tokenizer=True)
        encoded = [encode_prompt(tok, p, chat=args.chat, system=args.system) for p in prompts]
    except UsageError as e:
        print(f"error: {e}", file=sys.stderr)
        return 2
    stops = resolve_stop_ids(model, None)
    out = sys.stdout
    for n, ids in enumerate(encoded):
        if len(encoded) > 1:
            out.write(f"=== prompt {n + 1}/{len(encoded)} ===\n")
        new: list[int] = []
        shown = ""
        for step_ids in stream(model, [ids], max_new_tokens=args.max_new_tokens, temperature=args.temperature,
                               top_k=args.top_k, top_p=args.top_p, seed=args.seed, chunk=16):
            new.append(step_ids[0])
            shown = _stream_text(tok, new, shown, out)
        if new[-1] in stops:
            why = f"stop id {new[-1]} ({tok.convert_ids_to_tokens(new[-1])})"
        else:
            why = f"length (max_new_tokens={args.max_new_tokens})"
        out.write(f"\n[stopped: {why}; {len(new)} new tokens]\n")
        out.flush()
    return 0


class _CallableModule(types.ModuleType):
    def __call__(self, *args, **kwargs):
        return generate(*args, **kwargs)


sys.modules[__name__].__class__ = _CallableModule

if __name__ == "__main__":
    sys.exit(main())
