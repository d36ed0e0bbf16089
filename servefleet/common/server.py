"""The gRPC server every servefleet service runs: grpc.aio with health, reflection, explicit
keepalive and message limits, one interceptor that authenticates and authorizes the caller, maps
domain errors to status codes, traces every RPC and records Prometheus series (calls by method and
code, latency, in flight), optional TLS, and a graceful stop on
SIGTERM/SIGINT."""

from __future__ import annotations

import asyncio
import functools
import inspect
import logging
import signal
import time
from collections.abc import AsyncIterator, Awaitable, Callable, Sequence
from typing import Any

import grpc
from grpc_health.v1 import health_pb2, health_pb2_grpc
from grpc_health.v1._async import HealthServicer
from grpc_reflection.v1alpha import reflection

from servefleet.common import metrics, telemetry
from servefleet.common.auth import Authenticator, allowed_roles, authorize, set_caller
from servefleet.common.channels import server_credentials
from servefleet.common.config import grpc_options, settings
from servefleet.common.errors import ServefleetError

log = logging.getLogger(__name__)

Registrar = Callable[[grpc.aio.Server], None]


@functools.cache
def _series(service: str, method: str) -> tuple[Any, Any]:
    """A method's in-flight and latency series, looked up once (not per call)."""
    return metrics.RPC_IN_FLIGHT.labels(service, method), metrics.RPC_LATENCY.labels(service, method)


@functools.cache
def _requests(service: str, method: str, code: grpc.StatusCode) -> Any:
    return metrics.RPC_REQUESTS.labels(service, method, code.name)


class _Measured:
    """Counts one call in flight, then its status code and latency (the code it ended with)."""

    def __init__(self, service: str, method: str) -> None:
        self.labels = (service, method)
        self.start = time.perf_counter()
        self.in_flight, self.latency = _series(service, method)
        self.in_flight.inc()

    def done(self, code: grpc.StatusCode | None) -> None:
        self.in_flight.dec()
        self.latency.observe(time.perf_counter() - self.start)
        _requests(*self.labels, code or grpc.StatusCode.OK).inc()


_NOTHING: BaseException | None = None


def _ended_with(context: grpc.aio.ServicerContext, exc: BaseException | None) -> grpc.StatusCode:
    if isinstance(exc, asyncio.CancelledError | GeneratorExit):
        return grpc.StatusCode.CANCELLED
    code = context.code()
    if isinstance(code, grpc.StatusCode):
        return code
    return grpc.StatusCode.UNKNOWN if exc is not None else grpc.StatusCode.OK


def _wrap_behavior(
    service: str,
    method: str,
    behavior: Callable[..., Any],
    streaming_response: bool,
    auth: Authenticator | None = None,
) -> Callable[..., Any]:
    """One place that checks the caller, turns domain errors into statuses, opens the server span
    and measures."""

    async def admit(context: grpc.aio.ServicerContext) -> None:
        if auth is not None:
            who = await auth.authenticate(context.invocation_metadata())
            authorize(method, who)
            set_caller(who)

    async def fail(context: grpc.aio.ServicerContext, span: Any, exc: BaseException) -> None:
        if isinstance(exc, ServefleetError):
            code, message = exc.code, str(exc)
        else:
            log.exception("unhandled error in %s", method)
            code, message = grpc.StatusCode.INTERNAL, f"{type(exc).__name__}: {exc}"
        telemetry.record_status(span, code, message)
        await context.abort(code, message)

    if streaming_response:

        async def stream_behavior(request: Any, context: grpc.aio.ServicerContext) -> AsyncIterator[Any]:
            measured, ended = _Measured(service, method), _NOTHING
            with telemetry.server_span(method, context.invocation_metadata()) as span:
                try:
                    await admit(context)
                    async for item in behavior(request, context):
                        yield item
                except (asyncio.CancelledError, GeneratorExit) as exc:
                    ended = exc
                    raise
                except Exception as exc:
                    ended = exc
                    if context.code() is not None:  # already aborted by the behavior
                        raise
                    await fail(context, span, exc)
                finally:
                    measured.done(_ended_with(context, ended))

        return stream_behavior

    async def unary_behavior(request: Any, context: grpc.aio.ServicerContext) -> Any:
        measured, ended = _Measured(service, method), _NOTHING
        with telemetry.server_span(method, context.invocation_metadata()) as span:
            try:
                await admit(context)
                result = behavior(request, context)
                if inspect.isawaitable(result):
                    result = await result
                return result
            except asyncio.CancelledError as exc:
                ended = exc
                raise
            except Exception as exc:
                ended = exc
                if context.code() is not None:
                    raise
                await fail(context, span, exc)
            finally:
                measured.done(_ended_with(context, ended))

    return unary_behavior


