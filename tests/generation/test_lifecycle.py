"""A generation's life through real GenerationService, worker and simulator."""

from __future__ import annotations

import asyncio
from pathlib import Path
from typing import Any

import pytest

from services.contracts import gen
from services.generation.store import StorageFull
from tests.fixtures.generation import GenerationClient, StartGeneration


async def test_a_generation_runs_to_completion_and_its_image_is_stored(
    generation_service: GenerationClient,
) -> None:
    created = await generation_service.create("a red fox", steps=3)
    # A worker was free and nothing waited: the create dispatched it itself.
    assert created.status == gen.GENERATION_STATUS_DISPATCHED
    assert created.queue_position == 0 and created.worker == "gpu0" and created.attempts == 1

    done = await generation_service.wait(created.id)

    assert done.status == gen.GENERATION_STATUS_COMPLETED, done.error
    (image,) = done.outputs
    assert Path(image.path) == generation_service.outputs.resolve() / f"{done.id}.png"
    assert Path(image.path).read_bytes().startswith(b"\x89PNG")
    assert image.size_bytes == Path(image.path).stat().st_size
    assert done.worker == "gpu0" and done.prompt_id and done.attempts == 1
    assert done.parameters["prompt"].string_value == "a red fox"
    assert done.parameters["steps"].int_value == 3
    assert done.HasField("complete_time") and done.duration_ms >= 0

    chunks = [
        c
        async for c in generation_service.stub.GetGenerationImage(
            gen.GetGenerationImageRequest(id=done.id)
        )
    ]
    assert chunks[0].image.path == image.path
    assert b"".join(c.data for c in chunks) == Path(image.path).read_bytes()


async def test_a_create_with_a_free_slot_dispatches_it_in_the_same_statement(
    generation_service: GenerationClient,
) -> None:
    created = await generation_service.create(steps=1)
    done = await generation_service.wait(created.id)
    call = generation_service.stub.WatchGeneration(gen.WatchGenerationRequest(id=created.id))
    events = [item.event async for item in call][1:]

    assert created.status == gen.GENERATION_STATUS_DISPATCHED and created.queue_position == 0
    assert [e.type for e in events[:2]] == [gen.EVENT_TYPE_CREATED, gen.EVENT_TYPE_DISPATCHED]
    assert events[0].status == gen.GENERATION_STATUS_QUEUED
    assert (events[1].worker, events[1].prompt_id) == ("gpu0", done.prompt_id)
    assert done.status == gen.GENERATION_STATUS_COMPLETED and done.attempts == 1


async def test_with_every_slot_taken_or_dispatch_paused_a_create_queues(
    generation_service: GenerationClient,
) -> None:
    sim, dispatcher = generation_service.simulator.sim, generation_service.running.dispatcher
    sim.set_step_seconds(0.05)
    busy = [await generation_service.create(f"busy {n}", steps=20) for n in range(2)]
    waiting = await generation_service.create("waits", steps=1)
    assert [b.status for b in busy] == [gen.GENERATION_STATUS_DISPATCHED] * 2
    assert waiting.status == gen.GENERATION_STATUS_QUEUED and waiting.queue_position == 1

    for generation in [*busy, waiting]:
        await generation_service.wait(generation.id)
    dispatcher.paused = "STORAGE_FULL: held for this test"
    paused = await generation_service.create("paused", steps=1)
    assert paused.status == gen.GENERATION_STATUS_QUEUED
    # The store has room: the next dispatch round resumes and claims it.
    dispatcher.poke()
    done = await generation_service.wait(paused.id)
    assert done.status == gen.GENERATION_STATUS_COMPLETED


async def test_a_first_dispatch_posts_without_asking_comfyui_first(
    generation_service: GenerationClient,
) -> None:
    requests = generation_service.simulator.sim.requests
    requests.clear()
    done = await generation_service.wait((await generation_service.create(steps=1)).id)
    assert done.status == gen.GENERATION_STATUS_COMPLETED and done.attempts == 1
    # Attempt 1's first Execute carries first_send: no /history/{id} lookup.
    before_post = list(requests)[: list(requests).index(("POST", "/prompt"))]
    assert ("GET", f"/history/{done.prompt_id}") not in before_post


async def test_a_large_image_is_flushed_to_disk_while_it_streams_in(
    generation_service: GenerationClient, monkeypatch: pytest.MonkeyPatch
) -> None:
    store = generation_service.running.dispatcher.store
    flushed: list[int] = []
    to_thread = asyncio.to_thread

    def scheduled(func: Any, *args: Any) -> Any:
        # Where the file stood when the flush was sent to its thread: the
        # thread itself may start only after the last chunk was written.
        if func == store.flush:
            flushed.append(args[0].tell())
        return to_thread(func, *args)

    monkeypatch.setattr(asyncio, "to_thread", scheduled)

    created = await generation_service.create(steps=1, width=1024, height=1024)
    done = await generation_service.wait(created.id)

    assert done.status == gen.GENERATION_STATUS_COMPLETED, done.error
    (image,) = done.outputs
    (produced,) = generation_service.simulator.sim.dirs["output"].iterdir()
    assert Path(image.path).read_bytes() == produced.read_bytes()
    assert flushed and max(flushed) < image.size_bytes  # while more was still coming


