"""The retrieval prompt format: one place for what `qwen_jax.evals.niah` asks at evaluation and what
the `passkey` training source (`qwen_jax.data.passkey`) trains on, so the two cannot drift apart.

A leaf module (no qwen_jax imports): the data pipeline imports it without the command-line code.
"""

from __future__ import annotations

PASSKEY_FILLER = "The grass is green. The sky is blue. The sun is yellow. Here we go. There and back again. "
NEEDLE_FILLER = ("The river bends past the old mill before it reaches the town. ",
                 "Markets open early on Saturdays and close by noon. ",
                 "Most of the houses on the hill were built of grey stone. ",
                 "A train leaves for the coast every two hours. ",
                 "The library keeps its oldest maps in a locked room. ")
TASKS = {  # needle, question, start of the answer
    "passkey": ("The pass key is {key}. Remember it. {key} is the pass key. ", "What is the pass key?",
                "The pass key is"),
    "needle": ("The special magic number is {key}. ", "What is the special magic number?",
               "The special magic number is"),
}
INTRO = "There is important information hidden inside a lot of irrelevant text. Find it and memorize it.\n"


def build_prompt(tok, task: str, length: int, depth: float, key: int, *, chat: bool) -> list[int]:
    """Token ids of one trial, `length` tokens (unless the fixed parts alone are longer): intro, filler
    with the needle's first token at `depth` of the filler, question, and the start of the answer."""
    needle_text, question, answer = TASKS[task]
    units = [PASSKEY_FILLER] if task == "passkey" else list(NEEDLE_FILLER)
    if chat:
        rendered = tok.apply_chat_template([{"role": "user", "content": "\x00"}], add_generation_prompt=True,
                                           tokenize=False)
        before, after = rendered.split("\x00")
        head = tok.encode(before + INTRO)
        tail = tok.encode("\n" + question) + tok.encode(after + answer)
    else:
        head, tail = tok.encode(INTRO), tok.encode("\n" + question + " " + answer)
    needle = tok.encode(needle_text.format(key=key))
    budget = max(0, length - len(head) - len(needle) - len(tail))
    filler: list[int] = []
    while len(filler) < budget:
        filler += tok.encode(units[len(filler) % len(units)])
    filler = filler[:budget]
    at = int(round(depth * len(filler)))
    return head + filler[:at] + needle + filler[at:] + tail
