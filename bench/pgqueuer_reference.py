"""A bare queue library on the same PostgreSQL, as the yardstick for throughput.

pgqueuer with its defaults processes no-op jobs: whatever LockN Gen achieves
end to end (two gRPC hops, a websocket, the image store) is compared with
what a queue that does nothing else achieves on this machine.

It is timed twice. First in the throughput scenario's own shape: its callers
enqueue one job per call while a QueueManager already runs, and completed/s
is the jobs over the time from the first enqueue to the last completion, the
definition LockN Gen's `throughput.completed_per_s` has. Then the jobs are
enqueued first and only the drain is timed, which is the most a consumer of
a full queue can do.
"""

from __future__ import annotations

import asyncio
import contextlib
import time
from collections.abc import AsyncIterator
from dataclasses import dataclass
from datetime import timedelta

import asyncpg
from pgqueuer import QueueManager
from pgqueuer.db import AsyncpgDriver, AsyncpgPoolDriver
from pgqueuer.models import Job
from pgqueuer.queries import Queries
from pgqueuer.types import QueueExecutionMode

DEQUEUE_TIMEOUT = timedelta(seconds=0.5)
RUN_AT_MOST_S = 600.0


@dataclass
class QueueFigures:
    jobs: int
    enqueued_per_s: float
    completed_per_s: float
    drained_per_s: float


async def measure_pgqueuer(dsn: str, jobs: int, callers: int) -> QueueFigures:
    """`jobs` enqueued by `callers` at once, one job per call, each way."""
    async with _installed(dsn) as pool:
        enqueued_per_s, completed_per_s = await _while_running(dsn, pool, jobs, callers)
        drained_per_s = await _drain(dsn, pool, jobs, callers)
    return QueueFigures(jobs, enqueued_per_s, completed_per_s, drained_per_s)


@contextlib.asynccontextmanager
async def _installed(dsn: str) -> AsyncIterator[asyncpg.Pool]:
    pool = await asyncpg.create_pool(dsn, min_size=2, max_size=20)
    try:
        await Queries(AsyncpgPoolDriver(pool)).install()
        yield pool
    finally:
        await pool.close()


class _Counting:
    """A QueueManager on its own connection whose no-op jobs count themselves,
    stopping once `jobs` ran; `finished` is when the last one did."""

    def __init__(self, connection: asyncpg.Connection, jobs: int) -> None:
        self.manager = QueueManager(Queries(AsyncpgDriver(connection)))
        self.jobs = jobs
        self.done = 0
        self.finished = 0.0

        @self.manager.entrypoint("noop")
        async def noop(job: Job) -> None:
            self.done += 1
            if self.done == self.jobs:
                self.finished = time.perf_counter()
                self.manager.shutdown.set()

    def per_second(self, since: float) -> float:
        if self.done < self.jobs:
            raise RuntimeError(f"pgqueuer ran {self.done} of {self.jobs} jobs")
        return self.jobs / (self.finished - since)

    async def run(self, mode: QueueExecutionMode) -> None:
        await asyncio.wait_for(
            self.manager.run(mode=mode, dequeue_timeout=DEQUEUE_TIMEOUT), RUN_AT_MOST_S
        )


async def _enqueue(pool: asyncpg.Pool, jobs: int, callers: int) -> float:
    """Enqueue one job per call from `callers` concurrent callers; the seconds it took."""
    queries = Queries(AsyncpgPoolDriver(pool))
    numbers = iter(range(jobs))

    async def caller() -> None:
        for n in numbers:
            await queries.enqueue("noop", str(n).encode())

    started = time.perf_counter()
    async with asyncio.TaskGroup() as group:
        for _ in range(callers):
            group.create_task(caller())
    return time.perf_counter() - started


async def _while_running(
    dsn: str, pool: asyncpg.Pool, jobs: int, callers: int
) -> tuple[float, float]:
    """(enqueued/s, completed/s from the first enqueue to the last completion)."""
    connection = await asyncpg.connect(dsn)
    try:
        consumer = _Counting(connection, jobs)
        running = asyncio.create_task(consumer.run(QueueExecutionMode.continuous))
        await asyncio.sleep(0.5)  # the manager listening and polling, as our services are
        started = time.perf_counter()
        enqueuing = await _enqueue(pool, jobs, callers)
        await running
        return jobs / enqueuing, consumer.per_second(started)
    finally:
        await connection.close()


async def _drain(dsn: str, pool: asyncpg.Pool, jobs: int, callers: int) -> float:
    """Jobs/s of a QueueManager draining a queue that holds them all already."""
    await _enqueue(pool, jobs, callers)
    connection = await asyncpg.connect(dsn)
    try:
        consumer = _Counting(connection, jobs)
        started = time.perf_counter()
        await consumer.run(QueueExecutionMode.drain)
        return consumer.per_second(started)
    finally:
        await connection.close()
