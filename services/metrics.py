"""Prometheus metrics of every process, exposed on a side port of each.

Names and labels are documented in the README. Defined once here so that the
code that observes a metric and the docs that describe it cannot disagree.
A metrics port of 0 turns the exposition off.
"""

from __future__ import annotations

from prometheus_client import Counter, Gauge, Histogram, start_http_server

_LATENCY = (0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1, 2.5, 5, 10)
_DURATION = (0.1, 0.5, 1, 2.5, 5, 10, 30, 60, 120, 300, 600, 1800)

QUEUE_DEPTH = Gauge("lockn_queue_depth", "Generations by status", ["status"])
DISPATCH_LATENCY = Histogram(
    "lockn_dispatch_latency_seconds",
    "From a claim (or a create that dispatched at once) to ComfyUI accepting the prompt",
    buckets=_LATENCY,
)
QUEUE_WAIT = Histogram(
    "lockn_queue_wait_seconds", "From creation to the start of execution", buckets=_DURATION
)
RUN_TIME = Histogram("lockn_run_seconds", "From start of execution to the end", buckets=_DURATION)
GENERATIONS = Counter(
    "lockn_generations_total", "Finished generations by outcome and reason", ["outcome", "reason"]
)
WORKER_SLOTS_IN_USE = Gauge("lockn_worker_slots_in_use", "Slots in use per worker", ["worker"])
WORKER_SERVING = Gauge("lockn_worker_serving", "1 while a worker's health is SERVING", ["worker"])
COMFYUI_UP = Gauge("lockn_comfyui_up", "1 while ComfyUI answers this worker")
COMFYUI_WS_RECONNECTS = Counter(
    "lockn_comfyui_ws_reconnects_total", "Times the worker reopened ComfyUI's websocket"
)
COMFYUI_REQUESTS = Counter(
    "lockn_comfyui_requests_total",
    "HTTP requests to ComfyUI by route and outcome",
    ["route", "outcome"],
)

HTTP_REQUESTS = Counter(
    "lockn_http_requests_total", "Gateway requests by route and HTTP status", ["route", "status"]
)
HTTP_LATENCY = Histogram(
    "lockn_http_request_seconds",
    "Gateway time to the response headers, by route",
    ["route"],
    buckets=_LATENCY,
)


def start_metrics_server(port: int, host: str = "0.0.0.0") -> None:
    """Serve /metrics on `port` from a background thread; 0 disables it."""
    if port:
        start_http_server(port, addr=host)
