"""servefleet: serverless model serving on Ray, shaped as gRPC microservices."""

from __future__ import annotations

from typing import TYPE_CHECKING, Any

__version__ = "0.1.0"

if TYPE_CHECKING:
    from servefleet.sdk import AsyncClient, Client

__all__ = ["AsyncClient", "Client"]


def __getattr__(name: str) -> Any:
    # Lazy: services import servefleet.* without paying for (or cycling through) the SDK.
    if name in __all__:
        from servefleet import sdk

        return getattr(sdk, name)
    raise AttributeError(f"module 'servefleet' has no attribute {name!r}")
