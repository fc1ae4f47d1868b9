"""Migrations on a real PostgreSQL: idempotent, safe under concurrency, and the
throwaway-server fallback the suite and the demo rely on."""

from __future__ import annotations

import asyncio

import asyncpg
import pytest

from services.database import DatabaseUnreachable, connect, migrate, migration_files, redact
from services.embedded_postgres import LOCAL_SERVER, postgres_server


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
