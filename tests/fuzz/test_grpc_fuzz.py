"""Hostile input against every gRPC method of GenerationService and ComfyWorker.

One stack serves the whole module (tests/fuzz/conftest.py). Each test draws
`EXAMPLES[method]` hostile requests with hypothesis (derandomized, so CI
sees the same cases every run) and checks every one of them:

- the answer is a clean refusal: INVALID_ARGUMENT naming the field (a
  BadRequest violation), NOT_FOUND, FAILED_PRECONDITION or RESOURCE_EXHAUSTED,
  with our ErrorInfo; never INTERNAL or UNKNOWN. Reads of generations that
  exist may answer OK, and then with exactly what was asked for;
- nothing was written: row counts and contents of generations,
  generation_events and generation_inputs, and the image store, are as
  before; ComfyUI ran nothing and the worker follows nothing;
- the servers still answer afterwards.

Methods without request fields (ListTemplates, GetStats, GetSystemStats,
ListModels) meet their hostile input as raw bytes, as every method does:
malformed protobuf, invalid UTF-8 in strings, unknown and mistyped fields.

Example counts (`EXAMPLES`): 1000-2000 typed requests per method with
request fields, and 1000 raw-bytes requests for each of the fourteen methods:
about 26,500 cases, run ten to a hypothesis example and concurrently, in
about 2 minutes on two cores. Scale them with LOCKN_FUZZ_SCALE;
LOCKN_FUZZ_SHRINK=1 shrinks a failure (see harness).
"""

from __future__ import annotations

import json
import re
from collections.abc import Awaitable, Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any, TypeVar

import grpc
import pytest
from google.protobuf.message import DecodeError
from hypothesis import strategies as st

from services.comfy_worker.executor import prompt_id_for
from services.contracts import gen, worker
from services.generation.templates import (
    TEMPLATE_NAME,
)
from tests.fuzz import harness
from tests.fuzz.conftest import FuzzStack
from tests.fuzz.creates import (
    ANY_IMAGE,
    INVALID,
    LIBRARY,
    MODEL_PATHS,
    NOT_FOUND,
    TEMPLATES,
    Draft,
    hostile_creates,
)
from tests.fuzz.harness import assert_not_broken, assert_rejected, snapshot, streamed, unary
from tests.fuzz.strategies import (
    INT32,
    INT64,
    JSON_VALUES,
    NOT_IMAGES,
    UINT32,
    VALID_IMAGES,
    big_text,
    boundary_ints,
    hostile_ids,
    hostile_text,
    page_tokens,
    raw_requests,
)

pytestmark = pytest.mark.asyncio(loop_scope="module")

EXAMPLES = {
    "CreateGeneration": 2000,
    "GetGeneration": 1500,
    "ListGenerations": 1500,
    "CancelGeneration": 1000,
    "GetGenerationImage": 1000,
    "WatchGeneration": 1000,
    "WatchGenerations": 1500,
    "Execute": 1000,
    "Attach": 1000,
    "Cancel": 1000,
    "raw": 1000,  # per method, all fourteen
}
GENERATION = "/lockn.generation.v1.GenerationService/"
WORKER = "/lockn.comfyworker.v1.ComfyWorkerService/"
T = TypeVar("T")


async def fuzz(
    stack: FuzzStack,
    method: str,
    values: st.SearchStrategy[T],
    check: Callable[[T], Awaitable[None]],
) -> None:
    """EXAMPLES[method] cases, each changing nothing; then the servers still answer."""
    await harness.fuzz(values, check, examples=EXAMPLES[method], state=stack.state)
    await stack.assert_serving()


# ----- CreateGeneration: a valid request, then one to three hostile mutations ------


async def test_create_generation(fuzz_stack: FuzzStack) -> None:
    async def check(draft: Draft) -> None:
        outcome = await unary(fuzz_stack.stub.CreateGeneration(draft.request()))
        assert_rejected(outcome, draft.fields, draft.codes)

    await fuzz(fuzz_stack, "CreateGeneration", hostile_creates(), check)


# ----- reads by id ---------------------------------------------------------------


