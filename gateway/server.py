"""`lockn-gen gateway`: GenerationService over HTTP/JSON, with server-sent
events for status streams. The caller's bearer token is passed through, so
GenerationService alone decides who sees what."""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import json
import signal
import time
import uuid
from collections.abc import Awaitable, Callable, Iterator
from typing import Any

import grpc
from aiohttp import web
from grpc_health.v1 import health_pb2, health_pb2_grpc

from gateway import convert, openapi
from services import collector, metrics
from services.contracts import gen, gen_grpc
from services.errors import (
    InvalidArgument,
    LocknError,
    ResourceExhausted,
    Unauthenticated,
    from_rpc_error,
)
from services.grpc_server import open_channel
from services.log import get_logger
from services.settings import Settings

log = get_logger(component="gateway")
HTTP_STATUS = {
    grpc.StatusCode.INVALID_ARGUMENT: 400,
    grpc.StatusCode.OUT_OF_RANGE: 400,
    grpc.StatusCode.UNAUTHENTICATED: 401,
    grpc.StatusCode.PERMISSION_DENIED: 403,
    grpc.StatusCode.NOT_FOUND: 404,
    grpc.StatusCode.ALREADY_EXISTS: 409,
    grpc.StatusCode.FAILED_PRECONDITION: 409,
    grpc.StatusCode.RESOURCE_EXHAUSTED: 429,
    grpc.StatusCode.UNAVAILABLE: 503,
    grpc.StatusCode.DEADLINE_EXCEEDED: 504,
}
Handler = Callable[[web.Request], Awaitable[web.StreamResponse]]
STUB = web.AppKey("stub", gen_grpc.GenerationServiceStub)
CHANNEL = web.AppKey("channel", grpc.aio.Channel)
OPENAPI = web.AppKey("openapi", dict)
# GenerationService's names of fields this request gave under other HTTP
# names: its refusals are renamed to what the caller sent.
FIELD_NAMES = web.RequestKey[dict[str, str]]("field_names")


def _stub(request: web.Request) -> gen_grpc.GenerationServiceStub:
    return request.app[STUB]


def _metadata(request: web.Request) -> list[tuple[str, str]]:
    header = request.headers.get("Authorization", "")
    # gRPC metadata carries printable ASCII only: anything else cannot be a
    # token, and is refused as an unknown token is.
    if not (header.isascii() and header.isprintable()):
        raise Unauthenticated("a valid bearer token is required (printable ASCII)")
    return [("authorization", header)] if header else []


def _natural(raw: str, field: str, maximum: int) -> int:
    """A query parameter or header holding a decimal integer from 0 to `maximum`."""
    # isdigit() alone takes superscripts (int() refuses them) and other
    # scripts' digits, and int() refuses over 4300 digits: ASCII, and few.
    if not (raw.isascii() and raw.isdigit() and len(raw) <= 20) or int(raw) > maximum:
        raise InvalidArgument.field(field, f"an integer from 0 to {maximum}")
    return int(raw)


def error_response(error: LocknError, status: int) -> web.Response:
    body: dict[str, Any] = {"error": {"reason": error.reason, "message": error.message}}
    if isinstance(error, InvalidArgument):
        body["error"]["field_violations"] = [
            {"field": field, "description": why} for field, why in error.violations
        ]
    headers = {}
    if isinstance(error, ResourceExhausted):
        headers["Retry-After"] = str(max(1, round(error.retry_after_seconds)))
    if status == 401:
        # RFC 9110: a 401 names the scheme that would authenticate.
        headers["WWW-Authenticate"] = "Bearer"
    return web.json_response(body, status=status, headers=headers)


@web.middleware
async def measured(request: web.Request, handler: Handler) -> web.StreamResponse:
    resource = request.match_info.route.resource
    route = resource.canonical if resource is not None else "unmatched"
    started = time.monotonic()
    response = await handler(request)
    # Streams (events, images) count once their headers are out.
    metrics.HTTP_LATENCY.labels(route=route).observe(time.monotonic() - started)
    metrics.HTTP_REQUESTS.labels(route=route, status=str(response.status)).inc()
    return response


def _renamed(error: LocknError, names: dict[str, str]) -> LocknError:
    """`error` with its field violations under the HTTP names in `names`."""
    if not names or not isinstance(error, InvalidArgument):
        return error
    violations = [(names.get(field, field), why) for field, why in error.violations]
    return InvalidArgument(violations, reason=error.reason, metadata=error.metadata)


