"""Fault injection with real processes: whatever crashes, no accepted generation
is lost and none completes twice.

Each case starts its own stack (simulator, worker(s), GenerationService
replica(s) as OS processes) with short leases, creates generations, injects
one fault mid-run, then checks the same invariants: every generation reaches
a terminal state, every COMPLETED one has exactly one COMPLETED event and a
valid PNG on disk, and the services recovered by themselves.
"""

from __future__ import annotations

import asyncio
import os
import signal
import subprocess
import time
from collections.abc import AsyncIterator, Sequence
from pathlib import Path
from typing import Any

import aiohttp
import grpc
import pytest
from grpc_health.v1 import health_pb2, health_pb2_grpc
from PIL import Image

from services.contracts import gen, gen_grpc
from services.embedded_postgres import EmbeddedPostgres, free_port
from services.generation.server import DISPATCH_HEALTH as DISPATCH
from services.stack import LocalStack, Part

pytestmark = [pytest.mark.slow, pytest.mark.timeout(240)]

TERMINAL = {
    gen.GENERATION_STATUS_COMPLETED,
    gen.GENERATION_STATUS_FAILED,
    gen.GENERATION_STATUS_CANCELLED,
}
FAST_LEASES = {"LOCKN_QUEUE__LEASE_SECONDS": "3", "LOCKN_QUEUE__HEARTBEAT_SECONDS": "1"}
FAST_RETRIES = {"LOCKN_RETRY__BACKOFF_SECONDS": "[0.2, 0.4, 0.8]"}


@pytest.fixture
async def stack(tmp_path: Path) -> AsyncIterator[LocalStack]:
    processes = LocalStack(tmp_path / "logs")
    try:
        yield processes
    finally:
        await asyncio.to_thread(processes.stop)


def request(seed: int, steps: int = 20) -> Any:
    return gen.CreateGenerationRequest(
        template="sd15-txt2img",
        parameters={
            "prompt": gen.ParameterValue(string_value=f"fault case {seed}"),
            "seed": gen.ParameterValue(int_value=seed),
            "steps": gen.ParameterValue(int_value=steps),
        },
    )


async def create(address: str, count: int, steps: int = 20) -> list[str]:
    async with grpc.aio.insecure_channel(address) as channel:
        stub = gen_grpc.GenerationServiceStub(channel)
        replies = [await stub.CreateGeneration(request(n, steps), timeout=10) for n in range(count)]
    return [r.generation.id for r in replies]


async def statuses(address: str, ids: list[str]) -> dict[str, Any]:
    async with grpc.aio.insecure_channel(address) as channel:
        stub = gen_grpc.GenerationServiceStub(channel)
        found = {}
        for generation_id in ids:
            reply = await stub.GetGeneration(gen.GetGenerationRequest(id=generation_id), timeout=10)
            found[generation_id] = reply.generation
        return found


async def wait_until(
    address: str, ids: list[str], wanted: set[gen.GenerationStatus.ValueType], timeout: float
) -> dict[str, Any]:
    deadline = time.monotonic() + timeout
    while True:
        try:
            current = await statuses(address, ids)
            if all(g.status in wanted for g in current.values()):
                return current
        except grpc.aio.AioRpcError:
            pass  # the service may be restarting or its database away
        if time.monotonic() > deadline:
            raise AssertionError(f"not all of {ids} reached {wanted} within {timeout} s")
        await asyncio.sleep(0.2)


async def wait_any_running(address: str, ids: list[str], timeout: float = 30) -> None:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        current = await statuses(address, ids)
        if any(g.status == gen.GENERATION_STATUS_RUNNING for g in current.values()):
            return
        await asyncio.sleep(0.05)
    raise AssertionError("no generation started running")


async def completed_events(address: str, generation_id: str) -> int:
    async with grpc.aio.insecure_channel(address) as channel:
        stub = gen_grpc.GenerationServiceStub(channel)
        count = 0
        call = stub.WatchGeneration(gen.WatchGenerationRequest(id=generation_id), timeout=10)
        async for item in call:
            if item.HasField("event") and item.event.type == gen.EVENT_TYPE_COMPLETED:
                count += 1
        return count