async def test_get_generation(fuzz_stack: FuzzStack) -> None:
    async def check(raw: str) -> None:
        outcome = await unary(fuzz_stack.stub.GetGeneration(gen.GetGenerationRequest(id=raw)))
        known = fuzz_stack.seeded(raw)
        if known is not None and outcome.ok:
            assert outcome.responses[0].generation == known
            return
        assert_rejected(outcome, {"id"}, {INVALID, NOT_FOUND})

    await fuzz(fuzz_stack, "GetGeneration", hostile_ids(fuzz_stack.known_ids), check)


async def test_cancel_generation(fuzz_stack: FuzzStack) -> None:
    # Every seeded generation is finished: cancelling one changes nothing.
    async def check(raw: str) -> None:
        request = gen.CancelGenerationRequest(id=raw)
        outcome = await unary(fuzz_stack.stub.CancelGeneration(request))
        codes = {INVALID, NOT_FOUND}
        if fuzz_stack.seeded(raw) is not None:
            codes = {grpc.StatusCode.FAILED_PRECONDITION}
        assert_rejected(outcome, {"id"}, codes)

    await fuzz(fuzz_stack, "CancelGeneration", hostile_ids(fuzz_stack.known_ids), check)


async def test_get_generation_image(fuzz_stack: FuzzStack) -> None:
    finished = (fuzz_stack.completed, fuzz_stack.with_input)
    stored = {g.id: Path(g.outputs[0].path).read_bytes() for g in finished}

    async def check(case: tuple[str, int]) -> None:
        raw, index = case
        request = gen.GetGenerationImageRequest(id=raw, index=index)
        outcome = await streamed(fuzz_stack.stub.GetGenerationImage(request))
        known = fuzz_stack.seeded(raw)
        if known is not None and known.status == gen.GENERATION_STATUS_COMPLETED and index == 0:
            assert outcome.ok, outcome
            assert b"".join(r.data for r in outcome.responses) == stored[known.id]
            return
        codes = {INVALID, NOT_FOUND}
        if known is not None and known.status != gen.GENERATION_STATUS_COMPLETED:
            codes = {grpc.StatusCode.FAILED_PRECONDITION}
        assert_rejected(outcome, {"id", "index"}, codes)

    cases = st.tuples(hostile_ids(fuzz_stack.known_ids), boundary_ints(*INT32))
    await fuzz(fuzz_stack, "GetGenerationImage", cases, check)


async def test_watch_generation(fuzz_stack: FuzzStack) -> None:
    async def check(case: tuple[str, int]) -> None:
        raw, after = case
        request = gen.WatchGenerationRequest(id=raw, after_sequence=after)
        outcome = await streamed(fuzz_stack.stub.WatchGeneration(request))
        known = fuzz_stack.seeded(raw)
        if known is not None and 0 <= after <= known.last_event_sequence:
            # A finished generation's stream: the snapshot, the events after
            # `after`, and its end.
            assert outcome.ok, outcome
            assert outcome.responses[0].snapshot.id == known.id
            sequences = [r.event.sequence for r in outcome.responses[1:]]
            assert sequences == list(range(after + 1, known.last_event_sequence + 1))
            return
        assert_rejected(outcome, {"id", "after_sequence"}, {INVALID, NOT_FOUND})

    cases = st.tuples(
        hostile_ids(fuzz_stack.known_ids),
        st.one_of(boundary_ints(*INT64), st.integers(-2, 12)),
    )
    await fuzz(fuzz_stack, "WatchGeneration", cases, check)


# ----- listing and watching many ---------------------------------------------------


# Status filters: the six real statuses mixed with any other int32.
STATUS_LISTS = st.lists(st.one_of(st.integers(1, 6), boundary_ints(*INT32)), max_size=8)


async def test_list_generations(fuzz_stack: FuzzStack) -> None:
    real = fuzz_stack.page_token
    known = set(fuzz_stack.known_ids)

    async def check(request: gen.ListGenerationsRequest) -> None:
        outcome = await unary(fuzz_stack.stub.ListGenerations(request))
        if outcome.ok:
            # A well-formed request: answered from the seeded rows only.
            listed = outcome.responses[0].generations
            assert {g.id for g in listed} <= known
            assert len(listed) <= (request.page_size or 50)
            return
        fields = {"page_size", "page_token", "statuses", "template"}
        assert_rejected(outcome, fields, {INVALID})

    requests = st.builds(
        gen.ListGenerationsRequest,
        page_size=boundary_ints(*INT32),
        page_token=st.one_of(st.just(""), st.just(real), page_tokens(real)),
        statuses=STATUS_LISTS,
        template=st.one_of(st.just(""), st.sampled_from(TEMPLATES), hostile_text()),
    )
    await fuzz(fuzz_stack, "ListGenerations", requests, check)


