"""GenerationService's API contract: input checks, idempotency, paging,
cancellation, access control, failures, priority, takeover, watching, stats.

Real PostgreSQL, real gRPC, real workers in front of ComfyUI simulators."""

from __future__ import annotations

import asyncio
import io
import uuid
from collections.abc import Awaitable
from typing import Any

import grpc
import pytest
from PIL import Image

from services.contracts import gen
from services.errors import InvalidArgument, LocknError, from_rpc_error
from tests.fixtures.generation import GenerationClient, StartGeneration, typed

# ----- helpers ---------------------------------------------------------------------


async def rpc_error(call: Awaitable[Any]) -> tuple[grpc.StatusCode, LocknError]:
    """The status code and decoded LocknError of a call that must fail."""
    with pytest.raises(grpc.aio.AioRpcError) as caught:
        await call
    return caught.value.code(), from_rpc_error(caught.value)


async def stream_error(stream: Any) -> tuple[grpc.StatusCode, LocknError]:
    async def drain() -> None:
        async for _ in stream:
            pass

    return await rpc_error(drain())


def fields(error: LocknError) -> list[str]:
    assert isinstance(error, InvalidArgument), error
    return [name for name, _ in error.violations]


async def listed(client: GenerationClient, **kwargs: Any) -> list[gen.Generation]:
    reply = await client.stub.ListGenerations(
        gen.ListGenerationsRequest(**kwargs), metadata=client.metadata
    )
    return list(reply.generations)


def png(size: int = 8) -> bytes:
    out = io.BytesIO()
    Image.new("RGB", (size, size), "red").save(out, format="PNG")
    return out.getvalue()


def request(
    template: str = "sd15-txt2img",
    images: list[gen.InputImage] | None = None,
    image: str | None = None,
    **params: Any,
) -> gen.CreateGenerationRequest:
    """A CreateGenerationRequest; `image` names an input image for the `image` parameter."""
    extra = {k: params.pop(k) for k in ("priority", "request_id", "timeout_seconds") if k in params}
    values = typed(params)
    if image is not None:
        values["image"] = gen.ParameterValue(image_name=image)
    return gen.CreateGenerationRequest(
        template=template, parameters=values, input_images=images or [], **extra
    )


async def until(predicate: Any, seconds: float = 10) -> None:
    async with asyncio.timeout(seconds):
        while not predicate():
            await asyncio.sleep(0.02)


# ----- 1. bad input ----------------------------------------------------------------

BAD_CREATES: list[tuple[str, gen.CreateGenerationRequest, str]] = [
    ("bad template name", request("../x", prompt="p"), "template"),
    ("unknown parameter", request(prompt="p", colour="red"), "parameters.colour"),
    ("missing prompt", request(steps=3), "parameters.prompt"),
    ("steps too high", request(prompt="p", steps=151), "parameters.steps"),
    ("steps too low", request(prompt="p", steps=0), "parameters.steps"),
    ("steps as a string", request(prompt="p", steps="ten"), "parameters.steps"),
    ("priority 1000", request(prompt="p", priority=1000), "priority"),
    ("timeout huge", request(prompt="p", timeout_seconds=10**9), "timeout_seconds"),
    (
        "input that is not an image",
        request(
            "img2img",
            [gen.InputImage(name="in.png", data=b"not an image at all")],
            image="in.png",
            prompt="p",
        ),
        "input_images[0].data",
    ),
]


@pytest.mark.parametrize(("case", "bad", "field"), BAD_CREATES, ids=[c[0] for c in BAD_CREATES])
async def test_bad_create_is_invalid_argument_naming_the_field_and_stores_nothing(
    generation_service: GenerationClient,
    case: str,
    bad: gen.CreateGenerationRequest,
    field: str,
) -> None:
    code, error = await rpc_error(generation_service.stub.CreateGeneration(bad))
    assert code == grpc.StatusCode.INVALID_ARGUMENT, error
    assert field in fields(error), error
    assert error.reason == "INVALID_ARGUMENT"
    assert await listed(generation_service) == []
    assert generation_service.simulator.sim.runs == []


