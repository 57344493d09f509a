"""Database fixtures for service tests: SQLite files and a real PostgreSQL.

* ``postgres_server`` / ``postgres_url`` (session, in ``tests/conftest.py``): one
  throwaway PostgreSQL cluster shared with the end-to-end tests.
* ``database_url`` (per test, parametrized ``sqlite`` / ``postgres``): a fresh, empty
  database on each engine; the ``postgres`` case carries the ``postgres`` marker, so
  ``-m "not postgres"`` runs SQLite only.
* ``ledger_engine`` (per test): an engine from ``server.ledger.db.create_engine`` on
  ``database_url``, migrated to head, disposed afterwards.
"""

from __future__ import annotations

from collections.abc import AsyncIterator
from pathlib import Path

import pytest
from sqlalchemy.ext.asyncio import AsyncEngine

from server.ledger.db import create_engine, migrate
from tests.fakes.postgres import create_database


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
