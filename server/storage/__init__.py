"""Image stores and signed URLs.

``response_format: "url"`` works for every model because the gateway keeps the images
itself: a store saves the bytes under an unguessable id, and ``UrlSigner`` makes the
public link ``{base}/v1/images/files/{id}?expires=...&signature=...`` that
``ImageService.GetImageFile`` checks before serving the bytes. The filesystem store is
the embedded default; ``S3ImageStore`` (``IMAGEGW_IMAGE_STORE_URL=s3://...``) serves several
replicas, and can hand out the store's own presigned URLs instead. ``MeteredImageStore``
reports any store's latency and errors; ``StoreError`` says whether a failure may pass.
"""

from __future__ import annotations

from server.storage.base import ImageStore, StoredImage, StoreError, new_image_id, valid_image_id
from server.storage.filesystem import FilesystemImageStore
from server.storage.metered import MeteredImageStore
from server.storage.s3 import S3ImageStore, parse_s3_url
from server.storage.signing import UrlSigner

__all__ = [
    "FilesystemImageStore",
    "ImageStore",
    "MeteredImageStore",
    "S3ImageStore",
    "StoreError",
    "StoredImage",
    "UrlSigner",
    "new_image_id",
    "parse_s3_url",
    "valid_image_id",
]
