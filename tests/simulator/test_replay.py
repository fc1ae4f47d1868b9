"""The simulator answers as the recorded real ComfyUI did: the same request
gets the same status, content type and body (ids and timestamps aside)."""

from __future__ import annotations

import asyncio
import json
from typing import Any

import aiohttp
import pytest

from tests.fixtures.simulator import RunningSimulator, StartSimulator
from tests.simulator.recordings import RECORDINGS, exchange, websocket_frames

VALIDATION_ERRORS = sorted(p.name for p in RECORDINGS.glob("04*.http"))
# What the recording server had on disk when the validation errors were
# recorded (no checkpoint yet), so model and file lists match exactly.
RECORDED_MODELS: dict[str, object] = {"checkpoints": []}
RECORDED_INPUTS = ["corrupt.png", "example.png", "upload-test.png"]


@pytest.fixture
async def recorded_simulator(simulator_factory: StartSimulator) -> RunningSimulator:
    running = await simulator_factory(**RECORDED_MODELS)
    for name in RECORDED_INPUTS:
        (running.sim.dirs["input"] / name).write_bytes(b"\x89PNG\r\n\x1a\n")
    return running


async def replay(url: str, name: str) -> tuple[Any, aiohttp.ClientResponse, bytes]:
    recorded = exchange(name)
    async with (
        aiohttp.ClientSession() as http,
        http.request(
            recorded.method,
            url + recorded.path,
            data=recorded.request_body,
            headers={"Content-Type": "application/json"},
        ) as response,
    ):
        return recorded, response, await response.read()


@pytest.mark.parametrize("name", VALIDATION_ERRORS)
async def test_prompt_validation_errors_match_the_recording(
    recorded_simulator: RunningSimulator, name: str
) -> None:
    recorded, response, body = await replay(recorded_simulator.url, name)
    assert response.status == recorded.status
    assert response.content_type == recorded.headers["Content-Type"].split(";")[0]
    if response.content_type == "application/json":
        assert json.loads(body) == recorded.json()
    else:
        assert body == recorded.body
    assert recorded_simulator.sim.pending == [] and recorded_simulator.sim.runs == []


@pytest.mark.parametrize(
    "name",
    [
        "03-history-unknown-id.http",
        "11-queue-idle.http",
        "11b-get-prompt-idle.http",
        "13-object_info-unknown.http",
        "30-interrupt-idle-nobody.http",
        "12b-view-missing.http",
        "17-api-prefix-queue.http",
        "19-prompt-foreign-origin.http",
    ],
)
async def test_idle_answers_match_the_recording(
    recorded_simulator: RunningSimulator, name: str
) -> None:
    recorded = exchange(name)
    headers = {"Content-Type": "application/json"}
    if "foreign-origin" in name:
        headers["Origin"] = "http://evil.example"
    async with (
        aiohttp.ClientSession() as http,
        http.request(
            recorded.method,
            recorded_simulator.url + recorded.path,
            data=recorded.request_body or None,
            headers=headers,
        ) as response,
    ):
        body = await response.read()
    assert response.status == recorded.status
    assert body == recorded.body or json.loads(body) == recorded.json()


def shape(value: Any) -> Any:
    """Keys and types, not values: ids, timestamps and file names differ by run."""
    if isinstance(value, dict):
        return {k: shape(v) for k, v in value.items()}
    if isinstance(value, list):
        return [shape(v) for v in value[:1]]
    return type(value).__name__ if value is not None else None


async def run_over_websocket(
    url: str, client_id: str, prompt: dict[str, Any]
) -> tuple[str, list[dict[str, Any]]]:
    """POST the prompt and collect frames until the final `executing` null."""
    frames: list[dict[str, Any]] = []
    async with aiohttp.ClientSession() as http:
        async with http.ws_connect(f"{url}/ws?clientId={client_id}") as ws:
            frames.append(await ws.receive_json())
            async with http.post(
                f"{url}/prompt", json={"prompt": prompt, "client_id": client_id}
            ) as response:
                assert response.status == 200, await response.text()
                prompt_id = (await response.json())["prompt_id"]
            async with asyncio.timeout(10):
                while True:
                    frame = await ws.receive_json()
                    frames.append(frame)
                    if frame["type"] == "executing" and frame["data"]["node"] is None:
                        return prompt_id, frames


async def test_a_run_sends_the_recorded_message_sequence(
    recorded_simulator: RunningSimulator,
) -> None:
    recorded_request = json.loads(exchange("01-prompt-success.http").request_body)
    recorded_frames = websocket_frames("20-ws-run-emptyimage-saveimage.jsonl")

    prompt_id, frames = await run_over_websocket(
        recorded_simulator.url, "capture-1313fc8d", recorded_request["prompt"]
    )

    assert [f["type"] for f in frames] == [f["type"] for f in recorded_frames]
    assert [shape(f) for f in frames] == [shape(f) for f in recorded_frames]
    assert all(f["data"].get("prompt_id", prompt_id) == prompt_id for f in frames)


