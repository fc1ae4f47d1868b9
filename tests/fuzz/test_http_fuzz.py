"""Hostile input against every route of the HTTP gateway.

One stack serves the whole module (tests/fuzz/conftest.py): GenerationService
with finished generations to aim at, and two gateways in front of it (the
default one, and one taking bodies up to SMALL_BODY bytes). Each test draws
about `EXAMPLES[route]` hostile requests with hypothesis (derandomized) and
checks every answer:

- never a 5xx; every refusal is a JSON body `{"error": {"reason", "message"}}`
  with a reason, and a 400 lists field violations naming the field (or the
  header, the query parameter, or "body");
- hostile JSON bodies (the gRPC suite's spoiled CreateGenerationRequests as
  JSON, wrong JSON types, unknown keys, lone surrogates, deep nesting), bodies
  that are not JSON, bodies over the size limit (413), bad ids in paths,
  bad page_size / status / page_token / index query parameters, bad
  Last-Event-ID headers and Authorization headers gRPC cannot carry;
- nothing is written (queue tables, image store, ComfyUI), and the servers
  still answer afterwards.

Example counts (`EXAMPLES`): 1500 create bodies, 1000 per other route (and
1000 each for wrong methods and for body sizes around the limit), about
13,500 requests in all, in about 80 s on two cores (LOCKN_FUZZ_SCALE scales
them).
"""

from __future__ import annotations

import asyncio
import base64
import json
from collections.abc import Awaitable, Callable, Collection
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any
from urllib.parse import quote, unquote

import pytest
from hypothesis import strategies as st
from yarl import URL

from gateway.convert import parameter_json
from services.contracts import gen
from tests.fuzz import harness
from tests.fuzz.conftest import SMALL_BODY, FuzzGateway
from tests.fuzz.creates import NOT_FOUND, TEMPLATES, Draft, hostile_creates
from tests.fuzz.harness import names_field
from tests.fuzz.strategies import (
    INVALID_UTF8,
    JSON_VALUES,
    NASTY,
    hostile_ids,
    hostile_text,
    page_tokens,
)

pytestmark = pytest.mark.asyncio(loop_scope="module")

EXAMPLES = {
    "create": 1500,
    "list": 1000,
    "get": 1000,
    "cancel": 1000,
    "image": 1000,
    "events": 1000,
    "fixed": 5000,  # 1000 for each of the five
    "methods": 1000,
    "sizes": 1000,
}
KNOWN_KEYS = ["template", "parameters", "priority", "request_id", "timeout_seconds"]
# aiohttp's HTTP parser refuses a request line over 8190 bytes itself, in
# plain text, before the gateway sees it (test_over_long_lines): an escaped
# path segment, and a whole query, are cut to this, keeping lines below that.
MAX_ESCAPED = 3500
FIXED_ROUTES = ["/api/templates", "/api/stats", "/healthz", "/readyz", "/openapi.json"]


# ----- requests and answers -----------------------------------------------------------


@dataclass
class Case:
    """One request, and what a refusal of it may be."""

    method: str
    target: str  # path and query, already percent-encoded as they go on the wire
    body: bytes | None = None
    headers: dict[str, str] = field(default_factory=dict)
    statuses: set[int] = field(default_factory=lambda: {400})
    fields: set[str] = field(default_factory=set)
    small: bool = False  # to the gateway with the small body limit

    def __repr__(self) -> str:
        body = self.body if self.body is None or len(self.body) < 300 else self.body[:300]
        return f"Case({self.method} {self.target[:300]!r} {self.headers} body={body!r})"


# The gateway takes a create's body as JSON only (415 otherwise).
JSON = {"Content-Type": "application/json"}


@dataclass
class Reply:
    status: int
    content_type: str
    body: bytes

    def __str__(self) -> str:
        return f"{self.status} {self.content_type} {self.body[:600]!r}"


async def send(gateway: FuzzGateway, case: Case) -> Reply:
    base = gateway.small_url if case.small else gateway.url
    url = URL(base + case.target, encoded=True)
    async with (
        asyncio.timeout(15),
        gateway.session.request(case.method, url, data=case.body, headers=case.headers) as response,
    ):
        return Reply(response.status, response.content_type, await response.read())