async def assert_all_completed_once(address: str, ids: list[str], timeout: float = 90) -> None:
    final = await wait_until(address, ids, TERMINAL, timeout)
    assert {g.status for g in final.values()} == {gen.GENERATION_STATUS_COMPLETED}, final
    for generation_id, generation in final.items():
        assert await completed_events(address, generation_id) == 1
        assert generation.outputs
        for output in generation.outputs:
            with Image.open(output.path) as image:
                image.verify()


async def health(address: str, service: str = "") -> int:
    async with grpc.aio.insecure_channel(address) as channel:
        reply = await health_pb2_grpc.HealthStub(channel).Check(
            health_pb2.HealthCheckRequest(service=service), timeout=3
        )
    return int(reply.status)


async def wait_health(address: str, wanted: int, timeout: float, service: str = "") -> None:
    deadline = time.monotonic() + timeout
    while True:
        try:
            if await health(address, service) == wanted:
                return
        except grpc.aio.AioRpcError:
            pass  # a probe that cannot connect is no answer yet
        assert time.monotonic() < deadline, f"health of {address} never became {wanted}"
        await asyncio.sleep(0.2)


async def assert_each_prompt_ran_once(simulator: Part, address: str, ids: list[str]) -> None:
    """Re-attached, not re-run: ComfyUI ran each generation's prompt exactly once."""
    final = await statuses(address, ids)
    async with aiohttp.ClientSession() as http:
        async with http.get(f"{simulator.address}/_simulator/runs") as reply:
            runs = (await reply.json())["runs"]
    assert sorted(r["prompt_id"] for r in runs) == sorted(g.prompt_id for g in final.values())


async def one_gpu(
    stack: LocalStack,
    database_url: str,
    outputs: Path,
    step_seconds: float = 0.02,
    simulator_flags: Sequence[str] = (),
    **settings: str,
) -> tuple[Part, Part, Part]:
    simulator = stack.start_simulator(step_seconds=step_seconds, flags=simulator_flags)
    await stack.wait_serving(simulator)
    worker = stack.start_worker("worker", simulator.address, port=0, **FAST_RETRIES)
    await stack.wait_serving(worker)
    generation = stack.start_generation(
        "generation-a",
        database_url,
        [worker],
        LOCKN_COMFYUI__OUTPUT_PATH=str(outputs),
        **FAST_LEASES,
        **FAST_RETRIES,
        **settings,
    )
    await stack.wait_serving(generation)
    return simulator, worker, generation


async def test_sigkill_of_a_replica_mid_run_loses_and_duplicates_nothing(
    stack: LocalStack, database_url: str, tmp_path: Path
) -> None:
    simulator, worker, replica_a = await one_gpu(stack, database_url, tmp_path / "out")
    replica_b = stack.start_generation(
        "generation-b",
        database_url,
        [worker],
        LOCKN_COMFYUI__OUTPUT_PATH=str(tmp_path / "out"),
        **FAST_LEASES,
    )
    await stack.wait_serving(replica_b)
    ids = await create(replica_a.address, 6)
    await wait_any_running(replica_a.address, ids)
    stack.kill("generation-a")
    await assert_all_completed_once(replica_b.address, ids)
    await assert_each_prompt_ran_once(simulator, replica_b.address, ids)


@pytest.mark.parametrize(
    "simulator_flags",
    [(), ("--assign-prompt-ids",)],
    ids=["client-prompt-ids", "comfyui-assigns-prompt-ids"],
)
async def test_sigkill_of_the_worker_mid_run_reattaches_to_the_prompt(
    stack: LocalStack, database_url: str, tmp_path: Path, simulator_flags: tuple[str, ...]
) -> None:
    # With a ComfyUI that ignores our prompt ids, only GenerationService knows
    # ComfyUI's own ones (from Accepted) to hand to the restarted worker.
    simulator, worker, generation = await one_gpu(
        stack, database_url, tmp_path / "out", 0.05, simulator_flags
    )
    ids = await create(generation.address, 3)
    await wait_any_running(generation.address, ids)
    port = int(worker.address.rpartition(":")[2])
    stack.kill("worker")
    restarted = stack.start_worker("worker", simulator.address, port=port, **FAST_RETRIES)
    await stack.wait_serving(restarted)
    await assert_all_completed_once(generation.address, ids)
    await assert_each_prompt_ran_once(simulator, generation.address, ids)


