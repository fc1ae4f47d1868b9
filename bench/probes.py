"""Small measurements behind BENCHMARKS.md's explanations, one per probe:

    python -m bench.probes rpc-idle       # a gRPC and a SQL round trip, back to back and idle
    python -m bench.probes create-depth   # PostgreSQL's cost of a create as the queue grows
    python -m bench.probes chunk-encode   # building and encoding a 1 MB image chunk message
    python -m bench.probes notify-cost    # what a NOTIFY adds to a write's commit
    python -m bench.probes notify-waits   # what PostgreSQL's backends wait on under throughput
    python -m bench.probes count-history  # counting by status as finished history piles up

They are not scenarios: no target, nothing written to latest.json.
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import statistics
import subprocess
import sys
import tempfile
import time
from collections.abc import Awaitable, Callable
from pathlib import Path

import asyncpg
from grpc_health.v1 import health_pb2, health_pb2_grpc

from bench import scenarios
from bench.results import Report
from bench.scenarios import Bench, postgres_cpu_s
from services.database import create_pool
from services.embedded_postgres import postgres_server
from services.generation.queue import Queue
from services.grpc_server import open_channel
from services.settings import QueueSettings

CALLS = 200
IDLE_S = 0.03


async def _p50_ms(call: Callable[[], Awaitable[object]], idle_s: float) -> float:
    spent = []
    for _ in range(CALLS):
        await asyncio.sleep(idle_s)
        started = time.perf_counter()
        await call()
        spent.append((time.perf_counter() - started) * 1000)
    return statistics.median(spent)


async def rpc_idle(server: str, work: Path) -> None:
    """An idle process wakes slowly: the same call back to back and 30 ms apart."""
    bench = Bench(server, True, work, Report(quick=True))
    async with bench.database() as dsn, bench.stack("probe") as stack:
        _, _, generation = await bench.single_gpu_stack(stack, dsn, step_seconds=0.0)
        conn = await asyncpg.connect(dsn)
        async with open_channel(generation.address) as channel:
            health = health_pb2_grpc.HealthStub(channel)
            calls = {
                "gRPC health check to GenerationService": lambda: health.Check(
                    health_pb2.HealthCheckRequest()
                ),
                "PostgreSQL SELECT 1": lambda: conn.fetchval("SELECT 1"),
            }
            for name, call in calls.items():
                together = await _p50_ms(call, 0.0)
                apart = await _p50_ms(call, IDLE_S)
                print(f"{name}: p50 {together:.2f} ms back to back, {apart:.2f} ms 30 ms apart")
        await conn.close()


async def create_depth(server: str, work: Path) -> None:
    """Queue.create with nothing taking work, per 1,012 queued: one at a time
    (each its own statement) and 32 at once (they share statements)."""
    bench = Bench(server, True, work, Report(quick=True))
    async with bench.database() as dsn:
        pool = await create_pool(dsn)
        # Past the default per-caller limit: the probe's one caller goes to 10,000+.
        queue = Queue(pool, QueueSettings(max_queued_per_principal=100_000), "probe")

        async def create() -> None:
            await queue.create(
                principal="probe",
                request_id=None,
                template="t",
                parameters={},
                graph="{}",
                checkpoint=None,
                priority=0,
                timeout_seconds=60,
                inputs=[],
            )

        for step in range(1, 11):  # 500 + 512 creates a step
            started = time.perf_counter()
            for _ in range(500):
                await create()
            alone = (time.perf_counter() - started) / 500 * 1000
            started = time.perf_counter()
            for _ in range(16):
                await asyncio.gather(*(create() for _ in range(32)))
            together = (time.perf_counter() - started) / 512 * 1000
            print(
                f"{step * 1012:6d} queued: {alone:.2f} ms per create one at a time,"
                f" {together:.2f} ms 32 at once"
            )
        await pool.close()


async def count_history(server: str, work: Path) -> None:
    """Queue.counts as the table fills with finished generations (rows as wide
    as a real one's: the template's graph is stored with each), beside the
    whole-table count it replaced; 300 unfinished rows throughout."""
    bench = Bench(server, True, work, Report(quick=True))
    async with bench.database() as dsn:
        pool = await create_pool(dsn)
        queue = Queue(pool, QueueSettings(), "probe")
        graph = (Path(__file__).parent.parent / "workflows" / "sd15-txt2img.json").read_text()
        await _add_rows(pool, 300, "QUEUED", "DISPATCHED", "RUNNING", graph=graph)
        calls: dict[str, Callable[[], Awaitable[object]]] = {
            "every row (before)": lambda: pool.fetch(
                "SELECT status, count(*) FROM generations GROUP BY 1"
            ),
            "GetStats": queue.counts,
            "queue-depth gauge": lambda: queue.counts(finished=False),
        }
        for finished in (20_000, 180_000):
            await _add_rows(pool, finished, "COMPLETED", "FAILED", "CANCELLED", graph=graph)
            await pool.execute("VACUUM ANALYZE generations")
            total = await pool.fetchval("SELECT count(*) FROM generations")
            for name, call in calls.items():
                print(f"{total:7d} rows, {name}: {await _p50_ms(call, 0):.2f} ms")
        await pool.close()


async def _add_rows(pool: asyncpg.Pool, n: int, *statuses: str, graph: str) -> None:
    await pool.execute(
        "INSERT INTO generations (id, principal, template, parameters, graph, timeout_seconds,"
        " claim_key, status, completed_at)"
        " SELECT gen_random_uuid(), 'probe', 't', '{}', $2, 60, i, ($3::text[])[1 + i % $4],"
        " CASE WHEN ($3::text[])[1] = 'COMPLETED' THEN now() END"
        " FROM generate_series(1, $1) i",
        n,
        graph,
        list(statuses),
        len(statuses),
    )


# The shape of the queue's fenced writes (queue.py): update one row, append its
# event, and (or not) notify its id and sequence; a listener is connected, as
# every replica's event hub is.
_NOTIFY_SCHEMA = """
CREATE TABLE probe_rows (id int PRIMARY KEY, graph text, seq bigint, value int);
CREATE TABLE probe_events (id int REFERENCES probe_rows, seq bigint, payload jsonb,
    PRIMARY KEY (id, seq));
