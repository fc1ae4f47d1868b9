"""Metrics move with the work they describe, and each process serves them."""

from __future__ import annotations

import aiohttp
from prometheus_client import REGISTRY

from services import metrics
from services.contracts import gen
from services.embedded_postgres import free_port
from tests.fixtures.generation import GenerationClient


def sample(name: str, **labels: str) -> float:
    return REGISTRY.get_sample_value(name, labels) or 0.0


async def test_a_generation_moves_the_generation_and_worker_metrics(
    generation_service: GenerationClient,
) -> None:
    before = {
        "completed": sample("lockn_generations_total", outcome="completed", reason=""),
        "dispatched": sample("lockn_dispatch_latency_seconds_count"),
        "waited": sample("lockn_queue_wait_seconds_count"),
        "ran": sample("lockn_run_seconds_count"),
        "prompts": sample("lockn_comfyui_requests_total", route="/prompt", outcome="ok"),
    }
    created = await generation_service.create(steps=2)
    final = await generation_service.wait(created.id)
    assert final.status == gen.GENERATION_STATUS_COMPLETED

    assert sample("lockn_generations_total", outcome="completed", reason="") == (
        before["completed"] + 1
    )
    assert sample("lockn_dispatch_latency_seconds_count") == before["dispatched"] + 1
    assert sample("lockn_queue_wait_seconds_count") == before["waited"] + 1
    assert sample("lockn_run_seconds_count") == before["ran"] + 1
    assert sample("lockn_comfyui_requests_total", route="/prompt", outcome="ok") >= (
        before["prompts"] + 1
    )
    assert sample("lockn_comfyui_up") == 1


async def test_gateway_requests_are_counted_by_route_template(
    gateway: aiohttp.ClientSession,
) -> None:
    route = "/api/generations/{id}"
    before = sample("lockn_http_requests_total", route=route, status="404")
    async with gateway.get("/api/generations/00000000-0000-4000-8000-000000000000") as reply:
        assert reply.status == 404
    assert sample("lockn_http_requests_total", route=route, status="404") == before + 1


async def test_the_side_port_serves_prometheus_text() -> None:
    port = free_port()
    metrics.start_metrics_server(port, host="127.0.0.1")
    async with aiohttp.ClientSession() as http:
        async with http.get(f"http://127.0.0.1:{port}/metrics") as reply:
            assert reply.status == 200
            text = await reply.text()
    assert "# TYPE lockn_generations_total counter" in text
    assert "# TYPE lockn_queue_depth gauge" in text
