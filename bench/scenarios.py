"""The benchmark scenarios of issue 7, each against real processes.

Every scenario starts its own stack (simulator, workers, GenerationService as
OS processes, so RSS and CPU are per service and nothing shares an event loop
with the load generator) on a fresh database, drives it over gRPC exactly as
a caller would, and reads the simulated GPU's timeline from the simulator
(`/_simulator/runs`: when each prompt was received, started and ended, on
time.monotonic(), which every process on the machine shares).
"""

from __future__ import annotations

import asyncio
import contextlib
import os
import statistics
import sys
import time
import uuid
from collections.abc import AsyncIterator, Awaitable, Callable, Iterable
from dataclasses import dataclass
from itertools import pairwise
from pathlib import Path
from typing import Any

import aiohttp
import asyncpg
import psutil

from bench.baseline import run_baseline
from bench.pgqueuer_reference import measure_pgqueuer
from bench.results import Report
from services.contracts import gen, gen_grpc
from services.database import migrate
from services.grpc_server import open_channel
from services.stack import LocalStack, Part

TERMINAL = {
    gen.GENERATION_STATUS_COMPLETED,
    gen.GENERATION_STATUS_FAILED,
    gen.GENERATION_STATUS_CANCELLED,
}
TEMPLATE = "sd15-txt2img"
# The smallest image the template allows (a ~12 KB PNG): jobs whose cost is
# the orchestration, not the picture. The image path is measured on its own.
SMALL = {"width": 64, "height": 64}
# A stopped stack drains for at most this long (the services' default is 10 s).
SHUTDOWN_GRACE = "1"


@dataclass
class Run:
    prompt_id: str
    received: float
    started: float
    ended: float


@dataclass
class Bench:
    server: str
    quick: bool
    workdir: Path
    report: Report

    @contextlib.asynccontextmanager
    async def database(self) -> AsyncIterator[str]:
        name = f"lockn_bench_{uuid.uuid4().hex[:10]}"
        admin = await asyncpg.connect(self.server)
        await admin.execute(f'CREATE DATABASE "{name}"')
        dsn = self.server.rpartition("/")[0] + f"/{name}"
        try:
            await migrate(dsn)
            yield dsn
        finally:
            await admin.execute(f'DROP DATABASE IF EXISTS "{name}" WITH (FORCE)')
            await admin.close()

    @contextlib.asynccontextmanager
    async def stack(self, name: str) -> AsyncIterator[LocalStack]:
        env = {**os.environ, "LOCKN_SHUTDOWN_GRACE_SECONDS": SHUTDOWN_GRACE}
        stack = LocalStack(self.workdir / name / "logs", base_env=env)
        try:
            yield stack
        finally:
            await asyncio.to_thread(stack.stop)

    async def single_gpu_stack(
        self, stack: LocalStack, dsn: str, step_seconds: float, **settings: str
    ) -> tuple[Part, Part, Part]:
        simulator = stack.start_simulator(step_seconds=step_seconds)
        # A worker started before its ComfyUI answers opens its websocket late.
        await stack.wait_serving(simulator)
        # GenerationService follows the worker's health: the two may start together.
        worker = stack.start_worker("worker", simulator.address)
        generation = self.start_generation(stack, dsn, [worker], **settings)
        await asyncio.gather(stack.wait_serving(worker), stack.wait_serving(generation))
        await workers_serving(generation, 1)
        return simulator, worker, generation

    async def gpus(
        self, stack: LocalStack, count: int, step_seconds: float
    ) -> tuple[list[Part], list[Part]]:
        """`count` simulators and a worker for each, started side by side."""
        simulators = [
            stack.start_simulator(step_seconds, name=f"simulator-{n}") for n in range(count)
        ]
        await asyncio.gather(*(stack.wait_serving(s) for s in simulators))
        workers = [stack.start_worker(f"worker-{n}", s.address) for n, s in enumerate(simulators)]
        await asyncio.gather(*(stack.wait_serving(w) for w in workers))
        return simulators, workers

    def start_generation(
        self, stack: LocalStack, dsn: str, workers: list[Part], **settings: str
    ) -> Part:
        return stack.start_generation(
            "generation",
            dsn,
            workers,
            LOCKN_COMFYUI__OUTPUT_PATH=str(self.workdir / "outputs"),
            **settings,
        )


