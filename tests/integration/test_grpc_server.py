"""The shared gRPC bootstrap: health, reflection, auth and error mapping on a real server."""

from __future__ import annotations

import asyncio
from collections.abc import AsyncIterator
from typing import Any

import grpc
import pytest
from grpc_health.v1 import health_pb2, health_pb2_grpc
from grpc_reflection.v1alpha import reflection_pb2, reflection_pb2_grpc

from services.contracts import worker, worker_grpc
from services.errors import InvalidArgument, NotFound, ResourceExhausted, from_rpc_error
from services.grpc_server import (
    NOT_SERVING,
    SERVING,
    RunningServer,
    Service,
    bearer,
    current_principal,
    start_server,
)

WORKER_SERVICE = "lockn.comfyworker.v1.ComfyWorkerService"


class _Servicer(worker_grpc.ComfyWorkerServiceServicer):
    """Answers with the caller's principal, or raises what the request asks for."""

    async def Cancel(self, request: Any, context: Any) -> Any:
        if request.prompt_id == "bad":
            raise InvalidArgument.field("prompt_id", "must be a UUID")
        if request.prompt_id == "missing":
            raise NotFound("no such prompt", reason="PROMPT_NOT_FOUND")
        if request.prompt_id == "full":
            raise ResourceExhausted("too many", retry_after_seconds=2.5)
        if request.prompt_id == "boom":
            raise RuntimeError("secret internals")
        if request.prompt_id == "echo":
            # Refusals quote what they refuse: here, far past any trailer limit.
            raise InvalidArgument(
                [(f"f{n}" + "\u00e9" * 100_000, "\U0001f642" * 100_000) for n in range(50)]
            )
        return worker.CancelResponse(outcome=worker.CANCEL_OUTCOME_DELETED)

    async def ListModels(self, request: Any, context: Any) -> Any:
        return worker.ListModelsResponse(
            models={"principal": worker.ModelNames(names=[current_principal.get()])}
        )

    async def Execute(self, request: Any, context: Any) -> AsyncIterator[Any]:
        yield worker.ExecuteResponse(
            event=worker.ExecutionEvent(accepted=worker.Accepted(prompt_id="p1"))
        )
        raise InvalidArgument.field("graph_json", "not JSON")


async def _start(tokens: dict[str, str] | None = None) -> RunningServer:
    return await start_server(
        "127.0.0.1:0",
        [
            Service(
                WORKER_SERVICE,
                _Servicer(),  # type: ignore[abstract]  # gRPC answers UNIMPLEMENTED for the rest
                worker_grpc.add_ComfyWorkerServiceServicer_to_server,
            )
        ],
        tokens=tokens,
    )


@pytest.fixture
async def server() -> AsyncIterator[RunningServer]:
    running = await _start({"s3cret": "alice"})
    yield running
    await running.stop(0)


@pytest.fixture
async def channel(server: RunningServer) -> AsyncIterator[grpc.aio.Channel]:
    async with grpc.aio.insecure_channel(f"127.0.0.1:{server.port}") as ch:
        yield ch


async def test_health_answers_serving_overall_and_per_service_without_a_token(
    channel: grpc.aio.Channel,
) -> None:
    stub = health_pb2_grpc.HealthStub(channel)
    for name in ("", WORKER_SERVICE):
        reply = await stub.Check(health_pb2.HealthCheckRequest(service=name), timeout=5)
        assert reply.status == SERVING
    with pytest.raises(grpc.aio.AioRpcError) as raised:
        await stub.Check(health_pb2.HealthCheckRequest(service="no.such.Service"), timeout=5)
    assert raised.value.code() == grpc.StatusCode.NOT_FOUND


async def test_health_watch_sees_not_serving_when_the_server_says_so(
    server: RunningServer, channel: grpc.aio.Channel
) -> None:
    stub = health_pb2_grpc.HealthStub(channel)
    call = stub.Watch(health_pb2.HealthCheckRequest(service=WORKER_SERVICE))
    assert (await asyncio.wait_for(call.read(), 5)).status == SERVING
    await server.set_serving(False)
    assert (await asyncio.wait_for(call.read(), 5)).status == NOT_SERVING
    call.cancel()


async def test_reflection_lists_the_service_health_and_reflection(
    channel: grpc.aio.Channel,
) -> None:
    stub = reflection_pb2_grpc.ServerReflectionStub(channel)
    call = stub.ServerReflectionInfo()
    await call.write(reflection_pb2.ServerReflectionRequest(list_services=""))
    reply = await asyncio.wait_for(call.read(), 5)
    await call.done_writing()
    names = {s.name for s in reply.list_services_response.service}
    assert {WORKER_SERVICE, "grpc.health.v1.Health"} <= names


async def test_a_call_without_a_valid_token_is_unauthenticated(channel: grpc.aio.Channel) -> None:
    stub = worker_grpc.ComfyWorkerServiceStub(channel)
    for metadata in ([], bearer("wrong"), [("authorization", "Basic s3cret")]):
        with pytest.raises(grpc.aio.AioRpcError) as raised:
            await stub.ListModels(worker.ListModelsRequest(), metadata=metadata, timeout=5)
        assert raised.value.code() == grpc.StatusCode.UNAUTHENTICATED


