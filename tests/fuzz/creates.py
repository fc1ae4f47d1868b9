"""Hostile CreateGenerationRequests, shared by the gRPC and HTTP fuzz suites:
a request the service would accept, spoiled by one to three mutations, each
of which makes it invalid by itself and records what the refusal may name."""

from __future__ import annotations

import math
from collections.abc import Callable
from dataclasses import dataclass, field

import grpc
from hypothesis import strategies as st

from services.contracts import gen
from services.generation.templates import Parameter, TemplateLibrary
from tests.fixtures.generation import WORKFLOWS
from tests.fuzz.strategies import (
    INT32,
    INT64,
    NASTY,
    NOT_IMAGES,
    UINT32,
    VALID_IMAGES,
    big_text,
    boundary_ints,
    hostile_text,
)

LIBRARY = TemplateLibrary.load(WORKFLOWS)
INVALID = grpc.StatusCode.INVALID_ARGUMENT
NOT_FOUND = grpc.StatusCode.NOT_FOUND
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
    draft.fields.add(f"parameters.{name}")
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