def request(seed: int, steps: int, **extra: Any) -> Any:
    parameters = {
        "prompt": gen.ParameterValue(string_value="benchmark"),
        "seed": gen.ParameterValue(int_value=seed),
        "steps": gen.ParameterValue(int_value=steps),
    }
    for key, value in extra.items():
        parameters[key] = gen.ParameterValue(int_value=value)
    return gen.CreateGenerationRequest(template=TEMPLATE, parameters=parameters)


async def workers_serving(generation: Part, count: int, timeout: float = 30) -> None:
    """Until GenerationService sees `count` workers serving (it follows their health)."""
    deadline = time.monotonic() + timeout
    async with open_channel(generation.address) as channel:
        stub = gen_grpc.GenerationServiceStub(channel)
        while time.monotonic() < deadline:
            stats = await stub.GetStats(gen.GetStatsRequest(), timeout=10)
            if sum(w.serving for w in stats.workers) >= count:
                return
            await asyncio.sleep(0.05)
    raise TimeoutError(f"GenerationService does not see {count} workers serving")


async def wait_idle(stub: Any, timeout: float, interval: float = 0.05) -> None:
    """Until no generation is queued, dispatched or running."""
    deadline = time.monotonic() + timeout
    busy = {
        gen.GENERATION_STATUS_QUEUED,
        gen.GENERATION_STATUS_DISPATCHED,
        gen.GENERATION_STATUS_RUNNING,
    }
    while time.monotonic() < deadline:
        stats = await stub.GetStats(gen.GetStatsRequest(), timeout=10)
        if sum(c.count for c in stats.queue if c.status in busy) == 0:
            return
        await asyncio.sleep(interval)
    raise TimeoutError("generations still running")


async def count_by_status(stub: Any) -> dict[int, int]:
    stats = await stub.GetStats(gen.GetStatsRequest(), timeout=10)
    return {c.status: c.count for c in stats.queue}


async def simulator_runs(simulator: Part) -> list[Run]:
    """The simulated GPU's finished runs, in the order they started."""
    url = f"{simulator.address}/_simulator/runs"
    async with aiohttp.ClientSession() as session, session.get(url) as reply:
        body = await reply.json()
    runs = body["runs"] if isinstance(body, dict) else body
    return sorted(
        (
            Run(r["prompt_id"], r["received"], r["started"], r["ended"])
            for r in runs
            if r.get("ended") is not None
        ),
        key=lambda r: r.started,
    )


def percentile(values: Iterable[float], q: float) -> float:
    """Nearest-rank percentile; NaN (which the report refuses) when there are no values."""
    ordered = sorted(values)
    if not ordered:
        return float("nan")
    index = min(len(ordered) - 1, max(0, round(q / 100 * (len(ordered) - 1))))
    return ordered[index]


def gaps_ms(runs: list[Run]) -> list[float]:
    return [max(0.0, (b.started - a.ended) * 1000) for a, b in pairwise(runs)]


def utilisation(runs: list[Run]) -> float:
    busy = sum(r.ended - r.started for r in runs)
    return 100 * busy / (runs[-1].ended - runs[0].started)


def expect(condition: bool, message: str) -> None:
    """A figure from a run that went wrong is no figure: fail the scenario instead."""
    if not condition:
        raise RuntimeError(message)


# ----- 1. GPU idle gap, and the LOC-58 baseline -------------------------------------


async def idle_gap(bench: Bench) -> None:
    """One worker, 500 ms jobs, all created at once: the GPU's idle time between jobs."""
    jobs = 20 if bench.quick else 200
    async with bench.database() as dsn, bench.stack("idle_gap") as stack:
        # 10 steps of 50 ms: a 500 ms job (plus the simulator writing a 512x512 PNG).
        simulator, _, generation = await bench.single_gpu_stack(stack, dsn, step_seconds=0.05)
        async with open_channel(generation.address) as channel:
            stub = gen_grpc.GenerationServiceStub(channel)
            await asyncio.gather(
                *(stub.CreateGeneration(request(n, steps=10), timeout=30) for n in range(jobs))
            )
            await wait_idle(stub, timeout=jobs * 2 + 60)
            completed = (await count_by_status(stub)).get(gen.GENERATION_STATUS_COMPLETED, 0)
        runs = await simulator_runs(simulator)
    expect(completed == jobs and len(runs) == jobs, f"{completed}/{jobs} completed")
    gaps = gaps_ms(runs)
    job_ms = statistics.median((r.ended - r.started) * 1000 for r in runs)
    bench.report.add("idle_gap.median_ms", statistics.median(gaps), "ms", "<= 5")
    bench.report.add("idle_gap.p99_ms", percentile(gaps, 99), "ms")
    bench.report.add(
        "idle_gap.utilisation_pct",
        utilisation(runs),
        "%",
        note=f"{jobs} jobs of {job_ms:.0f} ms, created at once",
    )
    await baseline(bench, statistics.median(gaps))


