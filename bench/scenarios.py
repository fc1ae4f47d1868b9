"""The benchmark scenarios of issue 7, each against real processes.

Every scenario starts its own stack (simulator, workers, GenerationService as
OS processes, so RSS is per service and nothing shares an event loop with the
load generator) on a fresh database, drives it over gRPC exactly as a caller
would, and reads the simulated GPU's timeline from the simulator.
"""

from __future__ import annotations

import asyncio
import contextlib
import statistics
import time
import uuid
from collections.abc import AsyncIterator, Iterable
from dataclasses import dataclass
from datetime import UTC, datetime
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
        stack = LocalStack(self.workdir / name / "logs")
        try:
            yield stack
        finally:
            await asyncio.to_thread(stack.stop)

    async def single_gpu_stack(
        self, stack: LocalStack, dsn: str, step_seconds: float, **settings: str
    ) -> tuple[Part, Part, Part]:
        simulator = stack.start_simulator(step_seconds=step_seconds)
        await stack.wait_serving(simulator)
        worker = stack.start_worker("worker", simulator.address)
        await stack.wait_serving(worker)
        generation = stack.start_generation(
            "generation",
            dsn,
            [worker],
            LOCKN_COMFYUI__OUTPUT_PATH=str(self.workdir / "outputs"),
            **settings,
        )
        await stack.wait_serving(generation)
        return simulator, worker, generation


def request(seed: int, steps: int, **extra: Any) -> Any:
    parameters = {
        "prompt": gen.ParameterValue(string_value="benchmark"),
        "seed": gen.ParameterValue(int_value=seed),
        "steps": gen.ParameterValue(int_value=steps),
    }
    for key, value in extra.items():
        parameters[key] = gen.ParameterValue(int_value=value)
    return gen.CreateGenerationRequest(template=TEMPLATE, parameters=parameters)


async def wait_idle(stub: Any, timeout: float) -> None:
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
        await asyncio.sleep(0.05)
    raise TimeoutError("generations still running")


async def count_by_status(stub: Any) -> dict[int, int]:
    stats = await stub.GetStats(gen.GetStatsRequest(), timeout=10)
    return {c.status: c.count for c in stats.queue}


async def simulator_runs(simulator: Part) -> list[Run]:
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


async def idle_gap(bench: Bench) -> None:
    """One worker, 500 ms jobs, all created at once: the GPU's idle time between jobs."""
    jobs = 40 if bench.quick else 200
    async with bench.database() as dsn, bench.stack("idle_gap") as stack:
        simulator, _, generation = await bench.single_gpu_stack(stack, dsn, step_seconds=0.05)
        async with open_channel(generation.address) as channel:
            stub = gen_grpc.GenerationServiceStub(channel)
            await asyncio.gather(
                *(stub.CreateGeneration(request(n, steps=10), timeout=30) for n in range(jobs))
            )
            await wait_idle(stub, timeout=jobs * 2 + 60)
        runs = await simulator_runs(simulator)
    gaps = gaps_ms(runs)
    bench.report.add("idle_gap.median_ms", statistics.median(gaps), "ms", "<= 5")
    bench.report.add("idle_gap.p99_ms", percentile(gaps, 99), "ms")
    bench.report.add("idle_gap.utilisation_pct", utilisation(runs), "%", note=f"{len(runs)} jobs")
    await baseline(bench, statistics.median(gaps))


async def baseline(bench: Bench, ours_median_ms: float) -> None:
    """The LOC-58 polling design on the same simulator settings."""
    jobs = 4 if bench.quick else 10
    async with bench.database() as dsn, bench.stack("baseline") as stack:
        simulator = stack.start_simulator(step_seconds=0.05)
        await stack.wait_serving(simulator)
        graph = await _template_graph()
        out = bench.workdir / "baseline-outputs"
        out.mkdir(parents=True, exist_ok=True)
        await run_baseline(dsn, simulator.address, graph, jobs, out)
        runs = await simulator_runs(simulator)
    median = statistics.median(gaps_ms(runs))
    bench.report.add(
        "baseline.idle_gap_median_ms", median, "ms", note=f"LOC-58 design, {jobs} jobs"
    )
    bench.report.add(
        "baseline.ratio", median / max(ours_median_ms, 0.001), "x", note="baseline / ours"
    )


