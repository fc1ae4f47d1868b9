"""Failover, cancel and load figures (issue 8): measured over repeated faults on
real processes, with the same no-loss, no-rerun checks as the fault suite.

- failover: SIGKILL the replica that holds running work, again and again; the
  time from each kill to every held generation being taken over (its lease
  re-owned, the ComfyUI prompt re-attached), and how many were lost or ran twice.
- cancel: CancelGeneration on a running generation to the simulated GPU
  stopping it (the interrupt reaching ComfyUI).
- long_transaction: dispatch throughput while another client keeps a
  transaction open (holding back vacuum's horizon), against normal.
- soak: continuous creates, watches and cancels from many clients; memory,
  file descriptors and database connections sampled throughout.
"""

from __future__ import annotations

import asyncio
import contextlib
import random
import statistics
import time
from collections.abc import AsyncIterator
from datetime import UTC, datetime
from typing import Any

import asyncpg
import psutil

from bench.scenarios import (
    TERMINAL,
    Bench,
    percentile,
    request,
    simulator_runs,
    wait_idle,
)
from services.contracts import gen, gen_grpc
from services.grpc_server import open_channel
from services.stack import LocalStack, Part

FAST_LEASES = {"LOCKN_QUEUE__LEASE_SECONDS": "15", "LOCKN_QUEUE__HEARTBEAT_SECONDS": "3"}


@contextlib.asynccontextmanager
async def stub_for(part: Part) -> AsyncIterator[Any]:
    async with open_channel(part.address) as channel:
        yield gen_grpc.GenerationServiceStub(channel)


async def held(dsn: str, owner: str | None = None) -> list[Any]:
    """(id, lease_owner) of the generations on a GPU, optionally one replica's."""
    connection = await asyncpg.connect(dsn)
    try:
        rows = await connection.fetch(
            "SELECT id, lease_owner FROM generations WHERE status IN ('DISPATCHED', 'RUNNING')"
            " AND ($1::text IS NULL OR lease_owner = $1)",
            owner,
        )
    finally:
        await connection.close()
    return list(rows)


async def takeover_times(
    dsn: str, ids: list[Any], killed_at: datetime, timeout: float
) -> list[float]:
    """Seconds from the kill to each generation's TAKEN_OVER event (or its end)."""
    connection = await asyncpg.connect(dsn)
    deadline = time.monotonic() + timeout
    try:
        while True:
            rows = await connection.fetch(
                """
                SELECT generation_id, min(created_at) AS at FROM generation_events
                WHERE generation_id = ANY($1::uuid[]) AND created_at >= $2
                  AND type IN ('TAKEN_OVER', 'COMPLETED', 'FAILED', 'CANCELLED')
                GROUP BY generation_id
                """,
                ids,
                killed_at,
            )
            if len(rows) == len(ids) or time.monotonic() > deadline:
                return [(row["at"] - killed_at).total_seconds() for row in rows]
            await asyncio.sleep(0.05)
    finally:
        await connection.close()


async def outcome_counts(dsn: str) -> dict[str, int]:
    """Generations not terminal (lost) and COMPLETED events beyond one (duplicated)."""
    connection = await asyncpg.connect(dsn)
    try:
        lost = await connection.fetchval(
            "SELECT count(*) FROM generations"
            " WHERE status NOT IN ('COMPLETED', 'FAILED', 'CANCELLED')"
        )
        duplicated = await connection.fetchval(
            "SELECT coalesce(sum(n - 1), 0) FROM (SELECT count(*) AS n FROM generation_events"
            " WHERE type = 'COMPLETED' GROUP BY generation_id) c"
        )
        failed = await connection.fetchval("SELECT count(*) FROM generations WHERE status='FAILED'")
    finally:
        await connection.close()
    return {"lost": int(lost), "duplicated": int(duplicated), "failed": int(failed)}


