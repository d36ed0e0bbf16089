"""The keeper's API over real gRPC and real etcd, without clusters: identity, tenancy, quotas,
compare-and-swap, paging, placement failures and watches."""

from __future__ import annotations

import asyncio

import grpc
import pytest

from servefleet.api import common_pb2, keeper_pb2
from servefleet.common.net import async_wait_for
from servefleet.keeper.servicer import SERVICE
from tests.integration.keeper.conftest import InProcessKeeper, KeeperClient, bearer

AppState = keeper_pb2.AppState


def spec(name: str, namespace: str = "default", **fields: object) -> common_pb2.ApplicationSpec:
    out = common_pb2.ApplicationSpec(name=name, namespace=namespace, import_path="examples.echo:Echo")
    for key, value in fields.items():
        setattr(out, key, value)
    return out


def ref(name: str, namespace: str = "default") -> common_pb2.AppRef:
    return common_pb2.AppRef(namespace=namespace, name=name)


async def call_every_method(
    client: KeeperClient, metadata: list[tuple[str, str]]
) -> dict[str, grpc.StatusCode]:
    """Each RPC of the Keeper service with an empty request; name -> status code."""
    codes: dict[str, grpc.StatusCode] = {}
    for method in SERVICE.methods:
        request_class = getattr(keeper_pb2, method.input_type.name)
        rpc = getattr(client.stub, method.name)
        try:
            if method.server_streaming:
                async for _ in rpc(request_class(), metadata=metadata, timeout=10):
                    pass
            else:
                await rpc(request_class(), metadata=metadata, timeout=10)
            codes[method.name] = grpc.StatusCode.OK
        except grpc.aio.AioRpcError as exc:
            codes[method.name] = exc.code()
    return codes


async def test_every_method_refuses_missing_and_invalid_tokens(keeper: InProcessKeeper) -> None:
    client = keeper.client()
    assert len(SERVICE.methods) == 14
    for metadata in ([], bearer("sft_not-a-real-token"), [("authorization", "Basic abc")]):
        codes = await call_every_method(client, metadata)
        assert codes == {m.name: grpc.StatusCode.UNAUTHENTICATED for m in SERVICE.methods}, metadata


async def test_submit_get_list_paging_and_filters(keeper: InProcessKeeper) -> None:
    admin = keeper.client()
    for i in range(7):
        s = spec(f"app-{i}", "team-x" if i % 2 else "team-y")
        s.labels["tier"] = "gold" if i < 3 else "bronze"
        await admin.stub.SubmitApplication(keeper_pb2.SubmitApplicationRequest(spec=s), metadata=admin.md())
    got = await admin.stub.GetApplication(
        keeper_pb2.GetApplicationRequest(app=ref("app-1", "team-x")), metadata=admin.md()
    )
    assert got.spec.import_path == "examples.echo:Echo" and got.revision > 0 and got.replicas == 1
    seen, token = [], ""
    while True:
        page = await admin.stub.ListApplications(
            keeper_pb2.ListApplicationsRequest(page_size=3, page_token=token), metadata=admin.md()
        )
        assert len(page.applications) <= 3
        seen += [a.app.name for a in page.applications]
        token = page.next_page_token
        if not token:
            break
    assert sorted(seen) == [f"app-{i}" for i in range(7)] and len(seen) == 7
    gold_x = await admin.stub.ListApplications(
        keeper_pb2.ListApplicationsRequest(namespace="team-x", label_selector={"tier": "gold"}),
        metadata=admin.md(),
    )
    assert [a.app.name for a in gold_x.applications] == ["app-1"]
    gold, token = [], ""
    while True:  # a filter across pages: every match exactly once
        page = await admin.stub.ListApplications(
            keeper_pb2.ListApplicationsRequest(
                label_selector={"tier": "gold"}, page_size=2, page_token=token
            ),
            metadata=admin.md(),
        )
        gold += [a.app.name for a in page.applications]
        token = page.next_page_token
        if not token:
            break
    assert sorted(gold) == ["app-0", "app-1", "app-2"]
    pending = await admin.stub.ListApplications(
        keeper_pb2.ListApplicationsRequest(state=AppState.PENDING), metadata=admin.md()
    )
    assert len(pending.applications) == 7
    with pytest.raises(grpc.aio.AioRpcError) as exc:
        await admin.stub.SubmitApplication(
            keeper_pb2.SubmitApplicationRequest(spec=spec("app-1", "team-x")), metadata=admin.md()
        )
    assert exc.value.code() == grpc.StatusCode.ALREADY_EXISTS


