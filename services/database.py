"""PostgreSQL access shared by the services: the pool, the reachability check
and the versioned migrations.

Migrations are the numbered `.sql` files in `services/migrations/`, applied in
order, each in its own transaction, under an advisory lock so that replicas
starting together apply each exactly once.
"""

from __future__ import annotations

import re
from pathlib import Path
from typing import Any
from urllib.parse import urlsplit

import asyncpg

from services.log import get_logger

MIGRATIONS = Path(__file__).parent / "migrations"
# Any fixed number works; it only has to be the same in every replica.
MIGRATION_LOCK = 0x10C4_6E00

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


def migration_files() -> list[tuple[str, Path]]:
    found = []
    for path in sorted(MIGRATIONS.glob("*.sql")):
        match = re.match(r"(\d{4})_", path.name)
        if match:
            found.append((path.stem, path))
    return found


async def migrate(dsn: str) -> list[str]:
    """Apply every migration not yet applied; returns the ones applied now."""
    conn = await connect(dsn)
    applied_now: list[str] = []
    try:
        await conn.execute("SELECT pg_advisory_lock($1)", MIGRATION_LOCK)
        try:
            await conn.execute(
                "CREATE TABLE IF NOT EXISTS schema_migrations ("
                " version text PRIMARY KEY, applied_at timestamptz NOT NULL DEFAULT now())"
            )
            done = {r["version"] for r in await conn.fetch("SELECT version FROM schema_migrations")}
            for version, path in migration_files():
                if version in done:
                    continue
                async with conn.transaction():
                    await conn.execute(path.read_text())
                    await conn.execute(
                        "INSERT INTO schema_migrations (version) VALUES ($1)", version
                    )
                applied_now.append(version)
                log.info("migration_applied", version=version)
        finally:
            await conn.execute("SELECT pg_advisory_unlock($1)", MIGRATION_LOCK)
    finally:
        await conn.close()
    return applied_now
