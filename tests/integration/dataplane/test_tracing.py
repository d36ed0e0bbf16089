"""One request traced end to end: tritonclient's caller -> proxy actor -> replica's model call.

How spans get out of Ray actors: the actors export them over OTLP, the standard way, to a small
OTLP trace receiver this test runs. The cluster agent's ``OTEL_*`` environment is handed by
``masters.apply`` to the master and by the master to its proxies and replicas, so the test sets
those variables (exporter ``otlp``, endpoint = the receiver) before deploying. The caller's span
goes to an in-memory exporter in this process; the test then asserts that one trace id joins the
three, that parents link up, and that the model call carries the model name and status.
"""

from __future__ import annotations

from collections.abc import AsyncIterator
from typing import Any

import grpc
import pytest
import tritonclient.grpc as syncclient
from opentelemetry.proto.collector.trace.v1 import trace_service_pb2, trace_service_pb2_grpc
from opentelemetry.sdk.trace.export import SimpleSpanProcessor
from opentelemetry.sdk.trace.export.in_memory_span_exporter import InMemorySpanExporter

from servefleet.common import telemetry
from servefleet.common.net import async_wait_for

from .conftest import example_spec, iris_input

pytestmark = pytest.mark.ray


class Receiver(trace_service_pb2_grpc.TraceServiceServicer):
    """An OTLP/gRPC trace endpoint that keeps every span it is sent, with its service name."""

    def __init__(self) -> None:
        self.spans: list[tuple[str, Any]] = []

    async def Export(self, request: Any, context: Any) -> Any:
        for resource_spans in request.resource_spans:
            attrs = {a.key: a.value.string_value for a in resource_spans.resource.attributes}
            for scope in resource_spans.scope_spans:
                self.spans.extend((attrs.get("service.name", ""), span) for span in scope.spans)
        return trace_service_pb2.ExportTraceServiceResponse()


@pytest.fixture
async def otlp_receiver() -> AsyncIterator[tuple[str, Receiver]]:
    receiver = Receiver()
    server = grpc.aio.server()
    trace_service_pb2_grpc.add_TraceServiceServicer_to_server(receiver, server)
    port = server.add_insecure_port("127.0.0.1:0")
    await server.start()
    yield f"127.0.0.1:{port}", receiver
    await server.stop(0)


async def test_one_trace_covers_caller_proxy_and_model_call(
    deployed: Any, otlp_receiver: tuple[str, Receiver], monkeypatch: pytest.MonkeyPatch
) -> None:
    memory = InMemorySpanExporter()
    telemetry.setup_tracing("dataplane-test", processor=SimpleSpanProcessor(memory))
    address, receiver = otlp_receiver
    monkeypatch.setenv("OTEL_TRACES_EXPORTER", "otlp")
    monkeypatch.setenv("OTEL_EXPORTER_OTLP_ENDPOINT", f"http://{address}")
    monkeypatch.setenv("OTEL_EXPORTER_OTLP_INSECURE", "true")
    monkeypatch.setenv("OTEL_BSP_SCHEDULE_DELAY", "100")
    status = await deployed(example_spec("iris", name="iris-traced"), 1)

    client = syncclient.InferenceServerClient(status.proxy_addresses[0])
    with telemetry.tracer.start_as_current_span("caller") as caller:
        headers = {k: str(v) for k, v in telemetry.inject_metadata(None)}
        result = client.infer("iris-traced", [iris_input()], headers=headers)
    client.close()
    assert result.as_numpy("label").tolist() == [0]
    trace_id = caller.get_span_context().trace_id
    assert [s.name for s in memory.get_finished_spans()] == ["caller"]

    def in_trace() -> dict[str, Any]:
        return {
            span.name: (service, span)
            for service, span in receiver.spans
            if int.from_bytes(span.trace_id, "big") == trace_id
        }

    async def both_exported() -> bool:
        return {"/inference.GRPCInferenceService/ModelInfer", "model.call"} <= set(in_trace())

    await async_wait_for(both_exported, timeout=60, interval=0.1, what="proxy and replica spans")
    spans = in_trace()
    proxy_service, proxy_span = spans["/inference.GRPCInferenceService/ModelInfer"]
    replica_service, model_span = spans["model.call"]
    assert (proxy_service, replica_service) == ("servefleet-proxy", "servefleet-replica")
    assert int.from_bytes(proxy_span.parent_span_id, "big") == caller.get_span_context().span_id
    assert model_span.parent_span_id == proxy_span.span_id
    attributes = {a.key: a.value for a in model_span.attributes}
    assert attributes["servefleet.model"].string_value == "iris-traced"
    assert attributes["servefleet.status"].string_value == "OK"
