"""Client SDK: watch discovery, pick an endpoint per request, speak KServe v2 to it.

    import numpy as np
    import servefleet

    with servefleet.Client(discovery="127.0.0.1:50051", zone="eu-1") as client:
        out = client.infer("team/iris", {"x": np.ones((1, 4), np.float32)}, timeout=2.0)
        client.endpoints("team/iris")              # the live set this client routes over
        triton = client.triton_client("team/iris")  # a plain tritonclient for one chosen endpoint

    async with servefleet.AsyncClient("127.0.0.1:50051", broker="127.0.0.1:50052") as client:
        ticket = await client.submit("team/long", {"x": ...})
        out = await client.result(ticket, timeout=60)

Servers stay discoverable with :func:`servefleet.discovery.registration.registration`.
"""

from servefleet.sdk.client import AsyncClient, Client, RetryPolicy

__all__ = ["AsyncClient", "Client", "RetryPolicy"]
