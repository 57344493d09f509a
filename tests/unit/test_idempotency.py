"""Idempotency-Key parsing and the request fingerprint (pure functions)."""

from __future__ import annotations

import hashlib
import json

import pytest
from imagegw.v1 import images_pb2

from server.errors import InvalidRequestError
from server.idempotency import MAX_KEY_LENGTH, fingerprint, parse_key

METHOD = "imagegw.v1.ImageService.GenerateImages"


@pytest.mark.parametrize(
    "value",
    ["k", "a" * MAX_KEY_LENGTH, "stainless-python-retry-0b8f", "with space and ~!@#$%^&*()_+{}|:<>?"],
)
def test_valid_keys_are_returned_as_sent(value: str) -> None:
    assert parse_key([("authorization", "Bearer x"), ("idempotency-key", value)]) == value


def test_no_key_means_none() -> None:
    assert parse_key([("authorization", "Bearer x")]) is None
    assert parse_key(None) is None


@pytest.mark.parametrize(
    "values",
    [
        [""],
        ["a" * (MAX_KEY_LENGTH + 1)],
        ["tab\there"],
        ["new\nline"],
        ["caf\u00e9"],
        ["\x7f"],
        [b"binary"],
        ["one", "two"],
    ],
    ids=["empty", "too-long", "tab", "newline", "non-ascii", "del", "bytes", "twice"],
)
def test_bad_keys_are_400_on_the_header(values: list[str | bytes]) -> None:
    with pytest.raises(InvalidRequestError) as caught:
        parse_key([("idempotency-key", value) for value in values])
    error = caught.value
    assert (error.http_status, error.code, error.param) == (400, "invalid_value", "Idempotency-Key")


def test_the_header_name_is_matched_case_insensitively() -> None:
    assert parse_key([("Idempotency-Key", "k1")]) == "k1"


def test_fingerprint_is_sha256_of_the_canonical_json() -> None:
    request = images_pb2.GenerateImagesRequest(prompt="a fox", n=2, response_format="b64_json")
    canonical = '["imagegw.v1.ImageService.GenerateImages",{"n":2,"prompt":"a fox","response_format":"b64_json"}]'
    assert fingerprint(METHOD, request) == hashlib.sha256(canonical.encode()).hexdigest()


def test_fingerprint_ignores_how_the_request_was_built() -> None:
    first = images_pb2.GenerateImagesRequest(prompt="a fox", size="512x512", n=2)
    second = images_pb2.GenerateImagesRequest()
    second.n = 2
    second.size = "512x512"
    second.prompt = "a fox"
    parsed = images_pb2.GenerateImagesRequest.FromString(second.SerializeToString())
    assert fingerprint(METHOD, first) == fingerprint(METHOD, second) == fingerprint(METHOD, parsed)


@pytest.mark.parametrize(
    "changed",
    [
        {"response_format": "url"},
        {"prompt": "a fox."},
        {"n": 3},
        {"size": "256x256"},
        {"user": "someone"},
        {"output_compression": 100},
    ],
)
def test_any_field_change_changes_the_fingerprint(changed: dict[str, object]) -> None:
    base = {"prompt": "a fox", "n": 2, "size": "512x512", "response_format": "b64_json"}
    assert fingerprint(METHOD, images_pb2.GenerateImagesRequest(**base)) != fingerprint(  # type: ignore[arg-type]
        METHOD, images_pb2.GenerateImagesRequest(**{**base, **changed})  # type: ignore[arg-type]
    )


def test_an_explicit_default_is_a_different_body() -> None:
    # `"n": 1` and no `n` are different JSON bodies; the fingerprint is literal.
    assert fingerprint(METHOD, images_pb2.GenerateImagesRequest(prompt="p")) != fingerprint(
        METHOD, images_pb2.GenerateImagesRequest(prompt="p", n=1)
    )


def test_the_method_is_part_of_the_fingerprint() -> None:
    request = images_pb2.GenerateImagesRequest(prompt="p")
    assert fingerprint(METHOD, request) != fingerprint("imagegw.v1.ImageService.EditImages", request)


def test_unicode_prompts_hash_as_ascii_json() -> None:
    request = images_pb2.GenerateImagesRequest(prompt="größe ✓")
    canonical = json.dumps([METHOD, {"prompt": "größe ✓"}], separators=(",", ":"), ensure_ascii=True)
    assert fingerprint(METHOD, request) == hashlib.sha256(canonical.encode()).hexdigest()