async def test_bad_specs_name_the_field(keeper: InProcessKeeper) -> None:
    admin = keeper.client()
    cases = {
        "spec.import_path": spec("bad-1", import_path="not a path"),
        "spec.working_dir": spec("bad-2", working_dir="/etc/../etc"),
        "spec.runtime_env.pip[0]": spec("bad-3"),
        "spec.runtime_env.env_vars": spec("bad-4"),
    }
    cases["spec.runtime_env.pip[0]"].runtime_env.pip.append("git+https://evil.example/pkg.git")
    cases["spec.runtime_env.env_vars"].runtime_env.env_vars["LD_PRELOAD"] = "/tmp/x.so"
    for field, bad in cases.items():
        with pytest.raises(grpc.aio.AioRpcError) as exc:
            await admin.stub.SubmitApplication(
                keeper_pb2.SubmitApplicationRequest(spec=bad), metadata=admin.md()
            )
        assert exc.value.code() == grpc.StatusCode.INVALID_ARGUMENT
        assert field in exc.value.details(), exc.value.details()


async def test_concurrent_updates_one_wins_one_conflicts(keeper: InProcessKeeper) -> None:
    a, b = keeper.client(), keeper.client()
    first = await a.stub.SubmitApplication(
        keeper_pb2.SubmitApplicationRequest(spec=spec("shared")), metadata=a.md()
    )
    v2, v3 = spec("shared", version="2"), spec("shared", version="3")
    results = await asyncio.gather(
        a.stub.UpdateApplication(
            keeper_pb2.UpdateApplicationRequest(spec=v2, expected_revision=first.revision), metadata=a.md()
        ),
        b.stub.UpdateApplication(
            keeper_pb2.UpdateApplicationRequest(spec=v3, expected_revision=first.revision), metadata=b.md()
        ),
        return_exceptions=True,
    )
    wins = [r for r in results if isinstance(r, keeper_pb2.ApplicationStatus)]
    losses = [r for r in results if isinstance(r, grpc.aio.AioRpcError)]
    assert len(wins) == 1 and len(losses) == 1
    assert losses[0].code() == grpc.StatusCode.ABORTED
    assert f"current revision is {wins[0].revision}" in losses[0].details()
    now = await a.stub.GetApplication(keeper_pb2.GetApplicationRequest(app=ref("shared")), metadata=a.md())
    assert now.spec.version == wins[0].spec.version and now.revision == wins[0].revision
    with pytest.raises(grpc.aio.AioRpcError) as exc:
        await a.stub.UpdateApplication(keeper_pb2.UpdateApplicationRequest(spec=v2), metadata=a.md())
    assert exc.value.code() == grpc.StatusCode.FAILED_PRECONDITION


async def _tenant(admin: KeeperClient, name: str, quota: keeper_pb2.Quota | None = None) -> str:
    await admin.stub.CreateTenant(
        keeper_pb2.CreateTenantRequest(tenant=name, namespaces=[f"{name}-ns"], quota=quota),
        metadata=admin.md(),
    )
    issued = await admin.stub.IssueToken(
        keeper_pb2.IssueTokenRequest(tenant=name, role="tenant"), metadata=admin.md()
    )
    return issued.token


