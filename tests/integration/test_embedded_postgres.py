"""The private PostgreSQL of the demo and the suite: a failed start is one line
giving the server's own reason, and a folder another server runs on is never
started twice nor mistaken for free."""

from __future__ import annotations

import shutil
import socket
import subprocess
import tempfile
from collections.abc import Iterator
from pathlib import Path

import pytest

from services.embedded_postgres import EmbeddedPostgres, answers, free_port


@pytest.fixture
def root() -> Iterator[Path]:
    # Under /tmp, not pytest's root-only folder, so the postgres user can reach it.
    folder = Path(tempfile.mkdtemp(prefix="lockn-pg-test-"))
    try:
        yield folder
    finally:
        EmbeddedPostgres(folder).stop()
        shutil.rmtree(folder, ignore_errors=True)


def test_a_start_that_fails_is_one_line_with_the_reason_from_the_server_log(root: Path) -> None:
    with socket.socket() as taken:
        taken.bind(("127.0.0.1", 0))
        taken.listen()
        server = EmbeddedPostgres(root, port=taken.getsockname()[1])
        with pytest.raises(RuntimeError) as raised:
            server.start()
    line = str(raised.value)
    assert "\n" not in line
    assert line.startswith("PostgreSQL start failed: ")
    assert "could not create any TCP/IP sockets" in line
    assert line.endswith(f"(see {root.resolve() / 'server.log'})")
    assert "Examine the log output" not in line


def test_a_folder_a_server_runs_on_is_refused_naming_that_server(root: Path) -> None:
    first = EmbeddedPostgres(root)
    dsn = first.start()
    pid = first.running_pid()
    assert pid is not None
    with pytest.raises(RuntimeError) as raised:
        EmbeddedPostgres(root).start()
    line = str(raised.value)
    assert "\n" not in line
    assert f"a PostgreSQL server (pid {pid}) already runs in {first.data}" in line
    assert f"pg_ctl -D {first.data} stop" in line and f"`kill {pid}`" in line
    assert answers(dsn)
    first.stop()
    assert first.running_pid() is None


def test_a_postmaster_pid_left_by_a_crash_is_not_a_running_server(root: Path) -> None:
    server = EmbeddedPostgres(root, port=free_port())
    server.start()
    server.stop()
    gone = subprocess.Popen(["true"])
    gone.wait()
    (server.data / "postmaster.pid").write_text(f"{gone.pid}\n{server.data}\n")
    assert server.running_pid() is None
    server.stop()  # nothing to stop: no error
    assert answers(server.start())
