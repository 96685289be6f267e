"""Generates the bundled demo/test chat dataset ``qwen_jax/data/bundled/chat.jsonl``.

The conversations are synthetic and written by the qwen_jax authors (templates and facts in this file);
they are released under the project's license (Apache-2.0).  Regenerate with::

    python -m qwen_jax.data.bundled_gen

The output is deterministic (fixed seed), so regenerating gives the same bytes.
"""

from __future__ import annotations

import json
import os
import random

from qwen_jax.atomic import atomic_write_text

SYSTEM_PROMPTS = [
    "You are a helpful assistant.",
    "You are a concise assistant. Answer in one or two sentences.",
    "You are a patient math tutor. Show the steps.",
    "You are a friendly assistant that explains things simply.",
]

FACTS = [
    ("What is the capital of France?", "The capital of France is Paris."),
    ("What is the capital of Japan?", "The capital of Japan is Tokyo."),
    ("What is the capital of Canada?", "The capital of Canada is Ottawa."),
    ("What is the capital of Australia?", "The capital of Australia is Canberra."),
    ("What is the capital of Kenya?", "The capital of Kenya is Nairobi."),
    ("What is the capital of Brazil?", "The capital of Brazil is Brasília."),
    ("What is the capital of Norway?", "The capital of Norway is Oslo."),
    ("What is the capital of Egypt?", "The capital of Egypt is Cairo."),
    ("How many planets are in the Solar System?", "There are eight planets in the Solar System."),
    ("Which planet is closest to the Sun?", "Mercury is the planet closest to the Sun."),
    ("Which planet is the largest?", "Jupiter is the largest planet in the Solar System."),
    ("What is the chemical symbol for gold?", "The chemical symbol for gold is Au."),
    ("What is the chemical symbol for iron?", "The chemical symbol for iron is Fe."),
    ("What is the chemical symbol for sodium?", "The chemical symbol for sodium is Na."),
    ("What is H2O?", "H2O is the chemical formula of water: two hydrogen atoms bonded to one oxygen atom."),
    ("At what temperature does water boil at sea level?", "At sea level water boils at 100 °C (212 °F)."),
    ("How many days are in a leap year?", "A leap year has 366 days."),
    ("How many sides does a hexagon have?", "A hexagon has six sides."),
    ("How many minutes are in a day?", "A day has 1440 minutes (24 × 60)."),
    ("What is the speed of light in vacuum?", "About 299,792 kilometres per second."),
    ("Who wrote 'Romeo and Juliet'?", "William Shakespeare wrote 'Romeo and Juliet'."),
    ("What gas do plants absorb from the air?", "Plants absorb carbon dioxide (CO2) and release oxygen."),
    ("What is the largest ocean on Earth?", "The Pacific Ocean is the largest ocean on Earth."),
    ("What is the freezing point of water in Fahrenheit?", "Water freezes at 32 °F."),
    ("What is a prime number?",
     "A prime number is a whole number greater than 1 whose only divisors are 1 and itself."),
    ("What does CPU stand for?", "CPU stands for Central Processing Unit."),
    ("What does JSON stand for?", "JSON stands for JavaScript Object Notation."),
    ("How many bits are in a byte?", "A byte has 8 bits."),
    ("What is the smallest prime number?", "The smallest prime number is 2."),
    ("How many continents are there?", "By the most common convention there are seven continents."),
]

UNITS = [
    ("kilometres", "miles", 0.621371),
    ("miles", "kilometres", 1.609344),
    ("kilograms", "pounds", 2.204623),
    ("pounds", "kilograms", 0.453592),
    ("metres", "feet", 3.280840),
    ("litres", "US gallons", 0.264172),
    ("hours", "minutes", 60.0),
    ("minutes", "seconds", 60.0),
]

WORDS = ["banana", "keyboard", "river", "elephant", "sunlight", "jax", "tokenizer", "mountain", "packing",
         "gradient", "orange", "library", "window", "planet", "quantum", "notebook", "lantern", "compiler"]


def _fmt(x: float) -> str:
    return f"{x:.2f}".rstrip("0").rstrip(".")