async def baseline(bench: Bench, ours_median_ms: float) -> None:
    """The LOC-58 polling design on the same simulator settings."""
    jobs = 3 if bench.quick else 10
    async with bench.database() as dsn, bench.stack("baseline") as stack:
        simulator = stack.start_simulator(step_seconds=0.05)
        await stack.wait_serving(simulator)
        graph = _template_graph()
        out = bench.workdir / "baseline-outputs"
        out.mkdir(parents=True, exist_ok=True)
        await run_baseline(dsn, simulator.address, graph, jobs, out)
        runs = await simulator_runs(simulator)
    expect(len(runs) == jobs, f"the baseline ran {len(runs)}/{jobs} jobs")
    median = statistics.median(gaps_ms(runs))
    bench.report.add(
        "baseline.idle_gap_median_ms", median, "ms", note=f"LOC-58 design, {jobs} jobs"
    )
    bench.report.add("baseline.utilisation_pct", utilisation(runs), "%")
    bench.report.add(
        "baseline.ratio", median / max(ours_median_ms, 0.001), "x", note="baseline gap / ours"
    )


def _template_graph() -> dict[str, Any]:
    from services.generation.templates import TemplateLibrary

    library = TemplateLibrary.load(Path("workflows"))
    graph: dict[str, Any] = library.resolve(
        TEMPLATE, {"prompt": "benchmark", "steps": 10, "seed": 1}
    ).graph
    return graph


# ----- 2. Dispatch latency ---------------------------------------------------------------


async def dispatch_latency(bench: Bench) -> None:
    """Idle system: from CreateGeneration to ComfyUI receiving the prompt.

    Nobody watches the generation while it is dispatched (a Watch would add its
    own reads to the same moment); the bench polls for the end only after the
    prompt has had time to reach ComfyUI, then lets the system settle.
    """
    count = 60 if bench.quick else 500
    sent: dict[str, float] = {}
    create_ms: list[float] = []
    async with bench.database() as dsn, bench.stack("dispatch") as stack:
        simulator, _, generation = await bench.single_gpu_stack(stack, dsn, step_seconds=0.0)
        async with open_channel(generation.address) as channel:
            stub = gen_grpc.GenerationServiceStub(channel)
            for n in range(count):
                started = time.monotonic()
                reply = await stub.CreateGeneration(request(n, steps=1, **SMALL), timeout=30)
                create_ms.append((time.monotonic() - started) * 1000)
                final = await _poll_until_terminal(stub, reply.generation.id, first_wait=0.05)
                expect(
                    final.status == gen.GENERATION_STATUS_COMPLETED, f"generation {n} did not run"
                )
                sent[final.prompt_id] = started
                await asyncio.sleep(0.02)  # the dispatcher's claim after a completion
        runs = await simulator_runs(simulator)
    latencies = [
        (run.received - sent[run.prompt_id]) * 1000 for run in runs if run.prompt_id in sent
    ]
    expect(len(latencies) == count, f"{len(latencies)}/{count} prompts reached ComfyUI")
    bench.report.add("dispatch.p50_ms", percentile(latencies, 50), "ms", "<= 5")
    bench.report.add(
        "dispatch.p99_ms", percentile(latencies, 99), "ms", "<= 25", f"{count} generations"
    )
    bench.report.add(
        "dispatch.create_rpc_p50_ms",
        percentile(create_ms, 50),
        "ms",
        note="CreateGeneration alone, of the above",
    )


async def _poll_until_terminal(
    stub: Any, generation_id: str, first_wait: float, timeout: float = 60
) -> Any:
    await asyncio.sleep(first_wait)
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        reply = await stub.GetGeneration(gen.GetGenerationRequest(id=generation_id), timeout=10)
        if reply.generation.status in TERMINAL:
            return reply.generation
        await asyncio.sleep(0.01)
    raise TimeoutError(f"generation {generation_id} still running")


