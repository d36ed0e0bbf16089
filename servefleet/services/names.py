"""Names and small shared types of the data plane: where its Ray actors live and how they are
named, so that a restarted master (or ``masters.list_all``) finds every live actor by name alone."""

from __future__ import annotations

import os
import uuid
from dataclasses import dataclass
from typing import Any

import grpc

from servefleet.api import common_pb2
from servefleet.common.errors import Internal, ServefleetError
from servefleet.spec import model_name

#: Ray namespace of every data-plane actor (masters, replicas, proxies).
RAY_NAMESPACE = "servefleet"
MASTER_PREFIX = "master:"
REPLICA_PREFIX = "replica:"
PROXY_PREFIX = "proxy:"
#: The replica's own gRPC service (raw bytes in and out: ModelInferRequest -> ModelInferResponse).
REPLICA_SERVICE = "servefleet.Replica"
#: Environment variables a master hands on to its proxies and replicas (tracing setup).
PASSED_ENV_PREFIXES = ("OTEL_", "SERVEFLEET_")


def app_key(app: common_pb2.AppRef) -> str:
    return f"{app.namespace or 'default'}/{app.name}"


def master_name(app: common_pb2.AppRef) -> str:
    return MASTER_PREFIX + app_key(app)


def replica_prefix(app: common_pb2.AppRef) -> str:
    return f"{REPLICA_PREFIX}{app_key(app)}:"


def proxy_prefix(app: common_pb2.AppRef) -> str:
    return f"{PROXY_PREFIX}{app_key(app)}:"


def new_replica_name(app: common_pb2.AppRef) -> str:
    return replica_prefix(app) + uuid.uuid4().hex[:10]


def app_from_master_name(name: str) -> common_pb2.AppRef:
    namespace, _, short = name.removeprefix(MASTER_PREFIX).partition("/")
    return common_pb2.AppRef(namespace=namespace, name=short)


#: ...except these: each actor names itself (servefleet-proxy, servefleet-replica).
KEPT_ENV = ("OTEL_SERVICE_NAME",)


def passed_env() -> dict[str, str]:
    """The variables of this process that the data plane's actors inherit (tracing exporters...)."""
    return {k: v for k, v in os.environ.items() if k.startswith(PASSED_ENV_PREFIXES) and k not in KEPT_ENV}


def code(status: grpc.StatusCode) -> int:
    """The integer of a status code: replicas answer (code, payload) tuples, cheap to pickle."""
    return int(status.value[0])


OK = code(grpc.StatusCode.OK)
CODES: dict[int, grpc.StatusCode] = {code(s): s for s in grpc.StatusCode}
_ERRORS: dict[grpc.StatusCode, type[ServefleetError]] = {
    cls.code: cls for cls in ServefleetError.__subclasses__()
}


def error_for(status: int, message: str) -> ServefleetError:
    """The domain error for a replica's status (the server interceptor turns it back into it)."""
    return _ERRORS.get(CODES.get(status, grpc.StatusCode.INTERNAL), Internal)(message)


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


@dataclass(frozen=True)
class Routing:
    """One epoch of an application's routing table: the spec it serves and its live replicas."""

    epoch: int
    spec: bytes  # serialized ApplicationSpec
    replicas: tuple[ReplicaInfo, ...]

    @property
    def model_name(self) -> str:
        spec = common_pb2.ApplicationSpec.FromString(self.spec)
        return model_name(common_pb2.AppRef(namespace=spec.namespace, name=spec.name))
