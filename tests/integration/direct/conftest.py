"""Fixtures of the direct ingress: one trained 1M-row CTR model file per session, and a C++ server."""

from __future__ import annotations

from collections.abc import Iterator
from pathlib import Path

import pytest

from servefleet.direct import DirectServer, ctr

# The data plane's fixtures (a discovery process, this process as a Ray driver), shared, not copied.
from tests.integration.dataplane.conftest import discovery_server, ray_driver

__all__ = ["discovery_server", "ray_driver"]

MODEL_NAME = "recs/ctr"


@pytest.fixture(scope="session")
def ctr_model_path(tmp_path_factory: pytest.TempPathFactory) -> Path:
    model = ctr.build_model(num_rows=1 << 20, num_fields=16, dim=16, examples=20_000)
    return ctr.export_model(model, tmp_path_factory.mktemp("ctr") / "ctr.bin")


@pytest.fixture(scope="session")
def ctr_reference(ctr_model_path: Path) -> ctr.FactorizationMachine:
    return ctr.load_model(ctr_model_path)


@pytest.fixture(scope="session")
def direct_server(ctr_model_path: Path) -> Iterator[DirectServer]:
    server = DirectServer()
    server.load_model(str(ctr_model_path), MODEL_NAME, "1")
    server.start("127.0.0.1:0", workers=2)
    yield server
    server.stop(grace_s=1.0)


@pytest.fixture(scope="session")
def direct_address(direct_server: DirectServer) -> str:
    return f"127.0.0.1:{direct_server.port}"
