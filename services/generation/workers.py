"""The ComfyWorkers this replica dispatches to: a channel each, health
followed by the standard Watch, models reported, slots counted."""

from __future__ import annotations

import asyncio
import contextlib
from collections.abc import Callable
from dataclasses import dataclass, field

import grpc
from grpc_health.v1 import health_pb2, health_pb2_grpc

from services import metrics
from services.contracts import worker, worker_grpc
from services.grpc_server import bearer, open_channel
from services.log import get_logger
from services.settings import Settings

log = get_logger(component="workers")


@dataclass
class WorkerHandle:
    name: str
    address: str
    slots: int
    channel: grpc.aio.Channel
    stub: worker_grpc.ComfyWorkerServiceStub
    metadata: list[tuple[str, str]]
    serving: bool = False
    in_use: int = 0
    last_checkpoint: str | None = None
    models: dict[str, list[str]] = field(default_factory=dict)

    @property
    def free(self) -> int:
        return max(0, self.slots - self.in_use) if self.serving else 0


class WorkerPool:
    def __init__(self, settings: Settings, on_change: Callable[[], None]) -> None:
        slots = settings.comfyui.max_concurrent_generations + settings.queue.lookahead
        token = settings.worker_token.get_secret_value() if settings.worker_token else None
        self.on_change = on_change
        self.workers: dict[str, WorkerHandle] = {}
        for endpoint in settings.workers:
            channel = open_channel(
                endpoint.address,
                tls=settings.tls,
                max_message_bytes=settings.grpc_max_message_bytes,
            )
            self.workers[endpoint.name] = WorkerHandle(
                endpoint.name,
                endpoint.address,
                slots,
                channel,
                worker_grpc.ComfyWorkerServiceStub(channel),
                bearer(token),
            )
        self._tasks: list[asyncio.Task[None]] = []

    def start(self) -> None:
        for handle in self.workers.values():
            self._tasks.append(
                asyncio.create_task(self._follow(handle), name=f"health-{handle.name}")
            )

    async def stop(self) -> None:
        for task in self._tasks:
            task.cancel()
        for task in self._tasks:
            with contextlib.suppress(asyncio.CancelledError):
                await task
        for handle in self.workers.values():
            await handle.channel.close()

    @property
    def free_slots(self) -> int:
        return sum(h.free for h in self.workers.values())

    def checkpoints(self) -> list[str] | None:
        """Checkpoints the serving workers reported, or None when none reported any."""
        return self.models().get("checkpoints")

    def models(self) -> dict[str, list[str]]:
        """Model names by kind the serving workers reported; a kind none
        reported any of is absent (nothing is known about it)."""
        found: dict[str, set[str]] = {}
        for handle in self.workers.values():
            if handle.serving:
                for kind, names in handle.models.items():
                    found.setdefault(kind, set()).update(names)
        return {kind: sorted(names) for kind, names in found.items() if names}

    def pick(self, checkpoint: str | None) -> WorkerHandle | None:
        """A worker with a free slot, preferring one that last ran this checkpoint."""
        free = [h for h in self.workers.values() if h.free > 0]
        if not free:
            return None
        warm = [h for h in free if checkpoint and h.last_checkpoint == checkpoint]
        return max(warm or free, key=lambda h: h.free)

    def sole_free(self) -> WorkerHandle | None:
        """The worker with free slots, when only one has any."""
        free = [h for h in self.workers.values() if h.free > 0]
        return free[0] if len(free) == 1 else None

    def acquire(self, handle: WorkerHandle, checkpoint: str | None) -> None:
        handle.in_use += 1
        if checkpoint:
            handle.last_checkpoint = checkpoint
        metrics.WORKER_SLOTS_IN_USE.labels(worker=handle.name).set(handle.in_use)

    def release(self, handle: WorkerHandle) -> None:
        handle.in_use = max(0, handle.in_use - 1)
        metrics.WORKER_SLOTS_IN_USE.labels(worker=handle.name).set(handle.in_use)
        self.on_change()

    async def _follow(self, handle: WorkerHandle) -> None:
        """Health by the standard Watch stream; reconnects forever."""
        health = health_pb2_grpc.HealthStub(handle.channel)
        while True:
            try:
                call = health.Watch(health_pb2.HealthCheckRequest(service=""))
                async for answer in call:
                    await self._set_serving(
                        handle, answer.status == health_pb2.HealthCheckResponse.SERVING
                    )
            except grpc.aio.AioRpcError as error:
                if handle.serving:
                    log.warning("worker_unreachable", worker=handle.name, error=error.code().name)
            await self._set_serving(handle, False)
            await asyncio.sleep(0.5)

    async def _set_serving(self, handle: WorkerHandle, serving: bool) -> None:
        if serving and not handle.serving:
            with contextlib.suppress(grpc.aio.AioRpcError):
                reply = await handle.stub.ListModels(
                    worker.ListModelsRequest(), metadata=handle.metadata, timeout=10
                )
                handle.models = {kind: list(m.names) for kind, m in reply.models.items()}
        if serving != handle.serving:
            log.info("worker_health", worker=handle.name, serving=serving)
            handle.serving = serving
            metrics.WORKER_SERVING.labels(worker=handle.name).set(1 if serving else 0)
            self.on_change()
