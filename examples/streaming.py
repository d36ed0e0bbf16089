"""A streaming model (ModelStreamInfer): yields one response per token, like a text generator.

Input ``prompt`` BYTES [1] and ``count`` INT32 [1]; yields ``token`` BYTES [1] ``count`` times.
"""

from __future__ import annotations

import asyncio
from collections.abc import AsyncIterator

import numpy as np


class TokenStreamer:
    def __init__(self, delay_ms: float = 5.0) -> None:
        self.delay_s = delay_ms / 1000

    async def __call__(self, inputs: dict[str, np.ndarray]) -> AsyncIterator[dict[str, np.ndarray]]:
        prompt = inputs["prompt"].reshape(-1)[0]
        prompt = prompt.decode() if isinstance(prompt, bytes) else str(prompt)
        for i in range(int(inputs["count"].reshape(-1)[0])):
            await asyncio.sleep(self.delay_s)
            yield {"token": np.array([f"{prompt}-{i}".encode()], dtype=np.object_)}
