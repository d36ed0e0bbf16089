"""OpenTelemetry: a tracer provider configured from the standard ``OTEL_*`` variables, and gRPC
interceptors that carry W3C trace context in metadata so one trace spans SDK, proxy and replica.

``OTEL_SERVICE_NAME`` / ``OTEL_RESOURCE_ATTRIBUTES`` / ``OTEL_TRACES_SAMPLER`` are read by the SDK
itself; ``OTEL_TRACES_EXPORTER`` picks the exporter: ``none`` (default; spans are still created and
propagated), ``console``, or ``otlp`` (needs ``opentelemetry-exporter-otlp`` installed).

Sampling is parent-based: a request follows its caller's decision (a sampled caller gets every
span downstream, an unsampled one none), and a trace that starts here is recorded with probability
``SERVEFLEET_TRACE_SAMPLE_RATIO`` (default 0.01) unless ``OTEL_TRACES_SAMPLER`` is set. An unsampled
server call costs no span at all: its context is only passed on, so the decision travels.
"""

from __future__ import annotations

import os
from collections.abc import Callable, Iterator, MutableMapping, Sequence
from contextlib import contextmanager
from typing import Any

import grpc
from opentelemetry import context as otel_context
from opentelemetry import propagate, trace
from opentelemetry.sdk.resources import Resource
from opentelemetry.sdk.trace import SpanProcessor, TracerProvider
from opentelemetry.sdk.trace.export import BatchSpanProcessor, ConsoleSpanExporter, SpanExporter
from opentelemetry.sdk.trace.sampling import ParentBased, Sampler, TraceIdRatioBased
from opentelemetry.trace import Span, SpanKind, Status, StatusCode

from servefleet.common.config import settings

_configured = False


def _exporter_from_env() -> SpanExporter | None:
    name = os.environ.get("OTEL_TRACES_EXPORTER", "none").strip().lower()
    if name in ("", "none"):
        return None
    if name == "console":
        return ConsoleSpanExporter()
    if name == "otlp":
        from opentelemetry.exporter.otlp.proto.grpc.trace_exporter import (
            OTLPSpanExporter,
        )

        return OTLPSpanExporter()
    raise ValueError(f"OTEL_TRACES_EXPORTER={name!r} is not supported; use none, console or otlp")


def setup_tracing(service: str, *, processor: SpanProcessor | None = None) -> TracerProvider:
    """Install the global tracer provider once per process (later calls only add ``processor``)."""
    global _configured
    provider = trace.get_tracer_provider()
    if not _configured or not isinstance(provider, TracerProvider):
        os.environ.setdefault("OTEL_SERVICE_NAME", service)
        sampler = None if os.environ.get("OTEL_TRACES_SAMPLER") else _default_sampler()
        provider = TracerProvider(resource=Resource.create(), sampler=sampler)
        exporter = _exporter_from_env()
        if exporter is not None:
            provider.add_span_processor(BatchSpanProcessor(exporter))
        trace.set_tracer_provider(provider)
        _configured = True
    if processor is not None:
        provider.add_span_processor(processor)
    return provider


def _default_sampler() -> Sampler:
    return ParentBased(TraceIdRatioBased(settings.trace_sample_ratio))


tracer = trace.get_tracer("servefleet")

Metadata = Sequence[tuple[str, str | bytes]]


def extract_context(metadata: Metadata | None) -> otel_context.Context:
    carrier = {k: v.decode() if isinstance(v, bytes) else v for k, v in (metadata or ())}
    return propagate.extract(carrier)


def inject_metadata(metadata: Metadata | None) -> list[tuple[str, str | bytes]]:
    """The given metadata plus the current trace context (traceparent, tracestate)."""
    carrier: MutableMapping[str, str] = {}
    propagate.inject(carrier)
    return [*(metadata or ()), *carrier.items()]


@contextmanager
def server_span(method: str, metadata: Metadata | None) -> Iterator[Span]:
    """A SERVER span for one RPC, child of the caller's span when metadata carries one."""
    token = otel_context.attach(extract_context(metadata))
    try:
        with tracer.start_as_current_span(
            method, kind=SpanKind.SERVER, attributes={"rpc.system": "grpc", "rpc.method": method}
        ) as span:
            yield span
    finally:
        otel_context.detach(token)


def record_status(span: Span, code: grpc.StatusCode, message: str = "") -> None:
    span.set_attribute("rpc.grpc.status_code", code.value[0])
    if code != grpc.StatusCode.OK:
        span.set_status(Status(StatusCode.ERROR, message))


class _ClientCallDetails(grpc.ClientCallDetails):
    def __init__(self, base: Any, metadata: list[tuple[str, str | bytes]]) -> None:
        self.method = base.method
        self.timeout = base.timeout
        self.metadata = metadata
        self.credentials = base.credentials
        self.wait_for_ready = getattr(base, "wait_for_ready", None)
        self.compression = getattr(base, "compression", None)


def _method_name(details: Any) -> str:
    method = details.method
    return method.decode() if isinstance(method, bytes) else str(method)


class TracingClientInterceptor(
    grpc.UnaryUnaryClientInterceptor,
    grpc.UnaryStreamClientInterceptor,
    grpc.StreamUnaryClientInterceptor,
    grpc.StreamStreamClientInterceptor,
):
    """Sync-channel interceptor: a CLIENT span per call, its context sent in metadata."""

    def _call(self, continuation: Callable[..., Any], details: Any, request: Any) -> Any:
        with tracer.start_as_current_span(_method_name(details), kind=SpanKind.CLIENT):
            return continuation(_ClientCallDetails(details, inject_metadata(details.metadata)), request)

    intercept_unary_unary = _call
    intercept_unary_stream = _call
    intercept_stream_unary = _call
    intercept_stream_stream = _call


class _AioTracing:
    async def _call(self, continuation: Callable[..., Any], details: Any, request: Any) -> Any:
        with tracer.start_as_current_span(_method_name(details), kind=SpanKind.CLIENT):
            return await continuation(_ClientCallDetails(details, inject_metadata(details.metadata)), request)


class AioTracingUnaryUnary(_AioTracing, grpc.aio.UnaryUnaryClientInterceptor):
    async def intercept_unary_unary(self, continuation: Any, details: Any, request: Any) -> Any:
        return await self._call(continuation, details, request)


class AioTracingUnaryStream(_AioTracing, grpc.aio.UnaryStreamClientInterceptor):
    async def intercept_unary_stream(self, continuation: Any, details: Any, request: Any) -> Any:
        return await self._call(continuation, details, request)


def aio_client_interceptors() -> list[grpc.aio.ClientInterceptor]:
    """Interceptors for ``grpc.aio`` channels (unary and server-streaming calls are traced)."""
    return [AioTracingUnaryUnary(), AioTracingUnaryStream()]
