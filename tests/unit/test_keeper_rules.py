"""Keeper rules without etcd: tokens, who sees what, source policy, quotas, status summaries."""

from __future__ import annotations

from pathlib import Path

import pytest

from servefleet.api import agent_pb2, common_pb2, keeper_pb2
from servefleet.common.auth import Authenticator, Principal, bearer, hash_token
from servefleet.common.errors import (
    InvalidArgument,
    NotFound,
    PermissionDenied,
    ResourceExhausted,
    Unauthenticated,
)
from servefleet.keeper.policy import Usage, check_quota, check_sources, usage_of
from servefleet.keeper.reconciler import summarize
from servefleet.keeper.store import AppRecord

AppState = keeper_pb2.AppState


class Tokens:
    """Typed in-memory stand-in for the etcd token and tenant records."""

    def __init__(self) -> None:
        self.tokens: dict[str, keeper_pb2.TokenRecord] = {}
        self.tenants: dict[str, keeper_pb2.TenantInfo] = {}
        self.reads = 0

    async def token(self, digest: str) -> keeper_pb2.TokenRecord | None:
        self.reads += 1
        return self.tokens.get(digest)

    async def tenant(self, name: str) -> keeper_pb2.TenantInfo | None:
        return self.tenants.get(name)


def test_bearer_metadata_parsing() -> None:
    assert bearer([("authorization", "Bearer abc")]) == "abc"
    assert bearer([("Authorization", b"bearer  xyz ")]) == "xyz"
    for bad in ([], [("authorization", "Basic abc")], [("authorization", "Bearer ")]):
        with pytest.raises(Unauthenticated):
            bearer(bad)


async def test_authenticator_resolves_tenants_and_caches() -> None:
    backend = Tokens()
    backend.tokens[hash_token("t1")] = keeper_pb2.TokenRecord(tenant="acme", role="tenant")
    backend.tenants["acme"] = keeper_pb2.TenantInfo(tenant="acme", namespaces=["acme", "acme-dev"])
    now = [0.0]
    auth = Authenticator(backend, cache_s=5, clock=lambda: now[0])
    who = await auth.authenticate([("authorization", "Bearer t1")])
    assert who == Principal("acme", "tenant", ("acme", "acme-dev"), token_id=hash_token("t1")[:16])
    await auth.authenticate([("authorization", "Bearer t1")])
    assert backend.reads == 1
    now[0] = 6.0
    await auth.authenticate([("authorization", "Bearer t1")])
    assert backend.reads == 2
    with pytest.raises(Unauthenticated):
        await auth.authenticate([("authorization", "Bearer nope")])


def test_principal_visibility() -> None:
    tenant = Principal("acme", "tenant", ("acme",))
    assert tenant.visible() == ["acme"] and tenant.visible("other") == []
    assert Principal("root", "admin").visible() is None
    with pytest.raises(NotFound, match="other/x not found"):
        tenant.require_visible("other", "x")
    with pytest.raises(PermissionDenied, match="may not use namespace 'other'"):
        tenant.require_namespace("other")
    with pytest.raises(PermissionDenied, match="needs an admin token"):
        tenant.require_admin("creating a tenant")


def test_sources_stay_inside_roots_and_off_urls(tmp_path: Path) -> None:
    ok = common_pb2.ApplicationSpec(name="a", import_path="model:M", working_dir=str(tmp_path / "app"))
    ok.runtime_env.pip.append("numpy>=1.26")
    check_sources(ok, roots=[tmp_path], allow_urls=False)
    check_sources(common_pb2.ApplicationSpec(working_dir="app/sub"), roots=[tmp_path], allow_urls=False)
    bad_specs = {
        "outside the allowed roots": common_pb2.ApplicationSpec(working_dir=str(tmp_path / ".." / "x")),
        "is a URL": common_pb2.ApplicationSpec(working_dir="https://example.com/app.zip"),
    }
    for message, spec in bad_specs.items():
        with pytest.raises(InvalidArgument, match=message):
            check_sources(spec, roots=[tmp_path], allow_urls=False)
    for pkg in ("git+https://x/y.git", "pkg @ https://x/y.whl", "/tmp/evil.whl", "../evil"):
        spec = common_pb2.ApplicationSpec()
        spec.runtime_env.pip.append(pkg)
        with pytest.raises(InvalidArgument, match=r"spec.runtime_env.pip\[0\]"):
            check_sources(spec, roots=[tmp_path], allow_urls=False)
    url = common_pb2.ApplicationSpec(working_dir="https://example.com/app.zip")
    check_sources(url, roots=[tmp_path], allow_urls=True)


def test_quota_counts_replicas_on_every_cluster() -> None:
    spec = common_pb2.ApplicationSpec()
    spec.resources.num_cpus = 0.5
    spec.placement.spread = 2
    assert usage_of(spec, 3) == Usage(1, 6, 3.0, 0.0)
    quota = keeper_pb2.Quota(max_cpus=4)
    check_quota("t", quota, Usage(1, 2, 1.0, 0), Usage(1, 6, 3.0, 0))
    with pytest.raises(
        ResourceExhausted, match=r"cpus would be 4.5, limit 4 \(in use 1.5, this request adds 3\)"
    ):
        check_quota("t", quota, Usage(1, 3, 1.5, 0), Usage(1, 6, 3.0, 0))
    check_quota("t", quota, Usage(1, 10, 9.0, 0), Usage(0, -2, -1.0, 0))  # shrinking is always allowed


def record(state: int = AppState.DEPLOYING, version: str = "2", replicas: int = 2) -> AppRecord:
    spec = common_pb2.ApplicationSpec(name="a", namespace="n", version=version)
    return AppRecord(
        keeper_pb2.DesiredState(spec=spec, replicas=replicas), 7, keeper_pb2.ApplicationStatus(state=state)
    )


def master(ready: int, version: str = "2", revision: int = 7, **kw: object) -> agent_pb2.MasterStatus:
    return agent_pb2.MasterStatus(replicas=2, ready_replicas=ready, version=version, revision=revision, **kw)  # type: ignore[arg-type]


def test_summarize_states() -> None:
    state, reason, placements = summarize(record(), {"a": master(2), "b": master(2)})
    assert state == AppState.RUNNING and [p.cluster for p in placements] == ["a", "b"]
    state, reason, _ = summarize(record(), {"a": master(2), "b": master(1)})
    assert state == AppState.DEPLOYING and "cluster b: 1/2 ready at version 2" in reason
    state, _, _ = summarize(record(AppState.RUNNING), {"a": master(2, version="1")})
    assert state == AppState.UPDATING
    state, _, _ = summarize(record(AppState.RUNNING), {"a": master(2, revision=6)})
    assert state == AppState.UPDATING
    state, reason, _ = summarize(record(AppState.RUNNING), {"a": master(2), "b": "UNAVAILABLE: down"})
    assert state == AppState.DEGRADED and "cluster b: UNAVAILABLE: down" in reason
    error = "replica failed: RayActorError:\nTraceback (most recent call last):\nImportError: no module x\n"
    state, reason, _ = summarize(record(), {"a": master(0, error=error)})
    assert state == AppState.FAILED and reason == "cluster a: ImportError: no module x"