async def failover(bench: Bench) -> None:
    rounds = 1 if bench.quick else 8
    async with bench.database() as dsn, bench.stack("failover") as stack:
        simulator = stack.start_simulator(step_seconds=0.05)
        await stack.wait_serving(simulator)
        worker = stack.start_worker(
            "worker", simulator.address, LOCKN_COMFYUI__MAX_CONCURRENT_GENERATIONS="2"
        )
        await stack.wait_serving(worker)
        outputs = str(bench.workdir / "outputs")

        async def replica(name: str) -> Part:
            part = stack.start_generation(
                name, dsn, [worker], LOCKN_COMFYUI__OUTPUT_PATH=outputs, **FAST_LEASES
            )
            await stack.wait_serving(part)
            return part

        active = await replica("replica-0")
        times: list[float] = []
        for n in range(rounds):
            async with stub_for(active) as stub:
                await asyncio.gather(
                    *(stub.CreateGeneration(request(n * 10 + k, steps=60)) for k in range(4))
                )
            await asyncio.sleep(1.0)  # let the active replica dispatch and start them
            # Before the standby starts, everything on the GPU is the active one's.
            (owner,) = {row["lease_owner"] for row in await held(dsn)}
            standby = await replica(f"replica-{n + 1}")
            ids = [row["id"] for row in await held(dsn, owner)]
            killed_at = datetime.now(UTC)
            stack.kill(active.name)
            times += await takeover_times(dsn, ids, killed_at, timeout=60)
            active = standby
        async with stub_for(active) as stub:
            await wait_idle(stub, timeout=180)
        counts = await outcome_counts(dsn)
        runs = await simulator_runs(simulator)
    prompts = [run.prompt_id for run in runs]
    reruns = len(prompts) - len(set(prompts))
    bench.report.add("failover.p50_s", statistics.median(times), "s")
    bench.report.add(
        "failover.p99_s",
        percentile(times, 99),
        "s",
        "<= 15",
        note=f"{len(times)} generations held over {rounds} replica kills",
    )
    bench.report.add("failover.lost", counts["lost"], "", "0")
    bench.report.add("failover.duplicated", counts["duplicated"] + reruns, "", "0")


async def cancel(bench: Bench) -> None:
    count = 3 if bench.quick else 30
    async with bench.database() as dsn, bench.stack("cancel") as stack:
        simulator, _, generation = await bench.single_gpu_stack(stack, dsn, step_seconds=0.05)
        cancelled_at: dict[str, float] = {}
        async with stub_for(generation) as stub:
            for n in range(count):
                created = (await stub.CreateGeneration(request(n, steps=150))).generation
                watch = stub.WatchGeneration(gen.WatchGenerationRequest(id=created.id))
                async for item in watch:
                    if item.HasField("event") and item.event.type == gen.EVENT_TYPE_STARTED:
                        break
                watch.cancel()
                cancelled_at[created.id] = time.monotonic()
                await stub.CancelGeneration(gen.CancelGenerationRequest(id=created.id))
                await wait_idle(stub, timeout=30)
                reply = await stub.GetGeneration(gen.GetGenerationRequest(id=created.id))
                assert reply.generation.status == gen.GENERATION_STATUS_CANCELLED
                cancelled_at[reply.generation.prompt_id] = cancelled_at.pop(created.id)
        runs = {run.prompt_id: run for run in await simulator_runs(simulator)}
    latencies = [(runs[p].ended - at) * 1000 for p, at in cancelled_at.items()]
    bench.report.add("cancel.p50_ms", statistics.median(latencies), "ms")
    bench.report.add(
        "cancel.p99_ms",
        percentile(latencies, 99),
        "ms",
        "<= 1000",
        note=f"{count} running generations; CancelGeneration to the GPU stopping",
    )


async def _throughput(bench: Bench, stack: LocalStack, dsn: str, jobs: int) -> float:
    _, workers = await bench.gpus(stack, 2, step_seconds=0.0)
    generation = bench.start_generation(stack, dsn, workers)
    await stack.wait_serving(generation)
    async with stub_for(generation) as stub:
        await asyncio.gather(*(stub.CreateGeneration(request(n, steps=1)) for n in range(jobs)))
        started = time.monotonic()
        await wait_idle(stub, timeout=600)
        return jobs / (time.monotonic() - started)


