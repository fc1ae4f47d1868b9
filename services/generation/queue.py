"""The queue in PostgreSQL: every state change of a generation, as SQL.

- Create inserts the row, its first event, its inputs and a NOTIFY in one
  statement; when a worker is free and nothing waits ahead, the same
  statement dispatches it.
- Claims take queued rows with FOR UPDATE SKIP LOCKED in claim_key order
  (priority with aging) and lease them to this replica; a claim for the only
  worker with free slots dispatches them to it as well.
- Every later write is fenced: it names the attempt (the fencing token) and
  the lease owner, and changes nothing when another replica took over.
  Concurrent creates share statements, and so do running jobs' STARTED,
  PROGRESS and COMPLETED writes (batching.py).
- Each change bumps last_event_seq, stores the event and NOTIFYs its id and
  sequence in the same statement; the row is the truth, the notification only
  a wake-up.
"""

from __future__ import annotations

import json
import uuid
from collections.abc import Sequence
from dataclasses import dataclass
from datetime import datetime
from typing import Any

import asyncpg
from asyncpg import Record

from services.comfy_worker.executor import prompt_id_for
from services.errors import AlreadyExists, NotFound, Reason, ResourceExhausted
from services.generation.batching import Batcher
from services.settings import QueueSettings

QUEUED_CHANNEL = "lockn_queued"
EVENTS_CHANNEL = "lockn_events"
TERMINAL = ("COMPLETED", "FAILED", "CANCELLED")
ACTIVE = ("DISPATCHED", "RUNNING")


# Appends an event to the rows `changed` returns (id, last_event_seq, status,
# principal) and notifies; $E1 = event type, $E2 = payload.
_EVENT_TAIL = """
, inserted AS (
    INSERT INTO generation_events (generation_id, seq, type, status, payload)
    SELECT id, last_event_seq, {type}, status, {payload}::jsonb FROM changed
)
SELECT changed.*, pg_notify('{channel}',
    changed.id::text || ':' || changed.last_event_seq || ':' || changed.principal)
FROM changed
"""


def _with_event(changed_sql: str, type_param: str, payload_param: str, inputs: str = "") -> str:
    """`inputs`: CTEs that `changed_sql` reads from, before it."""
    tail = _EVENT_TAIL.format(type=type_param, payload=payload_param, channel=EVENTS_CHANNEL)
    return f"WITH {inputs + ', ' if inputs else ''}changed AS ({changed_sql})" + tail


