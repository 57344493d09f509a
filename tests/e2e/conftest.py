"""E2E fixtures: two server processes sharing one PostgreSQL database behind one Envoy."""

from __future__ import annotations

from collections.abc import AsyncIterator

import pytest

from tests.fakes.postgres import create_database
from tests.stack import ProcessStack, process_stack

# The matrix's checks live in a support module (imported later, by its test module):
# let pytest explain their failures.
pytest.register_assert_rewrite("tests.e2e.matrix")


@pytest.fixture(scope="session")
async def replicas(tmp_path_factory: pytest.TempPathFactory, postgres_url: str) -> AsyncIterator[ProcessStack]:
    """Two ``imagegw serve`` replicas on one fresh PostgreSQL database (the session cluster
    of tests/conftest.py), behind the real Envoy (round robin). Tests that need their own
    money or limits create their own accounts."""
    database_url = await create_database(postgres_url)
    # One render worker each, so that a large request stays in flight long enough to race.
    async with process_stack(
        tmp_path_factory.mktemp("replicas"), servers=2, database_url=database_url, render_workers=1
    ) as stack:
        yield stack