def assert_refused(reply: Reply, statuses: Collection[int], fields: Collection[str] = ()) -> None:
    """A clean refusal: an expected status, a JSON error with a reason, and a
    400 naming one of `fields` among its field violations."""
    assert reply.status < 500, f"server error: {reply}"
    assert reply.status in statuses, f"expected one of {sorted(statuses)}: {reply}"
    assert reply.content_type == "application/json", str(reply)
    error = json.loads(reply.body)["error"]
    assert isinstance(error["reason"], str) and error["reason"], str(reply)
    assert isinstance(error["message"], str), str(reply)
    if reply.status == 400:
        named = [v["field"] for v in error["field_violations"]]
        assert named, str(reply)
        if fields:
            assert any(names_field(n, f) for n in named for f in fields), (
                f"expected a violation of {sorted(fields)}: {reply}"
            )


async def fuzz(
    gateway: FuzzGateway,
    route: str,
    cases: st.SearchStrategy[Case],
    check: Callable[[Case], Awaitable[None]] | None = None,
) -> None:
    """EXAMPLES[route] requests, each refused cleanly (or, for reads that may
    succeed, checked by `check`) and changing nothing."""

    async def default(case: Case) -> None:
        assert_refused(await send(gateway, case), case.statuses, case.fields)

    await harness.fuzz(cases, check or default, examples=EXAMPLES[route], state=gateway.stack.state)
    await gateway.stack.assert_serving()
    for target in FIXED_ROUTES:
        assert (await send(gateway, Case("GET", target))).status == 200


def segment(value: str) -> str:
    """`value` as one path segment or query value: every byte outside the
    unreserved characters escaped, cut to MAX_ESCAPED (perhaps mid-escape)."""
    return quote(value, safe="")[:MAX_ESCAPED]


# Path segments as a hostile client writes them: escaped, or raw where the
# raw text can travel (dots and slashes among it, which must not be resolved).
RAW_SEGMENTS = st.sampled_from(
    ["..", ".", "%2e%2e", "..%2f..%2fetc", "%2F", "%00", "%ff%fe", "%", "%zz", "a;b", "~"]
)


def id_segments(known: list[str]) -> st.SearchStrategy[str]:
    return st.one_of(hostile_ids(known).map(segment), RAW_SEGMENTS)


def seeded(gateway: FuzzGateway, raw_segment: str) -> gen.Generation | None:
    """The seeded generation a path segment names, as the gateway decodes it."""
    return gateway.stack.seeded(unquote(raw_segment, errors="replace"))


# ----- POST /api/generations ---------------------------------------------------------


def draft_body(draft: Draft) -> dict[str, Any]:
    """A spoiled CreateGenerationRequest as the gateway's JSON."""
    body: dict[str, Any] = {
        "template": draft.template,
        "parameters": {name: parameter_json(v) for name, v in draft.params.items()},
        "priority": draft.priority,
        "request_id": draft.request_id,
        "timeout_seconds": draft.timeout_seconds,
    }
    if draft.images:
        body["input_images"] = [
            {"name": i.name, "data_base64": base64.b64encode(i.data).decode()} for i in draft.images
        ]
    return body


def encode(body: Any) -> bytes:
    # Python's json writes NaN/Infinity and \ud800 escapes for lone surrogates,
    # as a careless client would; the gateway's json.loads reads them back.
    return json.dumps(body).encode()


@st.composite
def drafted_creates(draw: st.DrawFn) -> Case:
    draft = draw(hostile_creates())
    statuses = {400} | ({404} if NOT_FOUND in draft.codes else set())
    return Case("POST", "/api/generations", encode(draft_body(draft)), JSON, statuses, draft.fields)


