"""`make demo` and `make up`: the whole stack on this machine.

Starts what is missing — a private PostgreSQL under `.lockn/` when no
DATABASE_URL is set, the ComfyUI simulator when no ComfyUI URL is set — then a
ComfyWorker, GenerationService and the gateway as separate processes. The demo
runs one generation through the HTTP gateway (following its server-sent events,
then downloading its image through the gateway) and one through gRPC with the
CLI's live progress, and stops every process it started. `--serve` (`make up`)
prints how to reach the stack instead and keeps it up until Ctrl-C, SIGTERM or
SIGHUP (its terminal closing). One run at a time holds `.lockn/`; a run that
finds parts or a PostgreSQL a killed run left there stops them first.
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import fcntl
import json
import mimetypes
import os
import signal
import subprocess
import sys
import time
from collections.abc import Iterator
from pathlib import Path
from types import FrameType
from typing import Any, NoReturn

import aiohttp
import asyncpg

from services.embedded_postgres import EmbeddedPostgres
from services.settings import Settings, SettingsError, load_settings
from services.stack import LocalStack, Part, stop_leftovers

STATE = Path(".lockn")
PROMPT = "a lighthouse on a cliff at dawn, oil painting"
# Besides Ctrl-C: the parts run in sessions of their own, so a signal to the
# demo's process group (a closed terminal sends SIGHUP) reaches only the demo,
# which must stop them.
STOP_SIGNALS = (signal.SIGTERM, signal.SIGHUP)
# What ends a run with one `demo failed: ...` line instead of a traceback.
FAILURES = (RuntimeError, OSError, aiohttp.ClientError, asyncpg.PostgresError)
# Settings of each service that a run keeps when the user sets them; otherwise
# it picks a free port and turns metrics off, so as not to collide with
# anything already running.
KEPT_SETTINGS = {
    "worker": ("worker_listen", "worker_metrics_port"),
    "generation": ("generation_listen", "generation_metrics_port"),
    "gateway": ("gateway_listen", "gateway_metrics_port"),
}
METRICS = {
    "GenerationService": "generation_metrics_port",
    "ComfyWorker": "worker_metrics_port",
    "gateway": "gateway_metrics_port",
}


def say(text: str) -> None:
    print(f"==> {text}", flush=True)


@contextlib.contextmanager
def stopped_by_signals() -> Iterator[None]:
    """SIGTERM and SIGHUP stop the run as Ctrl-C does (KeyboardInterrupt)."""

    def interrupt(signum: int, frame: FrameType | None) -> None:
        _shield()
        raise KeyboardInterrupt

    previous = {sig: signal.signal(sig, interrupt) for sig in STOP_SIGNALS}
    try:
        yield
    finally:
        for sig, handler in previous.items():
            signal.signal(sig, handler)


def _shield() -> None:
    """Ignore SIGTERM and SIGHUP from here on: a second one (the terminal closing
    while the run ends) must not cut short the stopping of what it started."""
    for sig in STOP_SIGNALS:
        signal.signal(sig, signal.SIG_IGN)


@contextlib.contextmanager
def own_state(state: Path) -> Iterator[None]:
    """`state` for this run alone, with whatever a killed run left there stopped.

    Two runs must not share the private PostgreSQL, and a run must not take the
    server of one still running for a leftover: the lock (held until this
    process ends, however it ends) tells the two apart.
    """
    state.mkdir(parents=True, exist_ok=True)
    with (state / "run.lock").open("a+") as lock:
        try:
            fcntl.flock(lock, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            lock.seek(0)
            holder = lock.read().strip() or "?"
            raise RuntimeError(
                f"another make up or make demo (pid {holder}) is running from this folder"
                f" and holds {state}/; stop it first (Ctrl-C in its terminal, or kill {holder})"
            ) from None
        lock.truncate(0)
        lock.write(f"{os.getpid()}\n")
        lock.flush()
        left = stop_leftovers(state / "logs")
        if left:
            say(f"stopped what an earlier run left running: {', '.join(left)}")
        yield


@contextlib.contextmanager
def database(settings: Settings) -> Iterator[str]:
    """The configured database, or a private server under .lockn/ for the run's lifetime."""
    if settings.database_url is not None:
        yield settings.database_dsn
        return
    folder = STATE / "postgres"
    server = EmbeddedPostgres(folder)
    leftover = server.running_pid()
    if leftover is not None:
        # Only a run holding .lockn/ starts this server, and none holds it now:
        # an earlier run was killed before it could stop it.
        try:
            server.stop()
        except RuntimeError as error:
            raise RuntimeError(
                f"a PostgreSQL an earlier run left running (pid {leftover}) holds {folder}"
                f" and would not stop ({error}); {server.how_to_stop(leftover)}"
            ) from None
        say(f"stopped the private PostgreSQL an earlier run left running (pid {leftover})")
    say(f"starting a private PostgreSQL in {folder} (set DATABASE_URL to use yours)")
    try:
        dsn = server.start()
        asyncio.run(_create_database(dsn, "lockn"))
        yield dsn.rpartition("/")[0] + "/lockn"
    finally:
        _shield()
        server.stop()


async def _create_database(dsn: str, name: str) -> None:
    conn = await asyncpg.connect(dsn)
    try:
        if not await conn.fetchval("SELECT 1 FROM pg_database WHERE datname = $1", name):
            await conn.execute(f'CREATE DATABASE "{name}"')
    finally:
        await conn.close()