async def test_image_parameter_naming_a_missing_input_is_invalid(
    generation_service: GenerationClient,
) -> None:
    bad = request("img2img", image="missing.png", prompt="p")
    code, error = await rpc_error(generation_service.stub.CreateGeneration(bad))
    assert code == grpc.StatusCode.INVALID_ARGUMENT
    assert isinstance(error, InvalidArgument) and fields(error) == ["parameters.image"]
    assert "missing.png" in error.violations[0][1]
    # Whichever parameter holds the reference is the one named.
    bad = request(steps=1)
    bad.parameters["prompt"].image_name = "a.png"
    code, error = await rpc_error(generation_service.stub.CreateGeneration(bad))
    assert code == grpc.StatusCode.INVALID_ARGUMENT
    assert fields(error) == ["parameters.prompt"]
    assert await listed(generation_service) == []


async def test_a_real_input_image_reaches_comfyui_whether_dispatched_at_once_or_queued(
    generation_service: GenerationClient,
) -> None:
    sim = generation_service.simulator.sim
    sim.set_step_seconds(0.05)
    uploads = []
    for n, size in enumerate((8, 9)):
        good = request(
            "img2img",
            [gen.InputImage(name="in.png", data=png(size))],
            image="in.png",
            prompt="p",
            steps=4,
        )
        reply = await generation_service.stub.CreateGeneration(good)
        uploads.append(reply.generation)
        if n == 0:
            # The second waits in the queue (one slot, lookahead one, both taken by now
            # or soon): its image is read back from PostgreSQL when it is claimed.
            await generation_service.create("holds the lookahead", steps=4)
    assert uploads[0].status == gen.GENERATION_STATUS_DISPATCHED
    assert uploads[1].status == gen.GENERATION_STATUS_QUEUED
    for created in uploads:
        done = await generation_service.wait(created.id)
        assert done.status == gen.GENERATION_STATUS_COMPLETED, done.error
    stored = {p.read_bytes() for p in sim.dirs["input"].iterdir() if p.is_file()}
    assert stored == {png(8), png(9)}


async def test_unknown_template_is_not_found(generation_service: GenerationClient) -> None:
    code, error = await rpc_error(
        generation_service.stub.CreateGeneration(request("no-such-template", prompt="p"))
    )
    assert code == grpc.StatusCode.NOT_FOUND
    assert error.reason == "TEMPLATE_NOT_FOUND"
    assert "sd15-txt2img" in error.message  # the known ones are listed
    assert await listed(generation_service) == []


async def test_ids_that_are_not_uuids_are_invalid_everywhere(
    generation_service: GenerationClient,
) -> None:
    stub = generation_service.stub
    for call in (
        stub.GetGeneration(gen.GetGenerationRequest(id="nope")),
        stub.CancelGeneration(gen.CancelGenerationRequest(id="nope")),
    ):
        code, error = await rpc_error(call)
        assert code == grpc.StatusCode.INVALID_ARGUMENT
        assert fields(error) == ["id"]
    # Forms Python's uuid.UUID() takes are refused too (before, they found
    # this generation or another id's NOT_FOUND): only the canonical text
    # names a generation.
    created = await generation_service.create(steps=1)
    hex_id = created.id.replace("-", "")
    lenient = [
        "\n" + created.id[1:],
        f"{{{created.id}}}",
        f"urn:uuid:{created.id}",
        hex_id,
        "-".join(hex_id),
        created.id.replace("4", "\u0664"),  # Arabic-Indic four (the version digit is 4)
    ]
    for text in lenient:
        code, error = await rpc_error(stub.GetGeneration(gen.GetGenerationRequest(id=text)))
        assert code == grpc.StatusCode.INVALID_ARGUMENT, text
        assert fields(error) == ["id"]
    upper = await stub.GetGeneration(gen.GetGenerationRequest(id=created.id.upper()))
    assert upper.generation.id == created.id
    for stream in (
        stub.WatchGeneration(gen.WatchGenerationRequest(id="nope")),
        stub.GetGenerationImage(gen.GetGenerationImageRequest(id="nope")),
    ):
        code, error = await stream_error(stream)
        assert code == grpc.StatusCode.INVALID_ARGUMENT
        assert fields(error) == ["id"]
    # A well-formed id that does not exist is NOT_FOUND.
    code, error = await rpc_error(
        stub.GetGeneration(gen.GetGenerationRequest(id=str(uuid.uuid4())))
    )
    assert code == grpc.StatusCode.NOT_FOUND
    assert error.reason == "GENERATION_NOT_FOUND"


