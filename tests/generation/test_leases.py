"""Lease housekeeping on the queue table: fast takeover (a replica whose
database session died, so its liveness lock is free, loses its leases after two
missed heartbeats, not the whole lease; one alive, or only briefly away, keeps
its work), fencing of a stale replica's late writes, and pruning of finished
generations."""

from __future__ import annotations

import asyncio
import json

import asyncpg

from services.database import connect
from services.generation.queue import Fence, Queue
from services.settings import QueueSettings
from tests.fixtures.generation import queue_create

# Takeover by liveness once a lease has not been renewed for 2 x 1 s.
SETTINGS = QueueSettings(lease_seconds=10, heartbeat_seconds=1)


async def last_renewed(pool: asyncpg.Pool, seconds_ago: float) -> None:
    await pool.execute(
        "UPDATE generations SET lease_expires_at = now() + make_interval(secs => $1)",
        SETTINGS.lease_seconds - seconds_ago,
    )


async def test_a_dead_replicas_work_is_taken_over_before_its_lease_ends(
    pool: asyncpg.Pool, database_url: str
) -> None:
    a, b = Queue(pool, SETTINGS, "replica-a"), Queue(pool, SETTINGS, "replica-b")
    a_session = await connect(database_url)
    assert await a.hold_liveness(a_session)
    await queue_create(a, request_id="job")
    (claimed,) = await a.claim(1)

    await last_renewed(pool, seconds_ago=5)  # A stalled, but its session lives
    assert await b.take_over(1) == []

    await a_session.close()  # A's process died: PostgreSQL frees its lock at once
    (taken,) = await b.take_over(1)
    assert taken["id"] == claimed["id"]
    assert taken["lease_owner"] == "replica-b" and taken["attempts"] == 2
    events = await pool.fetch(
        "SELECT type FROM generation_events WHERE generation_id = $1 ORDER BY seq", taken["id"]
    )
    assert events[-1]["type"] == "TAKEN_OVER"


async def test_a_replica_that_renews_keeps_its_work_without_a_session(
    pool: asyncpg.Pool,
) -> None:
    # Its liveness session is gone (a database restart), but it still renews.
    a, b = Queue(pool, SETTINGS, "replica-a"), Queue(pool, SETTINGS, "replica-b")
    await queue_create(a, request_id="job")
    await a.claim(1)
    await last_renewed(pool, seconds_ago=1)
    assert await b.take_over(1) == []
    await last_renewed(pool, seconds_ago=3)
    assert len(await b.take_over(1)) == 1


async def test_a_live_lock_is_not_enough_once_the_lease_has_expired(
    pool: asyncpg.Pool, database_url: str
) -> None:
    # A process that holds its session but stopped renewing (hung) still loses
    # its work when the lease runs out.
    a, b = Queue(pool, SETTINGS, "replica-a"), Queue(pool, SETTINGS, "replica-b")
    a_session = await connect(database_url)
    try:
        assert await a.hold_liveness(a_session)
        await queue_create(a, request_id="job")
        await a.claim(1)
        await last_renewed(pool, seconds_ago=SETTINGS.lease_seconds + 1)
        assert len(await b.take_over(1)) == 1
    finally:
        await a_session.close()


async def test_prune_removes_finished_generations_past_retention_only(
    pool: asyncpg.Pool,
) -> None:
    queue = Queue(pool, SETTINGS, "replica-a")
    for name in ("old", "recent", "waiting"):
        await queue_create(queue, request_id=name)
    for row in await queue.claim(2):
        outputs = [{"index": 0, "path": f"/store/{row['request_id']}.png"}]
        await queue.completed(Fence(row["id"], row["attempts"], queue.owner), outputs)
    await pool.execute(
        "UPDATE generations SET completed_at = now() - interval '2 hours' WHERE request_id = 'old'"
    )

    removed = await queue.prune(retention_hours=1)

    assert removed == ["/store/old.png"]  # the dispatcher deletes these files
    left = await pool.fetch("SELECT request_id FROM generations ORDER BY request_id")
    assert [r["request_id"] for r in left] == ["recent", "waiting"]
    orphans = await pool.fetchval(
        "SELECT count(*) FROM generation_events e"
        " WHERE NOT EXISTS (SELECT 1 FROM generations g WHERE g.id = e.generation_id)"
    )
    assert orphans == 0


