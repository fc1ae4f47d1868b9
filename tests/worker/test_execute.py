"""ComfyWorker over real gRPC in front of the simulator: the Execute stream,
error classification, reconnection, timeouts, cancel, retries and health."""

from __future__ import annotations

import asyncio
import json
from pathlib import Path
from typing import Any

import grpc
import pytest
from grpc_health.v1 import health_pb2, health_pb2_grpc

from services.comfy_worker.executor import CHUNK_BYTES, prompt_id_for
from services.comfy_worker.server import stable_client_id
from services.contracts import worker
from services.errors import InvalidArgument, from_rpc_error
from services.generation.templates import ImageRef, TemplateLibrary
from tests.fixtures.simulator import RunningSimulator, StartSimulator
from tests.fixtures.worker import StartWorker, WorkerClient
from tests.simulator.test_knobs import wait_until

WORKFLOWS = Path(__file__).resolve().parents[2] / "workflows"
LIBRARY = TemplateLibrary.load(WORKFLOWS)


def graph(template: str = "sd15-txt2img", **values: Any) -> str:
    values = {"prompt": 'a "quoted" cat {x}', "steps": 3, "seed": 7, **values}
    if template != "sd15-txt2img" and template != "sdxl-txt2img":
        values.pop("prompt")
    return json.dumps(LIBRARY.resolve(template, values).graph)


async def run(
    client: WorkerClient, job_id: str, graph_json: str, **request: Any
) -> list[worker.ExecutionEvent]:
    call = client.stub.Execute(
        worker.ExecuteRequest(job_id=job_id, graph_json=graph_json, **request)
    )
    return [response.event async for response in call]


async def start_and_abandon(client: WorkerClient, job_id: str, graph_json: str) -> None:
    """Execute until the prompt starts, then drop the stream (its caller died);
    the prompt runs on in ComfyUI."""
    call = client.stub.Execute(worker.ExecuteRequest(job_id=job_id, graph_json=graph_json))
    async for response in call:
        if response.event.HasField("started"):
            break
    call.cancel()


async def attach(client: WorkerClient, job_id: str) -> list[worker.ExecutionEvent]:
    """Every event of Attach to the job's prompt, to the end."""
    request = worker.AttachRequest(job_id=job_id, prompt_id=prompt_id_for(job_id))
    return [r.event async for r in client.stub.Attach(request, timeout=10)]


def kinds(events: list[worker.ExecutionEvent]) -> list[str]:
    return [str(e.WhichOneof("kind")) for e in events]


def images(events: list[worker.ExecutionEvent]) -> dict[int, bytes]:
    found: dict[int, bytes] = {}
    for event in events:
        if event.WhichOneof("kind") == "output":
            assert event.output.offset == len(found.get(event.output.index, b""))
            found[event.output.index] = found.get(event.output.index, b"") + event.output.data
    return found


async def test_a_job_streams_accepted_started_progress_images_completed(
    comfy_worker: WorkerClient, comfyui_simulator: RunningSimulator
) -> None:
    events = await run(comfy_worker, "job-1", graph(steps=3))

    order = [k for i, k in enumerate(kinds(events)) if i == 0 or kinds(events)[i - 1] != k]
    assert order == ["accepted", "started", "progress", "output", "completed"]
    assert events[0].accepted.prompt_id == prompt_id_for("job-1")
    assert [(e.progress.value, e.progress.max) for e in events if e.HasField("progress")] == [
        (1, 3),
        (2, 3),
        (3, 3),
    ]
    (png,) = images(events).values()
    assert png.startswith(b"\x89PNG")
    (chunk,) = [e.output for e in events if e.HasField("output")]  # small: one message
    assert chunk.last and chunk.data == png
    assert chunk.size_bytes == len(png) and chunk.content_type == "image/png"
    assert events[-1].completed.output_count == 1
    assert len(comfyui_simulator.sim.runs) == 1


async def test_a_large_image_streams_in_whole_chunks(
    comfy_worker: WorkerClient, comfyui_simulator: RunningSimulator
) -> None:
    events = await run(comfy_worker, "job-large", graph(steps=1, width=1024, height=1024))
    chunks = [e.output for e in events if e.HasField("output") and e.output.data]
    (png,) = images(events).values()
    saved = comfyui_simulator.sim.dirs["output"] / chunks[0].filename
    assert png == saved.read_bytes() and len(png) > 2 * CHUNK_BYTES
    # Every chunk but the last is whole: not whatever one socket read held.
    assert [len(c.data) for c in chunks[:-1]] == [CHUNK_BYTES] * (len(chunks) - 1)
    assert 0 < len(chunks[-1].data) <= CHUNK_BYTES
    # The last with data says so: no empty message after it.
    assert [c.last for c in chunks] == [False] * (len(chunks) - 1) + [True]
    assert [e.output.offset for e in events if e.HasField("output")] == [
        n * CHUNK_BYTES for n in range(len(chunks))
    ]