async def generate_over_http(gateway: str, token: str | None, images: Path) -> Path:
    """POST a generation, follow its server-sent events, and save its image as
    the gateway's image route serves it; the saved file."""
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
        route = f"/api/generations/{generation_id}/image"
        async with session.get(route) as reply:
            if reply.status != 200:
                raise RuntimeError(f"GET {route} answered {reply.status}")
            suffix = mimetypes.guess_extension(reply.content_type) or ""
            image = await reply.read()
    path = images / f"{generation_id}{suffix}"
    await asyncio.to_thread(_save, path, image)
    say(f"HTTP: GET {route} -> saved {path}")
    return path


def _save(path: Path, content: bytes) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_bytes(content)


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


def _kept(settings: Settings, service: str) -> dict[str, str]:
    return {
        f"LOCKN_{name.upper()}": str(getattr(settings, name))
        for name in KEPT_SETTINGS[service]
        if name in settings.model_fields_set
    }


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
    worker = stack.start_worker("comfy-worker", comfy_url, 0, **_kept(settings, "worker"))
    await stack.wait_serving(worker)
    generation = stack.start_generation(
        "generation-service", dsn, [worker], **_kept(settings, "generation")
    )
    await stack.wait_serving(generation)
    gateway = stack.start_gateway(generation, **_kept(settings, "gateway"))
    await stack.wait_serving(gateway)
    say(f"stack up: gateway {gateway.address}, GenerationService {generation.address}")
    say(f"process logs: {stack.logs}/")
    return generation, gateway


def client_token(settings: Settings) -> str | None:
    """What the demo presents to the gateway and the CLI: the CLI's own token
    when set, else the first the services accept."""
    if settings.client_token is not None:
        return settings.client_token.get_secret_value()
    return next(iter(settings.auth_tokens), None)


def demonstrate(stack: LocalStack, generation: Part, gateway: Part, token: str | None) -> None:
    """One generation over HTTP, then one over gRPC through the CLI."""
    asyncio.run(generate_over_http(gateway.address, token, STATE / "images"))
    say("gRPC: lockn-gen generate, with live progress")
    credentials = {"LOCKN_CLIENT_TOKEN": token} if token else {}
    prompt = PROMPT + ", watercolour"
    cli = subprocess.run(
        [sys.executable, "-m", "services.cli", "generate", prompt, "--param", "steps=12"],
        env=stack.env(LOCKN_GENERATION_ADDRESS=generation.address, **credentials),
        check=False,
    )
    if cli.returncode != 0:
        raise RuntimeError(f"the gRPC generation failed (exit {cli.returncode})")


def how_to_use(settings: Settings, generation: Part, gateway: Part) -> None:
    """Lines to paste into another shell to reach this stack."""
    cli = Path(sys.executable).parent / "lockn-gen"
    with contextlib.suppress(ValueError):
        cli = cli.relative_to(Path.cwd())
    command = str(cli) if cli.exists() else "lockn-gen"
    activate = cli.parent / "activate"
    also = f", or `source {activate}` for plain lockn-gen" if activate.exists() else ""
    say(f"to use it from another shell (the CLI is {command}{also}):")
    print(f"    export LOCKN_GENERATION_ADDRESS={generation.address}")
    bearer = ""
    if settings.auth_tokens:
        print("    export LOCKN_CLIENT_TOKEN=...  # one of the tokens in LOCKN_AUTH_TOKENS")
        bearer = ' -H "Authorization: Bearer $LOCKN_CLIENT_TOKEN"'
    print(f'    {command} generate "a lighthouse at dusk" --watch')
    print(f"    curl{bearer} {gateway.address}/api/stats", flush=True)
    served = [
        f"{name} http://127.0.0.1:{getattr(settings, port)}/metrics"
        for name, port in METRICS.items()
        if port in settings.model_fields_set and getattr(settings, port)
    ]
    if served:
        say(f"metrics: {', '.join(served)}")
    else:
        variables = ", ".join(f"LOCKN_{port.upper()}" for port in METRICS.values())
        say(f"metrics: off (set {variables} to serve them)")


def run(settings: Settings, serve_only: bool) -> int:
    """`make demo`, or with `serve_only` `make up`; the exit status."""
    try:
        with stopped_by_signals(), own_state(STATE), database(settings) as dsn:
            stack = LocalStack(STATE / "logs")
            try:
                generation, gateway = asyncio.run(start_stack(stack, settings, dsn))
                if serve_only:
                    how_to_use(settings, generation, gateway)
                    say("serving until Ctrl-C")
                    _serve(stack)
                else:
                    demonstrate(stack, generation, gateway, client_token(settings))
                    say("done; stopping the stack")
            finally:
                _shield()
                stack.stop()
    except KeyboardInterrupt:
        if serve_only:
            say("stopped everything it started")
            return 0
        print("demo interrupted; stopped everything it started", file=sys.stderr)
        return 130
    except FAILURES as error:
        print(f"demo failed: {error}", file=sys.stderr)
        return 1
    return 0


def _serve(stack: LocalStack) -> NoReturn:
    """Until Ctrl-C or a stop signal (KeyboardInterrupt); fails early if a part dies."""
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