async def test_tenants_only_see_their_own_namespaces(keeper: InProcessKeeper) -> None:
    admin = keeper.client()
    a = keeper.client(await _tenant(admin, "alpha"))
    b = keeper.client(await _tenant(admin, "beta"))
    mine = await b.stub.SubmitApplication(
        keeper_pb2.SubmitApplicationRequest(spec=spec("secret", "")), metadata=b.md()
    )
    assert mine.app.namespace == "beta-ns"  # a tenant's default namespace is its own
    theirs = ref("secret", "beta-ns")
    denied = {
        "GetApplication": a.stub.GetApplication(
            keeper_pb2.GetApplicationRequest(app=theirs), metadata=a.md()
        ),
        "UpdateApplication": a.stub.UpdateApplication(
            keeper_pb2.UpdateApplicationRequest(
                spec=spec("secret", "beta-ns"), expected_revision=mine.revision
            ),
            metadata=a.md(),
        ),
        "ScaleApplication": a.stub.ScaleApplication(
            keeper_pb2.ScaleApplicationRequest(app=theirs, replicas=1), metadata=a.md()
        ),
        "DeleteApplication": a.stub.DeleteApplication(
            keeper_pb2.DeleteApplicationRequest(app=theirs), metadata=a.md()
        ),
    }
    for name, call in denied.items():
        with pytest.raises(grpc.aio.AioRpcError) as exc:
            await call
        assert exc.value.code() == grpc.StatusCode.NOT_FOUND, name
        assert "beta-ns/secret not found" in exc.value.details()
    with pytest.raises(grpc.aio.AioRpcError) as exc:
        async for _ in a.stub.WatchApplication(
            keeper_pb2.WatchApplicationRequest(app=theirs), metadata=a.md()
        ):
            pass
    assert exc.value.code() == grpc.StatusCode.NOT_FOUND
    listed = await a.stub.ListApplications(keeper_pb2.ListApplicationsRequest(), metadata=a.md())
    assert listed.applications == []
    with pytest.raises(grpc.aio.AioRpcError) as exc:
        await a.stub.ListApplications(
            keeper_pb2.ListApplicationsRequest(namespace="beta-ns"), metadata=a.md()
        )
    assert exc.value.code() == grpc.StatusCode.NOT_FOUND
    with pytest.raises(grpc.aio.AioRpcError) as exc:
        await a.stub.SubmitApplication(
            keeper_pb2.SubmitApplicationRequest(spec=spec("sneaky", "beta-ns")), metadata=a.md()
        )
    assert exc.value.code() == grpc.StatusCode.PERMISSION_DENIED
    for call in (
        a.stub.CreateTenant(keeper_pb2.CreateTenantRequest(tenant="x", namespaces=["x"]), metadata=a.md()),
        a.stub.IssueToken(keeper_pb2.IssueTokenRequest(tenant="beta"), metadata=a.md()),
        a.stub.SetQuota(keeper_pb2.SetQuotaRequest(tenant="alpha"), metadata=a.md()),
        a.stub.RegisterCluster(
            keeper_pb2.RegisterClusterRequest(cluster=keeper_pb2.ClusterInfo(name="c", agent_address="x:1")),
            metadata=a.md(),
        ),
    ):
        with pytest.raises(grpc.aio.AioRpcError) as exc:
            await call
        assert exc.value.code() == grpc.StatusCode.PERMISSION_DENIED
    # B still owns and sees its app; admin sees it too.
    assert (
        await b.stub.GetApplication(keeper_pb2.GetApplicationRequest(app=theirs), metadata=b.md())
    ).app.name
    listed = await admin.stub.ListApplications(keeper_pb2.ListApplicationsRequest(), metadata=admin.md())
    assert [x.app.name for x in listed.applications] == ["secret"]


async def test_concurrent_submits_cannot_pass_the_quota_together(keeper: InProcessKeeper) -> None:
    """Each quota check carries a per-tenant fence into its write, so racing submits of one tenant
    are serialized: exactly the quota's worth win, and the rest get RESOURCE_EXHAUSTED."""
    admin = keeper.client()
    t = keeper.client(await _tenant(admin, "delta", keeper_pb2.Quota(max_applications=2)))
    results = await asyncio.gather(
        *(
            t.stub.SubmitApplication(
                keeper_pb2.SubmitApplicationRequest(spec=spec(f"racer{i}", "delta-ns")), metadata=t.md()
            )
            for i in range(8)
        ),
        return_exceptions=True,
    )
    wins = [r for r in results if isinstance(r, keeper_pb2.ApplicationStatus)]
    losses = [r for r in results if isinstance(r, grpc.aio.AioRpcError)]
    assert len(wins) == 2 and len(losses) == 6, results
    assert {e.code() for e in losses} == {grpc.StatusCode.RESOURCE_EXHAUSTED}
    listed = await t.stub.ListApplications(keeper_pb2.ListApplicationsRequest(), metadata=t.md())
    assert sorted(a.app.name for a in listed.applications) == sorted(w.app.name for w in wins)


