"""Database fixtures for service tests: SQLite files and a real PostgreSQL.

* ``postgres_server`` / ``postgres_url`` (session, in ``tests/conftest.py``): one
  throwaway PostgreSQL cluster shared with the end-to-end tests.
* ``database_url`` (per test, parametrized ``sqlite`` / ``postgres``): a fresh, empty
  database on each engine; the ``postgres`` case carries the ``postgres`` marker, so
  ``-m "not postgres"`` runs SQLite only.
* ``database`` (per test): a :class:`server.ledger.db.Database` on ``database_url``,
  migrated to head, closed afterwards; ``ledger_engine`` is its async engine, for tests
  that look at the tables directly.
"""

from __future__ import annotations

from collections.abc import AsyncIterator
from pathlib import Path

import pytest
from sqlalchemy.ext.asyncio import AsyncEngine

from server.ledger.db import Database, migrate
from tests.fakes.postgres import create_database


@pytest.fixture(params=["sqlite", pytest.param("postgres", marks=pytest.mark.postgres)])
async def database_url(request: pytest.FixtureRequest, tmp_path: Path) -> str:
    """A fresh, empty database (not migrated) on each engine."""
    if request.param == "sqlite":
        return f"sqlite+aiosqlite:///{tmp_path / 'ledger.db'}"
    return await create_database(request.getfixturevalue("postgres_url"))


@pytest.fixture
async def database(database_url: str) -> AsyncIterator[Database]:
    """A migrated database on ``database_url``."""
    db = Database(database_url)
    try:
        await migrate(db.engine)
        yield db
    finally:
        await db.close()


@pytest.fixture
def ledger_engine(database: Database) -> AsyncEngine:
    """The async engine of ``database``."""
    return database.engine
