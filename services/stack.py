"""A LockN Gen stack on this machine, one OS process per part.

The demo, the benchmarks and the fault-injection tests all need the same
thing: start the simulator, workers, GenerationService replicas and the
gateway as real processes (so they can be measured and SIGKILLed), wait until
each answers its health check, and never leave one behind. Each running part
has a record beside its log (`<name>.pid`), so that what a stack killed
before it could stop its parts left running can be found and stopped.
"""

from __future__ import annotations

import asyncio
import contextlib
import json
import os
import signal
import subprocess
import sys
import time
from collections.abc import Sequence
from dataclasses import dataclass, field
from pathlib import Path

import aiohttp
from grpc_health.v1 import health_pb2, health_pb2_grpc

from services.embedded_postgres import free_port
from services.grpc_server import open_channel

START_TIMEOUT = 60.0
STOP_TIMEOUT = 15.0


@dataclass
class Part:
    name: str
    process: subprocess.Popen[bytes]
    address: str
    # HTTP path that answers 200 when ready; empty for a gRPC part (health service).
    ready_path: str = ""


@dataclass
class LocalStack:
    """Child processes, stopped in reverse order of start; logs go to `logs/<name>.log`."""

    logs: Path
    base_env: dict[str, str] = field(default_factory=lambda: dict(os.environ))
    parts: dict[str, Part] = field(default_factory=dict)

    def __post_init__(self) -> None:
        self.logs.mkdir(parents=True, exist_ok=True)

    def start(
        self,
        name: str,
        args: list[str],
        env: dict[str, str],
        address: str = "",
        ready_path: str = "",
    ) -> Part:
        running = self.parts.get(name)
        if running is not None and running.process.poll() is None:
            # Its Part would be replaced and the process never stopped.
            raise ValueError(f"a part named {name!r} is already running")
        log = (self.logs / f"{name}.log").open("ab")
        process = subprocess.Popen(
            [sys.executable, "-m", "services.cli", *args],
            env=env,
            stdout=log,
            stderr=subprocess.STDOUT,
            start_new_session=True,
        )
        log.close()
        started = _start_time(process.pid)
        if started is not None:
            self._record(name).write_text(f"{process.pid} {started}\n")
        part = Part(name, process, address, ready_path)
        self.parts[name] = part
        return part

    def _record(self, name: str) -> Path:
        return self.logs / f"{name}.pid"

    def env(self, **settings: str) -> dict[str, str]:
        """The inherited environment with LockN settings replaced by `settings`."""
        env = {k: v for k, v in self.base_env.items() if k != "DATABASE_URL"}
        env.setdefault("LOCKN_LOG_FORMAT", "json")
        env.update(settings)
        return env

    def start_simulator(
        self,
        step_seconds: float = 0.05,
        port: int = 0,
        name: str = "simulator",
        flags: Sequence[str] = (),
    ) -> Part:
        port = port or free_port()
        args = ["simulate-comfyui", "--port", str(port), "--step-seconds", str(step_seconds)]
        args += flags
        return self.start(name, args, self.env(), f"http://127.0.0.1:{port}", "/system_stats")

    # Each service listens on a free port with its metrics off, unless `settings`
    # (LOCKN_* variables, which win) say otherwise.

    def start_worker(self, name: str, comfy_url: str, port: int = 0, **settings: str) -> Part:
        defaults = {
            "LOCKN_COMFYUI__BASE_URL": comfy_url,
            "LOCKN_WORKER_LISTEN": f"127.0.0.1:{port or free_port()}",
            "LOCKN_WORKER_METRICS_PORT": "0",
        }
        return self._start_service(name, "comfy-worker", "WORKER", {**defaults, **settings})

    def start_generation(
        self, name: str, database_url: str, workers: list[Part], **settings: str
    ) -> Part:
        defaults = {
            "LOCKN_DATABASE_URL": database_url,
            "LOCKN_GENERATION_LISTEN": f"127.0.0.1:{free_port()}",
            "LOCKN_WORKERS": json.dumps([{"name": w.name, "address": w.address} for w in workers]),
            "LOCKN_GENERATION_METRICS_PORT": "0",
        }
        return self._start_service(
            name, "generation-service", "GENERATION", {**defaults, **settings}
        )

    def start_gateway(self, generation: Part, **settings: str) -> Part:
        defaults = {
            "LOCKN_GATEWAY_LISTEN": f"127.0.0.1:{free_port()}",
            "LOCKN_GENERATION_ADDRESS": generation.address,
            "LOCKN_GATEWAY_METRICS_PORT": "0",
        }
        return self._start_service(
            "gateway", "gateway", "GATEWAY", {**defaults, **settings}, "http://", "/readyz"
        )

    def _start_service(
        self,
        name: str,
        command: str,
        service: str,
        settings: dict[str, str],
        scheme: str = "",
        ready_path: str = "",
    ) -> Part:
        env = self.env(**settings)
        address = scheme + dialable(env[f"LOCKN_{service}_LISTEN"])
        return self.start(name, [command], env, address, ready_path)

    def check_alive(self) -> None:
        for part in self.parts.values():
            if part.process.poll() is not None:
                raise RuntimeError(
                    f"{part.name} exited ({part.process.returncode}); see {self.log_of(part)}"
                )

    def log_of(self, part: Part) -> Path:
        return self.logs / f"{part.name}.log"

    def kill(self, name: str, sig: int = signal.SIGKILL) -> None:
        part = self.parts.pop(name)
        with contextlib.suppress(ProcessLookupError):
            os.killpg(part.process.pid, sig)
        part.process.wait(STOP_TIMEOUT)
        self._record(name).unlink(missing_ok=True)

    def stop(self) -> None:
        parts = list(reversed(self.parts.values()))
        for part in parts:
            if part.process.poll() is None:
                part.process.send_signal(signal.SIGTERM)
        deadline = time.monotonic() + STOP_TIMEOUT
        for part in parts:
            try:
                part.process.wait(max(0.1, deadline - time.monotonic()))
            except subprocess.TimeoutExpired:
                with contextlib.suppress(ProcessLookupError):
                    os.killpg(part.process.pid, signal.SIGKILL)
                part.process.wait()
            self._record(part.name).unlink(missing_ok=True)
        self.parts.clear()

    async def wait_serving(self, part: Part, timeout: float = START_TIMEOUT) -> None:
        """Until the part's gRPC health says SERVING (or its HTTP readiness answers 200)."""
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            self.check_alive()
            if await _ready(part):
                return
            await asyncio.sleep(0.1)
        raise RuntimeError(
            f"{part.name} was not ready within {timeout:.0f} s; see {self.log_of(part)}"
        )


