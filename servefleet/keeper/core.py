"""The keeper's API, without gRPC: submissions, reads, changes, watches, clusters, tenants.

Every method takes the authenticated caller first. Writes go to etcd through compare-and-swap
transactions (``KeeperStore``); the reconciler (``reconciler.py``) acts on what is stored, so an
API call returns as soon as the desired state is durable.
"""

from __future__ import annotations

import contextlib
import functools
import logging
import os
import time
from collections.abc import AsyncIterator, Callable
from pathlib import Path

from servefleet import pipeline_spec
from servefleet import spec as specs
from servefleet.api import common_pb2, keeper_pb2
from servefleet.common.appid import DEFAULT_NAMESPACE, AppId, check_name
from servefleet.common.auth import (
    ADMIN,
    AGENT,
    AUTOSCALER,
    ENDPOINT,
    ROLES,
    TENANT,
    Principal,
    hash_token,
    new_token,
    token_id,
)
from servefleet.common.config import settings
from servefleet.common.errors import (
    Conflict,
    FailedPrecondition,
    InvalidArgument,
    NotFound,
    PermissionDenied,
    ResourceExhausted,
)
from servefleet.keeper import placement, policy
from servefleet.keeper.store import AppRecord, KeeperStore, QuotaFence, QuotaRace, cancel_watch

#: Roles whose Scale calls may speak for the autoscaler (issue 19 adds the narrow ``autoscaler``).
AUTOSCALER_ROLES = (ADMIN, AUTOSCALER)

log = logging.getLogger(__name__)

AppState = keeper_pb2.AppState
DEFAULT_PAGE_SIZE = 100
MAX_PAGE_SIZE = 1000


def event_of(status: keeper_pb2.ApplicationStatus, ref: common_pb2.AppRef) -> keeper_pb2.StatusEvent:
    return keeper_pb2.StatusEvent(
        app=ref, state=status.state, reason=status.reason, revision=status.revision, at=status.updated_at
    )


def _usage_at(desired: keeper_pb2.DesiredState, stage: str, count: int) -> policy.Usage:
    """The app's usage with its count (or one stage's count) at ``count``."""
    if stage:
        return policy.usage_of(desired.spec, desired.replicas, {**desired.stage_replicas, stage: count})
    return policy.usage_of(desired.spec, count, desired.stage_replicas)