async def test_a_batch_yields_every_image(comfy_worker: WorkerClient) -> None:
    events = await run(comfy_worker, "job-batch", graph(batch_size=3, steps=1))
    assert sorted(images(events)) == [0, 1, 2]
    assert events[-1].completed.output_count == 3


async def test_a_graph_with_two_output_nodes_yields_both_images(
    comfy_worker: WorkerClient,
) -> None:
    two = json.loads(graph(steps=1))
    two["10"] = {
        "class_type": "SaveImage",
        "inputs": {"filename_prefix": "second", "images": ["8", 0]},
    }
    events = await run(comfy_worker, "job-two-outputs", json.dumps(two))
    assert sorted(images(events)) == [0, 1]
    last = {e.output.node_id: e.output.filename for e in events if e.HasField("output")}
    assert set(last) == {"9", "10"} and last["10"].startswith("second")
    assert events[-1].completed.output_count == 2


async def test_a_prompt_served_from_comfyuis_cache_still_yields_its_image(
    comfy_worker: WorkerClient, comfyui_simulator: RunningSimulator
) -> None:
    first = await run(comfy_worker, "job-fresh", graph(steps=2))
    cached = await run(comfy_worker, "job-cached", graph(steps=2))  # same graph, new job

    assert not first[-1].completed.cached and cached[-1].completed.cached
    assert images(cached) == images(first)
    assert "progress" not in kinds(cached)  # nothing was sampled again


async def test_a_missing_model_is_reported_with_the_models_that_exist(
    comfy_worker: WorkerClient, comfyui_simulator: RunningSimulator
) -> None:
    bad = json.loads(graph())
    bad["4"]["inputs"]["ckpt_name"] = "nope.safetensors"
    events = await run(comfy_worker, "job-model", json.dumps(bad))

    assert kinds(events) == ["failed"]
    failed = events[0].failed
    assert failed.reason == "MODEL_NOT_FOUND" and not failed.retryable
    assert "v1-5-pruned-emaonly.safetensors" in failed.message
    assert failed.node_id == "4" and failed.node_type == "CheckpointLoaderSimple"
    assert comfyui_simulator.sim.runs == []


async def test_an_invalid_workflow_names_node_and_input(comfy_worker: WorkerClient) -> None:
    bad = json.loads(graph())
    del bad["3"]["inputs"]["model"]
    events = await run(comfy_worker, "job-invalid", json.dumps(bad))

    failed = events[-1].failed
    assert failed.reason == "INVALID_WORKFLOW"
    assert failed.node_id == "3" and failed.details["input"] == "model"

    unknown = json.loads(graph())
    unknown["3"]["class_type"] = "NoSuchNode"
    events = await run(comfy_worker, "job-unknown", json.dumps(unknown))
    assert events[-1].failed.reason == "INVALID_WORKFLOW"
    assert "NoSuchNode" in events[-1].failed.message


async def test_gpu_out_of_memory_is_classified_with_its_node(
    comfy_worker: WorkerClient, comfyui_simulator: RunningSimulator
) -> None:
    comfyui_simulator.sim.inject_oom("KSampler")
    events = await run(comfy_worker, "job-oom", graph())

    failed = events[-1].failed
    assert failed.reason == "GPU_OUT_OF_MEMORY" and not failed.retryable
    assert (failed.node_id, failed.node_type) == ("3", "KSampler")
    assert "out of memory" in failed.message


async def test_a_timeout_cancels_the_prompt_in_comfyui(
    comfy_worker: WorkerClient, comfyui_simulator: RunningSimulator
) -> None:
    comfyui_simulator.sim.set_step_seconds(0.5)
    events = await run(comfy_worker, "job-slow", graph(steps=50), timeout_seconds=1)

    assert events[-1].failed.reason == "TIMEOUT"
    await asyncio.sleep(0.7)  # the interrupt lands at the next step
    assert comfyui_simulator.sim.running is None
    assert comfyui_simulator.sim.runs[-1].ended is not None


async def test_a_dropped_websocket_loses_no_completion(
    comfy_worker: WorkerClient, comfyui_simulator: RunningSimulator
) -> None:
    comfyui_simulator.sim.set_step_seconds(0.05)
    call = comfy_worker.stub.Execute(
        worker.ExecuteRequest(job_id="job-drop", graph_json=graph(steps=10))
    )
    events = []
    async for response in call:
        events.append(response.event)
        if response.event.HasField("progress") and response.event.progress.value == 2:
            await comfyui_simulator.sim.drop_websockets()
    assert events[-1].HasField("completed")
    assert len(images(events)) == 1