async def test_history_after_a_run_has_the_recorded_shape(
    recorded_simulator: RunningSimulator,
) -> None:
    recorded_request = json.loads(exchange("01-prompt-success.http").request_body)
    prompt_id, _ = await run_over_websocket(
        recorded_simulator.url, "c1", recorded_request["prompt"]
    )
    recorded = exchange("02-history-finished.http").json()
    async with aiohttp.ClientSession() as http:
        async with http.get(f"{recorded_simulator.url}/history/{prompt_id}") as response:
            history = await response.json()
        entry = history[prompt_id]
        image = entry["outputs"]["2"]["images"][0]
        async with http.get(f"{recorded_simulator.url}/view", params=image) as response:
            png = await response.read()
            assert response.content_type == "image/png"
            assert "ETag" in response.headers
    (recorded_entry,) = recorded.values()
    assert shape(entry) == shape(recorded_entry)
    assert entry["status"]["status_str"] == "success" and entry["status"]["completed"]
    assert png.startswith(b"\x89PNG")


async def test_a_runtime_error_sends_the_recorded_sequence_and_history(
    recorded_simulator: RunningSimulator,
) -> None:
    recorded_frames = websocket_frames("26-ws-runtime-error.jsonl")
    recorded_history = exchange("06-history-runtime-error.http").json()
    recorded_simulator.sim.inject_oom("EmptyImage")
    graph = json.loads(exchange("01-prompt-success.http").request_body)["prompt"]

    prompt_id, frames = await run_over_websocket(recorded_simulator.url, "c2", graph)

    assert [f["type"] for f in frames] == [f["type"] for f in recorded_frames]
    error = next(f["data"] for f in frames if f["type"] == "execution_error")
    assert set(error) == set(
        next(f["data"] for f in recorded_frames if f["type"] == "execution_error")
    )
    assert error["exception_type"] == "torch.OutOfMemoryError"
    async with aiohttp.ClientSession() as http:
        async with http.get(f"{recorded_simulator.url}/history/{prompt_id}") as response:
            entry = (await response.json())[prompt_id]
    (recorded_entry,) = recorded_history.values()
    assert entry["status"]["status_str"] == recorded_entry["status"]["status_str"] == "error"
    assert [m[0] for m in entry["status"]["messages"]] == [
        m[0] for m in recorded_entry["status"]["messages"]
    ]


async def test_requeuing_the_same_graph_is_served_from_cache(
    recorded_simulator: RunningSimulator,
) -> None:
    graph = json.loads(exchange("01-prompt-success.http").request_body)["prompt"]
    _, first = await run_over_websocket(recorded_simulator.url, "c3", graph)
    _, again = await run_over_websocket(recorded_simulator.url, "c3", graph)

    cached = next(f["data"] for f in again if f["type"] == "execution_cached")
    assert sorted(cached["nodes"]) == sorted(graph)
    outputs = [f["data"]["output"] for f in first if f["type"] == "executed"]
    assert [f["data"]["output"] for f in again if f["type"] == "executed"] == outputs


async def test_upload_renames_on_a_clash_as_recorded(recorded_simulator: RunningSimulator) -> None:
    first_recorded = exchange("15-upload-image.http").json()
    again_recorded = exchange("15b-upload-image-again-no-overwrite.http").json()
    names = []
    async with aiohttp.ClientSession() as http:
        for payload in (b"one", b"two"):
            form = aiohttp.FormData()
            form.add_field("image", payload, filename="upload-new.png", content_type="image/png")
            async with http.post(f"{recorded_simulator.url}/upload/image", data=form) as response:
                assert response.status == 200
                names.append(await response.json())
    assert set(names[0]) == set(first_recorded) and names[0]["type"] == "input"
    assert names[0]["name"] == "upload-new.png"
    assert names[1]["name"] == "upload-new (1).png"
    assert set(names[1]) == set(again_recorded)


async def test_system_stats_has_the_recorded_shape(recorded_simulator: RunningSimulator) -> None:
    recorded = exchange("10-system_stats.http").json()
    async with aiohttp.ClientSession() as http:
        async with http.get(f"{recorded_simulator.url}/system_stats") as response:
            stats = await response.json()
    assert set(stats["system"]) == set(recorded["system"])
    assert set(stats["devices"][0]) >= set(recorded["devices"][0])
