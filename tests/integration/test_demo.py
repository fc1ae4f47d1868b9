"""`make demo` and `make up` as a user runs them: `python -m services.demo` in a
folder of its own, with the private PostgreSQL it starts there. What it prints
is what the README shows; `make up` says how to reach it; a closed terminal
(SIGHUP to the process group) stops everything it started; and a run finds and
stops what a killed run left behind."""

from __future__ import annotations

import asyncio
import os
import queue
import re
import shutil
import signal
import subprocess
import sys
import tempfile
import threading
from collections.abc import Iterator
from pathlib import Path

import aiohttp
import asyncpg
import psutil
import pytest

from services.embedded_postgres import EmbeddedPostgres, free_port
from services.stack import stop_leftovers

REPO = Path(__file__).resolve().parents[2]
PNG = b"\x89PNG\r\n\x1a\n"
# Bounds on waiting, never assertions on speed: two busy cores start five processes.
START = 180.0
STOP = 60.0

pytestmark = pytest.mark.timeout(400)


class Demo:
    """`python -m services.demo` running in its own session, as a terminal runs it."""

    def __init__(self, folder: Path, env: dict[str, str], *args: str) -> None:
        self.process = subprocess.Popen(
            [sys.executable, "-m", "services.demo", *args],
            cwd=folder,
            env=env,
            stdout=subprocess.PIPE,
            stderr=subprocess.STDOUT,
            text=True,
            start_new_session=True,
        )
        self.output: list[str] = []
        self._lines: queue.Queue[str | None] = queue.Queue()
        threading.Thread(target=self._read, daemon=True).start()

    def _read(self) -> None:
        assert self.process.stdout is not None
        for line in self.process.stdout:
            self._lines.put(line.rstrip("\n"))
        self._lines.put(None)

    def until(self, text: str, timeout: float = START) -> str:
        """The first line from here on that holds `text`."""
        while True:
            try:
                line = self._lines.get(timeout=timeout)
            except queue.Empty:
                raise AssertionError(f"no {text!r} within {timeout} s:\n" + self.printed) from None
            if line is None:
                raise AssertionError(f"exited before {text!r}:\n" + self.printed)
            self.output.append(line)
            if text in line:
                return line

    def finish(self, timeout: float = START) -> int:
        """Its exit status, once it has exited and said all it had to."""
        code = self.process.wait(timeout)
        while (line := self._lines.get(timeout=STOP)) is not None:
            self.output.append(line)
        return code

    @property
    def printed(self) -> str:
        return "\n".join(self.output)

    def children(self) -> list[psutil.Process]:
        children: list[psutil.Process] = psutil.Process(self.process.pid).children(recursive=True)
        return children


def gone(process: psutil.Process) -> bool:
    # A postmaster's parent is init once pg_ctl exits; a zombie there is gone too.
    try:
        return not process.is_running() or process.status() == psutil.STATUS_ZOMBIE
    except psutil.NoSuchProcess:
        return True


@pytest.fixture
def folder() -> Iterator[Path]:
    """A checkout-like folder under /tmp, which the postgres user can reach."""
    path = Path(tempfile.mkdtemp(prefix="lockn-demo-test-"))
    path.chmod(0o755)
    (path / "workflows").symlink_to(REPO / "workflows")
    try:
        yield path
    finally:
        # Only when a test failed midway is anything left to stop.
        stop_leftovers(path / ".lockn" / "logs")
        if (path / ".lockn" / "postgres" / "data").exists():
            EmbeddedPostgres(path / ".lockn" / "postgres").stop()
        shutil.rmtree(path, ignore_errors=True)


def environment(**settings: str) -> dict[str, str]:
    """This environment without the suite's LockN settings or database, plus `settings`."""
    env = {
        k: v for k, v in os.environ.items() if not k.startswith("LOCKN_") and k != "DATABASE_URL"
    }
    return {**env, **settings}


def postmaster(folder: Path) -> psutil.Process:
    pid = EmbeddedPostgres(folder / ".lockn" / "postgres").running_pid()
    assert pid is not None
    return psutil.Process(pid)


def readme_transcript() -> list[str]:
    text = (REPO / "README.md").read_text()
    block = text.split("$ make demo\n", 1)[1].split("```", 1)[0]
    return [line for line in block.splitlines() if line.startswith("==> ")]


def shape(line: str) -> str:
    """A line with its ids and numbers (ports, pids) left out."""
    line = re.sub(r"[0-9a-f]{8}(-[0-9a-f]{4}){3}-[0-9a-f]{12}", "<id>", line)
    return re.sub(r"\d+", "<n>", line)


def test_the_demo_prints_what_the_readme_shows_and_saves_the_image_it_downloads(
    folder: Path,
) -> None:
    demo = Demo(folder, environment())
    assert demo.finish() == 0, demo.printed

    said = [line for line in demo.output if line.startswith("==> ")]
    assert [shape(line) for line in said] == [shape(line) for line in readme_transcript()]
    saved = re.search(r"/image -> saved (\S+)$", demo.printed, re.M)
    assert saved is not None
    image = folder / saved[1]
    assert image.read_bytes().startswith(PNG)
    # The very image the store holds, as the gateway's image route served it.
    assert image.read_bytes() == (folder / "outputs" / image.name).read_bytes()
    assert EmbeddedPostgres(folder / ".lockn" / "postgres").running_pid() is None


