"""The simulator's queue operations and fault knobs behave as ComfyUI does."""

from __future__ import annotations

import asyncio
import json
from typing import Any

import aiohttp

from tests.fixtures.simulator import RunningSimulator, StartSimulator
from tests.simulator.recordings import exchange


def t2i_graph(steps: int = 20) -> dict[str, Any]:
    """The recorded SD 1.5 text-to-image graph with more sampler steps."""
    graph: dict[str, Any] = json.loads(exchange("52-prompt-t2i-cold.http").request_body)["prompt"]
    for node in graph.values():
        if node["class_type"] == "CheckpointLoaderSimple":
            node["inputs"]["ckpt_name"] = "v1-5-pruned-emaonly.safetensors"
        if node["class_type"] == "KSampler":
            node["inputs"]["steps"] = steps
    return graph


async def post(http: aiohttp.ClientSession, url: str, body: dict[str, Any]) -> Any:
    async with http.post(url, json=body) as response:
        assert response.status == 200, await response.text()
        return await response.json() if response.content_type == "application/json" else None


async def wait_until(condition: Any, seconds: float = 5.0) -> None:
    async with asyncio.timeout(seconds):
        while not condition():
            await asyncio.sleep(0.01)


async def test_interrupt_stops_only_the_named_running_prompt(
    comfyui_simulator: RunningSimulator,
) -> None:
    sim, url = comfyui_simulator.sim, comfyui_simulator.url
    async with aiohttp.ClientSession() as http:
        first = await post(http, f"{url}/prompt", {"prompt": t2i_graph(), "client_id": "a"})
        second = await post(http, f"{url}/prompt", {"prompt": t2i_graph(21), "client_id": "a"})
        await wait_until(lambda: sim.running is not None)
        await post(http, f"{url}/interrupt", {"prompt_id": second["prompt_id"]})
        await asyncio.sleep(0.05)
        assert sim.running is not None and sim.running.prompt_id == first["prompt_id"]
        await post(http, f"{url}/interrupt", {"prompt_id": first["prompt_id"]})
        await wait_until(lambda: first["prompt_id"] in sim.history)
    status = sim.history[first["prompt_id"]]["status"]
    assert status["status_str"] == "error"
    assert status["messages"][-1][0] == "execution_interrupted"


async def test_delete_removes_a_pending_prompt_and_never_the_running_one(
    comfyui_simulator: RunningSimulator,
) -> None:
    sim, url = comfyui_simulator.sim, comfyui_simulator.url
    async with aiohttp.ClientSession() as http:
        running = await post(http, f"{url}/prompt", {"prompt": t2i_graph()})
        pending = await post(http, f"{url}/prompt", {"prompt": t2i_graph(22)})
        await wait_until(lambda: sim.running is not None)
        await post(http, f"{url}/queue", {"delete": [running["prompt_id"], pending["prompt_id"]]})
        async with http.get(f"{url}/queue") as response:
            queue = await response.json()
    assert [item[1] for item in queue["queue_running"]] == [running["prompt_id"]]
    assert queue["queue_pending"] == []


async def test_restart_loses_queue_and_history(comfyui_simulator: RunningSimulator) -> None:
    sim, url = comfyui_simulator.sim, comfyui_simulator.url
    async with aiohttp.ClientSession() as http:
        done = await post(http, f"{url}/prompt", {"prompt": t2i_graph(1)})
        await wait_until(lambda: done["prompt_id"] in sim.history)
        await post(http, f"{url}/prompt", {"prompt": t2i_graph(30)})
        await post(http, f"{url}/_simulator/faults", {"restart": True})
        async with http.get(f"{url}/history/{done['prompt_id']}") as response:
            assert await response.json() == {}
        async with http.get(f"{url}/queue") as response:
            assert await response.json() == {"queue_running": [], "queue_pending": []}


async def test_oom_hang_and_http_faults(comfyui_simulator: RunningSimulator) -> None:
    sim, url = comfyui_simulator.sim, comfyui_simulator.url
    async with aiohttp.ClientSession() as http:
        await post(http, f"{url}/_simulator/faults", {"http_error": {"status": 503, "times": 1}})
        async with http.get(f"{url}/queue") as response:
            assert response.status == 503
        async with http.get(f"{url}/queue") as response:
            assert response.status == 200

        await post(http, f"{url}/_simulator/faults", {"hang": True})
        try:
            async with asyncio.timeout(0.3):
                await http.get(f"{url}/queue")
            raise AssertionError("a hung simulator answered")
        except TimeoutError:
            pass
        await post(http, f"{url}/_simulator/faults", {"hang": False})

        await post(http, f"{url}/_simulator/faults", {"oom": {"node": "KSampler"}})
        failed = await post(http, f"{url}/prompt", {"prompt": t2i_graph(2)})
        await wait_until(lambda: failed["prompt_id"] in sim.history)
    kind, data = sim.history[failed["prompt_id"]]["status"]["messages"][-1]
    assert kind == "execution_error" and "out of memory" in data["exception_message"]


async def test_dropped_websockets_lose_frames_until_reconnect(
    simulator_factory: StartSimulator,
) -> None:
    running = await simulator_factory()
    async with aiohttp.ClientSession() as http:
        ws = await http.ws_connect(f"{running.url}/ws?clientId=x")
        await ws.receive_json()
        await post(http, f"{running.url}/_simulator/faults", {"drop_websockets": True})
        message = await ws.receive()
        assert message.type in (aiohttp.WSMsgType.CLOSE, aiohttp.WSMsgType.CLOSED)
        runs = await (await http.get(f"{running.url}/_simulator/runs")).json()
    assert runs == {"runs": []}
