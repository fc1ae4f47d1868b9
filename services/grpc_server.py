"""The gRPC server bootstrap both services share, written once.

It serves the standard health service (overall and per service, Check and
Watch) and reflection, authenticates callers by bearer token, maps
`LocknError` to a gRPC status with google.rpc details in one interceptor,
applies keepalive and message-size limits and optional (m)TLS, and shuts down
gracefully: NOT_SERVING first so probes and load balancers stop sending, then
a grace period for calls in flight.
"""

from __future__ import annotations

import asyncio
import contextvars
import hmac
import signal
from collections.abc import AsyncIterator, Awaitable, Callable, Iterable, Mapping
from dataclasses import dataclass, field
from typing import Any

import grpc
from google.protobuf.message import DecodeError
from grpc_health.v1 import health, health_pb2, health_pb2_grpc
from grpc_reflection.v1alpha import reflection

from services.errors import (
    InvalidArgument,
    LocknError,
    Unauthenticated,
    internal_status,
    to_rpc_status,
)
from services.log import get_logger
from services.settings import TlsSettings

OPEN_SERVICES = ("grpc.health.v1.Health", "grpc.reflection.")
SERVING = health_pb2.HealthCheckResponse.SERVING
NOT_SERVING = health_pb2.HealthCheckResponse.NOT_SERVING

# The authenticated caller of the RPC being handled (set by the interceptor).
current_principal: contextvars.ContextVar[str] = contextvars.ContextVar(
    "current_principal", default="anonymous"
)

log = get_logger(component="grpc_server")


def channel_options(max_message_bytes: int) -> list[tuple[str, Any]]:
    """Options both ends use: message limits and keepalive that survive idle NATs."""
    return [
        ("grpc.max_send_message_length", max_message_bytes),
        ("grpc.max_receive_message_length", max_message_bytes),
        ("grpc.keepalive_time_ms", 20_000),
        ("grpc.keepalive_timeout_ms", 10_000),
        ("grpc.keepalive_permit_without_calls", 1),
        ("grpc.http2.max_pings_without_data", 0),
        ("grpc.http2.min_ping_interval_without_data_ms", 10_000),
    ]


class Authenticator:
    """Maps `authorization: Bearer <token>` to a principal; no tokens means open (dev)."""

    def __init__(self, tokens: Mapping[str, str]) -> None:
        self._tokens = dict(tokens)

    @property
    def enabled(self) -> bool:
        return bool(self._tokens)

    def principal(self, metadata: Iterable[tuple[str, str | bytes]] | None) -> str:
        if not self._tokens:
            return "anonymous"
        offered = ""
        for key, value in metadata or ():
            if key == "authorization" and isinstance(value, str):
                scheme, _, offered = value.partition(" ")
                if scheme.lower() != "bearer":
                    offered = ""
        for token, principal in self._tokens.items():
            if offered and hmac.compare_digest(offered.encode(), token.encode()):
                return principal
        raise Unauthenticated("a valid bearer token is required")


class _Interceptor(grpc.aio.ServerInterceptor):  # type: ignore[misc]
    """Authenticates the call and maps exceptions, for every method not open to probes."""

    def __init__(self, authenticator: Authenticator) -> None:
        self._auth = authenticator

    async def intercept_service(
        self,
        continuation: Callable[[grpc.HandlerCallDetails], Awaitable[grpc.RpcMethodHandler]],
        details: grpc.HandlerCallDetails,
    ) -> grpc.RpcMethodHandler:
        handler = await continuation(details)
        method: str = details.method or ""
        if handler is None or method.lstrip("/").startswith(OPEN_SERVICES):
            return handler
        metadata = details.invocation_metadata
        if handler.unary_unary is not None:
            return grpc.unary_unary_rpc_method_handler(
                self._unary(handler.unary_unary, metadata, method),
                request_deserializer=_tolerant(handler.request_deserializer),
                response_serializer=handler.response_serializer,
            )
        if handler.unary_stream is not None:
            return grpc.unary_stream_rpc_method_handler(
                self._stream(handler.unary_stream, metadata, method),
                request_deserializer=_tolerant(handler.request_deserializer),
                response_serializer=handler.response_serializer,
            )
        return handler

    def _authenticate(self, metadata: Any, method: str, context: grpc.aio.ServicerContext) -> None:
        try:
            principal = self._auth.principal(metadata)
        except Unauthenticated:
            # Who knocked and where, never with what: the token stays out of logs.
            log.warning("unauthenticated", method=method, peer=context.peer())
            raise
        log.debug("authenticated", method=method, principal=principal)
        current_principal.set(principal)

    def _unary(self, behavior: Any, metadata: Any, method: str) -> Any:
        async def call(request: Any, context: grpc.aio.ServicerContext) -> Any:
            try:
                self._authenticate(metadata, method, context)
                return await behavior(_parsed(request), context)
            except LocknError as error:
                await _abort(context, error)
            except Exception:
                log.exception("rpc_failed", method=method)
                await _abort_internal(context)

        return call

    def _stream(self, behavior: Any, metadata: Any, method: str) -> Any:
        async def call(request: Any, context: grpc.aio.ServicerContext) -> AsyncIterator[Any]:
            try:
                self._authenticate(metadata, method, context)
                async for item in behavior(_parsed(request), context):
                    yield item
            except LocknError as error:
                await _abort(context, error)
            except (asyncio.CancelledError, GeneratorExit):
                raise
            except Exception:
                log.exception("rpc_failed", method=method)
                await _abort_internal(context)

        return call