# Create a batch of generations in one statement, one round trip (see
# batching.py): the callers' limits, the rows, their events, their input
# images, the notifications and each row's queue position. The two counts of
# the queue are made once per caller and once per priority in the batch, in
# the snapshot the insert sees, and rows of one batch are ranked among
# themselves. A row left out (its caller's limit reached, its request_id
# taken) comes back with no result; `create` then finds out which.
# A row given a free worker ($10, a slot kept for it) with nothing queued
# ahead, in the table or in the batch, is dispatched right here (DISPATCHED,
# leased to $14, attempt 1, with its DISPATCHED event), which saves the claim
# and the dispatch write after it. Every row keeps the prompt_id its prompt
# will have in ComfyUI ($11, derived from its id), so that a claim can
# dispatch it to a worker in one statement too.
# $1..$11 one array per column, $12 aging, $13 the callers' limit, $14 owner,
# $15 lease seconds, $16..$18 input images (generation id, name, data), $19
# the requests' digests (what each request_id stands for).
# The arrays are read through a MATERIALIZED CTE so that no estimate depends
# on their contents. Given as constants, they let the planner size each unnest
# exactly and cost a custom plan below the generic one, and PostgreSQL then
# planned this statement anew on every create (0.6 ms by EXPLAIN ANALYZE,
# more than running it). Read this way, the generic plan costs the same as a
# custom one, and PostgreSQL keeps it.
_CREATE = f"""
WITH arrays AS MATERIALIZED (
    SELECT $1::uuid[] AS ids, $2::text[] AS principals, $3::text[] AS request_ids,
        $4::text[] AS templates, $5::text[] AS parameters, $6::text[] AS graphs,
        $7::text[] AS checkpoints, $8::int[] AS priorities, $9::int[] AS timeouts,
        $10::text[] AS workers, $11::text[] AS prompt_ids,
        $16::uuid[] AS input_ids, $17::text[] AS input_names, $18::bytea[] AS input_data,
        $19::bytea[] AS digests
), place AS (
    SELECT extract(epoch FROM clock_timestamp()) AS now_s
), batch AS (
    -- Arrival order within the batch: a microsecond apart, which a double
    -- of epoch seconds still tells apart.
    SELECT b.*, place.now_s - b.priority * $12::float8 + b.ord * 1e-6 AS claim_key
    FROM place, arrays, unnest(arrays.ids, arrays.principals, arrays.request_ids,
            arrays.templates, arrays.parameters, arrays.graphs, arrays.checkpoints,
            arrays.priorities, arrays.timeouts, arrays.workers, arrays.prompt_ids,
            arrays.digests)
        WITH ORDINALITY AS b(id, principal, request_id, template, parameters, graph,
            checkpoint, priority, timeout_seconds, worker, prompt_id, request_digest, ord)
    WHERE NOT EXISTS (SELECT 1 FROM generations g
                      WHERE g.principal = b.principal AND g.request_id = b.request_id)
), callers AS MATERIALIZED (
    -- MATERIALIZED, here and in levels: inlined, the count ran once per row.
    SELECT c.principal, (SELECT count(*) FROM generations g
                         WHERE g.principal = c.principal AND g.status = 'QUEUED') AS queued
    FROM (SELECT DISTINCT principal FROM batch) c
), allowed AS (
    SELECT * FROM (
        SELECT batch.*, callers.queued
            + row_number() OVER (PARTITION BY batch.principal ORDER BY batch.ord) AS nth
        FROM batch JOIN callers USING (principal)
    ) ranked WHERE nth <= $13::bigint
), levels AS MATERIALIZED (
    SELECT p.priority, (SELECT count(*) FROM generations g
                        WHERE g.status = 'QUEUED'
                          AND g.claim_key < place.now_s - p.priority * $12::float8) AS ahead
    FROM place, (SELECT DISTINCT priority FROM allowed) p
), placed AS (
    SELECT allowed.*, levels.ahead,
        count(*) FILTER (WHERE allowed.worker IS NULL) OVER earlier AS unserved_before
    FROM allowed JOIN levels USING (priority)
    WINDOW earlier AS (ORDER BY allowed.claim_key ROWS BETWEEN UNBOUNDED PRECEDING AND 1 PRECEDING)
), decided AS (
    SELECT placed.*, worker IS NOT NULL AND ahead = 0 AND unserved_before = 0 AS go
    FROM placed
), positioned AS (
    SELECT id, CASE WHEN go THEN 0
        ELSE ahead + count(*) FILTER (WHERE NOT go) OVER earlier + 1 END AS queue_position
    FROM decided
    WINDOW earlier AS (ORDER BY claim_key ROWS BETWEEN UNBOUNDED PRECEDING AND 1 PRECEDING)
), changed AS (
    INSERT INTO generations (id, principal, request_id, template, parameters, graph,
        checkpoint, priority, timeout_seconds, claim_key, status, last_event_seq,
        attempts, lease_owner, lease_expires_at, worker, prompt_id, request_digest)
    SELECT id, principal, request_id, template, parameters::jsonb, graph, checkpoint,
        priority, timeout_seconds, claim_key,
        CASE WHEN go THEN 'DISPATCHED' ELSE 'QUEUED' END, CASE WHEN go THEN 2 ELSE 1 END,
        CASE WHEN go THEN 1 ELSE 0 END, CASE WHEN go THEN $14 END,
        CASE WHEN go THEN now() + make_interval(secs => $15) END,
        CASE WHEN go THEN worker END, prompt_id, request_digest
    FROM decided ORDER BY ord
    ON CONFLICT (principal, request_id) DO NOTHING
    RETURNING *
), inserted AS (
    INSERT INTO generation_events (generation_id, seq, type, status, payload)
    SELECT id, 1, 'CREATED', 'QUEUED', '{{}}'::jsonb FROM changed
    UNION ALL
    SELECT id, 2, 'DISPATCHED', 'DISPATCHED',
        jsonb_build_object('worker', worker, 'prompt_id', prompt_id)
    FROM changed WHERE status = 'DISPATCHED'
), stored_inputs AS (
    INSERT INTO generation_inputs (generation_id, name, data)
    SELECT i.generation_id, i.name, i.data
    FROM arrays, unnest(arrays.input_ids, arrays.input_names, arrays.input_data)
        AS i(generation_id, name, data)
    JOIN changed ON changed.id = i.generation_id
)
SELECT changed.*,
    pg_notify('{EVENTS_CHANNEL}', changed.id::text || ':1:' || changed.principal),
    CASE WHEN status = 'DISPATCHED'
        THEN pg_notify('{EVENTS_CHANNEL}', changed.id::text || ':2:' || changed.principal)
        ELSE pg_notify('{QUEUED_CHANNEL}', '') END,
    positioned.queue_position
FROM changed JOIN positioned USING (id)
"""
# Concurrent creates of one replica share a statement, up to this many rows
# each, with up to this many statements at a time.
CREATE_BATCH_ROWS = 64
CREATES_IN_FLIGHT = 2


