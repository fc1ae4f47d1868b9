"""Each service started from the command line, as an operator would: it answers
the standard gRPC health check with SERVING and reflection lists its services,
and SIGTERM stops it cleanly."""

from __future__ import annotations

import asyncio
import signal

import grpc
from grpc_health.v1 import health_pb2, health_pb2_grpc
from grpc_reflection.v1alpha import reflection_pb2, reflection_pb2_grpc

from services.stack import LocalStack

GENERATION = "lockn.generation.v1.GenerationService"
WORKER = "lockn.comfyworker.v1.ComfyWorkerService"


async def reflected_services(address: str) -> set[str]:
    async with grpc.aio.insecure_channel(address) as channel:
        call = reflection_pb2_grpc.ServerReflectionStub(channel).ServerReflectionInfo()
        await call.write(reflection_pb2.ServerReflectionRequest(list_services=""))
        reply = await asyncio.wait_for(call.read(), 5)
        await call.done_writing()
    return {s.name for s in reply.list_services_response.service}


async def health(address: str, service: str = "") -> int:
    async with grpc.aio.insecure_channel(address) as channel:
        reply = await health_pb2_grpc.HealthStub(channel).Check(
            health_pb2.HealthCheckRequest(service=service), timeout=5
        )
    return int(reply.status)


async def test_worker_and_generation_service_answer_health_and_reflection(
    stack: LocalStack, database_url: str
) -> None:
    simulator = stack.start_simulator(step_seconds=0.001)
    await stack.wait_serving(simulator)
    worker = stack.start_worker("worker", simulator.address)
    await stack.wait_serving(worker)
    generation = stack.start_generation("generation", database_url, [worker])
    await stack.wait_serving(generation)

    for part, name in ((worker, WORKER), (generation, GENERATION)):
        assert await health(part.address, name) == health_pb2.HealthCheckResponse.SERVING
        listed = await reflected_services(part.address)
        assert {name, "grpc.health.v1.Health"} <= listed

    for name in ("generation", "worker"):
        process = stack.parts[name].process
        process.send_signal(signal.SIGTERM)
        assert await asyncio.to_thread(process.wait, 20) == 0
