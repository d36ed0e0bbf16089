"""The semantic cache's default threshold on the labelled pairs of tests/data (false-hit rate at most
1%, as chosen), and the lexical guard on the near-misses embeddings cannot separate."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np

from servefleet.semantic_cache.embedder import MiniLMEmbedder
from servefleet.semantic_cache.guard import compatible
from servefleet.semantic_cache.stage import DEFAULT_THRESHOLD

PAIRS = Path(__file__).parents[1] / "data" / "semantic_cache_pairs.jsonl"


def test_the_labelled_set_has_every_kind_of_pair() -> None:
    rows = [json.loads(line) for line in PAIRS.read_text().splitlines()]
    kinds = {r["kind"] for r in rows}
    assert len(rows) >= 300
    assert {"paraphrase", "negation", "swapped_entities", "different_number"} <= kinds


def test_default_threshold_false_hit_rate_is_at_most_one_percent() -> None:
    rows = [json.loads(line) for line in PAIRS.read_text().splitlines()]
    embedder = MiniLMEmbedder()
    a = embedder.embed([r["a"] for r in rows])
    b = embedder.embed([r["b"] for r in rows])
    served = ((a * b).sum(1) >= DEFAULT_THRESHOLD) & np.array([compatible(r["a"], r["b"]) for r in rows])
    should = np.array([r["hit"] for r in rows])
    assert (served & ~should).sum() / (~should).sum() <= 0.01
    assert (served & should).sum() / should.sum() >= 0.8  # and the cache still hits


def test_guard_separates_what_cosine_cannot() -> None:
    assert compatible("What is the capital of France?", "Which city is France's capital?")
    assert not compatible("flights from Paris to London", "flights from London to Paris")
    assert not compatible("Is coffee bad for you?", "Is coffee not bad for you?")
    assert not compatible("Why can I log in?", "Why can't I log in?")
    assert not compatible("calories in 2 eggs", "calories in 3 eggs")
    assert compatible("How do I install Go on Linux?", "What is the way to install Go on Linux?")
