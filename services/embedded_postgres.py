"""A private, throwaway PostgreSQL server started from the installed binaries.

Used by the test suite when no server answers and by `make demo` when no
DATABASE_URL is given. PostgreSQL refuses to run as root, so as root the
server runs as the `postgres` user (via runuser) in a folder it owns.
"""

from __future__ import annotations

import asyncio
import contextlib
import glob
import os
import pwd
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

    def _run(self, *args: str) -> None:
        command = [str(self.bin / args[0]), *args[1:]]
        if os.geteuid() == 0:
            command = ["runuser", "-u", SERVER_USER, "--", *command]
        subprocess.run(command, check=True, capture_output=True, text=True)

    def start(self) -> str:
        self.root.mkdir(parents=True, exist_ok=True)
        if os.geteuid() == 0:
            user = pwd.getpwnam(SERVER_USER)
            for path in [self.root, *self.root.rglob("*")]:
                os.chown(path, user.pw_uid, user.pw_gid)
        if not (self.data / "PG_VERSION").exists():
            self._run(
                "initdb", "-D", str(self.data), "-U", SERVER_USER, "-A", "trust", "-E", "UTF8"
            )
        options = (
            f"-p {self.port} -c listen_addresses=127.0.0.1 -k {self.root}"
            " -c fsync=off -c synchronous_commit=off -c full_page_writes=off"
            " -c max_connections=300"
        )
        self._run(
            "pg_ctl",
            "-D",
            str(self.data),
            "-l",
            str(self.root / "server.log"),
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
        raise RuntimeError(f"embedded PostgreSQL did not start; see {self.root / 'server.log'}")

    def stop(self) -> None:
        if (self.data / "postmaster.pid").exists():
            self._run("pg_ctl", "-D", str(self.data), "-m", "fast", "-w", "stop")


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
