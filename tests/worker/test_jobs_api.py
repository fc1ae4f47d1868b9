"""ComfyWorker in front of a ComfyUI with /api/jobs (the simulator's jobs_api
knob): support is detected from the version, and each "where is this prompt?"
is one /api/jobs/{id} instead of /queue + /history/{id} (a queue position
still comes from one /queue read: a single job does not say where it waits).
The simulator's request log shows which routes were and were not asked."""

from __future__ import annotations

import pytest

from services.comfy_worker.comfyui import (
    JOBS_API_SINCE,
    ComfyUIClient,
    ComfyUIRejected,
    JobState,
    parse_version,
)
from services.comfy_worker.executor import prompt_id_for
from services.contracts import worker
from tests.fixtures.simulator import RunningSimulator, StartSimulator
from tests.fixtures.worker import StartWorker
from tests.simulator.test_knobs import wait_until
from tests.worker.test_execute import (
    attach,
    cancel_waiting_and_running,
    graph,
    images,
    run,
    start_and_abandon,
)

HISTORY = ("/history", "/api/history")


def asked(sim: RunningSimulator, method: str = "GET") -> list[str]:
    return [path for m, path in sim.sim.requests if m == method]


def history_reads(sim: RunningSimulator) -> list[str]:
    return [path for path in asked(sim) if path.startswith(HISTORY)]


@pytest.mark.parametrize(
    ("version", "has_it"),
    [
        ("0.3.64", False),
        ("0.14.9", False),
        ("0.15.0", True),
        ("v0.15.1-3-gabc1234", True),
        ("1.0.0", True),
        ("unknown", False),
        ("", False),
    ],
)
def test_the_jobs_api_is_read_from_the_version(version: str, has_it: bool) -> None:
    assert (parse_version(version) >= JOBS_API_SINCE) is has_it


async def test_the_client_detects_the_jobs_api_once_per_server(
    simulator_factory: StartSimulator,
) -> None:
    old, new = await simulator_factory(), await simulator_factory(jobs_api=True)
    old_client, new_client = ComfyUIClient(old.url), ComfyUIClient(new.url)
    try:
        assert await old_client.has_jobs_api() is False
        assert await new_client.has_jobs_api() is True
        assert await new_client.has_jobs_api() is True
    finally:
        await old_client.close()
        await new_client.close()
    assert asked(new).count("/system_stats") == 1  # cached
    assert not [p for p in asked(old) if "jobs" in p]  # never probed the route


async def test_an_unknown_job_is_unknown_and_a_missing_route_is_not(
    simulator_factory: StartSimulator,
) -> None:
    with_api, without = await simulator_factory(jobs_api=True), await simulator_factory()
    client, old_client = ComfyUIClient(with_api.url), ComfyUIClient(without.url)
    try:
        assert (await client.job("no-such-prompt")).state is JobState.UNKNOWN
        # A 404 that is not ComfyUI's JSON error is no answer about the prompt.
        with pytest.raises(ComfyUIRejected):
            await old_client.job("no-such-prompt")
    finally:
        await client.close()
        await old_client.close()


async def test_a_job_sent_again_is_found_with_one_jobs_lookup(
    simulator_factory: StartSimulator, worker_factory: StartWorker
) -> None:
    simulator = await simulator_factory(jobs_api=True)
    client = await worker_factory(simulator)
    first = await run(client, "job-again", graph())
    simulator.sim.requests.clear()

    again = await run(client, "job-again", graph())

    assert again[-1].HasField("completed") and images(again) == images(first)
    assert len(simulator.sim.runs) == 1
    assert f"/api/jobs/{prompt_id_for('job-again')}" in asked(simulator)
    assert history_reads(simulator) == []
    assert "/queue" not in asked(simulator)  # finished: no position to read
    assert asked(simulator, "POST") == []  # nothing queued again


async def test_a_failure_is_classified_from_the_job_without_reading_history(
    simulator_factory: StartSimulator, worker_factory: StartWorker
) -> None:
    simulator = await simulator_factory(jobs_api=True)
    client = await worker_factory(simulator)
    simulator.sim.inject_oom("KSampler")
    events = await run(client, "job-oom", graph())
    assert events[-1].failed.reason == "GPU_OUT_OF_MEMORY"
    assert events[-1].failed.node_type == "KSampler"
    assert f"/api/jobs/{prompt_id_for('job-oom')}" in asked(simulator)
    assert history_reads(simulator) == []


async def test_a_dropped_websocket_is_reconciled_through_the_jobs_api(
    simulator_factory: StartSimulator, worker_factory: StartWorker
) -> None:
    simulator = await simulator_factory(jobs_api=True, step_seconds=0.05)
    client = await worker_factory(simulator)
    call = client.stub.Execute(worker.ExecuteRequest(job_id="job-drop", graph_json=graph(steps=10)))
    events = []
    async for response in call:
        events.append(response.event)
        if response.event.HasField("progress") and response.event.progress.value == 2:
            simulator.sim.requests.clear()
            await simulator.sim.drop_websockets()
    assert events[-1].HasField("completed") and len(images(events)) == 1
    lookups = asked(simulator).count(f"/api/jobs/{prompt_id_for('job-drop')}")
    assert lookups >= 2  # on the drop, and again when the socket reopened
    assert history_reads(simulator) == []


async def test_a_restarted_worker_follows_its_prompt_through_the_jobs_api(
    simulator_factory: StartSimulator, worker_factory: StartWorker
) -> None:
    simulator = await simulator_factory(jobs_api=True, step_seconds=0.05)
    first = await worker_factory(simulator)
    await start_and_abandon(first, "job-orphan", graph())
    await first.running.stop()
    simulator.sim.requests.clear()

    second = await worker_factory(simulator)
    attached = await attach(second, "job-orphan")
    assert attached[-1].HasField("completed") and len(images(attached)) == 1
    assert len(simulator.sim.runs) == 1
    assert f"/api/jobs/{prompt_id_for('job-orphan')}" in asked(simulator)
    assert history_reads(simulator) == []


async def test_cancel_tells_waiting_from_running_through_the_jobs_api(
    simulator_factory: StartSimulator, worker_factory: StartWorker
) -> None:
    simulator = await simulator_factory(jobs_api=True)
    client = await worker_factory(simulator)
    running, waiting = await cancel_waiting_and_running(client, simulator)
    assert waiting[0].accepted.queue_position == 1  # behind the running prompt
    assert waiting[-1].failed.reason == "INTERRUPTED"
    assert running[-1].failed.reason == "INTERRUPTED"
    assert "/api/jobs/nope" in asked(simulator)
    assert history_reads(simulator) == []


async def test_a_comfyui_restarted_as_an_older_release_is_detected_again(
    simulator_factory: StartSimulator, worker_factory: StartWorker
) -> None:
    newer = await simulator_factory(jobs_api=True)
    client = await worker_factory(newer)
    assert await client.running.client.has_jobs_api() is True
    port = int(newer.url.rsplit(":", 1)[1])
    await newer.stop()

    older = await simulator_factory(port=port)
    # The worker's websocket reopening on the restarted ComfyUI is what makes it forget.
    await wait_until(
        lambda: bool(older.sim._sockets) and client.running.tracker.connected.is_set(),
        seconds=10,
    )
    events = await run(client, "job-after-downgrade", graph())
    assert events[-1].HasField("completed")
    assert not [p for p in asked(older) if "/jobs" in p]
    assert f"/history/{prompt_id_for('job-after-downgrade')}" in asked(older)
