"""The CPU decoder of the model stage: its KV cache gives the logits a full recompute gives, and a
prompt's seed fixes its answer."""

from __future__ import annotations

import numpy as np

from servefleet.llm.generator import TokenGenerator
from servefleet.llm.tiny_gpt import TinyGPT


def test_kv_cache_matches_a_full_forward_pass() -> None:
    model = TinyGPT(dim=32, layers=2, heads=4)
    ids = np.array([5, 17, 3, 42, 8, 60])
    full = model._forward(ids, 0, [])
    cache: list[tuple[np.ndarray, np.ndarray]] = []
    model._forward(ids[:3], 0, cache)
    for position in range(3, len(ids)):
        step = model._forward(ids[position : position + 1], position, cache)
    np.testing.assert_allclose(step, full, rtol=1e-4, atol=1e-4)


async def test_same_seed_same_answer_and_eos_off_fills_max_tokens() -> None:
    model = TinyGPT(dim=32, layers=1, heads=2, eos=False)
    assert isinstance(model, TokenGenerator)
    first = [p async for p in model.generate("hello", max_tokens=20, seed=7)]
    again = [p async for p in model.generate("hello", max_tokens=20, seed=7)]
    assert first == again and len(first) == 20 and all(len(p) == 1 for p in first)
