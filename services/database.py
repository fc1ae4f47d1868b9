"""PostgreSQL access shared by the services: the pool, the reachability check
and the versioned migrations.

Migrations are the numbered `.sql` files in `services/migrations/`, applied in
order, each in its own transaction, under an advisory lock so that replicas
starting together apply each exactly once.

A file whose first line is `-- lockn: no-transaction` runs outside a
transaction instead, one statement at a time, so that it can build and drop
indexes CONCURRENTLY without blocking the running services' writes. Its
statements each end with `;` at the end of a line, and every one of them
must be safe to run again: a crash between two statements runs the file
again from the top.
"""

from __future__ import annotations

import asyncio
import re
import time
from pathlib import Path
from typing import Any
from urllib.parse import urlsplit

import asyncpg

from services.log import get_logger

MIGRATIONS = Path(__file__).parent / "migrations"
# Any fixed number works; it only has to be the same in every replica.
MIGRATION_LOCK = 0x10C4_6E00
NO_TRANSACTION = "-- lockn: no-transaction"
LOCK_POLL_S = 0.1
LOCK_WAIT_LOG_S = 30.0

log = get_logger(component="database")


class DatabaseUnreachable(Exception):
    """str() is the one line to print at start-up."""


def redact(dsn: str) -> str:
    """The DSN with its password removed, for messages and logs."""
    parts = urlsplit(dsn)
    if parts.password is None:
        return dsn
    netloc = parts.netloc.replace(f":{parts.password}@", ":***@")
    return parts._replace(netloc=netloc).geturl()


async def connect(dsn: str, *, timeout: float = 5.0) -> asyncpg.Connection:
    try:
        return await asyncpg.connect(dsn, timeout=timeout)
    except (OSError, TimeoutError, asyncpg.PostgresError) as error:
        reason = getattr(error, "strerror", None) or str(error) or type(error).__name__
        raise DatabaseUnreachable(
            f"cannot reach database DATABASE_URL={redact(dsn)}: {reason}"
        ) from error


async def create_pool(dsn: str, *, min_size: int = 2, max_size: int = 10, **kw: Any) -> Any:
    await (await connect(dsn)).close()
    kw.setdefault("reset", _keep_session)
    return await asyncpg.create_pool(dsn, min_size=min_size, max_size=max_size, **kw)


async def _keep_session(conn: asyncpg.Connection) -> None:
    """Nothing to reset when a pooled connection is released.

    asyncpg's default reset sends `RESET ALL; UNLISTEN *; CLOSE ALL;
    pg_advisory_unlock_all()` on every release: a second round trip for each
    query, which doubled the cost of every pool.fetch*. Pooled connections here
    never SET, LISTEN, open cursors or take advisory locks (LISTEN and the
    liveness and migration locks use connections of their own), and asyncpg
    still rolls back a transaction left open before calling this.
    """


def migration_files(directory: Path = MIGRATIONS) -> list[tuple[str, Path]]:
    found = []
    for path in sorted(directory.glob("*.sql")):
        match = re.match(r"(\d{4})_", path.name)
        if match:
            found.append((path.stem, path))
    return found


def statements(sql: str) -> list[str]:
    """A no-transaction file's statements, split where a line ends with `;`."""
    found, current = [], []
    for line in sql.splitlines():
        if line.lstrip().startswith("--"):
            continue
        current.append(line)
        if line.rstrip().endswith(";"):
            found.append("\n".join(current).strip())
            current = []
    if "\n".join(current).strip():
        raise ValueError("a no-transaction migration's last statement does not end with ';'")
    return found


async def migrate(dsn: str, directory: Path = MIGRATIONS) -> list[str]:
    """Apply every migration not yet applied; returns the ones applied now."""
    conn = await connect(dsn)
    applied_now: list[str] = []
    try:
        await _take_migration_lock(conn)
        try:
            await conn.execute(
                "CREATE TABLE IF NOT EXISTS schema_migrations ("
                " version text PRIMARY KEY, applied_at timestamptz NOT NULL DEFAULT now())"
            )
            done = await _applied(conn)
            for version, path in migration_files(directory):
                if version in done:
                    continue
                await _apply(conn, version, path.read_text())
                applied_now.append(version)
                log.info("migration_applied", version=version)
        finally:
            await conn.execute("SELECT pg_advisory_unlock($1)", MIGRATION_LOCK)
    finally:
        await conn.close()
    return applied_now


async def pending(dsn: str, directory: Path = MIGRATIONS) -> list[tuple[str, bool]]:
    """The migrations `migrate` would apply now, each with whether it runs
    outside a transaction (an index built concurrently); applies nothing."""
    conn = await connect(dsn)
    try:
        done = await _applied(conn)
    finally:
        await conn.close()
    return [
        (version, _outside_transaction(path.read_text()))
        for version, path in migration_files(directory)
        if version not in done
    ]


async def _applied(conn: asyncpg.Connection) -> set[str]:
    """The versions applied so far; none before the first migration ran."""
    if not await conn.fetchval("SELECT to_regclass('schema_migrations') IS NOT NULL"):
        return set()
    return {r["version"] for r in await conn.fetch("SELECT version FROM schema_migrations")}


def _outside_transaction(sql: str) -> bool:
    return sql.startswith(NO_TRANSACTION)


async def _take_migration_lock(conn: asyncpg.Connection) -> None:
    """Polls rather than waits in pg_advisory_lock: a replica waiting inside a
    statement holds a snapshot, which a CREATE INDEX CONCURRENTLY in the
    replica migrating waits for, and PostgreSQL ends that deadlock by failing
    one of the two. While it waits it says who holds the lock, now and then,
    so that a replica stuck at start-up behind a long migration is explained."""
    started = time.monotonic()
    said = -LOCK_WAIT_LOG_S
    while not await conn.fetchval("SELECT pg_try_advisory_lock($1)", MIGRATION_LOCK):
        waited = time.monotonic() - started
        if waited - said >= LOCK_WAIT_LOG_S:
            said = waited
            holder = await conn.fetchrow(_LOCK_HOLDER, MIGRATION_LOCK)
            log.info(
                "migration_lock_busy",
                waited_s=round(waited, 1),
                holder_pid=holder and holder["pid"],
                holder_running=holder and holder["query"],
            )
        await asyncio.sleep(LOCK_POLL_S)


# The session holding the migration lock, and the start of what it runs now.
_LOCK_HOLDER = """
SELECT a.pid, left(a.query, 200) AS query
FROM pg_locks l JOIN pg_stat_activity a USING (pid)
WHERE l.locktype = 'advisory' AND l.granted AND l.database = (
    SELECT oid FROM pg_database WHERE datname = current_database())
  AND ((l.classid::bigint << 32) | l.objid::bigint) = $1
"""


async def _apply(conn: asyncpg.Connection, version: str, sql: str) -> None:
    record = "INSERT INTO schema_migrations (version) VALUES ($1)"
    if _outside_transaction(sql):
        for statement in statements(sql):
            await conn.execute(statement)
        await conn.execute(record, version)
        return
    async with conn.transaction():
        await conn.execute(sql)
        await conn.execute(record, version)