# Values no parameter can take over JSON, and values of the wrong JSON type
# for each top-level key.
NOT_PARAMETERS = st.one_of(
    st.none(),
    st.lists(JSON_VALUES, max_size=3),
    st.dictionaries(st.text(max_size=5).filter(lambda k: k != "image"), JSON_VALUES),
    st.builds(lambda v: {"image": v}, JSON_VALUES.filter(lambda v: not isinstance(v, str))),
    st.builds(lambda v: {"image": "in.png", "more": v}, JSON_VALUES),
    st.one_of(st.integers(max_value=-(2**63) - 1), st.integers(min_value=2**63)),
)
WRONG_TYPES: dict[str, st.SearchStrategy[Any]] = {
    "template": JSON_VALUES.filter(lambda v: not isinstance(v, str)),
    "request_id": JSON_VALUES.filter(lambda v: not isinstance(v, str)),
    "priority": st.one_of(
        JSON_VALUES.filter(lambda v: not isinstance(v, int) or isinstance(v, bool)),
        st.integers(max_value=-(2**31) - 1),
        st.integers(min_value=2**31),
    ),
    "timeout_seconds": st.one_of(
        JSON_VALUES.filter(lambda v: not isinstance(v, int) or isinstance(v, bool)),
        st.integers(max_value=-1),
        st.integers(min_value=2**32),
    ),
    "parameters": JSON_VALUES.filter(lambda v: not isinstance(v, dict)),
    "input_images": JSON_VALUES.filter(lambda v: not isinstance(v, list)),
}
BAD_IMAGE_ENTRIES = st.one_of(
    JSON_VALUES.filter(lambda v: not isinstance(v, dict)),
    st.builds(lambda v: {"name": v}, JSON_VALUES.filter(lambda v: not isinstance(v, str))),
    st.builds(
        lambda name, data: {"name": name, "data_base64": data},
        hostile_text(),
        st.one_of(hostile_text().filter(lambda t: t != ""), JSON_VALUES),
    ),
)
LONE_SURROGATES = st.characters(categories=["Cs"])
PLAINISH = st.text(max_size=6)


@st.composite
def json_creates(draw: st.DrawFn) -> Case:
    """A valid body with one fault only JSON can carry."""
    body: dict[str, Any] = {"template": "sd15-txt2img", "parameters": {"prompt": "a cat"}}
    fault = draw(st.sampled_from(["type", "key", "parameter", "image", "surrogate"]))
    fields: set[str]
    if fault == "type":
        key = draw(st.sampled_from(sorted(WRONG_TYPES)))
        body[key] = draw(WRONG_TYPES[key])
        fields = {key}
    elif fault == "key":
        key = draw(hostile_text().filter(lambda k: k not in [*KNOWN_KEYS, "input_images"]))
        body[key] = draw(JSON_VALUES)
        fields = {key}
    elif fault == "parameter":
        name = draw(st.one_of(st.sampled_from(["prompt", "steps", "cfg"]), hostile_text()))
        body["parameters"][name] = draw(NOT_PARAMETERS)
        fields = {f"parameters.{name}"}
    elif fault == "image":
        entries = draw(st.lists(BAD_IMAGE_ENTRIES, min_size=1, max_size=3))
        body["input_images"] = entries
        # Entries the gateway passes on reach GenerationService's image checks.
        fields = {"input_images", "parameters"}
    else:
        where = draw(st.sampled_from(["template", "request_id", "name", "value", "image"]))
        bad = draw(PLAINISH) + draw(LONE_SURROGATES) + draw(PLAINISH)
        if where in ("template", "request_id"):
            body[where] = bad
        elif where == "name":
            body["parameters"][bad] = 1
        elif where == "value":
            body["parameters"]["prompt"] = bad
        else:
            body["input_images"] = [{"name": bad, "data_base64": ""}]
        fields = {"body"}
    return Case("POST", "/api/generations", encode(body), JSON, {400}, fields)


NOT_JSON_OBJECTS = st.one_of(
    st.binary(max_size=200),
    st.lists(st.sampled_from(INVALID_UTF8), min_size=1, max_size=8).map(b"".join),
    JSON_VALUES.filter(lambda v: not isinstance(v, dict)).map(encode),
    st.integers(1, 100_000).map(lambda n: b"[" * n + b"]" * n),
    st.integers(1, 100_000).map(lambda n: b'{"a":' * n + b"1" + b"}" * n),
    # The last: a BOM before an object, which json.loads reads as {} (no prompt).
    st.sampled_from([b"", b"{", b"{}}", b"NaN", b"null", b'"\\ud800"', b"\xef\xbb\xbf{}"]),
)


async def test_create(fuzz_gateway: FuzzGateway) -> None:
    # A nested object that json.loads can read is an object with one unknown key.
    raw = NOT_JSON_OBJECTS.map(
        lambda body: Case(
            "POST", "/api/generations", body, JSON, {400}, {"body", "a", "parameters.prompt"}
        )
    )
    cases = st.one_of(drafted_creates(), json_creates(), raw)
    await fuzz(fuzz_gateway, "create", cases)


# ----- GET /api/generations ----------------------------------------------------------


