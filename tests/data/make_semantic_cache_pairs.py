"""Writes semantic_cache_pairs.jsonl: labelled prompt pairs for the semantic cache's threshold.

Each line: {"a", "b", "kind", "hit"}. ``hit`` true: b is a paraphrase of a (the cached answer to
a is right for b); false: a near-miss that must not be served a's answer (negation, swapped
entities, a different number, a different entity). Templates written by hand, filled from small
lists; run ``python tests/data/make_semantic_cache_pairs.py`` to regenerate (deterministic).
"""

from __future__ import annotations

import json
import random
from pathlib import Path

COUNTRIES = [
    "France",
    "Germany",
    "Japan",
    "Brazil",
    "Canada",
    "Italy",
    "Spain",
    "Kenya",
    "India",
    "Norway",
    "Egypt",
    "Mexico",
    "Poland",
    "Chile",
    "Vietnam",
]
CITIES = [
    "Paris",
    "London",
    "Berlin",
    "Madrid",
    "Rome",
    "Tokyo",
    "Lisbon",
    "Vienna",
    "Prague",
    "Dublin",
    "Oslo",
    "Athens",
    "Cairo",
    "Lima",
    "Seoul",
]
PEOPLE = ["Alice", "Bob", "Carol", "David", "Emma", "Frank", "Grace", "Henry", "Irene", "Jack"]
THINGS = [
    "coffee",
    "green tea",
    "red wine",
    "dark chocolate",
    "orange juice",
    "whole milk",
    "white rice",
    "peanut butter",
    "olive oil",
    "sparkling water",
]
TOOLS = ["Python", "Rust", "Java", "Go", "Kotlin", "Swift", "Ruby", "Haskell"]

# (question, paraphrase) per topic; {x} is filled from the list named in the third field.
PARAPHRASES = [
    ("What is the capital of {x}?", "Which city is the capital of {x}?", COUNTRIES),
    ("What is the capital city of {x}?", "Tell me the capital of {x}.", COUNTRIES),
    ("What language do people speak in {x}?", "Which language is spoken in {x}?", COUNTRIES),
    ("What is the population of {x}?", "How many people live in {x}?", COUNTRIES),
    ("What currency is used in {x}?", "Which currency does {x} use?", COUNTRIES),
    ("What are the best things to do in {x}?", "What should I do when I visit {x}?", CITIES),
    ("How is the weather in {x} in spring?", "What is the weather like in {x} during spring?", CITIES),
    ("Is {x} good for your health?", "Is {x} healthy for you?", THINGS),
    ("How many calories are in a cup of {x}?", "How many calories does a cup of {x} have?", THINGS),
    ("How do I install {x} on Linux?", "What is the way to install {x} on Linux?", TOOLS),
    ("How do I read a file in {x}?", "How can I read a file using {x}?", TOOLS),
    ("What is {x} mainly used for?", "What do people mostly use {x} for?", TOOLS),
]
NEGATIONS = [
    ("Is {x} good for your health?", "Is {x} not good for your health?", THINGS),
    ("Should I drink {x} before running?", "Should I never drink {x} before running?", THINGS),
    ("Can I use {x} for web development?", "Can I not use {x} for web development?", TOOLS),
    ("Why is {x} safe to eat every day?", "Why is {x} not safe to eat every day?", THINGS),
    ("Is {x} a good first programming language?", "Is {x} not a good first programming language?", TOOLS),
    ("Do I need a visa to visit {x}?", "Do I not need a visa to visit {x}?", COUNTRIES),
    ("Is it easy to find work in {x}?", "Is it not easy to find work in {x}?", CITIES),
]
SWAPS = [
    ("How long is the flight from {x} to {y}?", "How long is the flight from {y} to {x}?", CITIES),
    ("Is {x} bigger than {y}?", "Is {y} bigger than {x}?", COUNTRIES),
    ("Did {x} send the report to {y}?", "Did {y} send the report to {x}?", PEOPLE),
    ("Convert a train ticket from {x} to {y}.", "Convert a train ticket from {y} to {x}.", CITIES),
    ("Why does {x} owe money to {y}?", "Why does {y} owe money to {x}?", PEOPLE),
    ("Is {x} faster than {y} for servers?", "Is {y} faster than {x} for servers?", TOOLS),
]
NUMBERS = [
    ("How many calories are in {n} eggs?", "How many calories are in {m} eggs?"),
    ("What is {n} plus {n}?", "What is {n} plus {m}?"),
    ("Convert {n} miles to kilometers.", "Convert {m} miles to kilometers."),
    ("What is the square root of {n}?", "What is the square root of {m}?"),
    ("Set a timer for {n} minutes.", "Set a timer for {m} minutes."),
    ("What happened in the year {y}?", "What happened in the year {z}?"),
    ("How much is {n} dollars in euros?", "How much is {m} dollars in euros?"),
]
ENTITIES = [
    ("What is the capital of {x}?", "What is the capital of {y}?", COUNTRIES),
    ("How do I read a file in {x}?", "How do I read a file in {y}?", TOOLS),
    ("What are the best things to do in {x}?", "What are the best things to do in {y}?", CITIES),
]


def pairs(rng: random.Random) -> list[dict[str, object]]:
    out: list[dict[str, object]] = []

    def add(a: str, b: str, kind: str, hit: bool) -> None:
        out.append({"a": a, "b": b, "kind": kind, "hit": hit})

    for a, b, values in PARAPHRASES:
        for x in rng.sample(values, min(len(values), 14)):
            add(a.format(x=x), b.format(x=x), "paraphrase", True)
    for a, b, values in NEGATIONS:
        for x in rng.sample(values, 7):
            add(a.format(x=x), b.format(x=x), "negation", False)
    for a, b, values in SWAPS:
        for _ in range(8):
            x, y = rng.sample(values, 2)
            add(a.format(x=x, y=y), b.format(x=x, y=y), "swapped_entities", False)
    for a, b in NUMBERS:
        for _ in range(7):
            n, m = rng.sample(range(2, 99), 2)
            y, z = rng.sample(range(1800, 2020), 2)
            add(a.format(n=n, m=m, y=y, z=z), b.format(n=n, m=m, y=y, z=z), "different_number", False)
    for a, b, values in ENTITIES:
        for _ in range(8):
            x, y = rng.sample(values, 2)
            add(a.format(x=x), b.format(y=y), "different_entity", False)
    # People type in lower case too: there the lexical guard sees no names, and cosine must decide.
    for row in rng.sample([r for r in out if r["kind"] in ("paraphrase", "different_entity")], 40):
        add(str(row["a"]).lower(), str(row["b"]).lower(), str(row["kind"]), bool(row["hit"]))
    return out


if __name__ == "__main__":
    target = Path(__file__).with_name("semantic_cache_pairs.jsonl")
    rows = pairs(random.Random(14))
    target.write_text("".join(json.dumps(row) + "\n" for row in rows))
    kinds: dict[str, int] = {}
    for row in rows:
        kinds[str(row["kind"])] = kinds.get(str(row["kind"]), 0) + 1
    print(f"{len(rows)} pairs -> {target}: {kinds}")
