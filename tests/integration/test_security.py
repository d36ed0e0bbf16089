"""Nobody in where they don't belong, on a real stack from `servefleet up` (started with a stray
``~/.ray/auth_token`` in its HOME): every method of every service from the service descriptors,
spoofed registrations, revocation, and the stack's own Ray token."""

from __future__ import annotations

import asyncio
import json
import os
import stat
import subprocess
import sys
import time
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import grpc
import numpy as np
import pytest

from servefleet import Client
from servefleet.api import (
    agent_pb2,
    agent_pb2_grpc,
    broker_pb2,
    broker_pb2_grpc,
    common_pb2,
    discovery_pb2,
    discovery_pb2_grpc,
    keeper_pb2,
    keeper_pb2_grpc,
)
from servefleet.broker.acl import ADMIN_USER
from servefleet.broker.queue import AppConfig, RedisStreamQueue
from servefleet.common import tensors
from servefleet.common.auth import ALLOWED
from servefleet.common.channels import sync_channel
from servefleet.common.config import settings
from servefleet.common.errors import NotFound
from servefleet.common.net import wait_for
from servefleet.common.redis_target import RedisTarget
from tests.integration.test_stack import free_base_port, run_cli

pytestmark = [pytest.mark.slow, pytest.mark.ray]
Code = grpc.StatusCode
DENIED = (Code.NOT_FOUND, Code.PERMISSION_DENIED)
SERVICES = {
    "servefleet.api.Keeper": (keeper_pb2, keeper_pb2_grpc.KeeperStub, "keeper"),
    "servefleet.api.Discovery": (discovery_pb2, discovery_pb2_grpc.DiscoveryStub, "discovery"),
    "servefleet.api.Broker": (broker_pb2, broker_pb2_grpc.BrokerStub, "broker"),
    "servefleet.api.ClusterAgent": (agent_pb2, agent_pb2_grpc.ClusterAgentStub, "agent"),
}


def ref(app: str) -> common_pb2.AppRef:
    namespace, name = app.split("/")
    return common_pb2.AppRef(namespace=namespace, name=name)


def echo_spec(app: str) -> common_pb2.ApplicationSpec:
    spec = common_pb2.ApplicationSpec(import_path="examples.echo:Echo", version="1")
    spec.namespace, spec.name = app.split("/")
    spec.replicas.initial = spec.replicas.min = spec.replicas.max = 1
    spec.resources.num_cpus = 0.1
    return spec


@dataclass
class Stack:
    state: Path
    home: Path
    addresses: dict[str, str]
    tokens: dict[str, str] = field(default_factory=dict)
    ids: dict[str, Any] = field(default_factory=dict)

    def stub(self, service: str, token: str = "") -> Any:
        _, stub, part = SERVICES[service]
        return stub(sync_channel(self.addresses[part], token=token))

    def keeper(self, token: str | None = None) -> keeper_pb2_grpc.KeeperStub:
        return self.stub("servefleet.api.Keeper", self.tokens["admin"] if token is None else token)  # type: ignore[no-any-return]


@pytest.fixture(scope="module")
def secured(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Stack]:
    """A stack whose HOME holds a stray Ray token (what any plain `ray.init()` leaves behind)."""
    root = tmp_path_factory.mktemp("secured")
    home, state = root / "home", root / "state"
    (home / ".ray").mkdir(parents=True)
    (home / ".ray" / "auth_token").write_text("stray-token-from-someone-elses-ray-init")
    env = {k: v for k, v in os.environ.items() if not k.startswith("RAY_AUTH")}
    env["HOME"] = str(home)
    result = run_cli(
        "up",
        "--detach",
        "--state-dir",
        str(state),
        "--base-port",
        str(free_base_port()),
        env=env,
        timeout=240,
    )
    try:
        assert result.returncode == 0, result.stderr
        found = Stack(state, home, json.loads((state / "stack.json").read_text()))
        found.tokens["admin"] = (state / "admin.token").read_text().strip()
        found.tokens["agent"] = (state / "agent.token").read_text().strip()
        _tenants_and_tokens(found)
        yield found
    finally:
        down = run_cli("down", "--state-dir", str(state), env=env)
        assert down.returncode == 0, down.stderr