async def test_the_handler_sees_the_principal_of_the_token(channel: grpc.aio.Channel) -> None:
    stub = worker_grpc.ComfyWorkerServiceStub(channel)
    reply = await stub.ListModels(worker.ListModelsRequest(), metadata=bearer("s3cret"), timeout=5)
    assert list(reply.models["principal"].names) == ["alice"]


@pytest.mark.parametrize(
    ("prompt_id", "code", "reason"),
    [
        ("bad", grpc.StatusCode.INVALID_ARGUMENT, "INVALID_ARGUMENT"),
        ("missing", grpc.StatusCode.NOT_FOUND, "PROMPT_NOT_FOUND"),
        ("full", grpc.StatusCode.RESOURCE_EXHAUSTED, "QUEUE_LIMIT"),
    ],
)
async def test_domain_errors_become_statuses_with_error_info(
    channel: grpc.aio.Channel, prompt_id: str, code: grpc.StatusCode, reason: str
) -> None:
    stub = worker_grpc.ComfyWorkerServiceStub(channel)
    with pytest.raises(grpc.aio.AioRpcError) as raised:
        await stub.Cancel(
            worker.CancelRequest(prompt_id=prompt_id), metadata=bearer("s3cret"), timeout=5
        )
    assert raised.value.code() == code
    error = from_rpc_error(raised.value)
    assert error.reason == reason
    if prompt_id == "bad":
        assert isinstance(error, InvalidArgument)
        assert error.violations == [("prompt_id", "must be a UUID")]
    if prompt_id == "full":
        assert isinstance(error, ResourceExhausted)
        assert error.retry_after_seconds == 2.5


async def test_an_unexpected_exception_is_internal_without_its_message(
    channel: grpc.aio.Channel,
) -> None:
    stub = worker_grpc.ComfyWorkerServiceStub(channel)
    with pytest.raises(grpc.aio.AioRpcError) as raised:
        await stub.Cancel(worker.CancelRequest(prompt_id="boom"), metadata=bearer("s3cret"))
    assert raised.value.code() == grpc.StatusCode.INTERNAL
    assert "secret" not in (raised.value.details() or "")


async def test_an_error_raised_mid_stream_ends_the_stream_with_its_status(
    channel: grpc.aio.Channel,
) -> None:
    stub = worker_grpc.ComfyWorkerServiceStub(channel)
    call = stub.Execute(worker.ExecuteRequest(), metadata=bearer("s3cret"))
    first = await asyncio.wait_for(call.read(), 5)
    assert first.event.accepted.prompt_id == "p1"
    with pytest.raises(grpc.aio.AioRpcError) as raised:
        await asyncio.wait_for(call.read(), 5)
    assert raised.value.code() == grpc.StatusCode.INVALID_ARGUMENT
    error = from_rpc_error(raised.value)
    assert isinstance(error, InvalidArgument)
    assert error.violations == [("graph_json", "not JSON")]


async def test_without_tokens_configured_calls_are_open() -> None:
    running = await _start(None)
    try:
        async with grpc.aio.insecure_channel(f"127.0.0.1:{running.port}") as ch:
            stub = worker_grpc.ComfyWorkerServiceStub(ch)
            reply = await stub.ListModels(worker.ListModelsRequest(), timeout=5)
        assert list(reply.models["principal"].names) == ["anonymous"]
    finally:
        await running.stop(0)


async def test_a_refusal_quoting_huge_input_still_arrives_as_itself(
    channel: grpc.aio.Channel,
) -> None:
    # Unclipped, these trailers exceed 16 KiB: the client would see
    # RESOURCE_EXHAUSTED instead of the INVALID_ARGUMENT (found by tests/fuzz).
    stub = worker_grpc.ComfyWorkerServiceStub(channel)
    with pytest.raises(grpc.aio.AioRpcError) as raised:
        await stub.Cancel(
            worker.CancelRequest(prompt_id="echo"), metadata=bearer("s3cret"), timeout=5
        )
    assert raised.value.code() == grpc.StatusCode.INVALID_ARGUMENT
    error = from_rpc_error(raised.value)
    assert isinstance(error, InvalidArgument)
    assert [f[:2] for f, _ in error.violations] == [f"f{n}" for n in range(8)]
    assert all(f.endswith("...") and why.endswith("...") for f, why in error.violations)


async def test_bytes_that_are_not_the_request_message_are_invalid_argument(
    channel: grpc.aio.Channel,
) -> None:
    # gRPC itself answers a request it cannot parse with UNKNOWN (found by tests/fuzz).
    call = channel.unary_unary(f"/{WORKER_SERVICE}/Cancel")
    for data in (b"\x0a\x02\xff\xfe", b"\xff\xff\xff", b"\x0a\x05ab"):
        with pytest.raises(grpc.aio.AioRpcError) as raised:
            await call(data, metadata=bearer("s3cret"), timeout=5)
        assert raised.value.code() == grpc.StatusCode.INVALID_ARGUMENT
        error = from_rpc_error(raised.value)
        assert isinstance(error, InvalidArgument)
        assert [f for f, _ in error.violations] == ["request"]
        assert "lockn.comfyworker.v1.CancelRequest" in error.message
    with pytest.raises(grpc.aio.AioRpcError) as raised:
        await call(b"\xff", timeout=5)
    assert raised.value.code() == grpc.StatusCode.UNAUTHENTICATED
