"""Fixtures shared by every suite: a real PostgreSQL and real gRPC servers.

PostgreSQL: `LOCKN_TEST_DATABASE_URL` (a server where we may create
databases), else the one on 127.0.0.1:5432 when it answers, else a throwaway
server started from the installed binaries (set `LOCKN_TEST_EMBEDDED_PG=1` to
force that). Each run migrates its own template database, and each test gets
a fresh copy of it, so no test sees another's rows.
"""

from __future__ import annotations

import asyncio
import os
import uuid
from collections.abc import AsyncIterator, Iterator

import asyncpg
import pytest

from services import embedded_postgres
from services.database import migrate

# Each part's fixtures live in their own module, named for the part.
pytest_plugins = [
    "tests.fixtures.simulator",
    "tests.fixtures.worker",
    "tests.fixtures.generation",
    "tests.fixtures.gateway",
]


def with_database(dsn: str, name: str) -> str:
    base, _, _ = dsn.rpartition("/")
    return f"{base}/{name}"


@pytest.fixture(scope="session")
def postgres_server() -> Iterator[str]:
    """DSN of a server where the suite may create and drop databases."""
    with embedded_postgres.postgres_server(
        os.environ.get("LOCKN_TEST_DATABASE_URL"),
        embedded=os.environ.get("LOCKN_TEST_EMBEDDED_PG") == "1",
    ) as dsn:
        yield dsn


async def _admin(server: str, *statements: str) -> None:
    conn = await asyncpg.connect(server)
    try:
        for statement in statements:
            await conn.execute(statement)
    finally:
        await conn.close()


@pytest.fixture(scope="session")
def template_database(postgres_server: str) -> Iterator[str]:
    """Name of this run's migrated template database."""
    name = f"lockn_test_{uuid.uuid4().hex[:12]}"
    asyncio.run(_admin(postgres_server, f'CREATE DATABASE "{name}"'))
    asyncio.run(migrate(with_database(postgres_server, name)))
    try:
        yield name
    finally:
        asyncio.run(_admin(postgres_server, f'DROP DATABASE IF EXISTS "{name}" WITH (FORCE)'))


@pytest.fixture
def database_url(postgres_server: str, template_database: str) -> Iterator[str]:
    """A fresh, migrated database for one test."""
    name = f"{template_database}_{uuid.uuid4().hex[:8]}"
    asyncio.run(_admin(postgres_server, f'CREATE DATABASE "{name}" TEMPLATE "{template_database}"'))
    try:
        yield with_database(postgres_server, name)
    finally:
        asyncio.run(_admin(postgres_server, f'DROP DATABASE IF EXISTS "{name}" WITH (FORCE)'))


@pytest.fixture
def empty_database(postgres_server: str) -> Iterator[str]:
    """A database with no schema at all, for migration tests."""
    name = f"lockn_empty_{uuid.uuid4().hex[:10]}"
    asyncio.run(_admin(postgres_server, f'CREATE DATABASE "{name}"'))
    try:
        yield with_database(postgres_server, name)
    finally:
        asyncio.run(_admin(postgres_server, f'DROP DATABASE IF EXISTS "{name}" WITH (FORCE)'))


@pytest.fixture
async def db(database_url: str) -> AsyncIterator[asyncpg.Connection]:
    conn = await asyncpg.connect(database_url)
    try:
        yield conn
    finally:
        await conn.close()
