"""Every error a caller can observe, and the one table that says how it travels.

Domain code only ``raise``s these; the error interceptor (``server.api.interceptors``)
is the single place that turns them into a gRPC status with ``google.rpc.ErrorInfo``
details plus the ``x-http-status``, ``x-openai-error`` and ``x-should-retry`` trailing
metadata that Envoy's Lua filter turns into the HTTP status and OpenAI error body.
The HTTP status is chosen here, not by Envoy's gRPC->HTTP table, because 402 and 502
have no gRPC code.

    ApiError                          gRPC                HTTP  type                    code (default)          retry
    ├── InvalidRequestError           INVALID_ARGUMENT    400   invalid_request_error   invalid_value           no
    │   ├── ModelNotFoundError        INVALID_ARGUMENT    400   invalid_request_error   model_not_found         no
    │   ├── ModelNotSupportedError    INVALID_ARGUMENT    400   invalid_request_error   model_not_supported     no
    │   ├── ModelNotAvailableError    INVALID_ARGUMENT    400   invalid_request_error   model_not_available     no
    │   ├── ContentPolicyError        INVALID_ARGUMENT    400   invalid_request_error   content_policy_violation no
    │   └── IdempotencyKeyReusedError FAILED_PRECONDITION 400   invalid_request_error   idempotency_key_reused  no
    ├── AuthenticationError           UNAUTHENTICATED     401   invalid_request_error   invalid_api_key         no
    ├── InsufficientBalanceError      FAILED_PRECONDITION 402   insufficient_quota      insufficient_balance    no
    ├── PermissionDeniedError         PERMISSION_DENIED   403   invalid_request_error   permission_denied       no
    ├── NotFoundError                 NOT_FOUND           404   invalid_request_error   not_found               no
    ├── ConflictError                 ABORTED             409   invalid_request_error   conflict                yes
    ├── RateLimitError                RESOURCE_EXHAUSTED  429   requests                rate_limit_exceeded     yes
    ├── InternalError                 INTERNAL            500   server_error            internal_error          no
    ├── UpstreamError                 UNAVAILABLE         502   server_error            upstream_error          per case
    ├── ServiceUnavailableError       UNAVAILABLE         503   server_error            service_unavailable     yes
    └── DeadlineExceededError         DEADLINE_EXCEEDED   504   server_error            timeout                 no

Anything that is not an ApiError is a bug: the interceptor logs it with the request id
and answers InternalError's row with a generic message.
"""

from __future__ import annotations

import json
from typing import ClassVar

import grpc

__all__ = [
    "ApiError",
    "AuthenticationError",
    "ConflictError",
    "ContentPolicyError",
    "DeadlineExceededError",
    "IdempotencyKeyReusedError",
    "InsufficientBalanceError",
    "InternalError",
    "InvalidRequestError",
    "ModelNotAvailableError",
    "ModelNotFoundError",
    "ModelNotSupportedError",
    "NotFoundError",
    "PayloadTooLargeError",
    "PermissionDeniedError",
    "RateLimitError",
    "ServiceUnavailableError",
    "UpstreamError",
]

ERROR_DOMAIN = "imagegw"


class ApiError(Exception):
    """Base for every error a caller can observe; subclasses fill in the table row."""

    grpc_code: ClassVar[grpc.StatusCode] = grpc.StatusCode.INTERNAL
    http_status: ClassVar[int] = 500
    openai_type: ClassVar[str] = "server_error"
    default_code: ClassVar[str] = "internal_error"
    retryable: ClassVar[bool] = False

    def __init__(
        self,
        message: str,
        *,
        param: str | None = None,
        code: str | None = None,
        retryable: bool | None = None,
        retry_after: float | None = None,
        headers: dict[str, str] | None = None,
    ) -> None:
        super().__init__(message)
        self.message = message
        self.param = param
        self.code = code or self.default_code
        # Some rows decide retryability per case (an upstream 5xx is, a malformed answer is not).
        self.should_retry = type(self).retryable if retryable is None else retryable
        self.retry_after = retry_after
        # Extra response headers (for example x-ratelimit-*), sent as trailing metadata.
        self.headers = dict(headers or {})

    @property
    def reason(self) -> str:
        """The google.rpc.ErrorInfo reason: the OpenAI code in UPPER_SNAKE_CASE."""
        return self.code.upper()

    def openai_body(self) -> dict[str, dict[str, str | None]]:
        """OpenAI's error envelope; all four keys are always present."""
        return {
            "error": {
                "message": self.message,
                "type": self.openai_type,
                "param": self.param,
                "code": self.code,
            }
        }

    def openai_json(self) -> str:
        """The envelope as compact ASCII JSON (gRPC metadata values must be ASCII)."""
        return json.dumps(self.openai_body(), ensure_ascii=True, separators=(",", ":"))


