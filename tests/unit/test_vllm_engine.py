"""The vLLM generator against a fake ``vllm`` module (no GPU, no vllm install): it streams each
output's new text, carries max_tokens and the seed into SamplingParams, and aborts the engine's
request when its caller goes away or the engine overruns max_tokens."""

from __future__ import annotations

import asyncio
import sys
from collections.abc import AsyncIterator
from types import ModuleType, SimpleNamespace
from typing import Any

import numpy as np
import pytest

from servefleet.llm.generator import TokenGenerator
from servefleet.llm.stage import GeneratorStage
from servefleet.llm.vllm_engine import VllmGenerator

TOKENS = ["Hel", "lo", ",", " wor", "ld", "!"]


class FakeEngine:
    """AsyncLLMEngine's calls the generator uses; outputs are cumulative, as vLLM's default."""

    def __init__(self, args: Any):
        self.args = args
        self.honour_max_tokens = True
        self.delay_s = 0.0
        self.requests: list[tuple[str, Any, str]] = []
        self.produced = 0
        self.aborted: list[str] = []

    @classmethod
    def from_engine_args(cls, args: Any) -> FakeEngine:
        return cls(args)

    async def generate(self, prompt: str, params: Any, request_id: str) -> AsyncIterator[Any]:
        self.requests.append((prompt, params, request_id))
        limit = params.max_tokens if self.honour_max_tokens else len(TOKENS)
        text = ""
        for i, token in enumerate(TOKENS[:limit]):
            if i:
                await asyncio.sleep(self.delay_s)
            text += token
            self.produced += 1
            last = i == min(limit, len(TOKENS)) - 1
            yield SimpleNamespace(outputs=[SimpleNamespace(text=text)], finished=last)

    async def abort(self, request_id: str) -> None:
        self.aborted.append(request_id)


class FakeArgs:
    def __init__(self, **kwargs: Any):
        self.kwargs = kwargs


@pytest.fixture
def fake_vllm(monkeypatch: pytest.MonkeyPatch) -> ModuleType:
    module = ModuleType("vllm")
    module.AsyncEngineArgs = FakeArgs  # type: ignore[attr-defined]
    module.AsyncLLMEngine = FakeEngine  # type: ignore[attr-defined]
    module.SamplingParams = SimpleNamespace  # type: ignore[attr-defined]
    monkeypatch.setitem(sys.modules, "vllm", module)
    return module


def generator(**kwargs: Any) -> tuple[VllmGenerator, FakeEngine]:
    made = VllmGenerator(model="/models/tiny", **kwargs)
    assert isinstance(made.engine, FakeEngine)
    return made, made.engine


async def test_streams_each_new_piece_with_max_tokens_and_seed(fake_vllm: ModuleType) -> None:
    made, engine = generator(engine_args={"gpu_memory_utilization": 0.8}, sampling={"temperature": 0})
    assert isinstance(made, TokenGenerator)
    assert engine.args.kwargs == {"model": "/models/tiny", "gpu_memory_utilization": 0.8}
    seen = []
    async for piece in made.generate("hi", max_tokens=16, seed=7):
        seen.append((piece, engine.produced))
    assert [p for p, _ in seen] == TOKENS
    assert [n for _, n in seen] == list(range(1, len(TOKENS) + 1))  # each as it comes, not at the end
    ((prompt, params, _),) = engine.requests
    assert prompt == "hi" and (params.max_tokens, params.seed, params.temperature) == (16, 7, 0)
    assert engine.aborted == []  # finished: nothing to abort


async def test_max_tokens_bounds_the_answer_and_an_overrun_is_aborted(fake_vllm: ModuleType) -> None:
    made, engine = generator()
    assert [p async for p in made.generate("hi", max_tokens=3, seed=1)] == TOKENS[:3]
    assert engine.aborted == []
    engine.honour_max_tokens = False  # an engine that streams past max_tokens is cut and stopped
    assert [p async for p in made.generate("hi", max_tokens=2, seed=1)] == TOKENS[:2]
    assert engine.aborted == [engine.requests[-1][2]]


async def test_cancelled_caller_aborts_the_engine_request(fake_vllm: ModuleType) -> None:
    made, engine = generator()
    engine.delay_s = 30
    first = asyncio.Event()

    async def consume() -> None:
        async for _ in made.generate("hi", max_tokens=16, seed=1):
            first.set()

    task = asyncio.create_task(consume())
    await asyncio.wait_for(first.wait(), 10)
    task.cancel()
    with pytest.raises(asyncio.CancelledError):
        await task
    assert engine.aborted == [engine.requests[0][2]] and engine.produced == 1


async def test_the_model_stage_closing_its_stream_aborts_the_engine_request(
    fake_vllm: ModuleType,
) -> None:
    stage = GeneratorStage(generator="servefleet.llm.vllm_engine:VllmGenerator", model="/models/tiny")
    engine = stage.generator.engine  # type: ignore[attr-defined]
    engine.delay_s = 30
    stream = stage.stream({"prompt": np.array([b"hi"], np.object_)})
    assert bytes((await anext(stream))["token"][0]) == b"Hel"
    await stream.aclose()  # the client went away after one token
    assert engine.aborted == [engine.requests[0][2]]
    out = await GeneratorStage(
        generator="servefleet.llm.vllm_engine:VllmGenerator", model="/models/tiny", max_tokens=4
    )({"prompt": np.array([b"hi"], np.object_)})
    assert bytes(out["text"][0]) == b"".join(t.encode() for t in TOKENS[:4])


def test_without_vllm_the_error_says_what_to_install(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setitem(sys.modules, "vllm", None)  # import vllm -> ImportError
    with pytest.raises(ImportError, match="needs the vllm package"):
        VllmGenerator(model="/models/tiny")


def test_sampling_may_not_change_the_streamed_output(fake_vllm: ModuleType) -> None:
    with pytest.raises(ValueError, match="output_kind"):
        VllmGenerator(model="/models/tiny", sampling={"output_kind": 1})