async def _enable_async(redis: str, password: str, app: str) -> None:
    """What an async app's workers do on start: make the app known to the broker (here as the
    stack's Redis admin: its Redis admits no client without a password)."""
    queue = RedisStreamQueue(RedisTarget((redis,)).with_credential(ADMIN_USER, password))
    await queue.register_app(app, AppConfig())
    await queue.close()


def _tenants_and_tokens(s: Stack) -> None:
    password = (s.state / "redis.password").read_text().strip()
    asyncio.run(_enable_async(s.addresses["redis"], password, "alpha/web"))
    keeper = s.keeper()
    for tenant in ("alpha", "beta"):
        keeper.CreateTenant(keeper_pb2.CreateTenantRequest(tenant=tenant, namespaces=[tenant]), timeout=10)
        s.tokens[tenant] = keeper.IssueToken(keeper_pb2.IssueTokenRequest(tenant=tenant), timeout=10).token
    for app in ("alpha/web", "beta/api"):
        request = keeper_pb2.IssueTokenRequest(role="endpoint", app=ref(app))
        s.tokens[f"endpoint {app}"] = keeper.IssueToken(request, timeout=10).token


def test_the_stack_owns_its_ray_token_and_keeps_secrets_0600(secured: Stack) -> None:
    for name in ("ray.token", "admin.token", "agent.token", "redis.password", "redis/redis.conf"):
        assert stat.S_IMODE((secured.state / name).stat().st_mode) == 0o600, name
    assert (secured.home / ".ray" / "auth_token").read_text() == "stray-token-from-someone-elses-ray-init"


def _driver(ray_address: str, env: dict[str, str]) -> subprocess.CompletedProcess[str]:
    code = (
        f"import ray; ray.init(address={ray_address!r}, log_to_driver=False); print(ray.cluster_resources())"
    )
    return subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=180, env=env)


def test_a_driver_without_the_stacks_ray_token_cannot_connect(secured: Stack) -> None:
    base = {k: v for k, v in os.environ.items() if not k.startswith("RAY_AUTH")}
    base["HOME"] = str(secured.home)  # holds the stray token: Ray turns token auth on with it
    stray = _driver(secured.addresses["ray"], base)
    assert stray.returncode != 0 and "InvalidAuthToken" in stray.stderr + stray.stdout
    unauth = _driver(secured.addresses["ray"], {**base, "RAY_AUTH_MODE": "disabled"})
    assert unauth.returncode != 0
    own = _driver(
        secured.addresses["ray"],
        {**base, "RAY_AUTH_MODE": "token", "RAY_AUTH_TOKEN_PATH": str(secured.state / "ray.token")},
    )
    assert own.returncode == 0 and "CPU" in own.stdout, own.stderr[-2000:]


# -- the walk ------------------------------------------------------------------------------------

#: Per method: (request for alpha's things, the role that may do it). Methods that change or remove
#: what others use run last. A method of any service missing here fails the walk.
Build = Callable[[Stack], Any]


def _ticket(s: Stack) -> str:
    return str(s.ids["ticket"])


