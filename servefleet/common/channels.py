"""Every client channel to a servefleet service comes from here: one place decides the transport
(plaintext, TLS, or mTLS from ``Settings.tls_*``) and adds the caller's bearer token; and one
grpc.aio channel per address, reused by every call to it (``ChannelCache``: the SDK's endpoints, a
proxy's same-node replicas and the keeper's cluster agents keep their channels there).

TLS covers the control plane (keeper, discovery, broker, cluster agents). ``use_tls`` lets a
process adopt a stack's certificates after start (the CLI reads them from the state dir).
"""

from __future__ import annotations

import asyncio
import collections
import os
from collections.abc import Callable, Collection, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any, TypeVar

import grpc

from servefleet.common.auth import bearer_interceptors, bearer_metadata
from servefleet.common.config import grpc_options, settings
from servefleet.common.errors import InvalidArgument
from servefleet.common.net import channel_target


@dataclass(frozen=True)
class TlsFiles:
    """PEM paths: the CA every part trusts, and this part's certificate and key (its server
    certificate, and its client certificate when servers ask for one)."""

    ca: str = ""
    cert: str = ""
    key: str = ""
    client_auth: bool = False

    @property
    def enabled(self) -> bool:
        return bool(self.ca or self.cert)

    @classmethod
    def from_settings(cls) -> TlsFiles:
        return cls(
            settings.tls_ca_file,
            settings.tls_cert_file,
            settings.tls_key_file,
            bool(settings.tls_client_auth),
        )

    def env(self) -> dict[str, str]:
        """The variables that hand these files to a child process's ``Settings``."""
        return {
            "SERVEFLEET_TLS_CA_FILE": self.ca,
            "SERVEFLEET_TLS_CERT_FILE": self.cert,
            "SERVEFLEET_TLS_KEY_FILE": self.key,
            "SERVEFLEET_TLS_CLIENT_AUTH": "1" if self.client_auth else "0",
        }


_tls = TlsFiles.from_settings()


def use_tls(files: TlsFiles) -> None:
    """Use ``files`` for every channel and server this process makes from now on."""
    global _tls
    _tls = files


def tls() -> TlsFiles:
    return _tls


def _read(path: str) -> bytes | None:
    return Path(path).read_bytes() if path else None


def channel_credentials() -> grpc.ChannelCredentials | None:
    """TLS credentials for a client (with its certificate for mTLS); None for plaintext."""
    files = _tls
    if not files.enabled:
        return None
    return grpc.ssl_channel_credentials(
        root_certificates=_read(files.ca), private_key=_read(files.key), certificate_chain=_read(files.cert)
    )


def server_credentials() -> grpc.ServerCredentials | None:
    """TLS credentials for a server (requiring client certificates when ``client_auth``)."""
    files = _tls
    if not files.cert:
        return None
    key, cert = _read(files.key), _read(files.cert)
    assert key is not None and cert is not None
    return grpc.ssl_server_credentials(
        [(key, cert)], root_certificates=_read(files.ca), require_client_auth=files.client_auth
    )


def aio_channel(
    address: str | Sequence[str], *, token: str = "", options: list[tuple[str, Any]] | None = None
) -> grpc.aio.Channel:
    """A grpc.aio channel to a servefleet service, sending ``token`` on every call. Several
    instances (``host:port,host:port`` or a list) share the channel: calls are balanced over the
    live ones, and a new call after one dies goes to another."""
    target, extra = channel_target(address)
    opts = [*(grpc_options() if options is None else options), *extra]
    interceptors = bearer_interceptors(token) if token else None
    creds = channel_credentials()
    if creds is None:
        return grpc.aio.insecure_channel(target, options=opts, interceptors=interceptors)
    return grpc.aio.secure_channel(target, creds, options=opts, interceptors=interceptors)


#: Where the SDK and ``registration()`` find discovery when not told: ``host:port[,host:port...]``.
DISCOVERY_ENV = "SERVEFLEET_DISCOVERY"


def discovery_addresses(discovery: str | Sequence[str] = "") -> list[str]:
    """The discovery instances to use: ``discovery`` (one ``host:port``, several comma-separated,
    or a list), else ``$SERVEFLEET_DISCOVERY``; InvalidArgument saying what to pass when neither is set."""
    found = discovery or os.environ.get(DISCOVERY_ENV, "")
    items = found.split(",") if isinstance(found, str) else list(found)
    addresses = [a.strip() for a in items if a.strip()]
    if not addresses:
        raise InvalidArgument(
            f"no discovery address: pass one (host:port[,host:port...]) or set {DISCOVERY_ENV}"
        )
    return addresses


_Details = collections.namedtuple(
    "_Details", ("method", "timeout", "metadata", "credentials", "wait_for_ready", "compression")
)


