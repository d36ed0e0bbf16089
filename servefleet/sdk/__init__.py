"""Client SDK: watch discovery, pick an endpoint per request, speak KServe v2 to it."""

from servefleet.sdk.client import AsyncClient, Client, RetryPolicy

__all__ = ["AsyncClient", "Client", "RetryPolicy"]