async def _template_graph() -> dict[str, Any]:
    from services.generation.templates import TemplateLibrary

    library = TemplateLibrary.load(Path("workflows"))
    return library.resolve(TEMPLATE, {"prompt": "benchmark", "steps": 10, "seed": 1}).graph


async def dispatch_latency(bench: Bench) -> None:
    """Idle system: from CreateGeneration to ComfyUI receiving the prompt."""
    count = 100 if bench.quick else 500
    sent: dict[str, float] = {}
    async with bench.database() as dsn, bench.stack("dispatch") as stack:
        simulator, _, generation = await bench.single_gpu_stack(stack, dsn, step_seconds=0.0)
        async with open_channel(generation.address) as channel:
            stub = gen_grpc.GenerationServiceStub(channel)
            for n in range(count):
                started = time.monotonic()
                reply = await stub.CreateGeneration(request(n, steps=1), timeout=30)
                sent[reply.generation.id] = started
                await _until_terminal(stub, reply.generation.id)
            prompt_of = {}
            for generation_id in sent:
                got = await stub.GetGeneration(gen.GetGenerationRequest(id=generation_id))
                prompt_of[got.generation.prompt_id] = generation_id
        runs = await simulator_runs(simulator)
    latencies = [
        (run.received - sent[prompt_of[run.prompt_id]]) * 1000
        for run in runs
        if run.prompt_id in prompt_of
    ]
    bench.report.add("dispatch.p50_ms", percentile(latencies, 50), "ms", "<= 5")
    bench.report.add(
        "dispatch.p99_ms", percentile(latencies, 99), "ms", "<= 25", f"{len(latencies)} samples"
    )


async def _until_terminal(stub: Any, generation_id: str) -> Any:
    call = stub.WatchGeneration(gen.WatchGenerationRequest(id=generation_id), timeout=60)
    async for item in call:
        current = item.snapshot if item.HasField("snapshot") else item.event
        if current.status in TERMINAL:
            call.cancel()
            return current
    return None


async def throughput(bench: Bench) -> None:
    """8 simulated GPUs, zero-time jobs, many concurrent callers; and pgqueuer for scale."""
    total = 1000 if bench.quick else 10_000
    gpus, callers = 8, 64
    async with bench.database() as dsn, bench.stack("throughput") as stack:
        workers = []
        for n in range(gpus):
            simulator = stack.start_simulator(step_seconds=0.0)
            stack.parts[f"simulator-{n}"] = stack.parts.pop("simulator")
            simulator.name = f"simulator-{n}"
            await stack.wait_serving(simulator)
            workers.append(stack.start_worker(f"worker-{n}", simulator.address))
        for worker in workers:
            await stack.wait_serving(worker)
        generation = stack.start_generation(
            "generation", dsn, workers, LOCKN_COMFYUI__OUTPUT_PATH=str(bench.workdir / "outputs")
        )
        await stack.wait_serving(generation)
        sampler = RssSampler({p.name: p.process.pid for p in [generation, *workers]})
        async with open_channel(generation.address) as channel, sampler:
            stub = gen_grpc.GenerationServiceStub(channel)
            queue: asyncio.Queue[int] = asyncio.Queue()
            for n in range(total):
                queue.put_nowait(n)

            async def caller() -> None:
                while not queue.empty():
                    n = queue.get_nowait()
                    await stub.CreateGeneration(request(n, steps=1), timeout=60)

            started = time.monotonic()
            async with asyncio.TaskGroup() as group:
                for _ in range(callers):
                    group.create_task(caller())
            created = time.monotonic() - started
            await wait_idle(stub, timeout=1800)
            finished = time.monotonic() - started
            statuses = await count_by_status(stub)
    completed = statuses.get(gen.GENERATION_STATUS_COMPLETED, 0)
    bench.report.add("throughput.created_per_s", total / created, "1/s", ">= 1000")
    bench.report.add(
        "throughput.completed_per_s",
        completed / finished,
        "1/s",
        note=f"{completed}/{total} completed",
    )
    bench.report.add(
        "memory.worker_rss_mb", max(sampler.peak_mb(w.name) for w in workers), "MB", "<= 200"
    )
    async with bench.database() as dsn:
        reference = await measure_pgqueuer(dsn, total)
    bench.report.add("throughput.pgqueuer_completed_per_s", reference.completed_per_s, "1/s")
    bench.report.add("throughput.pgqueuer_enqueued_per_s", reference.enqueued_per_s, "1/s")
    bench.report.add(
        "throughput.vs_pgqueuer", (completed / finished) / reference.completed_per_s, "x", ">= 1.0"
    )