@pytest.mark.parametrize(
    ("bad", "field"),
    [
        (gen.ListGenerationsRequest(page_token="garbage!!"), "page_token"),
        (gen.ListGenerationsRequest(page_token="WyJ4IiwgInkiXQ"), "page_token"),  # ["x", "y"]
        (gen.ListGenerationsRequest(page_size=-1), "page_size"),
        (gen.ListGenerationsRequest(statuses=[gen.GenerationStatus.ValueType(0)]), "statuses[0]"),
        (gen.ListGenerationsRequest(statuses=[gen.GenerationStatus.ValueType(99)]), "statuses[0]"),
    ],
)
async def test_bad_list_requests_are_invalid(
    generation_service: GenerationClient, bad: gen.ListGenerationsRequest, field: str
) -> None:
    code, error = await rpc_error(generation_service.stub.ListGenerations(bad))
    assert code == grpc.StatusCode.INVALID_ARGUMENT
    assert fields(error) == [field]


# ----- 2. models ---------------------------------------------------------------------


async def test_an_unknown_checkpoint_is_model_not_found_listing_the_available_ones(
    generation_service: GenerationClient,
) -> None:
    code, error = await rpc_error(generation_service.create(checkpoint="nope.safetensors"))
    assert code == grpc.StatusCode.INVALID_ARGUMENT
    assert error.reason == "MODEL_NOT_FOUND"
    assert fields(error) == ["parameters.checkpoint"]
    assert "nope.safetensors" in error.message
    assert "v1-5-pruned-emaonly.safetensors" in error.message  # what the worker has
    assert await listed(generation_service) == []


async def test_image_of_an_unfinished_generation_or_a_bad_index_is_refused(
    generation_service: GenerationClient,
) -> None:
    stub = generation_service.stub
    generation_service.simulator.sim.set_step_seconds(0.2)
    created = await generation_service.create("to cancel", steps=50)
    await stub.CancelGeneration(gen.CancelGenerationRequest(id=created.id))
    assert (await generation_service.wait(created.id)).status == gen.GENERATION_STATUS_CANCELLED
    code, error = await stream_error(
        stub.GetGenerationImage(gen.GetGenerationImageRequest(id=created.id))
    )
    assert code == grpc.StatusCode.FAILED_PRECONDITION
    assert error.reason == "NOT_COMPLETED"

    generation_service.simulator.sim.set_step_seconds(0.01)
    done = await generation_service.wait((await generation_service.create("ok", steps=1)).id)
    assert done.status == gen.GENERATION_STATUS_COMPLETED
    code, error = await stream_error(
        stub.GetGenerationImage(gen.GetGenerationImageRequest(id=done.id, index=1))
    )
    assert code == grpc.StatusCode.INVALID_ARGUMENT
    assert fields(error) == ["index"]


# ----- 3. idempotency ----------------------------------------------------------------


async def test_the_same_request_id_twice_gives_the_same_generation_and_one_run(
    generation_service: GenerationClient,
) -> None:
    req = request(prompt="once", steps=1, request_id="req-1")
    first = await generation_service.stub.CreateGeneration(req)
    second = await generation_service.stub.CreateGeneration(req)
    assert first.created is True and second.created is False
    assert first.generation.id == second.generation.id
    assert second.generation.request_id == "req-1"
    done = await generation_service.wait(first.generation.id)
    assert done.status == gen.GENERATION_STATUS_COMPLETED
    third = await generation_service.stub.CreateGeneration(req)
    assert third.created is False and third.generation.id == first.generation.id
    assert third.generation.status == gen.GENERATION_STATUS_COMPLETED
    assert len(await listed(generation_service)) == 1
    assert len(generation_service.simulator.sim.runs) == 1
    # The slot each repeat was offered (to dispatch at create) was handed back.
    (worker,) = generation_service.running.workers.workers.values()
    assert worker.in_use == 0