class _SyncBearer(
    grpc.UnaryUnaryClientInterceptor,
    grpc.UnaryStreamClientInterceptor,
    grpc.StreamUnaryClientInterceptor,
    grpc.StreamStreamClientInterceptor,
):
    def __init__(self, token: str) -> None:
        self.token = token

    def _details(self, details: Any) -> Any:
        metadata = [*(details.metadata or ()), *bearer_metadata(self.token)]
        return _Details(
            details.method,
            details.timeout,
            metadata,
            details.credentials,
            getattr(details, "wait_for_ready", None),
            getattr(details, "compression", None),
        )

    def intercept_unary_unary(self, continuation: Any, details: Any, request: Any) -> Any:
        return continuation(self._details(details), request)

    def intercept_unary_stream(self, continuation: Any, details: Any, request: Any) -> Any:
        return continuation(self._details(details), request)

    def intercept_stream_unary(self, continuation: Any, details: Any, request_iterator: Any) -> Any:
        return continuation(self._details(details), request_iterator)

    def intercept_stream_stream(self, continuation: Any, details: Any, request_iterator: Any) -> Any:
        return continuation(self._details(details), request_iterator)


def sync_channel(address: str | Sequence[str], *, token: str = "") -> grpc.Channel:
    """A blocking channel to a servefleet service (CLI, probes), sending ``token`` on every call;
    one or several instances, like ``aio_channel``."""
    target, extra = channel_target(address)
    creds = channel_credentials()
    if creds is None:
        channel = grpc.insecure_channel(target, options=[*grpc_options(), *extra])
    else:
        channel = grpc.secure_channel(target, creds, options=[*grpc_options(), *extra])
    return grpc.intercept_channel(channel, _SyncBearer(token)) if token else channel


S = TypeVar("S")


class ChannelCache:
    """Channels (and stubs over them) by address. ``discard``/``retain`` close channels in the
    background ``close_grace_s`` later (closing a channel cancels the calls still on it). An
    endpoint can leave discovery while its server still runs (its lease lapsed while discovery was
    down): a stream under way on it must not be cut, so the grace is longer than a call's usual
    deadline, and a plain delay: gRPC's own ``close(grace)`` waits only for calls it finds in a
    task's innermost frame, and cancelled an SDK stream read between two responses at once (the
    chaos suite's discovery kill cut one)."""

    def __init__(
        self,
        *,
        interceptors: Sequence[grpc.aio.ClientInterceptor] = (),
        close_grace_s: float = 60.0,
        token: str = "",
        tls: bool = False,
    ) -> None:
        """``token``/``tls``: for channels to control-plane services (the keeper's agents): the
        bearer token on every call, TLS when configured. Data-plane channels take neither."""
        self._interceptors = [*interceptors, *(bearer_interceptors(token) if token else [])]
        self._tls = tls
        self._close_grace_s = close_grace_s
        self._channels: dict[str, grpc.aio.Channel] = {}
        self._stubs: dict[tuple[str, Any], Any] = {}
        self._closing: dict[asyncio.Task[None], grpc.aio.Channel] = {}

    def channel(self, address: str) -> grpc.aio.Channel:
        channel = self._channels.get(address)
        if channel is None:
            creds = channel_credentials() if self._tls else None
            interceptors = self._interceptors or None
            channel = self._channels[address] = (
                grpc.aio.insecure_channel(address, options=grpc_options(), interceptors=interceptors)
                if creds is None
                else grpc.aio.secure_channel(
                    address, creds, options=grpc_options(), interceptors=interceptors
                )
            )
        return channel

    def stub(self, address: str, stub_type: Callable[[grpc.aio.Channel], S]) -> S:
        """A ``stub_type`` over the address's channel, made once."""
        key = (address, stub_type)
        stub = self._stubs.get(key)
        if stub is None:
            stub = self._stubs[key] = stub_type(self.channel(address))
        return stub

    def __contains__(self, address: str) -> bool:
        return address in self._channels

    def discard(self, addresses: Collection[str]) -> None:
        """Close the channels of these addresses once their calls are done."""
        for address in addresses:
            channel = self._channels.pop(address, None)
            for key in [k for k in self._stubs if k[0] == address]:
                del self._stubs[key]
            if channel is not None:
                task = asyncio.get_running_loop().create_task(self._close_later(channel))
                self._closing[task] = channel
                task.add_done_callback(lambda done: self._closing.pop(done, None))

    async def _close_later(self, channel: grpc.aio.Channel) -> None:
        await asyncio.sleep(self._close_grace_s)
        await channel.close()

    def retain(self, live: Collection[str]) -> None:
        """Discard every address not in ``live``."""
        self.discard(set(self._channels) - set(live))

    async def close(self) -> None:
        """Close every channel now, the discarded ones still in their grace included."""
        channels = [*self._channels.values(), *self._closing.values()]
        for task in list(self._closing):
            task.cancel()
        self._closing.clear()
        self._channels.clear()
        self._stubs.clear()
        await asyncio.gather(*(c.close() for c in channels))
