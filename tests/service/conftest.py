"""Database fixtures for service tests: SQLite files and a real PostgreSQL.

* ``postgres_server`` / ``postgres_url`` (session): one throwaway PostgreSQL cluster
  (:mod:`tests.fakes.postgres`), started the first time a test asks for it. Missing
  PostgreSQL binaries make those tests *fail* with instructions, never skip: CI installs
  PostgreSQL, and a green run must mean both engines were tested.
* ``database_url`` (per test, parametrized ``sqlite`` / ``postgres``): a fresh, empty
  database on each engine; the ``postgres`` case carries the ``postgres`` marker, so
  ``-m "not postgres"`` runs SQLite only.
* ``ledger_engine`` (per test): an engine from ``server.ledger.db.create_engine`` on
  ``database_url``, migrated to head, disposed afterwards.
"""

from __future__ import annotations

import contextlib
from collections.abc import AsyncIterator, Iterator
from pathlib import Path

import pytest
from sqlalchemy.ext.asyncio import AsyncEngine

from server.ledger.db import create_engine, migrate
from tests.fakes.postgres import PostgresServer, PostgresUnavailableError, create_database, running_postgres


@pytest.fixture(scope="session")
def postgres_server() -> Iterator[PostgresServer]:
    """A throwaway PostgreSQL cluster for the whole session."""
    stack = contextlib.ExitStack()
    try:
        server = stack.enter_context(running_postgres())
    except PostgresUnavailableError as exc:
        problem = str(exc)
    else:
        with stack:
            yield server
        return
    # A failure, not a skip: a green run must mean PostgreSQL was tested.
    pytest.fail(problem, pytrace=False)


@pytest.fixture(scope="session")
def postgres_url(postgres_server: PostgresServer) -> str:
    """``postgresql+asyncpg://`` URL of the session cluster's default database."""
    return postgres_server.url


@pytest.fixture(params=["sqlite", pytest.param("postgres", marks=pytest.mark.postgres)])
async def database_url(request: pytest.FixtureRequest, tmp_path: Path) -> str:
    """A fresh, empty database (not migrated) on each engine."""
    if request.param == "sqlite":
        return f"sqlite+aiosqlite:///{tmp_path / 'ledger.db'}"
    return await create_database(request.getfixturevalue("postgres_url"))


@pytest.fixture
async def ledger_engine(database_url: str) -> AsyncIterator[AsyncEngine]:
    """A migrated engine on ``database_url``."""
    engine = create_engine(database_url)
    try:
        await migrate(engine)
        yield engine
    finally:
        await engine.dispose()