async def test_a_request_id_reused_for_a_different_request_is_already_exists(
    generation_service: GenerationClient,
) -> None:
    first = await generation_service.stub.CreateGeneration(
        request(prompt="first", steps=1, request_id="key-1")
    )
    for different in (
        request(prompt="second", steps=1, request_id="key-1"),
        request(prompt="first", steps=2, request_id="key-1"),
        request(prompt="first", steps=1, request_id="key-1", priority=5),
        request("sdxl-txt2img", prompt="first", steps=1, request_id="key-1"),
    ):
        code, error = await rpc_error(generation_service.stub.CreateGeneration(different))
        assert code == grpc.StatusCode.ALREADY_EXISTS
        assert error.reason == "REQUEST_ID_REUSED"
        assert error.metadata["generation_id"] == first.generation.id
    again = await generation_service.stub.CreateGeneration(
        request(prompt="first", steps=1, request_id="key-1")
    )
    assert again.created is False and again.generation.id == first.generation.id
    # Keys are per caller request: another key with the second body is a new one.
    other = await generation_service.stub.CreateGeneration(
        request(prompt="second", steps=1, request_id="key-2")
    )
    assert other.created is True
    assert len(await listed(generation_service)) == 2


async def test_a_request_id_that_is_too_long_is_invalid(
    generation_service: GenerationClient,
) -> None:
    code, error = await rpc_error(
        generation_service.stub.CreateGeneration(request(prompt="p", request_id="x" * 129))
    )
    assert code == grpc.StatusCode.INVALID_ARGUMENT
    assert fields(error) == ["request_id"]


# ----- 4. paging ---------------------------------------------------------------------


async def test_pages_are_newest_first_without_duplicates_and_filters_work(
    generation_service: GenerationClient,
) -> None:
    created = []
    for n in range(7):
        created.append(await generation_service.create(f"page {n}", steps=1))
    for c in created:
        await generation_service.wait(c.id)
    generation_service.simulator.sim.set_step_seconds(0.2)
    extra = await generation_service.create("cancelled at the end", steps=50)
    await generation_service.stub.CancelGeneration(gen.CancelGenerationRequest(id=extra.id))
    assert (await generation_service.wait(extra.id)).status == gen.GENERATION_STATUS_CANCELLED

    pages: list[list[gen.Generation]] = []
    token = ""
    while True:
        reply = await generation_service.stub.ListGenerations(
            gen.ListGenerationsRequest(
                page_size=3, page_token=token, statuses=[gen.GENERATION_STATUS_COMPLETED]
            )
        )
        pages.append(list(reply.generations))
        token = reply.next_page_token
        if not token:
            break
    assert [len(p) for p in pages] == [3, 3, 1]
    ids = [g.id for p in pages for g in p]
    assert ids == [c.id for c in reversed(created)]
    assert all(g.status == gen.GENERATION_STATUS_COMPLETED for p in pages for g in p)

    everything = await listed(generation_service)
    assert [g.id for g in everything] == [extra.id, *ids]
    cancelled = await listed(generation_service, statuses=[gen.GENERATION_STATUS_CANCELLED])
    assert [g.id for g in cancelled] == [extra.id]
    assert await listed(generation_service, template="img2img") == []
    assert len(await listed(generation_service, template="sd15-txt2img")) == 8


# ----- 5. cancel ---------------------------------------------------------------------


