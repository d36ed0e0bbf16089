"""Several discovery instances behind one name: the SDK's watch and ``registration()`` move to
another instance when theirs dies, the watch resuming from the revision it had."""

from __future__ import annotations

import grpc

from servefleet import AsyncClient
from servefleet.api import discovery_pb2, discovery_pb2_grpc
from servefleet.common.appid import AppId
from servefleet.common.channels import aio_channel
from servefleet.common.net import async_wait_for
from servefleet.common.retry import Backoff, RetryPolicy, on_status
from servefleet.discovery.registration import registration
from servefleet.testing import DiscoveryProcess, EtcdProcess

Event = discovery_pb2.WatchEvent
APP = AppId.parse("moving").ref()
#: The caller's stated retry for its own Register/Deregister calls: UNAVAILABLE (its instance
#: died mid-call) is tried again, at once on another instance.
CALLER_RETRY = RetryPolicy(
    Backoff(initial_s=0.05, max_s=0.5), deadline_s=10, retry_on=on_status(grpc.StatusCode.UNAVAILABLE)
)


def endpoint(endpoint_id: str) -> discovery_pb2.Endpoint:
    return discovery_pb2.Endpoint(id=endpoint_id, app=APP, kind="proxy", address="127.0.0.1:9")


async def test_watch_and_registration_survive_losing_each_instance_with_no_missed_change(
    etcd: EtcdProcess,
) -> None:
    instances = [DiscoveryProcess(etcd.address).start() for _ in range(2)]
    both = ",".join(d.address for d in instances)
    token = instances[0].token
    channel = aio_channel(both, token=token)
    stub = discovery_pb2_grpc.DiscoveryStub(channel)
    try:
        async with AsyncClient(both, token=token) as client:
            watch = client.watch(APP)
            seen: list[tuple[int, str]] = []
            apply = watch.state.apply

            def recording(event: discovery_pb2.WatchEvent) -> list[discovery_pb2.Endpoint]:
                seen.extend((event.type, e.id) for e in event.endpoints)
                return apply(event)

            watch.state.apply = recording  # type: ignore[method-assign]
            assert await watch.wait_synced(10)
            made: list[tuple[int, str]] = []
            leases: dict[str, int] = {}
            async with registration(both, endpoint("held"), ttl_s=5, token=token):
                made.append((Event.ADDED, "held"))
                # Whichever instance the watch (and the registration's stream) is on, one of the two
                # phases kills it while endpoints change; each comes back before the other dies.
                for phase, victim in enumerate(instances):
                    for i in range(6):
                        if i == 2:
                            victim.kill()
                        name = f"e{phase}{i}"
                        reply = await CALLER_RETRY.run(
                            lambda n=name: stub.Register(
                                discovery_pb2.RegisterRequest(endpoint=endpoint(n), ttl_s=30), timeout=5
                            )
                        )
                        leases[name] = reply.lease_id
                        made.append((Event.ADDED, name))
                        if i % 2:
                            gone = f"e{phase}{i - 1}"
                            request = discovery_pb2.DeregisterRequest(lease_id=leases.pop(gone))
                            last = await CALLER_RETRY.run(lambda r=request: stub.Deregister(r, timeout=5))
                            made.append((Event.REMOVED, gone))
                    victim.start()  # same port: back before the other instance dies

                async def caught_up() -> bool:
                    return watch.state.revision >= last.revision

                await async_wait_for(caught_up, timeout=20, what="the watch to reach the last change")
                # Every change arrived, in order, as a change: none replayed from a new snapshot.
                assert seen == made, (seen, made)
                assert watch.state.snapshots == 1
                assert set(watch.state.endpoints) == {"held", *leases}
                # The registration kept its lease through both losses (TTL 5 s, renewed elsewhere).
                found = await stub.Resolve(discovery_pb2.ResolveRequest(app=APP), timeout=5)
                assert "held" in {e.id for e in found.endpoints}
            for lease_id in leases.values():
                await stub.Deregister(discovery_pb2.DeregisterRequest(lease_id=lease_id), timeout=5)
    finally:
        await channel.close()
        for instance in instances:
            instance.cleanup()