async def _until_terminal(stub: Any, generation_id: str) -> Any:
    call = stub.WatchGeneration(gen.WatchGenerationRequest(id=generation_id), timeout=60)
    async for item in call:
        current = item.snapshot if item.HasField("snapshot") else item.event
        if current.status in TERMINAL:
            call.cancel()
            return current
    return None


# ----- 3. Throughput, and pgqueuer as the yardstick ------------------------------------------


async def throughput(bench: Bench) -> None:
    """8 simulated GPUs, zero-time jobs, 64 concurrent callers; then pgqueuer, same PostgreSQL."""
    total = 500 if bench.quick else 10_000
    gpus, callers = 8, 64
    async with bench.database() as dsn, bench.stack("throughput") as stack:
        simulators, workers = await bench.gpus(stack, gpus, step_seconds=0.0)
        generation = bench.start_generation(stack, dsn, workers)
        await stack.wait_serving(generation)
        await workers_serving(generation, gpus)
        cpu = CpuMeter({p.name: p.process.pid for p in [generation, *workers, *simulators]})
        rss = RssSampler({p.name: p.process.pid for p in [generation, *workers]})
        async with open_channel(generation.address) as channel, rss:
            stub = gen_grpc.GenerationServiceStub(channel)
            numbers = iter(range(total))

            async def caller() -> None:
                for n in numbers:
                    await stub.CreateGeneration(request(n, steps=1, **SMALL), timeout=60)

            commits_before = await _commits(dsn)
            cpu.start()
            started_wall, started = time.time(), time.monotonic()
            async with asyncio.TaskGroup() as group:
                for _ in range(callers):
                    group.create_task(caller())
            created = time.monotonic() - started
            # Coarse polling: GetStats counts every finished row (from an index), load of its own.
            await wait_idle(stub, timeout=1800, interval=0.5)
            spent = cpu.stop()
            commits = await _commits(dsn) - commits_before
        connection = await asyncpg.connect(dsn)
        try:
            completed, last = await connection.fetchrow(
                "SELECT count(*), extract(epoch FROM max(completed_at))"
                " FROM generations WHERE status = 'COMPLETED'"
            )
        finally:
            await connection.close()
    expect(completed == total, f"{completed}/{total} completed")
    finished = float(last) - started_wall
    bench.report.add("throughput.created_per_s", total / created, "1/s", ">= 1000")
    bench.report.add(
        "throughput.completed_per_s",
        completed / finished,
        "1/s",
        note=f"{total} generations, {gpus} GPUs, {callers} callers",
    )
    together = f"all {gpus} together"
    parts = {
        "generation": (["generation"], ""),
        "worker": ([w.name for w in workers], together),
        "simulator": ([s.name for s in simulators], together),
        "postgres": (["postgres"], "every postgres process on the machine"),
    }
    for label, (names, note) in parts.items():
        bench.report.add(
            f"throughput.{label}_cpu_ms_per_job",
            1000 * sum(spent[n] for n in names) / total,
            "ms",
            note=note,
        )
    bench.report.add(
        "throughput.commits_per_job",
        commits / total,
        "1",
        note="PostgreSQL transactions committed in the database, per generation",
    )
    bench.report.add(
        "throughput.machine_cpu_pct",
        cpu.machine_busy_pct,
        "%",
        note=f"of {psutil.cpu_count()} cores, all processes",
    )
    bench.report.add("throughput.generation_peak_rss_mb", rss.peak_mb("generation"), "MB")
    bench.report.add(
        "throughput.worker_peak_rss_mb", max(rss.peak_mb(w.name) for w in workers), "MB"
    )
    async with bench.database() as dsn:
        reference = await measure_pgqueuer(dsn, total, callers)
    bench.report.add(
        "throughput.pgqueuer_completed_per_s",
        reference.completed_per_s,
        "1/s",
        note=f"{callers} callers enqueue while it runs; first enqueue to last completion",
    )
    bench.report.add(
        "throughput.pgqueuer_enqueued_per_s",
        reference.enqueued_per_s,
        "1/s",
        note=f"one job per call, {callers} callers",
    )
    bench.report.add(
        "throughput.pgqueuer_drained_per_s",
        reference.drained_per_s,
        "1/s",
        note="all enqueued first, then the drain alone",
    )
    bench.report.add(
        "throughput.vs_pgqueuer",
        (completed / finished) / reference.completed_per_s,
        "x",
        ">= 1.0",
        note="our completed/s over pgqueuer's, both from the first create to the last completion",
    )


