"""The JSON the gateway answers with: every field present, zero values
included, and parameters in the same plain shape requests give them."""

from __future__ import annotations

import base64
import io
from typing import Any

import aiohttp
from PIL import Image

from tests.fixtures.generation import GenerationClient
from tests.gateway.calls import create, watch


def png() -> str:
    out = io.BytesIO()
    Image.new("RGB", (8, 8), "red").save(out, format="PNG")
    return base64.b64encode(out.getvalue()).decode()


async def get(gateway: aiohttp.ClientSession, path: str) -> Any:
    async with gateway.get(path) as reply:
        assert reply.status == 200, await reply.text()
        return await reply.json()


async def test_zero_values_and_empty_lists_are_written_not_left_out(
    gateway: aiohttp.ClientSession, generation_service: GenerationClient
) -> None:
    assert await get(gateway, "/api/generations") == {"generations": [], "next_page_token": ""}
    stats = await get(gateway, "/api/stats")
    assert stats["workers"][0]["slots_used"] == 0 and stats["dispatch_paused"] is False

    created = await create(gateway)
    await generation_service.wait(created["id"])
    final = await get(gateway, f"/api/generations/{created['id']}")
    assert final["outputs"][0]["index"] == 0
    assert final["priority"] == 0 and final["request_id"] == ""


async def test_parameters_are_answered_in_the_plain_shape_requests_use(
    gateway: aiohttp.ClientSession, generation_service: GenerationClient
) -> None:
    body = {
        "template": "img2img",
        "parameters": {"image": {"image": "in.png"}, "prompt": "a fox", "steps": 3, "cfg": 6.5},
        "input_images": [{"name": "in.png", "data_base64": png()}],
    }
    async with gateway.post("/api/generations", json=body) as reply:
        assert reply.status == 202, await reply.text()
        created = await reply.json()
    # As resolved: the values given, and the template's defaults beside them.
    assert {k: created["parameters"][k] for k in body["parameters"]} == body["parameters"]
    assert created["parameters"]["negative_prompt"] == ""
    assert isinstance(created["parameters"]["seed"], int)

    frames = await watch(gateway, created["id"])
    assert frames[0].data["snapshot"]["parameters"] == created["parameters"]
    listed = await get(gateway, "/api/generations")
    assert listed["generations"][0]["parameters"] == created["parameters"]

    # What an answer shows can be sent back as it is.
    again = {**body, "parameters": created["parameters"]}
    async with gateway.post("/api/generations", json=again) as reply:
        assert reply.status == 202, await reply.text()

    templates = {t["name"]: t for t in (await get(gateway, "/api/templates"))["templates"]}
    specs = {p["name"]: p for p in templates["img2img"]["parameters"]}
    assert specs["steps"]["default_value"] == 20
    assert "default_value" not in specs["image"]  # no default: no value at all


async def test_only_enum_values_are_renamed_never_the_callers_text(
    gateway: aiohttp.ClientSession,
) -> None:
    # Enum names are written lower-case without their prefix; text that only
    # looks like one (a prompt, a request_id) comes back as it was sent.
    prompt = "GENERATION_STATUS_QUEUED: a queue of cats"
    body = {"parameters": {"prompt": prompt}, "request_id": "EVENT_TYPE_CREATED"}
    async with gateway.post("/api/generations", json=body) as reply:
        created = await reply.json()
    assert created["status"] in ("queued", "dispatched")
    assert created["parameters"]["prompt"] == prompt
    assert created["request_id"] == "EVENT_TYPE_CREATED"
    frames = await watch(gateway, created["id"])
    assert frames[1].data["event"]["type"] == "created"
    assert frames[0].data["snapshot"]["parameters"]["prompt"] == prompt