def _invalid_watch(request: gen.WatchGenerationsRequest) -> bool:
    bad_status = any(not 1 <= s <= 6 for s in request.statuses)
    return bad_status or not TEMPLATE_NAME.fullmatch(request.template or "x")


async def test_watch_generations(fuzz_stack: FuzzStack) -> None:
    # A valid filter opens a stream that never ends by itself; every drawn
    # request is invalid, so each must be refused at once.
    async def check(request: gen.WatchGenerationsRequest) -> None:
        outcome = await streamed(fuzz_stack.stub.WatchGenerations(request), seconds=5)
        assert_rejected(outcome, {"statuses", "template"}, {INVALID})
        assert not outcome.responses

    requests = st.builds(
        gen.WatchGenerationsRequest,
        statuses=STATUS_LISTS,
        template=st.one_of(st.just(""), st.sampled_from(TEMPLATES), hostile_text()),
    ).filter(_invalid_watch)
    await fuzz(fuzz_stack, "WatchGenerations", requests, check)


# ----- ComfyWorker -----------------------------------------------------------------


def _graph_with(node: str, name: str, value: Any) -> str:
    """sd15-txt2img's real graph with one input of one node set to `value`."""
    graph = LIBRARY.resolve("sd15-txt2img", {"prompt": "x", "seed": 1, "steps": 1}).graph
    graph[node]["inputs"][name] = value
    return json.dumps(graph)


# graph_json that ComfyUI must never run: not JSON, not an object, nodes that
# are not nodes, unknown classes, and model names that climb out.
HOSTILE_GRAPHS = st.one_of(
    hostile_text().filter(bool),
    JSON_VALUES.map(json.dumps).filter(lambda t: t != "{}"),
    st.dictionaries(st.text(max_size=5), JSON_VALUES, min_size=1).map(json.dumps),
    st.integers(1, 100_000).map(lambda n: "[" * n + "]" * n),
    st.integers(1, 100_000).map(lambda n: '{"a":' * n + "1" + "}" * n),
    st.builds(
        lambda cls, node: json.dumps({node: {"class_type": cls, "inputs": {}}}),
        hostile_text().filter(bool),
        st.text(max_size=5),
    ),
    MODEL_PATHS.map(lambda name: _graph_with("4", "ckpt_name", name)),
    hostile_text().map(lambda name: _graph_with("3", "sampler_name", name)),
)


# The worker takes image bytes as they come (GenerationService checked them);
# names are another matter: each becomes a file name in ComfyUI.
WORKER_IMAGES = st.lists(
    st.builds(worker.InputImage, name=hostile_text(), data=st.one_of(NOT_IMAGES, ANY_IMAGE)),
    max_size=3,
)


PROMPT_ID = st.from_regex(r"\A[A-Za-z0-9_-]{1,128}\Z")


@dataclass
class ExecuteCase:
    request: worker.ExecuteRequest
    fields: set[str]


@st.composite
def hostile_executes(draw: st.DrawFn) -> ExecuteCase:
    job_ok = st.text(min_size=1, max_size=200).filter(lambda j: 1 <= len(j) <= 200)
    bad_job = draw(st.booleans())
    job_id = draw(
        st.one_of(st.just(""), big_text(201, 10_000))
        if bad_job
        else st.builds(lambda j: f"fuzz-{j}"[:200], job_ok)
    )
    graph = draw(st.one_of(st.just(""), HOSTILE_GRAPHS))
    theirs = draw(st.one_of(st.just(""), PROMPT_ID, hostile_text()))
    fields = ({"job_id"} if bad_job else set()) | ({"graph_json"} if not graph else set())
    if theirs and not re.fullmatch(r"[A-Za-z0-9_-]{1,128}", theirs):
        fields.add("comfyui_prompt_id")
    request = worker.ExecuteRequest(
        job_id=job_id,
        graph_json=graph,
        input_images=draw(WORKER_IMAGES),
        timeout_seconds=draw(boundary_ints(*UINT32)),
        comfyui_prompt_id=theirs,
    )
    return ExecuteCase(request, fields)


