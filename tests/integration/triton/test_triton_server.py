"""``TritonServer`` on its own: a real tritonserver (python backend, CPU) launched from the example
repository, Triton's answers and errors, its metrics, a graceful stop, and no orphan ever."""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
from collections.abc import AsyncIterator
from pathlib import Path

import numpy as np
import pytest
import tritonclient.grpc as tritongrpc
from prometheus_client import CollectorRegistry, generate_latest
from tritonclient.utils import InferenceServerException

from servefleet.common.net import wait_for
from servefleet.services.triton.install import TritonInstall
from servefleet.services.triton.metrics import TritonCollector, inference_families, totals
from servefleet.services.triton.server import TritonServer, TritonStartError
from tests.integration.triton.conftest import EXAMPLE, MODEL, add_sub_inputs, broken_repository, pid_alive


@pytest.fixture
async def server(triton_install: TritonInstall, tmp_path: Path) -> AsyncIterator[TritonServer]:
    running = TritonServer(triton_install, EXAMPLE / "models", {"log-verbose": "0"}, log_dir=tmp_path)
    await running.start(120)
    yield running
    await running.kill()


async def test_serves_the_example_and_stops_with_grace(server: TritonServer) -> None:
    assert server.models == [MODEL]
    pids = server.pids()
    assert len(pids) == 2  # the server and one python-backend stub (instance_group count 1)
    client = tritongrpc.InferenceServerClient(server.address)
    a, b = np.arange(4, dtype=np.float32), np.full(4, 2.0, dtype=np.float32)
    result = client.infer(MODEL, add_sub_inputs(a, b))
    np.testing.assert_array_equal(result.as_numpy("OUTPUT0"), a + b)
    np.testing.assert_array_equal(result.as_numpy("OUTPUT1"), a - b)
    metadata = client.get_model_metadata(MODEL, as_json=True)
    assert [(t["name"], t["datatype"], t["shape"]) for t in metadata["inputs"]] == [
        ("INPUT0", "FP32", ["-1"]),
        ("INPUT1", "FP32", ["-1"]),
    ]
    # Bad input: INVALID_ARGUMENT from Triton itself (a datatype) and from the model (shapes).
    wrong_type = add_sub_inputs(a, b)
    wrong_type[0] = tritongrpc.InferInput("INPUT0", [4], "INT32")
    wrong_type[0].set_data_from_numpy(a.astype(np.int32))
    for inputs, why in ((wrong_type, "expects 'FP32'"), (add_sub_inputs(a[:2], b), "must match")):
        with pytest.raises(InferenceServerException) as info:
            client.infer(MODEL, inputs)
        assert info.value.status() == "StatusCode.INVALID_ARGUMENT" and why in info.value.message()
    counts = totals(inference_families(server.metrics_text()))
    assert counts.success >= 1 and counts.pending == 0
    # Re-exported through a prometheus_client registry (what an actor's /metrics serves).
    registry = CollectorRegistry()
    registry.register(TritonCollector(server.metrics_text, {"app": "ml/add-sub", "replica": "r1"}))
    exported = generate_latest(registry).decode()
    labels = '{app="ml/add-sub",model="add_sub",replica="r1",version="1"}'
    assert f"nv_inference_request_success_total{labels}" in exported  # counters gain _total
    assert f"nv_inference_pending_request_count{labels} 0.0" in exported
    client.close()

    assert await server.stop(grace_s=15) == 0  # SIGTERM: Triton unloads and exits by itself
    assert not any(pid_alive(pid) for pid in pids)


async def test_bad_repository_fails_with_tritons_reason(
    triton_install: TritonInstall, tmp_path: Path
) -> None:
    bad = TritonServer(triton_install, broken_repository(tmp_path), {}, log_dir=tmp_path / "log")
    with pytest.raises(TritonStartError) as info:
        await bad.start(120)
    assert "failed to read text proto" in str(info.value) and "config.pbtxt" in str(info.value)
    assert not bad.alive()
    missing = TritonServer(triton_install, tmp_path / "nowhere", {}, log_dir=tmp_path / "log2")
    with pytest.raises(TritonStartError, match="is not a directory"):
        await missing.start(120)


LAUNCHER = """
import asyncio, json, sys
from pathlib import Path
from servefleet.services.triton.install import find
from servefleet.services.triton.server import TritonServer

async def main():
    server = TritonServer(find(), Path(sys.argv[1]), {}, log_dir=Path(sys.argv[2]))
    await server.start(120)
    print(json.dumps(server.pids()), flush=True)
    await asyncio.Event().wait()

asyncio.run(main())
"""


def test_a_killed_launcher_leaves_no_tritonserver(tmp_path: Path) -> None:
    """SIGKILL the process that launched the server (no cleanup code runs): the parent-death
    signal takes the server down, and its stubs follow; checked by the pids recorded."""
    launcher = subprocess.Popen(
        [sys.executable, "-c", LAUNCHER, str(EXAMPLE / "models"), str(tmp_path)],
        stdout=subprocess.PIPE,
        text=True,
        env={**os.environ, "PYTHONPATH": os.pathsep.join(sys.path)},
    )
    try:
        assert launcher.stdout is not None
        pids = json.loads(launcher.stdout.readline())
        assert len(pids) == 2 and all(pid_alive(pid) for pid in pids)
        launcher.send_signal(signal.SIGKILL)
        launcher.wait(timeout=10)
        wait_for(lambda: not any(pid_alive(pid) for pid in pids), timeout=20, what=f"pids {pids} to exit")
    finally:
        launcher.kill()
