"""Fixtures for the adapter tests: real fakes on loopback, one client, the real catalog.

Every test talks HTTP to a fake from ``tests.fakes``; nothing of ours is mocked. Requests
are built by the real ``ModelCatalog.resolve`` so adapters see exactly what production
gives them. Waits before retries are recorded (``support.SleepRecorder``) or scaled down
(``support.FAST_RETRY``), so the whole folder runs in seconds.
"""

from __future__ import annotations

import asyncio
from collections.abc import AsyncIterator, Callable

import pytest

from server.catalog import ModelCatalog, RawImageRequest
from server.providers.base import ImageRequest
from server.providers.http import UpstreamClient, create_http_client
from tests.fakes.google_fake import GoogleFake
from tests.fakes.openai_fake import OpenAIFake
from tests.fakes.stability_fake import StabilityFake
from tests.providers.support import SPECS


@pytest.fixture(scope="session")
def catalog() -> ModelCatalog:
    return ModelCatalog(SPECS, enabled_providers={spec.provider for spec in SPECS}, default_model="local-1")


@pytest.fixture
def image_request(catalog: ModelCatalog) -> Callable[..., ImageRequest]:
    """``image_request(model, prompt=..., **params)``: a request resolved by the real catalog."""

    def make(model: str, prompt: str = "a red fox in snow, watercolor", **params: object) -> ImageRequest:
        return catalog.resolve(RawImageRequest(prompt=prompt, model=model, **params)).request  # type: ignore[arg-type]

    return make


@pytest.fixture
def deadline() -> Callable[[float], float]:
    """``deadline(seconds)``: an absolute loop time that many seconds from now."""
    return lambda seconds: asyncio.get_running_loop().time() + seconds


@pytest.fixture
async def http() -> AsyncIterator[UpstreamClient]:
    """The client the server gives its adapters."""
    async with create_http_client() as client:
        yield client


@pytest.fixture
async def openai_fake() -> AsyncIterator[OpenAIFake]:
    async with OpenAIFake.running() as fake:
        yield fake


@pytest.fixture
async def google_fake() -> AsyncIterator[GoogleFake]:
    async with GoogleFake.running() as fake:
        yield fake


@pytest.fixture
async def stability_fake() -> AsyncIterator[StabilityFake]:
    async with StabilityFake.running() as fake:
        yield fake