@web.middleware
async def errors(request: web.Request, handler: Handler) -> web.StreamResponse:
    try:
        return await handler(request)
    except grpc.aio.AioRpcError as rpc:
        error = _renamed(from_rpc_error(rpc), request.get(FIELD_NAMES, {}))
        return error_response(error, HTTP_STATUS.get(rpc.code(), 502))
    except LocknError as error:
        # The gateway's own refusals, by the same status table as the service's.
        return error_response(error, HTTP_STATUS.get(error.code, 500))
    except web.RequestPayloadError:
        # A body that does not decompress as its Content-Encoding says, or ends
        # early. aiohttp's parser has lost its place in the connection, so it
        # closes after this answer; the body is marked read, or aiohttp would
        # drain it again and log the same error as unhandled.
        request.content.feed_eof()
        response = error_response(
            InvalidArgument.field("body", "unreadable: not valid for its Content-Encoding"), 400
        )
        response.force_close()
        return response
    except web.HTTPException as http:
        if http.status < 400:
            raise
        # aiohttp's own refusals (no such route, body too large...) in our error shape.
        reason = http.reason.upper().replace(" ", "_")
        return web.json_response(
            {"error": {"reason": reason, "message": http.text or http.reason}},
            status=http.status,
            headers={k: v for k, v in http.headers.items() if k == "Allow"},
        )


async def _json_body(request: web.Request) -> Any:
    # JSON only: a form or text/plain POST is one any web page can make
    # cross-site without a CORS preflight, which with authentication off
    # would let it create generations.
    if request.content_type != "application/json":
        raise web.HTTPUnsupportedMediaType(text="Content-Type must be application/json")
    try:
        body = json.loads(await request.read())
        # "\ud800" escapes decode to lone surrogates, which no protobuf string takes.
        json.dumps(body, ensure_ascii=False).encode()
    except (ValueError, UnicodeDecodeError, RecursionError):
        raise InvalidArgument.field(
            "body", "not UTF-8 JSON, nested too deeply, or with a number too long"
        ) from None
    return body


async def create(request: web.Request) -> web.Response:
    message = convert.create_request(await _json_body(request))
    reply = await _stub(request).CreateGeneration(message, metadata=_metadata(request))
    body = convert.to_json(reply.generation)
    location = f"/api/generations/{reply.generation.id}"
    return web.json_response(
        body, status=202 if reply.created else 200, headers={"Location": location}
    )


async def get(request: web.Request) -> web.Response:
    reply = await _stub(request).GetGeneration(
        gen.GetGenerationRequest(id=request.match_info["id"]), metadata=_metadata(request)
    )
    return web.json_response(convert.to_json(reply.generation))


async def list_generations(request: web.Request) -> web.Response:
    size = _natural(request.query.get("page_size", "0"), "page_size", 2**31 - 1)
    reply = await _stub(request).ListGenerations(
        gen.ListGenerationsRequest(
            page_size=size,
            page_token=request.query.get("page_token", ""),
            statuses=convert.statuses(request.query.getall("status", [])),
            template=request.query.get("template", ""),
        ),
        metadata=_metadata(request),
    )
    return web.json_response(convert.to_json(reply))


async def cancel(request: web.Request) -> web.Response:
    reply = await _stub(request).CancelGeneration(
        gen.CancelGenerationRequest(id=request.match_info["id"]), metadata=_metadata(request)
    )
    return web.json_response(convert.to_json(reply.generation))


@contextlib.contextmanager
def _relayed(call: grpc.aio.UnaryStreamCall) -> Iterator[None]:
    """Around relaying a GenerationService stream to the client: whatever ends
    the relay early cancels the call. A client that hangs up ends it quietly;
    re-raised, aiohttp would log its ConnectionResetError as a failed request.
    Anything else (CancelledError among it) goes on."""
    try:
        yield
    except ConnectionResetError:
        call.cancel()
    except BaseException:
        call.cancel()
        raise


async def image(request: web.Request) -> web.StreamResponse:
    index = _natural(request.query.get("index", "0"), "index", 1000)
    call = _stub(request).GetGenerationImage(
        gen.GetGenerationImageRequest(id=request.match_info["id"], index=index),
        metadata=_metadata(request),
    )
    response: web.StreamResponse | None = None
    with _relayed(call):
        async for chunk in call:
            if response is None:
                # Images never change once stored: the id and index are a strong
                # tag. The id is written canonically (lower case), never as the
                # path spelled it: caller text stays out of headers, and every
                # spelling GenerationService accepted names the image alike.
                etag = f'"{uuid.UUID(request.match_info["id"])}-{index}"'
                if request.headers.get("If-None-Match") == etag:
                    call.cancel()
                    return web.Response(status=304, headers={"ETag": etag})
                response = web.StreamResponse(
                    headers={
                        "Content-Type": chunk.image.content_type or "application/octet-stream",
                        "Content-Length": str(chunk.image.size_bytes),
                        "ETag": etag,
                        "Cache-Control": "private, max-age=31536000, immutable",
                    }
                )
                await response.prepare(request)
            await response.write(chunk.data)
    # aiohttp ends a prepared response itself (quietly, if the client is gone).
    return web.Response(status=204) if response is None else response


