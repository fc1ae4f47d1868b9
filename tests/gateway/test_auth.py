"""The gateway in front of a GenerationService that requires a bearer token:
the caller's token is passed through, and every failure to authenticate is
the same 401."""

from __future__ import annotations

import aiohttp
import pytest

from tests.fixtures.generation import GenerationClient, StartGeneration

TOKEN = "tok-alice"


@pytest.fixture
async def generation_service(generation_factory: StartGeneration) -> GenerationClient:
    """Overrides the open one: the `gateway` fixture stands in front of this."""
    return await generation_factory(auth_tokens={TOKEN: "alice"})


async def test_every_authentication_failure_is_the_same_401(
    gateway: aiohttp.ClientSession,
) -> None:
    # No header and an unknown token are GenerationService's refusals; text
    # that cannot be a token at all (not printable ASCII) is the gateway's own.
    offered: list[dict[str, str]] = [
        {},
        {"Authorization": "Bearer wrong"},
        {"Authorization": "Bearer t\u00f6k\u20acn"},
        {"Authorization": "Bearer tok\tx"},
    ]
    for headers in offered:
        async with gateway.get("/api/generations", headers=headers) as reply:
            assert reply.status == 401, (headers, await reply.text())
            assert reply.headers["WWW-Authenticate"] == "Bearer"
            error = (await reply.json())["error"]
            assert set(error) == {"reason", "message"} and error["reason"] == "UNAUTHENTICATED"

    bearer = {"Authorization": f"Bearer {TOKEN}"}
    async with gateway.get("/api/generations", headers=bearer) as reply:
        assert reply.status == 200