WALK: dict[str, tuple[Build, str]] = {
    # keeper
    "SubmitApplication": (
        lambda s: keeper_pb2.SubmitApplicationRequest(spec=echo_spec("alpha/walk")),
        "alpha",
    ),
    "GetApplication": (lambda s: keeper_pb2.GetApplicationRequest(app=ref("alpha/walk")), "alpha"),
    "ListApplications": (lambda s: keeper_pb2.ListApplicationsRequest(namespace="alpha"), "alpha"),
    "UpdateApplication": (
        lambda s: keeper_pb2.UpdateApplicationRequest(
            spec=echo_spec("alpha/walk"), expected_revision=s.ids["walk_revision"]
        ),
        "alpha",
    ),
    "ScaleApplication": (
        lambda s: keeper_pb2.ScaleApplicationRequest(app=ref("alpha/walk"), replicas=1),
        "alpha",
    ),
    "WatchApplication": (lambda s: keeper_pb2.WatchApplicationRequest(app=ref("alpha/walk")), "alpha"),
    "DeleteApplication": (lambda s: keeper_pb2.DeleteApplicationRequest(app=ref("alpha/walk")), "alpha"),
    "RegisterCluster": (lambda s: keeper_pb2.RegisterClusterRequest(cluster=s.ids["cluster"]), "agent"),
    "ListClusters": (lambda s: keeper_pb2.ListClustersRequest(), "alpha"),
    "CreateTenant": (lambda s: keeper_pb2.CreateTenantRequest(tenant="gamma", namespaces=["gamma"]), "admin"),
    "IssueToken": (lambda s: keeper_pb2.IssueTokenRequest(tenant="alpha"), "admin"),
    "SetQuota": (lambda s: keeper_pb2.SetQuotaRequest(tenant="alpha"), "admin"),
    "ListTokens": (lambda s: keeper_pb2.ListTokensRequest(), "admin"),
    "RevokeToken": (lambda s: keeper_pb2.RevokeTokenRequest(token_id=s.ids["spare_token_id"]), "admin"),
    # discovery
    "Register": (
        lambda s: discovery_pb2.RegisterRequest(
            endpoint=discovery_pb2.Endpoint(
                app=ref("alpha/web"), kind="proxy", address="127.0.0.1:9", id="walk"
            )
        ),
        "endpoint alpha/web",
    ),
    "KeepAlive": (
        lambda s: iter([discovery_pb2.KeepAliveRequest(lease_id=s.ids["lease"])]),
        "endpoint alpha/web",
    ),
    "Resolve": (lambda s: discovery_pb2.ResolveRequest(app=ref("alpha/web")), "alpha"),
    "Watch": (lambda s: discovery_pb2.WatchRequest(app=ref("alpha/web")), "alpha"),
    "Deregister": (
        lambda s: discovery_pb2.DeregisterRequest(
            app=ref("alpha/web"), endpoint_id="walk", lease_id=s.ids["lease"]
        ),
        "endpoint alpha/web",
    ),
    # broker
    "Submit": (
        lambda s: broker_pb2.SubmitRequest(
            app=ref("alpha/web"),
            infer_request=tensors.encode_request("web", {"x": np.ones(1, np.float32)}).SerializeToString(),
        ),
        "alpha",
    ),
    "GetResult": (lambda s: broker_pb2.GetResultRequest(ticket=_ticket(s)), "alpha"),
    "WatchResult": (lambda s: broker_pb2.WatchResultRequest(ticket=_ticket(s)), "alpha"),
    "QueueStats": (lambda s: broker_pb2.QueueStatsRequest(app=ref("alpha/web")), "alpha"),
    "GetWorkerCredential": (
        lambda s: broker_pb2.WorkerCredentialRequest(app=ref("alpha/web")),
        "endpoint alpha/web",
    ),
    "Cancel": (lambda s: broker_pb2.CancelRequest(ticket=_ticket(s)), "alpha"),
    # cluster agent: the keeper (its token lives in the keeper only) or an admin
    "ApplyApplication": (
        lambda s: agent_pb2.ApplyApplicationRequest(
            spec=echo_spec("alpha/agentwalk"), replicas=0, revision=1
        ),
        "admin",
    ),
    "GetApplicationState": (
        lambda s: agent_pb2.GetApplicationStateRequest(app=ref("alpha/agentwalk")),
        "admin",
    ),
    "ListMasters": (lambda s: agent_pb2.ListMastersRequest(), "admin"),
    "Capacity": (lambda s: agent_pb2.CapacityRequest(), "admin"),
    "RemoveApplication": (lambda s: agent_pb2.RemoveApplicationRequest(app=ref("alpha/agentwalk")), "admin"),
}
#: Calls without a tenant's resource: another tenant's token may make them too.
NOT_TENANT_SCOPED = {"ListClusters"}


