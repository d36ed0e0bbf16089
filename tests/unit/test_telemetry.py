"""Parent-based sampling: a request follows its caller's decision; new traces are sampled by ratio."""

from __future__ import annotations

from opentelemetry.sdk.trace import TracerProvider
from opentelemetry.sdk.trace.sampling import ParentBased, TraceIdRatioBased

from servefleet.common import telemetry
from servefleet.common.config import settings


def _recording(provider: TracerProvider, traceparent: str | None) -> bool:
    tracer = provider.get_tracer("test")
    metadata = [("traceparent", traceparent)] if traceparent else []
    context = telemetry.extract_context(metadata)
    with tracer.start_as_current_span("rpc", context=context) as span:
        return span.is_recording()


def test_default_sampler_is_parent_based_with_the_configured_ratio() -> None:
    sampler = telemetry._default_sampler()
    assert isinstance(sampler, ParentBased)
    assert f"TraceIdRatioBased{{{settings.trace_sample_ratio}}}" in sampler.get_description()


def test_caller_decision_wins_and_new_traces_follow_the_ratio() -> None:
    never = TracerProvider(sampler=ParentBased(TraceIdRatioBased(0.0)))
    always = TracerProvider(sampler=ParentBased(TraceIdRatioBased(1.0)))
    sampled = "00-0af7651916cd43dd8448eb211c80319c-b7ad6b7169203331-01"
    unsampled = "00-0af7651916cd43dd8448eb211c80319c-b7ad6b7169203331-00"
    assert _recording(never, sampled)  # the caller sampled it: recorded whatever the ratio
    assert not _recording(always, unsampled)  # the caller did not: never recorded
    assert not _recording(never, None)
    assert _recording(always, None)
