"""The image store protocol and image ids."""

from __future__ import annotations

import re
import secrets
from dataclasses import dataclass
from typing import Protocol

__all__ = ["FORMAT_OF_EXTENSION", "KEPT_PREFIX", "ImageStore", "StoreError", "StoredImage", "new_image_id", "valid_image_id"]

# 128 random bits, URL-safe; the extension tells the content type without a lookup.
# `imgk-` marks images of a request with an Idempotency-Key: a replay may ask for them
# until the key expires, so they outlive the URL lifetime (see delete_older_than).
_ID_RE = re.compile(r"^imgk?-[A-Za-z0-9_-]{22}\.(png|jpeg|webp)$")
KEPT_PREFIX = "imgk-"
FORMAT_OF_EXTENSION = {"png": "image/png", "jpeg": "image/jpeg", "webp": "image/webp"}


def new_image_id(fmt: str, *, kept: bool = False) -> str:
    """A fresh unguessable id such as ``img-3q2L...Xw.png`` (``imgk-...`` when ``kept``)."""
    if fmt not in FORMAT_OF_EXTENSION:
        raise ValueError(f"unknown image format {fmt!r}")
    return f"{KEPT_PREFIX if kept else 'img-'}{secrets.token_urlsafe(16)}.{fmt}"


def valid_image_id(image_id: str) -> bool:
    """True for ids this gateway could have made; anything else (``..``, ``/``) is refused
    before it gets near a path or an object key."""
    return bool(_ID_RE.match(image_id))


class StoreError(Exception):
    """A store operation failed. ``retryable``: the same call may succeed later (a network
    error, a 5xx or throttling after the client's own retries, a busy disk); otherwise the
    store is misconfigured or refuses (credentials, a missing bucket, a full or read-only
    disk) and an operator must act."""

    def __init__(self, message: str, *, operation: str, retryable: bool) -> None:
        super().__init__(message)
        self.operation = operation
        self.retryable = retryable


@dataclass(frozen=True, slots=True)
class StoredImage:
    """Bytes read back from a store."""

    data: bytes
    content_type: str


class ImageStore(Protocol):
    """Where images for ``url`` responses live until they expire."""

    async def put(self, image_id: str, data: bytes) -> None:
        """Stores the bytes under ``image_id`` (made by ``new_image_id``); raises ``StoreError``."""
        ...

    async def get(self, image_id: str) -> StoredImage | None:
        """The stored image, or None when there is none (never stored, or swept); raises
        ``StoreError`` when the store cannot say."""
        ...

    async def delete_older_than(self, cutoff: float, *, kept_cutoff: float | None = None) -> int:
        """Deletes images stored before unix time ``cutoff`` (kept ones, ``imgk-``, before
        ``kept_cutoff`` when given); returns how many. A store whose own lifecycle rule
        expires images returns 0."""
        ...

    async def presigned_url(self, image_id: str, ttl_seconds: int) -> str | None:
        """A URL of the store itself that serves the image for ``ttl_seconds`` without the
        gateway (``IMAGEGW_URL_MODE=presigned``), or None when the store cannot make one."""
        ...

    async def aclose(self) -> None:
        """Releases the store's connections."""
        ...