async def test_a_flush_that_fails_fails_the_generation_and_leaves_no_file(
    generation_service: GenerationClient,
) -> None:
    store = generation_service.running.dispatcher.store

    def full(handle: object) -> None:
        raise StorageFull("image store full: No space left on device")

    store.flush = full  # type: ignore[method-assign]
    created = await generation_service.create(steps=1, width=1024, height=1024)
    done = await generation_service.wait(created.id)

    assert done.status == gen.GENERATION_STATUS_FAILED
    assert done.error.reason == "STORAGE_FULL"
    assert not list(generation_service.outputs.iterdir())


async def test_a_one_chunk_image_that_cannot_be_written_fails_and_leaves_no_file(
    generation_service: GenerationClient,
) -> None:
    store = generation_service.running.dispatcher.store
    written: list[int] = []

    def full(handle: object, data: bytes) -> None:
        written.append(len(data))
        raise StorageFull("image store full: No space left on device")

    store.write = full  # type: ignore[method-assign]
    created = await generation_service.create(steps=1)  # a small image: one chunk
    done = await generation_service.wait(created.id)

    assert done.status == gen.GENERATION_STATUS_FAILED
    assert done.error.reason == "STORAGE_FULL"
    assert len(written) == 1
    assert not list(generation_service.outputs.iterdir())  # nor its temp file


async def test_watch_gives_the_snapshot_then_every_event_in_order(
    generation_service: GenerationClient,
) -> None:
    generation_service.simulator.sim.set_step_seconds(0.05)
    created = await generation_service.create(steps=4)
    items = [
        item
        async for item in generation_service.stub.WatchGeneration(
            gen.WatchGenerationRequest(id=created.id)
        )
    ]
    assert items[0].HasField("snapshot")
    events = [i.event for i in items[1:]]
    sequences = [e.sequence for e in events]
    # after_sequence 0: every stored event, from the first, with no gap.
    assert sequences == list(range(1, sequences[-1] + 1))
    assert events[0].type == gen.EVENT_TYPE_CREATED
    assert events[-1].type == gen.EVENT_TYPE_COMPLETED
    types = [e.type for e in events]
    assert gen.EVENT_TYPE_STARTED in types
    assert [e.progress.value for e in events if e.type == gen.EVENT_TYPE_PROGRESS] == [1, 2, 3, 4]

    replay = [
        item
        async for item in generation_service.stub.WatchGeneration(
            gen.WatchGenerationRequest(id=created.id, after_sequence=1)
        )
    ]
    assert [i.event.sequence for i in replay[1:]] == list(range(2, sequences[-1] + 1))


async def test_many_generations_all_complete_once(generation_service: GenerationClient) -> None:
    created = await asyncio.gather(
        *(generation_service.create(f"n{i}", steps=1) for i in range(12))
    )
    done = [await generation_service.wait(c.id) for c in created]
    assert all(d.status == gen.GENERATION_STATUS_COMPLETED for d in done)
    assert len(generation_service.simulator.sim.runs) == 12


async def test_a_watch_cut_mid_run_and_resumed_sees_every_event_once(
    generation_service: GenerationClient,
) -> None:
    generation_service.simulator.sim.set_step_seconds(0.05)
    created = await generation_service.create(steps=8)
    first = []
    call = generation_service.stub.WatchGeneration(gen.WatchGenerationRequest(id=created.id))
    async for item in call:
        if item.HasField("event"):
            first.append(item.event)
            if item.event.type == gen.EVENT_TYPE_PROGRESS and item.event.progress.value == 3:
                break
    call.cancel()  # the connection drops mid-run

    resumed = [
        item.event
        async for item in generation_service.stub.WatchGeneration(
            gen.WatchGenerationRequest(id=created.id, after_sequence=first[-1].sequence)
        )
        if item.HasField("event")
    ]
    events = first + resumed
    assert [e.sequence for e in events] == list(range(1, events[-1].sequence + 1))
    steps = [e.progress.value for e in events if e.type == gen.EVENT_TYPE_PROGRESS]
    assert steps == list(range(1, 9))
    assert events[-1].type == gen.EVENT_TYPE_COMPLETED


async def test_two_replicas_and_two_workers_run_200_generations_once_each(
    generation_factory: StartGeneration,
) -> None:
    a = await generation_factory(gpus=2)
    b = await generation_factory(workers=a.workers)
    for simulator in a.simulators:
        simulator.sim.set_step_seconds(0.001)
    created = await asyncio.gather(
        *((a if n % 2 else b).create(f"n{n}", steps=1, seed=n) for n in range(200))
    )
    done = [await a.wait(c.id, seconds=120) for c in created]

    assert {d.status for d in done} == {gen.GENERATION_STATUS_COMPLETED}
    runs = [run.prompt_id for s in a.simulators for run in s.sim.runs]
    assert len(runs) == len(set(runs)) == 200  # none ran twice
    assert {d.worker for d in done} == {"gpu0", "gpu1"}  # both GPUs were fed
