"""One stack per fuzz module: GenerationService on its own database, one
ComfyWorker in front of a ComfyUI simulator, a few finished generations for
the hostile calls to aim at, and (for the HTTP suite) the gateway.
Module-scoped so thousands of examples share one set of servers; every
example then proves it changed nothing."""

from __future__ import annotations

import asyncio
import io
import uuid
from collections.abc import AsyncIterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import aiohttp
import asyncpg
import grpc
import pytest
import pytest_asyncio
import structlog
from grpc_health.v1 import health_pb2, health_pb2_grpc
from PIL import Image

from gateway.server import start_gateway
from services.comfy_worker.server import RunningWorker, start_worker
from services.contracts import gen, gen_grpc, worker, worker_grpc
from services.generation.server import RunningGeneration, start_generation_service
from services.grpc_server import open_channel
from services.log import configure_logging
from services.settings import load_settings
from tests.fixtures.generation import TERMINAL, WORKFLOWS, typed
from tests.fixtures.simulator import RunningSimulator, start_simulator
from tests.fixtures.worker import FAST_RETRY, worker_settings
from tests.fuzz.harness import snapshot


@dataclass
class FuzzStack:
    generation: RunningGeneration
    worker: RunningWorker
    simulator: RunningSimulator
    channel: grpc.aio.Channel
    stub: gen_grpc.GenerationServiceStub
    worker_channel: grpc.aio.Channel
    worker_stub: worker_grpc.ComfyWorkerServiceStub
    # Our own connection, for snapshots: never one of the service's.
    db: asyncpg.Connection
    outputs: Path
    # Finished generations: one COMPLETED txt2img (with an image), one
    # COMPLETED img2img (with a stored input) and one CANCELLED.
    completed: gen.Generation
    with_input: gen.Generation
    cancelled: gen.Generation
    # A page token the service really issued (page_size 1 of three rows).
    page_token: str

    @property
    def address(self) -> str:
        return f"127.0.0.1:{self.generation.port}"

    @property
    def known_ids(self) -> list[str]:
        return [self.completed.id, self.with_input.id, self.cancelled.id]

    def seeded(self, raw: str) -> gen.Generation | None:
        """The seeded generation `raw` names: only its canonical text, in either case."""
        try:
            wanted = str(uuid.UUID(raw))
        except ValueError:
            return None
        if raw.lower() != wanted:
            return None  # braces, urn:uuid:, whitespace... name no generation
        by_id = {g.id: g for g in (self.completed, self.with_input, self.cancelled)}
        return by_id.get(wanted)

    async def state(self) -> tuple[Any, ...]:
        """Everything a call could change: the queue tables and the image store,
        what ComfyUI ran or holds and every file it has outside its input
        folder, and what the worker is following."""
        sim = self.simulator.sim
        root = sim.dirs["input"].parent
        files = sorted(
            str(p.relative_to(root))
            for p in root.rglob("*")
            if p.is_file() and sim.dirs["input"] not in p.parents
        )
        # Uploads may land in the input folder (ComfyUI checks a graph only
        # after its images are there), but only flat inside it.
        nested = [p for p in sim.dirs["input"].rglob("*") if p.parent != sim.dirs["input"]]
        comfy = (len(sim.runs), len(sim.history), len(sim.pending), sim.running, files, nested)
        following = (len(self.worker.executor.in_flight), len(self.worker.tracker.followed))
        return await snapshot(self.db, self.outputs), comfy, following

    async def assert_serving(self) -> None:
        """Both services healthy and answering real requests."""
        for channel in (self.channel, self.worker_channel):
            health = health_pb2_grpc.HealthStub(channel)
            answer = await health.Check(health_pb2.HealthCheckRequest(), timeout=5)
            assert answer.status == health_pb2.HealthCheckResponse.SERVING
        reply = await self.stub.GetGeneration(gen.GetGenerationRequest(id=self.completed.id))
        assert reply.generation == self.completed
        models = await self.worker_stub.ListModels(worker.ListModelsRequest(), timeout=5)
        assert models.models["checkpoints"].names


async def _admin(server: str, statement: str) -> None:
    conn = await asyncpg.connect(server)
    try:
        await conn.execute(statement)
    finally:
        await conn.close()


def _png() -> bytes:
    out = io.BytesIO()
    Image.new("RGB", (8, 8), "red").save(out, format="PNG")
    return out.getvalue()


async def _finish(stub: gen_grpc.GenerationServiceStub, generation_id: str) -> gen.Generation:
    async with asyncio.timeout(30):
        while True:
            reply = await stub.GetGeneration(gen.GetGenerationRequest(id=generation_id))
            generation: gen.Generation = reply.generation
            if generation.status in TERMINAL:
                return generation
            await asyncio.sleep(0.05)