async def test_worker_execute(fuzz_stack: FuzzStack) -> None:
    async def check(case: ExecuteCase) -> None:
        outcome = await streamed(fuzz_stack.worker_stub.Execute(case.request), seconds=15)
        if case.fields:
            assert_rejected(outcome, case.fields, {INVALID})
            return
        # A graph ComfyUI refuses (or that never reaches it) ends the stream
        # with one `failed` event naming the reason, never with a crash.
        assert outcome.ok, outcome
        events = [r.event for r in outcome.responses]
        assert len(events) == 1 and events[0].HasField("failed"), events
        failed = events[0].failed
        assert failed.reason in ("INVALID_WORKFLOW", "MODEL_NOT_FOUND"), failed
        assert not failed.retryable and failed.prompt_id == prompt_id_for(case.request.job_id)

    await fuzz(fuzz_stack, "Execute", hostile_executes(), check)


async def test_worker_attach(fuzz_stack: FuzzStack) -> None:
    async def check(request: worker.AttachRequest) -> None:
        outcome = await streamed(fuzz_stack.worker_stub.Attach(request), seconds=15)
        if outcome.ok:
            # A well-formed id ComfyUI does not know: one `failed` event, the
            # prompt is lost; nothing is asked of ComfyUI but where it is.
            events = [r.event for r in outcome.responses]
            assert len(events) == 1 and events[0].failed.reason == "PROMPT_LOST", events
            return
        assert_rejected(outcome, {"prompt_id"}, {INVALID})

    requests = st.builds(
        worker.AttachRequest,
        job_id=hostile_text(),
        prompt_id=st.one_of(hostile_text(), PROMPT_ID),
        timeout_seconds=boundary_ints(*UINT32),
    )
    await fuzz(fuzz_stack, "Attach", requests, check)


async def test_worker_cancel(fuzz_stack: FuzzStack) -> None:
    async def check(request: worker.CancelRequest) -> None:
        outcome = await unary(fuzz_stack.worker_stub.Cancel(request))
        if outcome.ok:
            assert outcome.responses[0].outcome == worker.CANCEL_OUTCOME_NOT_FOUND
            return
        assert_rejected(outcome, {"prompt_id"}, {INVALID})

    requests = st.builds(
        worker.CancelRequest, prompt_id=st.one_of(hostile_text(), PROMPT_ID, st.uuids().map(str))
    )
    await fuzz(fuzz_stack, "Cancel", requests, check)


# ----- bytes that are not the message at all ------------------------------------------

METHODS: list[tuple[str, bool, Any]] = [
    (GENERATION + "CreateGeneration", False, gen.CreateGenerationRequest),
    (GENERATION + "GetGeneration", False, gen.GetGenerationRequest),
    (GENERATION + "ListGenerations", False, gen.ListGenerationsRequest),
    (GENERATION + "CancelGeneration", False, gen.CancelGenerationRequest),
    (GENERATION + "GetGenerationImage", True, gen.GetGenerationImageRequest),
    (GENERATION + "WatchGeneration", True, gen.WatchGenerationRequest),
    (GENERATION + "WatchGenerations", True, gen.WatchGenerationsRequest),
    (GENERATION + "ListTemplates", False, gen.ListTemplatesRequest),
    (GENERATION + "GetStats", False, gen.GetStatsRequest),
    (WORKER + "Execute", True, worker.ExecuteRequest),
    (WORKER + "Attach", True, worker.AttachRequest),
    (WORKER + "Cancel", False, worker.CancelRequest),
    (WORKER + "GetSystemStats", False, worker.GetSystemStatsRequest),
    (WORKER + "ListModels", False, worker.ListModelsRequest),
]


def _never_ends(message_type: Any, data: bytes) -> bool:
    """Whether `data` decodes to a WatchGenerations that would rightly stay open."""
    if message_type is not gen.WatchGenerationsRequest:
        return False
    try:
        return not _invalid_watch(message_type.FromString(data))
    except DecodeError:
        return False