async def test_quota_is_enforced_with_the_numbers(keeper: InProcessKeeper) -> None:
    admin = keeper.client()
    t = keeper.client(
        await _tenant(admin, "gamma", keeper_pb2.Quota(max_applications=2, max_replicas=3, max_cpus=1))
    )
    one = spec("one", "gamma-ns")
    one.resources.num_cpus = 0.25
    first = await t.stub.SubmitApplication(keeper_pb2.SubmitApplicationRequest(spec=one), metadata=t.md())
    await t.stub.SubmitApplication(
        keeper_pb2.SubmitApplicationRequest(spec=spec("two", "gamma-ns")), metadata=t.md()
    )
    with pytest.raises(grpc.aio.AioRpcError) as exc:
        await t.stub.SubmitApplication(
            keeper_pb2.SubmitApplicationRequest(spec=spec("three", "gamma-ns")), metadata=t.md()
        )
    assert exc.value.code() == grpc.StatusCode.RESOURCE_EXHAUSTED
    assert "applications would be 3, limit 2 (in use 2, this request adds 1)" in exc.value.details()
    wide = spec("one", "gamma-ns")
    wide.resources.num_cpus = 0.25
    wide.replicas.max = 10
    updated = await t.stub.UpdateApplication(
        keeper_pb2.UpdateApplicationRequest(spec=wide, expected_revision=first.revision), metadata=t.md()
    )
    with pytest.raises(grpc.aio.AioRpcError) as exc:
        await t.stub.ScaleApplication(
            keeper_pb2.ScaleApplicationRequest(app=ref("one", "gamma-ns"), replicas=4), metadata=t.md()
        )
    assert exc.value.code() == grpc.StatusCode.RESOURCE_EXHAUSTED
    assert "replicas would be 5, limit 3" in exc.value.details()
    scaled = await t.stub.ScaleApplication(
        keeper_pb2.ScaleApplicationRequest(
            app=ref("one", "gamma-ns"), replicas=2, expected_revision=updated.revision
        ),
        metadata=t.md(),
    )
    assert scaled.replicas == 2 and scaled.revision > updated.revision
    with pytest.raises(grpc.aio.AioRpcError) as exc:
        await t.stub.ScaleApplication(
            keeper_pb2.ScaleApplicationRequest(app=ref("one", "gamma-ns"), replicas=11), metadata=t.md()
        )
    assert exc.value.code() == grpc.StatusCode.INVALID_ARGUMENT and "[1, 10]" in exc.value.details()


async def test_unplaceable_stays_pending_with_the_reason_and_watch_follows(keeper: InProcessKeeper) -> None:
    admin = keeper.client()
    cluster = keeper_pb2.ClusterInfo(
        name="edge", agent_address="127.0.0.1:1", labels={"zone": "a"}, capacity={"CPU": 1}, free={"CPU": 1}
    )
    await admin.stub.RegisterCluster(keeper_pb2.RegisterClusterRequest(cluster=cluster), metadata=admin.md())
    clusters = await admin.stub.ListClusters(keeper_pb2.ListClustersRequest(), metadata=admin.md())
    assert [(c.name, c.alive) for c in clusters.clusters] == [("edge", True)]
    picky = spec("picky")
    picky.placement.cluster_labels["zone"] = "b"
    await admin.stub.SubmitApplication(keeper_pb2.SubmitApplicationRequest(spec=picky), metadata=admin.md())
    hungry = spec("hungry")
    hungry.resources.num_gpus = 1
    await admin.stub.SubmitApplication(keeper_pb2.SubmitApplicationRequest(spec=hungry), metadata=admin.md())
    wide = spec("wide")
    wide.placement.spread = 2
    await admin.stub.SubmitApplication(keeper_pb2.SubmitApplicationRequest(spec=wide), metadata=admin.md())

    async def reason(name: str) -> str:
        got = await admin.stub.GetApplication(
            keeper_pb2.GetApplicationRequest(app=ref(name)), metadata=admin.md()
        )
        return got.reason if got.state == AppState.PENDING and got.reason.startswith("unplaceable") else ""

    assert "edge: label zone=b wanted, cluster has zone=a" in str(
        await async_wait_for(lambda: reason("picky"), timeout=20, what="picky unplaceable")
    )
    assert "edge: GPU: needs 1, cluster has 0 in all" in str(
        await async_wait_for(lambda: reason("hungry"), timeout=20, what="hungry unplaceable")
    )
    assert "needs 2 eligible cluster(s), found 1" in str(
        await async_wait_for(lambda: reason("wide"), timeout=20, what="wide unplaceable")
    )

    events: list[keeper_pb2.StatusEvent] = []

    async def follow() -> None:
        async for event in admin.stub.WatchApplication(
            keeper_pb2.WatchApplicationRequest(app=ref("picky")), metadata=admin.md()
        ):
            events.append(event)

    watcher = asyncio.create_task(follow())
    await async_wait_for(lambda: asyncio.sleep(0, bool(events)), timeout=10, what="first event")
    deleting = await admin.stub.DeleteApplication(
        keeper_pb2.DeleteApplicationRequest(app=ref("picky")), metadata=admin.md()
    )
    assert deleting.state == AppState.DELETING
    await asyncio.wait_for(watcher, timeout=20)
    states = [e.state for e in events]
    assert states[0] == AppState.PENDING and states[-1] == AppState.DELETED

    async def gone() -> bool:
        try:
            await admin.stub.GetApplication(
                keeper_pb2.GetApplicationRequest(app=ref("picky")), metadata=admin.md()
            )
        except grpc.aio.AioRpcError as exc:
            return exc.code() == grpc.StatusCode.NOT_FOUND
        return False

    await async_wait_for(gone, timeout=10, what="picky forgotten after DELETED")


