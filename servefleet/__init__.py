"""servefleet: serverless model serving on Ray, shaped as gRPC microservices."""

from __future__ import annotations

import os
from typing import TYPE_CHECKING, Any

__version__ = "0.1.0"

# Ray replaces a loopback --node-ip-address with the machine's routable address unless this is 0, so a
# single-machine stack (and its tests) would listen beyond loopback. Multi-node deployments set
# SERVEFLEET_RAY_LOOPBACK=0. Set before Ray is imported: Ray reads it once, at import.
if os.environ.get("SERVEFLEET_RAY_LOOPBACK", "1") == "1":
    os.environ.setdefault("RAY_ENABLE_WINDOWS_OR_OSX_CLUSTER", "0")

if TYPE_CHECKING:
    from servefleet.sdk import AsyncClient, Client

__all__ = ["AsyncClient", "Client"]


def __getattr__(name: str) -> Any:
    # Lazy: services import servefleet.* without paying for (or cycling through) the SDK.
    if name in __all__:
        from servefleet import sdk

        return getattr(sdk, name)
    raise AttributeError(f"module 'servefleet' has no attribute {name!r}")
