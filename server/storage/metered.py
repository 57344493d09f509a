"""Store latency and errors as metrics, around any ``ImageStore``.

One wrapper instead of timing code in each store: every operation is observed in
``imagegw_store_duration_seconds`` (operation, outcome ``ok`` / ``not_found`` /
``retryable`` / ``permanent``), and every failure counted in ``imagegw_store_errors_total``.
"""

from __future__ import annotations

import time
from collections.abc import Awaitable, Callable
from typing import TypeVar

from server.metrics import Metrics
from server.storage.base import ImageStore, StoredImage, StoreError

__all__ = ["MeteredImageStore"]

T = TypeVar("T")


class MeteredImageStore:
    """An ``ImageStore`` that reports on the one it wraps."""

    def __init__(self, inner: ImageStore, metrics: Metrics) -> None:
        self.inner = inner
        self._metrics = metrics

    async def _observe(self, operation: str, call: Callable[[], Awaitable[T]]) -> T:
        started, outcome = time.perf_counter(), "ok"
        try:
            result = await call()
            if result is None and operation == "get":
                outcome = "not_found"
            return result
        except StoreError as exc:
            outcome = "retryable" if exc.retryable else "permanent"
            self._metrics.store_errors.labels(operation, str(exc.retryable).lower()).inc()
            raise
        finally:
            self._metrics.store_seconds.labels(operation, outcome).observe(time.perf_counter() - started)

    async def put(self, image_id: str, data: bytes) -> None:
        await self._observe("put", lambda: self.inner.put(image_id, data))

    async def get(self, image_id: str) -> StoredImage | None:
        return await self._observe("get", lambda: self.inner.get(image_id))

    async def delete_older_than(self, cutoff: float, *, kept_cutoff: float | None = None) -> int:
        return await self._observe("delete", lambda: self.inner.delete_older_than(cutoff, kept_cutoff=kept_cutoff))

    async def presigned_url(self, image_id: str, ttl_seconds: int) -> str | None:
        return await self._observe("presign", lambda: self.inner.presigned_url(image_id, ttl_seconds))

    async def aclose(self) -> None:
        await self.inner.aclose()