@dataclass(frozen=True)
class NewGeneration:
    """One row of a create batch: a validated request and the slot kept for it."""

    id: uuid.UUID
    principal: str
    request_id: str | None
    template: str
    parameters: str
    graph: str
    checkpoint: str | None
    priority: int
    timeout_seconds: int
    inputs: Sequence[tuple[str, bytes]]
    direct_to: str | None
    request_digest: bytes | None = None


# A claimed row says whether it has input images, so that a job without
# any (most) skips the read of them.
_HAS_INPUTS = (
    "EXISTS (SELECT 1 FROM generation_inputs i WHERE i.generation_id = g.id) AS has_inputs"
)


# Claims lease queued rows to this replica ($1, for $2 seconds) as a new
# attempt, best first; rows another claim holds are skipped. How many at
# most is written into the text ({limit}), one prepared statement per
# number: as a parameter, a custom plan sized to it always looked cheaper
# than the generic one, and PostgreSQL planned every claim anew (0.13-0.6 ms
# by EXPLAIN ANALYZE, about as long as running it).
_PICKED = """
    FROM (
        SELECT id FROM generations WHERE status = 'QUEUED'
        ORDER BY claim_key LIMIT {limit} FOR UPDATE SKIP LOCKED
    ) picked
    WHERE g.id = picked.id
"""
_LEASED = """
    status = 'DISPATCHED', attempts = g.attempts + 1,
    lease_owner = $1, lease_expires_at = now() + make_interval(secs => $2)
"""
_CLAIM = f"UPDATE generations g SET {_LEASED} {_PICKED} RETURNING g.*, {_HAS_INPUTS}"
# The same, and dispatched to worker $3: the DISPATCHED write folded into the
# claim. A row created before prompt_ids were kept at create has none yet;
# the dispatcher gives it one (`prompt_assigned`).
_CLAIM_FOR = _with_event(
    f"""
    UPDATE generations g SET {_LEASED}, worker = $3, last_event_seq = g.last_event_seq + 1
    {_PICKED} RETURNING g.*, {_HAS_INPUTS}
    """,
    "'DISPATCHED'",
    "jsonb_build_object('worker', worker, 'prompt_id', prompt_id)",
)


# A write of a claimed row applies only while its fence ($1 id, $2 attempt,
# $3 owner) still holds it.
_FENCE = "id = $1 AND attempts = $2 AND lease_owner = $3 AND status IN ('DISPATCHED', 'RUNNING')"


@dataclass(frozen=True)
class Fence:
    """Who may write a claimed generation: this attempt of this owner only."""

    id: uuid.UUID
    attempt: int
    owner: str


@dataclass(frozen=True)
class RunningChange:
    """A claimed job's DISPATCHED, STARTED, PROGRESS or COMPLETED, fenced, with
    its event payload and the columns its kind sets."""

    fence: Fence
    kind: str
    payload: str
    value: int | None = None
    top: int | None = None
    node: str | None = None
    outputs: str | None = None
    worker: str | None = None
    prompt_id: str | None = None