class Keeper:
    """Application lifecycle requests, checked for identity, policy and quota, stored in etcd."""

    def __init__(self, store: KeeperStore, *, clock: Callable[[], float] = time.time) -> None:
        self.store = store
        self.clock = clock

    # -- applications --------------------------------------------------------------------------

    async def submit(self, who: Principal, spec: common_pb2.ApplicationSpec) -> keeper_pb2.ApplicationStatus:
        spec = self._checked(who, spec)
        replicas = spec.replicas.initial
        now = self.clock()
        desired = keeper_pb2.DesiredState(
            spec=spec,
            replicas=replicas,
            tenant=who.tenant,
            created_at=now,
            scaling=keeper_pb2.Scaling(by="submit", reason="initial replicas", at=now),
        )
        status = keeper_pb2.ApplicationStatus(
            state=AppState.PENDING, reason="submitted; waiting for placement", updated_at=now
        )
        while True:
            fence = await self._check_quota(self._payer(who), policy.usage_of(spec, replicas))
            try:
                revision = await self.store.create_app(desired, status, fence)
                break
            except QuotaRace:
                continue  # another write of this tenant committed after our check: check again
        status.revision = revision
        log.info(
            "application submitted",
            extra={"app": AppId.parse(spec).key, "revision": revision},
        )
        return AppRecord(desired, revision, status).view()

    async def get(self, who: Principal, ref: common_pb2.AppRef) -> keeper_pb2.ApplicationStatus:
        return (await self._record(who, ref)).view()

    async def list_apps(
        self, who: Principal, request: keeper_pb2.ListApplicationsRequest
    ) -> keeper_pb2.ListApplicationsResponse:
        """A page of applications the caller may see, filtered by namespace, labels and state."""
        if request.page_size < 0:
            raise InvalidArgument(f"page_size: must be >= 0, got {request.page_size}")
        size = min(request.page_size or DEFAULT_PAGE_SIZE, MAX_PAGE_SIZE)
        namespaces = who.visible(request.namespace)
        if request.namespace and not namespaces:  # asked for by name, and it is another tenant's
            raise NotFound(f"namespace {request.namespace!r} not found")
        out = keeper_pb2.ListApplicationsResponse()
        after = request.page_token  # the last key scanned, matching or not
        while True:
            page = await self.store.list_apps(namespaces, start_after=after, limit=size)
            for record in page.apps:
                if len(out.applications) == size:
                    out.next_page_token = after
                    return out
                after = AppId.parse(record.ref).key
                if self._matches(record, request):
                    out.applications.append(record.view())
            if not page.next_key:
                return out

    @staticmethod
    def _matches(record: AppRecord, request: keeper_pb2.ListApplicationsRequest) -> bool:
        labels = record.desired.spec.labels
        if any(labels.get(k) != v for k, v in request.label_selector.items()):
            return False
        return request.state in (AppState.APP_STATE_UNSPECIFIED, record.status.state)

    async def update(
        self, who: Principal, spec: common_pb2.ApplicationSpec, expected_revision: int
    ) -> keeper_pb2.ApplicationStatus:
        """New version or resources: CAS on the revision; the reconciler rolls it out."""
        spec = self._checked(who, spec, existing=True)
        record = await self._record(who, AppId.parse(spec).ref())
        if expected_revision <= 0:
            raise FailedPrecondition(
                f"expected_revision is required to update {AppId.parse(record.ref).key} "
                f"(current revision {record.revision})"
            )
        self._not_deleting(record)
        replicas = min(max(record.desired.replicas, spec.replicas.min), spec.replicas.max)
        # Each stage keeps the count it runs, within its new range.
        held = pipeline_spec.stage_counts(record.desired.spec, record.desired.stage_replicas)
        stages = pipeline_spec.stage_counts(spec, held)
        desired = keeper_pb2.DesiredState()
        desired.CopyFrom(record.desired)
        desired.spec.CopyFrom(spec)
        desired.replicas = replicas
        desired.ClearField("stage_replicas")
        desired.stage_replicas.update(stages)
        change = policy.usage_of(spec, replicas, stages) - policy.usage_of(
            record.desired.spec, record.desired.replicas, record.desired.stage_replicas
        )
        if replicas != record.desired.replicas:
            desired.scaling.CopyFrom(
                keeper_pb2.Scaling(by="update", reason="the new spec's replica range", at=self.clock())
            )
        desired.scaling.paused = desired.scaling.paused and pipeline_spec.autoscaled(spec)
        while True:
            fence = await self._check_quota(self._payer(who), change)
            try:
                record.revision = await self.store.replace_desired(desired, expected_revision, fence)
                break
            except QuotaRace:
                continue  # another write of this tenant committed after our check: check again
        record.desired = desired
        return record.view()

    async def scale(
        self,
        who: Principal,
        ref: common_pb2.AppRef,
        replicas: int,
        expected_revision: int = 0,
        *,
        reason: str = "",
        by_autoscaler: bool = False,
        resume_autoscaling: bool = False,
        stage: str = "",
    ) -> keeper_pb2.ApplicationStatus:
        """Set replicas per cluster within the spec's range (a pipeline's: one ``stage``'s, within
        that stage's range); 0 as revision means unconditional.

        Who wins on an autoscaled app: a person. Their scale pins the count and pauses the
        autoscaler for the app (``scaling.paused``, shown in its status; for a pipeline, every
        stage) until they hand it back with ``resume_autoscaling``; the autoscaler's calls are
        refused meanwhile. The autoscaler's scale-ups are capped at what the app's tenant quota
        allows, the cap named in the reason."""
        if by_autoscaler and who.role not in AUTOSCALER_ROLES:
            raise PermissionDenied(f"scaling as the autoscaler needs a role in {', '.join(AUTOSCALER_ROLES)}")
        while True:
            record = await self._record(who, ref)
            self._not_deleting(record)
            rng, current = self._scaled_range(record, stage, resume_autoscaling)
            scaling = self._scaling(record, reason, by_autoscaler, resume_autoscaling, stage)
            target = current if resume_autoscaling else replicas
            if not rng.min <= target <= rng.max:
                what = f"stage {stage!r} of " if stage else ""
                raise InvalidArgument(
                    f"replicas: {target} is outside the range [{rng.min}, {rng.max}] of "
                    f"{what}{AppId.parse(record.ref).key}; update the spec's replicas to widen it"
                )
            usage = functools.partial(_usage_at, record.desired, stage)
            # The autoscaler (flag or role) scales on the owner's behalf: the owner's quota applies.
            on_behalf = by_autoscaler or who.role == AUTOSCALER
            payer = record.desired.tenant if on_behalf else self._payer(who)
            try:
                fence = await self._check_quota(payer, usage(target) - usage(current))
            except ResourceExhausted as exc:
                if not by_autoscaler or target <= current:
                    raise
                target, fence = await self._quota_cap(payer, usage, current, target)
                scaling.reason = f"{reason or 'autoscaler'}; capped at {target} by quota: {exc}"
            was = record.desired.scaling
            if target == current and (scaling.by, scaling.reason, scaling.paused) == (
                was.by,
                was.reason,
                was.paused,
            ):
                return record.view()  # nothing new to write (the same refusal again, say)
            desired = keeper_pb2.DesiredState()
            desired.CopyFrom(record.desired)
            if stage:
                desired.stage_replicas[stage] = target
            else:
                desired.replicas = target
            desired.scaling.CopyFrom(scaling)
            try:
                record.revision = await self.store.replace_desired(
                    desired, expected_revision or record.revision, fence
                )
            except QuotaRace:
                continue  # another write of this tenant committed after our check: check again
            except Conflict:
                if expected_revision:
                    raise
                continue  # unconditional: someone else changed it; apply ours on top
            record.desired = desired
            return record.view()

    @staticmethod
    def _scaled_range(record: AppRecord, stage: str, resume: bool) -> tuple[common_pb2.ReplicaRange, int]:
        """The range and current count a scale call moves: the app's, or one pipeline stage's."""
        spec, name = record.desired.spec, AppId.parse(record.ref).key
        if not stage:
            if spec.kind == "pipeline" and not resume:
                stages = ", ".join(s.name for s in spec.stages)
                raise InvalidArgument(f"stage: {name} is a pipeline; scale one of its stages ({stages})")
            return spec.replicas, record.desired.replicas
        if spec.kind != "pipeline":
            raise InvalidArgument(f"stage: {name} is not a pipeline; scale it without a stage")
        found = next((s for s in spec.stages if s.name == stage), None)
        if found is None:
            stages = ", ".join(s.name for s in spec.stages)
            raise InvalidArgument(f"stage: {name} has no stage {stage!r} (its stages: {stages})")
        return found.replicas, pipeline_spec.stage_counts(spec, record.desired.stage_replicas)[stage]

    def _scaling(
        self, record: AppRecord, reason: str, by_autoscaler: bool, resume: bool, stage: str
    ) -> keeper_pb2.Scaling:
        """Who scales now and why; FailedPrecondition where the precedence rule says no."""
        name, spec = AppId.parse(record.ref).key, record.desired.spec
        autoscaled = pipeline_spec.autoscaled(spec)
        now, held = self.clock(), record.desired.scaling
        if (by_autoscaler or resume) and not autoscaled:
            raise FailedPrecondition(f"application {name} has no autoscaling block in its spec")
        stage_block = stage and next(s for s in spec.stages if s.name == stage).HasField("autoscaling")
        if by_autoscaler and stage and not stage_block:
            raise FailedPrecondition(f"stage {stage!r} of {name} has no autoscaling block in its spec")
        if by_autoscaler and held.paused:
            raise FailedPrecondition(
                f"autoscaling of {name} is paused: a person scaled it "
                f"(`servefleet app scale {record.ref.name} --auto` hands it back)"
            )
        if by_autoscaler:
            return keeper_pb2.Scaling(by="autoscaler", reason=reason or "autoscaler", at=now)
        if resume:
            return keeper_pb2.Scaling(by="person", reason=reason or "autoscaling resumed", at=now)
        pins = bool(stage_block) if stage else autoscaled  # a fixed stage's count pauses nothing
        why = reason or ("pinned by a person; autoscaling paused" if pins else "scaled by a person")
        return keeper_pb2.Scaling(by="person", reason=why, at=now, paused=pins or held.paused)

    async def _quota_cap(
        self, tenant: str, usage: Callable[[int], policy.Usage], current: int, wanted: int
    ) -> tuple[int, QuotaFence | None]:
        """The largest count in [current, wanted) the tenant's quota allows, with its fence."""
        for count in range(wanted - 1, current, -1):
            with contextlib.suppress(ResourceExhausted):
                return count, await self._check_quota(tenant, usage(count) - usage(current))
        return current, None

    async def delete(self, who: Principal, ref: common_pb2.AppRef) -> keeper_pb2.ApplicationStatus:
        """Mark for deletion; the reconciler removes it from every cluster, then forgets it."""
        while True:
            record = await self._record(who, ref)
            if record.desired.deleting:
                return record.view()
            desired = keeper_pb2.DesiredState()
            desired.CopyFrom(record.desired)
            desired.deleting = True
            with contextlib.suppress(Conflict):  # changed meanwhile: look again
                record.revision = await self.store.replace_desired(desired, record.revision)
                record.desired = desired
                record.status.state = AppState.DELETING
                record.status.reason = "deletion requested"
                return record.view()

    async def watch(self, who: Principal, ref: common_pb2.AppRef) -> AsyncIterator[keeper_pb2.StatusEvent]:
        """The current status, then every change of state, reason or revision, until DELETED."""
        record = await self._record(who, ref)
        ref = record.ref
        last = event_of(record.status, ref)
        yield last
        if last.state == AppState.DELETED:
            return
        # The status read and the watch start meet at the status key's revision: nothing is missed.
        watch = await self.store.watch_status(ref, record.status_revision)
        try:
            async for event in watch:
                if event.kind == "DELETE":
                    yield keeper_pb2.StatusEvent(
                        app=ref, state=AppState.DELETED, reason="deleted", at=self.clock()
                    )
                    return
                status = keeper_pb2.ApplicationStatus.FromString(event.kv.value)
                current = event_of(status, ref)
                if (current.state, current.reason, current.revision) != (
                    last.state,
                    last.reason,
                    last.revision,
                ):
                    yield current
                    last = current
                if current.state == AppState.DELETED:
                    return
        finally:
            await cancel_watch(watch)

    # -- clusters ------------------------------------------------------------------------------

    async def register_cluster(self, who: Principal, info: keeper_pb2.ClusterInfo) -> int:
        if who.role != AGENT:
            who.require_admin("registering a cluster (or an agent token)")
        if not info.name:
            raise InvalidArgument("cluster.name: required")
        if not info.agent_address:
            raise InvalidArgument("cluster.agent_address: required (where the keeper reaches the agent)")
        stored = keeper_pb2.ClusterInfo()
        stored.CopyFrom(info)
        stored.heartbeat_at = self.clock()
        stored.alive = True
        await self.store.put_cluster(stored)
        return settings.keeper_heartbeat_interval_s

    async def clusters(self, who: Principal) -> list[keeper_pb2.ClusterInfo]:
        """Every registered cluster; ``alive`` says whether it heartbeated recently."""
        now = self.clock()
        found = await self.store.clusters()
        for c in found:
            c.alive = placement.alive(c, now, settings.keeper_cluster_dead_after_s)
        return found

    # -- tenants -------------------------------------------------------------------------------

    async def create_tenant(
        self, who: Principal, request: keeper_pb2.CreateTenantRequest
    ) -> keeper_pb2.TenantInfo:
        who.require_admin("creating a tenant")
        check_name(request.tenant, "tenant")
        if not request.namespaces:
            raise InvalidArgument("namespaces: a tenant needs at least one namespace")
        for ns in request.namespaces:
            check_name(ns, "namespaces")
        info = keeper_pb2.TenantInfo(
            tenant=request.tenant, namespaces=request.namespaces, quota=request.quota
        )
        await self.store.create_tenant(info)
        return info

    async def issue_token(self, who: Principal, request: keeper_pb2.IssueTokenRequest) -> tuple[str, str]:
        """A new token and its id. Admins issue any role; a cluster agent only endpoint tokens (for
        the apps the keeper places on it). The token is returned once; only its hash is kept."""
        role = request.role or TENANT
        if role not in ROLES:
            raise InvalidArgument(f"role: {role!r} is not one of {', '.join(ROLES)}")
        if not (who.is_admin or (who.role == AGENT and role == ENDPOINT)):
            may = "may issue endpoint tokens only" if who.role == AGENT else "is not one"
            raise PermissionDenied(f"issuing a {role} token needs an admin token; {who.describe()} {may}")
        record = keeper_pb2.TokenRecord(role=role, created_at=self.clock(), description=request.description)
        if role == TENANT:
            if await self.store.tenant(request.tenant) is None:
                raise NotFound(
                    f"tenant {request.tenant!r} not found: create it first (servefleet tenant create)"
                )
            record.tenant = request.tenant
        elif role == ENDPOINT:
            if not request.app.name:
                raise InvalidArgument("app.name: an endpoint token serves one application; name it")
            record.app.namespace = request.app.namespace or specs.DEFAULT_NAMESPACE
            record.app.name = request.app.name
            record.tenant = ENDPOINT
        else:
            record.tenant = role
        token = new_token()
        digest = hash_token(token)
        await self.store.put_token(digest, record)
        log.info("token issued", extra={"token_id": token_id(digest), "role": role, "by": who.describe()})
        return token, token_id(digest)

    async def list_tokens(self, who: Principal, tenant: str = "") -> list[keeper_pb2.TokenInfo]:
        who.require_admin("listing tokens")
        out = [
            _token_info(digest, record)
            for digest, record in await self.store.tokens()
            if not tenant or record.tenant == tenant
        ]
        return sorted(out, key=lambda t: t.created_at)

    async def revoke_token(self, who: Principal, ident: str) -> keeper_pb2.TokenInfo:
        """Delete a token's record: every service refuses it within ``settings.token_cache_s``."""
        who.require_admin("revoking a token")
        if len(ident) < 8:
            raise InvalidArgument("token_id: give the id `servefleet token list` shows (16 hex digits)")
        found = await self.store.find_token(ident)
        if found is None:
            raise NotFound(f"token {ident} not found (servefleet token list shows the ids)")
        digest, record = found
        await self.store.delete_token(digest)
        log.info("token revoked", extra={"token_id": token_id(digest), "by": who.describe()})
        return _token_info(digest, record)

    async def service_token(self, role: str, description: str) -> str:
        """A token for one of the platform's own parts (the keeper's own, to call agents)."""
        token = new_token()
        record = keeper_pb2.TokenRecord(
            tenant=role, role=role, created_at=self.clock(), description=description
        )
        await self.store.put_token(hash_token(token), record)
        return token

    async def set_quota(self, who: Principal, tenant: str, quota: keeper_pb2.Quota) -> keeper_pb2.TenantInfo:
        who.require_admin("setting a quota")
        info = await self.store.tenant(tenant)
        if info is None:
            raise NotFound(f"tenant {tenant!r} not found")
        info.quota.CopyFrom(quota)
        await self.store.put_tenant(info)
        return info

    async def bootstrap_admin(self, token_file: str = "") -> str:
        """Make the first admin token once per etcd; write it to ``token_file`` (0600) when given.

        A token file that already holds a valid admin token is kept as is; otherwise a fresh admin
        token is issued and written, so a new state dir over old etcd data still gets a token."""
        path = Path(token_file) if token_file else None
        if path is not None and path.exists():
            existing = path.read_text().strip()
            record = await self.store.token(hash_token(existing)) if existing else None
            if record is not None and record.role == ADMIN:
                return existing
        token = new_token()
        record = keeper_pb2.TokenRecord(tenant=ADMIN, role=ADMIN, created_at=self.clock())
        first = await self.store.claim_bootstrap(hash_token(token), record)
        if not first:
            if path is None:
                return ""
            await self.store.put_token(hash_token(token), record)
        if path is not None:
            path.parent.mkdir(parents=True, exist_ok=True)
            fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o600)
            with os.fdopen(fd, "w") as f:
                f.write(token + "\n")
            os.chmod(path, 0o600)
            log.info("admin token written", extra={"path": str(path)})
        else:
            log.warning("admin token created; pass --admin-token-file to keep it: %s", token)
        return token

    # -- helpers -------------------------------------------------------------------------------

    def _checked(
        self, who: Principal, spec: common_pb2.ApplicationSpec, *, existing: bool = False
    ) -> common_pb2.ApplicationSpec:
        """Validated spec; the namespace must be the caller's (an existing app of another tenant
        is NOT_FOUND, a new one in a foreign namespace PERMISSION_DENIED)."""
        spec = specs.load_spec(spec)
        if existing:
            who.require_visible(spec.namespace, spec.name)
        if not who.is_admin and spec.namespace == DEFAULT_NAMESPACE and who.namespaces:
            if DEFAULT_NAMESPACE not in who.namespaces:
                spec.namespace = who.namespaces[0]  # a tenant's apps default to its first namespace
        who.require_namespace(spec.namespace)
        policy.check_sources(spec)
        return spec

    async def _record(self, who: Principal, ref: common_pb2.AppRef) -> AppRecord:
        if not ref.name:
            raise InvalidArgument("app.name: required")
        ref = AppId.parse(ref).ref()
        who.require_visible(ref.namespace, ref.name)
        record = await self.store.get_app(ref)
        if record is None:
            raise NotFound(f"application {AppId.parse(ref).key} not found")
        return record

    @staticmethod
    def _not_deleting(record: AppRecord) -> None:
        if record.desired.deleting:
            raise FailedPrecondition(f"application {AppId.parse(record.ref).key} is being deleted")

    @staticmethod
    def _payer(who: Principal) -> str:
        """Whose quota a caller's write counts against ("" for an admin: none)."""
        return "" if who.is_admin else who.tenant

    async def _check_quota(self, payer: str, change: policy.Usage) -> QuotaFence | None:
        """RESOURCE_EXHAUSTED when ``change`` would pass the tenant's quota; otherwise the fence the
        write must carry so that a concurrent write of the same tenant can't pass it too."""
        if not payer or payer == ADMIN:
            return None
        tenant = await self.store.tenant(payer)
        if tenant is None:
            raise NotFound(f"tenant {payer!r} not found")
        limits = tenant.quota
        if not (limits.max_applications or limits.max_replicas or limits.max_cpus or limits.max_gpus):
            return None
        fence = await self.store.quota_fence(payer)  # read before the usage it guards
        page = await self.store.list_apps(list(tenant.namespaces))
        current = policy.usage_total(r.desired for r in page.apps)
        policy.check_quota(payer, limits, current, change)
        return fence


def _token_info(digest: str, record: keeper_pb2.TokenRecord) -> keeper_pb2.TokenInfo:
    return keeper_pb2.TokenInfo(
        token_id=token_id(digest),
        tenant=record.tenant,
        role=record.role,
        app=record.app,
        description=record.description,
        created_at=record.created_at,
    )