async def long_transaction(bench: Bench) -> None:
    jobs = 150 if bench.quick else 600
    async with bench.database() as dsn, bench.stack("normal") as stack:
        normal = await _throughput(bench, stack, dsn, jobs)
    async with bench.database() as dsn, bench.stack("held") as stack:
        holder = await asyncpg.connect(dsn)
        try:
            # An analyst's forgotten session: a snapshot held open the whole run.
            await holder.execute("BEGIN ISOLATION LEVEL REPEATABLE READ")
            await holder.fetchval("SELECT count(*) FROM generations")
            held = await _throughput(bench, stack, dsn, jobs)
        finally:
            await holder.close()
    bench.report.add("long_transaction.normal_per_s", normal, "/s", note=f"{jobs} jobs, 2 GPUs")
    bench.report.add("long_transaction.held_per_s", held, "/s")
    bench.report.add("long_transaction.ratio_pct", 100 * held / normal, "%", ">= 80")


async def soak(bench: Bench) -> None:
    seconds = 30 if bench.quick else 180
    clients = 16
    async with bench.database() as dsn, bench.stack("soak") as stack:
        _, worker, generation = await bench.single_gpu_stack(stack, dsn, step_seconds=0.002)
        processes = {
            "generation": psutil.Process(generation.process.pid),
            "worker": psutil.Process(worker.process.pid),
        }
        admin = await asyncpg.connect(dsn)
        samples: list[dict[str, float]] = []
        created: list[str] = []
        stop_at = time.monotonic() + seconds

        async def sample() -> None:
            row: dict[str, float] = {
                "connections": await admin.fetchval(
                    "SELECT count(*) FROM pg_stat_activity WHERE datname = current_database()"
                )
            }
            for name, process in processes.items():
                tree = [process, *process.children(recursive=True)]
                row[f"{name}_rss_mb"] = sum(p.memory_info().rss for p in tree) / 2**20
                row[f"{name}_fds"] = sum(p.num_fds() for p in tree)
            samples.append(row)

        async def client(seed: int) -> None:
            rng = random.Random(seed)
            async with stub_for(generation) as stub:
                while time.monotonic() < stop_at:
                    reply = await stub.CreateGeneration(request(rng.randrange(2**31), steps=5))
                    created.append(reply.generation.id)
                    action = rng.random()
                    if action < 0.5:
                        watch = stub.WatchGeneration(
                            gen.WatchGenerationRequest(id=reply.generation.id)
                        )
                        async for item in watch:
                            if item.HasField("event") and item.event.status in TERMINAL:
                                break
                    elif action < 0.7:
                        await asyncio.sleep(rng.random() * 0.05)
                        await stub.CancelGeneration(
                            gen.CancelGenerationRequest(id=reply.generation.id)
                        )
                    else:
                        await asyncio.sleep(0.05)

        async def sampler() -> None:
            while time.monotonic() < stop_at:
                await sample()
                await asyncio.sleep(max(1.0, seconds / 30))

        try:
            await asyncio.gather(sampler(), *(client(n) for n in range(clients)))
            async with stub_for(generation) as stub:
                await wait_idle(stub, timeout=300)
            await sample()
        finally:
            await admin.close()
        counts = await outcome_counts(dsn)
    # The first samples include warm-up (pools filling): compare the middle to the end.
    settled = samples[len(samples) // 4]
    final = samples[-1]
    for key in ("generation_rss_mb", "worker_rss_mb"):
        bench.report.add(f"soak.{key}_growth", final[key] - settled[key], "MB", "~0")
    for key in ("generation_fds", "worker_fds", "connections"):
        bench.report.add(
            f"soak.{key}", final[key], "", note=f"peak {max(s[key] for s in samples):.0f}"
        )
    bench.report.add(
        "soak.generations",
        len(created),
        "",
        note=f"{seconds} s, {clients} clients; lost {counts['lost']}, "
        f"duplicated {counts['duplicated']}",
    )
    bench.report.add("soak.lost", counts["lost"], "", "0")


# Too short to mean anything in a quick run: a few seconds of soak, or a
# throughput ratio over a few dozen jobs, is noise.
FULL_RUN_ONLY = {"long_transaction", "soak"}
SCENARIOS = {
    "failover": failover,
    "cancel": cancel,
    "long_transaction": long_transaction,
    "soak": soak,
}
