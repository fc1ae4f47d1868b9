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
import signal
import subprocess
import sys
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import aiohttp
import asyncpg

from services.embedded_postgres import EmbeddedPostgres
from services.settings import Settings, SettingsError, load_settings
from services.stack import LocalStack, Part

STATE = Path(".lockn")
PROMPT = "a lighthouse on a cliff at dawn, oil painting"


def say(text: str) -> None:
    print(f"==> {text}", flush=True)


@contextlib.contextmanager
def database(settings: Settings) -> Iterator[str]:
    """The configured database, or a private server under .lockn/ for the demo's lifetime."""
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


async def generate_over_http(gateway: str, token: str | None) -> list[str]:
    """POST a generation, follow its server-sent events, return its image paths."""
    headers = {"Authorization": f"Bearer {token}"} if token else {}
    body = {"template": "sd15-txt2img", "parameters": {"prompt": PROMPT, "steps": 12}}
    async with aiohttp.ClientSession(gateway, headers=headers) as session:
        async with session.post("/api/generations", json=body) as reply:
            created = await reply.json()
            if reply.status != 202:
                raise RuntimeError(f"gateway answered {reply.status}: {created}")
        generation_id = created["id"]
        say(f"HTTP: POST /api/generations -> 202, id {generation_id}; following its events")
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
    # The stream replays every event from the first, so the snapshot adds nothing here.
    event = data.get("event")
    if event is None:
        return
    progress = event.get("progress") or {}
    if event.get("type") == "progress" and progress.get("max"):
        print(f"    step {progress.get('value', 0)}/{progress['max']}", flush=True)
    else:
        print(f"    {event.get('type', '')}", flush=True)


async def start_stack(stack: LocalStack, settings: Settings, dsn: str) -> tuple[Part, Part]:
    """Simulator (unless a ComfyUI URL is set), worker, GenerationService, gateway."""
    if "base_url" in settings.comfyui.model_fields_set:
        comfy_url = str(settings.comfyui.base_url)
        say(f"using ComfyUI at {comfy_url}")
    else:
        simulator = stack.start_simulator()
        comfy_url = simulator.address
        say(
            f"starting the ComfyUI simulator on {comfy_url}"
            " (set LOCKN_COMFYUI__BASE_URL to use yours)"
        )
        await stack.wait_serving(simulator)
    worker = stack.start_worker("comfy-worker", comfy_url)
    await stack.wait_serving(worker)
    generation = stack.start_generation("generation-service", dsn, [worker])
    await stack.wait_serving(generation)
    gateway = stack.start_gateway(generation)
    await stack.wait_serving(gateway)
    say(f"stack up: gateway {gateway.address}, GenerationService {generation.address}")
    say(f"process logs: {stack.logs}/")
    return generation, gateway


def run(settings: Settings, serve_only: bool) -> int:
    stack = LocalStack(STATE / "logs")
    token = next(iter(settings.auth_tokens), None)
    with database(settings) as dsn:
        try:
            generation, gateway = asyncio.run(start_stack(stack, settings, dsn))
            if serve_only:
                say("serving until Ctrl-C")
                _wait_for_interrupt(stack)
                return 0
            http_paths = asyncio.run(generate_over_http(gateway.address, token))
            say("gRPC: lockn-gen generate, with live progress")
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
                env=stack.env(LOCKN_GENERATION_ADDRESS=generation.address),
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


def _wait_for_interrupt(stack: LocalStack) -> None:
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
    try:
        settings = load_settings()
    except SettingsError as error:
        print(f"demo failed: {error}", file=sys.stderr)
        return 2
    return run(settings, args.serve)


if __name__ == "__main__":
    sys.exit(main())