async def _seed(stub: gen_grpc.GenerationServiceStub) -> tuple[gen.Generation, ...]:
    params: dict[str, Any] = {"prompt": "a cat", "steps": 2, "seed": 1}
    first = await stub.CreateGeneration(
        gen.CreateGenerationRequest(template="sd15-txt2img", parameters=typed(params))
    )
    image = {**typed(params), "image": gen.ParameterValue(image_name="in.png")}
    second = await stub.CreateGeneration(
        gen.CreateGenerationRequest(
            template="img2img",
            parameters=image,
            input_images=[gen.InputImage(name="in.png", data=_png())],
        )
    )
    third = await stub.CreateGeneration(
        gen.CreateGenerationRequest(
            template="sd15-txt2img", parameters=typed({**params, "steps": 150})
        )
    )
    await stub.CancelGeneration(gen.CancelGenerationRequest(id=third.generation.id))
    return tuple([await _finish(stub, r.generation.id) for r in (first, second, third)])


@pytest_asyncio.fixture(scope="module", loop_scope="module")
async def fuzz_stack(
    postgres_server: str, template_database: str, tmp_path_factory: pytest.TempPathFactory
) -> AsyncIterator[FuzzStack]:
    # Thousands of refused calls would log thousands of lines that nobody reads
    # (and that cost a fifth of the run): warnings and errors only, meanwhile.
    logging_before = structlog.get_config()
    configure_logging("warning", "json")
    root = tmp_path_factory.mktemp("fuzz")
    name = f"{template_database}_fuzz_{uuid.uuid4().hex[:8]}"
    base = postgres_server.rpartition("/")[0]
    await _admin(postgres_server, f'CREATE DATABASE "{name}" TEMPLATE "{template_database}"')
    dsn = f"{base}/{name}"
    simulator = await start_simulator(root / "sim")
    worker = await start_worker(worker_settings(simulator.url))
    await worker.tracker.connected.wait()
    settings = load_settings(
        database_url=dsn,
        generation_listen="127.0.0.1:0",
        generation_metrics_port=0,
        workers=[{"name": "gpu0", "address": f"127.0.0.1:{worker.port}"}],
        comfyui={"workflows_path": str(WORKFLOWS), "output_path": str(root / "outputs")},
        retry=FAST_RETRY,
        queue={"lease_seconds": 3, "heartbeat_seconds": 0.5, "poll_seconds": 0.2},
    )
    generation = await start_generation_service(settings)
    channel = open_channel(f"127.0.0.1:{generation.port}")
    worker_channel = open_channel(f"127.0.0.1:{worker.port}")
    db = await asyncpg.connect(dsn)
    try:
        async with asyncio.timeout(10):
            while not all(h.serving for h in generation.workers.workers.values()):
                await asyncio.sleep(0.02)
        stub = gen_grpc.GenerationServiceStub(channel)
        completed, with_input, cancelled = await _seed(stub)
        assert completed.status == gen.GENERATION_STATUS_COMPLETED, completed
        assert with_input.status == gen.GENERATION_STATUS_COMPLETED, with_input
        assert cancelled.status == gen.GENERATION_STATUS_CANCELLED, cancelled
        page = await stub.ListGenerations(gen.ListGenerationsRequest(page_size=1))
        assert page.next_page_token
        yield FuzzStack(
            generation,
            worker,
            simulator,
            channel,
            stub,
            worker_channel,
            worker_grpc.ComfyWorkerServiceStub(worker_channel),
            db,
            root / "outputs",
            completed,
            with_input,
            cancelled,
            page.next_page_token,
        )
    finally:
        await db.close()
        await channel.close()
        await worker_channel.close()
        await generation.stop()
        await worker.stop()
        await simulator.stop()
        await _admin(postgres_server, f'DROP DATABASE IF EXISTS "{name}" WITH (FORCE)')
        structlog.configure(**logging_before)


# A second gateway takes bodies up to this many bytes, so the size limit can
# be fuzzed on both sides without sending the default 32 MiB each time.
SMALL_BODY = 4096


@dataclass
class FuzzGateway:
    stack: FuzzStack
    session: aiohttp.ClientSession
    # Absolute base URLs: requests carry raw paths (dots, %2F) the client must
    # not normalise, so nothing is joined to a base URL.
    url: str
    small_url: str
    max_body: int


@pytest_asyncio.fixture(scope="module", loop_scope="module")
async def fuzz_gateway(fuzz_stack: FuzzStack) -> AsyncIterator[FuzzGateway]:
    """The HTTP gateway (and one with a small body limit) in front of the stack."""
    settings = load_settings(generation_address=fuzz_stack.address)
    runner = await start_gateway(settings, "127.0.0.1:0")
    small = await start_gateway(
        load_settings(generation_address=fuzz_stack.address, gateway_max_body_bytes=SMALL_BODY),
        "127.0.0.1:0",
    )
    # Hostile requests may be refused before their bodies are read: a fresh
    # connection each time keeps one refusal from spoiling the next request.
    connector = aiohttp.TCPConnector(limit=20, force_close=True)
    try:
        async with aiohttp.ClientSession(connector=connector) as session:
            yield FuzzGateway(
                fuzz_stack,
                session,
                f"http://127.0.0.1:{runner.addresses[0][1]}",
                f"http://127.0.0.1:{small.addresses[0][1]}",
                settings.gateway_max_body_bytes,
            )
    finally:
        await small.cleanup()
        await runner.cleanup()