def stop_leftovers(logs: Path) -> list[str]:
    """Stop the parts a stack that was killed left running, from their records in
    `logs`; the names of those stopped. A record whose pid now belongs to another
    process (its start time differs) is only removed."""
    leftovers: dict[str, tuple[int, str]] = {}
    records = sorted(logs.glob("*.pid"))
    for record in records:
        number, _, started = record.read_text().strip().partition(" ")
        if number.isdigit() and _start_time(int(number)) == started:
            leftovers[record.stem] = (int(number), started)

    def alive() -> list[int]:
        return [pid for pid, started in leftovers.values() if _start_time(pid) == started]

    for sig in (signal.SIGTERM, signal.SIGKILL):
        for pid in alive():
            with contextlib.suppress(ProcessLookupError):
                os.killpg(pid, sig)
        deadline = time.monotonic() + STOP_TIMEOUT
        while alive() and time.monotonic() < deadline:
            time.sleep(0.1)
    for record in records:
        record.unlink(missing_ok=True)
    return list(leftovers)


def _start_time(pid: int) -> str | None:
    """When process `pid` started (clock ticks since boot, from /proc), which with
    the pid names one process for good; None once it is gone or a zombie, or
    where there is no /proc."""
    try:
        stat = Path(f"/proc/{pid}/stat").read_text()
    except OSError:
        return None
    # The command name, in parentheses, may hold spaces: count fields after it.
    fields = stat.rpartition(")")[2].split()
    return None if fields[0] == "Z" else fields[19]


def dialable(listen: str) -> str:
    """The address a client on this machine dials for a server listening on `listen`."""
    host, _, port = listen.rpartition(":")
    if host in ("", "0.0.0.0"):
        host = "127.0.0.1"
    elif host in ("[::]", "::"):
        host = "[::1]"
    return f"{host}:{port}"


async def _ready(part: Part) -> bool:
    if part.ready_path:
        with contextlib.suppress(aiohttp.ClientError, OSError, asyncio.TimeoutError):
            async with aiohttp.ClientSession() as session:
                url = part.address + part.ready_path
                async with session.get(url, timeout=aiohttp.ClientTimeout(total=1)) as reply:
                    return reply.status == 200
        return False
    with contextlib.suppress(Exception):
        async with open_channel(part.address) as channel:
            reply = await health_pb2_grpc.HealthStub(channel).Check(
                health_pb2.HealthCheckRequest(), timeout=1
            )
            return bool(reply.status == health_pb2.HealthCheckResponse.SERVING)
    return False
