"""Keeper benchmark: sustained submissions/s and compare-and-swap updates/s with 1 000 applications
stored, beside the raw etcd put rate through aetcd measured in the same run; then the time from
submit to RUNNING for a trivial app (the iris example, one replica) on a one-CPU Ray cluster,
beside the same app applied straight to the cluster agent (no keeper in the path).

    .venv/bin/python bench/keeper.py            # full
    .venv/bin/python bench/keeper.py --quick    # under 2 minutes

The rate part is keeper-only (a keeper process on real etcd, its leader reconciling all stored
apps in the background, which stay PENDING because they ask for a cluster label nobody has); the
RUNNING part starts discovery, one Ray cluster and its agent. Writes bench/results/keeper.json.
"""

from __future__ import annotations

import argparse
import asyncio
import os
import statistics
import sys
import tempfile
import time
from collections.abc import Awaitable, Callable
from pathlib import Path

import grpc
from _report import write_report

from servefleet.api import agent_pb2, agent_pb2_grpc, common_pb2, keeper_pb2, keeper_pb2_grpc
from servefleet.common.appid import AppId
from servefleet.common.channels import aio_channel
from servefleet.common.config import grpc_options
from servefleet.keeper.store import KeeperStore
from servefleet.spec import load_spec
from servefleet.testing import EtcdProcess, RayCluster, ServiceProcess

IRIS = Path(__file__).resolve().parents[1] / "examples" / "iris.yaml"
STORED = 1000
AppState = keeper_pb2.AppState


def stored_spec(i: int, prefix: str = "app") -> common_pb2.ApplicationSpec:
    spec = common_pb2.ApplicationSpec(
        name=f"{prefix}-{i}", namespace="bench", version="1", import_path="examples.iris:IrisClassifier"
    )
    spec.placement.cluster_labels["bench"] = "stored-only"  # no cluster has it: stays PENDING
    return spec


async def sustained(calls: Callable[[int], Awaitable[object]], count: int, concurrency: int) -> float:
    """Operations per second for ``count`` calls ``calls(i)`` issued by ``concurrency`` workers."""
    pending = iter(range(count))

    async def worker() -> None:
        for i in pending:
            await calls(i)

    started = time.perf_counter()
    await asyncio.gather(*(worker() for _ in range(concurrency)))
    return count / (time.perf_counter() - started)


async def rates(etcd: EtcdProcess, keeper: str, token: str, args: argparse.Namespace) -> dict[str, float]:
    md = [("authorization", f"Bearer {token}")]
    async with grpc.aio.insecure_channel(keeper, options=grpc_options()) as channel:
        stub = keeper_pb2_grpc.KeeperStub(channel)

        async def submit(i: int, prefix: str = "app") -> None:
            await stub.SubmitApplication(
                keeper_pb2.SubmitApplicationRequest(spec=stored_spec(i, prefix)), metadata=md
            )

        preload = await sustained(submit, STORED, args.concurrency)
        submit_rate = await sustained(lambda i: submit(i, "new"), args.operations, args.concurrency)
        revisions: dict[int, int] = {}
        request = keeper_pb2.ListApplicationsRequest(namespace="bench", page_size=500)
        while True:
            page = await stub.ListApplications(request, metadata=md)
            for app in page.applications:
                if app.app.name.startswith("app-"):
                    revisions[int(app.app.name.split("-")[1])] = app.revision
            if not page.next_page_token:
                break
            request.page_token = page.next_page_token

        async def update(i: int) -> None:
            n = i % STORED
            spec = stored_spec(n)
            spec.version = str(i)
            reply = await stub.UpdateApplication(
                keeper_pb2.UpdateApplicationRequest(spec=spec, expected_revision=revisions[n]), metadata=md
            )
            revisions[n] = reply.revision

        update_rate = await sustained(update, args.operations, args.concurrency)
        listed = time.perf_counter()
        total = 0
        request = keeper_pb2.ListApplicationsRequest(page_size=500)
        while True:
            page = await stub.ListApplications(request, metadata=md)
            total += len(page.applications)
            if not page.next_page_token:
                break
            request.page_token = page.next_page_token
        list_s = time.perf_counter() - listed

    store = KeeperStore.connect(etcd.address, "/bench-peer")
    value = keeper_pb2.DesiredState(spec=stored_spec(0), replicas=1).SerializeToString()

    async def put(i: int) -> None:
        await store.client.put(store.key("apps", "bench", f"p-{i}", "desired"), value)

    put_rate = await sustained(put, args.operations, args.concurrency)
    await store.client.delete_prefix(b"/bench-peer/")
    await store.close()
    return {
        "stored_applications": STORED,
        "preload_submit_per_s": round(preload, 1),
        "submit_per_s": round(submit_rate, 1),
        "update_per_s": round(update_rate, 1),
        "etcd_put_per_s": round(put_rate, 1),
        "list_all_s": round(list_s, 3),
        "listed_applications": total,
        "ratio_submit_rate_vs_etcd_put": round(submit_rate / put_rate, 3),
        "ratio_update_rate_vs_etcd_put": round(update_rate / put_rate, 3),
    }


