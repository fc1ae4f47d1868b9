"""`make demo`: the whole stack on this machine, one image end to end.

Starts what is missing — a private PostgreSQL under `.lockn/` when no
DATABASE_URL is set, the ComfyUI simulator when no ComfyUI URL is set — then a
ComfyWorker, GenerationService and the gateway as separate processes. It runs
one generation through the HTTP gateway (following its server-sent events) and
one through gRPC with the CLI's live progress, prints both image paths, and
stops every process it started. `--serve` keeps the stack up until Ctrl-C.
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import json
import os
import signal
import subprocess
import sys
import time
from collections.abc import Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import aiohttp
import asyncpg
from grpc_health.v1 import health_pb2, health_pb2_grpc

from services.embedded_postgres import EmbeddedPostgres, free_port
from services.grpc_server import open_channel
from services.settings import Settings, load_settings

STATE = Path(".lockn")
PROMPT = "a lighthouse on a cliff at dawn, oil painting"
START_TIMEOUT = 60.0


@dataclass
class Stack:
    """Child processes started by the demo, stopped in reverse order."""

    logs: Path
    processes: list[tuple[str, subprocess.Popen[bytes]]] = field(default_factory=list)

    def start(self, name: str, args: list[str], env: dict[str, str]) -> None:
        log = (self.logs / f"{name}.log").open("wb")
        process = subprocess.Popen(
            [sys.executable, "-m", "services.cli", *args],
            env=env,
            stdout=log,
            stderr=subprocess.STDOUT,
            start_new_session=True,
        )
        self.processes.append((name, process))

    def check_alive(self) -> None:
        for name, process in self.processes:
            if process.poll() is not None:
                raise RuntimeError(
                    f"{name} exited ({process.returncode}); see {self.logs}/{name}.log"
                )

    def stop(self) -> None:
        for _, process in reversed(self.processes):
            if process.poll() is None:
                process.send_signal(signal.SIGTERM)
        deadline = time.monotonic() + 15
        for _, process in reversed(self.processes):
            try:
                process.wait(max(0.1, deadline - time.monotonic()))
            except subprocess.TimeoutExpired:
                os.killpg(process.pid, signal.SIGKILL)
                process.wait()


def say(text: str) -> None:
    print(f"==> {text}", flush=True)


@contextlib.contextmanager
def database(settings: Settings) -> Iterator[str]:
    if settings.database_url is not None:
        yield settings.database_dsn
        return
    server = EmbeddedPostgres(STATE / "postgres")
    say(f"starting a private PostgreSQL in {server.root} (set DATABASE_URL to use yours)")
    dsn = server.start()
    try:
        asyncio.run(_create_database(dsn, "lockn"))
        yield dsn.rpartition("/")[0] + "/lockn"
    finally:
        server.stop()


async def _create_database(dsn: str, name: str) -> None:
    conn = await asyncpg.connect(dsn)
    try:
        if not await conn.fetchval("SELECT 1 FROM pg_database WHERE datname = $1", name):
            await conn.execute(f'CREATE DATABASE "{name}"')
    finally:
        await conn.close()


async def wait_serving(address: str, settings: Settings, stack: Stack) -> None:
    deadline = time.monotonic() + START_TIMEOUT
    async with open_channel(address, tls=settings.tls) as channel:
        stub = health_pb2_grpc.HealthStub(channel)
        while time.monotonic() < deadline:
            stack.check_alive()
            with contextlib.suppress(Exception):
                reply = await stub.Check(health_pb2.HealthCheckRequest(), timeout=1)
                if reply.status == health_pb2.HealthCheckResponse.SERVING:
                    return
            await asyncio.sleep(0.2)
    raise RuntimeError(f"{address} did not become SERVING within {START_TIMEOUT:.0f} s")


async def wait_http(url: str, stack: Stack) -> None:
    deadline = time.monotonic() + START_TIMEOUT
    async with aiohttp.ClientSession() as session:
        while time.monotonic() < deadline:
            stack.check_alive()
            with contextlib.suppress(aiohttp.ClientError):
                async with session.get(url, timeout=aiohttp.ClientTimeout(total=1)) as reply:
                    if reply.status == 200:
                        return
            await asyncio.sleep(0.2)
    raise RuntimeError(f"{url} did not answer within {START_TIMEOUT:.0f} s")


async def generate_over_http(base: str, token: str | None) -> list[str]:
    """POST a generation, follow its server-sent events, return its image paths."""
    headers = {"Authorization": f"Bearer {token}"} if token else {}
    body = {"template": "sd15-txt2img", "parameters": {"prompt": PROMPT, "steps": 12}}
    async with aiohttp.ClientSession(base, headers=headers) as session:
        async with session.post("/api/generations", json=body) as reply:
            created = await reply.json()
            if reply.status != 202:
                raise RuntimeError(f"gateway answered {reply.status}: {created}")
        generation_id = created["id"]
        say(f"HTTP: POST /api/generations -> 202, id {generation_id}")
        async with session.get(f"/api/generations/{generation_id}/events") as events:
            async for raw in events.content:
                line = raw.decode().strip()
                if line.startswith("data:"):
                    _print_event(json.loads(line[5:]))
        async with session.get(f"/api/generations/{generation_id}") as reply:
            final = await reply.json()
    if final.get("status") != "completed":
        raise RuntimeError(f"HTTP generation ended {final.get('status')}: {final.get('error')}")
    return [o["path"] for o in final.get("outputs", [])]


def _print_event(data: dict[str, Any]) -> None:
    status = data.get("status", "")
    progress = data.get("progress") or {}
    if progress.get("max"):
        print(f"    {status:<10} step {progress.get('value', 0)}/{progress['max']}", flush=True)
    else:
        print(f"    {status}", flush=True)


def child_env(
    settings: Settings, dsn: str, comfy_url: str, ports: dict[str, int]
) -> dict[str, str]:
    env = {k: v for k, v in os.environ.items() if k not in {"DATABASE_URL"}}
    env.update(
        {
            "LOCKN_DATABASE_URL": dsn,
            "LOCKN_COMFYUI__BASE_URL": comfy_url,
            "LOCKN_WORKER_LISTEN": f"127.0.0.1:{ports['worker']}",
            "LOCKN_GENERATION_LISTEN": f"127.0.0.1:{ports['generation']}",
            "LOCKN_GENERATION_ADDRESS": f"127.0.0.1:{ports['generation']}",
            "LOCKN_GATEWAY_LISTEN": f"127.0.0.1:{ports['gateway']}",
            "LOCKN_WORKERS": json.dumps(
                [{"name": "demo-gpu", "address": f"127.0.0.1:{ports['worker']}"}]
            ),
            "LOCKN_GENERATION_METRICS_PORT": str(ports["generation_metrics"]),
            "LOCKN_WORKER_METRICS_PORT": str(ports["worker_metrics"]),
            "LOCKN_LOG_FORMAT": "json",
        }
    )
    return env


def run(settings: Settings, serve_only: bool) -> int:
    STATE.mkdir(exist_ok=True)
    logs = STATE / "logs"
    logs.mkdir(exist_ok=True)
    stack = Stack(logs)
    ports = {
        name: free_port()
        for name in (
            "worker",
            "generation",
            "gateway",
            "simulator",
            "generation_metrics",
            "worker_metrics",
        )
    }
    token = next(iter(settings.auth_tokens), None)
    with database(settings) as dsn:
        try:
            comfy_url = str(settings.comfyui.base_url)
            if "base_url" not in settings.comfyui.model_fields_set:
                comfy_url = f"http://127.0.0.1:{ports['simulator']}"
                say(
                    f"starting the ComfyUI simulator on {comfy_url}"
                    " (set LOCKN_COMFYUI__BASE_URL for a real one)"
                )
                stack.start(
                    "simulator",
                    ["simulate-comfyui", "--port", str(ports["simulator"])],
                    dict(os.environ),
                )
            else:
                say(f"using ComfyUI at {comfy_url}")
            env = child_env(settings, dsn, comfy_url, ports)
            stack.start("comfy-worker", ["comfy-worker"], env)
            stack.start("generation-service", ["generation-service"], env)
            asyncio.run(wait_serving(f"127.0.0.1:{ports['worker']}", settings, stack))
            asyncio.run(wait_serving(f"127.0.0.1:{ports['generation']}", settings, stack))
            stack.start("gateway", ["gateway"], env)
            gateway = f"http://127.0.0.1:{ports['gateway']}"
            asyncio.run(wait_http(f"{gateway}/readyz", stack))
            say(
                f"stack up: gateway {gateway},"
                f" GenerationService 127.0.0.1:{ports['generation']}, logs in {logs}/"
            )
            if serve_only:
                say("serving until Ctrl-C")
                _wait_for_interrupt(stack)
                return 0
            http_paths = asyncio.run(generate_over_http(gateway, token))
            say("gRPC: lockn-gen generate (live progress)")
            cli = subprocess.run(
                [
                    sys.executable,
                    "-m",
                    "services.cli",
                    "generate",
                    PROMPT + ", watercolour",
                    "--param",
                    "steps=12",
                ],
                env=env,
                check=False,
            )
            if cli.returncode != 0:
                raise RuntimeError(f"the gRPC generation failed (exit {cli.returncode})")
            for path in http_paths:
                say(f"image from the HTTP gateway: {Path(path).resolve()}")
            say("done; stopping the stack")
            return 0
        except RuntimeError as error:
            print(f"demo failed: {error}", file=sys.stderr)
            return 1
        finally:
            stack.stop()


def _wait_for_interrupt(stack: Stack) -> None:
    """Sleep until Ctrl-C or SIGTERM, failing early if a child process dies."""

    def interrupt(*_: object) -> None:
        raise KeyboardInterrupt

    signal.signal(signal.SIGTERM, interrupt)
    with contextlib.suppress(KeyboardInterrupt):
        while True:
            stack.check_alive()
            time.sleep(0.5)


def _add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--serve", action="store_true", help="keep the stack up until Ctrl-C")


def register(commands: Any) -> None:
    """The `lockn-gen demo` subcommand."""
    sub = commands.add_parser("demo", help="run the whole stack and generate an image end to end")
    _add_arguments(sub)
    sub.set_defaults(run=lambda settings, args: _exit(run(settings, args.serve)))


def _exit(code: int) -> None:
    if code:
        raise SystemExit(code)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="make demo", description=__doc__.splitlines()[0])
    _add_arguments(parser)
    args = parser.parse_args(argv)
    return run(load_settings(), args.serve)


if __name__ == "__main__":
    sys.exit(main())
