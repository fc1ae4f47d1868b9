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

Example counts (`EXAMPLES`): 1000-2000 per GenerationService method, fewer
for ComfyWorker calls that each reach ComfyUI (400-800), and 250 raw-bytes
requests for each of the fourteen methods: about 15,700 cases, run ten to a
hypothesis example and concurrently, in about 40 s on two cores. Scale them
with LOCKN_FUZZ_SCALE; LOCKN_FUZZ_SHRINK=1 shrinks a failure (see harness).
"""

from __future__ import annotations

import base64
import json
import math
import uuid
from collections.abc import Awaitable, Callable
from dataclasses import dataclass, field
from datetime import timedelta, timezone
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
    Parameter,
    TemplateLibrary,
)
from tests.fixtures.generation import WORKFLOWS
from tests.fuzz import harness
from tests.fuzz.conftest import FuzzStack
from tests.fuzz.harness import assert_not_broken, assert_rejected, snapshot, streamed, unary
from tests.fuzz.strategies import (
    INT32,
    INT64,
    JSON_VALUES,
    NASTY,
    NOT_IMAGES,
    UINT32,
    VALID_IMAGES,
    big_text,
    boundary_ints,
    hostile_ids,
    hostile_text,
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
    "Execute": 400,
    "Attach": 500,
    "Cancel": 800,
    "raw": 250,  # per method, all fourteen
}
GENERATION = "/lockn.generation.v1.GenerationService/"
WORKER = "/lockn.comfyworker.v1.ComfyWorkerService/"
LIBRARY = TemplateLibrary.load(WORKFLOWS)
T = TypeVar("T")
INVALID = grpc.StatusCode.INVALID_ARGUMENT
NOT_FOUND = grpc.StatusCode.NOT_FOUND


async def fuzz(
    stack: FuzzStack,
    method: str,
    values: st.SearchStrategy[T],
    check: Callable[[T], Awaitable[None]],
) -> None:
    """EXAMPLES[method] cases, each changing nothing; then the servers still answer."""
    await harness.fuzz(values, check, examples=EXAMPLES[method], state=stack.state)
    await stack.assert_serving()


def seeded(stack: FuzzStack, raw: str) -> gen.Generation | None:
    """The seeded generation `raw` names (in any spelling a UUID parser takes)."""
    try:
        wanted = str(uuid.UUID(raw))
    except ValueError:
        return None
    by_id = {g.id: g for g in (stack.completed, stack.with_input, stack.cancelled)}
    return by_id.get(wanted)


# ----- CreateGeneration: a valid request, then one to three hostile mutations ------


TEMPLATES = sorted(t.name for t in LIBRARY.templates())
IMAGE_SUFFIXES = [(".png", "PNG"), (".jpg", "JPEG"), (".webp", "WEBP")]
PLAIN_TEXT = st.text(st.characters(codec="utf-8", exclude_characters="\x00"), max_size=40)
PRINTABLE = st.text(st.characters(min_codepoint=0x21, max_codepoint=0x7E), max_size=8)
# Strategies are built once: hypothesis pays for each new strategy object.
KIND_VALUES: dict[str, st.SearchStrategy[gen.ParameterValue]] = {
    "string_value": hostile_text().map(lambda v: gen.ParameterValue(string_value=v)),
    "int_value": boundary_ints(*INT64).map(lambda v: gen.ParameterValue(int_value=v)),
    "number_value": st.floats().map(lambda v: gen.ParameterValue(number_value=v)),
    "bool_value": st.booleans().map(lambda v: gen.ParameterValue(bool_value=v)),
    "image_name": hostile_text().map(lambda v: gen.ParameterValue(image_name=v)),
}
# The oneof kinds each parameter type must refuse.
WRONG_KINDS = {
    "string": ["int_value", "number_value", "bool_value", "image_name"],
    "enum": ["int_value", "number_value", "bool_value", "image_name"],
    "integer": ["string_value", "number_value", "bool_value", "image_name"],
    "number": ["string_value", "bool_value", "image_name"],
    "boolean": ["string_value", "int_value", "number_value", "image_name"],
    "image": ["string_value", "int_value", "number_value", "bool_value"],
}


def _out_of_range(param: Parameter) -> st.SearchStrategy[gen.ParameterValue]:
    low, high = param.minimum, param.maximum
    assert low is not None and high is not None
    ints = []
    if low > INT64[0]:
        ints.append(st.integers(INT64[0], int(low) - 1))
    if high < INT64[1]:
        ints.append(st.integers(int(high) + 1, INT64[1]))
    values = [st.one_of(ints).map(lambda v: gen.ParameterValue(int_value=v))]
    if param.type == "number":
        floats = st.one_of(
            st.sampled_from([math.nan, math.inf, -math.inf]),
            st.floats(max_value=low, exclude_max=True),
            st.floats(min_value=high, exclude_min=True),
        )
        values.append(floats.map(lambda v: gen.ParameterValue(number_value=v)))
    return st.one_of(values)


PARAMETERS = {(t, p.name): p for t in TEMPLATES for p in LIBRARY.get(t).parameters.values()}
OUT_OF_RANGE = {
    key: _out_of_range(p) for key, p in PARAMETERS.items() if p.type in ("integer", "number")
}
TOO_LONG = {
    p.max_length: big_text(p.max_length + 1, max(p.max_length + 1, 200_000))
    for p in PARAMETERS.values()
    if p.type == "string"
}
NUL_TEXT = st.builds(lambda a, b: f"{a}\x00{b}", PLAIN_TEXT, PLAIN_TEXT)
UNPRINTABLE = st.builds(
    lambda a, c, b: a + c + b,
    PLAIN_TEXT,
    st.characters(categories=["Cc", "Zl", "Zp", "Cf"]),
    PLAIN_TEXT,
)
REQUEST_IDS = st.one_of(big_text(129, 100_000), UNPRINTABLE)
MODEL_PATHS = st.one_of(
    st.sampled_from(NASTY),
    st.builds(
        lambda a, b: f"{a}{b}.safetensors",
        st.sampled_from(["../", "../../models/", "/", "..\\", "checkpoints/../../"]),
        st.text(max_size=10),
    ),
)
DANGLING = st.one_of(st.sampled_from(NASTY), st.text(max_size=20).map(lambda t: "missing-" + t))
OUTSIDE_INT32_PRIORITY = st.one_of(st.integers(INT32[0], -101), st.integers(101, INT32[1]))
ANY_IMAGE = st.sampled_from(list(VALID_IMAGES.values()))


@dataclass
class Draft:
    """A CreateGenerationRequest being spoiled, and what the refusal may name."""

    template: str
    params: dict[str, gen.ParameterValue]
    images: list[gen.InputImage]
    priority: int = 0
    request_id: str = ""
    timeout_seconds: int = 0
    fields: set[str] = field(default_factory=set)
    codes: set[grpc.StatusCode] = field(default_factory=lambda: {INVALID})

    def request(self) -> gen.CreateGenerationRequest:
        return gen.CreateGenerationRequest(
            template=self.template,
            parameters=self.params,
            input_images=self.images,
            priority=self.priority,
            request_id=self.request_id,
            timeout_seconds=self.timeout_seconds,
        )

    def spec(self) -> dict[str, Parameter]:
        return LIBRARY.get(self.template).parameters if self.template in TEMPLATES else {}

    def pick(self, draw: st.DrawFn, *types: str) -> str | None:
        """One of the template's parameters of these types (any type when none)."""
        names = [n for n, p in self.spec().items() if not types or p.type in types]
        return draw(st.sampled_from(names)) if names else None

    def unknown(self, name: str) -> str:
        """`name`, changed just enough to be no parameter of the template."""
        return name if name not in self.spec() else f"{name}-unknown"

    def drop_image(self, name: str) -> None:
        """A parameter no longer naming its input image leaves that image unused."""
        if name in self.spec() and self.spec()[name].type == "image":
            self.fields.add("input_images")


