"""Claims: a queued generation gets its worker in the claim's own statement
when only one worker has free slots (there is no choice to make), and keeps
the prompt_id its create gave it; with several free, the dispatcher chooses
and writes DISPATCHED after the claim, as it does for work taken over."""

from __future__ import annotations

import json
from typing import Any

import asyncpg

from services.comfy_worker.executor import prompt_id_for
from services.contracts import gen
from services.generation.queue import Queue
from services.settings import QueueSettings
from tests.fixtures.generation import GenerationClient, StartGeneration, queue_create


async def test_every_created_row_keeps_the_prompt_id_its_prompt_will_have(
    pool: asyncpg.Pool,
) -> None:
    queue = Queue(pool, QueueSettings(), "replica-a")
    row, _, _ = await queue_create(queue)
    assert row["status"] == "QUEUED" and row["prompt_id"] == prompt_id_for(str(row["id"]))


async def test_a_claim_for_a_worker_dispatches_in_the_same_statement(pool: asyncpg.Pool) -> None:
    queue = Queue(pool, QueueSettings(), "replica-a")
    created = [(await queue_create(queue))[0] for _ in range(3)]

    claimed = await queue.claim(2, worker="gpu0")

    assert [r["id"] for r in claimed] == [r["id"] for r in created[:2]]
    for row in claimed:
        assert (row["status"], row["worker"], row["attempts"]) == ("DISPATCHED", "gpu0", 1)
        assert row["lease_owner"] == "replica-a" and row["lease_expires_at"] is not None
        events = await pool.fetch(
            "SELECT seq, type, payload FROM generation_events"
            " WHERE generation_id = $1 ORDER BY seq",
            row["id"],
        )
        assert [(e["seq"], e["type"]) for e in events] == [(1, "CREATED"), (2, "DISPATCHED")]
        assert json.loads(events[1]["payload"]) == {"worker": "gpu0", "prompt_id": row["prompt_id"]}
        assert row["last_event_seq"] == 2
    left = await pool.fetchval("SELECT status FROM generations WHERE id = $1", created[2]["id"])
    assert left == "QUEUED"


class Calls:
    """The queue's claims, by whether they named a worker, and its dispatch writes."""

    def __init__(self, queue: Queue) -> None:
        self.counts = {"claim": 0, "claim naming a worker": 0, "dispatched": 0}
        claim, dispatched = queue.claim, queue.dispatched

        async def counted_claim(limit: int, worker: str | None = None) -> Any:
            self.counts["claim naming a worker" if worker else "claim"] += 1
            return await claim(limit, worker)

        async def counted_dispatched(*args: Any) -> Any:
            self.counts["dispatched"] += 1
            return await dispatched(*args)

        # Spies on the real methods: the queue under test is the one the service uses.
        queue.claim = counted_claim  # type: ignore[method-assign]
        queue.dispatched = counted_dispatched  # type: ignore[method-assign,assignment]


async def dispatched_events(service: GenerationClient, generation_id: str) -> list[Any]:
    rows = await service.running.queue.pool.fetch(
        "SELECT payload FROM generation_events WHERE generation_id = $1 AND type = 'DISPATCHED'",
        generation_id,
    )
    return [json.loads(r["payload"]) for r in rows]


async def test_queued_work_for_the_one_free_worker_needs_no_dispatch_write(
    generation_service: GenerationClient,
) -> None:
    sim = generation_service.simulator.sim
    calls = Calls(generation_service.running.queue)
    sim.set_step_seconds(0.05)
    made = [await generation_service.create(f"image {n}", steps=3) for n in range(5)]
    assert [g.status for g in made][2:] == [gen.GENERATION_STATUS_QUEUED] * 3

    done = [await generation_service.wait(g.id) for g in made]

    assert [d.status for d in done] == [gen.GENERATION_STATUS_COMPLETED] * 5
    assert calls.counts["claim naming a worker"] >= 3 and calls.counts["dispatched"] == 0
    for d in done:
        assert await dispatched_events(generation_service, d.id) == [
            {"worker": "gpu0", "prompt_id": d.prompt_id}
        ]
    assert [r.prompt_id for r in sim.runs] == [d.prompt_id for d in done]


async def test_with_several_workers_free_the_dispatcher_chooses_then_writes(
    generation_factory: StartGeneration,
) -> None:
    service = await generation_factory(gpus=2)
    handles = service.running.workers.workers.values()
    calls = Calls(service.running.queue)
    for handle in handles:
        handle.serving = False  # no free slot: creates queue
    made = [await service.create(f"image {n}") for n in range(3)]
    assert [g.status for g in made] == [gen.GENERATION_STATUS_QUEUED] * 3
    for handle in handles:
        handle.serving = True
    service.running.dispatcher.poke()

    done = [await service.wait(g.id) for g in made]

    assert [d.status for d in done] == [gen.GENERATION_STATUS_COMPLETED] * 3
    # Claimed together while both workers had room: each got its worker after
    # the claim. (Later claims, once a slot opens beside a full worker, may
    # name that worker; they find the queue empty.)
    assert calls.counts["claim"] >= 1 and calls.counts["dispatched"] == 3
    for d in done:
        assert len(await dispatched_events(service, d.id)) == 1


async def test_a_row_queued_without_a_prompt_id_gets_one_before_it_runs(
    generation_service: GenerationClient,
) -> None:
    sim = generation_service.simulator.sim
    sim.set_step_seconds(0.2)
    ahead = [await generation_service.create(f"ahead {n}", steps=50) for n in range(2)]
    queued = await generation_service.create("queued before prompt ids were kept")
    assert queued.status == gen.GENERATION_STATUS_QUEUED
    # As a row created by an earlier release, which stored none at create.
    await generation_service.running.queue.pool.execute(
        "UPDATE generations SET prompt_id = NULL WHERE id = $1", queued.id
    )
    for g in ahead:
        await generation_service.stub.CancelGeneration(gen.CancelGenerationRequest(id=g.id))

    done = await generation_service.wait(queued.id)

    assert done.status == gen.GENERATION_STATUS_COMPLETED
    assert done.prompt_id == prompt_id_for(queued.id)
    assert done.prompt_id in [r.prompt_id for r in sim.runs]
