"""Entry point: `python -m servefleet.services.agent --listen HOST:PORT --ray HOST:PORT ...`."""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import logging

from servefleet.api import agent_pb2, agent_pb2_grpc
from servefleet.common.auth import Authenticator, EtcdTokens, resolve_token
from servefleet.common.entry import Service, run_service, service_parser
from servefleet.common.etcd import add_etcd_flag, connect_etcd
from servefleet.common.net import async_wait_for, split_address
from servefleet.common.retry import Backoff, RetryPolicy
from servefleet.common.server import GrpcServer
from servefleet.services.agent.core import ClusterAgent, Heartbeat, parse_labels, read_token
from servefleet.services.agent.servicer import ClusterAgentServicer

log = logging.getLogger(__name__)

#: A Ray head that `up` just saw healthy can still refuse ray.init's GCS handshake for a while on a
#: loaded machine ("Failed to connect to Ray cluster"): keep trying rather than exit during start-up.
RAY_CONNECT = RetryPolicy(
    Backoff(initial_s=1.0, max_s=5.0), deadline_s=120.0, retry_on=lambda exc: isinstance(exc, ConnectionError)
)


async def ray_resources() -> tuple[dict[str, float], dict[str, float]]:
    """Totals and what is free now, as Ray reports them (its calls block, so off the loop)."""
    import ray

    def read() -> tuple[dict[str, float], dict[str, float]]:
        return dict(ray.cluster_resources()), dict(ray.available_resources())

    return await asyncio.to_thread(read)


async def gcs_reachable(address: str) -> None:
    """Ray's GCS accepts a connection (a Ray call would block for long against a dead head)."""
    host, port = split_address(address)
    _, writer = await asyncio.open_connection(host, port)
    writer.close()
    await writer.wait_closed()


async def build(args: argparse.Namespace) -> Service:
    import ray

    from servefleet.services.agent import masters

    labels = parse_labels(args.labels)

    async def connect() -> None:
        await asyncio.to_thread(
            ray.init, address=args.ray, logging_level=logging.WARNING, log_to_driver=False
        )

    def retrying(exc: BaseException, pause: float) -> None:
        log.warning("ray at %s not reachable yet (%s); again in %.1f s", args.ray, exc, pause)

    await RAY_CONNECT.run(connect, on_retry=retrying)
    agent = ClusterAgent(
        masters,
        ray_resources,
        cluster=args.cluster,
        discovery=args.discovery,
        redis=args.redis,
        broker=args.broker,
    )
    servicer = ClusterAgentServicer(agent)
    etcd = connect_etcd(args.etcd)
    server = GrpcServer(
        "agent",
        args.listen,
        [lambda s: agent_pb2_grpc.add_ClusterAgentServicer_to_server(servicer, s)],
        [agent_pb2.DESCRIPTOR.services_by_name["ClusterAgent"].full_name],
        auth=Authenticator(EtcdTokens(etcd)),
        tls=True,
    )
    heartbeat = Heartbeat(
        agent,
        keeper=args.keeper,
        agent_address=lambda: server.address,
        ray_address=args.ray,
        labels=labels,
        token=lambda: resolve_token(args.token) or read_token(args.token_file),
    )
    agent.credentials = heartbeat.endpoint_token

    async def bound() -> bool:
        return bool(server.port)

    async def beat_when_serving() -> None:
        # The server binds its port when serving starts, after build() returns.
        await async_wait_for(bound, timeout=3600, what="the agent's server to bind")
        await heartbeat.run()

    beating = asyncio.create_task(beat_when_serving())

    async def stop() -> None:
        beating.cancel()
        with contextlib.suppress(BaseException):
            await beating
        await asyncio.to_thread(ray.shutdown)
        await etcd.close()

    # Without its Ray cluster the agent can neither place nor report anything.
    return Service(server, on_stop=stop, dependencies={"ray": lambda: gcs_reachable(args.ray)})


def parser() -> argparse.ArgumentParser:
    p = service_parser("services.agent", "servefleet cluster agent")
    p.add_argument("--ray", required=True, help="Ray GCS address host:port")
    p.add_argument("--keeper", required=True, help="keeper address host:port")
    p.add_argument("--discovery", required=True, help="discovery address host:port")
    p.add_argument("--redis", default="", help="Redis address for async apps")
    p.add_argument(
        "--broker", default="", help="the broker: async apps' workers get their Redis credential there"
    )
    p.add_argument("--cluster", default="local", help="this cluster's name")
    add_etcd_flag(p, "where the keeper keeps tokens")
    p.add_argument("--token-file", default="", help="the agent's token (role agent, or admin)")
    p.add_argument(
        "--token", default=None, help="the agent's token (else SERVEFLEET_TOKEN, else --token-file)"
    )
    p.add_argument("--labels", default="", help="cluster labels for placement, k=v,k2=v2")
    return p


def main(argv: list[str] | None = None) -> None:
    run_service("agent", parser(), build, argv)


if __name__ == "__main__":
    main()
