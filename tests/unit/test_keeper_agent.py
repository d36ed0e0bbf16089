"""Cluster agent core with a typed stand-in for the masters module."""

from __future__ import annotations

from collections.abc import Mapping

import pytest

from servefleet.api import agent_pb2, common_pb2
from servefleet.common.errors import InvalidArgument, NotFound
from servefleet.services.agent.core import ClusterAgent, parse_labels


class FakeMasters:
    def __init__(self) -> None:
        self.masters: dict[str, agent_pb2.MasterStatus] = {}
        self.applied: list[int] = []
        self.credentials: list[str] = []

    async def apply(
        self,
        spec: common_pb2.ApplicationSpec,
        replicas: int,
        revision: int,
        *,
        cluster: str,
        discovery: str,
        redis: str = "",
        broker: str = "",
        credential: str = "",
        stages: Mapping[str, int] | None = None,
    ) -> agent_pb2.MasterStatus:
        self.applied.append(revision)
        self.credentials.append(credential)
        status = agent_pb2.MasterStatus(app=common_pb2.AppRef(namespace=spec.namespace, name=spec.name))
        status.revision, status.replicas, status.version = revision, replicas, spec.version
        self.masters[spec.name] = status
        return status

    async def remove(self, app: common_pb2.AppRef) -> bool:
        return self.masters.pop(app.name, None) is not None

    async def status(self, app: common_pb2.AppRef) -> agent_pb2.MasterStatus | None:
        return self.masters.get(app.name)

    async def list_all(self) -> list[agent_pb2.MasterStatus]:
        return list(self.masters.values())


async def no_resources() -> tuple[dict[str, float], dict[str, float]]:
    return {"CPU": 1.0}, {"CPU": 0.5}


async def test_apply_ignores_older_revisions_and_state_is_not_found_when_absent() -> None:
    masters = FakeMasters()
    agent = ClusterAgent(masters, no_resources, cluster="c1", discovery="127.0.0.1:1")
    spec = common_pb2.ApplicationSpec(name="a", namespace="n", version="2")
    assert (await agent.apply(spec, 2, 10)).revision == 10
    stale = await agent.apply(common_pb2.ApplicationSpec(name="a", namespace="n", version="1"), 1, 9)
    assert stale.revision == 10 and stale.version == "2" and masters.applied == [10]
    assert (await agent.state(common_pb2.AppRef(namespace="n", name="a"))).replicas == 2
    assert await agent.remove(common_pb2.AppRef(namespace="n", name="a"))
    with pytest.raises(NotFound, match="no master for n/a on cluster c1"):
        await agent.state(common_pb2.AppRef(namespace="n", name="a"))
    assert await agent.capacity() == ({"CPU": 1.0}, {"CPU": 0.5})


async def test_a_new_master_gets_its_apps_endpoint_token_and_an_existing_one_none() -> None:
    masters, issued = FakeMasters(), []

    async def credentials(app: common_pb2.AppRef) -> str:
        issued.append(f"{app.namespace}/{app.name}")
        return f"token-of-{app.name}"

    agent = ClusterAgent(
        masters, no_resources, cluster="c1", discovery="127.0.0.1:1", credentials=credentials
    )
    spec = common_pb2.ApplicationSpec(name="a", namespace="n")
    await agent.apply(spec, 1, 1)
    await agent.apply(spec, 2, 2)
    assert issued == ["n/a"] and masters.credentials == ["token-of-a", ""]


def test_parse_labels() -> None:
    assert parse_labels("zone=eu, gpu=yes") == {"zone": "eu", "gpu": "yes"}
    assert parse_labels("") == {}
    with pytest.raises(InvalidArgument, match="'zone' is not key=value"):
        parse_labels("zone")
