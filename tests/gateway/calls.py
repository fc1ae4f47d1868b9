"""Calls to the gateway as an HTTP client makes them, for the gateway tests."""

from __future__ import annotations

import json
from dataclasses import dataclass
from typing import Any

import aiohttp


async def create(gateway: aiohttp.ClientSession, **parameters: Any) -> dict[str, Any]:
    """POST a txt2img generation (2 steps unless `parameters` say otherwise); 202 expected."""
    body = {"template": "sd15-txt2img", "parameters": {"prompt": "a cat", "steps": 2, **parameters}}
    async with gateway.post("/api/generations", json=body) as reply:
        assert reply.status == 202, await reply.text()
        created: dict[str, Any] = await reply.json()
        assert reply.headers["Location"] == f"/api/generations/{created['id']}"
    return created


@dataclass
class Frame:
    """One server-sent event: its `id:` line (None without one), name and JSON data."""

    id: str | None
    event: str
    data: Any


def parse_frames(text: str) -> list[Frame]:
    frames = []
    for block in filter(None, text.split("\n\n")):
        fields = dict(line.split(": ", 1) for line in block.splitlines())
        frames.append(Frame(fields.get("id"), fields["event"], json.loads(fields["data"])))
    return frames


async def watch(gateway: aiohttp.ClientSession, generation_id: str, **headers: str) -> list[Frame]:
    """Every frame of /events, read until the server ends the stream."""
    async with gateway.get(f"/api/generations/{generation_id}/events", headers=headers) as reply:
        assert reply.status == 200 and reply.content_type == "text/event-stream"
        return parse_frames(await reply.text())
