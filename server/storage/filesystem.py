"""The embedded image store: one file per image in a folder (``var/images`` by default)."""

from __future__ import annotations

import asyncio
import errno
import os
from pathlib import Path

from server.storage.base import FORMAT_OF_EXTENSION, KEPT_PREFIX, StoredImage, StoreError, valid_image_id

__all__ = ["FilesystemImageStore"]

# Failures that pass by themselves (descriptor or memory pressure, an interrupted call, a
# network file system's hiccup). The rest (a full, read-only or missing disk, permissions)
# last until an operator acts.
_TRANSIENT_ERRNOS = frozenset(
    {errno.EAGAIN, errno.EINTR, errno.EBUSY, errno.EMFILE, errno.ENFILE, errno.ENOMEM, errno.ETIMEDOUT, errno.ESTALE}
)


def _store_error(operation: str, exc: OSError) -> StoreError:
    return StoreError(
        f"image folder {operation} failed: {exc.strerror or exc}", operation=operation,
        retryable=exc.errno in _TRANSIENT_ERRNOS,
    )


class FilesystemImageStore:
    """Stores images as files. File I/O runs in worker threads so that a slow disk never
    stalls the event loop; writes go to a temporary name first so a reader never sees a
    half-written image."""

    def __init__(self, root: Path) -> None:
        self._root = root

    def _path(self, image_id: str) -> Path:
        # The id is validated by a strict pattern before it becomes a path: no separators,
        # no dot-dot, so nothing can escape the store's folder.
        if not valid_image_id(image_id):
            raise ValueError("invalid image id")
        return self._root / image_id

    async def put(self, image_id: str, data: bytes) -> None:
        path = self._path(image_id)
        try:
            await asyncio.to_thread(self._write, path, data)
        except OSError as exc:
            raise _store_error("put", exc) from exc

    def _write(self, path: Path, data: bytes) -> None:
        path.parent.mkdir(parents=True, exist_ok=True)
        tmp = path.with_name(f".{path.name}.tmp")
        with tmp.open("wb") as handle:
            handle.write(data)
        os.replace(tmp, path)

    async def get(self, image_id: str) -> StoredImage | None:
        if not valid_image_id(image_id):
            return None
        path = self._path(image_id)
        try:
            data = await asyncio.to_thread(path.read_bytes)
        except FileNotFoundError:
            return None
        except OSError as exc:
            raise _store_error("get", exc) from exc
        return StoredImage(data=data, content_type=FORMAT_OF_EXTENSION[image_id.rsplit(".", 1)[1]])

    async def delete_older_than(self, cutoff: float, *, kept_cutoff: float | None = None) -> int:
        try:
            return await asyncio.to_thread(self._sweep, cutoff, cutoff if kept_cutoff is None else kept_cutoff)
        except OSError as exc:
            raise _store_error("delete", exc) from exc

    def _sweep(self, cutoff: float, kept_cutoff: float) -> int:
        removed = 0
        try:
            entries = list(os.scandir(self._root))
        except FileNotFoundError:
            return 0
        for entry in entries:
            try:
                limit = kept_cutoff if entry.name.startswith(KEPT_PREFIX) else cutoff
                if entry.is_file() and entry.stat().st_mtime < limit:
                    os.unlink(entry.path)
                    removed += 1
            except FileNotFoundError:
                continue  # another replica swept it first
        return removed

    async def presigned_url(self, image_id: str, ttl_seconds: int) -> str | None:
        return None  # a folder has no URLs of its own; the gateway serves its files

    async def aclose(self) -> None:
        return None