async def test_progress_events_of_long_finished_generations_go_first(
    pool: asyncpg.Pool,
) -> None:
    queue = Queue(pool, SETTINGS, "replica-a")
    await queue_create(queue, request_id="done")
    (row,) = await queue.claim(1)
    fence = Fence(row["id"], row["attempts"], queue.owner)
    for step in (1, 2):
        await queue.progress(fence, step, 2, "3")
    await queue.completed(fence, [])
    kinds = "SELECT type FROM generation_events ORDER BY seq"
    assert [r["type"] for r in await pool.fetch(kinds)].count("PROGRESS") == 2

    await queue.prune(retention_hours=24)  # finished just now: all kept
    assert [r["type"] for r in await pool.fetch(kinds)].count("PROGRESS") == 2

    await pool.execute("UPDATE generations SET completed_at = now() - interval '2 hours'")
    await queue.prune(retention_hours=24)
    assert [r["type"] for r in await pool.fetch(kinds)] == ["CREATED", "COMPLETED"]


async def test_a_heartbeat_renews_around_a_row_being_written_instead_of_waiting(
    pool: asyncpg.Pool, database_url: str
) -> None:
    a = Queue(pool, SETTINGS, "replica-a")
    for name in ("busy", "free"):
        await queue_create(a, request_id=name)
    busy, free = await a.claim(2)
    await last_renewed(pool, seconds_ago=5)
    writer = await connect(database_url)
    try:
        async with writer.transaction():  # another write of A's, in flight
            await writer.execute("SELECT 1 FROM generations WHERE id = $1 FOR UPDATE", busy["id"])
            # Waiting here is how the heartbeat deadlocked with batched writes.
            held = await asyncio.wait_for(a.heartbeat([busy["id"], free["id"]]), 5)
    finally:
        await writer.close()

    assert held == {busy["id"], free["id"]}
    left = dict(
        await pool.fetch("SELECT id, extract(epoch FROM lease_expires_at - now()) FROM generations")
    )
    assert left[free["id"]] > SETTINGS.lease_seconds - 1
    assert left[busy["id"]] < SETTINGS.lease_seconds - 4  # renewed by the next heartbeat


async def test_a_stale_replicas_late_writes_are_fenced_off(
    pool: asyncpg.Pool,
) -> None:
    a, b = Queue(pool, SETTINGS, "replica-a"), Queue(pool, SETTINGS, "replica-b")
    await queue_create(a, request_id="job")
    (claimed,) = await a.claim(1)
    stale = Fence(claimed["id"], claimed["attempts"], a.owner)
    await a.started(stale)
    await last_renewed(pool, seconds_ago=SETTINGS.lease_seconds + 1)  # A presumed dead
    (taken,) = await b.take_over(1)
    events_before = await pool.fetchval("SELECT count(*) FROM generation_events")

    # A was only slow: its completion, progress and failure arrive late.
    assert await a.completed(stale, [{"index": 0, "path": "/store/stale.png"}]) is None
    assert await a.progress(stale, 5, 10, "3") is None
    assert await a.failed(stale, "EXECUTION_ERROR", "late", {}) is None
    assert await a.heartbeat([claimed["id"]]) == set()

    row = await pool.fetchrow("SELECT * FROM generations WHERE id = $1", claimed["id"])
    assert row["status"] == "RUNNING" and row["lease_owner"] == "replica-b"
    assert json.loads(row["outputs"]) == []
    assert await pool.fetchval("SELECT count(*) FROM generation_events") == events_before
    # The owner's writes still land.
    fresh = Fence(taken["id"], taken["attempts"], b.owner)
    completed = await b.completed(fresh, [])
    assert completed is not None and completed["status"] == "COMPLETED"
