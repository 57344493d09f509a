"""API key format, checksum and keyed hash (server.ledger.keys), without a database."""

from __future__ import annotations

import hashlib
import hmac
import math
import re
import string
import zlib

import pytest

from server.errors import AuthenticationError
from server.ledger.keys import INVALID_API_KEY_MESSAGE, generate_api_key, hash_api_key, parse_api_key

BASE62 = string.digits + string.ascii_uppercase + string.ascii_lowercase
KEY = re.compile(r"sk-igw-([a-z0-9]{16})_([0-9A-Za-z]{32})([0-9A-Za-z]{6})")


def with_checksum(body: str) -> str:
    """An independent implementation of the documented checksum: CRC32, 6 base62 digits."""
    value, digits = zlib.crc32(body.encode()), ""
    for _ in range(6):
        value, digit = divmod(value, 62)
        digits = BASE62[digit] + digits
    return body + digits


def test_generated_key_format() -> None:
    key_id, api_key = generate_api_key()
    match = KEY.fullmatch(api_key)
    assert match is not None
    assert len(api_key) == 62
    assert key_id == "key_" + match[1]
    assert with_checksum(api_key[:-6]) == api_key
    assert parse_api_key(api_key) == key_id


def test_generated_keys_are_unique_with_at_least_128_bits_of_secret() -> None:
    keys = [generate_api_key() for _ in range(2000)]
    assert len({key_id for key_id, _ in keys}) == len(keys)
    secrets_ = [KEY.fullmatch(api_key)[2] for _, api_key in keys]  # type: ignore[index]
    assert len(set(secrets_)) == len(keys)
    assert 32 * math.log2(62) >= 128
    # Every base62 character shows up: the secret really uses the whole alphabet.
    assert set("".join(secrets_)) == set(BASE62)


def test_every_single_character_typo_is_rejected_offline() -> None:
    _, api_key = generate_api_key()
    for position in range(len("sk-igw-"), len(api_key)):
        if api_key[position] == "_":
            continue
        for replacement in ("0", "a", "Z"):
            if replacement == api_key[position]:
                continue
            typo = api_key[:position] + replacement + api_key[position + 1 :]
            with pytest.raises(AuthenticationError):
                parse_api_key(typo)


def test_adjacent_transpositions_are_rejected() -> None:
    _, api_key = generate_api_key()
    start = len("sk-igw-")
    for position in range(start, len(api_key) - 1):
        swapped = api_key[:position] + api_key[position + 1] + api_key[position] + api_key[position + 2 :]
        if swapped != api_key:
            with pytest.raises(AuthenticationError):
                parse_api_key(swapped)


def test_a_key_with_a_recomputed_checksum_parses_to_its_id() -> None:
    # The checksum catches accidents, not forgeries: a well-formed key with a wrong secret
    # parses, and only the database hash comparison rejects it (tests/service/test_ledger.py).
    key_id, api_key = generate_api_key()
    forged = with_checksum(api_key[: -6 - 32] + "A" * 32)
    assert parse_api_key(forged) == key_id


@pytest.mark.parametrize(
    "value",
    [
        None,
        "",
        " ",
        "Bearer",
        "sk-igw-",
        "sk-igw-abc",
        "sk-proj-abcdefghijklmnopqrstuvwxyz0123456789ABCDEFGHIJKLMNOPQRSTUV",
        "not a key at all",
        "sk-igw-" + "a" * 16 + "_" + "b" * 38,  # right shape, wrong checksum
        b"sk-igw-",
        12345,
    ],
)
def test_malformed_keys_are_rejected_with_one_message(value: object) -> None:
    with pytest.raises(AuthenticationError) as caught:
        parse_api_key(value)  # type: ignore[arg-type]
    assert caught.value.message == INVALID_API_KEY_MESSAGE
    assert (caught.value.code, caught.value.http_status) == ("invalid_api_key", 401)


def test_variants_of_a_valid_key_are_rejected_and_never_echoed() -> None:
    _, api_key = generate_api_key()
    variants = [
        " " + api_key,
        api_key + "\n",
        api_key.upper(),
        api_key.replace("sk-igw-", "SK-IGW-"),
        api_key.replace("sk-igw-", "sk-igw_"),
        api_key[:-1],
        api_key + "0",
        "Bearer " + api_key,
    ]
    for variant in variants:
        with pytest.raises(AuthenticationError) as caught:
            parse_api_key(variant)
        assert caught.value.message == INVALID_API_KEY_MESSAGE
        secret = KEY.fullmatch(api_key)[2]  # type: ignore[index]
        assert secret not in str(caught.value) and secret not in caught.value.openai_json()


def test_hash_is_hmac_sha256_under_the_server_secret() -> None:
    _, api_key = generate_api_key()
    digest = hash_api_key(api_key, b"server-secret")
    assert digest == hmac.new(b"server-secret", api_key.encode(), hashlib.sha256).hexdigest()
    assert re.fullmatch(r"[0-9a-f]{64}", digest)
    assert hash_api_key(api_key, b"server-secret") == digest
    assert hash_api_key(api_key, b"other-secret") != digest
    assert api_key not in digest


def test_hash_refuses_an_empty_secret() -> None:
    with pytest.raises(ValueError, match="must not be empty"):
        hash_api_key("sk-igw-x", b"")
