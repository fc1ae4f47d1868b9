"""The HTTP/JSON gateway against a real GenerationService."""

from __future__ import annotations

import asyncio
from pathlib import Path
from typing import Any

import aiohttp
from prometheus_client import REGISTRY

from tests.fixtures.generation import GenerationClient
from tests.gateway.calls import create, watch
from tests.gateway.conftest import ServerErrors


async def test_create_follow_and_download_over_http(
    gateway: aiohttp.ClientSession, generation_service: GenerationClient
) -> None:
    created = await create(gateway, steps=3)
    assert created["status"] == "dispatched"  # the worker was free

    frames = [frame.data for frame in await watch(gateway, created["id"])]
    assert "snapshot" in frames[0]
    assert frames[-1]["event"]["type"] == "completed"
    steps = [
        f["event"]["progress"]["value"] for f in frames[1:] if f["event"]["type"] == "progress"
    ]
    assert steps == [1, 2, 3]

    async with gateway.get(f"/api/generations/{created['id']}") as reply:
        final = await reply.json()
    assert final["status"] == "completed"
    path = Path(final["outputs"][0]["path"])
    async with gateway.get(f"/api/generations/{created['id']}/image") as reply:
        assert reply.status == 200 and reply.content_type == "image/png"
        assert await reply.read() == path.read_bytes()
        etag = reply.headers["ETag"]
    async with gateway.get(
        f"/api/generations/{created['id']}/image", headers={"If-None-Match": etag}
    ) as reply:
        assert reply.status == 304

    resumed = await watch(gateway, created["id"], **{"Last-Event-ID": "2"})
    assert resumed[1].data["event"]["sequence"] == "3"


async def test_bad_requests_name_the_field(gateway: aiohttp.ClientSession) -> None:
    cases: list[tuple[Any, int, str]] = [
        (
            {"template": "sd15-txt2img", "parameters": {"prompt": "x", "steps": 0}},
            400,
            "parameters.steps",
        ),
        (
            {"template": "sd15-txt2img", "parameters": {"prompt": "x", "nope": 1}},
            400,
            "parameters.nope",
        ),
        (
            {"template": "sd15-txt2img", "parameters": {"prompt": "x"}, "priority": "high"},
            400,
            "priority",
        ),
        ({"template": "sd15-txt2img", "parameters": {"prompt": ["x"]}}, 400, "parameters.prompt"),
        ([1, 2], 400, "body"),
    ]
    for body, status, field in cases:
        async with gateway.post("/api/generations", json=body) as reply:
            assert reply.status == status, (body, await reply.text())
            error = (await reply.json())["error"]
            assert error["field_violations"][0]["field"] == field
    not_json = {"Content-Type": "application/json"}
    async with gateway.post("/api/generations", data=b"{not json", headers=not_json) as reply:
        assert reply.status == 400
    async with gateway.get("/api/generations/not-a-uuid") as reply:
        assert reply.status == 400
    async with gateway.get("/api/generations/00000000-0000-0000-0000-000000000000") as reply:
        assert reply.status == 404
    async with gateway.get("/api/generations?page_token=garbage") as reply:
        assert reply.status == 400
    async with gateway.get("/api/generations?status=bogus") as reply:
        assert reply.status == 400
    async with gateway.get("/api/generations") as reply:
        assert (await reply.json())["generations"] == []  # no bad request created one


async def test_listing_templates_stats_and_health(gateway: aiohttp.ClientSession) -> None:
    await create(gateway)
    async with gateway.get("/api/generations?page_size=10") as reply:
        listed = await reply.json()
    assert len(listed["generations"]) == 1
    async with gateway.get("/api/templates") as reply:
        names = [t["name"] for t in (await reply.json())["templates"]]
    assert "sd15-txt2img" in names
    async with gateway.get("/api/stats") as reply:
        assert (await reply.json())["workers"][0]["name"] == "gpu0"
    async with gateway.get("/readyz") as reply:
        assert reply.status == 200


async def test_cancel_over_http(
    gateway: aiohttp.ClientSession, generation_service: GenerationClient
) -> None:
    generation_service.simulator.sim.set_step_seconds(0.2)
    await create(gateway, steps=50)
    await create(gateway, steps=50, seed=2)  # waits in ComfyUI's queue (lookahead)
    queued = await create(gateway, steps=50, seed=3)
    async with gateway.post(f"/api/generations/{queued['id']}/cancel") as reply:
        assert reply.status == 200
        assert (await reply.json())["status"] == "cancelled"
    async with gateway.post(f"/api/generations/{queued['id']}/cancel") as reply:
        assert reply.status == 409


