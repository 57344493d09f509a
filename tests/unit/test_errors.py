"""The error table: each class's wire row, pinned so a change shows up in review."""

from __future__ import annotations

import json

import grpc
import pytest

from server import errors
from server.api.interceptors import error_trailers

# (class, gRPC code, HTTP status, OpenAI type, default code, retry) — the README's table.
TABLE = [
    (errors.InvalidRequestError, grpc.StatusCode.INVALID_ARGUMENT, 400, "invalid_request_error", "invalid_value", False),
    (errors.ModelNotFoundError, grpc.StatusCode.INVALID_ARGUMENT, 400, "invalid_request_error", "model_not_found", False),
    (errors.ModelNotSupportedError, grpc.StatusCode.INVALID_ARGUMENT, 400, "invalid_request_error", "model_not_supported", False),
    (errors.ModelNotAvailableError, grpc.StatusCode.INVALID_ARGUMENT, 400, "invalid_request_error", "model_not_available", False),
    (errors.ContentPolicyError, grpc.StatusCode.INVALID_ARGUMENT, 400, "invalid_request_error", "content_policy_violation", False),
    (errors.IdempotencyKeyReusedError, grpc.StatusCode.FAILED_PRECONDITION, 400, "invalid_request_error", "idempotency_key_reused", False),
    (errors.AuthenticationError, grpc.StatusCode.UNAUTHENTICATED, 401, "invalid_request_error", "invalid_api_key", False),
    (errors.InsufficientBalanceError, grpc.StatusCode.FAILED_PRECONDITION, 402, "insufficient_quota", "insufficient_balance", False),
    (errors.PermissionDeniedError, grpc.StatusCode.PERMISSION_DENIED, 403, "invalid_request_error", "permission_denied", False),
    (errors.NotFoundError, grpc.StatusCode.NOT_FOUND, 404, "invalid_request_error", "not_found", False),
    (errors.ConflictError, grpc.StatusCode.ABORTED, 409, "invalid_request_error", "conflict", True),
    (errors.PayloadTooLargeError, grpc.StatusCode.RESOURCE_EXHAUSTED, 413, "invalid_request_error", "request_too_large", False),
    (errors.RateLimitError, grpc.StatusCode.RESOURCE_EXHAUSTED, 429, "requests", "rate_limit_exceeded", True),
    (errors.InternalError, grpc.StatusCode.INTERNAL, 500, "server_error", "internal_error", False),
    (errors.UpstreamError, grpc.StatusCode.UNAVAILABLE, 502, "server_error", "upstream_error", False),
    (errors.ServiceUnavailableError, grpc.StatusCode.UNAVAILABLE, 503, "server_error", "service_unavailable", True),
    (errors.DeadlineExceededError, grpc.StatusCode.DEADLINE_EXCEEDED, 504, "server_error", "timeout", False),
]


@pytest.mark.parametrize(("cls", "grpc_code", "http", "kind", "code", "retry"), TABLE)
def test_each_error_class_travels_as_its_row(
    cls: type[errors.ApiError], grpc_code: grpc.StatusCode, http: int, kind: str, code: str, retry: bool
) -> None:
    error = cls("something went wrong: größe ✓", param="size")
    status, message, trailers = error_trailers(error, "req-1")
    metadata = dict(trailers)
    assert status == grpc_code
    assert message == "something went wrong: größe ✓"
    assert metadata["x-http-status"] == str(http)
    assert metadata["x-should-retry"] == ("true" if retry else "false")
    assert metadata["x-request-id"] == "req-1"
    assert metadata["x-openai-error"].isascii()
    assert json.loads(metadata["x-openai-error"]) == {
        "error": {"message": "something went wrong: größe ✓", "type": kind, "param": "size", "code": code}
    }
    assert "grpc-status-details-bin" in metadata


def test_every_public_error_class_is_in_the_table() -> None:
    listed = {row[0] for row in TABLE}
    public = {getattr(errors, name) for name in errors.__all__} - {errors.ApiError}
    assert public == listed


def test_retryability_and_retry_after_can_be_set_per_case() -> None:
    error = errors.UpstreamError("provider returned 503", retryable=True, retry_after=2.4)
    metadata = dict(error_trailers(error, "r")[2])
    assert (metadata["x-should-retry"], metadata["retry-after"]) == ("true", "2")
