"""A :class:`~servefleet.llm.generator.TokenGenerator` over vLLM's ``AsyncLLMEngine``: the model
stage's generator on GPU nodes.

    init_args: {generator: "servefleet.llm.vllm_engine:VllmGenerator", model: /models/llama-3-8b,
                engine_args: {gpu_memory_utilization: 0.85, max_model_len: 4096},
                sampling: {temperature: 0.7, top_p: 0.95}}

``vllm`` is imported when the class is constructed, so servefleet needs no vllm install; the
nodes that run the stage need it (and the model's weights on local disk: nothing downloads at run
time), with ``resources: {num_gpus: 1}`` so Ray places the stage there and sets
``CUDA_VISIBLE_DEVICES``. Written against vLLM 0.33's API (``AsyncEngineArgs``,
``AsyncLLMEngine.from_engine_args``, ``generate(prompt, SamplingParams, request_id)`` yielding
cumulative ``RequestOutput``s, ``abort(request_id)``); tested with a fake engine only, never on a
GPU.

Each call is one engine request with its own id and ``SamplingParams(max_tokens, seed, **sampling)``
(the stage derives the seed from the prompt, so a seeded sampler answers a prompt the same way
each time). It yields each output's new text; when the caller goes away first (cancelled by a
deadline or a client, or the generator closed), the request is aborted in the engine, so the GPU
stops spending tokens on an answer nobody reads.
"""

from __future__ import annotations

import contextlib
import importlib
import uuid
from collections.abc import AsyncGenerator
from types import ModuleType
from typing import Any


class VllmGenerator:
    def __init__(
        self,
        *,
        model: str,
        engine_args: dict[str, Any] | None = None,
        sampling: dict[str, Any] | None = None,
    ):
        self._vllm = _import_vllm()
        self.sampling = dict(sampling or {})
        if "output_kind" in self.sampling or "n" in self.sampling:
            raise ValueError(
                "VllmGenerator: sampling may not set output_kind or n (it streams one cumulative "
                "completion per request)"
            )
        args = self._vllm.AsyncEngineArgs(model=model, **(engine_args or {}))
        self.engine = self._vllm.AsyncLLMEngine.from_engine_args(args)

    async def generate(self, prompt: str, *, max_tokens: int, seed: int) -> AsyncGenerator[str, None]:
        params = self._vllm.SamplingParams(max_tokens=max_tokens, seed=seed, **self.sampling)
        request_id = f"servefleet-{uuid.uuid4().hex}"
        finished = False
        sent = pieces = 0
        try:
            async with contextlib.aclosing(self.engine.generate(prompt, params, request_id)) as outputs:
                async for output in outputs:
                    text = output.outputs[0].text  # the completion so far
                    finished = bool(output.finished)
                    if len(text) > sent:
                        yield text[sent:]
                        sent, pieces = len(text), pieces + 1
                    if pieces >= max_tokens and not finished:
                        break  # the engine gave more than asked for: stop it there
        finally:
            if not finished:  # cancelled, closed, failed or cut short: free the engine's slot
                await self.engine.abort(request_id)


def _import_vllm() -> ModuleType:
    try:
        return importlib.import_module("vllm")
    except ImportError as exc:
        raise ImportError(
            "servefleet.llm.vllm_engine:VllmGenerator needs the vllm package on the nodes that run "
            f"the model stage (pip install vllm, on a GPU node): {exc}"
        ) from exc