def call(s: Stack, service: str, method: Any, token: str) -> tuple[Code, Any]:
    """One call: (code, first reply); streaming replies give their first message."""
    rpc = getattr(s.stub(service, token), method.name)
    try:
        reply = rpc(WALK[method.name][0](s), timeout=30)
        if method.server_streaming:
            first = next(iter(reply))
            reply.cancel()
            return Code.OK, first
        return Code.OK, reply
    except grpc.RpcError as exc:
        return exc.code(), exc.details()


def _note(s: Stack, name: str, reply: Any) -> None:
    """Ids later calls of the walk use."""
    if name == "SubmitApplication":
        s.ids["walk_revision"] = reply.revision
    elif name == "Register":
        s.ids["lease"] = reply.lease_id
    elif name == "Submit":
        s.ids["ticket"] = reply.ticket


def test_every_method_of_every_service(secured: Stack) -> None:
    s = secured
    methods = [(service, m) for service in SERVICES for m in _descriptor(service).methods]
    assert {m.name for _, m in methods} == set(WALK), "a method without a walk entry (or a stale entry)"
    assert {service: {m.name for m in _descriptor(service).methods} for service in SERVICES} == {
        service: set(ALLOWED[service]) for service in SERVICES
    }
    [local] = s.keeper().ListClusters(keeper_pb2.ListClustersRequest(), timeout=10).clusters
    s.ids["cluster"] = local
    spare = s.keeper().IssueToken(keeper_pb2.IssueTokenRequest(tenant="beta"), timeout=10)
    s.ids["spare_token_id"] = spare.token_id
    results: dict[str, tuple[Code, Code, Code, Code]] = {}
    last = ("Delete", "Deregister", "Cancel", "Remove", "Revoke")
    for service, method in sorted(methods, key=lambda sm: sm[1].name.startswith(last)):
        role = WALK[method.name][1]
        nobody, _ = call(s, service, method, "")
        forged, _ = call(s, service, method, "sft_forged")
        other, detail = call(s, service, method, s.tokens["beta"])
        right, reply = call(s, service, method, s.tokens[role])
        assert right == Code.OK, (method.name, role, reply)
        _note(s, method.name, reply)
        results[method.name] = (nobody, forged, other, right)
        assert other in DENIED or method.name in NOT_TENANT_SCOPED, (method.name, other, detail)
    assert {name: r[:2] for name, r in results.items()} == {
        name: (Code.UNAUTHENTICATED, Code.UNAUTHENTICATED) for name in results
    }


def _descriptor(service: str) -> Any:
    module = SERVICES[service][0]
    return module.DESCRIPTOR.services_by_name[service.rsplit(".", 1)[1]]


# -- spoofing, the credential chain, revocation -----------------------------------------------------


