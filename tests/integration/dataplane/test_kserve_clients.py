"""Unmodified tritonclient (sync and aio) against a real proxy in a Ray actor, registered in real
discovery: health, metadata, inference, streaming, errors with precise statuses, runtime_env."""

from __future__ import annotations

import queue
from typing import Any

import numpy as np
import pytest
import ray
import tritonclient.grpc as syncclient
import tritonclient.grpc.aio as aioclient
from tritonclient.grpc import InferInput
from tritonclient.utils import InferenceServerException

from servefleet.api import discovery_pb2, discovery_pb2_grpc
from servefleet.common.appid import AppId
from servefleet.common.net import async_wait_for
from servefleet.services.actors import RAY_NAMESPACE, master_name
from servefleet.services.agent import masters

from .conftest import CLUSTER, example_spec, iris_input, x_input

SAMPLES = np.array([[5.0, 3.4, 1.5, 0.2], [5.9, 2.8, 4.3, 1.3], [6.7, 3.0, 5.6, 2.1]], dtype=np.float32)

pytestmark = pytest.mark.ray


async def test_sync_tritonclient_health_metadata_infer(deployed: Any) -> None:
    status = await deployed(example_spec("iris"), 2)
    client = syncclient.InferenceServerClient(status.proxy_addresses[0])
    assert client.is_server_live() and client.is_server_ready() and client.is_model_ready("iris")
    metadata = client.get_model_metadata("iris")
    assert metadata.name == "iris" and list(metadata.versions) == ["1"]
    assert [(t.name, t.datatype, list(t.shape)) for t in metadata.inputs] == [("features", "FP32", [-1, 4])]
    assert [t.name for t in metadata.outputs] == ["label", "scores"]
    result = client.infer("iris", [iris_input(SAMPLES)])
    assert result.as_numpy("label").tolist() == [0, 1, 2]
    assert np.allclose(result.as_numpy("scores").sum(axis=1), 1.0)
    client.close()


async def test_aio_tritonclient_and_discovery_registration(deployed: Any, discovery_server: Any) -> None:
    from servefleet.common.channels import aio_channel

    status = await deployed(example_spec("iris"), 1)
    async with aioclient.InferenceServerClient(status.proxy_addresses[0]) as client:
        assert await client.is_server_live() and await client.is_model_ready("iris")
        result = await client.infer("iris", [iris_input(SAMPLES[2:])])
        assert result.as_numpy("label").tolist() == [2]
    async with aio_channel(discovery_server.address, token=discovery_server.token) as channel:
        stub = discovery_pb2_grpc.DiscoveryStub(channel)
        resolved = await stub.Resolve(
            discovery_pb2.ResolveRequest(app=AppId.parse(example_spec("iris")).ref())
        )
    [endpoint] = [e for e in resolved.endpoints if e.kind == "proxy"]
    assert endpoint.address == status.proxy_addresses[0]
    assert endpoint.labels["cluster"] == CLUSTER and endpoint.labels["node"]


async def test_errors_are_precise_and_replica_keeps_serving(deployed: Any) -> None:
    status = await deployed(example_spec("latency"), 1)
    client = syncclient.InferenceServerClient(status.proxy_addresses[0])

    def error_of(model: str, inputs: list[InferInput]) -> InferenceServerException:
        with pytest.raises(InferenceServerException) as info:
            client.infer(model, inputs)
        return info.value

    unknown = error_of("no-such-model", [x_input()])
    assert unknown.status() == "StatusCode.NOT_FOUND" and "no-such-model" in unknown.message()
    wrong_type = InferInput("x", [1], "FP64")
    wrong_type.set_data_from_numpy(np.array([1.0]))
    bad = error_of("latency", [wrong_type])
    assert (
        bad.status() == "StatusCode.INVALID_ARGUMENT" and "'x'" in bad.message() and "FP64" in bad.message()
    )
    wrong_shape = InferInput("x", [1, 2], "FP32")
    wrong_shape.set_data_from_numpy(np.ones((1, 2), dtype=np.float32))
    bad = error_of("latency", [wrong_shape])
    assert (
        bad.status() == "StatusCode.INVALID_ARGUMENT" and "'x'" in bad.message() and "shape" in bad.message()
    )
    boom = error_of("latency", [x_input(-1.0)])
    assert boom.status() == "StatusCode.INTERNAL" and "which this model refuses" in boom.message()
    assert client.infer("latency", [x_input(3.0)]).as_numpy("y").tolist() == [6.0]
    client.close()


async def test_model_stream_infer_with_streaming_model(deployed: Any) -> None:
    status = await deployed(example_spec("streaming"), 1)
    client = syncclient.InferenceServerClient(status.proxy_addresses[0])
    answers: queue.Queue[Any] = queue.Queue()
    client.start_stream(callback=lambda result, error: answers.put((result, error)))
    prompt = InferInput("prompt", [1], "BYTES")
    prompt.set_data_from_numpy(np.array([b"hi"], dtype=np.object_))
    count = InferInput("count", [1], "INT32")
    count.set_data_from_numpy(np.array([4], dtype=np.int32))
    client.async_stream_infer("streamer", [prompt, count])
    tokens = []
    for _ in range(4):
        result, error = answers.get(timeout=30)
        assert error is None, error
        tokens.append(result.as_numpy("token")[0])
    assert tokens == [b"hi-0", b"hi-1", b"hi-2", b"hi-3"]
    client.stop_stream()
    client.close()


async def test_runtime_env_and_working_dir(deployed: Any) -> None:
    status = await deployed(example_spec("greeter"), 1)
    client = syncclient.InferenceServerClient(status.proxy_addresses[0])
    name = InferInput("name", [2], "BYTES")
    name.set_data_from_numpy(np.array([b"ada", b"alan"], dtype=np.object_))
    result = client.infer("greeter", [name])
    assert result.as_numpy("greeting").tolist() == [b"bonjour, ada!", b"bonjour, alan!"]
    client.close()


async def test_restarted_master_adopts_live_replicas(deployed: Any) -> None:
    spec = example_spec("iris", name="iris-restart")
    status = await deployed(spec, 2)
    before = set(await masters.replica_stats(AppId.parse(spec).ref()))
    master = ray.get_actor(master_name(AppId.parse(spec).ref()), namespace=RAY_NAMESPACE)
    old_pid = (await master.info.remote())["pid"]
    ray.kill(master, no_restart=False)

    async def restarted() -> dict[str, Any] | None:
        info: dict[str, Any] = await master.info.remote()  # retried across the restart
        return info if info["pid"] != old_pid else None

    info = await async_wait_for(restarted, timeout=120, interval=0.2, what="master restarted by Ray")
    assert info["adopted"] == {"replicas": 2, "proxies": spec.proxies}  # type: ignore[index]

    async def adopted() -> bool:
        """The same replicas ready under the restarted master (new ones would have new names)."""
        try:
            now = await masters.status(AppId.parse(spec).ref())
            names = set(await masters.replica_stats(AppId.parse(spec).ref()))
        except Exception:
            return False
        return now is not None and now.ready_replicas == 2 and not now.updating and names == before

    await async_wait_for(adopted, timeout=120, interval=0.2, what="restarted master adopting its replicas")
    client = syncclient.InferenceServerClient(status.proxy_addresses[0])
    assert client.infer("iris-restart", [iris_input()]).as_numpy("label").tolist() == [0]
    client.close()
