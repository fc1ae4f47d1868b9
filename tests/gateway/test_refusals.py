"""What the gateway refuses, and how: a 4xx with the JSON error shape that
names what the caller sent (the field, query parameter or header by its
HTTP name), and nothing created."""

from __future__ import annotations

import gzip
import json
from typing import Any

import aiohttp

from tests.gateway.calls import create
from tests.gateway.conftest import ServerErrors

JSON = {"Content-Type": "application/json"}
BODY = {"template": "sd15-txt2img", "parameters": {"prompt": "a cat", "steps": 2}}


async def refusal(reply: aiohttp.ClientResponse, status: int) -> dict[str, Any]:
    """The error of a refusal with `status`, checked to be in the JSON error shape."""
    assert reply.status == status, await reply.text()
    assert reply.content_type == "application/json"
    error: dict[str, Any] = (await reply.json())["error"]
    assert isinstance(error["reason"], str) and isinstance(error["message"], str)
    return error


async def assert_nothing_created(gateway: aiohttp.ClientSession) -> None:
    async with gateway.get("/api/generations") as reply:
        assert (await reply.json())["generations"] == []


async def test_a_body_that_does_not_decompress_is_a_400_naming_the_body(
    gateway: aiohttp.ClientSession, server_errors: ServerErrors
) -> None:
    for encoding in ("gzip", "deflate"):
        headers = {**JSON, "Content-Encoding": encoding}
        async with gateway.post("/api/generations", data=b"not compressed", headers=headers) as r:
            error = await refusal(r, 400)
            assert error["field_violations"][0]["field"] == "body"
    await assert_nothing_created(gateway)
    assert server_errors() == []

    compressed = gzip.compress(json.dumps(BODY).encode())
    headers = {**JSON, "Content-Encoding": "gzip"}
    async with gateway.post("/api/generations", data=compressed, headers=headers) as reply:
        assert reply.status == 202, await reply.text()


async def test_a_create_that_is_not_json_is_a_415_and_creates_nothing(
    gateway: aiohttp.ClientSession,
) -> None:
    # What a cross-site page can POST without a CORS preflight: a form, text/plain.
    text = json.dumps(BODY)
    sends: list[dict[str, Any]] = [
        {"data": text, "headers": {"Content-Type": "text/plain"}},
        {"data": {"template": "sd15-txt2img"}},  # application/x-www-form-urlencoded
        {"data": text.encode(), "skip_auto_headers": ["Content-Type"]},
        {"data": text, "headers": {"Content-Type": "application/json-patch+json"}},
    ]
    for send in sends:
        async with gateway.post("/api/generations", **send) as reply:
            assert (await refusal(reply, 415))["reason"] == "UNSUPPORTED_MEDIA_TYPE"
    await assert_nothing_created(gateway)

    with_charset = {"Content-Type": "application/json; charset=utf-8"}
    async with gateway.post("/api/generations", data=text, headers=with_charset) as reply:
        assert reply.status == 202, await reply.text()


async def test_refusals_name_the_query_parameter_or_header_the_caller_used(
    gateway: aiohttp.ClientSession,
) -> None:
    created = await create(gateway)
    events = f"/api/generations/{created['id']}/events"
    beyond = str(10**6)  # past the last event: GenerationService refuses it
    cases: list[tuple[str, dict[str, str], str]] = [
        ("/api/generations?status=unspecified", {}, "status"),
        ("/api/generations?status=queued&status=unspecified", {}, "status"),
        (f"{events}?after=abc", {}, "after"),
        (f"{events}?after={beyond}", {}, "after"),
        (events, {"Last-Event-ID": "abc"}, "Last-Event-ID"),
        (events, {"Last-Event-ID": beyond}, "Last-Event-ID"),
    ]
    for target, headers, field in cases:
        async with gateway.get(target, headers=headers) as reply:
            error = await refusal(reply, 400)
            assert [v["field"] for v in error["field_violations"]] == [field], target


async def test_refusal_messages_read_naturally_and_stay_short(
    gateway: aiohttp.ClientSession,
) -> None:
    long_name = "x" * 200_000
    cases: list[tuple[bytes, str, str]] = [
        (json.dumps({**BODY, "priority": "high"}).encode(), "priority", "must be an integer"),
        (json.dumps({**BODY, "request_id": 7}).encode(), "request_id", "must be a string"),
        (json.dumps({**BODY, long_name: 1}).encode(), "xxxx", "unknown field"),
        (
            json.dumps({**BODY, "parameters": {long_name: [1]}}).encode(),
            "parameters.xxxx",
            "a string, number, boolean",
        ),
        (b'{"priority": 1' + b"0" * 5000 + b"}", "body", "number"),
    ]
    for body, field, description in cases:
        async with gateway.post("/api/generations", data=body, headers=JSON) as reply:
            raw = await reply.read()
            error = await refusal(reply, 400)
        # The caller's text is quoted cut short, never in full.
        assert len(raw) < 2000, raw[:200]
        [violation] = error["field_violations"]
        assert violation["field"].startswith(field) and len(violation["field"]) <= 60
        assert description in violation["description"], violation
    await assert_nothing_created(gateway)
