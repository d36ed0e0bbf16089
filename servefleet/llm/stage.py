"""The model stage of an LLM pipeline: any :class:`~servefleet.llm.generator.TokenGenerator`,
served as a deployment. ``ModelInfer`` answers the whole text; ``ModelStreamInfer`` streams it.

Request: ``prompt`` BYTES [1], optional ``max_tokens`` INT32 [1]. Response: ``text`` BYTES [1] and
``pieces`` BYTES [n] (the text as generated, piece by piece); a stream yields ``token`` BYTES [1].
``generator`` is an import path, so a GPU engine replaces the CPU decoder by a spec change:
``init_args: {generator: "servefleet.llm.vllm_engine:VllmGenerator", model: ..., ...}``; the other
init_args go to the generator's constructor. The generator is closed as soon as its caller stops
reading (a cancelled request, a closed stream), so an engine can abort the request.
The answer's seed is derived from the prompt, so one prompt gets one answer (tests rely on it).
"""

from __future__ import annotations

import contextlib
import zlib
from collections.abc import AsyncGenerator, AsyncIterator
from typing import Any

import numpy as np

from servefleet.llm.generator import TokenGenerator
from servefleet.services.replica import import_object

Tensors = dict[str, np.ndarray]


class GeneratorStage:
    def __init__(
        self, *, generator: str = "servefleet.llm.tiny_gpt:TinyGPT", max_tokens: int = 64, **options: Any
    ):
        self.generator: TokenGenerator = import_object(generator)(**options)
        self.max_tokens = max_tokens

    async def __call__(self, inputs: Tensors) -> Tensors:
        async with contextlib.aclosing(self._generate(inputs)) as generated:
            pieces = [piece async for piece in generated]
        return {
            "text": np.array(["".join(pieces).encode()], np.object_),
            "pieces": np.array([p.encode() for p in pieces], np.object_),
        }

    async def stream(self, inputs: Tensors) -> AsyncIterator[Tensors]:
        async with contextlib.aclosing(self._generate(inputs)) as generated:
            async for piece in generated:
                yield {"token": np.array([piece.encode()], np.object_)}

    def _generate(self, inputs: Tensors) -> AsyncGenerator[str, None]:
        raw = inputs["prompt"].reshape(-1)[0]
        prompt = raw.decode() if isinstance(raw, bytes) else str(raw)
        limit = int(inputs["max_tokens"].reshape(-1)[0]) if "max_tokens" in inputs else self.max_tokens
        return self.generator.generate(prompt, max_tokens=limit, seed=zlib.crc32(prompt.encode()))