async def _commits(dsn: str) -> int:
    """Transactions committed in this database so far (as the statistics collector
    has them: it reports a backend's counts at most every second)."""
    connection = await asyncpg.connect(dsn)
    try:
        await asyncio.sleep(1.1)
        count: int = await connection.fetchval(
            "SELECT xact_commit FROM pg_stat_database WHERE datname = current_database()"
        )
        return count
    finally:
        await connection.close()


# ----- 4. Status fan-out ----------------------------------------------------------------------


async def fanout(bench: Bench) -> None:
    """Many watchers of one generation: from each state change to its delivery to each.
    Then the same watchers of a bare grpc.aio server (bench/grpc_floor.py): the floor."""
    watchers = 250 if bench.quick else 1000
    async with bench.database() as dsn, bench.stack("fanout") as stack:
        # Progress every 100 ms: each event is one burst of `watchers` deliveries.
        # 30 steps, as a Stable Diffusion generation has (20-50): about 33
        # bursts, so the p99 rests on more than the few that start a run.
        _, _, generation = await bench.single_gpu_stack(stack, dsn, step_seconds=0.1)
        async with open_channel(generation.address) as channel:
            stub = gen_grpc.GenerationServiceStub(channel)
            # A long job in front holds the watched one until every watcher is in.
            blocker = (await stub.CreateGeneration(request(1, steps=150), timeout=30)).generation
            target = await stub.CreateGeneration(request(2, steps=30, **SMALL), timeout=30)

            async def unblock() -> None:
                await stub.CancelGeneration(gen.CancelGenerationRequest(id=blocker.id), timeout=10)

            ours = await _watch_burst(
                stub, target.generation.id, watchers, unblock, generation.process.pid
            )
    floor = await _grpc_floor(watchers, events=round(ours.events))
    expect(ours.events >= 3, f"{len(ours.latencies)} deliveries to {watchers} watchers")
    bench.report.add("fanout.p50_ms", percentile(ours.latencies, 50), "ms")
    bench.report.add(
        "fanout.p99_ms",
        percentile(ours.latencies, 99),
        "ms",
        "<= 50",
        f"{watchers} watchers x {ours.events:.0f} events",
    )
    bench.report.add(
        "fanout.server_cpu_us_per_delivery",
        ours.cpu_us_per_delivery,
        "us",
        note="GenerationService CPU from the first event to the last delivery",
    )
    bench.report.add(
        "fanout.grpc_floor_p99_ms",
        percentile(floor.latencies, 99),
        "ms",
        note="a bare grpc.aio server, same watchers and events (bench/grpc_floor.py)",
    )
    bench.report.add("fanout.grpc_floor_cpu_us_per_delivery", floor.cpu_us_per_delivery, "us")


@dataclass
class Burst:
    latencies: list[float]
    events: float
    cpu_us_per_delivery: float


async def _watch_burst(
    stub: Any,
    generation_id: str,
    watchers: int,
    trigger: Callable[[], Awaitable[None]],
    server_pid: int,
    events: int | None = None,
) -> Burst:
    """`watchers` streams of one generation; once each has its snapshot,
    `trigger` sets the events off. Each stream ends with the generation, or
    after `events` events. Events a stream replays on subscribing are history,
    not deliveries, and are not counted."""
    latencies: list[float] = []
    ready = asyncio.Semaphore(0)
    counted = asyncio.Event()  # the last expected delivery arrived

    async def watch() -> None:
        call = stub.WatchGeneration(gen.WatchGenerationRequest(id=generation_id), timeout=120)
        seen, count = 0, 0
        async for item in call:
            received = time.time()
            if item.HasField("snapshot"):
                seen = item.snapshot.last_event_sequence
                ready.release()
            elif item.event.sequence > seen:
                latencies.append((received - item.event.time.ToNanoseconds() / 1e9) * 1000)
                count += 1
                if count == events:
                    break
        if events is not None:
            # Cancelled only once every stream has its events: 1,000 cancels
            # amid the last burst would be measured as its deliveries.
            if len(latencies) == watchers * events:
                counted.set()
            await counted.wait()
            call.cancel()

    cpu = CpuMeter({"server": server_pid})
    async with asyncio.TaskGroup() as group:
        for _ in range(watchers):
            group.create_task(watch())
        for _ in range(watchers):
            await asyncio.wait_for(ready.acquire(), 60)
        await asyncio.sleep(0.5)  # each stream subscribes just after its snapshot
        cpu.start()
        await trigger()
        if events is not None:
            await asyncio.wait_for(counted.wait(), 60)
            spent = cpu.stop()["server"]  # before the cancels
    if events is None:
        spent = cpu.stop()["server"]  # the streams ended with the generation
    return Burst(latencies, len(latencies) / watchers, spent * 1e6 / max(1, len(latencies)))


