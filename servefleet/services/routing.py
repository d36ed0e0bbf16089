"""An application's routing table as its master hands it to its proxies."""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

from servefleet.api import common_pb2
from servefleet.common.appid import AppId
from servefleet.services.replica_wire import REPLICA_SERVICE


@dataclass(frozen=True)
class ReplicaInfo:
    """What a proxy needs to route to a replica; travels from the master to its proxies."""

    name: str
    handle: Any  # ray.actor.ActorHandle of a Replica
    node_id: str
    version: str
    capacity: int  # max_concurrency + max_queued
    address: str = ""  # the replica's own loopback gRPC endpoint (same-node fast path)
    infer_method: str = f"/{REPLICA_SERVICE}/Infer"  # what the fast path calls there
    models: tuple[str, ...] = ()  # kind triton: the repository's model names it serves
    metadata: tuple[tuple[str, bytes], ...] = ()  # kind triton: (model, ModelMetadataResponse bytes)
    #: A Python replica whose model answers one response per request: a stream's requests go to it
    #: as unary calls (one answer each), which cost less than a server-streaming call apiece.
    unary_streams: bool = False


@dataclass(frozen=True)
class Routing:
    """One epoch of an application's routing table: the spec it serves and its live replicas."""

    epoch: int
    spec: bytes  # serialized ApplicationSpec
    replicas: tuple[ReplicaInfo, ...]

    @property
    def model_name(self) -> str:
        spec = common_pb2.ApplicationSpec.FromString(self.spec)
        return AppId.parse(spec).model_name
