"""What the model stage drives: a token generator. A GPU engine drops in behind the same interface.

``TokenGenerator.generate(prompt, max_tokens=..., seed=...)`` yields the answer's text pieces as
they are produced. :class:`~servefleet.llm.tiny_gpt.TinyGPT` implements it on CPU; a vLLM engine
would implement it by wrapping ``AsyncLLMEngine.generate`` and yielding each output's new text.
"""

from __future__ import annotations

from collections.abc import AsyncIterator
from typing import Protocol, runtime_checkable


@runtime_checkable
class TokenGenerator(Protocol):
    def generate(self, prompt: str, *, max_tokens: int, seed: int) -> AsyncIterator[str]:
        """The answer to ``prompt``, one piece (token) at a time, at most ``max_tokens`` pieces;
        the same ``seed`` gives the same answer."""
        ...