async def test_service_tokens_are_narrow_listed_and_revocable(keeper: InProcessKeeper) -> None:
    admin = keeper.client()
    tenant = keeper.client(await _tenant(admin, "omega"))
    wide = spec("scaled", "omega-ns")
    wide.replicas.max = 3
    app = await tenant.stub.SubmitApplication(
        keeper_pb2.SubmitApplicationRequest(spec=wide), metadata=tenant.md()
    )
    issued = {
        role: await admin.stub.IssueToken(keeper_pb2.IssueTokenRequest(role=role), metadata=admin.md())
        for role in ("autoscaler", "agent")
    }
    scaler, agent = keeper.client(issued["autoscaler"].token), keeper.client(issued["agent"].token)
    # The autoscaler reads and scales any app (the owner's quota applies) and does nothing else.
    scaled = await scaler.stub.ScaleApplication(
        keeper_pb2.ScaleApplicationRequest(app=app.app, replicas=3), metadata=scaler.md()
    )
    assert scaled.replicas == 3
    for call in (
        scaler.stub.SubmitApplication(
            keeper_pb2.SubmitApplicationRequest(spec=spec("x", "omega-ns")), metadata=scaler.md()
        ),
        scaler.stub.DeleteApplication(keeper_pb2.DeleteApplicationRequest(app=app.app), metadata=scaler.md()),
        agent.stub.IssueToken(keeper_pb2.IssueTokenRequest(role="admin"), metadata=agent.md()),
        agent.stub.GetApplication(keeper_pb2.GetApplicationRequest(app=app.app), metadata=agent.md()),
    ):
        with pytest.raises(grpc.aio.AioRpcError) as exc:
            await call
        assert exc.value.code() == grpc.StatusCode.PERMISSION_DENIED
        assert "needs" in (exc.value.details() or "")
    # An agent obtains endpoint tokens (one app each) for the apps it runs.
    endpoint = await agent.stub.IssueToken(
        keeper_pb2.IssueTokenRequest(role="endpoint", app=app.app), metadata=agent.md()
    )
    listed = await admin.stub.ListTokens(keeper_pb2.ListTokensRequest(), metadata=admin.md())
    by_id = {t.token_id: t for t in listed.tokens}
    assert by_id[endpoint.token_id].role == "endpoint" and by_id[endpoint.token_id].app.name == "scaled"
    assert all(endpoint.token not in str(t) for t in listed.tokens)  # ids and records, never tokens
    gone = await admin.stub.RevokeToken(
        keeper_pb2.RevokeTokenRequest(token_id=issued["autoscaler"].token_id), metadata=admin.md()
    )
    assert gone.token.role == "autoscaler"
    with pytest.raises(grpc.aio.AioRpcError) as exc:
        await admin.stub.RevokeToken(
            keeper_pb2.RevokeTokenRequest(token_id=issued["autoscaler"].token_id), metadata=admin.md()
        )
    assert exc.value.code() == grpc.StatusCode.NOT_FOUND