async def _grpc_floor(watchers: int, events: int) -> Burst:
    process = await asyncio.create_subprocess_exec(
        sys.executable, "-m", "bench.grpc_floor", stdout=asyncio.subprocess.PIPE
    )
    try:
        assert process.stdout is not None
        port = int(await asyncio.wait_for(process.stdout.readline(), 30))
        async with open_channel(f"127.0.0.1:{port}") as channel:
            stub = gen_grpc.GenerationServiceStub(channel)

            async def publish() -> None:
                # The watched generation's pace: a change every 100 ms.
                for _ in range(events):
                    await stub.CancelGeneration(gen.CancelGenerationRequest(id="floor"))
                    await asyncio.sleep(0.1)

            return await _watch_burst(stub, "floor", watchers, publish, process.pid, events)
    finally:
        process.kill()
        await process.wait()


# ----- 5. Image path -----------------------------------------------------------------------


async def image_path(bench: Bench) -> None:
    """An ~8 MB PNG from the end of its run in ComfyUI to COMPLETED (fetched, streamed over
    gRPC, written and fsynced in the store, recorded), as the caller watching it sees it."""
    count = 3 if bench.quick else 5
    speeds: list[float] = []
    sizes: list[int] = []
    async with bench.database() as dsn, bench.stack("image") as stack:
        simulator, _, generation = await bench.single_gpu_stack(stack, dsn, step_seconds=0.0)
        async with open_channel(generation.address) as channel:
            stub = gen_grpc.GenerationServiceStub(channel)
            done: dict[str, float] = {}
            # Image -1 warms the path up and is not counted: a new gRPC channel
            # starts with 64 KB flow-control windows and grows them as data
            # flows, where a running service's channels are long warm.
            for n in range(-1, count):
                reply = await stub.CreateGeneration(
                    request(n + 1, steps=1, width=1664, height=1664), timeout=30
                )
                final = await _until_terminal(stub, reply.generation.id)
                finished = time.monotonic()
                expect(
                    final is not None and final.status == gen.GENERATION_STATUS_COMPLETED,
                    f"image {n} did not complete",
                )
                if n < 0:
                    continue
                got = await stub.GetGeneration(gen.GetGenerationRequest(id=reply.generation.id))
                done[got.generation.prompt_id] = finished
                sizes.append(sum(o.size_bytes for o in final.outputs))
        runs = {run.prompt_id: run for run in await simulator_runs(simulator)}
    for (prompt_id, finished), size in zip(done.items(), sizes, strict=True):
        speeds.append(size / 1e6 / (finished - runs[prompt_id].ended))
    bench.report.add(
        "image.mb_per_s",
        statistics.median(speeds),
        "MB/s",
        ">= 200",
        f"median of {count} images of {statistics.median(sizes) / 1e6:.1f} MB"
        f" ({min(speeds):.0f}-{max(speeds):.0f})",
    )


# ----- 6. Memory ---------------------------------------------------------------------------


