"""Where the data plane's Ray actors live, how they are named and what environment they inherit,
so that a restarted master (or ``agent.masters.list_all``) finds every live actor by name alone."""

from __future__ import annotations

import os
import time

from servefleet.api import common_pb2
from servefleet.common.appid import AppId
from servefleet.pipeline_spec import STAGE_SEPARATOR

#: Ray namespace of every data-plane actor (masters, replicas, proxies).
RAY_NAMESPACE = "servefleet"
MASTER_PREFIX = "master:"
REPLICA_PREFIX = "replica:"
PROXY_PREFIX = "proxy:"
#: Environment variables a master hands on to its proxies and replicas (tracing setup).
PASSED_ENV_PREFIXES = ("OTEL_", "SERVEFLEET_")


def master_name(app: common_pb2.AppRef) -> str:
    return MASTER_PREFIX + AppId.parse(app).key


def replica_prefix(app: common_pb2.AppRef) -> str:
    return f"{REPLICA_PREFIX}{AppId.parse(app).key}:"


def proxy_prefix(app: common_pb2.AppRef) -> str:
    return f"{PROXY_PREFIX}{AppId.parse(app).key}:"


def stage_replica_prefix(pipeline: common_pb2.AppRef) -> str:
    """Replicas of a pipeline's non-entry stages (apps ``name--stage``; no app name has "--")."""
    return f"{REPLICA_PREFIX}{AppId.parse(pipeline).key}{STAGE_SEPARATOR}"


def replica_name(app: common_pb2.AppRef, generation: str) -> str:
    """``replica:{namespace}/{name}:{generation}:{unique}``: the generation in the name lets a
    restarted master tell old replicas from new ones without asking them."""
    return f"{replica_prefix(app)}{generation}:{time.time_ns():x}"


def replica_generation(app: common_pb2.AppRef, name: str) -> str:
    """The generation a :func:`replica_name` carries."""
    return name.removeprefix(replica_prefix(app)).rpartition(":")[0]


def proxy_name(app: common_pb2.AppRef, index: int) -> str:
    """``proxy:{namespace}/{name}:{index}``: proxies are numbered, so scaling them is by name."""
    return f"{proxy_prefix(app)}{index}"


def app_from_master_name(name: str) -> common_pb2.AppRef:
    return AppId.parse(name.removeprefix(MASTER_PREFIX)).ref()


#: ...except these: each actor names itself (servefleet-proxy, servefleet-replica).
KEPT_ENV = ("OTEL_SERVICE_NAME",)


def passed_env() -> dict[str, str]:
    """The variables of this process that the data plane's actors inherit (tracing exporters...)."""
    return {k: v for k, v in os.environ.items() if k.startswith(PASSED_ENV_PREFIXES) and k not in KEPT_ENV}