async def test_a_comfyui_restart_that_loses_the_prompt_is_reported_lost(
    comfy_worker: WorkerClient, comfyui_simulator: RunningSimulator
) -> None:
    comfyui_simulator.sim.set_step_seconds(0.05)
    call = comfy_worker.stub.Execute(
        worker.ExecuteRequest(job_id="job-lost", graph_json=graph(steps=40))
    )
    events = []
    async for response in call:
        events.append(response.event)
        if response.event.HasField("progress"):
            await comfyui_simulator.sim.restart()
    failed = events[-1].failed
    assert failed.reason == "PROMPT_LOST" and failed.retryable


async def test_sending_a_job_again_follows_the_first_run_instead_of_rerunning(
    comfy_worker: WorkerClient, comfyui_simulator: RunningSimulator
) -> None:
    first = await run(comfy_worker, "job-twice", graph())
    again = await run(comfy_worker, "job-twice", graph())

    assert len(comfyui_simulator.sim.runs) == 1
    assert images(again) == images(first)
    assert again[-1].HasField("completed")


async def test_a_first_send_posts_at_once_and_a_resend_looks_first(
    comfy_worker: WorkerClient, comfyui_simulator: RunningSimulator
) -> None:
    requests = comfyui_simulator.sim.requests
    requests.clear()
    first = await run(comfy_worker, "job-first", graph(), first_send=True)
    before_post = list(requests)[: list(requests).index(("POST", "/prompt"))]
    assert first[-1].HasField("completed")
    assert not [path for _, path in before_post if path.startswith(("/queue", "/history"))]

    requests.clear()
    again = await run(comfy_worker, "job-first", graph())
    assert again[-1].HasField("completed") and images(again) == images(first)
    assert ("GET", "/queue") in requests and ("POST", "/prompt") not in requests
    assert len(comfyui_simulator.sim.runs) == 1


async def test_the_queue_position_of_a_new_prompt_is_read_only_when_asked_for(
    comfy_worker: WorkerClient, comfyui_simulator: RunningSimulator
) -> None:
    requests = comfyui_simulator.sim.requests
    requests.clear()
    quiet = await run(comfy_worker, "job-quiet", graph(), first_send=True)
    assert quiet[0].accepted.queue_position == -1 and ("GET", "/queue") not in requests

    requests.clear()
    asked = await run(
        comfy_worker, "job-asked", graph(), first_send=True, report_queue_position=True
    )
    assert asked[0].accepted.queue_position == 0 and list(requests).count(("GET", "/queue")) == 1
    assert quiet[-1].HasField("completed") and asked[-1].HasField("completed")


async def test_a_run_its_frames_told_in_full_ends_without_asking_comfyui(
    comfy_worker: WorkerClient, comfyui_simulator: RunningSimulator
) -> None:
    requests = comfyui_simulator.sim.requests
    requests.clear()

    events = await run(comfy_worker, "job-told", graph(steps=2), first_send=True)

    assert events[-1].HasField("completed") and len(images(events)) == 1
    assert not [path for _, path in requests if path.startswith(("/history", "/api/"))]
    assert [path for _, path in requests if path.startswith("/view")]


async def test_attach_follows_a_running_prompt_to_the_end(
    comfy_worker: WorkerClient, comfyui_simulator: RunningSimulator
) -> None:
    comfyui_simulator.sim.set_step_seconds(0.05)
    await start_and_abandon(comfy_worker, "job-attach", graph(steps=10))
    attached = await attach(comfy_worker, "job-attach")
    assert attached[-1].HasField("completed") and len(images(attached)) == 1
    assert len(comfyui_simulator.sim.runs) == 1


async def test_a_new_worker_follows_a_prompt_queued_by_a_dead_one(
    worker_factory: StartWorker, comfyui_simulator: RunningSimulator
) -> None:
    # ComfyUI sends a prompt's frames only to the clientId that queued it: the
    # new worker hears nothing and must find the end by asking ComfyUI.
    comfyui_simulator.sim.set_step_seconds(0.05)
    first = await worker_factory(comfyui_simulator)
    await start_and_abandon(first, "job-orphan", graph())
    await first.running.stop()
    second = await worker_factory(comfyui_simulator)
    assert second.running.tracker.client_id != first.running.tracker.client_id
    attached = await attach(second, "job-orphan")
    assert attached[-1].HasField("completed") and len(images(attached)) == 1
    assert len(comfyui_simulator.sim.runs) == 1


