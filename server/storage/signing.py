"""HMAC-signed, expiring image URLs (OpenAI's own URLs last 60 minutes)."""

from __future__ import annotations

import base64
import hashlib
import hmac
import time
from collections.abc import Callable

from server.errors import PermissionDeniedError

__all__ = ["UrlSigner"]


class UrlSigner:
    """Signs ``(image id, expiry)`` with HMAC-SHA256 under the server secret."""

    def __init__(
        self, secret: bytes, *, base_url: str, ttl_seconds: int, clock: Callable[[], float] = time.time
    ) -> None:
        self._secret = secret
        self._base_url = base_url.rstrip("/")
        self.ttl_seconds = ttl_seconds
        self._clock = clock

    def signature(self, image_id: str, expires: int) -> str:
        mac = hmac.new(self._secret, f"{image_id}\n{expires}".encode(), hashlib.sha256).digest()
        return base64.urlsafe_b64encode(mac).rstrip(b"=").decode()

    def url(self, image_id: str) -> str:
        """The public URL of a stored image, valid for ``ttl_seconds`` from now."""
        expires = int(self._clock()) + self.ttl_seconds
        return f"{self._base_url}/v1/images/files/{image_id}?expires={expires}&signature={self.signature(image_id, expires)}"

    def verify(self, image_id: str, expires: int, signature: str) -> int:
        """Checks a URL's signature, then its expiry; returns the seconds it stays valid.

        Raises PermissionDeniedError (403) for a bad signature or an expired link. The
        signature is checked first and in constant time, so an attacker learns nothing
        from which check failed.
        """
        expected = self.signature(image_id, expires)
        if not hmac.compare_digest(expected.encode(), signature.encode()):
            raise PermissionDeniedError(
                "The image URL signature is invalid.", param="signature", code="invalid_signature"
            )
        remaining = expires - int(self._clock())
        if remaining <= 0:
            raise PermissionDeniedError("The image URL has expired.", param="expires", code="url_expired")
        return remaining