def _arith(rng: random.Random) -> tuple[str, str]:
    a, b = rng.randint(2, 999), rng.randint(2, 99)
    op = rng.choice(["+", "-", "*", "/"])
    if op == "+":
        return f"What is {a} + {b}?", f"{a} + {b} = {a + b}."
    if op == "-":
        return f"What is {a} minus {b}?", f"{a} - {b} = {a - b}."
    if op == "*":
        return f"Compute {a} × {b}.", f"{a} × {b} = {a * b}."
    q, r = divmod(a, b)
    ans = f"{a} ÷ {b} = {q} remainder {r}." if r else f"{a} ÷ {b} = {q}."
    return f"Divide {a} by {b}.", ans


def _arith_steps(rng: random.Random) -> tuple[str, str]:
    a, b, c = rng.randint(2, 50), rng.randint(2, 50), rng.randint(2, 20)
    q = f"Evaluate ({a} + {b}) × {c} and show your steps."
    ans = f"First the parentheses: {a} + {b} = {a + b}.\nThen multiply: {a + b} × {c} = {(a + b) * c}.\n" \
          f"So ({a} + {b}) × {c} = {(a + b) * c}."
    return q, ans


def _units(rng: random.Random) -> tuple[str, str]:
    src, dst, f = rng.choice(UNITS)
    v = rng.choice([1, 2, 3, 5, 7.5, 10, 12, 20, 42, 100, 250])
    return f"Convert {v} {src} to {dst}.", f"{v} {src} is about {_fmt(v * f)} {dst} (1 {src} ≈ {_fmt(f)} {dst})."


def _temp(rng: random.Random) -> tuple[str, str]:
    if rng.random() < 0.5:
        c = rng.randint(-30, 120)
        return f"What is {c} °C in Fahrenheit?", f"{c} °C = {_fmt(c * 9 / 5 + 32)} °F, using F = C × 9/5 + 32."
    f = rng.randint(-20, 250)
    return f"Convert {f} °F to Celsius.", f"{f} °F = {_fmt((f - 32) * 5 / 9)} °C, using C = (F − 32) × 5/9."


def _strings(rng: random.Random) -> tuple[str, str]:
    w = rng.choice(WORDS)
    kind = rng.randrange(5)
    if kind == 0:
        return f"Reverse the word '{w}'.", f"'{w}' reversed is '{w[::-1]}'."
    if kind == 1:
        return f"Write '{w}' in upper case.", f"{w.upper()}"
    if kind == 2:
        return f"How many letters are in '{w}'?", f"'{w}' has {len(w)} letters."
    if kind == 3:
        n = sum(ch in "aeiou" for ch in w)
        return f"How many vowels does '{w}' contain?", f"'{w}' contains {n} vowel{'s' if n != 1 else ''}."
    ch = rng.choice(w)
    return f"How many times does the letter '{ch}' appear in '{w}'?", f"The letter '{ch}' appears {w.count(ch)} " \
        f"time{'s' if w.count(ch) != 1 else ''} in '{w}'."


def _single(rng: random.Random) -> tuple[str, str]:
    gen = rng.choice([_arith, _arith, _arith_steps, _units, _temp, _strings, _strings, "fact", "fact"])
    if gen == "fact":
        return rng.choice(FACTS)
    return gen(rng)


def _conversation(rng: random.Random) -> dict:
    messages = []
    if rng.random() < 0.3:
        messages.append({"role": "system", "content": rng.choice(SYSTEM_PROMPTS)})
    turns = rng.choice([1, 1, 1, 2, 2, 3])
    for _ in range(turns):
        q, a = _single(rng)
        if rng.random() < 0.15:
            q = rng.choice(["Quick question: ", "Hi! ", "Please help: ", ""]) + q
        messages.append({"role": "user", "content": q})
        messages.append({"role": "assistant", "content": a})
    if turns >= 2 and rng.random() < 0.3:
        messages.append({"role": "user", "content": "Thanks! Can you summarise your answers in one line?"})
        answers = [m["content"] for m in messages if m["role"] == "assistant"]
        messages.append({"role": "assistant", "content": " ".join(a.split("\n")[-1] for a in answers)})
    return {"messages": messages}


def generate(n: int = 400, seed: int = 20250601) -> list[dict]:
    rng = random.Random(seed)
    return [_conversation(rng) for _ in range(n)]


def main() -> None:
    path = os.path.join(os.path.dirname(__file__), "bundled", "chat.jsonl")
    atomic_write_text(path, "".join(json.dumps(ex, ensure_ascii=False) + "\n" for ex in generate()))
    print(f"wrote {path} ({os.path.getsize(path)} bytes)")


if __name__ == "__main__":
    main()
