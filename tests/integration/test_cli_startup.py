"""`lockn-gen` as an operator meets it: a bad setting or an unreachable database
stops start-up with exit status 2 and one line naming the cause."""

from __future__ import annotations

import os
import subprocess
import sys

import pytest

from services.database import migration_files


def run_cli(*args: str, env: dict[str, str] | None = None) -> subprocess.CompletedProcess[str]:
    environment = {k: v for k, v in os.environ.items() if not k.startswith("LOCKN_")}
    environment.pop("DATABASE_URL", None)
    environment.update(env or {})
    return subprocess.run(
        [sys.executable, "-m", "services.cli", *args],
        env=environment,
        capture_output=True,
        text=True,
        timeout=60,
    )


@pytest.mark.parametrize(
    ("variable", "value", "named"),
    [
        ("LOCKN_COMFYUI__BASE_URL", "not a url", "LOCKN_COMFYUI__BASE_URL"),
        ("LOCKN_COMFYUI__TIMEOUT_SECONDS", "-1", "LOCKN_COMFYUI__TIMEOUT_SECONDS"),
        ("LOCKN_WORKER_LISTEN", "nowhere", "LOCKN_WORKER_LISTEN"),
    ],
)
def test_a_bad_setting_stops_start_up_with_one_line(variable: str, value: str, named: str) -> None:
    result = run_cli("comfy-worker", env={variable: value})
    assert result.returncode == 2
    lines = result.stderr.strip().splitlines()
    assert len(lines) == 1
    assert lines[0].startswith("lockn-gen: invalid setting " + named)


def test_an_unreachable_database_stops_migrate_with_one_line() -> None:
    result = run_cli("migrate", env={"DATABASE_URL": "postgresql://lockn:pw@127.0.0.1:1/lockn"})
    assert result.returncode == 2
    lines = result.stderr.strip().splitlines()
    assert len(lines) == 1
    assert lines[0].startswith("lockn-gen: cannot reach database")
    assert "pw@" not in lines[0]


def test_migrate_without_a_database_url_says_which_setting_is_missing() -> None:
    result = run_cli("migrate")
    assert result.returncode == 2
    assert "LOCKN_DATABASE_URL" in result.stderr


def test_migrate_applies_then_reports_nothing_to_do(database_url: str) -> None:
    result = run_cli("migrate", env={"DATABASE_URL": database_url})
    assert result.returncode == 0, result.stderr
    assert result.stdout.strip() == "applied 0 migration(s)"


def test_pending_lists_what_migrate_would_apply_and_applies_nothing(empty_database: str) -> None:
    env = {"DATABASE_URL": empty_database}
    before = run_cli("migrate", "--pending", env=env)
    assert before.returncode == 0, before.stderr
    listed = before.stdout.splitlines()
    assert [line.split()[0] for line in listed] == [v for v, _ in migration_files()]
    assert [v for v in listed if "no transaction" in v] == [
        "0003_finished_counts  (no transaction: builds an index concurrently)"
    ]
    assert run_cli("migrate", "--pending", env=env).stdout == before.stdout  # still all pending
    assert run_cli("migrate", env=env).returncode == 0
    after = run_cli("migrate", "--pending", env=env)
    assert after.returncode == 0, after.stderr
    assert after.stdout == ""


def test_migrate_on_an_empty_database_applies_every_migration(empty_database: str) -> None:
    result = run_cli("migrate", env={"DATABASE_URL": empty_database})
    assert result.returncode == 0, result.stderr
    versions = ", ".join(version for version, _ in migration_files())
    assert result.stdout.strip() == f"applied {len(migration_files())} migration(s): {versions}"