"""
_NOTIFY_WRITE = """
WITH changed AS (UPDATE probe_rows SET seq = seq + 1, value = $2 WHERE id = $1 RETURNING *),
inserted AS (INSERT INTO probe_events SELECT id, seq, $3::jsonb FROM changed)
SELECT changed.seq{notify} FROM changed
"""
NOTIFY_WRITERS = 8
NOTIFY_WRITES = 3000


async def notify_cost(server: str, work: Path) -> None:
    """The same write from 8 connections at once, with and without its NOTIFY.
    PostgreSQL serializes the commits of notifying transactions on one lock,
    and its CPU is read from every postgres process on the machine."""
    bench = Bench(server, True, work, Report(quick=True))
    async with bench.database() as dsn:
        pool = await create_pool(dsn, min_size=NOTIFY_WRITERS, max_size=NOTIFY_WRITERS)
        listener = await asyncpg.connect(dsn)
        await listener.add_listener("probe", lambda *_: None)
        await pool.execute(_NOTIFY_SCHEMA)
        await pool.execute(
            "INSERT INTO probe_rows SELECT n, repeat('x', 2500), 0, 0"
            " FROM generate_series(1, $1) n",
            NOTIFY_WRITERS,
        )
        notify = ", pg_notify('probe', changed.id || ':' || changed.seq)"
        for _ in range(2):
            for label, sql in (("with NOTIFY", notify), ("without", "")):
                statement = _NOTIFY_WRITE.format(notify=sql)

                async def writer(row: int, statement: str = statement) -> None:
                    for n in range(NOTIFY_WRITES // NOTIFY_WRITERS):
                        await pool.fetchval(statement, row, n, '{"value": 1}')

                cpu, started = sum(postgres_cpu_s().values()), time.perf_counter()
                await asyncio.gather(*(writer(r) for r in range(1, NOTIFY_WRITERS + 1)))
                elapsed = time.perf_counter() - started
                spent = sum(postgres_cpu_s().values()) - cpu
                print(
                    f"{label:>11}: {NOTIFY_WRITES / elapsed:6.0f} writes/s,"
                    f" PostgreSQL CPU {spent / NOTIFY_WRITES * 1000:.3f} ms per write"
                )
        await listener.close()
        await pool.close()


# Active backends of the bench's databases and what each waits on, leaving
# out the pgqueuer yardstick's (it runs after ours, on the same server).
_WAITS = """
SELECT coalesce(wait_event_type || '/' || wait_event, 'on CPU') AS waiting,
    left(regexp_replace(query, '\\s+', ' ', 'g'), 48) AS statement
