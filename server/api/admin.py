"""AdminService: accounts, keys, money and rate limits for operators (gRPC only, admin token).

The wire rules of Google's API guidelines live here; the business rules (names, amounts,
limits) live in the ledger and the rate limiter:

* fields marked ``(google.api.field_behavior) = REQUIRED`` in admin.proto are checked
  from the descriptor, before anything else: an empty one is a 400
  ``missing_required_parameter`` naming it;
* a ``request_id`` (AIP-155) becomes a :class:`~server.ledger.Once` whose stored response
  is the serialized response message, so a repeat answers exactly the first answer
  (:mod:`server.ledger.requests`);
* ``ListUsage`` pages with an opaque ``page_token`` (AIP-158): base64url of the account
  and the row id the next page starts below, refused when used with another account.
"""

from __future__ import annotations

import base64
import binascii
import json
from collections.abc import Awaitable, Callable
from typing import Any, TypeVar

import grpc
from google.api import field_behavior_pb2
from google.protobuf.message import Message
from google.protobuf.timestamp_pb2 import Timestamp
from imagegw.v1 import admin_pb2, admin_pb2_grpc

from server.errors import InvalidRequestError
from server.idempotency import fingerprint
from server.ledger import (
    AccountView,
    KeyView,
    Ledger,
    Once,
    Replayed,
    check_request_id,
    format_usd,
    parse_usd,
)
from server.ratelimit import AccountLimits, RateLimiter

__all__ = ["AdminServicer"]

R = TypeVar("R", bound=Message)
V = TypeVar("V")

DEFAULT_PAGE_SIZE = 100
MAX_PAGE_SIZE = 1000
_STATUS = {"succeeded": admin_pb2.UsageRecord.STATUS_SUCCEEDED, "failed": admin_pb2.UsageRecord.STATUS_FAILED}