@st.composite
def valid_drafts(draw: st.DrawFn) -> Draft:
    """A request the service would accept (never sent as it is)."""
    template = draw(st.sampled_from(TEMPLATES))
    params: dict[str, gen.ParameterValue] = {}
    images = []
    for name, param in LIBRARY.get(template).parameters.items():
        if param.type == "image":
            suffix, fmt = draw(st.sampled_from(IMAGE_SUFFIXES))
            params[name] = gen.ParameterValue(image_name=f"{name}{suffix}")
            images.append(gen.InputImage(name=f"{name}{suffix}", data=VALID_IMAGES[fmt]))
        elif param.required:
            params[name] = gen.ParameterValue(string_value=draw(PLAIN_TEXT))
    return Draft(
        template,
        params,
        images,
        priority=draw(st.integers(-100, 100)),
        request_id=draw(PRINTABLE),
        timeout_seconds=draw(st.integers(0, 3600)),
    )


def m_template(draw: st.DrawFn, draft: Draft) -> None:
    name = draw(hostile_text())
    draft.template = name if name not in TEMPLATES else f"{name}/.."
    draft.fields.add("template")
    draft.codes.add(NOT_FOUND)


def m_unknown_parameter(draw: st.DrawFn, draft: Draft) -> None:
    name = draft.unknown(draw(hostile_text()))
    draft.params[name] = draw(st.one_of(list(KIND_VALUES.values())))
    # An image_name naming no input is refused before names are looked at.
    draft.fields |= {f"parameters.{name}", "parameters"}


