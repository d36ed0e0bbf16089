"""The cache stage of an LLM pipeline: answer a prompt from an earlier, similar one, else ask the
model stage and keep its answer.

Request: ``prompt`` BYTES [1]; KServe parameters ``cache`` (bool, default true: false skips lookup
and store), ``tenant`` (str: answers are never shared across tenants) and ``max_tokens`` (int).
Response: ``text`` BYTES [1], ``cache_hit`` BOOL [1], ``similarity`` FP32 [1] (of the closest
entry seen, 0 when none); a stream yields ``token`` BYTES [1] chunks with the same two flags, and a
hit replays the stored answer piece by piece.

A hit needs: same app (the Redis keys are the app's), same tenant and model version (the index is
partitioned by both, and the entry's own fields are checked again), cosine similarity >=
``threshold``, and, unless ``guard`` is off, the lexical check of :mod:`.guard`. The model version
is the app's version unless ``model_version`` pins one (then a new app version keeps the cache).
When Redis is unreachable the stage answers from the model and says it missed: the cache is an
optimisation, never a reason for a request to fail.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
from collections.abc import AsyncIterator
from dataclasses import dataclass
from typing import Any

import numpy as np

from servefleet.common.redis_target import RedisTarget, TargetSource
from servefleet.semantic_cache.embedder import MiniLMEmbedder
from servefleet.semantic_cache.guard import compatible
from servefleet.semantic_cache.index import Partition, VectorIndex
from servefleet.semantic_cache.store import CacheStore, Change, Entry
from servefleet.services import context

log = logging.getLogger(__name__)

#: Chosen by bench/semantic_cache.py's rule on tests/data's template-made and hand-written pairs:
#: the highest threshold whose false-hit rate (guard on) is <= 1% on both and whose pooled recall
#: is >= 95% of the best such recall. On the held-out pairs it is far worse (tests/data/README.md).
DEFAULT_THRESHOLD = 0.87
Tensors = dict[str, np.ndarray]


@dataclass(frozen=True)
class Lookup:
    entry: Entry | None
    similarity: float
    embedding: np.ndarray | None  # None when the cache was skipped or unreachable


class SemanticCacheStage:
    """``model``: the stage handle of the model stage (the pipeline passes it, edge ``cache -> model``)."""

    def __init__(
        self,
        model: Any,
        *,
        threshold: float = DEFAULT_THRESHOLD,
        guard: bool = True,
        ttl_s: int = 24 * 3600,
        max_entries: int = 100_000,
        max_tokens: int = 64,
        model_version: str = "",
        redis: str | RedisTarget | TargetSource = "",
        candidates: int = 4,
    ) -> None:
        deployment = context.deployment()
        address = redis or deployment.redis_source or deployment.redis
        if not address:
            raise ValueError("the semantic cache needs Redis: init_args.redis, or a cluster started with one")
        if not 0 < threshold <= 1:
            raise ValueError(f"threshold must be in (0, 1], got {threshold}")
        self.model = model
        self.threshold = threshold
        self.guard = guard
        self.max_tokens = max_tokens
        self.candidates = candidates
        self.version = model_version or deployment.version
        self.store = CacheStore(address, deployment.app, ttl_s=ttl_s, max_entries=max_entries)
        self.embedder = MiniLMEmbedder()
        self.index = VectorIndex()
        self.hits = self.misses = self.errors = 0
        self._synced = asyncio.Event()
        self._sync = asyncio.get_running_loop().create_task(self._follow())

    async def __call__(self, inputs: Tensors) -> Tensors:
        prompt, partition, use_cache, max_tokens = self._request(inputs)
        found = await self._lookup(prompt, partition) if use_cache else Lookup(None, 0.0, None)
        if found.entry is not None:
            return _answer(found.entry.answer, True, found.similarity)
        out = await self.model.infer(_model_inputs(prompt, max_tokens))
        text = _text(out["text"])
        await self._store(prompt, partition, found, text, [_text(p) for p in out["pieces"].reshape(-1)])
        return _answer(text, False, found.similarity)

    async def stream(self, inputs: Tensors) -> AsyncIterator[Tensors]:
        prompt, partition, use_cache, max_tokens = self._request(inputs)
        found = await self._lookup(prompt, partition) if use_cache else Lookup(None, 0.0, None)
        if found.entry is not None:
            for piece in found.entry.pieces:
                yield _piece(piece, True, found.similarity)
            return
        pieces: list[str] = []
        async for chunk in self.model.stream(_model_inputs(prompt, max_tokens)):
            pieces.append(_text(chunk["token"]))
            yield _piece(pieces[-1], False, found.similarity)
        await self._store(prompt, partition, found, "".join(pieces), pieces)  # only a complete answer

    def _request(self, inputs: Tensors) -> tuple[str, Partition, bool, int]:
        params = context.current().parameters
        tenant = str(params.get("tenant", ""))
        max_tokens = int(params.get("max_tokens", self.max_tokens))
        return _text(inputs["prompt"]), (tenant, self.version), bool(params.get("cache", True)), max_tokens

    async def _lookup(self, prompt: str, partition: Partition) -> Lookup:
        loop = asyncio.get_running_loop()
        embedding = (await loop.run_in_executor(None, self.embedder.embed, [prompt]))[0]
        if not self._synced.is_set():  # a fresh replica: its index is being rebuilt from Redis
            with contextlib.suppress(TimeoutError):
                await asyncio.wait_for(self._synced.wait(), 5.0)
        near = self.index.search(partition, embedding, self.candidates)
        best = near[0][1] if near else 0.0
        near = [(i, s) for i, s in near if s >= self.threshold]
        try:
            entries = await self.store.get(i for i, _ in near)
        except Exception as exc:  # Redis down: answer from the model
            self.store.forget(exc)
            self.errors += 1
            log.warning("semantic cache lookup failed: %s", exc)
            return Lookup(None, best, None)
        for entry_id, similarity in near:
            entry = entries.get(entry_id)
            if entry is None:
                self.index.remove(entry_id)  # expired or evicted
            elif (entry.tenant, entry.version) == partition and (
                not self.guard or compatible(prompt, entry.prompt)
            ):
                self.hits += 1
                with contextlib.suppress(Exception):
                    await self.store.touch(entry_id)
                return Lookup(entry, similarity, embedding)
        self.misses += 1
        return Lookup(None, best, embedding)

    async def _store(
        self, prompt: str, partition: Partition, found: Lookup, text: str, pieces: list[str]
    ) -> None:
        if found.embedding is None:
            return
        try:
            entry_id = await self.store.put(prompt, partition, found.embedding, text, pieces)
        except Exception as exc:
            self.store.forget(exc)
            self.errors += 1
            log.warning("semantic cache store failed: %s", exc)
            return
        self.index.add(partition, entry_id, found.embedding)  # read your own write at once

    async def _follow(self) -> None:
        """Rebuild the index from Redis, then apply the change feed; start over after an error."""
        backoff = 0.1
        while True:
            try:
                position = await self.store.feed_position()
                async for change in self.store.snapshot():
                    self._apply(change)
                self._synced.set()
                backoff = 0.1
                while True:
                    position, changes = await self.store.changes(position, block_ms=1000)
                    for change in changes:
                        self._apply(change)
            except asyncio.CancelledError:
                raise
            except Exception as exc:
                self.store.forget(exc)
                log.warning("semantic cache sync: %s; retrying", exc)
                await asyncio.sleep(backoff)
                backoff = min(backoff * 2, 5.0)

    def _apply(self, change: Change) -> None:
        if change.op == "add" and change.embedding is not None:
            self.index.add(change.partition, change.id, change.embedding)
        elif change.op == "del":
            self.index.remove(change.id)


def _text(value: Any) -> str:
    item = np.asarray(value).reshape(-1)[0] if isinstance(value, np.ndarray) else value
    return item.decode() if isinstance(item, bytes) else str(item)


def _model_inputs(prompt: str, max_tokens: int) -> Tensors:
    return {"prompt": np.array([prompt.encode()], np.object_), "max_tokens": np.array([max_tokens], np.int32)}


def _answer(text: str, hit: bool, similarity: float) -> Tensors:
    return {
        "text": np.array([text.encode()], np.object_),
        "cache_hit": np.array([hit]),
        "similarity": np.array([similarity], np.float32),
    }


def _piece(piece: str, hit: bool, similarity: float) -> Tensors:
    return {
        "token": np.array([piece.encode()], np.object_),
        "cache_hit": np.array([hit]),
        "similarity": np.array([similarity], np.float32),
    }
