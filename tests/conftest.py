"""Shared fixtures: isolated environment, and the real stacks from tests/stack.py."""

from __future__ import annotations

import contextlib
import os
from collections.abc import AsyncIterator, Iterator
from pathlib import Path

import pytest

from server.providers import PROVIDERS
from tests.fakes.postgres import PostgresServer, PostgresUnavailableError, running_postgres
from tests.fakes.s3 import S3Server, running_s3
from tests.stack import InProcessStack, ProcessStack, in_process_stack, process_stack


def pytest_addoption(parser: pytest.Parser) -> None:
    parser.addoption(
        "--live", action="store_true", default=False,
        help="also run the live checks against the real providers (tests/live; needs their keys, costs money)",
    )


# Never let a developer's real provider keys, cloud credentials or settings leak into a test run.
_LEAKY = {variable for entry in PROVIDERS.values() for variable in entry.vendor_key_variables} | {"PROMETHEUS_MULTIPROC_DIR"}


@pytest.fixture(scope="session", autouse=True)
def clean_environment() -> Iterator[None]:
    saved = {k: v for k, v in os.environ.items() if k.startswith(("IMAGEGW_", "AWS_")) or k in _LEAKY}
    for key in saved:
        del os.environ[key]
    yield
    os.environ.update(saved)


@pytest.fixture(scope="session")
async def gateway(tmp_path_factory: pytest.TempPathFactory) -> AsyncIterator[ProcessStack]:
    """One server process behind the real Envoy, shared by the e2e and contract tests.
    Tests that need their own money create their own accounts."""
    async with process_stack(tmp_path_factory.mktemp("gateway")) as stack:
        yield stack


@pytest.fixture(scope="session")
async def service(tmp_path_factory: pytest.TempPathFactory) -> AsyncIterator[InProcessStack]:
    """The production server in-process, over a real gRPC channel."""
    async with in_process_stack(tmp_path_factory.mktemp("service")) as stack:
        yield stack


@pytest.fixture
def var_dir(tmp_path: Path) -> Path:
    return tmp_path / "var"


# One throwaway PostgreSQL cluster (tests/fakes/postgres.py), started the first time a test
# asks for it. Missing PostgreSQL binaries make those tests fail with instructions, never
# skip: CI installs PostgreSQL, and a green run must mean both engines were tested.
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


@pytest.fixture(scope="session")
def s3_server() -> Iterator[S3Server]:
    """moto's S3 server (tests/fakes/s3.py) for the whole session; tests make their own buckets."""
    with running_s3() as server:
        yield server
