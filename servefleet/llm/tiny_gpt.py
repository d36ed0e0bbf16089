"""A small GPT-style decoder in numpy: pre-norm blocks (causal self-attention + GELU MLP), a KV
cache, temperature sampling over printable ASCII. Its weights are random, generated from a seed
at start (nothing downloads), so its text is gibberish: it exists to cost what a decoder costs.

With the KV cache a new token attends over cached keys and values instead of re-running the whole
sequence, so each token costs one pass of the weights (about ``12 * layers * dim**2``
multiply-adds), and the prompt is encoded once, as a batch.
"""

from __future__ import annotations

import asyncio
from collections.abc import AsyncGenerator
from dataclasses import dataclass

import numpy as np

#: Token ids 0..94 are the printable ASCII characters 32..126; 95 ends the answer.
VOCAB = [chr(c) for c in range(32, 127)]
EOS = len(VOCAB)


@dataclass(frozen=True)
class Config:
    dim: int = 384
    layers: int = 6
    heads: int = 8
    context: int = 512
    temperature: float = 0.8
    weight_seed: int = 0
    #: False: never end before max_tokens (answers of a known length, for benchmarks and tests).
    eos: bool = True


class TinyGPT:
    """``generate`` runs each step in a worker thread, so the actor's event loop stays free."""

    def __init__(self, **config: float) -> None:
        self.config = Config(**config)  # type: ignore[arg-type]
        cfg = self.config
        if cfg.dim % cfg.heads:
            raise ValueError(f"dim {cfg.dim} is not a multiple of heads {cfg.heads}")
        rng = np.random.default_rng(cfg.weight_seed)

        def weight(*shape: int) -> np.ndarray:
            return (rng.standard_normal(shape, dtype=np.float32) * (1.0 / np.sqrt(shape[0]))).astype(
                np.float32
            )

        d = cfg.dim
        self.embed = weight(EOS + 1, d)
        self.position = weight(cfg.context, d) * 0.1
        self.blocks = [
            {"qkv": weight(d, 3 * d), "proj": weight(d, d), "up": weight(d, 4 * d), "down": weight(4 * d, d)}
            for _ in range(cfg.layers)
        ]
        self.head = weight(d, EOS + 1)

    async def generate(self, prompt: str, *, max_tokens: int, seed: int) -> AsyncGenerator[str, None]:
        loop = asyncio.get_running_loop()
        rng = np.random.default_rng(seed)
        ids = [min(max(ord(ch) - 32, 0), EOS - 1) for ch in prompt][-(self.config.context // 2) :] or [0]
        cache: list[tuple[np.ndarray, np.ndarray]] = []
        logits = await loop.run_in_executor(None, self._forward, np.array(ids), 0, cache)
        for step in range(min(max_tokens, self.config.context - len(ids))):
            token = self._sample(logits, rng)
            if token == EOS:
                return
            yield VOCAB[token]
            logits = await loop.run_in_executor(
                None, self._forward, np.array([token]), len(ids) + step, cache
            )

    def _sample(self, logits: np.ndarray, rng: np.random.Generator) -> int:
        if not self.config.eos:
            logits = logits.copy()
            logits[EOS] = -np.inf
        scaled = logits / self.config.temperature
        probs = np.exp(scaled - scaled.max())
        return int(rng.choice(len(probs), p=probs / probs.sum()))

    def _forward(self, ids: np.ndarray, start: int, cache: list[tuple[np.ndarray, np.ndarray]]) -> np.ndarray:
        """Logits after the last of ``ids`` (at positions ``start...``); appends to the KV cache."""
        cfg = self.config
        x = self.embed[ids] + self.position[start : start + len(ids)]
        heads, width = cfg.heads, cfg.dim // cfg.heads
        for layer, block in enumerate(self.blocks):
            q, k, v = np.split(_norm(x) @ block["qkv"], 3, axis=-1)
            if layer < len(cache):
                k = np.concatenate([cache[layer][0], k])
                v = np.concatenate([cache[layer][1], v])
                cache[layer] = (k, v)
            else:
                cache.append((k, v))
            qh = q.reshape(len(ids), heads, width).transpose(1, 0, 2)
            kh = k.reshape(len(k), heads, width).transpose(1, 2, 0)
            vh = v.reshape(len(v), heads, width).transpose(1, 0, 2)
            scores = (qh @ kh) / np.sqrt(width)  # heads x new x all
            causal = np.arange(len(k))[None, :] > (start + np.arange(len(ids)))[:, None]
            scores = np.where(causal[None], -1e9, scores)
            weights = np.exp(scores - scores.max(-1, keepdims=True))
            weights /= weights.sum(-1, keepdims=True)
            attended = (weights @ vh).transpose(1, 0, 2).reshape(len(ids), cfg.dim)
            x = x + attended @ block["proj"]
            hidden = _norm(x) @ block["up"]
            x = (
                x
                + (0.5 * hidden * (1 + np.tanh(0.7978845608 * (hidden + 0.044715 * hidden**3))))
                @ block["down"]
            )
        return (_norm(x[-1]) @ self.head).astype(np.float64)


def _norm(x: np.ndarray) -> np.ndarray:
    return (x - x.mean(-1, keepdims=True)) / np.sqrt(x.var(-1, keepdims=True) + 1e-5)
