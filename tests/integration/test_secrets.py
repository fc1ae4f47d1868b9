"""Secrets never reach the logs: tokens, the worker credential and the
database password, with every process logging at debug level while work runs
and a caller presents a wrong token."""

from __future__ import annotations

import asyncio
import time
from collections.abc import Iterator
from pathlib import Path
from urllib.parse import urlsplit, urlunsplit

import grpc
import pytest

from services.contracts import gen, gen_grpc
from services.stack import LocalStack

CALLER_TOKEN = "s3cret-caller-token-5b1f"
WRONG_TOKEN = "s3cret-wrong-token-91ac"
WORKER_TOKEN = "s3cret-worker-token-77d0"
DB_PASSWORD = "s3cret-db-password-0c3e"
SECRETS = (CALLER_TOKEN, WRONG_TOKEN, WORKER_TOKEN, DB_PASSWORD)


def with_password(url: str, password: str) -> str:
    # The test server trusts local connections, so any password is accepted.
    parts = urlsplit(url)
    user = parts.username or "postgres"
    netloc = f"{user}:{password}@{parts.hostname}:{parts.port or 5432}"
    return urlunsplit(parts._replace(netloc=netloc))


@pytest.fixture
def stack(tmp_path: Path) -> Iterator[LocalStack]:
    processes = LocalStack(tmp_path / "logs")
    yield processes
    processes.stop()


async def test_no_secret_appears_in_any_log(
    stack: LocalStack, database_url: str, tmp_path: Path
) -> None:
    debug = {"LOCKN_LOG_LEVEL": "debug", "LOCKN_WORKER_TOKEN": WORKER_TOKEN}
    simulator = stack.start_simulator(step_seconds=0.001)
    await stack.wait_serving(simulator)
    worker = stack.start_worker("worker", simulator.address, port=0, **debug)
    await stack.wait_serving(worker)
    generation = stack.start_generation(
        "generation",
        with_password(database_url, DB_PASSWORD),
        [worker],
        LOCKN_AUTH_TOKENS=f'{{"{CALLER_TOKEN}": "alice"}}',
        LOCKN_COMFYUI__OUTPUT_PATH=str(tmp_path / "out"),
        **debug,
    )
    await stack.wait_serving(generation)

    async with grpc.aio.insecure_channel(generation.address) as channel:
        stub = gen_grpc.GenerationServiceStub(channel)
        with pytest.raises(grpc.aio.AioRpcError) as refused:
            await stub.ListTemplates(
                gen.ListTemplatesRequest(), metadata=[("authorization", f"Bearer {WRONG_TOKEN}")]
            )
        assert refused.value.code() == grpc.StatusCode.UNAUTHENTICATED
        caller = [("authorization", f"Bearer {CALLER_TOKEN}")]
        request = gen.CreateGenerationRequest(
            template="sd15-txt2img",
            parameters={"prompt": gen.ParameterValue(string_value="a secret-free cat")},
        )
        created = (await stub.CreateGeneration(request, metadata=caller)).generation
        deadline = time.monotonic() + 30
        while True:
            reply = await stub.GetGeneration(
                gen.GetGenerationRequest(id=created.id), metadata=caller
            )
            if reply.generation.status == gen.GENERATION_STATUS_COMPLETED:
                break
            assert time.monotonic() < deadline, reply.generation
            await asyncio.sleep(0.1)

    stack.stop()
    logs = {path.name: path.read_text() for path in (tmp_path / "logs").glob("*.log")}
    assert "generation_service_ready" in logs["generation.log"]  # the logs are real
    assert '"event": "unauthenticated"' in logs["generation.log"]  # the refusal is logged
    assert '"principal": "alice"' in logs["generation.log"]  # and debug lines are on
    for name, text in logs.items():
        for secret in SECRETS:
            assert secret not in text, f"{secret} in {name}"