def _as_is(data: bytes) -> bytes:
    """The (de)serializer of a call that sends and receives raw bytes."""
    return data


@pytest.mark.parametrize(
    ("method", "stream", "message_type"), METHODS, ids=[m.split(".")[-1] for m, _, _ in METHODS]
)
async def test_raw_bytes(
    fuzz_stack: FuzzStack, method: str, stream: bool, message_type: Any
) -> None:
    """Arbitrary bytes as the request: malformed protobuf is INVALID_ARGUMENT,
    bytes that happen to decode are judged as that message; never a crash."""
    target = fuzz_stack.worker_channel if method.startswith(WORKER) else fuzz_stack.channel
    as_stream = target.unary_stream(method, request_serializer=_as_is, response_deserializer=_as_is)
    as_unary = target.unary_unary(method, request_serializer=_as_is, response_deserializer=_as_is)

    async def check(data: bytes) -> None:
        if stream:
            outcome = await streamed(as_stream(data), seconds=15)
        else:
            outcome = await unary(as_unary(data))
        assert_not_broken(outcome)
        try:
            message_type.FromString(data)
        except DecodeError:
            assert_rejected(outcome, {"request"}, {INVALID})
        if outcome.code == INVALID:
            assert outcome.violations, outcome

    values = raw_requests().filter(lambda data: not _never_ends(message_type, data))
    await fuzz(fuzz_stack, "raw", values, check)


# ----- oversized messages ---------------------------------------------------------


async def test_oversized_messages(fuzz_stack: FuzzStack) -> None:
    """Beyond the message limit (64 MiB) gRPC refuses with RESOURCE_EXHAUSTED;
    under it, each per-field limit answers INVALID_ARGUMENT naming the field."""
    before = await snapshot(fuzz_stack.db, fuzz_stack.outputs)
    # Our client's own limit would stop the send: this one has none.
    channel = grpc.aio.insecure_channel(
        fuzz_stack.address, options=[("grpc.max_send_message_length", -1)]
    )
    try:
        create = channel.unary_unary(
            GENERATION + "CreateGeneration",
            request_serializer=gen.CreateGenerationRequest.SerializeToString,
            response_deserializer=gen.CreateGenerationResponse.FromString,
        )
        img2img = {"prompt": gen.ParameterValue(string_value="x")}
        big_image = gen.InputImage(name="in.png", data=VALID_IMAGES["PNG"] + b"\0" * (16 << 20))
        cases: list[tuple[gen.CreateGenerationRequest, set[str], set[grpc.StatusCode]]] = [
            (
                gen.CreateGenerationRequest(
                    template="img2img",
                    parameters={**img2img, "image": gen.ParameterValue(image_name="in.png")},
                    input_images=[big_image],
                ),
                {"input_images[0].data"},
                {INVALID},
            ),
            (
                gen.CreateGenerationRequest(
                    template="sd15-txt2img",
                    parameters={"prompt": gen.ParameterValue(string_value="p" * (40 << 20))},
                ),
                {"parameters.prompt"},
                {INVALID},
            ),
            (
                gen.CreateGenerationRequest(
                    template="sd15-txt2img",
                    parameters={"prompt": gen.ParameterValue(string_value="p" * (65 << 20))},
                ),
                set(),
                {grpc.StatusCode.RESOURCE_EXHAUSTED},
            ),
        ]
        for request, fields, codes in cases:
            outcome = await unary(create(request, timeout=60))
            if outcome.code == grpc.StatusCode.RESOURCE_EXHAUSTED:
                # Refused by gRPC itself before any of our code saw it.
                assert codes == {grpc.StatusCode.RESOURCE_EXHAUSTED}, outcome
                assert "larger than max" in outcome.message, outcome
            else:
                assert_rejected(outcome, fields, codes)
            assert await snapshot(fuzz_stack.db, fuzz_stack.outputs) == before
        # A string whose length varint claims 2**63 bytes and more.
        raw = channel.unary_unary(GENERATION + "GetGeneration")
        outcome = await unary(raw(b"\x0a" + b"\xff" * 9 + b"\x01", timeout=10))
        assert_rejected(outcome, {"request"}, {INVALID})
    finally:
        await channel.close()
    await fuzz_stack.assert_serving()
