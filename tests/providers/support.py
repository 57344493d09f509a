"""Constants shared by the adapter tests (importable, unlike conftest)."""

from __future__ import annotations

from server.catalog import load_catalog
from server.providers.http import RetryPolicy

__all__ = ["FAST_RETRY", "SPECS", "models_of"]

# Backoff short enough for tests, same shape as production (3 attempts, exponential, jitter).
FAST_RETRY = RetryPolicy(max_attempts=3, base_delay=0.01, max_delay=0.05)
SPECS = load_catalog()


def models_of(provider: str) -> list[str]:
    """The catalog's image models served by ``provider``."""
    return [spec.id for spec in SPECS if spec.provider == provider and spec.is_image]
