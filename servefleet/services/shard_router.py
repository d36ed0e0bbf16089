"""The ingress of a ``kind: sharded`` app: a KServe v2 router that fans each batch out to shards.

``ShardRouterCore`` (plain, unit-tested with a fake transport) serves one request thus:

1. check it (model, inputs, every key in ``[0, rows)``: INVALID_ARGUMENT names the first bad one);
2. take the batch's distinct keys and split them by owning shard (:class:`Layout`);
3. look them up on every shard hit *in parallel*, under the caller's deadline; per shard, the
   replica is chosen by power of two choices on this router's in-flight count (``Router``);
4. merge: pooling and the final scoring run here, bit for bit like the unsharded reference.

Hedging: when a shard's first replica has not answered within that shard's recent p95 (the p95 of
its *fastest* replica over the last lookups, so one slow replica cannot raise the bar it is judged
by), a second lookup goes to another replica of the same shard (one whose median is below that
delay, so it can win: hedging to a replica known to be slow only adds load) and the first answer
wins. Hedges spend a per-shard budget (``settings.shard_hedge_budget`` of its lookups, at most),
so extra load is bounded; ``stats()`` counts them. The losing lookup is left to finish (bounded by
the deadline): its latency keeps that replica's estimate honest and its in-flight count steers P2C
away from it.

A replica that is gone (UNAVAILABLE) or full costs a retry on another replica of its shard; a
routing table from the master is swapped atomically, so requests that started on the old layout
finish on it while new ones use the new one (resharding without failures).

With ``shard_router_cpp`` (the default; ``SERVEFLEET_SHARD_ROUTER_CPP=0`` turns it off) the same
request path runs in C++ (:class:`CppShardRouter`,
``cpp/shard_router.cc``) on the router's public port, without the GIL or an event loop per
request, in front of this Python server on a loopback port: C++ serves the well-formed ModelInfer
requests it can and relays everything else to Python unchanged (invalid requests, other methods,
traced requests, a fan-out it cannot complete), so Python still words every error. It gets each
table this router adopts; its counts appear in ``stats()`` and the router's metrics.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import time
from collections import deque
from collections.abc import AsyncIterator, Awaitable, Iterable
from dataclasses import dataclass, field
from typing import Any, Protocol

import grpc
import numpy as np
from tritonclient.grpc import service_pb2

from servefleet.api import common_pb2, discovery_pb2
from servefleet.common import metrics, telemetry
from servefleet.common.appid import AppId
from servefleet.common.config import settings
from servefleet.common.errors import (
    DeadlineExceeded,
    InvalidArgument,
    ResourceExhausted,
    ServefleetError,
    Unavailable,
)
from servefleet.common.server import GrpcServer
from servefleet.common.tensors import decode_request, encode_response
from servefleet.direct import OUTPUT_NAME, ctr
from servefleet.services.forwarder import CppFront, custom_sampler, input_rows, rpc_series
from servefleet.services.proxy import (
    SERVICE,
    InferenceServicer,
    check_request,
    check_served,
    model_metadata,
    parse_infer_request,
    registrar,
)
from servefleet.services.replica_wire import SHARD_LOOKUP, error_for
from servefleet.services.router import Router, Slot
from servefleet.services.routing import ReplicaInfo
from servefleet.services.sharding import Layout, merge_ctr
from servefleet.services.transports import GrpcTransport, ReplicaGone, _answer_of

log = logging.getLogger(__name__)

#: Latency samples kept per shard replica (its recent p95 comes from these).
WINDOW = 128
#: Samples a replica needs before its p95 counts.
MIN_SAMPLES = 16
#: New samples after which a shard's p95 is computed again.
REFRESH = 8
#: Hedge tokens a shard may bank (bounds a burst of hedges after a quiet spell).
MAX_TOKENS = 10.0
#: Caller without a deadline: how long a request may take at most.
DEFAULT_DEADLINE_S = 60.0


@dataclass(frozen=True)
class ShardRouting:
    """One epoch of a sharded app's table: spec, layout, and each shard's ready replicas."""

    epoch: int
    spec: bytes  # serialized ApplicationSpec
    layout: Layout
    shards: tuple[tuple[ReplicaInfo, ...], ...]  # index: shard number

    @property
    def replicas(self) -> tuple[ReplicaInfo, ...]:
        return tuple(r for replicas in self.shards for r in replicas)


class ShardTransport(Protocol):
    """How a router reaches a shard replica (gRPC in production, a fake in unit tests)."""

    async def lookup(self, replica: ReplicaInfo, keys: np.ndarray, timeout_s: float) -> np.ndarray:
        """Rows of ``keys``; ReplicaGone when unreachable, a domain error otherwise."""
        ...


class GrpcShardTransport(GrpcTransport):
    """Lookups over each shard replica's own gRPC port: raw arrays, one plain channel per address
    (no client interceptors: they would double the cost of the router's hottest call)."""

    async def lookup(self, replica: ReplicaInfo, keys: np.ndarray, timeout_s: float) -> np.ndarray:
        call = self._channels.channel(replica.address).unary_unary(SHARD_LOOKUP)
        try:
            rows: bytes = await call(keys.astype("<i8", copy=False).tobytes(), timeout=timeout_s)
        except grpc.aio.AioRpcError as exc:
            status, message = _answer_of(exc)  # raises ReplicaGone when unreachable
            raise error_for(status, str(message)) from None
        except grpc.aio.UsageError as exc:  # its channel closed: the replica left the table
            raise ReplicaGone(str(exc)) from exc
        return np.frombuffer(rows, dtype="<f4").reshape(len(keys), -1)


@dataclass
class ShardPool:
    """One shard's replicas as this router sees them: P2C, latency windows, hedge budget, counts."""

    shard: int
    #: No node preference (node id ""): a shard's replicas are spread over nodes on purpose.
    router: Router = field(default_factory=lambda: Router(""))
    latencies: dict[str, deque[float]] = field(default_factory=dict)
    tokens: float = MAX_TOKENS
    lookups: int = 0
    hedges: int = 0
    hedge_wins: int = 0
    retries: int = 0

    def update(self, replicas: Iterable[ReplicaInfo]) -> None:
        replicas = list(replicas)
        self.router.update(replicas)
        self.latencies = {r.name: self.latencies.get(r.name, deque(maxlen=WINDOW)) for r in replicas}
        self._delay = None

    _delay: float | None = None  # hedge_delay, recomputed every REFRESH samples (sorting is not free)
    _p50: dict[str, float] = field(default_factory=dict)
    _fresh: int = 0

    def observe(self, name: str, seconds: float) -> None:
        window = self.latencies.get(name)
        if window is not None:
            window.append(seconds)
            self._fresh += 1
            if self._fresh >= REFRESH:
                self._delay, self._fresh = None, 0

    def hedge_delay(self) -> float:
        """Seconds to wait before hedging: the p95 of this shard's fastest replica."""
        if self._delay is None:
            p95s, self._p50 = [], {}
            for name, window in self.latencies.items():
                if len(window) >= MIN_SAMPLES:
                    ordered = sorted(window)
                    p95s.append(ordered[int(0.95 * (len(ordered) - 1))])
                    self._p50[name] = ordered[len(ordered) // 2]
            self._delay = min(p95s) if p95s else settings.shard_hedge_default_ms / 1000.0
        return self._delay

    def can_win(self, name: str) -> bool:
        """Whether a hedge to replica ``name`` may beat a primary already late by the hedge delay:
        its median is below that delay (a hedge to a replica known to be slow only adds load)."""
        delay = self.hedge_delay()
        return self._p50.get(name, 0.0) < delay

    def earn(self, budget: float) -> None:
        self.tokens = min(MAX_TOKENS, self.tokens + budget)

    def spend(self) -> None:
        self.tokens -= 1.0

    def stats(self) -> dict[str, Any]:
        return {
            "lookups": self.lookups,
            "hedges": self.hedges,
            "hedge_wins": self.hedge_wins,
            "retries": self.retries,
            "hedge_delay_ms": round(self.hedge_delay() * 1000, 3),
            "p50_ms": {n: round(1000 * sorted(w)[len(w) // 2], 3) for n, w in self.latencies.items() if w},
        }


class ShardRouterCore:
    """Request path of one sharded app's router: check, split, fan out (hedged), merge."""

    def __init__(self, transport: ShardTransport, *, hedge_budget: float | None = None) -> None:
        self.transport = transport
        self.hedge_budget = settings.shard_hedge_budget if hedge_budget is None else hedge_budget
        self.routing: ShardRouting | None = None
        self.spec = common_pb2.ApplicationSpec()
        self.model_name = ""
        self.header: ctr.TableHeader | None = None
        self.pools: list[ShardPool] = []
        self.requests = self.failures = 0
        self._background: set[asyncio.Task[Any]] = set()

    def set_routing(self, routing: ShardRouting) -> bool:
        """Adopt a newer table (older epochs are ignored). Same layout: pools (and their latency
        history) carry over; a new layout gets new pools, while requests in flight keep the old."""
        if self.routing is not None and routing.epoch <= self.routing.epoch:
            return False
        spec = common_pb2.ApplicationSpec.FromString(routing.spec)
        header = ctr.read_header(spec.sharding.table)
        same = self.routing is not None and self.routing.layout == routing.layout
        pools = self.pools if same else [ShardPool(i) for i in range(routing.layout.shards)]
        for pool, replicas in zip(pools, routing.shards, strict=True):
            pool.update(replicas)
        self.routing, self.spec, self.header, self.pools = routing, spec, header, pools
        self.model_name = AppId.parse(spec).model_name
        return True

    @property
    def ready(self) -> bool:
        return bool(self.pools) and all(len(p.router) for p in self.pools)

    def check_model(self, name: str, version: str = "") -> None:
        check_served(name, version, self.model_name, self.spec.version, "router")

    def metadata(self, name: str) -> service_pb2.ModelMetadataResponse:
        return model_metadata(self.spec)

    async def respond(self, raw: bytes, timeout_s: float | None) -> service_pb2.ModelInferResponse:
        """The response to one serialized request, or a domain error."""
        routing, began = self.routing, time.monotonic()
        try:
            return await self._respond(raw, timeout_s)
        except Unavailable:
            if self.routing is routing:
                raise
            # The table changed while this request ran (a reshard, a replaced replica): the shards
            # it used may be draining. Lookups are idempotent, so it runs again on the new table.
            left = None if timeout_s is None else timeout_s - (time.monotonic() - began)
            return await self._respond(raw, left)

    async def _respond(self, raw: bytes, timeout_s: float | None) -> service_pb2.ModelInferResponse:
        routing, spec, header, pools = self.routing, self.spec, self.header, self.pools
        if routing is None or header is None:
            raise Unavailable("this router has no routing table yet")
        request = parse_infer_request(raw)
        self.check_model(request.model_name, request.model_version)
        check_request(request, spec)
        inputs = decode_request(request)
        key_input = spec.sharding.key_input
        if key_input not in inputs:
            raise InvalidArgument(f"missing input tensor {key_input!r} (the keys of the sharded table)")
        ids = ctr.check_ids(inputs[key_input], num_fields=header.num_fields, num_rows=header.num_rows)
        deadline = time.monotonic() + (DEFAULT_DEADLINE_S if timeout_s is None else timeout_s)
        keys, inverse = np.unique(ids.reshape(-1), return_inverse=True)
        groups = routing.layout.split(keys)
        parts = await _all(self._lookup(pools[shard], keys[where], deadline) for shard, where in groups)
        rows = np.empty((len(keys), 1 + header.dim), dtype=np.float32)
        for (_, where), part in zip(groups, parts, strict=True):
            rows[where] = part
        scores = merge_ctr(header, (ids.shape[0], ids.shape[1]), inverse.reshape(-1), rows)
        output = spec.outputs[0].name if spec.outputs else OUTPUT_NAME
        return encode_response(
            self.model_name, {output: scores}, model_version=spec.version, request_id=request.id
        )

    async def infer(self, raw: bytes, timeout_s: float | None) -> bytes:
        self.requests += 1
        try:
            return (await self.respond(raw, timeout_s)).SerializeToString()
        except ServefleetError:
            self.failures += 1
            raise

    async def stream(self, raw: bytes, timeout_s: float | None) -> AsyncIterator[bytes]:
        """One response per streamed request; errors travel in ``error_message``."""
        try:
            response = await self.respond(raw, timeout_s)
            yield service_pb2.ModelStreamInferResponse(infer_response=response).SerializeToString()
        except ServefleetError as exc:
            yield service_pb2.ModelStreamInferResponse(error_message=str(exc)).SerializeToString()

    async def _lookup(self, pool: ShardPool, keys: np.ndarray, deadline: float) -> np.ndarray:
        """Rows of ``keys`` from one shard: P2C, a hedge past the shard's p95, retries elsewhere."""
        pool.lookups += 1
        pool.earn(self.hedge_budget)
        tried: set[str] = set()
        pending: dict[asyncio.Task[np.ndarray], bool] = {}  # attempt -> is it the hedge
        last = "no replica is ready"

        def launch(hedge: bool) -> bool:
            slot = pool.router.choose(tried)
            if slot is None or (hedge and not pool.can_win(slot.info.name)):
                return False
            tried.add(slot.info.name)
            task = asyncio.get_running_loop().create_task(self._attempt(pool, slot, keys, deadline))
            pending[task] = hedge
            return True

        launch(False)
        hedged, succeeded = False, False
        try:
            while pending:
                remaining = deadline - time.monotonic()
                if remaining <= 0:
                    raise DeadlineExceeded(f"shard {pool.shard}: no answer within the deadline")
                wait = remaining if hedged or not self.hedge_budget else min(remaining, pool.hedge_delay())
                done, _ = await asyncio.wait(pending, timeout=wait, return_when=asyncio.FIRST_COMPLETED)
                if not done:
                    if not hedged and time.monotonic() < deadline:
                        hedged = True
                        if pool.tokens >= 1.0 and launch(True):
                            pool.spend()
                            pool.hedges += 1
                    continue
                for task in done:
                    hedge = pending.pop(task)
                    error = task.exception()
                    if error is None:
                        pool.hedge_wins += hedge
                        succeeded = True
                        return task.result()
                    if isinstance(error, ReplicaGone):
                        last = f"replica gone ({error})"
                    elif isinstance(error, ResourceExhausted):
                        last = str(error)
                    else:
                        raise error
                if not pending and len(tried) < settings.proxy_attempts and launch(False):
                    pool.retries += 1
            raise Unavailable(f"model {self.model_name}: shard {pool.shard}: no replica could answer: {last}")
        finally:
            for task in pending:  # losers of a won race finish on their own; otherwise stop them
                if not succeeded:
                    task.cancel()
                self._background.add(task)
                task.add_done_callback(self._settled)

    async def _attempt(self, pool: ShardPool, slot: Slot, keys: np.ndarray, deadline: float) -> np.ndarray:
        slot.in_flight += 1
        began = time.monotonic()
        try:
            rows = await self.transport.lookup(slot.info, keys, max(deadline - began, 0.001))
        except ReplicaGone:
            pool.router.forget(slot.info.name)
            raise
        finally:
            slot.in_flight -= 1
        pool.observe(slot.info.name, time.monotonic() - began)
        return rows

    def _settled(self, task: asyncio.Task[Any]) -> None:
        self._background.discard(task)
        if not task.cancelled():
            task.exception()  # retrieved: a lost race's failure is not an error of anyone's request

    def stats(self) -> dict[str, Any]:
        routing = self.routing
        return {
            "layout": routing.layout.name if routing else "",
            "requests": self.requests,
            "failures": self.failures,
            "hedge_budget": self.hedge_budget,
            "shards": [pool.stats() for pool in self.pools],
            "hedges": sum(p.hedges for p in self.pools),
            "lookups": sum(p.lookups for p in self.pools),
        }


async def _all(calls: Iterable[Awaitable[np.ndarray]]) -> list[np.ndarray]:
    """Every call's result, in order; the first failure cancels the rest and is raised."""
    tasks = [asyncio.ensure_future(c) for c in calls]
    try:
        return list(await asyncio.gather(*tasks))
    except BaseException:
        for task in tasks:
            task.cancel()
        await asyncio.gather(*tasks, return_exceptions=True)
        raise


#: Counts of a shard that add up across the two paths (Python's pools and C++'s).
_SUMMED = ("lookups", "hedges", "hedge_wins", "retries")


def merge_matches(header: ctr.TableHeader) -> bool:
    """Whether the C++ merge scores bit for bit like :func:`merge_ctr` on this machine, for a
    table of this shape (the C++ copies numpy's float32 summation order and its exp kernel; a
    numpy that dispatches another exp would differ, and then Python keeps every request)."""
    from servefleet.direct._direct import fm_scores

    rng = np.random.default_rng(0)
    batch, keys, width = 64, 257, 1 + header.dim
    # Rows at several scales, so the logits cover sigmoid's whole range (both ends saturate).
    scales = np.repeat(np.array([0.01, 0.3, 1.0, 4.0], np.float32), [65, 64, 64, 64])[:, None]
    rows = (rng.standard_normal((keys, width), dtype=np.float32) * scales).astype(np.float32)
    shape = (batch, header.num_fields)
    for inverse in (
        rng.integers(0, keys, size=batch * header.num_fields),
        np.arange(batch * header.num_fields) % 65,
    ):
        with np.errstate(over="ignore"):  # exp overflows to inf at the saturated end, as it may
            expected = merge_ctr(header, shape, inverse, rows)
        got = np.frombuffer(
            fm_scores(header.bias, header.num_fields, header.dim, rows[inverse].tobytes()), "<f4"
        )
        if expected.tobytes() != got.tobytes():
            return False
    return True


class CppShardRouter(CppFront):
    """The C++ fast path of one router (``servefleet.direct._direct.ShardRouter``): it owns the
    router's public port in front of the Python server, takes every table the core adopts, and
    its counts go to the router's ``stats()`` and ``servefleet_rpc_*`` series."""

    def __init__(self, hedge_budget: float) -> None:
        from servefleet.direct._direct import ShardRouter as Native

        native = Native(
            list(metrics.LATENCY_BUCKETS),
            settings.proxy_attempts,
            settings.shard_hedge_default_ms / 1000.0,
            hedge_budget,
        )
        super().__init__(native, lambda: [rpc_series("shard-router")])
        self._matches: dict[tuple[int, int, float], bool] = {}

    def set_table(self, core: ShardRouterCore) -> None:
        """The table the core has just adopted: layout, header, each shard's replicas."""
        routing, spec, header = core.routing, core.spec, core.header
        assert routing is not None and header is not None
        shape = (header.num_fields, header.dim, header.bias)
        if shape not in self._matches:
            self._matches[shape] = merge_matches(header)
            if not self._matches[shape]:
                log.warning(
                    "the C++ merge does not score like numpy here: the router serves with Python only",
                    extra={"fields": header.num_fields, "dim": header.dim},
                )
        layout = routing.layout
        self.native.set_table(
            model=core.model_name,
            version=spec.version,
            inputs=input_rows(spec),
            key_input=spec.sharding.key_input,
            output=spec.outputs[0].name if spec.outputs else OUTPUT_NAME,
            partitioning=layout.partitioning,
            bounds=[layout.key_range(i)[1] for i in range(layout.shards)],
            num_rows=header.num_rows,
            fields=header.num_fields,
            dim=header.dim,
            bias=header.bias,
            shards=[
                [(r.name, r.address, r.capacity) for r in replicas if r.address]
                for replicas in routing.shards
            ],
            method=SHARD_LOOKUP,
            sample_ratio=settings.trace_sample_ratio,
            enabled=self._matches[shape] and not custom_sampler(),
        )

    def set_hedge_budget(self, budget: float) -> None:
        self.native.set_hedge_budget(budget)

    def owners(self, keys: list[int]) -> list[int]:
        """Each key's shard by the C++ layout (for checks against :meth:`Layout.owners`)."""
        return list(self.native.owners(keys))

    def stats(self) -> dict[str, Any]:
        """What C++ answered (by code) and relayed, and per shard what ``ShardPool.stats`` says."""
        return {**self.native.stats(), "shards": list(self.native.shard_stats())}

    def add_to(self, stats: dict[str, Any]) -> dict[str, Any]:
        """The core's ``stats()`` with C++'s counts added: requests, failures, and per shard the
        lookups, hedges, wins and retries; latencies (p50s, hedge delay) are Python's where it has
        measured them, else C++'s. ``cpp``: C++'s own counts, its shards' included."""
        cpp = self.stats()
        answered = sum(cpp["codes"].values())
        stats["requests"] += answered
        stats["failures"] += answered - cpp["codes"].get(0, 0)
        for mine, theirs in zip(stats["shards"], cpp["shards"], strict=False):
            python_lookups = mine["lookups"]
            for name in _SUMMED:
                mine[name] += theirs[name]
            if not python_lookups:
                mine["hedge_delay_ms"] = theirs["hedge_delay_ms"]
            mine["p50_ms"] = {**theirs["p50_ms"], **mine["p50_ms"]}
        stats["hedges"] = sum(s["hedges"] for s in stats["shards"])
        stats["lookups"] = sum(s["lookups"] for s in stats["shards"])
        stats["cpp"] = cpp
        return stats


class ShardRouter:
    """The router actor: serves KServe v2 on a free port, takes routing tables from the master
    (pushed on change, pulled at start) and stays registered in discovery as kind ``proxy`` while
    it can serve, so the SDK and ``tritonclient`` reach a sharded app like any other."""

    def __init__(
        self, app: bytes, master: str, *, cluster: str, discovery: str, credential: str = "", host: str = ""
    ) -> None:
        import ray

        telemetry.setup_tracing("servefleet-shard-router")
        self.app = common_pb2.AppRef.FromString(app)
        self.node_id = ray.get_runtime_context().get_node_id()
        self.transport = GrpcShardTransport()
        self.core = ShardRouterCore(self.transport)
        self._host = host or ray.util.get_node_ip_address()
        # With the C++ fast path, it owns the public port and the Python server sits behind it.
        self._cpp = CppShardRouter(self.core.hedge_budget) if settings.shard_router_cpp else None
        listen = "127.0.0.1:0" if self._cpp else f"{self._host}:0"
        self._server = GrpcServer(
            "shard-router", listen, [registrar(InferenceServicer(self.core))], [SERVICE]
        )
        self._address = ""
        self._master, self._cluster, self._discovery = master, cluster, discovery
        self._credential = credential  # the app's endpoint token: registers it in discovery
        self._serving = asyncio.Event()
        self._registered: asyncio.Task[None] | None = None
        self._started = asyncio.get_running_loop().create_task(self._start())
        # Its RPC series (requests, latency, in flight per method and code), where the others' live.
        self._metrics = metrics.expose(
            discovery,
            self.app,
            "shard-router",
            {"cluster": cluster, "node": self.node_id},
            credential=credential,
        )

    async def _start(self) -> None:
        import ray

        from servefleet.services.actors import RAY_NAMESPACE

        await self._server.start()
        self._address = self._server.address
        if self._cpp is not None:
            self._address = self._cpp.start(f"{self._host}:0", self._server.address)
        with contextlib.suppress(ValueError):  # master gone: it pushes a table when it is back
            routing = await ray.get_actor(self._master, namespace=RAY_NAMESPACE).routing.remote()
            if routing is not None:
                self._adopt(routing)
        if self._discovery:
            self._registered = asyncio.create_task(self._stay_registered())

    async def _stay_registered(self) -> None:
        from servefleet.discovery.registration import registration

        await self._serving.wait()
        endpoint = discovery_pb2.Endpoint(
            app=self.app,
            kind="proxy",
            address=self._address,
            labels={"cluster": self._cluster, "node": self.node_id, "router": "sharded"},
        )
        async with registration(
            self._discovery, endpoint, ttl_s=settings.discovery_ttl_s, token=self._credential
        ):
            await asyncio.Event().wait()

    def _adopt(self, routing: ShardRouting) -> bool:
        adopted = self.core.set_routing(routing)
        if adopted:
            # Channels of replicas gone from every table close once their calls are done.
            self.transport.forget({r.address for r in routing.replicas})
            if self._cpp is not None:
                self._cpp.set_table(self.core)
            if self.core.ready:
                self._serving.set()
        return adopted

    async def address(self) -> str:
        await self._started
        return self._address

    async def python_address(self) -> str:
        """The Python server's own address (behind C++ when the fast path is on): the benchmark
        measures both paths of one router against the same shards."""
        await self._started
        return self._server.address

    async def update(self, routing: ShardRouting) -> bool:
        await self._started
        return self._adopt(routing)

    async def stats(self) -> dict[str, Any]:
        """Requests, failures, and per shard: lookups, hedges (the extra load), wins, retries
        (both paths' counts, with C++'s own under ``cpp`` when it is on)."""
        stats = self.core.stats()
        return self._cpp.add_to(stats) if self._cpp is not None else stats

    async def set_hedge_budget(self, budget: float) -> None:
        """Operator knob (and the benchmark's switch): 0 turns hedging off."""
        self.core.hedge_budget = max(0.0, budget)
        if self._cpp is not None:
            self._cpp.set_hedge_budget(self.core.hedge_budget)

    async def stop(self) -> None:
        """Deregister first (clients move away), then let in-flight calls finish."""
        if self._registered is not None:
            self._registered.cancel()
            with contextlib.suppress(asyncio.CancelledError):
                await self._registered
        if self._cpp is not None:  # first: what it relays needs the Python server
            await self._cpp.stop(settings.shutdown_grace_s)
        await self._server.stop()