def m_wrong_kind(draw: st.DrawFn, draft: Draft) -> None:
    name = draft.pick(draw, *WRONG_KINDS)
    if name is None:
        return m_unknown_parameter(draw, draft)
    kind = draw(st.sampled_from(WRONG_KINDS[draft.spec()[name].type]))
    draft.params[name] = draw(KIND_VALUES[kind])
    draft.fields |= {f"parameters.{name}", "parameters"}
    draft.drop_image(name)
    return None


def m_out_of_range(draw: st.DrawFn, draft: Draft) -> None:
    name = draft.pick(draw, "integer", "number")
    if name is None:
        return m_unknown_parameter(draw, draft)
    draft.params[name] = draw(OUT_OF_RANGE[draft.template, name])
    draft.fields.add(f"parameters.{name}")
    return None


def m_no_value(draw: st.DrawFn, draft: Draft) -> None:
    name = draft.pick(draw) if draw(st.booleans()) else draft.unknown(draw(hostile_text()))
    name = name or "x"
    draft.params[name] = gen.ParameterValue()
    draft.fields.add(f"parameters.{name}")
    draft.drop_image(name)


def m_bad_text(draw: st.DrawFn, draft: Draft) -> None:
    name = draft.pick(draw, "string")
    if name is None:
        return m_unknown_parameter(draw, draft)
    too_long = TOO_LONG[draft.spec()[name].max_length]
    draft.params[name] = gen.ParameterValue(string_value=draw(st.one_of(too_long, NUL_TEXT)))
    draft.fields.add(f"parameters.{name}")
    return None


def m_bad_choice(draw: st.DrawFn, draft: Draft) -> None:
    name = draft.pick(draw, "enum")
    if name is None:
        return m_unknown_parameter(draw, draft)
    value = draw(hostile_text())
    if value in draft.spec()[name].choices:
        value = f"../{value}"
    draft.params[name] = gen.ParameterValue(string_value=value)
    draft.fields.add(f"parameters.{name}")
    return None


def m_model_path(draw: st.DrawFn, draft: Draft) -> None:
    """Model names that are not a model any worker has, many climbing out of folders."""
    names = [n for n, p in draft.spec().items() if p.model]
    if not names:
        return m_unknown_parameter(draw, draft)
    name = draw(st.sampled_from(names))
    draft.params[name] = gen.ParameterValue(string_value=draw(MODEL_PATHS))
    draft.fields.add(f"parameters.{name}")
    return None


def m_missing_required(draw: st.DrawFn, draft: Draft) -> None:
    required = [n for n, p in draft.spec().items() if p.required]
    if not required:
        return m_unknown_parameter(draw, draft)
    name = draw(st.sampled_from(required))
    draft.params.pop(name, None)
    draft.fields.add(f"parameters.{name}")
    draft.drop_image(name)
    return None


def m_priority(draw: st.DrawFn, draft: Draft) -> None:
    draft.priority = draw(OUTSIDE_INT32_PRIORITY)
    draft.fields.add("priority")


def m_request_id(draw: st.DrawFn, draft: Draft) -> None:
    draft.request_id = draw(REQUEST_IDS)
    draft.fields.add("request_id")


def m_timeout(draw: st.DrawFn, draft: Draft) -> None:
    draft.timeout_seconds = draw(st.integers(3601, UINT32[1]))
    draft.fields.add("timeout_seconds")


def m_image_data(draw: st.DrawFn, draft: Draft) -> None:
    if not draft.images:
        draft.images.append(gen.InputImage(name="extra.png"))
    at = draw(st.integers(0, len(draft.images) - 1))
    draft.images[at] = gen.InputImage(name=draft.images[at].name, data=draw(NOT_IMAGES))
    draft.fields |= {f"input_images[{at}]", "input_images"}


def m_image_name(draw: st.DrawFn, draft: Draft) -> None:
    if not draft.images:
        draft.images.append(gen.InputImage(name="x", data=VALID_IMAGES["PNG"]))
    at = draw(st.integers(0, len(draft.images) - 1))
    old = draft.images[at]
    name = draw(hostile_text())
    draft.images[at] = gen.InputImage(name=name if name != old.name else f"/{name}", data=old.data)
    # Either the name is refused, or parameters now name an image that is not
    # there and the renamed one is used by nothing.
    draft.fields |= {f"input_images[{at}]", "input_images", "parameters"}


def m_too_many_images(draw: st.DrawFn, draft: Draft) -> None:
    extra = draw(st.integers(9, 20)) - len(draft.images)
    draft.images += [
        gen.InputImage(name=f"more-{n}.png", data=VALID_IMAGES["PNG"]) for n in range(extra)
    ]
    draft.fields.add("input_images")


