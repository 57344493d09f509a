"""The image store on any S3-compatible object store (AWS S3, MinIO, Cloudflare R2, GCS's
S3 interface), for several replicas: ``IMAGEGW_IMAGE_STORE_URL=s3://bucket/prefix``.

The client is ``obstore`` (Rust's ``object_store`` with a Python binding): one dependency,
its own async HTTP client outside the GIL, and about half the CPU of aiobotocore per 1.5 MB
put or get on this machine (``bench/store_clients.py``, figures in ``bench/README.md``).
Region, endpoint and keys come from the standard AWS variables (``Settings`` reads the four
common ones; ``object_store`` reads the rest itself: session tokens, web identity for
Kubernetes service accounts, container credentials).

Each image is one object ``{prefix}/{image id}`` with its content type, written whole
(an object appears atomically, so a reader never sees half an image). Expiry is the
bucket's lifecycle rule (README, "Production"), not the sweeper: listing a bucket from every
replica every few minutes costs requests and scales with the bucket. The client retries
transient failures itself (twice, within ``_RETRY_SECONDS``), so a request is never held
for minutes by a store that is down; what still fails is a ``StoreError``.
"""

from __future__ import annotations

from datetime import timedelta
from typing import Any

import obstore
from obstore.exceptions import GenericError, JoinError
from obstore.store import S3Store

from server.storage.base import FORMAT_OF_EXTENSION, StoredImage, StoreError, valid_image_id

__all__ = ["S3ImageStore", "parse_s3_url"]

_RETRY_SECONDS = 10
_RETRY: Any = {
    "max_retries": 2,
    "retry_timeout": timedelta(seconds=_RETRY_SECONDS),
    "backoff": {"init_backoff": timedelta(milliseconds=100), "max_backoff": timedelta(seconds=2), "base": 2},
}


def parse_s3_url(url: str) -> tuple[str, str]:
    """``s3://bucket/some/prefix`` -> ``("bucket", "some/prefix")``.

    Raises:
        ValueError: not an ``s3://`` URL with a bucket.
    """
    scheme, _, rest = url.partition("://")
    bucket, _, prefix = rest.partition("/")
    if scheme != "s3" or not bucket:
        raise ValueError(f"IMAGEGW_IMAGE_STORE_URL {url!r} is not s3://bucket[/prefix]")
    return bucket, prefix.strip("/")


class S3ImageStore:
    """Images as objects in one bucket under one prefix."""

    def __init__(
        self,
        bucket: str,
        prefix: str = "",
        *,
        endpoint: str | None = None,
        region: str | None = None,
        access_key_id: str | None = None,
        secret_access_key: str | None = None,
    ) -> None:
        config = {
            key: value
            for key, value in (
                ("endpoint", endpoint),
                ("region", region),
                ("access_key_id", access_key_id),
                ("secret_access_key", secret_access_key),
            )
            if value
        }
        self._store = S3Store(
            bucket,
            prefix=prefix or None,
            config=config,  # type: ignore[arg-type]
            client_options={
                # MinIO and test servers on plain HTTP inside a cluster.
                "allow_http": bool(endpoint and endpoint.startswith("http://")),
                "connect_timeout": timedelta(seconds=5),
                "timeout": timedelta(seconds=30),
            },
            retry_config=_RETRY,
        )

    async def put(self, image_id: str, data: bytes) -> None:
        content_type = _content_type(image_id)
        try:
            await obstore.put_async(self._store, image_id, data, attributes={"Content-Type": content_type})
        except Exception as exc:
            raise _store_error("put", exc) from exc

    async def get(self, image_id: str) -> StoredImage | None:
        if not valid_image_id(image_id):
            return None
        try:
            result = await obstore.get_async(self._store, image_id)
            data = (await result.bytes_async()).to_bytes()
        except FileNotFoundError:
            return None
        except Exception as exc:
            raise _store_error("get", exc) from exc
        return StoredImage(data=data, content_type=_content_type(image_id))

    async def delete_older_than(self, cutoff: float, *, kept_cutoff: float | None = None) -> int:
        return 0  # the bucket's lifecycle rule expires images

    async def presigned_url(self, image_id: str, ttl_seconds: int) -> str | None:
        _content_type(image_id)
        try:
            return await obstore.sign_async(self._store, "GET", image_id, timedelta(seconds=ttl_seconds))
        except Exception as exc:
            raise _store_error("presign", exc) from exc

    async def aclose(self) -> None:
        return None  # object_store's pool closes with the store object


def _content_type(image_id: str) -> str:
    # The id is validated by a strict pattern before it becomes a key: nothing can reach
    # outside the prefix.
    if not valid_image_id(image_id):
        raise ValueError("invalid image id")
    return FORMAT_OF_EXTENSION[image_id.rsplit(".", 1)[1]]


def _store_error(operation: str, exc: Exception) -> StoreError:
    """Classifies by exception type: ``GenericError`` is what is left after the client's
    own retries of network errors, 5xx and throttling, so a later call may succeed; every
    other type (a missing bucket, denied or invalid credentials, bad configuration) lasts
    until an operator acts."""
    retryable = isinstance(exc, GenericError | JoinError)
    # object_store's message is long and multi-line; the first line names the failure.
    first_line = str(exc).splitlines()[0] if str(exc) else type(exc).__name__
    return StoreError(f"S3 {operation} failed: {first_line}", operation=operation, retryable=retryable)
