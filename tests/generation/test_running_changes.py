"""The running jobs' STARTED, PROGRESS and COMPLETED writes: several jobs'
changes that arrive together share one statement, and each row still gets
exactly what its own write would give it (its columns, its event, its
fence); a row whose fence no longer holds changes nothing, alone or in a
batch."""

from __future__ import annotations

import asyncio
import json

import asyncpg

from services.comfy_worker.executor import prompt_id_for
from services.generation.queue import _RUNNING_CHANGES, Fence, Queue
from services.settings import QueueSettings
from tests.fixtures.generation import queue_create
from tests.generation.test_creates import CountingPool


async def claimed(queue: Queue, count: int) -> list[Fence]:
    for _ in range(count):
        await queue_create(queue)
    return [Fence(r["id"], r["attempts"], queue.owner) for r in await queue.claim(count)]


async def events_of(pool: asyncpg.Pool, fence: Fence) -> list[tuple[str, object]]:
    rows = await pool.fetch(
        "SELECT type, payload FROM generation_events WHERE generation_id = $1 ORDER BY seq",
        fence.id,
    )
    return [(r["type"], json.loads(r["payload"])) for r in rows]


async def test_changes_arriving_together_share_a_statement(pool: asyncpg.Pool) -> None:
    counting = CountingPool(pool, _RUNNING_CHANGES)
    queue = Queue(counting, QueueSettings(), "replica-a")
    fences = await claimed(queue, 6)

    rows = await asyncio.gather(*(queue.started(f) for f in fences))

    assert [r["id"] for r in rows if r is not None] == [f.id for f in fences]
    assert all(r is not None and r["status"] == "RUNNING" for r in rows)
    assert sum(counting.batches) == 6 and len(counting.batches) < 6
    for fence in fences:
        assert (await events_of(pool, fence))[-1] == ("STARTED", {})


async def test_each_kind_in_a_batch_sets_its_own_columns_and_event(pool: asyncpg.Pool) -> None:
    counting = CountingPool(pool, _RUNNING_CHANGES)
    queue = Queue(counting, QueueSettings(), "replica-a")
    starting, stepping, ending = await claimed(queue, 3)
    outputs = [{"index": 0, "path": "/out/x.png", "content_type": "image/png", "size_bytes": 3}]
    await asyncio.gather(queue.started(stepping), queue.started(ending))

    started, stepped, ended = await asyncio.gather(
        queue.started(starting),
        queue.progress(stepping, 3, 20, "3"),
        queue.completed(ending, outputs),
    )

    assert counting.batches[-1] == 3
    assert started is not None and stepped is not None and ended is not None
    assert (stepped["status"], stepped["progress_value"], stepped["progress_max"]) == (
        "RUNNING",
        3,
        20,
    )
    assert stepped["progress_node"] == "3" and stepped["completed_at"] is None
    assert ended["status"] == "COMPLETED" and json.loads(ended["outputs"]) == outputs
    assert ended["lease_owner"] is None and ended["lease_expires_at"] is None
    assert ended["completed_at"] is not None and ended["duration_ms"] >= 0
    assert ended["progress_value"] is None and ended["started_at"] is not None
    assert (await events_of(pool, stepping))[-1] == (
        "PROGRESS",
        {"value": 3, "max": 20, "node": "3"},
    )
    assert (await events_of(pool, ending))[-1] == ("COMPLETED", {"outputs": outputs})
    assert started["status"] == "RUNNING" and started["started_at"] is not None
    assert started["progress_value"] is None
    assert (await events_of(pool, starting))[-1] == ("STARTED", {})


async def test_a_dispatch_chosen_after_the_claim_shares_the_batch_and_starts_nothing(
    pool: asyncpg.Pool,
) -> None:
    counting = CountingPool(pool, _RUNNING_CHANGES)
    queue = Queue(counting, QueueSettings(), "replica-a")
    choosing, running = await claimed(queue, 2)
    await queue.started(running)

    dispatched, stepped = await asyncio.gather(
        queue.dispatched(choosing, "gpu1", "prompt-1"), queue.progress(running, 1, 2, "3")
    )

    assert counting.batches[-1] == 2
    assert dispatched is not None and stepped is not None
    assert (dispatched["status"], dispatched["worker"], dispatched["prompt_id"]) == (
        "DISPATCHED",
        "gpu1",
        "prompt-1",
    )
    assert dispatched["started_at"] is None and dispatched["progress_value"] is None
    assert dispatched["lease_owner"] == "replica-a" and dispatched["last_event_seq"] == 2
    assert (await events_of(pool, choosing))[-1] == (
        "DISPATCHED",
        {"worker": "gpu1", "prompt_id": "prompt-1"},
    )
    # Another kind keeps what the claim and the create gave the row.
    assert stepped["worker"] is None and stepped["prompt_id"] == prompt_id_for(str(running.id))


async def test_a_stale_fence_in_a_batch_changes_nothing_of_its_own(
    pool: asyncpg.Pool,
) -> None:
    counting = CountingPool(pool, _RUNNING_CHANGES)
    queue = Queue(counting, QueueSettings(), "replica-a")
    fences = await claimed(queue, 4)
    stale = Fence(fences[3].id, fences[3].attempt + 1, queue.owner)  # a later attempt's

    rows = await asyncio.gather(*(queue.started(f) for f in [*fences[:3], stale]))

    assert [r is not None for r in rows] == [True, True, True, False]
    row = await pool.fetchrow("SELECT * FROM generations WHERE id = $1", stale.id)
    assert row["status"] == "DISPATCHED" and row["last_event_seq"] == 1
    assert [kind for kind, _ in await events_of(pool, stale)] == ["CREATED"]


async def test_an_earlier_attempt_beside_the_current_one_gets_nothing(pool: asyncpg.Pool) -> None:
    queue = Queue(pool, QueueSettings(), "replica-a")
    (current,) = await claimed(queue, 1)
    earlier = Fence(current.id, current.attempt - 1, queue.owner)  # its lease was taken over

    late, now = await asyncio.gather(queue.progress(earlier, 1, 2, "3"), queue.started(current))

    assert late is None and now is not None and now["status"] == "RUNNING"
    assert [kind for kind, _ in await events_of(pool, current)] == ["CREATED", "STARTED"]
