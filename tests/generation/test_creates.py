"""Creates in batches (Queue.create_many, the statement concurrent creates
share): every row keeps the answers a create alone would give: its queue
position, its caller's limit, its request_id, its direct dispatch; and a row
PostgreSQL refuses fails alone."""

from __future__ import annotations

import asyncio
import uuid
from typing import Any

import asyncpg

from services.generation.queue import _CREATE, NewGeneration, Queue
from services.settings import QueueSettings
from tests.fixtures.generation import queue_create

SETTINGS = QueueSettings(max_queued_per_principal=5)


class CountingPool:
    """The pool, counting the rows of each `statement` (a create by default)
    sent through it."""

    def __init__(self, pool: asyncpg.Pool, statement: str = _CREATE) -> None:
        self.pool = pool
        self.statement = statement
        self.batches: list[int] = []

    async def fetch(self, sql: str, *args: Any) -> list[asyncpg.Record]:
        if sql == self.statement:
            self.batches.append(len(args[0]))
        rows: list[asyncpg.Record] = await self.pool.fetch(sql, *args)
        return rows

    def __getattr__(self, name: str) -> Any:
        return getattr(self.pool, name)


def new(principal: str = "alice", **values: Any) -> NewGeneration:
    fields: dict[str, Any] = {
        "id": uuid.uuid4(),
        "principal": principal,
        "request_id": None,
        "template": "sd15-txt2img",
        "parameters": "{}",
        "graph": "{}",
        "checkpoint": None,
        "priority": 0,
        "timeout_seconds": 60,
        "inputs": [],
        "direct_to": None,
        **values,
    }
    return NewGeneration(**fields)


async def test_a_batch_queues_its_rows_in_order_behind_those_already_queued(
    pool: asyncpg.Pool,
) -> None:
    queue = Queue(pool, SETTINGS, "replica-a")
    (first,) = await queue.create_many([new()])
    rows = await queue.create_many([new() for _ in range(3)])
    assert first is not None and first["queue_position"] == 1
    assert [r["queue_position"] for r in rows if r is not None] == [2, 3, 4]
    claimed = await queue.claim(4)
    assert [c["id"] for c in claimed] == [first["id"], *(r["id"] for r in rows if r)]
    events = await pool.fetchval("SELECT count(*) FROM generation_events WHERE type = 'CREATED'")
    assert events == 4


async def test_a_higher_priority_row_of_a_batch_goes_ahead_of_the_rest(
    pool: asyncpg.Pool,
) -> None:
    queue = Queue(pool, SETTINGS, "replica-a")
    await queue.create_many([new(), new()])
    low, high = await queue.create_many([new(), new(priority=10)])
    assert low is not None and high is not None
    assert (high["queue_position"], low["queue_position"]) == (1, 4)
    (claimed,) = await queue.claim(1)
    assert claimed["id"] == high["id"]


async def test_a_batch_admits_a_caller_up_to_the_limit_and_no_further(
    pool: asyncpg.Pool,
) -> None:
    queue = Queue(pool, SETTINGS, "replica-a")
    await queue.create_many([new() for _ in range(3)])
    rows = await queue.create_many([new(), new("bob"), new(), new(), new("bob")])
    admitted = [r is not None for r in rows]
    # Alice had 3 of her 5: two more fit, the third does not; bob has his own.
    assert admitted == [True, True, True, False, True]
    counts = dict(await pool.fetch("SELECT principal, count(*) FROM generations GROUP BY 1"))
    assert counts == {"alice": 5, "bob": 2}


async def test_one_request_id_twice_in_a_batch_makes_one_generation(pool: asyncpg.Pool) -> None:
    counting = CountingPool(pool)
    queue = Queue(counting, SETTINGS, "replica-a")
    created = await asyncio.gather(*(queue_create(queue, request_id="same") for _ in range(6)))
    assert counting.batches == [6]  # all six in one statement
    assert len({row["id"] for row, _, _ in created}) == 1
    assert sorted(was_created for _, was_created, _ in created) == [False] * 5 + [True]
    assert await pool.fetchval("SELECT count(*) FROM generations") == 1


