"""The batched writes and the claims keep one generic plan: PostgreSQL
plans a prepared statement anew each time while its custom plans look
cheaper than the generic one, and for these statements planning cost about
as much as running them, or more. Arrays read through a MATERIALIZED CTE,
and a claim's limit written into its text, cost the same either way."""

from __future__ import annotations

import uuid

import asyncpg

from services.database import create_pool
from services.generation.queue import Fence, Queue, RunningChange
from services.settings import QueueSettings
from tests.generation.test_creates import new

# PostgreSQL tries five custom plans before it weighs the generic one.
RUNS = 10
# Batches of a few rows, as under load (a single row planned generically anyway).
ROWS = 3


async def plans_of(pool: asyncpg.Pool, marker: str) -> tuple[int, int]:
    """(generic, custom) plans of the connection's prepared statement containing `marker`."""
    row = await pool.fetchrow(
        "SELECT generic_plans, custom_plans FROM pg_prepared_statements"
        " WHERE strpos(statement, $1) > 0",
        marker,
    )
    assert row is not None, f"no prepared statement contains {marker!r}"
    return row["generic_plans"], row["custom_plans"]


async def test_creates_running_changes_and_claims_are_not_planned_every_time(
    database_url: str,
) -> None:
    # One connection: prepared statements and their counts are per connection.
    pool = await create_pool(database_url, min_size=1, max_size=1)
    try:
        queue = Queue(pool, QueueSettings(), "replica-a")
        # Plans are costed against the table: a near-empty one makes every plan cheap.
        await pool.execute(
            "INSERT INTO generations (id, principal, template, parameters, graph,"
            " timeout_seconds, status, lease_owner, attempts)"
            " SELECT gen_random_uuid(), 'alice', 't', '{}', '{}', 60,"
            " (ARRAY['RUNNING', 'QUEUED'])[1 + i % 2], 'replica-a', 1"
            " FROM generate_series(1, 6000) i"
        )
        await pool.execute("ANALYZE generations")
        for n in range(RUNS):
            await queue.create_many([new() for _ in range(ROWS)])
            # Fenced off (no such rows): it changes nothing, but is planned the same.
            await queue.running_many([progress(n) for _ in range(ROWS)])
            assert len(await queue.claim(2)) == 2

        # _CREATE, _RUNNING_CHANGES, _CLAIM
        for marker in ("input_ids", "b(id, attempt, owner", "ORDER BY claim_key LIMIT"):
            generic, custom = await plans_of(pool, marker)
            assert generic + custom == RUNS
            assert custom <= 5 and generic >= RUNS - 5, (marker, generic, custom)
    finally:
        await pool.close()


def progress(value: int) -> RunningChange:
    return RunningChange(
        Fence(uuid.uuid4(), 1, "replica-a"), "PROGRESS", "{}", value=value, top=RUNS, node="3"
    )