# Numbers as text, as clients get them wrong: signs, spaces, other scripts'
# digits (which str.isdigit() takes and int() may not), more digits than
# int() reads (4300), more than any field holds.
ODD_NUMBERS = [" 1", "1 ", "+1", "-0", "1_000", "0x10", "1e3", "1.0", "00", "0" * 25]
ODD_NUMBERS += ["\u00b2", "\u00b9\u00b2", "\u0661\u0662", "\U0001d7d7", "\u2167"]
HUGE_NUMBERS = st.integers(4301, 4600).map(lambda n: "9" * n)
DIGITS = st.one_of(
    st.sampled_from(ODD_NUMBERS),
    st.integers(-(2**70), 2**70).map(str),
    st.text(st.characters(categories=["Nd", "No", "Nl"]), min_size=1, max_size=6),
    HUGE_NUMBERS,
)
QUERY_VALUES = st.one_of(hostile_text(), DIGITS)
# Header values an HTTP client can send (no CR, LF or NUL): Latin-1 and beyond,
# nasty names, and numbers of every sort.
HEADER_VALUES = st.one_of(
    st.text(
        st.characters(min_codepoint=0x20, max_codepoint=0x2FF, exclude_characters="\x7f"),
        max_size=40,
    ).map(str.strip),
    st.sampled_from([n for n in NASTY if n.isprintable()]),
    DIGITS.map(lambda d: d.strip()[:5000]),
)
RAW_QUERY = st.sampled_from(["%ff", "%", "%zz", "%C0%80", "%ED%A0%80", "%00", "a=b=c", "&&", "="])


STATUS_NAMES = st.sampled_from(
    ["queued", "RUNNING", "completed", "unspecified", "GENERATION_STATUS_QUEUED", "0", "4", ""]
)
# What each query parameter of the gateway gets: mostly things that look
# almost right for it, sometimes anything.
QUERY_PARAMETERS: dict[str, st.SearchStrategy[str]] = {
    "page_size": st.one_of(DIGITS, QUERY_VALUES),
    "status": st.lists(st.one_of(STATUS_NAMES, hostile_text(max_size=12)), max_size=4).map(
        ",".join
    ),
    "template": st.one_of(st.sampled_from(TEMPLATES), hostile_text()),
    "index": st.one_of(DIGITS, QUERY_VALUES),
    "after": st.one_of(DIGITS, QUERY_VALUES),
}


@st.composite
def queries(draw: st.DrawFn, keys: list[str]) -> str:
    """A query string: hostile values for the route's keys and others, some raw."""
    parts = []
    for _ in range(draw(st.integers(0, 4))):
        key = draw(st.one_of(st.sampled_from(keys), hostile_text(max_size=8)))
        if draw(st.integers(0, 4)) == 0:
            parts.append(f"{segment(key)}={draw(RAW_QUERY)}")
        else:
            value = draw(QUERY_PARAMETERS.get(key, QUERY_VALUES))
            parts.append(f"{segment(key)}={segment(value)}")
    return ("?" + "&".join(parts))[:MAX_ESCAPED] if parts else ""


async def test_list(fuzz_gateway: FuzzGateway) -> None:
    known = set(fuzz_gateway.stack.known_ids)
    real = fuzz_gateway.stack.page_token
    keys = ["page_size", "status", "page_token", "template"]
    fields = {"page_size", "status", "statuses", "page_token", "template"}

    async def check(case: Case) -> None:
        reply = await send(fuzz_gateway, case)
        if reply.status == 200:
            listed = json.loads(reply.body).get("generations", [])
            assert {g["id"] for g in listed} <= known, str(reply)
            return
        assert_refused(reply, {400}, fields)

    tokens = st.one_of(st.just(real), page_tokens(real)).map(lambda t: f"page_token={segment(t)}")
    cases = st.one_of(
        queries(keys),
        st.tuples(queries(keys), tokens).map(lambda q: (q[0] or "?") + "&" + q[1]),
        # Too long for the cut other values get (see MAX_ESCAPED): on its own.
        HUGE_NUMBERS.map(lambda digits: f"?page_size={digits}"),
    ).map(lambda query: Case("GET", f"/api/generations{query}"))
    await fuzz(fuzz_gateway, "list", cases, check)


# ----- one generation by id ------------------------------------------------------------


