"""A bare queue library on the same PostgreSQL, as the yardstick for throughput.

pgqueuer with its defaults processes no-op jobs: whatever LockN Gen achieves
end to end (two gRPC hops, a websocket, the image store) is compared with
what a queue that does nothing else achieves on this machine.
"""

from __future__ import annotations

import asyncio
import time
from dataclasses import dataclass
from datetime import timedelta

import asyncpg
from pgqueuer import QueueManager
from pgqueuer.db import AsyncpgDriver
from pgqueuer.models import Job
from pgqueuer.queries import Queries
from pgqueuer.types import QueueExecutionMode


@dataclass
class QueueFigures:
    jobs: int
    enqueued_per_s: float
    completed_per_s: float


async def measure_pgqueuer(dsn: str, jobs: int) -> QueueFigures:
    conn = await asyncpg.connect(dsn)
    try:
        driver = AsyncpgDriver(conn)
        queries = Queries(driver)
        await queries.install()
        started = time.perf_counter()
        # One job per call, as callers create generations one at a time.
        for n in range(jobs):
            await queries.enqueue("noop", str(n).encode())
        enqueued = time.perf_counter() - started
        manager = QueueManager(queries)
        done = 0

        @manager.entrypoint("noop")
        async def noop(job: Job) -> None:
            nonlocal done
            done += 1

        started = time.perf_counter()
        await asyncio.wait_for(
            manager.run(mode=QueueExecutionMode.drain, dequeue_timeout=timedelta(seconds=0.5)),
            timeout=600,
        )
        ran = time.perf_counter() - started
        return QueueFigures(jobs, jobs / enqueued, done / ran)
    finally:
        await conn.close()
