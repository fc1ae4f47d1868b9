"""A private, throwaway PostgreSQL server started from the installed binaries.

Used by the test suite when no server answers and by `make demo` when no
DATABASE_URL is given. PostgreSQL refuses to run as root, so as root the
server runs as the `postgres` user (via runuser) in a folder it owns. A
failure is a RuntimeError whose text is one line: the server's own reason
from its log, not pg_ctl's "Examine the log output".
"""

from __future__ import annotations

import asyncio
import contextlib
import glob
import os
import pwd
import re
import shutil
import socket
import subprocess
import tempfile
import time
from collections.abc import Iterator
from pathlib import Path

import asyncpg

SERVER_USER = "postgres"
LOCAL_SERVER = "postgresql://postgres@127.0.0.1:5432/postgres"
# "2026-12-08 01:26:15.610 UTC [25530] FATAL:  lock file ..." -> "FATAL: lock file ..."
LOG_PREFIX = re.compile(r"^\S+ \S+ \S+ \[\d+\] ")


def find_binaries() -> Path:
    """The folder holding initdb and pg_ctl (Debian keeps them off PATH)."""
    candidates = sorted(glob.glob("/usr/lib/postgresql/*/bin"), reverse=True)
    on_path = shutil.which("pg_ctl")
    for folder in [*candidates, *([str(Path(on_path).resolve().parent)] if on_path else [])]:
        if (Path(folder) / "initdb").exists() and (Path(folder) / "pg_ctl").exists():
            return Path(folder)
    raise RuntimeError("PostgreSQL server binaries (initdb, pg_ctl) are not installed")


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


class EmbeddedPostgres:
    """initdb (once) + pg_ctl start/stop on 127.0.0.1 and a free port, trust auth."""

    def __init__(self, root: Path, port: int | None = None) -> None:
        self.root = root.resolve()
        self.data = self.root / "data"
        self.port = port or free_port()
        self.bin = find_binaries()

    @property
    def dsn(self) -> str:
        return f"postgresql://{SERVER_USER}@127.0.0.1:{self.port}/postgres"

    @property
    def log(self) -> Path:
        return self.root / "server.log"

    def _run(self, action: str, *args: str) -> None:
        command = [str(self.bin / args[0]), *args[1:]]
        if os.geteuid() == 0:
            command = ["runuser", "-u", SERVER_USER, "--", *command]
        logged = self.log.stat().st_size if self.log.exists() else 0
        ran = subprocess.run(command, check=False, capture_output=True, text=True)
        if ran.returncode != 0:
            # pg_ctl start says only "Examine the log output": the reason is what
            # the server wrote to its log during this attempt.
            said = _tail(_read_from(self.log, logged)) if action == "start" else ""
            said = said or _tail(ran.stderr) or _tail(ran.stdout)
            raise RuntimeError(f"PostgreSQL {action} failed: {said} (see {self.log})")

    def running_pid(self) -> int | None:
        """The pid of a server running on this data folder, from its postmaster.pid.

        None when the file is missing or stale: a pid that is gone, or (where /proc
        tells) reused by a process that is not a postmaster of this folder.
        """
        try:
            pid = int((self.data / "postmaster.pid").read_text().split("\n", 1)[0])
        except (OSError, ValueError):
            return None
        try:
            os.kill(pid, 0)
        except ProcessLookupError:
            return None
        except PermissionError:
            pass  # alive, and another user's
        try:
            arguments = Path(f"/proc/{pid}/cmdline").read_bytes().split(b"\0")
        except FileNotFoundError:
            return pid if not Path("/proc/self").exists() else None
        except OSError:
            return pid
        return pid if os.fsencode(str(self.data)) in arguments else None

    def how_to_stop(self, pid: int) -> str:
        """What a user can type to stop the server `pid` running on this folder."""
        command = f"{self.bin / 'pg_ctl'} -D {self.data} stop"
        if os.geteuid() == 0:
            command = f"runuser -u {SERVER_USER} -- {command}"
        return f"stop it with `{command}` (as the user it runs as) or `kill {pid}`"

    def start(self) -> str:
        running = self.running_pid()
        if running is not None:
            raise RuntimeError(
                f"a PostgreSQL server (pid {running}) already runs in {self.data};"
                f" {self.how_to_stop(running)}"
            )
        self.root.mkdir(parents=True, exist_ok=True)
        if os.geteuid() == 0:
            user = pwd.getpwnam(SERVER_USER)
            for path in [self.root, *self.root.rglob("*")]:
                os.chown(path, user.pw_uid, user.pw_gid)
        if not (self.data / "PG_VERSION").exists():
            self._run(
                "initdb",
                *("initdb", "-D", str(self.data), "-U", SERVER_USER),
                *("-A", "trust", "-E", "UTF8"),
            )
        options = (
            f"-p {self.port} -c listen_addresses=127.0.0.1 -k {self.root}"
            " -c fsync=off -c synchronous_commit=off -c full_page_writes=off"
            " -c max_connections=300"
        )
        self._run(
            "start",
            "pg_ctl",
            "-D",
            str(self.data),
            "-l",
            str(self.log),
            "-o",
            options,
            "-w",
            "-t",
            "60",
            "start",
        )
        self._wait_ready()
        return self.dsn

    def _wait_ready(self, timeout: float = 30.0) -> None:
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            try:
                socket.create_connection(("127.0.0.1", self.port), timeout=1).close()
                return
            except OSError:
                time.sleep(0.1)
        raise RuntimeError(f"embedded PostgreSQL did not start; see {self.log}")

    def stop(self) -> None:
        # A postmaster.pid left by a crash names no server: nothing to stop, and
        # the next start replaces it.
        if self.running_pid() is not None:
            self._run("stop", "pg_ctl", "-D", str(self.data), "-m", "fast", "-w", "stop")


def _read_from(path: Path, offset: int) -> str:
    try:
        with path.open("rb") as log:
            log.seek(offset)
            return log.read().decode(errors="replace")
    except OSError:
        return ""


def _tail(text: str, lines: int = 3) -> str:
    """The last few lines of `text` as one, without log prefixes or doubled spaces."""
    kept = [LOG_PREFIX.sub("", line).strip() for line in text.splitlines() if line.strip()]
    return "; ".join(" ".join(line.split()) for line in kept[-lines:])


def answers(dsn: str) -> bool:
    """Whether a PostgreSQL server accepts a connection at `dsn` (within 3 s)."""

    async def probe() -> bool:
        try:
            conn = await asyncpg.connect(dsn, timeout=3)
        except (OSError, asyncpg.PostgresError, TimeoutError):
            return False
        await conn.close()
        return True

    return asyncio.run(probe())


@contextlib.contextmanager
def postgres_server(configured: str | None = None, *, embedded: bool = False) -> Iterator[str]:
    """A server where databases may be created: `configured`, else the local one on
    127.0.0.1:5432 when it answers (unless `embedded`), else a throwaway one."""
    if configured:
        yield configured
        return
    if not embedded and answers(LOCAL_SERVER):
        yield LOCAL_SERVER
        return
    root = Path(tempfile.mkdtemp(prefix="lockn-pg-"))
    server = EmbeddedPostgres(root)
    try:
        yield server.start()
    finally:
        server.stop()
        shutil.rmtree(root, ignore_errors=True)