async def test_a_row_postgresql_refuses_fails_its_own_create_only(pool: asyncpg.Pool) -> None:
    counting = CountingPool(pool)
    queue = Queue(counting, SETTINGS, "replica-a")
    # jsonb has no NUL character: PostgreSQL refuses that row, not its neighbours.
    prompts = ["fine", "\x00", "also fine"]
    results = await asyncio.gather(
        *(queue_create(queue, parameters={"prompt": p}) for p in prompts), return_exceptions=True
    )
    assert isinstance(results[1], asyncpg.UntranslatableCharacterError), results[1]
    assert not isinstance(results[0], BaseException) and not isinstance(results[2], BaseException)
    # Tried together first, then each alone.
    assert counting.batches == [3, 1, 1, 1]
    stored = await pool.fetch("SELECT parameters->>'prompt' AS p FROM generations ORDER BY 1")
    assert [r["p"] for r in stored] == ["also fine", "fine"]


async def test_only_rows_with_a_free_worker_and_nothing_waiting_ahead_dispatch_at_once(
    pool: asyncpg.Pool,
) -> None:
    queue = Queue(pool, SETTINGS, "replica-a")
    rows = await queue.create_many(
        [new(direct_to="gpu-1"), new(direct_to="gpu-2"), new(), new(direct_to="gpu-3")]
    )
    statuses = [(r["status"], r["worker"], r["queue_position"]) for r in rows if r is not None]
    # The fourth has a worker but the third, ahead of it, waits: it waits too.
    assert statuses == [
        ("DISPATCHED", "gpu-1", 0),
        ("DISPATCHED", "gpu-2", 0),
        ("QUEUED", None, 1),
        ("QUEUED", None, 2),
    ]
    dispatched = await pool.fetch(
        "SELECT generation_id FROM generation_events WHERE type = 'DISPATCHED'"
    )
    assert {d["generation_id"] for d in dispatched} == {rows[0]["id"], rows[1]["id"]}  # type: ignore[index]
    (late,) = await queue.create_many([new(direct_to="gpu-4")])
    assert late is not None and late["status"] == "QUEUED" and late["queue_position"] == 3


async def test_concurrent_creates_share_statements(pool: asyncpg.Pool) -> None:
    counting = CountingPool(pool)
    settings = SETTINGS.model_copy(update={"max_queued_per_principal": 100})
    queue = Queue(counting, settings, "replica-a")
    created = await asyncio.gather(*(queue_create(queue, parameters={"n": n}) for n in range(40)))
    assert sorted(position for _, _, position in created) == list(range(1, 41))
    assert sum(counting.batches) == 40 and len(counting.batches) < 40


async def test_the_create_statement_is_planned_once_not_on_every_create(
    database_url: str,
) -> None:
    # One connection, so every create runs the same prepared statement. With
    # the arrays as constants, PostgreSQL chose a fresh custom plan for each
    # create once the table had statistics.
    pool = await asyncpg.create_pool(database_url, min_size=1, max_size=1)
    plans = "SELECT generic_plans, custom_plans FROM pg_prepared_statements WHERE statement = $1"
    try:
        settings = SETTINGS.model_copy(update={"max_queued_per_principal": 1000})
        queue = Queue(pool, settings, "replica-a")
        for n in range(300):
            await queue.create_many([new(direct_to="gpu-1" if n % 2 else None)])
        await pool.execute("ANALYZE generations")
        generic_before, custom_before = await pool.fetchrow(plans, _CREATE)
        for _ in range(30):
            await queue.create_many([new(direct_to="gpu-1")])
        generic, custom = await pool.fetchrow(plans, _CREATE)
    finally:
        await pool.close()
    # New statistics invalidate the plan: a few custom plans before the choice again.
    assert custom - custom_before <= 5
    assert generic - generic_before >= 25
