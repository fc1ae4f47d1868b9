"""Counts by status (GetStats, the queue-depth gauge): right for every status,
and each part of the statement answerable from an index, so that neither
grows with the finished history the table keeps."""

from __future__ import annotations

import asyncpg

from services.generation import queue as queue_module
from services.generation.queue import Queue
from services.settings import QueueSettings
from tests.fixtures.generation import queue_create

SPREAD = {"QUEUED": 3, "DISPATCHED": 1, "RUNNING": 2, "COMPLETED": 4, "FAILED": 1}


async def _spread(pool: asyncpg.Pool, queue: Queue) -> None:
    """SPREAD's rows, written straight into their statuses: what is under
    test is the counting, not how rows get there."""
    for status, n in SPREAD.items():
        for _ in range(n):
            row, _, _ = await queue_create(queue)
            await pool.execute(
                "UPDATE generations SET status = $2,"
                " completed_at = CASE WHEN $2 IN ('COMPLETED', 'FAILED') THEN now() END"
                " WHERE id = $1",
                row["id"],
                status,
            )


async def test_counts_every_status_there_is_and_leaves_out_the_rest(pool: asyncpg.Pool) -> None:
    queue = Queue(pool, QueueSettings(), "replica-a")
    assert await queue.counts() == {}
    await _spread(pool, queue)

    assert await queue.counts() == SPREAD
    assert await queue.counts(finished=False) == {"QUEUED": 3, "DISPATCHED": 1, "RUNNING": 2}


async def test_each_count_can_be_answered_without_reading_the_whole_table(
    pool: asyncpg.Pool,
) -> None:
    statement = queue_module._COUNTS + queue_module._FINISHED_COUNTS
    async with pool.acquire() as connection:
        # With sequential scans priced out, a part no index can answer
        # still gets one: the plan would say so.
        async with connection.transaction():
            await connection.execute("SET LOCAL enable_seqscan = off")
            plan = "\n".join(r[0] for r in await connection.fetch("EXPLAIN " + statement))
    assert "Seq Scan" not in plan, plan
    assert plan.count("Index Only Scan using generations_queued") == 1, plan
    assert "generations_finished" in plan, plan