async def test_the_image_etag_holds_the_canonical_id_whatever_the_path_spelled(
    gateway: aiohttp.ClientSession, generation_service: GenerationClient
) -> None:
    created = await create(gateway)
    await generation_service.wait(created["id"])
    canonical_etag = f'"{created["id"]}-0"'
    upper = f"/api/generations/{created['id'].upper()}/image"
    async with gateway.get(upper) as reply:
        assert reply.status == 200
        assert reply.headers["ETag"] == canonical_etag
    async with gateway.get(upper, headers={"If-None-Match": canonical_etag}) as reply:
        assert reply.status == 304 and reply.headers["ETag"] == canonical_etag

    # Caller text that only a lenient parser would take for this id is refused
    # as an id, and never reaches a header (a newline there was a 500).
    async with gateway.get(f"/api/generations/%0A{created['id'][1:]}/image") as reply:
        assert reply.status == 400
        assert (await reply.json())["error"]["field_violations"][0]["field"] == "id"


async def test_event_ids_only_grow_as_the_snapshot_carries_none(
    gateway: aiohttp.ClientSession,
) -> None:
    created = await create(gateway, steps=3)
    frames = await watch(gateway, created["id"])
    # An id on the snapshot (the newest sequence) would make the replayed
    # events' ids run backwards; without one, a client keeps its last id.
    assert frames[0].event == "snapshot" and frames[0].id is None
    assert [f.id for f in frames[1:]] == [f.data["event"]["sequence"] for f in frames[1:]]
    assert [int(f.id or 0) for f in frames[1:]] == list(range(1, len(frames)))

    resumed = await watch(gateway, created["id"], **{"Last-Event-ID": "2"})
    assert resumed[0].event == "snapshot" and resumed[0].id is None
    assert [int(f.id or 0) for f in resumed[1:]] == list(range(3, len(frames)))


async def test_a_client_hanging_up_mid_stream_ends_the_watch_quietly(
    gateway: aiohttp.ClientSession,
    generation_service: GenerationClient,
    server_errors: ServerErrors,
) -> None:
    generation_service.simulator.sim.set_step_seconds(0.1)
    created = await create(gateway, steps=100)
    labels = {"route": "/api/generations/{id}/events", "status": "200"}

    def streams_ended() -> float:
        return REGISTRY.get_sample_value("lockn_http_requests_total", labels) or 0.0

    before = streams_ended()
    reply = await gateway.get(f"/api/generations/{created['id']}/events")
    assert reply.status == 200
    await reply.content.readuntil(b"\n\n")  # the snapshot
    reply.close()  # hangs up: the connection is closed, not returned to the pool

    # The gateway sees the hang-up when it writes the next progress event:
    # its handler ends normally (and is counted), or aiohttp logs the error.
    async with asyncio.timeout(10):
        while streams_ended() == before and not server_errors():
            await asyncio.sleep(0.02)
    assert server_errors() == []
    assert streams_ended() == before + 1
    async with gateway.post(f"/api/generations/{created['id']}/cancel") as cancelled:
        assert cancelled.status == 200


async def test_listing_takes_repeated_and_comma_separated_statuses(
    gateway: aiohttp.ClientSession, generation_service: GenerationClient
) -> None:
    completed = await create(gateway)
    await generation_service.wait(completed["id"])
    generation_service.simulator.sim.set_step_seconds(0.2)
    cancelled = await create(gateway, steps=50)
    async with gateway.post(f"/api/generations/{cancelled['id']}/cancel") as reply:
        assert reply.status == 200
    both = {completed["id"], cancelled["id"]}
    queries = {
        "status=completed": {completed["id"]},
        "status=cancelled&status=completed": both,
        "status=queued,cancelled&status=completed": both,
        "status=queued&status=running": set(),
    }
    for query, expected in queries.items():
        async with gateway.get(f"/api/generations?{query}") as reply:
            listed = (await reply.json())["generations"]
        assert {g["id"] for g in listed} == expected, query