class AdminServicer(admin_pb2_grpc.AdminServiceServicer):
    """Thin translation to the ledger and the rate limiter (see the module docstring)."""

    def __init__(self, ledger: Ledger, limiter: RateLimiter) -> None:
        self._ledger = ledger
        self._limiter = limiter

    async def CreateAccount(  # noqa: N802 - gRPC method name
        self, request: admin_pb2.CreateAccountRequest, context: grpc.aio.ServicerContext
    ) -> admin_pb2.CreateAccountResponse:
        _require(request)
        balance = parse_usd(request.balance_usd, allow_zero=True, param="balance_usd") if request.balance_usd else 0

        def respond(view: AccountView) -> admin_pb2.CreateAccountResponse:
            return admin_pb2.CreateAccountResponse(account=_account(view))

        return await _once(
            request, admin_pb2.CreateAccountResponse, respond,
            lambda once: self._ledger.create_account(request.name, balance, once=once),
        )

    async def CreditAccount(  # noqa: N802 - gRPC method name
        self, request: admin_pb2.CreditAccountRequest, context: grpc.aio.ServicerContext
    ) -> admin_pb2.CreditAccountResponse:
        _require(request)
        amount = parse_usd(request.amount_usd, param="amount_usd")

        def respond(view: AccountView) -> admin_pb2.CreditAccountResponse:
            return admin_pb2.CreditAccountResponse(account=_account(view))

        return await _once(
            request, admin_pb2.CreditAccountResponse, respond,
            lambda once: self._ledger.credit(request.account_id, amount, once=once),
        )

    async def GetAccount(  # noqa: N802 - gRPC method name
        self, request: admin_pb2.GetAccountRequest, context: grpc.aio.ServicerContext
    ) -> admin_pb2.GetAccountResponse:
        _require(request)
        return admin_pb2.GetAccountResponse(account=_account(await self._ledger.get_account(request.account_id)))

    async def CreateApiKey(  # noqa: N802 - gRPC method name
        self, request: admin_pb2.CreateApiKeyRequest, context: grpc.aio.ServicerContext
    ) -> admin_pb2.CreateApiKeyResponse:
        _require(request)
        key_string = ""

        # What a repeat gets: the key without its string, which is never stored.
        def respond(view: KeyView) -> admin_pb2.CreateApiKeyResponse:
            return admin_pb2.CreateApiKeyResponse(api_key=_key(view))

        async def create(once: Once[KeyView] | None) -> KeyView:
            nonlocal key_string
            view, key_string = await self._ledger.create_key(request.account_id, request.name, once=once)
            return view

        response = await _once(request, admin_pb2.CreateApiKeyResponse, respond, create)
        response.key_string = key_string
        return response

    async def RevokeApiKey(  # noqa: N802 - gRPC method name
        self, request: admin_pb2.RevokeApiKeyRequest, context: grpc.aio.ServicerContext
    ) -> admin_pb2.RevokeApiKeyResponse:
        _require(request)

        def respond(view: KeyView) -> admin_pb2.RevokeApiKeyResponse:
            return admin_pb2.RevokeApiKeyResponse(api_key=_key(view))

        return await _once(
            request, admin_pb2.RevokeApiKeyResponse, respond,
            lambda once: self._ledger.revoke_key(request.key_id, once=once),
        )

    async def ListUsage(  # noqa: N802 - gRPC method name
        self, request: admin_pb2.ListUsageRequest, context: grpc.aio.ServicerContext
    ) -> admin_pb2.ListUsageResponse:
        _require(request)
        if request.page_size < 0:
            raise InvalidRequestError("The page_size must not be negative.", param="page_size")
        page_size = min(request.page_size or DEFAULT_PAGE_SIZE, MAX_PAGE_SIZE)
        before_id = _decode_page_token(request.page_token, request.account_id) if request.page_token else None
        page = await self._ledger.usage(request.account_id, page_size=page_size, before_id=before_id)
        return admin_pb2.ListUsageResponse(
            usage_records=[
                admin_pb2.UsageRecord(
                    create_time=_time(row.created),
                    request_id=row.request_id,
                    model=row.model,
                    images_requested=row.images_requested,
                    images_delivered=row.images_delivered,
                    cost_usd=format_usd(row.cost_micros),
                    status=_STATUS[row.status],
                    error_code=row.error_code,
                )
                for row in page.records
            ],
            next_page_token=(
                "" if page.next_before_id is None else _encode_page_token(request.account_id, page.next_before_id)
            ),
        )

    async def Reconcile(  # noqa: N802 - gRPC method name
        self, request: admin_pb2.ReconcileRequest, context: grpc.aio.ServicerContext
    ) -> admin_pb2.ReconcileResponse:
        report = await self._ledger.reconcile()
        return admin_pb2.ReconcileResponse(
            ok=report.ok, accounts_checked=report.accounts_checked, mismatches=list(report.mismatches)
        )

    async def GetRateLimits(  # noqa: N802 - gRPC method name
        self, request: admin_pb2.GetRateLimitsRequest, context: grpc.aio.ServicerContext
    ) -> admin_pb2.GetRateLimitsResponse:
        _require(request)
        return admin_pb2.GetRateLimitsResponse(
            rate_limits=_rate_limits(await self._limiter.account_limits(request.account_id))
        )

    async def SetRateLimits(  # noqa: N802 - gRPC method name
        self, request: admin_pb2.SetRateLimitsRequest, context: grpc.aio.ServicerContext
    ) -> admin_pb2.SetRateLimitsResponse:
        _require(request)

        def respond(view: AccountLimits) -> admin_pb2.SetRateLimitsResponse:
            return admin_pb2.SetRateLimitsResponse(rate_limits=_rate_limits(view))

        return await _once(
            request, admin_pb2.SetRateLimitsResponse, respond,
            lambda once: self._limiter.set_account_limits(
                request.account_id,
                requests_per_minute=request.requests_per_minute if request.HasField("requests_per_minute") else None,
                images_per_minute=request.images_per_minute if request.HasField("images_per_minute") else None,
                use_defaults=request.use_defaults,
                once=once,
            ),
        )


