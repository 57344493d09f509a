"""Image stores and signed URLs.

``response_format: "url"`` works for every model because the gateway keeps the images
itself: a store saves the bytes under an unguessable id, and ``UrlSigner`` makes the
public link ``{base}/v1/images/files/{id}?expires=...&signature=...`` that
``ImageService.GetImageFile`` checks before serving the bytes. The filesystem store is
the embedded default; an S3-compatible store implements the same protocol.
"""

from __future__ import annotations

from server.storage.base import ImageStore, StoredImage, new_image_id, valid_image_id
from server.storage.filesystem import FilesystemImageStore
from server.storage.signing import UrlSigner

__all__ = [
    "FilesystemImageStore",
    "ImageStore",
    "StoredImage",
    "UrlSigner",
    "new_image_id",
    "valid_image_id",
]