class ServiceInterceptor(grpc.aio.ServerInterceptor):
    """Checks the caller (with ``auth``), maps ServefleetError to its status code, traces and
    measures every RPC (``service`` is the ``service`` label of its series); health and reflection
    pass through (they reveal no application)."""

    def __init__(self, service: str = "", auth: Authenticator | None = None) -> None:
        self.service = service
        self.auth = auth

    async def intercept_service(
        self,
        continuation: Callable[[grpc.HandlerCallDetails], Awaitable[grpc.RpcMethodHandler]],
        details: grpc.HandlerCallDetails,
    ) -> grpc.RpcMethodHandler:
        handler = await continuation(details)
        method = details.method
        if handler is None or method.startswith(("/grpc.health", "/grpc.reflection")):
            return handler
        kinds = {
            (False, False): ("unary_unary", grpc.unary_unary_rpc_method_handler),
            (False, True): ("unary_stream", grpc.unary_stream_rpc_method_handler),
            (True, False): ("stream_unary", grpc.stream_unary_rpc_method_handler),
            (True, True): ("stream_stream", grpc.stream_stream_rpc_method_handler),
        }
        attr, factory = kinds[(handler.request_streaming, handler.response_streaming)]
        wrapped = _wrap_behavior(
            self.service, method, getattr(handler, attr), handler.response_streaming, self.auth
        )
        return factory(
            wrapped,
            request_deserializer=handler.request_deserializer,
            response_serializer=handler.response_serializer,
        )


class GrpcServer:
    """A started-once gRPC server: ``start()`` binds and reports the port, ``stop(grace)`` drains.

    With ``auth`` every call must carry a token whose role ``servefleet.common.auth.ALLOWED`` lets
    call the method (a served method missing from that table refuses to start); control-plane
    services pass one and ``tls=True`` (TLS when ``Settings.tls_*`` say so). Without ``auth`` the
    server is open (inference endpoints)."""

    def __init__(
        self,
        name: str,
        listen: str,
        registrars: Sequence[Registrar],
        service_names: Sequence[str],
        *,
        auth: Authenticator | None = None,
        tls: bool = False,
    ) -> None:
        self.name = name
        self.listen = listen
        self.port = 0
        self.tls = tls
        self._service_names = list(service_names)
        if auth is not None:
            _check_policy(self._service_names)
        self._server = grpc.aio.server(interceptors=[ServiceInterceptor(name, auth)], options=grpc_options())
        for register in registrars:
            register(self._server)
        self.health = HealthServicer()
        health_pb2_grpc.add_HealthServicer_to_server(self.health, self._server)
        reflection.enable_server_reflection(
            [
                *self._service_names,
                health_pb2.DESCRIPTOR.services_by_name["Health"].full_name,
                reflection.SERVICE_NAME,
            ],
            self._server,
        )

    @property
    def service_names(self) -> list[str]:
        return list(self._service_names)

    @property
    def address(self) -> str:
        host = self.listen.rsplit(":", 1)[0]
        return f"{host}:{self.port}"

    async def start(self) -> int:
        creds = server_credentials() if self.tls else None
        if creds is None:
            self.port = self._server.add_insecure_port(self.listen)
        else:
            self.port = self._server.add_secure_port(self.listen, creds)
        if self.port == 0:
            raise OSError(f"{self.name}: cannot listen on {self.listen}")
        await self._server.start()
        for service in ("", *self._service_names):
            await self.health.set(service, health_pb2.HealthCheckResponse.SERVING)
        log.info("server started", extra={"service": self.name, "address": self.address})
        return self.port

    async def stop(self, grace: float | None = None) -> None:
        await self.health.enter_graceful_shutdown()
        await self._server.stop(settings.shutdown_grace_s if grace is None else grace)
        log.info("server stopped", extra={"service": self.name})

    async def wait_for_termination(self) -> None:
        await self._server.wait_for_termination()


def _check_policy(service_names: Sequence[str]) -> None:
    """Every method of every served service must say who may call it (fail closed)."""
    from google.protobuf import descriptor_pool

    pool = descriptor_pool.Default()
    for full_name in service_names:
        for method in pool.FindServiceByName(full_name).methods:
            path = f"/{full_name}/{method.name}"
            if allowed_roles(path) is None:
                raise RuntimeError(f"{path} has no entry in servefleet.common.auth.ALLOWED")


async def serve_until_signal(
    server: GrpcServer, *, on_stop: Callable[[], Awaitable[None]] | None = None
) -> None:
    """Run ``server`` until SIGTERM or SIGINT, then stop it gracefully and run ``on_stop``."""
    stop = asyncio.Event()
    loop = asyncio.get_running_loop()
    for sig in (signal.SIGTERM, signal.SIGINT):
        loop.add_signal_handler(sig, stop.set)
    await server.start()
    await stop.wait()
    await server.stop()
    if on_stop is not None:
        await on_stop()