async def test_get(fuzz_gateway: FuzzGateway) -> None:
    async def check(case: Case) -> None:
        reply = await send(fuzz_gateway, case)
        known = seeded(fuzz_gateway, case.target.rsplit("/", 1)[-1])
        if known is not None and reply.status == 200:
            assert json.loads(reply.body)["id"] == known.id
            return
        assert_refused(reply, {400, 404, 405}, {"id"})

    segments = id_segments(fuzz_gateway.stack.known_ids)
    cases = segments.map(lambda s: Case("GET", f"/api/generations/{s}"))
    await fuzz(fuzz_gateway, "get", cases, check)


async def test_cancel(fuzz_gateway: FuzzGateway) -> None:
    # Every seeded generation is finished: a cancel of one is a 409 and changes nothing.
    cases = st.tuples(id_segments(fuzz_gateway.stack.known_ids), NOT_JSON_OBJECTS).map(
        lambda c: Case("POST", f"/api/generations/{c[0]}/cancel", c[1], {}, {400, 404, 409})
    )
    await fuzz(fuzz_gateway, "cancel", cases)


async def test_image(fuzz_gateway: FuzzGateway) -> None:
    stack = fuzz_gateway.stack
    stored = {
        g.id: Path(g.outputs[0].path).read_bytes() for g in (stack.completed, stack.with_input)
    }

    async def check(case: Case) -> None:
        reply = await send(fuzz_gateway, case)
        if reply.status in (200, 304):
            # Only a completed generation's first image, asked for by an index of 0.
            known = seeded(fuzz_gateway, case.target.split("/")[3])
            assert known is not None and known.status == gen.GENERATION_STATUS_COMPLETED
            index = URL(case.target, encoded=True).query.get("index", "0")
            assert index.isascii() and index.isdigit() and int(index) == 0, str(reply)
            if reply.status == 200:
                assert reply.body == stored[known.id]
            return
        assert_refused(reply, {400, 404, 409}, {"id", "index"})

    indexes = st.one_of(
        st.just(""),
        QUERY_PARAMETERS["index"].map(lambda v: f"?index={segment(v)}"),
        RAW_QUERY.map(lambda v: f"?index={v}"),
    )
    etags: st.SearchStrategy[dict[str, str]] = st.one_of(
        st.just({}), HEADER_VALUES.map(lambda v: {"If-None-Match": v})
    )
    cases = st.one_of(
        st.builds(
            lambda s, q, h: Case("GET", f"/api/generations/{s}/image{q}", None, h),
            id_segments(stack.known_ids),
            indexes,
            etags,
        ),
        st.builds(
            lambda i, d: Case("GET", f"/api/generations/{i}/image?index={d}"),
            st.sampled_from(stack.known_ids),
            HUGE_NUMBERS,
        ),
    )
    await fuzz(fuzz_gateway, "image", cases, check)


async def test_events(fuzz_gateway: FuzzGateway) -> None:
    async def check(case: Case) -> None:
        reply = await send(fuzz_gateway, case)
        if reply.status == 200:
            assert reply.content_type == "text/event-stream", str(reply)
            assert seeded(fuzz_gateway, case.target.split("/")[3]) is not None
            assert reply.body.startswith(b"event: snapshot\n"), str(reply)
            return
        assert_refused(reply, {400, 404}, {"id", "Last-Event-ID", "after", "after_sequence"})

    resume: st.SearchStrategy[tuple[str, dict[str, str]]] = st.one_of(
        st.just(("", {})),
        HEADER_VALUES.map(lambda v: ("", {"Last-Event-ID": v})),
        QUERY_PARAMETERS["after"].map(lambda v: (f"?after={segment(v)}", {})),
        HUGE_NUMBERS.map(lambda v: (f"?after={v}", {})),
    )
    cases = st.builds(
        lambda s, r: Case("GET", f"/api/generations/{s}/events{r[0]}", None, r[1]),
        id_segments(fuzz_gateway.stack.known_ids),
        resume,
    )
    await fuzz(fuzz_gateway, "events", cases, check)


# ----- routes without input, methods, headers -------------------------------------------