FROM pg_stat_activity
WHERE datname LIKE 'lockn_bench_%' AND state = 'active' AND pid <> pg_backend_pid()
  AND query NOT ILIKE '%pgqueuer%'
"""


async def notify_waits(server: str, work: Path) -> None:
    """The quick throughput scenario, sampling pg_stat_activity every 20 ms:
    on average how many backends were running each statement, and waiting on
    what. Lock/object is the lock notifying commits take one at a time."""
    bench = Bench(server, True, work, Report(quick=True))
    counts: dict[tuple[str, str], int] = {}
    samples = 0
    monitor = await asyncpg.connect(server)

    async def sample() -> None:
        nonlocal samples
        while True:
            for row in await monitor.fetch(_WAITS):
                key = (row["waiting"], row["statement"])
                counts[key] = counts.get(key, 0) + 1
            samples += 1
            await asyncio.sleep(0.02)

    sampling = asyncio.create_task(sample())
    try:
        await scenarios.throughput(bench)
    finally:
        sampling.cancel()
        with contextlib.suppress(asyncio.CancelledError):
            await sampling
        await monitor.close()
    print(f"{samples} samples; backends on average, by what they waited on:")
    for (waiting, statement), count in sorted(counts.items(), key=lambda kv: -kv[1])[:12]:
        print(f"  {count / samples:5.2f}  {waiting:<22} {statement}")


# Run in a process of its own, with and without the services' malloc tuning.
_ENCODE = """
import sys, timeit
from services import allocator
from services.contracts import worker
if sys.argv[1] == "tuned":
    allocator.reuse_large_blocks()
data = b"x" * (1 << 20)

def by_constructor():
    chunk = worker.OutputChunk(prompt_id="p", offset=0, data=data)
    return worker.ExecuteResponse(event=worker.ExecutionEvent(output=chunk)).SerializeToString()

def in_place():
    event = worker.ExecutionEvent()
    event.output.prompt_id = "p"
    event.output.data = data
    response = worker.ExecuteResponse()
    response.event.CopyFrom(event)
    return response.SerializeToString()

for f in (by_constructor, in_place):
    ms = timeit.timeit(f, number=200) / 200 * 1000
    print(f"  {f.__name__}: {ms:.2f} ms per 1 MB chunk message")
"""


def chunk_encode() -> None:
    for mode in ("default", "tuned"):
        print(f"glibc malloc {mode}:", flush=True)
        subprocess.run([sys.executable, "-c", _ENCODE, mode], check=True)


def main() -> None:
    parser = argparse.ArgumentParser(prog="python -m bench.probes")
    probes = {
        "rpc-idle": rpc_idle,
        "create-depth": create_depth,
        "notify-cost": notify_cost,
        "notify-waits": notify_waits,
        "count-history": count_history,
    }
    parser.add_argument("probe", choices=[*probes, "chunk-encode"])
    args = parser.parse_args()
    if args.probe == "chunk-encode":
        chunk_encode()
        return
    with postgres_server() as server, tempfile.TemporaryDirectory() as work:
        asyncio.run(probes[args.probe](server, Path(work)))


if __name__ == "__main__":
    main()
