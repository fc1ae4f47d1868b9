"""`lockn-gen comfy-worker`: one ComfyWorker in front of one ComfyUI.

Health follows ComfyUI: SERVING while /system_stats answers, NOT_SERVING
(so GenerationService sends nothing) while it does not.
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import uuid
from dataclasses import dataclass

from services import allocator, collector, metrics
from services.comfy_worker.comfyui import ComfyUIClient, ComfyUIUnreachable
from services.comfy_worker.executor import Executor
from services.comfy_worker.servicer import ComfyWorkerServicer
from services.comfy_worker.tracker import Tracker
from services.contracts import worker_grpc
from services.grpc_server import RunningServer, Service, serve_until_signalled, start_server
from services.log import get_logger
from services.settings import Settings

log = get_logger(component="comfy_worker")
SERVICE_NAME = "lockn.comfyworker.v1.ComfyWorkerService"
HEALTH_INTERVAL = 2.0
CLIENT_NAMESPACE = uuid.UUID("6f1d2c0e-7a44-4c59-9a1e-2b8f3d5e9c70")


@dataclass
class RunningWorker:
    server: RunningServer
    client: ComfyUIClient
    tracker: Tracker
    executor: Executor
    monitor: asyncio.Task[None]

    @property
    def port(self) -> int:
        return self.server.port

    async def stop(self, grace_seconds: float = 0.0) -> None:
        self.monitor.cancel()
        with contextlib.suppress(asyncio.CancelledError):
            await self.monitor
        await self.server.stop(grace_seconds)
        await self.tracker.stop()
        await self.client.close()


async def start_worker(settings: Settings, listen: str | None = None) -> RunningWorker:
    comfy = settings.comfyui
    client = ComfyUIClient(
        str(comfy.base_url),
        retry=settings.retry,
        connections=max(8, 4 * comfy.max_concurrent_generations),
    )
    listen = listen or settings.worker_listen
    tracker = Tracker(
        client,
        client_id=stable_client_id(str(comfy.base_url), listen),
        poll_interval=comfy.poll_interval_ms / 1000,
    )
    executor = Executor(client, tracker, default_timeout=comfy.timeout_seconds)
    token = settings.worker_token.get_secret_value() if settings.worker_token else None
    server = await start_server(
        listen,
        [
            Service(
                SERVICE_NAME,
                ComfyWorkerServicer(client, executor),
                worker_grpc.add_ComfyWorkerServiceServicer_to_server,
            )
        ],
        # Only GenerationService's credential may run work here.
        tokens={token: "generation-service"} if token else None,
        tls=settings.tls,
        max_message_bytes=settings.grpc_max_message_bytes,
        serving=False,
    )
    tracker.start()
    monitor = asyncio.create_task(_follow_comfyui(client, server), name="comfyui-health")
    return RunningWorker(server, client, tracker, executor, monitor)


def stable_client_id(comfyui_url: str, listen: str) -> str | None:
    """The websocket clientId of the worker at `listen` in front of this ComfyUI.

    ComfyUI sends a prompt's frames to the clientId that queued it, so a worker
    restarted in the same place keeps receiving its earlier prompts' progress.
    An ephemeral port is no place: such a worker gets a random clientId.
    """
    if listen.endswith(":0"):
        return None
    return f"lockn-{uuid.uuid5(CLIENT_NAMESPACE, f'{comfyui_url}|{listen}').hex}"


async def _follow_comfyui(client: ComfyUIClient, server: RunningServer) -> None:
    serving: bool | None = None
    while True:
        try:
            await client.system_stats(retry=False, timeout=HEALTH_INTERVAL)
            up = True
        except ComfyUIUnreachable as error:
            up = False
            if serving is not False:
                log.warning("comfyui_unreachable", error=str(error))
        except Exception as error:  # a malformed answer is as bad as none
            up = False
            log.warning("comfyui_unhealthy", error=str(error))
        if up != serving:
            serving = up
            await server.set_serving(up)
            metrics.COMFYUI_UP.set(1 if up else 0)
            log.info("health_changed", serving=up)
        await asyncio.sleep(HEALTH_INTERVAL if up else HEALTH_INTERVAL / 4)


async def serve(settings: Settings, args: argparse.Namespace) -> None:
    allocator.reuse_large_blocks()
    metrics.start_metrics_server(settings.worker_metrics_port)
    running = await start_worker(settings)
    collector.tune_for_service()
    log.info("worker_ready", port=running.port, comfyui=str(settings.comfyui.base_url))
    try:
        await serve_until_signalled(running.server, settings.shutdown_grace_seconds)
    finally:
        await running.stop()
