"""What the adapter tests share (importable, unlike conftest)."""

from __future__ import annotations

from collections.abc import Awaitable, Callable

from server.catalog import load_catalog
from server.config import MIB
from server.providers import PROVIDERS
from server.providers.http import RetryPolicy, UpstreamClient, UpstreamHttp

__all__ = ["FAST_RETRY", "SPECS", "SleepRecorder", "models_of", "upstream"]

# Backoff short enough for tests, same shape as production (3 attempts, exponential, jitter).
FAST_RETRY = RetryPolicy(max_attempts=3, base_delay=0.01, max_delay=0.05)
SPECS = load_catalog()


def models_of(provider: str) -> list[str]:
    """The catalog's image models served by ``provider`` that generate."""
    return [spec.id for spec in SPECS if spec.provider == provider and spec.is_image and spec.generations]


class SleepRecorder:
    """An ``UpstreamHttp.sleep`` that records each wait before a retry and returns at once."""

    def __init__(self) -> None:
        self.waits: list[float] = []

    async def __call__(self, seconds: float) -> None:
        self.waits.append(seconds)


def upstream(
    http: UpstreamClient,
    provider: str,
    *,
    retry: RetryPolicy = FAST_RETRY,
    max_response_bytes: int = 128 * MIB,
    sleep: Callable[[float], Awaitable[None]] | None = None,
) -> UpstreamHttp:
    """The ``UpstreamHttp`` an adapter of ``provider`` gets, as ``build_provider`` makes it."""
    return UpstreamHttp(
        http,
        provider=provider,
        max_response_bytes=max_response_bytes,
        retry=retry,
        key_setting=PROVIDERS[provider].key_setting,
        **({"sleep": sleep} if sleep is not None else {}),
    )