async def _once(
    request: Any,
    response_type: type[R],
    respond: Callable[[V], R],
    change: Callable[[Once[V] | None], Awaitable[V]],
) -> R:
    """Runs ``change`` at most once per ``request.request_id`` (none: no deduplication)
    and answers ``respond(result)``; a repeat answers the first call's stored response."""
    if not request.request_id:
        return respond(await change(None))
    once: Once[V] = Once(
        request_id=check_request_id(request.request_id),
        method=request.DESCRIPTOR.name.removesuffix("Request"),
        # Each RPC has its own request message (buf's RPC_REQUEST_RESPONSE_UNIQUE), so the
        # message's name stands for the method.
        fingerprint=fingerprint(request.DESCRIPTOR.full_name, request),
        encode=lambda result: respond(result).SerializeToString(),
    )
    try:
        return respond(await change(once))
    except Replayed as replay:
        return response_type.FromString(replay.response)


# The REQUIRED fields of each request message, read once from admin.proto's annotations.
_REQUIRED: dict[str, tuple[str, ...]] = {
    message.full_name: tuple(
        field.name
        for field in message.fields
        if field_behavior_pb2.REQUIRED in field.GetOptions().Extensions[field_behavior_pb2.field_behavior]
    )
    for message in admin_pb2.DESCRIPTOR.message_types_by_name.values()
}


def _require(request: Message) -> None:
    """Refuses a request whose REQUIRED field (admin.proto) is empty, naming it."""
    for name in _REQUIRED.get(request.DESCRIPTOR.full_name, ()):
        value = getattr(request, name)
        if value == "" or (isinstance(value, str) and not value.strip()):
            raise InvalidRequestError(
                f"Missing required parameter: '{name}'.", param=name, code="missing_required_parameter"
            )


def _encode_page_token(account_id: str, before_id: int) -> str:
    raw = json.dumps({"account_id": account_id, "before_id": before_id}, separators=(",", ":")).encode()
    return base64.urlsafe_b64encode(raw).decode().rstrip("=")


def _decode_page_token(token: str, account_id: str) -> int:
    invalid = InvalidRequestError(
        "The page_token is not valid for this request: pass the next_page_token of the previous page, "
        "with the same account_id.",
        param="page_token",
    )
    try:
        fields = json.loads(base64.urlsafe_b64decode(token + "=" * (-len(token) % 4)))
    except (binascii.Error, ValueError):
        raise invalid from None
    if not isinstance(fields, dict) or fields.get("account_id") != account_id:
        raise invalid
    before_id = fields.get("before_id")
    if not isinstance(before_id, int) or isinstance(before_id, bool):
        raise invalid
    return before_id


def _time(seconds: int | None) -> Timestamp | None:
    return None if seconds is None else Timestamp(seconds=seconds)


def _rate_limits(view: AccountLimits) -> admin_pb2.RateLimits:
    return admin_pb2.RateLimits(
        account_id=view.account_id,
        requests_per_minute=view.limits.requests_per_minute,
        images_per_minute=view.limits.images_per_minute,
        requests_per_minute_is_default=view.requests_is_default,
        images_per_minute_is_default=view.images_is_default,
    )


def _account(view: AccountView) -> admin_pb2.Account:
    return admin_pb2.Account(
        account_id=view.account_id,
        name=view.name,
        balance_usd=format_usd(view.balance_micros),
        reserved_usd=format_usd(view.reserved_micros),
        spent_usd=format_usd(view.spent_micros),
        credited_usd=format_usd(view.credited_micros),
        create_time=_time(view.created),
    )


def _key(view: KeyView) -> admin_pb2.ApiKey:
    return admin_pb2.ApiKey(
        key_id=view.key_id,
        account_id=view.account_id,
        name=view.name,
        create_time=_time(view.created),
        revoke_time=_time(view.revoked),
    )