async def test_cancel_queued_dispatched_and_running_generations(
    generation_service: GenerationClient,
) -> None:
    sim = generation_service.simulator.sim
    sim.set_step_seconds(0.2)
    stub = generation_service.stub
    first = await generation_service.create("slow one", steps=50)
    second = await generation_service.create("slow two", steps=50)
    queued = await generation_service.create("waiting in the queue", steps=50)
    # One runs; the other waits in ComfyUI's own queue (lookahead 1); the third
    # stays in ours.
    await until(lambda: sim.running is not None and len(sim.pending) == 1)
    by_prompt = {}
    for g in (first, second):
        reply = await stub.GetGeneration(gen.GetGenerationRequest(id=g.id))
        by_prompt[reply.generation.prompt_id] = g
    running = by_prompt[sim.running.prompt_id]  # type: ignore[union-attr]
    lookahead = by_prompt[sim.pending[0].prompt_id]

    reply = await stub.CancelGeneration(gen.CancelGenerationRequest(id=queued.id))
    assert reply.generation.status == gen.GENERATION_STATUS_CANCELLED
    assert reply.generation.queue_position == 0
    done = await generation_service.wait(queued.id)
    assert done.status == gen.GENERATION_STATUS_CANCELLED
    assert not done.worker and done.attempts == 0

    # The reply comes once the worker has stopped it, and says so.
    reply = await stub.CancelGeneration(gen.CancelGenerationRequest(id=lookahead.id))
    assert reply.generation.status == gen.GENERATION_STATUS_CANCELLED, reply.generation
    assert sim.pending == []

    reply = await stub.CancelGeneration(gen.CancelGenerationRequest(id=running.id))
    assert reply.generation.status == gen.GENERATION_STATUS_CANCELLED, reply.generation
    done = await generation_service.wait(running.id, seconds=5)
    assert done.status == gen.GENERATION_STATUS_CANCELLED, done.error
    # Only the running one ever reached the GPU, and it was cut short.
    (run,) = sim.runs
    assert run.prompt_id == done.prompt_id
    assert run.ended is not None and run.ended - run.started < 5  # 50 x 0.2 s uncut
    assert not done.outputs

    code, error = await rpc_error(stub.CancelGeneration(gen.CancelGenerationRequest(id=running.id)))
    assert code == grpc.StatusCode.FAILED_PRECONDITION
    assert error.reason == "ALREADY_TERMINAL"


async def test_a_cancel_right_after_create_is_not_lost(
    generation_service: GenerationClient,
) -> None:
    """The cancel may reach the worker before the prompt does; it must still
    stop the run rather than let it go on to the end."""
    sim = generation_service.simulator.sim
    sim.set_step_seconds(0.1)
    for n in range(3):
        created = await generation_service.create(f"cancel at once {n}", steps=30)
        await asyncio.sleep(n * 0.005)
        await generation_service.stub.CancelGeneration(gen.CancelGenerationRequest(id=created.id))
        done = await generation_service.wait(created.id, seconds=5)
        assert done.status == gen.GENERATION_STATUS_CANCELLED, n
        assert not done.outputs
    for run in sim.runs:
        assert run.ended is not None and run.ended - run.started < 1.5  # uncut: 3 s


async def test_cancel_of_a_completed_generation_is_failed_precondition(
    generation_service: GenerationClient,
) -> None:
    created = await generation_service.create(steps=1)
    assert (await generation_service.wait(created.id)).status == gen.GENERATION_STATUS_COMPLETED
    code, error = await rpc_error(
        generation_service.stub.CancelGeneration(gen.CancelGenerationRequest(id=created.id))
    )
    assert code == grpc.StatusCode.FAILED_PRECONDITION
    assert error.reason == "ALREADY_TERMINAL"
    again = await generation_service.wait(created.id)
    assert again.status == gen.GENERATION_STATUS_COMPLETED


# ----- 6. access ---------------------------------------------------------------------


async def test_without_a_token_every_call_is_unauthenticated(
    generation_factory: StartGeneration,
) -> None:
    client = await generation_factory(auth_tokens={"tok-a": "alice"})
    stub = client.stub
    for call in (
        stub.CreateGeneration(request(prompt="p")),
        stub.GetGeneration(gen.GetGenerationRequest(id=str(uuid.uuid4()))),
        stub.ListGenerations(gen.ListGenerationsRequest()),
        stub.GetStats(gen.GetStatsRequest()),
    ):
        code, error = await rpc_error(call)
        assert code == grpc.StatusCode.UNAUTHENTICATED
        assert error.reason == "UNAUTHENTICATED"
    code, _ = await rpc_error(
        stub.ListGenerations(
            gen.ListGenerationsRequest(), metadata=[("authorization", "Bearer wrong")]
        )
    )
    assert code == grpc.StatusCode.UNAUTHENTICATED