async def test_comfyui_gone_for_a_while_then_back_is_reported_and_recovered(
    stack: LocalStack, database_url: str, tmp_path: Path
) -> None:
    simulator, worker, generation = await one_gpu(stack, database_url, tmp_path / "out")
    ids = await create(generation.address, 3)
    frozen = time.monotonic()
    os.killpg(simulator.process.pid, signal.SIGSTOP)
    try:
        await wait_health(worker.address, health_pb2.HealthCheckResponse.NOT_SERVING, 15)
        await asyncio.sleep(30 - (time.monotonic() - frozen))
    finally:
        os.killpg(simulator.process.pid, signal.SIGCONT)
    await wait_health(worker.address, health_pb2.HealthCheckResponse.SERVING, 20)
    await assert_all_completed_once(generation.address, ids)


async def test_comfyui_restart_losing_its_history_requeues_and_completes(
    stack: LocalStack, database_url: str, tmp_path: Path
) -> None:
    simulator, _, generation = await one_gpu(stack, database_url, tmp_path / "out", 0.05)
    ids = await create(generation.address, 3)
    await wait_any_running(generation.address, ids)
    port = int(simulator.address.rpartition(":")[2])
    stack.kill("simulator")
    restarted = stack.start_simulator(step_seconds=0.02, port=port)
    await stack.wait_serving(restarted)
    await assert_all_completed_once(generation.address, ids)


async def test_postgres_restart_mid_run_is_survived(stack: LocalStack, tmp_path: Path) -> None:
    server = EmbeddedPostgres(Path(f"/tmp/lockn-fault-pg-{free_port()}"), port=free_port())
    dsn = await asyncio.to_thread(server.start)
    try:
        _, _, generation = await one_gpu(stack, dsn, tmp_path / "out", 0.05)
        ids = await create(generation.address, 4)
        await wait_any_running(generation.address, ids)
        await asyncio.to_thread(server.stop)
        await wait_health(generation.address, health_pb2.HealthCheckResponse.NOT_SERVING, 15)
        await asyncio.to_thread(server.start)
        await wait_health(generation.address, health_pb2.HealthCheckResponse.SERVING, 30)
        await assert_all_completed_once(generation.address, ids, timeout=120)
        assert await health(generation.address) == health_pb2.HealthCheckResponse.SERVING
    finally:
        await asyncio.to_thread(stack.stop)
        await asyncio.to_thread(server.stop)


async def mount(*args: str) -> None:
    await asyncio.to_thread(subprocess.run, ["mount", *args], check=True)


@pytest.mark.skipif(os.geteuid() != 0, reason="mounting a small tmpfs needs root")
async def test_storage_full_fails_with_storage_full_then_resumes_when_freed(
    stack: LocalStack, database_url: str, tmp_path: Path
) -> None:
    store = tmp_path / "small-store"
    store.mkdir()
    await mount("-t", "tmpfs", "-o", "size=64k", "tmpfs", str(store))
    try:
        filler = store / "filler"
        filler.write_bytes(b"\0" * 60 * 1024)
        _, _, generation = await one_gpu(stack, database_url, store)
        first = await create(generation.address, 1, steps=2)
        failed = await wait_until(generation.address, first, TERMINAL, 60)
        assert failed[first[0]].status == gen.GENERATION_STATUS_FAILED
        assert failed[first[0]].error.reason == "STORAGE_FULL"
        await wait_health(
            generation.address, health_pb2.HealthCheckResponse.NOT_SERVING, 10, DISPATCH
        )
        # Reads and creates still work meanwhile: the overall health stays up.
        assert await health(generation.address) == health_pb2.HealthCheckResponse.SERVING
        filler.unlink()
        await mount("-o", "remount,size=16m", str(store))
        await wait_health(generation.address, health_pb2.HealthCheckResponse.SERVING, 30, DISPATCH)
        later = await create(generation.address, 2, steps=2)
        await assert_all_completed_once(generation.address, later)
    finally:
        await asyncio.to_thread(stack.stop)
        await asyncio.to_thread(subprocess.run, ["umount", "-l", str(store)], check=False)