def test_the_demo_gives_the_cli_the_token_it_gives_the_gateway(
    folder: Path, database_url: str
) -> None:
    env = environment(LOCKN_AUTH_TOKENS='{"s3cret": "alice"}', DATABASE_URL=database_url)
    demo = Demo(folder, env)
    assert demo.finish() == 0, demo.printed
    assert "==> done; stopping the stack" in demo.output

    async def principals() -> list[tuple[str, int]]:
        conn = await asyncpg.connect(database_url)
        try:
            rows = await conn.fetch("SELECT principal, count(*) FROM generations GROUP BY 1")
        finally:
            await conn.close()
        return [(row[0], row[1]) for row in rows]

    assert asyncio.run(principals()) == [("alice", 2)]


async def _get(url: str) -> tuple[int, str]:
    async with aiohttp.ClientSession() as session:
        async with session.get(url, timeout=aiohttp.ClientTimeout(total=10)) as reply:
            return reply.status, await reply.text()


def test_make_up_says_how_to_reach_it_and_keeps_the_ports_the_user_set(folder: Path) -> None:
    generation, gateway, metrics = free_port(), free_port(), free_port()
    env = environment(
        LOCKN_GENERATION_LISTEN=f"127.0.0.1:{generation}",
        LOCKN_GATEWAY_LISTEN=f"127.0.0.1:{gateway}",
        LOCKN_GATEWAY_METRICS_PORT=str(metrics),
    )
    up = Demo(folder, env, "--serve")
    try:
        up.until("serving until Ctrl-C")
        assert f"    export LOCKN_GENERATION_ADDRESS=127.0.0.1:{generation}" in up.output
        assert f"    curl http://127.0.0.1:{gateway}/api/stats" in up.output
        assert f"==> metrics: gateway http://127.0.0.1:{metrics}/metrics" in up.output

        # The pasted line is all the CLI needs.
        pasted = next(line for line in up.output if "export LOCKN_GENERATION_ADDRESS=" in line)
        variable, _, value = pasted.split()[1].partition("=")
        stats = subprocess.run(
            [sys.executable, "-m", "services.cli", "stats"],
            env=environment(**{variable: value}),
            capture_output=True,
            text=True,
            timeout=STOP,
        )
        assert stats.returncode == 0, stats.stderr
        assert "comfy-worker" in stats.stdout
        assert asyncio.run(_get(f"http://127.0.0.1:{gateway}/api/stats"))[0] == 200
        status, text = asyncio.run(_get(f"http://127.0.0.1:{metrics}/metrics"))
        assert status == 200 and "lockn_http_requests_total" in text
    finally:
        up.process.send_signal(signal.SIGTERM)
    assert up.finish(STOP) == 0
    assert up.output[-1] == "==> stopped everything it started"


def test_a_closed_terminal_stops_make_up_and_everything_it_started(folder: Path) -> None:
    up = Demo(folder, environment(), "--serve")
    up.until("serving until Ctrl-C")
    started = [*up.children(), postmaster(folder)]
    assert len(started) >= 5  # simulator, worker, GenerationService, gateway, PostgreSQL

    os.killpg(up.process.pid, signal.SIGHUP)

    assert up.finish(STOP) == 0
    assert [p for p in started if not gone(p)] == []
    assert EmbeddedPostgres(folder / ".lockn" / "postgres").running_pid() is None
    assert list((folder / ".lockn" / "logs").glob("*.pid")) == []


def test_a_closed_terminal_stops_the_demo_midway_and_leaves_a_comfyui_it_did_not_start(
    folder: Path,
) -> None:
    # A ComfyUI slow enough that the demo is still following the HTTP generation.
    port = free_port()
    simulate = ["simulate-comfyui", "--port", str(port), "--step-seconds", "5"]
    comfyui = subprocess.Popen(
        [sys.executable, "-m", "services.cli", *simulate],
        env=environment(),
        stdout=subprocess.DEVNULL,
        stderr=subprocess.DEVNULL,
    )
    try:
        demo = Demo(folder, environment(LOCKN_COMFYUI__BASE_URL=f"http://127.0.0.1:{port}"))
        demo.until("following its events")
        demo.until("started")
        started = [*demo.children(), postmaster(folder)]

        os.killpg(demo.process.pid, signal.SIGHUP)

        assert demo.finish(STOP) == 130
        assert "demo interrupted; stopped everything it started" in demo.output
        assert [p for p in started if not gone(p)] == []
        assert EmbeddedPostgres(folder / ".lockn" / "postgres").running_pid() is None
        assert comfyui.poll() is None
    finally:
        comfyui.terminate()
        comfyui.wait(STOP)


def test_a_second_run_leaves_a_live_run_alone_and_stops_what_a_killed_one_left(
    folder: Path,
) -> None:
    killed = Demo(folder, environment(), "--serve")
    killed.until("serving until Ctrl-C")
    parts = killed.children()
    server = postmaster(folder)

    second = subprocess.run(
        [sys.executable, "-m", "services.demo"],
        cwd=folder,
        env=environment(),
        capture_output=True,
        text=True,
        timeout=STOP,
    )
    assert second.returncode == 1
    assert second.stderr == (
        f"demo failed: another make up or make demo (pid {killed.process.pid}) is running"
        " from this folder and holds .lockn/; stop it first (Ctrl-C in its terminal,"
        f" or kill {killed.process.pid})\n"
    )
    assert not any(gone(p) for p in [*parts, server])

    killed.process.kill()
    killed.finish(STOP)
    assert not any(gone(p) for p in [*parts, server])

    demo = Demo(folder, environment())
    assert demo.finish() == 0, demo.printed

    assert (
        "==> stopped what an earlier run left running:"
        " comfy-worker, gateway, generation-service, simulator"
    ) in demo.output
    assert (
        f"==> stopped the private PostgreSQL an earlier run left running (pid {server.pid})"
        in demo.output
    )
    assert [p for p in [*parts, server] if not gone(p)] == []