async def test_callers_see_only_their_own_generations(
    generation_factory: StartGeneration,
) -> None:
    alice = await generation_factory(auth_tokens={"tok-a": "alice", "tok-b": "bob"})
    alice.metadata = [("authorization", "Bearer tok-a")]
    bob_meta = [("authorization", "Bearer tok-b")]
    stub = alice.stub

    hers = await alice.create("alice's", steps=1, request_id="same")
    done = await alice.wait(hers.id)
    assert done.status == gen.GENERATION_STATUS_COMPLETED

    for call in (
        stub.GetGeneration(gen.GetGenerationRequest(id=hers.id), metadata=bob_meta),
        stub.CancelGeneration(gen.CancelGenerationRequest(id=hers.id), metadata=bob_meta),
    ):
        code, error = await rpc_error(call)
        assert code == grpc.StatusCode.NOT_FOUND
        assert error.reason == "GENERATION_NOT_FOUND"
    for stream in (
        stub.WatchGeneration(gen.WatchGenerationRequest(id=hers.id), metadata=bob_meta),
        stub.GetGenerationImage(gen.GetGenerationImageRequest(id=hers.id), metadata=bob_meta),
    ):
        code, error = await stream_error(stream)
        assert code == grpc.StatusCode.NOT_FOUND
        assert error.reason == "GENERATION_NOT_FOUND"

    # The same request_id is a different generation for another caller.
    his = await stub.CreateGeneration(
        request(prompt="bob's", steps=1, request_id="same"), metadata=bob_meta
    )
    assert his.created and his.generation.id != hers.id
    bobs = await stub.ListGenerations(gen.ListGenerationsRequest(), metadata=bob_meta)
    assert [g.id for g in bobs.generations] == [his.generation.id]
    assert [g.id for g in await listed(alice)] == [hers.id]
    # Alice's generation is untouched by bob's attempts.
    assert (await alice.wait(hers.id)).status == gen.GENERATION_STATUS_COMPLETED


async def test_the_per_caller_queue_limit_is_resource_exhausted(
    generation_factory: StartGeneration,
) -> None:
    client = await generation_factory(
        auth_tokens={"tok-a": "alice", "tok-b": "bob"},
        queue={"max_queued_per_principal": 2, "lookahead": 0},
    )
    client.metadata = [("authorization", "Bearer tok-a")]
    sim = client.simulator.sim
    sim.set_step_seconds(0.2)
    first = await client.create("busy", steps=50)
    await until(lambda: sim.running is not None)
    q1 = await client.create("q1", steps=1)
    q2 = await client.create("q2", steps=1, request_id="q2")
    assert (q1.queue_position, q2.queue_position) == (1, 2)
    with pytest.raises(grpc.aio.AioRpcError) as caught:
        await client.create("q3", steps=1)
    assert caught.value.code() == grpc.StatusCode.RESOURCE_EXHAUSTED
    error = from_rpc_error(caught.value)
    assert error.reason == "QUEUE_LIMIT"
    assert len(await listed(client)) == 3
    (worker,) = client.running.workers.workers.values()
    assert worker.in_use == 1  # the running one: a refused create keeps no slot
    # At the limit, a request sent again still gets its generation back.
    again = await client.stub.CreateGeneration(
        request(prompt="q2", steps=1, seed=1, request_id="q2"), metadata=client.metadata
    )
    assert not again.created and again.generation.id == q2.id
    assert again.generation.queue_position == 2
    # Another caller has a queue of their own.
    bob = await client.stub.CreateGeneration(
        request(prompt="bob", steps=1), metadata=[("authorization", "Bearer tok-b")]
    )
    assert bob.created
    await client.stub.CancelGeneration(
        gen.CancelGenerationRequest(id=first.id), metadata=client.metadata
    )


# ----- 7. failures -------------------------------------------------------------------