def test_spoofed_registration_is_refused_and_the_sdk_never_routes_there(secured: Stack) -> None:
    s = secured
    discovery = "servefleet.api.Discovery"
    honest = discovery_pb2.Endpoint(app=ref("beta/api"), kind="proxy", address="127.0.0.1:7", id="honest")
    spoof = discovery_pb2.Endpoint(app=ref("beta/api"), kind="proxy", address="127.0.0.1:8", id="spoof")
    lease = s.stub(discovery, s.tokens["endpoint beta/api"]).Register(
        discovery_pb2.RegisterRequest(endpoint=honest, ttl_s=60), timeout=10
    )
    for token in (s.tokens["endpoint alpha/web"], s.tokens["alpha"], s.tokens["beta"]):
        with pytest.raises(grpc.RpcError) as exc:
            s.stub(discovery, token).Register(discovery_pb2.RegisterRequest(endpoint=spoof), timeout=10)
        assert exc.value.code() == Code.PERMISSION_DENIED, exc.value.details()
    # Another app's registrant can neither take over, renew nor revoke beta's lease.
    alpha_ep = s.stub(discovery, s.tokens["endpoint alpha/web"])
    for request in (
        discovery_pb2.DeregisterRequest(app=ref("beta/api"), endpoint_id="honest"),
        discovery_pb2.DeregisterRequest(lease_id=lease.lease_id),
    ):
        with pytest.raises(grpc.RpcError) as exc:
            alpha_ep.Deregister(request, timeout=10)
        assert exc.value.code() == Code.PERMISSION_DENIED
    with pytest.raises(grpc.RpcError) as exc:
        next(alpha_ep.KeepAlive(iter([discovery_pb2.KeepAliveRequest(lease_id=lease.lease_id)]), timeout=10))
    assert exc.value.code() == Code.PERMISSION_DENIED
    with Client(s.addresses["discovery"], token=s.tokens["beta"]) as client:
        assert [e.address for e in client.endpoints("beta/api")] == ["127.0.0.1:7"]
    with Client(s.addresses["discovery"], token=s.tokens["alpha"]) as client, pytest.raises(NotFound):
        client.endpoints("beta/api")


def test_a_deployed_apps_proxies_register_with_its_own_token(secured: Stack) -> None:
    """keeper -> agent (keeper token) -> master and proxies (the app's endpoint token) -> discovery."""
    s = secured
    s.keeper(s.tokens["alpha"]).SubmitApplication(
        keeper_pb2.SubmitApplicationRequest(spec=echo_spec("alpha/chain")), timeout=10
    )
    with Client(s.addresses["discovery"], token=s.tokens["alpha"]) as client:
        wait_for(lambda: client.endpoints("alpha/chain"), timeout=240, interval=1, what="alpha/chain proxy")
        out = client.infer("alpha/chain", {"x": np.arange(3, dtype=np.float32)})
        np.testing.assert_array_equal(out["y"], np.arange(3, dtype=np.float32))
    tokens = s.keeper().ListTokens(keeper_pb2.ListTokensRequest(), timeout=10).tokens
    assert [t.role for t in tokens if t.app.name == "chain"] == ["endpoint"]


def test_a_revoked_token_stops_everywhere_within_the_cache_time(secured: Stack) -> None:
    s = secured
    issued = s.keeper().IssueToken(keeper_pb2.IssueTokenRequest(tenant="alpha"), timeout=10)
    calls = {
        "keeper": lambda stub: stub.ListApplications(keeper_pb2.ListApplicationsRequest(), timeout=10),
        "discovery": lambda stub: stub.Resolve(
            discovery_pb2.ResolveRequest(app=ref("alpha/web")), timeout=10
        ),
        "broker": lambda stub: stub.QueueStats(
            broker_pb2.QueueStatsRequest(app=ref("alpha/web")), timeout=10
        ),
    }
    stubs = {
        part: s.stub(service, issued.token) for service, (_, _, part) in SERVICES.items() if part in calls
    }
    for part, fn in calls.items():
        fn(stubs[part])  # accepted, and now cached in each service
    revoked = run_cli("token", "revoke", issued.token_id, "--state-dir", str(s.state))
    assert revoked.returncode == 0, revoked.stderr
    gone_at = time.monotonic()
    refused: dict[str, float] = {}
    while len(refused) < len(calls) and time.monotonic() - gone_at < settings.token_cache_s + 10:
        for part, fn in calls.items():
            if part in refused:
                continue
            try:
                fn(stubs[part])
            except grpc.RpcError as exc:
                assert exc.code() == Code.UNAUTHENTICATED, exc.details()
                refused[part] = time.monotonic() - gone_at
        time.sleep(0.2)
    print(f"refused after (s): {refused}")
    # Stated bound: token_cache_s; slack for a loaded machine (the CLI's own start-up is included).
    assert set(refused) == set(calls) and max(refused.values()) <= settings.token_cache_s + 3, refused