def test_a_worker_keeps_its_websocket_client_id_across_restarts() -> None:
    url = "http://gpu-1:8188/"
    assert stable_client_id(url, "0.0.0.0:50052") == stable_client_id(url, "0.0.0.0:50052")
    assert stable_client_id(url, "0.0.0.0:50052") != stable_client_id(url, "0.0.0.0:50053")
    assert stable_client_id(url, "127.0.0.1:0") is None  # no fixed place, no fixed id


async def cancel_waiting_and_running(
    client: WorkerClient, simulator: RunningSimulator
) -> tuple[list[worker.ExecutionEvent], list[worker.ExecutionEvent]]:
    """Queue a long prompt and a second behind it, then Cancel the waiting one,
    the running one and an unknown id: DELETED, INTERRUPTED, NOT_FOUND. The
    events of (running, waiting), both streams run to their end."""
    simulator.sim.set_step_seconds(0.05)
    running = asyncio.create_task(run(client, "job-running", graph(steps=100)))
    await wait_until(lambda: simulator.sim.running is not None)
    waiting = asyncio.create_task(
        run(client, "job-waiting", graph(steps=101), report_queue_position=True)
    )
    await wait_until(lambda: len(simulator.sim.pending) == 1)
    await wait_until(lambda: prompt_id_for("job-waiting") in client.running.executor.in_flight)
    outcomes = [
        (await client.stub.Cancel(worker.CancelRequest(prompt_id=prompt_id))).outcome
        for prompt_id in (prompt_id_for("job-waiting"), prompt_id_for("job-running"), "nope")
    ]
    assert outcomes == [
        worker.CANCEL_OUTCOME_DELETED,
        worker.CANCEL_OUTCOME_INTERRUPTED,
        worker.CANCEL_OUTCOME_NOT_FOUND,
    ]
    return await running, await waiting


async def test_cancel_deletes_a_waiting_prompt_and_interrupts_a_running_one(
    comfy_worker: WorkerClient, comfyui_simulator: RunningSimulator
) -> None:
    running, waiting = await cancel_waiting_and_running(comfy_worker, comfyui_simulator)
    assert waiting[-1].failed.reason == "INTERRUPTED"
    assert running[-1].failed.reason == "INTERRUPTED"
    assert [r.prompt_id for r in comfyui_simulator.sim.runs] == [prompt_id_for("job-running")]


async def test_a_comfyui_that_assigns_its_own_prompt_ids_still_works(
    simulator_factory: StartSimulator, worker_factory: StartWorker
) -> None:
    # Releases before client-chosen prompt ids ignore ours: the worker follows
    # and cancels by ComfyUI's id, and a job sent again still runs only once.
    simulator = await simulator_factory(client_prompt_ids=False)
    client = await worker_factory(simulator)
    events = await run(client, "job-old-comfy", graph())
    assert events[0].accepted.prompt_id == prompt_id_for("job-old-comfy")
    assert events[-1].HasField("completed") and len(images(events)) == 1
    assert simulator.sim.runs[0].prompt_id != prompt_id_for("job-old-comfy")
    theirs = simulator.sim.runs[0].prompt_id
    assert events[0].accepted.comfyui_prompt_id == theirs
    again = await run(client, "job-old-comfy", graph())
    assert again[-1].HasField("completed") and len(simulator.sim.runs) == 1

    # A restarted worker has no memory of ComfyUI's id: the caller hands it back.
    restarted = await worker_factory(simulator)
    resent = await run(restarted, "job-old-comfy", graph(), comfyui_prompt_id=theirs)
    assert resent[0].accepted.comfyui_prompt_id == theirs
    assert resent[-1].HasField("completed") and len(simulator.sim.runs) == 1
    with pytest.raises(grpc.aio.AioRpcError) as refused:
        await run(restarted, "job-old-comfy", graph(), comfyui_prompt_id="../../free")
    assert refused.value.code() == grpc.StatusCode.INVALID_ARGUMENT
    error = from_rpc_error(refused.value)
    assert isinstance(error, InvalidArgument)
    assert [name for name, _ in error.violations] == ["comfyui_prompt_id"]

    simulator.sim.set_step_seconds(0.05)
    running = asyncio.create_task(run(client, "job-old-cancel", graph(steps=100)))
    while simulator.sim.running is None:
        await asyncio.sleep(0.01)
    cancelled = await client.stub.Cancel(
        worker.CancelRequest(prompt_id=prompt_id_for("job-old-cancel"))
    )
    assert cancelled.outcome == worker.CANCEL_OUTCOME_INTERRUPTED
    assert (await running)[-1].failed.reason == "INTERRUPTED"


