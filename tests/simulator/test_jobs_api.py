"""The simulator's `jobs_api` knob: off it is the recorded 0.3.64 (no jobs
routes); on it answers /api/jobs as ComfyUI's source (0.15.0) does."""

from __future__ import annotations

from typing import Any

import aiohttp

from tests.fixtures.simulator import RunningSimulator, StartSimulator
from tests.simulator.test_knobs import post, t2i_graph, wait_until


async def get(http: aiohttp.ClientSession, url: str) -> tuple[int, Any]:
    async with http.get(url) as response:
        text = await response.text()
        is_json = response.content_type == "application/json"
        return response.status, (await response.json() if is_json else text)


async def test_without_the_knob_there_is_no_jobs_api(comfyui_simulator: RunningSimulator) -> None:
    url = comfyui_simulator.url
    async with aiohttp.ClientSession() as http:
        _, stats = await get(http, f"{url}/system_stats")
        status, body = await get(http, f"{url}/api/jobs/some-id")
    assert stats["system"]["comfyui_version"] == "0.3.64"
    assert status == 404 and not isinstance(body, dict)  # aiohttp's own, not ComfyUI's


async def test_the_knob_advertises_a_newer_version_and_serves_only_the_api_paths(
    simulator_factory: StartSimulator,
) -> None:
    url = (await simulator_factory(jobs_api=True)).url
    async with aiohttp.ClientSession() as http:
        _, stats = await get(http, f"{url}/system_stats")
        _, features = await get(http, f"{url}/features")
        listed = await get(http, f"{url}/api/jobs")
        doubled = await get(http, f"{url}/api/api/jobs")
        bare, _ = await get(http, f"{url}/jobs")
    assert stats["system"]["comfyui_version"] == "0.15.0"
    assert "jobs" not in str(features)  # /features does not advertise it in any release
    empty = {"jobs": [], "pagination": {"offset": 0, "limit": None, "total": 0, "has_more": False}}
    assert listed == (200, empty) and doubled == (200, empty)
    assert bare == 404


async def test_a_job_is_pending_then_in_progress_then_completed_with_its_outputs(
    simulator_factory: StartSimulator,
) -> None:
    running = await simulator_factory(jobs_api=True, step_seconds=0.02)
    sim, url = running.sim, running.url
    async with aiohttp.ClientSession() as http:
        first = await post(http, f"{url}/prompt", {"prompt": t2i_graph(30)})
        second = await post(http, f"{url}/prompt", {"prompt": t2i_graph(2)})
        await wait_until(lambda: sim.running is not None)
        _, running_job = await get(http, f"{url}/api/jobs/{first['prompt_id']}")
        _, pending_job = await get(http, f"{url}/api/jobs/{second['prompt_id']}")
        await wait_until(lambda: second["prompt_id"] in sim.history, seconds=10)
        _, done = await get(http, f"{url}/api/jobs/{second['prompt_id']}")
        _, listed = await get(http, f"{url}/api/jobs?status=completed&sort_order=asc")

    assert running_job["status"] == "in_progress" and running_job["outputs_count"] == 0
    assert pending_job == {
        "id": second["prompt_id"],
        "status": "pending",
        "priority": second["number"],
        "create_time": pending_job["create_time"],
        "outputs_count": 0,
    }
    entry = sim.history[second["prompt_id"]]
    assert done["status"] == "completed" and done["outputs_count"] == 1
    assert done["outputs"] == entry["outputs"] and done["execution_status"] == entry["status"]
    assert done["workflow"] == {"prompt": entry["prompt"][2], "extra_data": entry["prompt"][3]}
    assert done["preview_output"]["mediaType"] == "images"
    assert done["execution_end_time"] >= done["execution_start_time"] > 0
    assert [j["id"] for j in listed["jobs"]] == [first["prompt_id"], second["prompt_id"]]
    assert "outputs" not in listed["jobs"][0]  # only the single-job route has details


async def test_unknown_jobs_and_bad_queries_get_comfyuis_error_bodies(
    simulator_factory: StartSimulator,
) -> None:
    url = (await simulator_factory(jobs_api=True)).url
    async with aiohttp.ClientSession() as http:
        unknown = await get(http, f"{url}/api/jobs/no-such-job")
        bad_status = await get(http, f"{url}/api/jobs?status=done")
        bad_limit = await get(http, f"{url}/api/jobs?limit=0")
        bad_sort = await get(http, f"{url}/api/jobs?sort_by=name")
    assert unknown == (404, {"error": "Job not found"})
    assert bad_status == (
        400,
        {
            "error": "Invalid status value(s): done. "
            "Valid values: pending, in_progress, completed, failed, cancelled"
        },
    )
    assert bad_limit == (400, {"error": "limit must be a positive integer"})
    assert bad_sort == (400, {"error": "sort_by must be 'created_at' or 'execution_duration'"})


async def test_interrupted_and_failed_jobs_say_so(simulator_factory: StartSimulator) -> None:
    running = await simulator_factory(jobs_api=True, step_seconds=0.02)
    sim, url = running.sim, running.url
    async with aiohttp.ClientSession() as http:
        stopped = await post(http, f"{url}/prompt", {"prompt": t2i_graph(50)})
        await wait_until(lambda: sim.running is not None)
        await post(http, f"{url}/interrupt", {"prompt_id": stopped["prompt_id"]})
        sim.inject_oom("KSampler")
        failed = await post(http, f"{url}/prompt", {"prompt": t2i_graph(3)})
        await wait_until(lambda: failed["prompt_id"] in sim.history)
        _, cancelled_job = await get(http, f"{url}/api/jobs/{stopped['prompt_id']}")
        _, failed_job = await get(http, f"{url}/api/jobs/{failed['prompt_id']}")
    assert cancelled_job["status"] == "cancelled" and "execution_error" not in cancelled_job
    assert failed_job["status"] == "failed"
    assert "out of memory" in failed_job["execution_error"]["exception_message"]


async def test_the_request_log_records_every_comfyui_request(
    comfyui_simulator: RunningSimulator,
) -> None:
    url = comfyui_simulator.url
    async with aiohttp.ClientSession() as http:
        await get(http, f"{url}/queue")
        await get(http, f"{url}/history/abc")
        _, logged = await get(http, f"{url}/_simulator/requests")
    assert logged == {"requests": [["GET", "/queue"], ["GET", "/history/abc"]]}
