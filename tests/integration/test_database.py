"""Migrations on a real PostgreSQL: idempotent, safe under concurrency, and the
throwaway-server fallback the suite and the demo rely on."""

from __future__ import annotations

import asyncio
import json
import shutil
from pathlib import Path
from typing import Any

import asyncpg
import pytest

from services.database import (
    MIGRATION_LOCK,
    DatabaseUnreachable,
    connect,
    migrate,
    migration_files,
    redact,
    statements,
)
from services.embedded_postgres import LOCAL_SERVER, postgres_server
from services.log import configure_logging


async def test_migrate_applies_every_file_once_and_then_nothing(empty_database: str) -> None:
    first = await migrate(empty_database)
    assert first == [version for version, _ in migration_files()]
    assert await migrate(empty_database) == []
    conn = await asyncpg.connect(empty_database)
    try:
        tables = {
            r["tablename"]
            for r in await conn.fetch("SELECT tablename FROM pg_tables WHERE schemaname='public'")
        }
    finally:
        await conn.close()
    assert {"generations", "generation_events", "schema_migrations"} <= tables


async def test_replicas_migrating_at_once_apply_each_migration_exactly_once(
    empty_database: str,
) -> None:
    results = await asyncio.gather(*(migrate(empty_database) for _ in range(4)))
    applied = [version for result in results for version in result]
    assert sorted(applied) == [version for version, _ in migration_files()]


async def test_a_replica_waiting_for_the_migration_lock_says_who_holds_it(
    empty_database: str, capsys: pytest.CaptureFixture[str]
) -> None:
    configure_logging("info", "json")
    holder = await asyncpg.connect(empty_database)
    try:
        await holder.execute("SELECT pg_advisory_lock($1)", MIGRATION_LOCK)
        migrating = asyncio.create_task(migrate(empty_database))
        said = await _until_logged(capsys, "migration_lock_busy")
        assert said["holder_pid"] == holder.get_server_pid()
        assert "pg_advisory_lock" in said["holder_running"]
        assert not migrating.done()
        await holder.execute("SELECT pg_advisory_unlock($1)", MIGRATION_LOCK)
        applied = await asyncio.wait_for(migrating, 30)
        assert applied == [version for version, _ in migration_files()]
    finally:
        await holder.close()


async def _until_logged(capsys: pytest.CaptureFixture[str], event: str) -> dict[str, Any]:
    for _ in range(100):
        for line in capsys.readouterr().err.splitlines():
            if line.startswith("{") and json.loads(line)["event"] == event:
                said: dict[str, Any] = json.loads(line)
                return said
        await asyncio.sleep(0.05)
    raise AssertionError(f"no {event} logged")


FINISHED_COUNTS = "0003_finished_counts"


async def test_the_finished_index_is_rebuilt_while_writes_go_on(
    empty_database: str, tmp_path: Path
) -> None:
    """0003 builds its index CONCURRENTLY: while the build waits for a writer's
    open transaction, another writer still gets the table (a plain CREATE or
    DROP INDEX would queue every writer behind it)."""
    for version, path in migration_files():
        if version < FINISHED_COUNTS:
            shutil.copy(path, tmp_path)
    await migrate(empty_database, tmp_path)
    holder = await asyncpg.connect(empty_database)
    writer = await asyncpg.connect(empty_database)
    try:
        holding = holder.transaction()
        await holding.start()
        await holder.execute("LOCK TABLE generations IN ROW EXCLUSIVE MODE")  # what an INSERT takes
        migrating = asyncio.create_task(migrate(empty_database))
        await _until_an_index_statement_waits(writer)
        async with writer.transaction():
            await writer.execute("SET LOCAL lock_timeout = '2s'")
            await writer.execute("LOCK TABLE generations IN ROW EXCLUSIVE MODE")
        await holding.commit()
        assert FINISHED_COUNTS in await asyncio.wait_for(migrating, 30)
        assert await _finished_index(writer) == (True, True)
    finally:
        await holder.close()
        await writer.close()


async def _until_an_index_statement_waits(conn: asyncpg.Connection) -> None:
    for _ in range(200):
        waiting = await conn.fetchval(
            "SELECT count(*) FROM pg_stat_activity WHERE datname = current_database()"
            " AND wait_event_type = 'Lock' AND query ILIKE '%INDEX%'"
        )
        if waiting:
            return
        await asyncio.sleep(0.05)
    raise AssertionError("the migration never waited for the open transaction")


