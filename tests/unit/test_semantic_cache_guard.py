"""The semantic cache's default threshold on the labelled pairs of tests/data (false-hit rate at most
1% on the template-made and on the hand-written set, as chosen), and the lexical guard on the
near-misses embeddings cannot separate."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest

from servefleet.semantic_cache.embedder import MiniLMEmbedder
from servefleet.semantic_cache.guard import compatible
from servefleet.semantic_cache.stage import DEFAULT_THRESHOLD

DATA = Path(__file__).parents[1] / "data"
# (file, recall the default threshold keeps at least): measured 0.989 and 0.676 (bench/semantic_cache.py)
SETS = {
    "template": ("semantic_cache_pairs.jsonl", 0.95),
    "natural": ("semantic_cache_pairs_natural.jsonl", 0.6),
}


def rows(name: str) -> list[dict[str, object]]:
    return [json.loads(line) for line in (DATA / SETS[name][0]).read_text().splitlines()]


@pytest.fixture(scope="module")
def embedder() -> MiniLMEmbedder:
    return MiniLMEmbedder()


def test_the_labelled_sets_have_every_kind_of_pair() -> None:
    template, natural = rows("template"), rows("natural")
    assert len(template) >= 300 and len(natural) >= 300
    assert {"paraphrase", "negation", "swapped_entities", "different_number"} <= {r["kind"] for r in template}
    assert {
        "paraphrase",
        "negation",
        "swapped_entities",
        "different_number",
        "different_entity",
        "antonym",
        "added_constraint",
    } == {r["kind"] for r in natural}
    assert all(r["hit"] == (r["kind"] == "paraphrase") for r in template + natural)
    assert len({(r["a"], r["b"]) for r in natural}) == len(natural)  # no pair twice


@pytest.mark.parametrize("name", SETS)
def test_default_threshold_false_hit_rate_is_at_most_one_percent(name: str, embedder: MiniLMEmbedder) -> None:
    pairs = rows(name)
    a = embedder.embed([str(r["a"]) for r in pairs])
    b = embedder.embed([str(r["b"]) for r in pairs])
    guard = np.array([compatible(str(r["a"]), str(r["b"])) for r in pairs])
    served = ((a * b).sum(1) >= DEFAULT_THRESHOLD) & guard
    should = np.array([r["hit"] for r in pairs])
    assert (served & ~should).sum() / (~should).sum() <= 0.01
    assert (served & should).sum() / should.sum() >= SETS[name][1]  # and the cache still hits


@pytest.mark.parametrize(
    ("a", "b"),
    [
        ("What is the capital of France?", "Which city is France's capital?"),
        ("How do I install Go on Linux?", "What is the way to install Go on Linux?"),
        ("How do I reverse a list in Python?", "how do i reverse a python list"),  # case
        ("Can I use the same account on two devices?", "Can I use one account on 2 devices?"),
        ("How do I get to Tokyo from Paris?", "What's the way to travel from Paris to Tokyo?"),
        ("Should I learn React or Vue first?", "which should i learn first, react or vue?"),
        ("What is the difference between let and const?", "let vs const, what's the difference?"),
        ("Is it unsafe to eat raw eggs?", "Is it not safe to eat raw eggs?"),
        ("How do I speed up my slow computer?", "my computer is slow, how can i make it faster"),
        ("How do I contact support?", "Hi! Could you please tell me how to contact support?"),
    ],
)
def test_guard_lets_paraphrases_through(a: str, b: str) -> None:
    assert compatible(a, b) and compatible(b, a)


@pytest.mark.parametrize(
    ("a", "b"),
    [
        ("flights from Paris to London", "flights from London to Paris"),
        ("flights from new york to chicago", "flights from chicago to new york"),  # lower case
        ("Is tea healthier than coffee?", "is coffee healthier than tea"),
        ("Can a dog eat cat food?", "Can a cat eat dog food?"),
        ("Why did Germany declare war on France?", "Why did France declare war on Germany?"),
        ("Can I substitute butter for oil?", "can i substitute oil for butter"),
        ("Is coffee bad for you?", "Is coffee not bad for you?"),
        ("Why can I log in?", "Why can't I log in?"),
        ("Is the flight refundable?", "Is the flight non-refundable?"),
        ("calories in 2 eggs", "calories in 3 eggs"),
        ("Can I take two ibuprofen?", "Can I take 3 ibuprofen?"),
        ("How do I enable dark mode?", "How do I disable dark mode?"),
        ("How do I turn on notifications?", "how do i turn off notifications"),
        ("Should I eat before a workout?", "Should I eat after a workout?"),
        ("Remind me in 10 minutes", "remind me in 10 hours"),
        ("Is 38 degrees Celsius a fever?", "is 38 degrees fahrenheit a fever"),
        ("How do I reset my password on Netflix?", "How do I reset my password on Spotify?"),
        ("Give me a recipe for lasagna.", "Give me a recipe for vegan lasagna."),
        ("What are good places to eat in Tokyo?", "Good places to eat in Tokyo for vegetarians?"),
    ],
)
def test_guard_blocks_what_cosine_cannot_separate(a: str, b: str) -> None:
    assert not compatible(a, b) and not compatible(b, a)