# The claimed jobs' DISPATCHED (when the dispatcher chose the worker after
# the claim), STARTED, PROGRESS and COMPLETED writes, several jobs' in one
# statement: jobs' changes that arrive while earlier ones are written
# share the next one (group commit, as creates do), so a busy replica pays
# one round trip, one commit and one turn at the lock PostgreSQL's notifying
# commits take one at a time, for all of them. Each row is still fenced on
# its own (id, attempt, owner) and gets its own event; a job has at most one
# change in flight, so no row appears twice in a batch.
# $1..$3 the fences, $4 kinds, $5 event payloads, $6..$8 progress (value,
# max, node), $9 outputs, $10 workers, $11 prompt ids. The arrays are read
# through a MATERIALIZED CTE, as _CREATE's are and for the same reason:
# unnested straight from the parameters, PostgreSQL planned the statement
# anew on every batch (0.35-0.6 ms by EXPLAIN ANALYZE, more than running it).
_RUNNING_CHANGES = _with_event(
    """
    UPDATE generations g SET
        status = CASE b.kind WHEN 'COMPLETED' THEN 'COMPLETED' WHEN 'DISPATCHED' THEN g.status
            ELSE 'RUNNING' END,
        started_at = CASE WHEN b.kind IN ('COMPLETED', 'DISPATCHED') THEN g.started_at
            ELSE coalesce(g.started_at, now()) END,
        worker = CASE b.kind WHEN 'DISPATCHED' THEN b.worker ELSE g.worker END,
        prompt_id = CASE b.kind WHEN 'DISPATCHED' THEN b.prompt_id ELSE g.prompt_id END,
        progress_value = CASE b.kind WHEN 'PROGRESS' THEN b.value ELSE g.progress_value END,
        progress_max = CASE b.kind WHEN 'PROGRESS' THEN b.top ELSE g.progress_max END,
        progress_node = CASE b.kind WHEN 'PROGRESS' THEN b.node ELSE g.progress_node END,
        completed_at = CASE b.kind WHEN 'COMPLETED' THEN now() ELSE g.completed_at END,
        outputs = CASE b.kind WHEN 'COMPLETED' THEN b.outputs::jsonb ELSE g.outputs END,
        lease_owner = CASE b.kind WHEN 'COMPLETED' THEN NULL ELSE g.lease_owner END,
        lease_expires_at = CASE b.kind WHEN 'COMPLETED' THEN NULL ELSE g.lease_expires_at END,
        duration_ms = CASE b.kind WHEN 'COMPLETED'
            THEN (extract(epoch FROM now() - coalesce(g.started_at, g.created_at)) * 1000)::bigint
            ELSE g.duration_ms END,
        last_event_seq = g.last_event_seq + 1
    FROM arrays, unnest(arrays.ids, arrays.attempts, arrays.owners, arrays.kinds,
            arrays.payloads, arrays.vals, arrays.tops, arrays.nodes, arrays.outputs,
            arrays.workers, arrays.prompt_ids)
        AS b(id, attempt, owner, kind, payload, value, top, node, outputs, worker, prompt_id)
    WHERE g.id = b.id AND g.attempts = b.attempt AND g.lease_owner = b.owner
      AND g.status IN ('DISPATCHED', 'RUNNING')
    RETURNING g.*, b.kind, b.payload
    """,
    "kind",
    "payload",
    inputs="""arrays AS MATERIALIZED (
        SELECT $1::uuid[] AS ids, $2::int[] AS attempts, $3::text[] AS owners,
            $4::text[] AS kinds, $5::text[] AS payloads, $6::int[] AS vals, $7::int[] AS tops,
            $8::text[] AS nodes, $9::text[] AS outputs, $10::text[] AS workers,
            $11::text[] AS prompt_ids
    )""",
)
CHANGE_BATCH_ROWS = 64
CHANGES_IN_FLIGHT = 2


# Generations by status, each part answered from a partial index, never by
# reading the whole table: counting every row grew with the history kept
# (115 ms at 200,000 rows, every 5 s for the queue-depth gauge).
_COUNTS = """
    SELECT 'QUEUED' AS status, count(*) AS n FROM generations WHERE status = 'QUEUED'
    UNION ALL
    SELECT status, count(*) FROM generations WHERE status IN ('DISPATCHED', 'RUNNING')
    GROUP BY 1
"""
_FINISHED_COUNTS = """
    UNION ALL
    SELECT status, count(*) FROM generations
    WHERE status IN ('COMPLETED', 'FAILED', 'CANCELLED') GROUP BY 1
"""


# Finished generations keep their progress events this long (the rest: retention).
PROGRESS_RETENTION_SECONDS = 3600.0
# Advisory-lock class of the replicas' liveness locks (key 2: hashtext(owner)).
LIVENESS_LOCK_CLASS = 0x10C4


