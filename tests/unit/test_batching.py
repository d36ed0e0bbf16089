"""Server-side batching: one model call per batch, each caller gets its own rows back."""

from __future__ import annotations

import asyncio

import numpy as np
import pytest

from servefleet.services.batching import Batcher, join, split

Tensors = dict[str, np.ndarray]


async def test_requests_in_the_window_share_one_call() -> None:
    calls: list[int] = []

    async def model(inputs: Tensors) -> Tensors:
        calls.append(len(inputs["x"]))
        return {"y": inputs["x"] * 10}

    batcher = Batcher(model, max_batch_size=8, wait_s=0.05)
    results = await asyncio.gather(*(batcher.submit({"x": np.array([i, i])}) for i in range(3)))
    assert calls == [6]
    assert [r["y"].tolist() for r in results] == [[0, 0], [10, 10], [20, 20]]


async def test_full_batch_flushes_without_waiting_and_rest_follows() -> None:
    calls: list[int] = []

    async def model(inputs: Tensors) -> Tensors:
        calls.append(len(inputs["x"]))
        return {"y": inputs["x"]}

    batcher = Batcher(model, max_batch_size=2, wait_s=0.01)
    await asyncio.gather(*(batcher.submit({"x": np.array([i])}) for i in range(5)))
    assert sorted(calls) == [1, 2, 2]


async def test_model_error_reaches_every_caller_of_the_batch() -> None:
    async def model(inputs: Tensors) -> Tensors:
        raise RuntimeError("boom")

    batcher = Batcher(model, max_batch_size=4, wait_s=0.01)
    results = await asyncio.gather(
        *(batcher.submit({"x": np.array([1])}) for _ in range(2)), return_exceptions=True
    )
    assert all(isinstance(r, RuntimeError) for r in results)


def test_join_and_split_check_shapes() -> None:
    with pytest.raises(ValueError, match="disagree"):
        join([{"x": np.ones(1)}, {"z": np.ones(1)}])
    with pytest.raises(ValueError, match="rows"):
        split({"y": np.ones(3)}, [1, 1])