async def test_fixed_routes(fuzz_gateway: FuzzGateway) -> None:
    """Templates, stats, health and the OpenAPI document take no input: a
    hostile query or Authorization header is ignored or refused, never a crash."""

    async def check(case: Case) -> None:
        reply = await send(fuzz_gateway, case)
        if reply.status == 200:
            assert isinstance(json.loads(reply.body), dict), str(reply)
            return
        assert_refused(reply, {401})  # an Authorization header that is no token

    headers: st.SearchStrategy[dict[str, str]] = st.one_of(
        st.just({}), HEADER_VALUES.map(lambda v: {"Authorization": v})
    )
    cases = st.builds(
        lambda route, q, h: Case("GET", route + q, None, h),
        st.sampled_from(FIXED_ROUTES),
        queries(["page_size", "status"]),
        headers,
    )
    await fuzz(fuzz_gateway, "fixed", cases, check)


async def test_methods(fuzz_gateway: FuzzGateway) -> None:
    """A method a route does not serve: 405 (or 404 for no route), as JSON."""
    routes = [
        "/api/generations",
        "/api/generations/x",
        "/api/generations/x/cancel",
        "/api/generations/x/image",
        "/api/generations/x/events",
        *FIXED_ROUTES,
    ]
    served = {("POST", "/api/generations"), ("POST", "/api/generations/x/cancel")}
    methods = st.sampled_from(["PUT", "DELETE", "PATCH", "POST", "OPTIONS", "TRACE", "LOCK"])
    cases = (
        st.tuples(methods, st.sampled_from(routes))
        .filter(lambda c: c not in served and not (c[0] == "POST" and "x" not in c[1]))
        .map(lambda c: Case(c[0], c[1], None, {}, {404, 405}))
    )
    await fuzz(fuzz_gateway, "methods", cases)


# ----- body sizes ------------------------------------------------------------------------


async def test_body_sizes(fuzz_gateway: FuzzGateway) -> None:
    """Around the limit (SMALL_BODY bytes here): above it 413, at or below it
    the body is read and judged (400 or 404), whatever it holds."""

    @st.composite
    def sized(draw: st.DrawFn) -> Case:
        size = draw(st.integers(0, 2 * SMALL_BODY))
        if draw(st.booleans()):
            # JSON padded with spaces: valid syntax, so only its size can fail it.
            body = json.dumps({"template": draw(hostile_text(max_size=8))}).encode()
            body = body + b" " * max(0, size - len(body))
        else:
            body = draw(st.binary(min_size=min(size, 64), max_size=64)) + b"x" * max(0, size - 64)
        too_big = len(body) > SMALL_BODY
        statuses = {413} if too_big else {400, 404}
        return Case("POST", "/api/generations", body, JSON, statuses, set(), small=True)

    await fuzz(fuzz_gateway, "sizes", sized())


async def test_body_over_the_default_limit_is_413(fuzz_gateway: FuzzGateway) -> None:
    before = await fuzz_gateway.stack.state()
    over = b"{" + b" " * fuzz_gateway.max_body + b"}"
    reply = await send(fuzz_gateway, Case("POST", "/api/generations", over, JSON))
    assert_refused(reply, {413})

    async def chunked() -> Any:
        # No Content-Length: the limit must hold while the body streams in.
        for _ in range(fuzz_gateway.max_body // (1 << 20) + 2):
            yield b" " * (1 << 20)

    url = URL(fuzz_gateway.url + "/api/generations")
    async with fuzz_gateway.session.post(url, data=chunked(), headers=JSON) as response:
        streamed = Reply(response.status, response.content_type, await response.read())
    assert_refused(streamed, {413})
    assert await fuzz_gateway.stack.state() == before
    await fuzz_gateway.stack.assert_serving()


async def test_over_long_lines(fuzz_gateway: FuzzGateway) -> None:
    """A request line or header over 8190 bytes never reaches the gateway:
    aiohttp's parser answers 400 itself (in plain text, the one refusal not in
    our JSON shape), and the gateway goes on serving."""
    before = await fuzz_gateway.stack.state()
    requests: list[tuple[str, dict[str, str]]] = [
        ("/api/generations?page_size=" + "9" * 9000, {}),
        ("/api/generations/" + "a" * 9000, {}),
        ("/api/generations", {"Authorization": "Bearer " + "a" * 9000}),
    ]
    for target, headers in requests:
        url = URL(fuzz_gateway.url + target, encoded=True)
        async with fuzz_gateway.session.get(url, headers=headers) as response:
            assert 400 <= response.status < 500, response.status
    assert await fuzz_gateway.stack.state() == before
    await fuzz_gateway.stack.assert_serving()