async def memory(bench: Bench) -> None:
    """Peak RSS of GenerationService and ComfyWorker holding many queued generations."""
    total = 1000 if bench.quick else 10_000
    async with bench.database() as dsn, bench.stack("memory") as stack:
        # Long jobs: one runs, one waits in ComfyUI's queue, the rest stay queued.
        _, worker, generation = await bench.single_gpu_stack(stack, dsn, step_seconds=1.0)
        sampler = RssSampler({"generation": generation.process.pid, "worker": worker.process.pid})
        async with open_channel(generation.address) as channel, sampler:
            stub = gen_grpc.GenerationServiceStub(channel)
            numbers = iter(range(total))

            async def caller() -> None:
                for n in numbers:
                    await stub.CreateGeneration(request(n, steps=150), timeout=60)

            cpu = CpuMeter({"generation": generation.process.pid})
            cpu.start()
            started = time.monotonic()
            async with asyncio.TaskGroup() as group:
                for _ in range(64):
                    group.create_task(caller())
            created = time.monotonic() - started
            spent = cpu.stop()
            queued = (await count_by_status(stub)).get(gen.GENERATION_STATUS_QUEUED, 0)
            await stub.ListGenerations(gen.ListGenerationsRequest(page_size=500), timeout=30)
            await asyncio.sleep(2)
    expect(queued >= total - 2, f"only {queued} of {total} queued")
    note = f"{queued} queued"
    bench.report.add(
        "memory.generation_rss_mb", sampler.peak_mb("generation"), "MB", "<= 200", note
    )
    bench.report.add("memory.worker_rss_mb", sampler.peak_mb("worker"), "MB", "<= 200", note)
    bench.report.add(
        "memory.created_per_s",
        total / created,
        "1/s",
        note="64 callers creating into a queue nothing drains",
    )
    bench.report.add(
        "memory.generation_cpu_ms_per_create", 1000 * spent["generation"] / total, "ms"
    )


# ----- process meters -----------------------------------------------------------------------


class RssSampler:
    """Samples the resident set of some processes every 100 ms while in use."""

    def __init__(self, pids: dict[str, int]) -> None:
        self._processes = {name: psutil.Process(pid) for name, pid in pids.items()}
        self._peak = dict.fromkeys(pids, 0)
        self._task: asyncio.Task[None] | None = None

    async def __aenter__(self) -> RssSampler:
        self._task = asyncio.create_task(self._sample())
        return self

    async def __aexit__(self, *_: object) -> None:
        assert self._task is not None
        self._task.cancel()
        with contextlib.suppress(asyncio.CancelledError):
            await self._task
        self._read()

    async def _sample(self) -> None:
        while True:
            self._read()
            await asyncio.sleep(0.1)

    def _read(self) -> None:
        for name, process in self._processes.items():
            with contextlib.suppress(psutil.Error):
                self._peak[name] = max(self._peak[name], process.memory_info().rss)

    def peak_mb(self, name: str) -> float:
        return self._peak[name] / 2**20


def postgres_cpu_s() -> dict[int, float]:
    """CPU seconds of each PostgreSQL process on the machine, by pid."""
    spent = {}
    for process in psutil.process_iter(["name"]):
        if "postgres" in (process.info["name"] or ""):
            with contextlib.suppress(psutil.Error):
                times = process.cpu_times()
                spent[process.pid] = times.user + times.system
    return spent


class CpuMeter:
    """CPU seconds each process spent between start() and stop(), PostgreSQL's
    (every postgres process on the machine, as "postgres"), and the machine's load."""

    def __init__(self, pids: dict[str, int]) -> None:
        self._processes = {name: psutil.Process(pid) for name, pid in pids.items()}
        self._before: dict[str, float] = {}
        self._postgres: dict[int, float] = {}
        self._machine: Any = None
        self._wall = 0.0
        self.machine_busy_pct = 0.0

    def _now(self) -> dict[str, float]:
        spent = {}
        for name, process in self._processes.items():
            times = process.cpu_times()
            spent[name] = times.user + times.system
        return spent

    def start(self) -> None:
        self._before = self._now()
        self._postgres = postgres_cpu_s()
        self._machine = psutil.cpu_times()
        self._wall = time.monotonic()

    def stop(self) -> dict[str, float]:
        after = self._now()
        # A backend that exited meanwhile takes its CPU with it: a lower bound.
        postgres = sum(t - self._postgres.get(pid, 0.0) for pid, t in postgres_cpu_s().items())
        machine = psutil.cpu_times()
        wall = time.monotonic() - self._wall
        idle = (machine.idle + machine.iowait) - (self._machine.idle + self._machine.iowait)
        cores = psutil.cpu_count() or 1
        self.machine_busy_pct = 100 * (1 - idle / (wall * cores))
        return {name: after[name] - self._before[name] for name in after} | {"postgres": postgres}


SCENARIOS = {
    "idle_gap": idle_gap,
    "dispatch": dispatch_latency,
    "throughput": throughput,
    "fanout": fanout,
    "image": image_path,
    "memory": memory,
}