def pipeline(name: str, namespace: str) -> common_pb2.ApplicationSpec:
    """Two stages of 0.25 CPU each: ``cache`` fixed at 1, ``model`` autoscaled in [1, 4]."""
    out = common_pb2.ApplicationSpec(name=name, namespace=namespace, kind="pipeline")
    out.inputs.add(name="x", datatype="FP32", shape=[1])
    cache = out.stages.add(name="cache", import_path="examples.echo:Echo")
    model = out.stages.add(name="model", import_path="examples.echo:Echo")
    for stage in (cache, model):
        stage.resources.num_cpus = 0.25
    model.autoscaling.CopyFrom(
        common_pb2.AutoscalingConfig(target_ongoing_requests=2, min_replicas=1, max_replicas=4)
    )
    out.edges.add(caller="cache", callee="model")
    return out


async def test_a_pipeline_scales_per_stage_within_each_range_and_the_quota(keeper: InProcessKeeper) -> None:
    admin = keeper.client()
    t = keeper.client(await _tenant(admin, "delta", keeper_pb2.Quota(max_cpus=1)))
    app = ref("llm", "delta-ns")
    first = await t.stub.SubmitApplication(
        keeper_pb2.SubmitApplicationRequest(spec=pipeline("llm", "delta-ns")), metadata=t.md()
    )
    assert dict(first.stage_replicas) == {"cache": 1, "model": 1} and first.scaling.autoscaled

    async def scale(client: KeeperClient, **fields: object) -> keeper_pb2.ApplicationStatus:
        request = keeper_pb2.ScaleApplicationRequest(app=app, **fields)  # type: ignore[arg-type]
        return await client.stub.ScaleApplication(request, metadata=client.md())

    async def refused(client: KeeperClient, **fields: object) -> tuple[grpc.StatusCode, str]:
        with pytest.raises(grpc.aio.AioRpcError) as exc:
            await scale(client, **fields)
        return exc.value.code(), exc.value.details() or ""

    code, message = await refused(t, replicas=2)
    assert code == grpc.StatusCode.INVALID_ARGUMENT and "scale one of its stages (cache, model)" in message
    code, message = await refused(t, replicas=2, stage="embed")
    assert code == grpc.StatusCode.INVALID_ARGUMENT and "no stage 'embed'" in message
    code, message = await refused(t, replicas=5, stage="model")
    assert code == grpc.StatusCode.INVALID_ARGUMENT and "[1, 4] of stage 'model'" in message
    # The autoscaler drives only stages with a block; its scale-up is capped by the quota (1 CPU:
    # the cache's 0.25 + 3 model replicas), the cap named in the reason.
    code, message = await refused(admin, replicas=1, stage="cache", by_autoscaler=True)
    assert code == grpc.StatusCode.FAILED_PRECONDITION and "stage 'cache'" in message
    capped = await scale(admin, replicas=4, stage="model", by_autoscaler=True)
    assert dict(capped.stage_replicas) == {"cache": 1, "model": 3} and "capped at 3" in capped.scaling.reason
    # A person's stage scale pins the count and pauses the autoscaler until handed back.
    pinned = await scale(t, replicas=2, stage="model")
    assert pinned.stage_replicas["model"] == 2 and pinned.scaling.paused
    code, _ = await refused(admin, replicas=3, stage="model", by_autoscaler=True)
    assert code == grpc.StatusCode.FAILED_PRECONDITION
    code, message = await refused(t, replicas=4, stage="model")
    assert code == grpc.StatusCode.RESOURCE_EXHAUSTED and "cpus" in message
    resumed = await scale(t, stage="model", resume_autoscaling=True)
    assert not resumed.scaling.paused and resumed.stage_replicas["model"] == 2
    fixed = await scale(t, replicas=1, stage="cache")  # a stage without a block pauses nothing
    assert fixed.scaling.by == "person" and not fixed.scaling.paused
    # A new version keeps each stage's count.
    v2 = pipeline("llm", "delta-ns")
    v2.version = "2"
    updated = await t.stub.UpdateApplication(
        keeper_pb2.UpdateApplicationRequest(spec=v2, expected_revision=fixed.revision), metadata=t.md()
    )
    assert dict(updated.stage_replicas) == {"cache": 1, "model": 2}
