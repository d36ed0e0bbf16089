"""A model whose latency varies: each call sleeps a random time (async, so a replica overlaps
many calls), the shape of real models with long tails. ``fail_on`` makes a call raise on purpose.

Input ``x`` FP32 [-1]; output ``y`` = 2x FP32 [-1]. :class:`Relay` is a pipeline stage in front of
it (``kind: pipeline``): it hands every request to the one stage it calls.
"""

from __future__ import annotations

import asyncio
import random
from typing import Any

import numpy as np


class VariableLatency:
    def __init__(self, min_ms: float = 1.0, max_ms: float = 20.0, fail_on: float | None = None) -> None:
        self.min_s, self.max_s = min_ms / 1000, max_ms / 1000
        self.fail_on = fail_on

    async def __call__(self, inputs: dict[str, np.ndarray]) -> dict[str, np.ndarray]:
        x = inputs["x"]
        if self.fail_on is not None and np.any(x == self.fail_on):
            raise ValueError(f"input contains {self.fail_on}, which this model refuses")
        await asyncio.sleep(random.uniform(self.min_s, self.max_s))
        return {"y": (2 * x).astype(np.float32)}


class Relay:
    """A pipeline stage that passes each request on to its callee (the handle the pipeline hands
    it as a keyword argument named after the callee stage)."""

    def __init__(self, **callees: Any) -> None:
        if len(callees) != 1:
            raise ValueError(f"Relay calls exactly one stage; its edges name {sorted(callees) or 'none'}")
        (self.callee,) = callees.values()

    async def __call__(self, inputs: dict[str, np.ndarray]) -> dict[str, np.ndarray]:
        return dict(await self.callee.infer(inputs))
