"""`lockn-gen generation-service`: one GenerationService replica.

It migrates the database at start (under an advisory lock, so replicas may
start together), then serves. Health follows PostgreSQL.
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import uuid
from dataclasses import dataclass

from services import allocator, collector, metrics
from services.contracts import gen_grpc
from services.database import create_pool, migrate
from services.generation.dispatcher import Dispatcher
from services.generation.events import EventHub
from services.generation.queue import Queue
from services.generation.servicer import GenerationServicer
from services.generation.store import ImageStore
from services.generation.templates import TemplateLibrary
from services.generation.workers import WorkerPool
from services.grpc_server import (
    NOT_SERVING,
    SERVING,
    RunningServer,
    Service,
    serve_until_signalled,
    start_server,
)
from services.log import get_logger
from services.settings import Settings

log = get_logger(component="generation_service")
SERVICE_NAME = "lockn.generation.v1.GenerationService"
# A health name of its own: NOT_SERVING while dispatch is paused (storage full).
# Reads, creates and watches still work then, so the overall status stays up.
DISPATCH_HEALTH = "lockn.generation.v1.Dispatch"
CHECK_INTERVAL = 2.0


@dataclass
class RunningGeneration:
    server: RunningServer
    dispatcher: Dispatcher
    hub: EventHub
    workers: WorkerPool
    queue: Queue
    library: TemplateLibrary
    tasks: list[asyncio.Task[None]]

    @property
    def port(self) -> int:
        return self.server.port

    async def stop(self, grace_seconds: float = 0.0) -> None:
        await self.server.set_serving(False)
        for task in self.tasks:
            task.cancel()
            with contextlib.suppress(asyncio.CancelledError):
                await task
        await self.server.stop(grace_seconds)
        await self.dispatcher.stop()
        await self.hub.stop()
        await self.workers.stop()
        await self.queue.pool.close()


async def start_generation_service(
    settings: Settings, listen: str | None = None, replica: str | None = None
) -> RunningGeneration:
    dsn = settings.database_dsn
    await migrate(dsn)
    pool = await create_pool(dsn, min_size=2, max_size=20)
    owner = replica or f"replica-{uuid.uuid4().hex[:12]}"
    queue = Queue(pool, settings.queue, owner)
    library = TemplateLibrary.load(settings.comfyui.workflows_path)
    for file, reason in library.errors.items():
        log.error("template_broken", file=file, reason=reason)
    store = ImageStore(settings.comfyui.output_path)
    dispatcher_ref: list[Dispatcher] = []
    workers = WorkerPool(settings, on_change=lambda: dispatcher_ref[0].poke())
    dispatcher = Dispatcher(queue, workers, store, settings.queue)
    dispatcher_ref.append(dispatcher)
    hub = EventHub(dsn, queue, on_queued=dispatcher.poke)
    servicer = GenerationServicer(settings, queue, library, hub, workers, dispatcher, store)
    token_map = dict(settings.auth_tokens)
    server = await start_server(
        listen or settings.generation_listen,
        [Service(SERVICE_NAME, servicer, gen_grpc.add_GenerationServiceServicer_to_server)],
        tokens=token_map or None,
        tls=settings.tls,
        max_message_bytes=settings.grpc_max_message_bytes,
    )
    hub.start()
    workers.start()
    dispatcher.start()
    tasks = [
        asyncio.create_task(_follow_database(queue, server), name="database-health"),
        asyncio.create_task(_follow_dispatch(dispatcher, server), name="dispatch-health"),
        asyncio.create_task(_reload_templates(library), name="template-reload"),
        asyncio.create_task(_count_queue(queue), name="queue-depth"),
    ]
    log.info(
        "generation_service_ready",
        port=server.port,
        replica=owner,
        templates=len(library.templates()),
    )
    return RunningGeneration(server, dispatcher, hub, workers, queue, library, tasks)


async def _follow_database(queue: Queue, server: RunningServer) -> None:
    serving = True
    while True:
        await asyncio.sleep(CHECK_INTERVAL)
        try:
            async with asyncio.timeout(CHECK_INTERVAL):
                await queue.pool.fetchval("SELECT 1")
            up = True
        except Exception:
            up = False
        if up != serving:
            serving = up
            log.warning("database_health", serving=up)
            await server.set_serving(up)


async def _follow_dispatch(dispatcher: Dispatcher, server: RunningServer) -> None:
    paused: str | None = "unknown"
    while True:
        if dispatcher.paused != paused:
            paused = dispatcher.paused
            status = NOT_SERVING if paused else SERVING
            await server.health.set(DISPATCH_HEALTH, status)
        await asyncio.sleep(CHECK_INTERVAL / 4)


async def _reload_templates(library: TemplateLibrary) -> None:
    while True:
        await asyncio.sleep(CHECK_INTERVAL)
        with contextlib.suppress(Exception):
            if library.reload_if_changed():
                log.info(
                    "templates_reloaded", templates=len(library.templates()), errors=library.errors
                )


async def _count_queue(queue: Queue) -> None:
    while True:
        with contextlib.suppress(Exception):
            # Unfinished only: what finished is counted by lockn_generations_total.
            counts = await queue.counts(finished=False)
            for status in ("QUEUED", "DISPATCHED", "RUNNING"):
                metrics.QUEUE_DEPTH.labels(status=status).set(counts.get(status, 0))
        await asyncio.sleep(5)


async def serve(settings: Settings, args: argparse.Namespace) -> None:
    allocator.reuse_large_blocks()
    metrics.start_metrics_server(settings.generation_metrics_port)
    running = await start_generation_service(settings)
    collector.tune_for_service()
    try:
        await serve_until_signalled(running.server, settings.shutdown_grace_seconds)
    finally:
        await running.stop()