async def _finished_index(conn: asyncpg.Connection) -> tuple[bool, bool] | None:
    """(valid, covers status) of generations_finished; None when it is missing."""
    row = await conn.fetchrow(
        "SELECT i.indisvalid, pg_get_indexdef(i.indexrelid) LIKE '%INCLUDE (status)%' AS covers"
        " FROM pg_index i JOIN pg_class c ON c.oid = i.indexrelid"
        " WHERE c.relname = 'generations_finished'"
    )
    return None if row is None else (row["indisvalid"], row["covers"])


def _finished_counts_statements() -> list[str]:
    path = dict(migration_files())[FINISHED_COUNTS]
    return statements(path.read_text())


@pytest.mark.parametrize("done", range(len(_finished_counts_statements()) + 1))
async def test_a_no_transaction_migration_cut_short_anywhere_completes_on_the_next_start(
    database_url: str, done: int
) -> None:
    """A crash after any of 0003's statements, or in the middle of its build
    (which leaves an invalid index behind), and the next start finishes it."""
    conn = await asyncpg.connect(database_url)
    try:
        await conn.execute("DELETE FROM schema_migrations WHERE version = $1", FINISHED_COUNTS)
        for statement in _finished_counts_statements()[:done]:
            await conn.execute(statement)
        if done == 1:  # cut the build itself short: PostgreSQL keeps the invalid index
            await _cancelled_build(database_url, conn)
        assert await migrate(database_url) == [FINISHED_COUNTS]
        assert await _finished_index(conn) == (True, True)
        leftovers = await conn.fetchval(
            "SELECT count(*) FROM pg_class WHERE relname = 'generations_finished_next'"
        )
        assert leftovers == 0
    finally:
        await conn.close()


async def _cancelled_build(dsn: str, conn: asyncpg.Connection) -> None:
    holder = await asyncpg.connect(dsn)
    try:
        async with holder.transaction():
            await holder.execute("LOCK TABLE generations IN ROW EXCLUSIVE MODE")
            await conn.execute("SET statement_timeout = '300ms'")
            with pytest.raises(asyncpg.QueryCanceledError):
                await conn.execute(_finished_counts_statements()[1])
            await conn.execute("RESET statement_timeout")
    finally:
        await holder.close()
    valid = await conn.fetchval(
        "SELECT indisvalid FROM pg_index WHERE indexrelid = 'generations_finished_next'::regclass"
    )
    assert valid is False


def test_statements_split_at_line_ends_and_skip_comment_lines() -> None:
    sql = "-- lockn: no-transaction\n-- why\nCREATE INDEX a\n  ON t (x);\nDROP INDEX b;\n"
    assert statements(sql) == ["CREATE INDEX a\n  ON t (x);", "DROP INDEX b;"]
    with pytest.raises(ValueError, match="does not end with ';'"):
        statements("DROP INDEX a;\nDROP INDEX b\n")


async def test_queue_tables_carry_their_autovacuum_settings(db: asyncpg.Connection) -> None:
    options = await db.fetchval("SELECT reloptions FROM pg_class WHERE relname = 'generations'")
    assert any(option.startswith("autovacuum_vacuum_scale_factor=") for option in options)


async def test_an_unreachable_database_is_one_line_without_the_password() -> None:
    with pytest.raises(DatabaseUnreachable) as raised:
        await connect("postgresql://u:hunter2@127.0.0.1:1/x", timeout=2)
    line = str(raised.value)
    assert "\n" not in line
    assert "hunter2" not in line
    assert "DATABASE_URL=postgresql://u:***@127.0.0.1:1/x" in line


def test_redact_leaves_a_url_without_password_alone() -> None:
    assert redact("postgresql://u@h/db") == "postgresql://u@h/db"


def test_a_throwaway_server_starts_from_the_installed_binaries_and_migrates() -> None:
    async def migrate_and_count(dsn: str) -> int:
        assert await migrate(dsn) == [version for version, _ in migration_files()]
        conn = await asyncpg.connect(dsn)
        try:
            return int(await conn.fetchval("SELECT count(*) FROM generations"))
        finally:
            await conn.close()

    with postgres_server(embedded=True) as dsn:
        assert dsn != LOCAL_SERVER
        assert asyncio.run(migrate_and_count(dsn)) == 0