async def events(request: web.Request) -> web.StreamResponse:
    """Server-sent events: the snapshot, then each event; resume with Last-Event-ID."""
    # Refusals name whichever of the two the caller gave; the header wins.
    if request.headers.get("Last-Event-ID"):
        given, last = "Last-Event-ID", request.headers["Last-Event-ID"]
    else:
        given, last = "after", request.query.get("after", "0")
    after = _natural(last, given, 2**63 - 1)
    request[FIELD_NAMES] = {"after_sequence": given}
    call = _stub(request).WatchGeneration(
        gen.WatchGenerationRequest(id=request.match_info["id"], after_sequence=after),
        metadata=_metadata(request),
    )
    response: web.StreamResponse | None = None
    with _relayed(call):
        async for item in call:
            if response is None:
                response = web.StreamResponse(
                    headers={
                        "Content-Type": "text/event-stream",
                        "Cache-Control": "no-cache",
                        "X-Accel-Buffering": "no",
                    }
                )
                await response.prepare(request)
            kind = item.WhichOneof("item")
            # Events carry their sequence as the frame id; the snapshot carries
            # none (a client then keeps its last one), as its newest sequence
            # would make the ids of the events replayed after it run backwards.
            id_line = f"id: {item.event.sequence}\n" if kind == "event" else ""
            frame = f"{id_line}event: {kind}\ndata: {json.dumps(convert.to_json(item))}\n\n"
            await response.write(frame.encode())
    return web.Response(status=204) if response is None else response


async def templates(request: web.Request) -> web.Response:
    reply = await _stub(request).ListTemplates(
        gen.ListTemplatesRequest(), metadata=_metadata(request)
    )
    return web.json_response(convert.to_json(reply))


async def stats(request: web.Request) -> web.Response:
    reply = await _stub(request).GetStats(gen.GetStatsRequest(), metadata=_metadata(request))
    return web.json_response(convert.to_json(reply))


async def openapi_document(request: web.Request) -> web.Response:
    return web.json_response(request.app[OPENAPI])


async def healthz(request: web.Request) -> web.Response:
    return web.json_response({"status": "ok"})


async def readyz(request: web.Request) -> web.Response:
    """Ready when GenerationService says it is serving."""
    health = health_pb2_grpc.HealthStub(request.app[CHANNEL])
    try:
        answer = await health.Check(health_pb2.HealthCheckRequest(service=""), timeout=2)
        serving = answer.status == health_pb2.HealthCheckResponse.SERVING
    except grpc.aio.AioRpcError:
        serving = False
    return web.json_response(
        {"status": "ready" if serving else "not ready"}, status=200 if serving else 503
    )


def create_app(settings: Settings) -> web.Application:
    app = web.Application(
        middlewares=[measured, errors], client_max_size=settings.gateway_max_body_bytes
    )
    channel = open_channel(
        settings.generation_address,
        tls=settings.tls,
        max_message_bytes=settings.grpc_max_message_bytes,
    )
    app[CHANNEL] = channel
    app[STUB] = gen_grpc.GenerationServiceStub(channel)
    app.router.add_post("/api/generations", create)
    app.router.add_get("/api/generations", list_generations)
    app.router.add_get("/api/generations/{id}", get)
    app.router.add_post("/api/generations/{id}/cancel", cancel)
    app.router.add_get("/api/generations/{id}/image", image)
    app.router.add_get("/api/generations/{id}/events", events)
    app.router.add_get("/api/templates", templates)
    app.router.add_get("/api/stats", stats)
    app.router.add_get("/healthz", healthz)
    app.router.add_get("/readyz", readyz)
    app.router.add_get("/openapi.json", openapi_document)
    app[OPENAPI] = openapi.document()

    async def close_channel(app: web.Application) -> None:
        await channel.close()

    app.on_cleanup.append(close_channel)
    return app


async def start_gateway(settings: Settings, listen: str | None = None) -> web.AppRunner:
    runner = web.AppRunner(create_app(settings), access_log=None, shutdown_timeout=5)
    await runner.setup()
    host, _, port = (listen or settings.gateway_listen).rpartition(":")
    await web.TCPSite(runner, host, int(port)).start()
    return runner


async def serve(settings: Settings, args: argparse.Namespace) -> None:
    metrics.start_metrics_server(settings.gateway_metrics_port)
    runner = await start_gateway(settings)
    collector.tune_for_service()
    log.info("gateway_ready", listen=settings.gateway_listen, upstream=settings.generation_address)
    stop = asyncio.Event()
    loop = asyncio.get_running_loop()
    for sig in (signal.SIGTERM, signal.SIGINT):
        loop.add_signal_handler(sig, stop.set)
    await stop.wait()
    await runner.cleanup()