@dataclass(frozen=True)
class _Malformed:
    """Request bytes that are not the method's message (see `_tolerant`)."""

    problem: str


def _tolerant(deserializer: Callable[[bytes], Any] | None) -> Callable[[bytes], Any] | None:
    """The method's deserializer, answering _Malformed instead of raising: gRPC
    turns a DecodeError into UNKNOWN before any handler could refuse the call."""
    if deserializer is None:
        return None

    def parse(data: bytes) -> Any:
        try:
            return deserializer(data)
        except DecodeError as error:
            return _Malformed(str(error))

    return parse


def _parsed(request: Any) -> Any:
    if isinstance(request, _Malformed):
        raise InvalidArgument.field("request", f"not a valid protobuf message: {request.problem}")
    return request


async def _abort(context: grpc.aio.ServicerContext, error: LocknError) -> None:
    status = to_rpc_status(error)
    await context.abort(status.code, status.details, status.trailing_metadata)


async def _abort_internal(context: grpc.aio.ServicerContext) -> None:
    status = internal_status()
    await context.abort(status.code, status.details, status.trailing_metadata)


@dataclass
class Service:
    """One servicer to mount: its full name (for health and reflection) and how to add it."""

    name: str
    servicer: Any
    add: Callable[[Any, grpc.aio.Server], None]


@dataclass
class RunningServer:
    server: grpc.aio.Server
    health: health.aio.HealthServicer
    port: int
    service_names: list[str] = field(default_factory=list)

    async def set_serving(self, serving: bool) -> None:
        """Overall and every service's health follow one flag."""
        status = SERVING if serving else NOT_SERVING
        for name in ["", *self.service_names]:
            await self.health.set(name, status)

    async def stop(self, grace_seconds: float) -> None:
        await self.health.enter_graceful_shutdown()
        await self.server.stop(grace_seconds)


async def start_server(
    listen: str,
    services: list[Service],
    *,
    tokens: Mapping[str, str] | None = None,
    tls: TlsSettings | None = None,
    max_message_bytes: int = 64 * 1024 * 1024,
    serving: bool = True,
) -> RunningServer:
    """Bind `listen` (port 0 picks a free one), mount services, health and reflection."""
    server = grpc.aio.server(
        interceptors=[_Interceptor(Authenticator(tokens or {}))],
        options=channel_options(max_message_bytes),
    )
    health_servicer = health.aio.HealthServicer()
    health_pb2_grpc.add_HealthServicer_to_server(health_servicer, server)
    for service in services:
        service.add(service.servicer, server)
    names = [s.name for s in services]
    reflection.enable_server_reflection(
        [*names, health.SERVICE_NAME, reflection.SERVICE_NAME], server
    )
    if tls is not None and tls.enabled:
        port = server.add_secure_port(listen, server_credentials(tls))
    else:
        port = server.add_insecure_port(listen)
    await server.start()
    running = RunningServer(server, health_servicer, port, names)
    await running.set_serving(serving)
    log.info("grpc_server_started", listen=listen, port=port, services=names)
    return running


def server_credentials(tls: TlsSettings) -> grpc.ServerCredentials:
    assert tls.cert_file is not None and tls.key_file is not None
    pair = [(tls.key_file.read_bytes(), tls.cert_file.read_bytes())]
    if tls.client_ca_file is not None:
        return grpc.ssl_server_credentials(
            pair, root_certificates=tls.client_ca_file.read_bytes(), require_client_auth=True
        )
    return grpc.ssl_server_credentials(pair)


def open_channel(
    address: str,
    *,
    tls: TlsSettings | None = None,
    max_message_bytes: int = 64 * 1024 * 1024,
) -> grpc.aio.Channel:
    """A client channel to one of our servers, TLS when a CA file is configured."""
    options = channel_options(max_message_bytes)
    if tls is None or tls.ca_file is None:
        return grpc.aio.insecure_channel(address, options=options)
    key = tls.key_file.read_bytes() if tls.key_file else None
    cert = tls.cert_file.read_bytes() if tls.cert_file else None
    credentials = grpc.ssl_channel_credentials(tls.ca_file.read_bytes(), key, cert)
    return grpc.aio.secure_channel(address, credentials, options=options)


def bearer(token: str | None) -> list[tuple[str, str]]:
    """Call metadata carrying `token`, or none."""
    return [("authorization", f"Bearer {token}")] if token else []


async def serve_until_signalled(running: RunningServer, grace_seconds: float) -> None:
    """Block until SIGTERM/SIGINT, then go NOT_SERVING and drain within the grace period."""
    stop = asyncio.Event()
    loop = asyncio.get_running_loop()
    for sig in (signal.SIGTERM, signal.SIGINT):
        loop.add_signal_handler(sig, stop.set)
    await stop.wait()
    log.info("grpc_server_stopping", grace_seconds=grace_seconds)
    await running.set_serving(False)
    await running.stop(grace_seconds)