async def fanout(bench: Bench) -> None:
    """Many watchers of one generation: from an event's creation to its delivery."""
    watchers = 200 if bench.quick else 1000
    latencies: list[float] = []
    async with bench.database() as dsn, bench.stack("fanout") as stack:
        _, _, generation = await bench.single_gpu_stack(stack, dsn, step_seconds=0.02)
        async with open_channel(generation.address) as channel:
            stub = gen_grpc.GenerationServiceStub(channel)
            # A long job in front keeps the watched one waiting while watchers subscribe.
            await stub.CreateGeneration(request(1, steps=150), timeout=30)
            target = (await stub.CreateGeneration(request(2, steps=20), timeout=30)).generation.id
            ready = asyncio.Semaphore(0)

            async def watch() -> None:
                call = stub.WatchGeneration(gen.WatchGenerationRequest(id=target), timeout=120)
                async for item in call:
                    if item.HasField("snapshot"):
                        ready.release()
                        continue
                    received = datetime.now(UTC)
                    sent = item.event.time.ToDatetime(tzinfo=UTC)
                    latencies.append((received - sent).total_seconds() * 1000)

            async with asyncio.TaskGroup() as group:
                for _ in range(watchers):
                    group.create_task(watch())
                for _ in range(watchers):
                    await asyncio.wait_for(ready.acquire(), 60)
    bench.report.add("fanout.p50_ms", percentile(latencies, 50), "ms")
    bench.report.add(
        "fanout.p99_ms", percentile(latencies, 99), "ms", "<= 50", f"{watchers} watchers"
    )


async def image_path(bench: Bench) -> None:
    """An ~8 MB image from ComfyUI's /view to the store."""
    async with bench.database() as dsn, bench.stack("image") as stack:
        simulator, _, generation = await bench.single_gpu_stack(stack, dsn, step_seconds=0.0)
        async with open_channel(generation.address) as channel:
            stub = gen_grpc.GenerationServiceStub(channel)
            reply = await stub.CreateGeneration(
                request(3, steps=1, width=1664, height=1664), timeout=30
            )
            final = await _until_terminal(stub, reply.generation.id)
            done = time.monotonic()
        runs = await simulator_runs(simulator)
    size = sum(o.size_bytes for o in final.outputs) if final is not None else 0
    seconds = done - runs[-1].ended
    bench.report.add(
        "image.mb_per_s", size / 1e6 / seconds, "MB/s", ">= 200", f"{size / 1e6:.1f} MB"
    )


async def memory(bench: Bench) -> None:
    """GenerationService RSS holding many queued generations (no worker takes them)."""
    total = 2000 if bench.quick else 10_000
    async with bench.database() as dsn, bench.stack("memory") as stack:
        absent = Part("absent-worker", None, "127.0.0.1:9")  # type: ignore[arg-type]
        generation = stack.start_generation("generation", dsn, [absent])
        await stack.wait_serving(generation)
        sampler = RssSampler({"generation": generation.process.pid})
        async with open_channel(generation.address) as channel, sampler:
            stub = gen_grpc.GenerationServiceStub(channel)
            for start in range(0, total, 500):
                await asyncio.gather(
                    *(
                        stub.CreateGeneration(request(n, steps=1), timeout=60)
                        for n in range(start, min(total, start + 500))
                    )
                )
            await asyncio.sleep(2)
    bench.report.add(
        "memory.generation_rss_mb", sampler.peak_mb("generation"), "MB", "<= 200", f"{total} queued"
    )


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

    async def _sample(self) -> None:
        while True:
            for name, process in self._processes.items():
                with contextlib.suppress(psutil.Error):
                    self._peak[name] = max(self._peak[name], process.memory_info().rss)
            await asyncio.sleep(0.1)

    def peak_mb(self, name: str) -> float:
        return self._peak[name] / 2**20


SCENARIOS = {
    "idle_gap": idle_gap,
    "dispatch": dispatch_latency,
    "throughput": throughput,
    "fanout": fanout,
    "image": image_path,
    "memory": memory,
}