async def test_out_of_memory_fails_the_generation_naming_the_node(
    generation_service: GenerationClient,
) -> None:
    generation_service.simulator.sim.inject_oom("KSampler")
    created = await generation_service.create("too big", steps=2)
    done = await generation_service.wait(created.id)
    assert done.status == gen.GENERATION_STATUS_FAILED
    assert done.error.reason == "GPU_OUT_OF_MEMORY", done.error
    assert done.error.details["node_type"] == "KSampler"
    assert done.error.details["node_id"] == "3"
    assert done.error.message
    assert done.attempts == 1
    # The next one is fine: the fault was one-shot.
    again = await generation_service.create("smaller", steps=2)
    assert (await generation_service.wait(again.id)).status == gen.GENERATION_STATUS_COMPLETED


# ----- 8. priority -------------------------------------------------------------------


async def test_a_higher_priority_generation_jumps_the_queue(
    generation_service: GenerationClient,
) -> None:
    sim = generation_service.simulator.sim
    sim.set_step_seconds(0.05)
    busy = [await generation_service.create(f"busy {n}", steps=15) for n in range(2)]
    await until(lambda: sim.running is not None and len(sim.pending) == 1)
    low = [await generation_service.create(f"low {n}", steps=1) for n in range(2)]
    high = await generation_service.create("high", steps=1, priority=10)
    assert high.priority == 10
    assert high.queue_position == 1 and low[0].queue_position == 1
    reread = await generation_service.stub.GetGeneration(gen.GetGenerationRequest(id=low[0].id))
    assert reread.generation.queue_position == 2

    done = [await generation_service.wait(g.id) for g in (*busy, high, *low)]
    assert all(d.status == gen.GENERATION_STATUS_COMPLETED for d in done)
    order = [r.prompt_id for r in sim.runs]
    # The two busy ones were both in ComfyUI already; after them, high before low.
    assert set(order[:2]) == {d.prompt_id for d in done[:2]}
    assert order[2:] == [d.prompt_id for d in done[2:]]


# ----- 9. takeover -------------------------------------------------------------------


async def test_a_replica_that_dies_mid_run_is_taken_over_without_a_rerun(
    generation_factory: StartGeneration,
) -> None:
    a = await generation_factory()
    b = await generation_factory(workers=a.workers)
    sim = a.simulator.sim
    sim.set_step_seconds(0.1)
    # Pause B's claiming until A has the job, so A is the one that dies with it.
    await b.running.dispatcher.stop()
    created = await a.create("survives", steps=40)
    await until(lambda: sim.running is not None)
    row = await a.stub.GetGeneration(gen.GetGenerationRequest(id=created.id))
    assert row.generation.attempts == 1

    await a.running.dispatcher.stop()
    await a.running.server.stop(0)
    b.running.dispatcher.start()

    done = await b.wait(created.id, seconds=20)
    assert done.status == gen.GENERATION_STATUS_COMPLETED, done.error
    assert done.attempts == 2
    assert len(sim.runs) == 1 and sim.runs[0].prompt_id == done.prompt_id
    (image,) = done.outputs
    assert image.size_bytes > 0
    chunks = [c async for c in b.stub.GetGenerationImage(gen.GetGenerationImageRequest(id=done.id))]
    assert b"".join(c.data for c in chunks).startswith(b"\x89PNG")
    events = [
        i.event.type
        async for i in b.stub.WatchGeneration(
            gen.WatchGenerationRequest(id=done.id, after_sequence=1)
        )
        if i.HasField("event")
    ]
    assert gen.EVENT_TYPE_TAKEN_OVER in events
    assert events[-1] == gen.EVENT_TYPE_COMPLETED


# ----- 10. watching everything -------------------------------------------------------


