"""What the model stage drives: a token generator. A GPU engine drops in behind the same interface.

``TokenGenerator.generate(prompt, max_tokens=..., seed=...)`` is an async generator of the answer's
text pieces as they are produced; the stage closes it when its caller goes away (or cancels the
task awaiting it), so an engine can stop the request. :class:`~servefleet.llm.tiny_gpt.TinyGPT`
implements it on CPU; :class:`~servefleet.llm.vllm_engine.VllmGenerator` wraps vLLM's
``AsyncLLMEngine`` on GPU nodes.
"""

from __future__ import annotations

from collections.abc import AsyncGenerator
from typing import Protocol, runtime_checkable


@runtime_checkable
class TokenGenerator(Protocol):
    def generate(self, prompt: str, *, max_tokens: int, seed: int) -> AsyncGenerator[str, None]:
        """The answer to ``prompt``, one piece (token) at a time, at most ``max_tokens`` pieces;
        the same ``seed`` gives the same answer."""
        ...
