"""ComfyWorkerService over gRPC: a thin layer on the executor and the client."""

from __future__ import annotations

import re
from collections.abc import AsyncIterator

import grpc

from services.comfy_worker.comfyui import ComfyUIClient, ComfyUIUnreachable
from services.comfy_worker.executor import Executor
from services.contracts import worker, worker_grpc
from services.errors import InvalidArgument, Unavailable

JOB_ID_MAX = 200
# Prompt ids to attach to are UUIDs here; the id goes into a ComfyUI URL
# (/history/{id}), so nothing that could climb to another route is taken.
PROMPT_ID = re.compile(r"[A-Za-z0-9_-]{1,128}")


def check_prompt_id(value: str, field: str = "prompt_id") -> None:
    if not PROMPT_ID.fullmatch(value):
        raise InvalidArgument.field(
            field, "required: 1-128 letters, digits, '_' or '-' (a ComfyUI prompt id)"
        )


class ComfyWorkerServicer(worker_grpc.ComfyWorkerServiceServicer):
    def __init__(self, client: ComfyUIClient, executor: Executor) -> None:
        self.client = client
        self.executor = executor

    async def Execute(
        self, request: worker.ExecuteRequest, context: grpc.aio.ServicerContext
    ) -> AsyncIterator[worker.ExecuteResponse]:
        if not request.job_id or len(request.job_id) > JOB_ID_MAX:
            raise InvalidArgument.field("job_id", f"required, at most {JOB_ID_MAX} characters")
        if not request.graph_json:
            raise InvalidArgument.field("graph_json", "required")
        if request.comfyui_prompt_id:
            check_prompt_id(request.comfyui_prompt_id, "comfyui_prompt_id")
        async for event in self.executor.execute(request):
            response = worker.ExecuteResponse()
            response.event.CopyFrom(event)  # one copy of an image chunk, not three
            yield response

    async def Attach(
        self, request: worker.AttachRequest, context: grpc.aio.ServicerContext
    ) -> AsyncIterator[worker.AttachResponse]:
        check_prompt_id(request.prompt_id)
        async for event in self.executor.attach(request):
            response = worker.AttachResponse()
            response.event.CopyFrom(event)
            yield response

    async def Cancel(
        self, request: worker.CancelRequest, context: grpc.aio.ServicerContext
    ) -> worker.CancelResponse:
        if not request.prompt_id:
            raise InvalidArgument.field("prompt_id", "required")
        try:
            outcome = await self.executor.cancel(request.prompt_id)
        except ComfyUIUnreachable as error:
            raise Unavailable(str(error)) from error
        return worker.CancelResponse(outcome=outcome)

    async def GetSystemStats(
        self, request: worker.GetSystemStatsRequest, context: grpc.aio.ServicerContext
    ) -> worker.GetSystemStatsResponse:
        try:
            stats = await self.client.system_stats()
            queue = await self.client.queue()
        except ComfyUIUnreachable as error:
            raise Unavailable(str(error)) from error
        system = stats.get("system", {})
        return worker.GetSystemStatsResponse(
            comfyui_version=str(system.get("comfyui_version", "")),
            pytorch_version=str(system.get("pytorch_version", "")),
            python_version=str(system.get("python_version", "")),
            devices=[
                worker.Device(
                    name=str(d.get("name", "")),
                    type=str(d.get("type", "")),
                    vram_total=int(d.get("vram_total", 0)),
                    vram_free=int(d.get("vram_free", 0)),
                    torch_vram_total=int(d.get("torch_vram_total", 0)),
                    torch_vram_free=int(d.get("torch_vram_free", 0)),
                )
                for d in stats.get("devices", [])
            ],
            queue_running=len(queue.running),
            queue_pending=len(queue.pending),
            in_flight=len(self.executor.in_flight),
        )

    async def ListModels(
        self, request: worker.ListModelsRequest, context: grpc.aio.ServicerContext
    ) -> worker.ListModelsResponse:
        try:
            models = await self.client.models()
        except ComfyUIUnreachable as error:
            raise Unavailable(str(error)) from error
        return worker.ListModelsResponse(
            models={kind: worker.ModelNames(names=names) for kind, names in models.items()}
        )
