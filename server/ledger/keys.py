"""API key format: generation, offline format check, keyed hash.

An API key looks like ``sk-igw-<id>_<secret><check>`` (62 characters)::

    sk-igw-k3j9x0q2m5n8p1r4_Zt8Qy1LmN4vB7xC0dE3fG6hJ9kL2mN5p3hX0aZ
    prefix  id (16)         secret (32)                     check (6)

* ``sk-igw-`` is a recognisable prefix, so secret scanners (and people) can tell an
  imagegw key at a glance, OpenAI-style (``sk-...``).
* The id part is public: ``key_<id>`` is the key id shown by ``imagegw keys create``
  and used to revoke it, and the database looks the key up by it.
* The secret carries the entropy; 32 base62 characters are ~190 bits, well past 128.
* The last six characters are the CRC32 of everything before them, in base62 (as in
  GitHub's token format). A typo or truncated paste is rejected by
  :func:`parse_api_key` without a database round trip. CRC32 is not a MAC: it only
  catches accidents; the secret is verified against the stored keyed hash.

Only ``hash_api_key(api_key, secret)`` -- HMAC-SHA256 under the server's
``key_hash_secret`` -- is stored. A stolen database therefore yields neither keys nor
anything to brute-force offline without the server secret. Keys never appear in logs
or error messages: every rejection uses the same message, :data:`INVALID_API_KEY_MESSAGE`.
"""

from __future__ import annotations

import hashlib
import hmac
import re
import secrets
import string
import zlib

from server.errors import AuthenticationError

__all__ = [
    "API_KEY_PREFIX",
    "INVALID_API_KEY_MESSAGE",
    "KEY_ID_PREFIX",
    "generate_api_key",
    "hash_api_key",
    "parse_api_key",
]

API_KEY_PREFIX = "sk-igw-"
KEY_ID_PREFIX = "key_"
# One message for missing, malformed, unknown and revoked keys: telling them apart
# would let a caller probe which key ids exist or were revoked.
INVALID_API_KEY_MESSAGE = (
    "Incorrect or revoked API key. Send a valid imagegw key as 'Authorization: Bearer sk-igw-...'."
)

_ID_ALPHABET = string.ascii_lowercase + string.digits
_SECRET_ALPHABET = string.digits + string.ascii_uppercase + string.ascii_lowercase  # base62
_ID_LENGTH = 16  # ~83 bits: only needs to be unique, it is public
_SECRET_LENGTH = 32  # ~190 bits of secret entropy
_CHECK_LENGTH = 6  # 62**6 > 2**32, so any CRC32 fits
_API_KEY = re.compile(
    rf"{re.escape(API_KEY_PREFIX)}(?P<id>[a-z0-9]{{{_ID_LENGTH}}})_"
    rf"(?P<secret>[0-9A-Za-z]{{{_SECRET_LENGTH}}})(?P<check>[0-9A-Za-z]{{{_CHECK_LENGTH}}})",
    re.ASCII,
)


def _checksum(body: str) -> str:
    value = zlib.crc32(body.encode("ascii"))
    digits = []
    for _ in range(_CHECK_LENGTH):
        value, digit = divmod(value, 62)
        digits.append(_SECRET_ALPHABET[digit])
    return "".join(reversed(digits))


def generate_api_key() -> tuple[str, str]:
    """Makes a new key.

    Returns:
        ``(key_id, api_key)``: the public id (``key_...``) and the secret key
        (``sk-igw-...``). The caller stores only ``hash_api_key(api_key, ...)`` and
        shows the key once.
    """
    id_part = "".join(secrets.choice(_ID_ALPHABET) for _ in range(_ID_LENGTH))
    secret = "".join(secrets.choice(_SECRET_ALPHABET) for _ in range(_SECRET_LENGTH))
    body = f"{API_KEY_PREFIX}{id_part}_{secret}"
    return KEY_ID_PREFIX + id_part, body + _checksum(body)


def parse_api_key(api_key: str | None) -> str:
    """Checks a key's format and checksum, without any database access.

    Returns:
        The key id (``key_...``) to look the key up by.

    Raises:
        AuthenticationError: the key is missing, malformed or fails its checksum
            (always with :data:`INVALID_API_KEY_MESSAGE`; the key is never echoed).
    """
    match = _API_KEY.fullmatch(api_key) if isinstance(api_key, str) else None
    if match is None:
        raise AuthenticationError(INVALID_API_KEY_MESSAGE)
    body = api_key[: -_CHECK_LENGTH]  # type: ignore[index]  # a str when it matched
    if not hmac.compare_digest(_checksum(body), match["check"]):
        raise AuthenticationError(INVALID_API_KEY_MESSAGE)
    return KEY_ID_PREFIX + match["id"]


def hash_api_key(api_key: str, secret: bytes) -> str:
    """The only form of a key that is stored: hex HMAC-SHA256 of the key under ``secret``.

    Raises:
        ValueError: ``secret`` is empty (a configuration bug: hashes would be unkeyed).
    """
    if not secret:
        raise ValueError("key_hash_secret must not be empty")
    return hmac.new(secret, api_key.encode("utf-8"), hashlib.sha256).hexdigest()