async def test_transient_errors_are_retried_and_4xx_never(
    comfy_worker: WorkerClient, comfyui_simulator: RunningSimulator
) -> None:
    comfyui_simulator.sim.fail_http(503, times=2, paths=("/prompt",))
    events = await run(comfy_worker, "job-retried", graph(steps=1))
    assert events[-1].HasField("completed")

    comfyui_simulator.sim.fail_http(404, times=2, paths=("/prompt",))
    events = await run(comfy_worker, "job-404", graph(steps=1))
    assert events[-1].failed.reason == "INVALID_WORKFLOW"
    assert comfyui_simulator.sim.faults.http_errors == 1  # one request, no retry


async def test_unreachable_comfyui_fails_retryably_and_health_follows_it(
    simulator_factory: StartSimulator, worker_factory: StartWorker
) -> None:
    simulator = await simulator_factory()
    client = await worker_factory(simulator)
    health = health_pb2_grpc.HealthStub(client.channel)
    port = int(simulator.url.rsplit(":", 1)[1])

    async def status() -> int:
        answer = await health.Check(health_pb2.HealthCheckRequest(service=""))
        return int(answer.status)

    await wait_for(lambda: status(), health_pb2.HealthCheckResponse.SERVING)
    await simulator.stop()
    events = await run(client, "job-down", graph(steps=1))
    assert events[-1].failed.reason == "COMFYUI_UNREACHABLE" and events[-1].failed.retryable
    await wait_for(lambda: status(), health_pb2.HealthCheckResponse.NOT_SERVING)

    await simulator_factory(port=port)
    await wait_for(lambda: status(), health_pb2.HealthCheckResponse.SERVING)
    events = await run(client, "job-back", graph(steps=1))
    assert events[-1].HasField("completed")


async def wait_for(probe: Any, expected: int, seconds: float = 10.0) -> None:
    async with asyncio.timeout(seconds):
        while await probe() != expected:
            await asyncio.sleep(0.05)


async def test_polling_is_the_fallback_when_no_websocket_opens(
    simulator_factory: StartSimulator, worker_factory: StartWorker
) -> None:
    simulator = await simulator_factory()
    client = await worker_factory(simulator)
    simulator.sim.fail_http(500, times=10_000, paths=("/ws",))
    await simulator.sim.drop_websockets()
    await asyncio.sleep(0.1)
    assert not client.running.tracker.connected.is_set()

    events = await run(client, "job-polled", graph(steps=2))
    assert events[-1].HasField("completed")


async def test_input_images_are_uploaded_and_the_loader_points_at_them(
    comfy_worker: WorkerClient, comfyui_simulator: RunningSimulator
) -> None:
    png = (comfyui_simulator.sim.dirs["output"]).parent / "in.png"
    from services.simulator.images import render_png

    png.write_bytes(render_png(64, 64, 1))
    resolved = LIBRARY.resolve("img2img", {"prompt": "x", "image": ImageRef("photo.png")})
    events = await run(
        comfy_worker,
        "job-img2img",
        json.dumps(resolved.graph),
        input_images=[worker.InputImage(name="photo.png", data=png.read_bytes())],
    )
    assert events[-1].HasField("completed"), events[-1]
    uploaded = list(comfyui_simulator.sim.dirs["input"].iterdir())
    assert [p.read_bytes() for p in uploaded] == [png.read_bytes()]


async def test_stats_and_models_come_from_comfyui(comfy_worker: WorkerClient) -> None:
    stats = await comfy_worker.stub.GetSystemStats(worker.GetSystemStatsRequest())
    models = await comfy_worker.stub.ListModels(worker.ListModelsRequest())

    assert stats.comfyui_version == "0.3.64" and stats.devices[0].vram_total > 0
    assert "v1-5-pruned-emaonly.safetensors" in models.models["checkpoints"].names
    assert models.models["upscale_models"].names == ["RealESRGAN_x4plus.pth"]


async def test_only_generation_services_credential_runs_work(
    worker_factory: StartWorker, comfyui_simulator: RunningSimulator
) -> None:
    client = await worker_factory(comfyui_simulator, worker_token="s3cret")
    with pytest.raises(grpc.aio.AioRpcError) as error:
        await run(client, "job-anon", graph())
    assert error.value.code() == grpc.StatusCode.UNAUTHENTICATED
    call = client.stub.Execute(
        worker.ExecuteRequest(job_id="job-auth", graph_json=graph(steps=1)),
        metadata=[("authorization", "Bearer s3cret")],
    )
    assert [r.event async for r in call][-1].HasField("completed")