async def to_running(keeper: str, token: str, agent: str, samples: int) -> dict[str, float]:
    """Seconds from SubmitApplication to the RUNNING event, and from ApplyApplication straight to
    the agent to the master reporting every replica ready (the peer: no keeper in the path)."""
    md = [("authorization", f"Bearer {token}")]
    via_keeper: list[float] = []
    direct: list[float] = []
    async with (
        grpc.aio.insecure_channel(keeper, options=grpc_options()) as kc,
        aio_channel(agent, token=token) as ac,  # agents answer keepers and admins only
    ):
        stub, agent_stub = keeper_pb2_grpc.KeeperStub(kc), agent_pb2_grpc.ClusterAgentStub(ac)
        for n in range(samples):
            spec = load_spec(IRIS)
            spec.name, spec.replicas.initial, spec.replicas.min = f"trivial-{n}", 1, 1
            started = time.perf_counter()
            await stub.SubmitApplication(keeper_pb2.SubmitApplicationRequest(spec=spec), metadata=md)
            async for event in stub.WatchApplication(
                keeper_pb2.WatchApplicationRequest(app=AppId.parse(spec).ref()), metadata=md
            ):
                if event.state in (AppState.RUNNING, AppState.FAILED):
                    assert event.state == AppState.RUNNING, event.reason
                    break
            via_keeper.append(time.perf_counter() - started)
            await stub.DeleteApplication(
                keeper_pb2.DeleteApplicationRequest(app=AppId.parse(spec).ref()), metadata=md
            )

            spec.name = f"direct-{n}"
            started = time.perf_counter()
            await agent_stub.ApplyApplication(
                agent_pb2.ApplyApplicationRequest(spec=spec, replicas=1, revision=1)
            )
            while True:
                seen = await agent_stub.GetApplicationState(
                    agent_pb2.GetApplicationStateRequest(app=AppId.parse(spec).ref())
                )
                if seen.ready_replicas >= 1 and seen.proxy_addresses:
                    break
                await asyncio.sleep(0.02)
            direct.append(time.perf_counter() - started)
            await agent_stub.RemoveApplication(
                agent_pb2.RemoveApplicationRequest(app=AppId.parse(spec).ref())
            )
    keeper_s, direct_s = statistics.median(via_keeper), statistics.median(direct)
    return {
        "samples": samples,
        "submit_to_running_s": round(keeper_s, 3),
        "direct_apply_to_ready_s": round(direct_s, 3),
        "ratio_submit_to_running_vs_direct_apply": round(keeper_s / direct_s, 3),
    }


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--quick", action="store_true", help="fewer operations and samples (under 2 minutes)")
    p.add_argument("--concurrency", type=int, default=16)
    args = p.parse_args()
    args.operations = 500 if args.quick else 3000
    samples = 1 if args.quick else 3
    work = Path(tempfile.mkdtemp(prefix="sf-bench-keeper-"))
    env = {
        "SERVEFLEET_LOG_LEVEL": "WARNING",
        "SERVEFLEET_KEEPER_HEARTBEAT_INTERVAL_S": "1",
        "PYTHONPATH": os.pathsep.join(sys.path),
    }
    etcd = EtcdProcess().start()
    ray = RayCluster(num_cpus=1)
    children: list[ServiceProcess] = []

    def service(module: str, *flags: str) -> str:
        child = ServiceProcess(module, *flags, data_dir=work, env=env, start_timeout=120)
        children.append(child.start())
        return child.address

    try:
        token_file = work / "admin.token"
        keeper = service("keeper", "--etcd", etcd.address, "--admin-token-file", str(token_file))
        token = token_file.read_text().strip()
        figures = asyncio.run(rates(etcd, keeper, token, args))

        ray.start()
        discovery = service("discovery", "--etcd", etcd.address)
        agent = service(
            "services.agent",
            *("--ray", ray.address, "--keeper", keeper, "--discovery", discovery),
            *("--cluster", "bench", "--token", token, "--etcd", etcd.address),
        )
        figures |= asyncio.run(to_running(keeper, token, agent, samples))
    finally:
        for child in reversed(children):
            child.stop()
        ray.cleanup()
        etcd.cleanup()

    print(f"{'figure':>42} | {'value':>10}")
    for key, value in figures.items():
        print(f"{key:>42} | {value:>10}")
    report = {
        "settings": {
            "quick": args.quick,
            "concurrency": args.concurrency,
            "operations": args.operations,
            "stored_applications": STORED,
            "running_samples": samples,
            "ray_num_cpus": 1,
            "transport": "loopback gRPC, one etcd 3.4 member, keeper and agent as processes",
            "peer": "aetcd put of the same DesiredState bytes at the same concurrency; "
            "ApplyApplication straight to the agent",
        },
        "figures": figures,
    }
    write_report("keeper", report)
    print("wrote bench/results/keeper.json")


if __name__ == "__main__":
    main()