def m_duplicate_image(draw: st.DrawFn, draft: Draft) -> None:
    name = draft.images[0].name if draft.images else "twice.png"
    copies = 1 if draft.images else 2
    draft.images += [gen.InputImage(name=name, data=VALID_IMAGES["PNG"])] * copies
    draft.fields |= {f"input_images[{n}]" for n in range(len(draft.images))} | {"input_images"}


def m_unused_image(draw: st.DrawFn, draft: Draft) -> None:
    name = f"unused-{len(draft.images)}.png"
    draft.images.append(gen.InputImage(name=name, data=draw(ANY_IMAGE)))
    draft.fields.add("input_images")


def m_dangling_image(draw: st.DrawFn, draft: Draft) -> None:
    name = draft.pick(draw) or "image"
    draft.params[name] = gen.ParameterValue(image_name=draw(DANGLING))
    draft.fields.add("parameters")
    draft.drop_image(name)


MUTATIONS: list[Callable[[st.DrawFn, Draft], None]] = [
    m_template,
    m_unknown_parameter,
    m_wrong_kind,
    m_out_of_range,
    m_no_value,
    m_bad_text,
    m_bad_choice,
    m_model_path,
    m_missing_required,
    m_priority,
    m_request_id,
    m_timeout,
    m_image_data,
    m_image_name,
    m_too_many_images,
    m_duplicate_image,
    m_unused_image,
    m_dangling_image,
]


@st.composite
def hostile_creates(draw: st.DrawFn) -> Draft:
    draft = draw(valid_drafts())
    # Each mutation makes the request invalid by itself, whatever came before.
    for mutate in draw(st.lists(st.sampled_from(MUTATIONS), min_size=1, max_size=3)):
        mutate(draw, draft)
    return draft


async def test_create_generation(fuzz_stack: FuzzStack) -> None:
    async def check(draft: Draft) -> None:
        outcome = await unary(fuzz_stack.stub.CreateGeneration(draft.request()))
        assert_rejected(outcome, draft.fields, draft.codes)

    await fuzz(fuzz_stack, "CreateGeneration", hostile_creates(), check)


# ----- reads by id ---------------------------------------------------------------


async def test_get_generation(fuzz_stack: FuzzStack) -> None:
    async def check(raw: str) -> None:
        outcome = await unary(fuzz_stack.stub.GetGeneration(gen.GetGenerationRequest(id=raw)))
        known = seeded(fuzz_stack, raw)
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
        if seeded(fuzz_stack, raw) is not None:
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
        known = seeded(fuzz_stack, raw)
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
        known = seeded(fuzz_stack, raw)
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


def _pack(value: Any) -> str:
    """`value` as a page token is spelt: JSON (or raw bytes), URL-safe base64."""
    text = value if isinstance(value, bytes) else json.dumps(value).encode()
    return base64.urlsafe_b64encode(text).decode().rstrip("=")


ZONES = st.builds(
    lambda minutes: timezone(timedelta(minutes=minutes)), st.integers(-23 * 60, 23 * 60)
)
MOMENTS = st.one_of(
    st.datetimes().map(lambda d: d.isoformat()),
    st.datetimes(timezones=ZONES).map(lambda d: d.isoformat()),
    st.sampled_from(["0001-01-01T00:00:00+14:00", "9999-12-31T23:59:59-14:00", "", "now"]),
    hostile_text(),
)
FORGED_TOKENS = st.one_of(
    hostile_text(),
    JSON_VALUES.map(_pack),
    st.tuples(MOMENTS, st.one_of(st.uuids().map(str), hostile_text(), JSON_VALUES)).map(
        lambda pair: _pack(list(pair))
    ),
    st.integers(1, 10_000).map(lambda depth: _pack(b"[" * depth + b"]" * depth)),
    st.binary(max_size=80).map(_pack),
)


def page_tokens(real: str) -> st.SearchStrategy[str]:
    """Tokens the service never issued: garbage, the right shape with wrong
    contents, and a real token cut short or with a character changed."""
    return st.one_of(
        FORGED_TOKENS,
        st.integers(0, len(real) - 1).map(lambda n: real[:n] or "x"),
        st.tuples(st.integers(0, len(real) - 1), st.characters(codec="utf-8")).map(
            lambda c: real[: c[0]] + c[1] + real[c[0] + 1 :]
        ),
    )


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
    fields = ({"job_id"} if bad_job else set()) | ({"graph_json"} if not graph else set())
    request = worker.ExecuteRequest(
        job_id=job_id,
        graph_json=graph,
        input_images=draw(WORKER_IMAGES),
        timeout_seconds=draw(boundary_ints(*UINT32)),
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


PROMPT_ID = st.from_regex(r"\A[A-Za-z0-9_-]{1,128}\Z")


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