class InvalidRequestError(ApiError):
    """The request is malformed or asks for something the model cannot do."""

    grpc_code = grpc.StatusCode.INVALID_ARGUMENT
    http_status = 400
    openai_type = "invalid_request_error"
    default_code = "invalid_value"


class ModelNotFoundError(InvalidRequestError):
    """No model with that id exists in the catalog."""

    default_code = "model_not_found"


class ModelNotSupportedError(InvalidRequestError):
    """The model exists but cannot make images (for example a chat model)."""

    default_code = "model_not_supported"


class ModelNotAvailableError(InvalidRequestError):
    """The model is in the catalog but its provider is not enabled on this server."""

    default_code = "model_not_available"


class ContentPolicyError(InvalidRequestError):
    """The provider's safety system refused the prompt or every image."""

    default_code = "content_policy_violation"


class IdempotencyKeyReusedError(InvalidRequestError):
    """An Idempotency-Key was reused with a different request body."""

    grpc_code = grpc.StatusCode.FAILED_PRECONDITION
    default_code = "idempotency_key_reused"


class AuthenticationError(ApiError):
    """No API key, or one that is malformed, unknown or revoked."""

    grpc_code = grpc.StatusCode.UNAUTHENTICATED
    http_status = 401
    openai_type = "invalid_request_error"
    default_code = "invalid_api_key"


class InsufficientBalanceError(ApiError):
    """The prepaid balance cannot cover the request; nothing was charged."""

    grpc_code = grpc.StatusCode.FAILED_PRECONDITION
    http_status = 402
    openai_type = "insufficient_quota"
    default_code = "insufficient_balance"


class PayloadTooLargeError(ApiError):
    """An upload or a part of it is over one of the server's limits."""

    grpc_code = grpc.StatusCode.RESOURCE_EXHAUSTED
    http_status = 413
    openai_type = "invalid_request_error"
    default_code = "request_too_large"


class PermissionDeniedError(ApiError):
    """The caller may not do this (for example a tampered or expired image URL)."""

    grpc_code = grpc.StatusCode.PERMISSION_DENIED
    http_status = 403
    openai_type = "invalid_request_error"
    default_code = "permission_denied"


class NotFoundError(ApiError):
    """The addressed thing does not exist."""

    grpc_code = grpc.StatusCode.NOT_FOUND
    http_status = 404
    openai_type = "invalid_request_error"
    default_code = "not_found"


class ConflictError(ApiError):
    """The same idempotent request is still running; retry later."""

    grpc_code = grpc.StatusCode.ABORTED
    http_status = 409
    openai_type = "invalid_request_error"
    default_code = "conflict"
    retryable = True


class RateLimitError(ApiError):
    """Too many requests or images per minute for this key."""

    grpc_code = grpc.StatusCode.RESOURCE_EXHAUSTED
    http_status = 429
    openai_type = "requests"
    default_code = "rate_limit_exceeded"
    retryable = True


class InternalError(ApiError):
    """A bug or an unexpected failure inside the gateway."""


class UpstreamError(ApiError):
    """The upstream provider failed or answered something unusable."""

    grpc_code = grpc.StatusCode.UNAVAILABLE
    http_status = 502
    default_code = "upstream_error"


class ServiceUnavailableError(ApiError):
    """The gateway cannot take the request now (for example it is shutting down)."""

    grpc_code = grpc.StatusCode.UNAVAILABLE
    http_status = 503
    default_code = "service_unavailable"
    retryable = True

    @classmethod
    def shutting_down(cls) -> ServiceUnavailableError:
        """What a request still running past the shutdown's grace period gets."""
        return cls("The server is shutting down; retry the request.", code="shutting_down")


class DeadlineExceededError(ApiError):
    """The request's deadline ran out before the images were ready."""

    grpc_code = grpc.StatusCode.DEADLINE_EXCEEDED
    http_status = 504
    default_code = "timeout"