class Queue:
    def __init__(self, pool: asyncpg.Pool, settings: QueueSettings, owner: str) -> None:
        self.pool = pool
        self.settings = settings
        self.owner = owner
        self._creates: Batcher[NewGeneration, Record | None] = Batcher(
            self.create_many, max_size=CREATE_BATCH_ROWS, max_in_flight=CREATES_IN_FLIGHT
        )
        self._running: Batcher[RunningChange, Record | None] = Batcher(
            self.running_many, max_size=CHANGE_BATCH_ROWS, max_in_flight=CHANGES_IN_FLIGHT
        )

    # ----- callers -----------------------------------------------------------------

    async def create(
        self,
        *,
        principal: str,
        request_id: str | None,
        template: str,
        parameters: dict[str, Any],
        graph: str,
        checkpoint: str | None,
        priority: int,
        timeout_seconds: int,
        inputs: Sequence[tuple[str, bytes]],
        direct_to: str | None = None,
        request_digest: bytes | None = None,
    ) -> tuple[Record, bool, int]:
        """(row, created, queue position): a repeated request_id returns the
        first row, unchanged, unless both have a `request_digest` and they
        differ (AlreadyExists). With `direct_to` (a worker with a slot kept
        free for it) a row nothing waits ahead of comes back DISPATCHED to it."""
        new = NewGeneration(
            id=uuid.uuid4(),
            principal=principal,
            request_id=request_id,
            template=template,
            parameters=json.dumps(parameters),
            graph=graph,
            checkpoint=checkpoint,
            priority=priority,
            timeout_seconds=timeout_seconds,
            inputs=inputs,
            direct_to=direct_to,
            request_digest=request_digest,
        )
        # A create carrying images goes alone: a batch's statement holds every
        # row's bytes at once.
        if inputs:
            (row,) = await self.create_many([new])
        else:
            row = await self._creates.submit(new)
        if row is not None:
            return row, True, row["queue_position"]
        if request_id:
            existing = await self.pool.fetchrow(
                "SELECT * FROM generations WHERE principal = $1 AND request_id = $2",
                principal,
                request_id,
            )
            if existing is not None:
                first = existing["request_digest"]
                if first is not None and request_digest is not None and first != request_digest:
                    raise AlreadyExists(
                        f"request_id {request_id!r} was used for a different request"
                        f" (generation {existing['id']}): repeat that request exactly,"
                        " or use a new request_id",
                        metadata={"generation_id": str(existing["id"])},
                    )
                return existing, False, await self.queue_position(existing)
        limit = self.settings.max_queued_per_principal
        raise ResourceExhausted(
            f"this caller already has {limit} generations queued, the limit",
            retry_after_seconds=10.0,
        )

    async def create_many(self, batch: Sequence[NewGeneration]) -> list[Record | None]:
        """The rows, in one statement: None for a row left out."""
        rows = await self.pool.fetch(
            _CREATE,
            [n.id for n in batch],
            [n.principal for n in batch],
            [n.request_id for n in batch],
            [n.template for n in batch],
            [n.parameters for n in batch],
            [n.graph for n in batch],
            [n.checkpoint for n in batch],
            [n.priority for n in batch],
            [n.timeout_seconds for n in batch],
            [n.direct_to for n in batch],
            [prompt_id_for(str(n.id)) for n in batch],
            self.settings.aging_seconds_per_priority,
            self.settings.max_queued_per_principal,
            self.owner,
            self.settings.lease_seconds,
            [n.id for n in batch for _ in n.inputs],
            [name for n in batch for name, _ in n.inputs],
            [data for n in batch for _, data in n.inputs],
            [n.request_digest for n in batch],
        )
        by_id = {row["id"]: row for row in rows}
        return [by_id.get(n.id) for n in batch]

    async def get(self, generation_id: uuid.UUID, principal: str | None) -> Record:
        """The row, when it exists and (unless principal is None) belongs to the caller."""
        row = await self.pool.fetchrow(
            "SELECT * FROM generations WHERE id = $1 AND ($2::text IS NULL OR principal = $2)",
            generation_id,
            principal,
        )
        if row is None:
            raise NotFound(f"generation {generation_id} not found")
        return row

    async def queue_position(self, row: Record) -> int:
        if row["status"] != "QUEUED":
            return 0
        ahead: int = await self.pool.fetchval(
            "SELECT count(*) FROM generations WHERE status = 'QUEUED' AND claim_key < $1",
            row["claim_key"],
        )
        return ahead + 1

    async def page(
        self,
        principal: str,
        *,
        limit: int,
        statuses: Sequence[str],
        template: str | None,
        before: tuple[datetime, uuid.UUID] | None,
    ) -> list[Record]:
        """Newest first, keyset paged on (created_at, id)."""
        rows: list[Record] = await self.pool.fetch(
            """
            SELECT * FROM generations
            WHERE principal = $1
              AND (cardinality($2::text[]) = 0 OR status = ANY($2))
              AND ($3::text IS NULL OR template = $3)
              AND ($4::timestamptz IS NULL OR (created_at, id) < ($4, $5::uuid))
            ORDER BY created_at DESC, id DESC
            LIMIT $6
            """,
            principal,
            list(statuses),
            template,
            before[0] if before else None,
            before[1] if before else None,
            limit,
        )
        return rows

    async def cancel(self, generation_id: uuid.UUID, principal: str) -> tuple[Record, bool]:
        """(row, changed): a queued row becomes CANCELLED at once; an active one is
        flagged for its owner; a finished one is returned unchanged."""
        row = await self.pool.fetchrow(
            _with_event(
                """
                UPDATE generations SET status = 'CANCELLED', completed_at = now(),
                    cancel_requested = true, last_event_seq = last_event_seq + 1
                WHERE id = $1 AND principal = $2 AND status = 'QUEUED'
                RETURNING *
                """,
                "'CANCELLED'",
                "'{}'",
            ),
            generation_id,
            principal,
        )
        if row is not None:
            return row, True
        row = await self.pool.fetchrow(
            """
            UPDATE generations SET cancel_requested = true
            WHERE id = $1 AND principal = $2 AND status IN ('DISPATCHED', 'RUNNING')
            RETURNING *
            """,
            generation_id,
            principal,
        )
        if row is not None:
            return row, True
        return await self.get(generation_id, principal), False

    async def events_after(
        self, generation_id: uuid.UUID, after: int, limit: int = 500
    ) -> list[Record]:
        rows: list[Record] = await self.pool.fetch(
            """
            SELECT e.*, g.worker, g.prompt_id FROM generation_events e
            JOIN generations g ON g.id = e.generation_id
            WHERE e.generation_id = $1 AND e.seq > $2 ORDER BY e.seq LIMIT $3
            """,
            generation_id,
            after,
            limit,
        )
        return rows

    async def event(self, generation_id: uuid.UUID, seq: int) -> Record | None:
        row: Record | None = await self.pool.fetchrow(
            """
            SELECT e.*, g.worker, g.prompt_id, g.principal, g.template FROM generation_events e
            JOIN generations g ON g.id = e.generation_id
            WHERE e.generation_id = $1 AND e.seq = $2
            """,
            generation_id,
            seq,
        )
        return row

    async def inputs(self, generation_id: uuid.UUID) -> list[tuple[str, bytes]]:
        rows = await self.pool.fetch(
            "SELECT name, data FROM generation_inputs WHERE generation_id = $1 ORDER BY name",
            generation_id,
        )
        return [(r["name"], bytes(r["data"])) for r in rows]

    async def counts(self, *, finished: bool = True) -> dict[str, int]:
        """Generations by status, statuses with none left out. Unfinished
        ones cost what there are of them; `finished` adds a scan of the
        finished rows' index, which grows with the history kept."""
        rows = await self.pool.fetch(_COUNTS + (_FINISHED_COUNTS if finished else ""))
        return {r["status"]: r["n"] for r in rows if r["n"]}

    # ----- dispatch ------------------------------------------------------------------

    async def claim(self, limit: int, worker: str | None = None) -> list[Record]:
        """Lease up to `limit` queued rows, best first. With `worker` (known
        before the rows are: the only one with free slots) they are dispatched
        to it in the same statement, DISPATCHED events included; without, each
        still needs its worker chosen and `dispatched` written."""
        if limit <= 0:
            return []
        statement = (_CLAIM_FOR if worker else _CLAIM).replace("{limit}", str(int(limit)))
        dispatch_to = (worker,) if worker else ()
        rows: list[Record] = await self.pool.fetch(
            statement, self.owner, self.settings.lease_seconds, *dispatch_to
        )
        return sorted(rows, key=lambda r: r["claim_key"])

    async def take_over(self, limit: int) -> list[Record]:
        """Rows whose replica is gone: its lease expired, or its liveness lock
        (see `hold_liveness`) is free and it missed two heartbeats."""
        # Two missed heartbeats: a replica that merely lost its connection for
        # a moment (a database restart) keeps its work.
        silent_for = self.settings.lease_seconds - 2 * self.settings.heartbeat_seconds
        rows: list[Record] = await self.pool.fetch(
            _with_event(
                f"""
                UPDATE generations g SET attempts = g.attempts + 1, lease_owner = $2,
                    lease_expires_at = now() + make_interval(secs => $3),
                    last_event_seq = g.last_event_seq + 1
                FROM (
                    SELECT id FROM generations
                    WHERE status IN ('DISPATCHED', 'RUNNING') AND (
                        lease_expires_at < now()
                        OR ($4 > 0 AND lease_expires_at < now() + make_interval(secs => $4)
                            AND NOT EXISTS (
                                SELECT 1 FROM pg_locks l
                                WHERE l.locktype = 'advisory' AND l.granted
                                  AND l.classid = $5::oid AND l.objsubid = 2
                                  AND l.objid = hashtext(lease_owner)::oid)))
                    ORDER BY lease_expires_at LIMIT $1 FOR UPDATE SKIP LOCKED
                ) expired
                WHERE g.id = expired.id
                RETURNING g.*, {_HAS_INPUTS}
                """,
                "'TAKEN_OVER'",
                "'{}'",
            ),
            limit,
            self.owner,
            self.settings.lease_seconds,
            silent_for,
            LIVENESS_LOCK_CLASS,
        )
        return rows

    async def hold_liveness(self, conn: asyncpg.Connection) -> bool:
        """Take this replica's liveness lock on a long-lived session.

        PostgreSQL frees a session's advisory locks the moment its connection
        dies (a SIGKILLed replica's socket is closed by the kernel), so peers
        see the death in seconds instead of waiting out the whole lease.
        """
        held: bool = await conn.fetchval(
            "SELECT pg_try_advisory_lock($1, hashtext($2))", LIVENESS_LOCK_CLASS, self.owner
        )
        return held

    async def heartbeat(self, ids: Sequence[uuid.UUID]) -> set[uuid.UUID]:
        """Renew this replica's leases in one statement; returns the ones still held.

        A row another statement is writing right now is held (as the table
        has it) but left for the next heartbeat, never waited for: waiting,
        the heartbeat deadlocked with the batched writes of running jobs,
        which lock their rows in another order (a second's stall and a
        batch retried row by row, 6-12 times in each full throughput run).
        A lease outlives several heartbeats."""
        if not ids:
            return set()
        rows = await self.pool.fetch(
            """
            WITH renewed AS (
                UPDATE generations SET lease_expires_at = now() + make_interval(secs => $3)
                WHERE id IN (
                    SELECT id FROM generations
                    WHERE id = ANY($2::uuid[]) AND lease_owner = $1
                      AND status IN ('DISPATCHED', 'RUNNING')
                    FOR UPDATE SKIP LOCKED)
            )
            SELECT id FROM generations
            WHERE id = ANY($2::uuid[]) AND lease_owner = $1
              AND status IN ('DISPATCHED', 'RUNNING')
            """,
            self.owner,
            list(ids),
            self.settings.lease_seconds,
        )
        return {r["id"] for r in rows}

    async def _fenced(
        self, fence: Fence, sets: str, event: str, payload: dict[str, Any], *args: Any
    ) -> Record | None:
        """Apply `sets` and record `event`, only while `fence` still owns the row."""
        row: Record | None = await self.pool.fetchrow(
            _with_event(
                f"""
                UPDATE generations SET {sets}, last_event_seq = last_event_seq + 1
                WHERE {_FENCE} RETURNING *
                """,
                f"'{event}'",
                "$4",
            ),
            fence.id,
            fence.attempt,
            fence.owner,
            json.dumps(payload),
            *args,
        )
        return row

    async def dispatched(self, fence: Fence, worker: str, prompt_id: str) -> Record | None:
        payload = json.dumps({"worker": worker, "prompt_id": prompt_id})
        return await self._running.submit(
            RunningChange(fence, "DISPATCHED", payload, worker=worker, prompt_id=prompt_id)
        )

    async def prompt_assigned(self, fence: Fence, prompt_id: str) -> Record | None:
        """The id ComfyUI gave the prompt when it ignored ours, kept for a later
        attempt or a takeover to find the prompt by. Not an event: no state changed."""
        row: Record | None = await self.pool.fetchrow(
            f"UPDATE generations SET prompt_id = $4 WHERE {_FENCE} RETURNING *",
            fence.id,
            fence.attempt,
            fence.owner,
            prompt_id,
        )
        return row

    async def started(self, fence: Fence) -> Record | None:
        return await self._running.submit(RunningChange(fence, "STARTED", "{}"))

    async def progress(self, fence: Fence, value: int, top: int, node: str) -> Record | None:
        payload = json.dumps({"value": value, "max": top, "node": node})
        return await self._running.submit(
            RunningChange(fence, "PROGRESS", payload, value=value, top=top, node=node)
        )

    async def completed(self, fence: Fence, outputs: list[dict[str, Any]]) -> Record | None:
        return await self._running.submit(
            RunningChange(
                fence, "COMPLETED", json.dumps({"outputs": outputs}), outputs=json.dumps(outputs)
            )
        )

    async def running_many(self, batch: Sequence[RunningChange]) -> list[Record | None]:
        """The changes, in one statement: None where the fence no longer holds."""
        rows = await self.pool.fetch(
            _RUNNING_CHANGES,
            [c.fence.id for c in batch],
            [c.fence.attempt for c in batch],
            [c.fence.owner for c in batch],
            [c.kind for c in batch],
            [c.payload for c in batch],
            [c.value for c in batch],
            [c.top for c in batch],
            [c.node for c in batch],
            [c.outputs for c in batch],
            [c.worker for c in batch],
            [c.prompt_id for c in batch],
        )
        # Keyed by attempt too: a job taken over may still send its last write
        # beside the current attempt's, and only the current one's holds.
        by_fence = {(row["id"], row["attempts"]): row for row in rows}
        return [by_fence.get((c.fence.id, c.fence.attempt)) for c in batch]

    async def failed(
        self, fence: Fence, reason: str, message: str, details: dict[str, str]
    ) -> Record | None:
        return await self._fenced(
            fence,
            "status = 'FAILED', completed_at = now(), error_reason = $5, error_message = $6, "
            "error_details = $7::jsonb, lease_owner = NULL, lease_expires_at = NULL, "
            "duration_ms = (extract(epoch FROM now() - coalesce(started_at, created_at))"
            " * 1000)::bigint",
            "FAILED",
            {"reason": reason, "message": message, "details": details},
            reason,
            message,
            json.dumps(details),
        )

    async def cancelled(self, fence: Fence) -> Record | None:
        return await self._fenced(
            fence,
            "status = 'CANCELLED', completed_at = now(), lease_owner = NULL, "
            "lease_expires_at = NULL",
            "CANCELLED",
            {},
        )

    async def requeue(self, fence: Fence, reason: str, message: str) -> Record | None:
        """Back to the queue in its old place (claim_key is kept)."""
        row = await self._fenced(
            fence,
            "status = 'QUEUED', lease_owner = NULL, lease_expires_at = NULL, worker = NULL, "
            "progress_value = NULL, progress_max = NULL, progress_node = NULL",
            "REQUEUED",
            {"reason": reason, "message": message},
        )
        if row is not None:
            await self.pool.execute(f"NOTIFY {QUEUED_CHANNEL}")
        return row

    async def exhausted(self, fence: Fence, reason: str, message: str) -> Record | None:
        return await self.failed(
            fence,
            Reason.ATTEMPTS_EXHAUSTED.value,
            f"gave up after {fence.attempt} attempts; last: {reason}: {message}",
            {"last_reason": reason},
        )

    async def prune(self, retention_hours: float) -> list[str]:
        """Delete finished generations past retention; returns their image paths.

        Their progress events go sooner (PROGRESS_RETENTION): they are most of
        the event rows and nobody resumes a stream that ended long ago.
        """
        await self.pool.execute(
            """
            DELETE FROM generation_events e USING generations g
            WHERE e.generation_id = g.id AND e.type = 'PROGRESS'
              AND g.status IN ('COMPLETED', 'FAILED', 'CANCELLED')
              AND g.completed_at < now() - make_interval(secs => $1)
            """,
            min(PROGRESS_RETENTION_SECONDS, retention_hours * 3600),
        )
        rows = await self.pool.fetch(
            """
            DELETE FROM generations WHERE id IN (
                SELECT id FROM generations
                WHERE status IN ('COMPLETED', 'FAILED', 'CANCELLED')
                  AND completed_at < now() - make_interval(secs => $1)
                LIMIT 1000
            ) RETURNING outputs
            """,
            retention_hours * 3600,
        )
        return [o["path"] for r in rows for o in json.loads(r["outputs"]) if "path" in o]