async def test_watch_generations_delivers_the_callers_events_only(
    generation_factory: StartGeneration,
) -> None:
    client = await generation_factory(auth_tokens={"tok-a": "alice", "tok-b": "bob"})
    client.metadata = [("authorization", "Bearer tok-a")]
    bob_meta = [("authorization", "Bearer tok-b")]
    stream = client.stub.WatchGenerations(gen.WatchGenerationsRequest(), metadata=client.metadata)
    done_only = client.stub.WatchGenerations(
        gen.WatchGenerationsRequest(statuses=[gen.GENERATION_STATUS_COMPLETED]),
        metadata=client.metadata,
    )
    await asyncio.sleep(0.3)  # both subscribed

    his = await client.stub.CreateGeneration(request(prompt="bob", steps=1), metadata=bob_meta)
    hers = [await client.create(f"alice {n}", steps=1) for n in range(2)]

    seen: dict[str, list[gen.GenerationEvent]] = {}
    async with asyncio.timeout(15):
        async for item in stream:
            seen.setdefault(item.event.generation_id, []).append(item.event)
            if all(seen.get(h.id, [None])[-1].type == gen.EVENT_TYPE_COMPLETED for h in hers):  # type: ignore[union-attr]
                break
    stream.cancel()
    assert set(seen) == {h.id for h in hers}
    assert his.generation.id not in seen
    for h in hers:
        events = seen[h.id]
        assert [e.sequence for e in events] == list(range(1, len(events) + 1))
        assert events[0].type == gen.EVENT_TYPE_CREATED
        assert gen.EVENT_TYPE_STARTED in [e.type for e in events]

    completed = []
    async with asyncio.timeout(15):
        async for item in done_only:
            assert item.event.status == gen.GENERATION_STATUS_COMPLETED
            completed.append(item.event.generation_id)
            if len(completed) == 2:
                break
    done_only.cancel()
    assert sorted(completed) == sorted(h.id for h in hers)


async def test_watch_generations_keeps_each_generations_events_in_order(
    generation_factory: StartGeneration,
) -> None:
    """Many generations on three GPUs at once: no event of any of them is
    delivered before an earlier one of the same generation."""
    client = await generation_factory(gpus=3)
    stream = client.stub.WatchGenerations(gen.WatchGenerationsRequest())
    await asyncio.sleep(0.3)  # subscribed
    created = await asyncio.gather(*(client.create(f"order {n}", steps=3) for n in range(20)))
    wanted = {c.id for c in created}
    seen: dict[str, list[int]] = {}
    finished: set[str] = set()
    async with asyncio.timeout(20):
        async for item in stream:
            seen.setdefault(item.event.generation_id, []).append(item.event.sequence)
            if item.event.type == gen.EVENT_TYPE_COMPLETED:
                finished.add(item.event.generation_id)
                if finished == wanted:
                    break
    stream.cancel()
    out_of_order = {g: s for g, s in seen.items() if s != list(range(1, len(s) + 1))}
    assert not out_of_order
    for c in created:
        assert seen[c.id][-1] == (await client.wait(c.id)).last_event_sequence


# ----- 11. stats ---------------------------------------------------------------------


async def test_stats_count_generations_by_status_and_show_the_workers(
    generation_service: GenerationClient,
) -> None:
    sim = generation_service.simulator.sim
    stats = await generation_service.stub.GetStats(gen.GetStatsRequest())
    assert list(stats.queue) == []
    (state,) = stats.workers
    assert state.name == "gpu0" and state.serving and state.slots_total == 2
    assert state.slots_used == 0 and not stats.dispatch_paused

    finished = await generation_service.create("done", steps=1)
    await generation_service.wait(finished.id)
    sim.set_step_seconds(0.2)
    busy = [await generation_service.create(f"busy {n}", steps=50) for n in range(3)]
    await until(lambda: sim.running is not None and len(sim.pending) == 1)
    stats = await generation_service.stub.GetStats(gen.GetStatsRequest())
    counts = {c.status: c.count for c in stats.queue}
    assert counts[gen.GENERATION_STATUS_COMPLETED] == 1
    assert counts[gen.GENERATION_STATUS_QUEUED] == 1
    assert (
        counts.get(gen.GENERATION_STATUS_RUNNING, 0)
        + counts.get(gen.GENERATION_STATUS_DISPATCHED, 0)
        == 2
    )
    (state,) = stats.workers
    assert state.slots_used == 2
    assert state.last_checkpoint == "v1-5-pruned-emaonly.safetensors"
    for g in busy:
        await generation_service.stub.CancelGeneration(gen.CancelGenerationRequest(id=g.id))
