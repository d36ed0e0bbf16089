"""Keeper-side rules on top of ``servefleet.spec.validate``: where code may come from, and quotas.

The data plane trusts what the keeper stored, so the keeper refuses specs that would make a
cluster read files outside the allowed roots, fetch code from arbitrary URLs, or preload native
code through the environment. Quotas count what a tenant's applications ask for across clusters.
"""

from __future__ import annotations

import os
import re
from collections.abc import Iterable, Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path

from servefleet.api import common_pb2, keeper_pb2
from servefleet.common.config import settings
from servefleet.common.errors import InvalidArgument, ResourceExhausted
from servefleet.pipeline_spec import stage_counts
from servefleet.spec import actors_per_replica

_URL_RE = re.compile(r"^[a-z][a-z0-9+.-]*://|^git\+|^file:|\s@\s*\S+://", re.IGNORECASE)
_ENV_NAME_RE = re.compile(r"^[A-Za-z_][A-Za-z0-9_]*$")
#: Variables that load native or Python code before the model does.
_FORBIDDEN_ENV = frozenset({"LD_PRELOAD", "LD_LIBRARY_PATH", "LD_AUDIT", "PYTHONSTARTUP", "PYTHONHOME"})


def allowed_roots() -> list[Path]:
    raw = [r for r in settings.keeper_allowed_roots.split(os.pathsep) if r]
    return [Path(os.path.realpath(r)) for r in (raw or [os.getcwd()])]


def check_sources(
    spec: common_pb2.ApplicationSpec, *, roots: Sequence[Path] | None = None, allow_urls: bool | None = None
) -> None:
    """InvalidArgument naming the field when the spec reaches outside what the platform allows."""
    roots = allowed_roots() if roots is None else list(roots)
    allow_urls = bool(settings.keeper_allow_urls) if allow_urls is None else allow_urls
    module = spec.import_path.partition(":")[0]
    if spec.import_path and any(not part for part in module.split(".")):
        raise InvalidArgument(f"spec.import_path: {spec.import_path!r} has an empty module name part")
    if spec.working_dir:
        if _URL_RE.search(spec.working_dir):
            if not allow_urls:
                raise InvalidArgument(
                    f"spec.working_dir: {spec.working_dir!r} is a URL; only local paths under "
                    f"{', '.join(map(str, roots))} are allowed here"
                )
        else:
            _check_under_roots("working_dir", spec.working_dir, roots)
    if Path(spec.triton.model_repository).is_absolute():  # a relative one stays inside working_dir
        _check_under_roots("model_repository", spec.triton.model_repository, roots)
    for i, pkg in enumerate(spec.runtime_env.pip):
        if not allow_urls and (_URL_RE.search(pkg) or pkg.startswith(("/", ".", "~"))):
            raise InvalidArgument(
                f"spec.runtime_env.pip[{i}]: {pkg!r} is not a package name from the index "
                "(URLs and local paths are refused)"
            )
    for name in spec.runtime_env.env_vars:
        if not _ENV_NAME_RE.match(name):
            raise InvalidArgument(f"spec.runtime_env.env_vars: {name!r} is not a valid variable name")
        if name.upper() in _FORBIDDEN_ENV:
            raise InvalidArgument(f"spec.runtime_env.env_vars: {name} may not be set (it loads foreign code)")


def _check_under_roots(field: str, value: str, roots: Sequence[Path]) -> None:
    path = Path(value)
    real = Path(os.path.realpath(path if path.is_absolute() else roots[0] / path))
    if not any(real == root or root in real.parents for root in roots):
        raise InvalidArgument(
            f"spec.{field}: {value!r} resolves to {real}, outside the allowed roots "
            f"({', '.join(map(str, roots))})"
        )


@dataclass(frozen=True)
class Usage:
    applications: int = 0
    replicas: int = 0
    cpus: float = 0.0
    gpus: float = 0.0

    def __add__(self, other: Usage) -> Usage:
        return Usage(
            self.applications + other.applications,
            self.replicas + other.replicas,
            self.cpus + other.cpus,
            self.gpus + other.gpus,
        )

    def __sub__(self, other: Usage) -> Usage:
        return Usage(
            self.applications - other.applications,
            self.replicas - other.replicas,
            self.cpus - other.cpus,
            self.gpus - other.gpus,
        )


def usage_of(
    spec: common_pb2.ApplicationSpec, replicas: int, stages: Mapping[str, int] | None = None
) -> Usage:
    """What one application counts against its tenant: replica actors (a sharded app's: per
    shard; a pipeline's: every stage's, at the counts held in ``stages``) on every cluster it
    spreads to."""
    spread = max(spec.placement.spread, 1)
    if spec.kind == "pipeline":
        counts = stage_counts(spec, stages or {})
        parts = [(stage.resources, counts[stage.name] * spread) for stage in spec.stages]
    else:
        parts = [(spec.resources, replicas * spread * actors_per_replica(spec))]
    return Usage(
        1,
        sum(n for _, n in parts),
        sum(r.num_cpus * n for r, n in parts),
        sum(r.num_gpus * n for r, n in parts),
    )


def usage_total(desired: Iterable[keeper_pb2.DesiredState]) -> Usage:
    total = Usage()
    for d in desired:
        if not d.deleting:
            total = total + usage_of(d.spec, d.replicas, d.stage_replicas)
    return total


def check_quota(tenant: str, quota: keeper_pb2.Quota, current: Usage, change: Usage) -> None:
    """ResourceExhausted with the numbers when ``current + change`` passes a limit (0: no limit)."""
    after = current + change
    limits = (
        (
            "applications",
            quota.max_applications,
            current.applications,
            change.applications,
            after.applications,
        ),
        ("replicas", quota.max_replicas, current.replicas, change.replicas, after.replicas),
        ("cpus", quota.max_cpus, current.cpus, change.cpus, after.cpus),
        ("gpus", quota.max_gpus, current.gpus, change.gpus, after.gpus),
    )
    for name, limit, used, delta, total in limits:
        if limit and delta > 0 and total > limit + 1e-9:
            raise ResourceExhausted(
                f"quota of tenant {tenant!r} exceeded: {name} would be {total:g}, limit {limit:g} "
                f"(in use {used:g}, this request adds {delta:g})"
            )
