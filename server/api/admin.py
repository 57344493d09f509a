"""AdminService: accounts, keys, money and rate limits for operators (gRPC only, admin token)."""

from __future__ import annotations

import grpc
from imagegw.v1 import admin_pb2, admin_pb2_grpc

from server.ledger import AccountView, KeyView, Ledger, format_usd, parse_usd
from server.ratelimit import AccountLimits, RateLimiter

__all__ = ["AdminServicer"]


class AdminServicer(admin_pb2_grpc.AdminServiceServicer):
    """Thin translation to the ledger and the rate limiter; every rule (names, amounts,
    limits) lives there."""

    def __init__(self, ledger: Ledger, limiter: RateLimiter) -> None:
        self._ledger = ledger
        self._limiter = limiter

    async def CreateAccount(  # noqa: N802 - gRPC method name
        self, request: admin_pb2.CreateAccountRequest, context: grpc.aio.ServicerContext
    ) -> admin_pb2.Account:
        balance = parse_usd(request.balance_usd, allow_zero=True) if request.balance_usd else 0
        return _account(await self._ledger.create_account(request.name, balance))

    async def CreditAccount(  # noqa: N802 - gRPC method name
        self, request: admin_pb2.CreditAccountRequest, context: grpc.aio.ServicerContext
    ) -> admin_pb2.Account:
        amount = parse_usd(request.amount_usd)
        return _account(await self._ledger.credit(request.account_id, amount))

    async def GetAccount(  # noqa: N802 - gRPC method name
        self, request: admin_pb2.GetAccountRequest, context: grpc.aio.ServicerContext
    ) -> admin_pb2.Account:
        return _account(await self._ledger.get_account(request.account_id))

    async def CreateKey(  # noqa: N802 - gRPC method name
        self, request: admin_pb2.CreateKeyRequest, context: grpc.aio.ServicerContext
    ) -> admin_pb2.CreateKeyResponse:
        key, api_key = await self._ledger.create_key(request.account_id, request.name)
        return admin_pb2.CreateKeyResponse(
            key_id=key.key_id, api_key=api_key, account_id=key.account_id, name=key.name, created=int(key.created)
        )

    async def RevokeKey(  # noqa: N802 - gRPC method name
        self, request: admin_pb2.RevokeKeyRequest, context: grpc.aio.ServicerContext
    ) -> admin_pb2.ApiKey:
        return _key(await self._ledger.revoke_key(request.key_id))

    async def ListUsage(  # noqa: N802 - gRPC method name
        self, request: admin_pb2.ListUsageRequest, context: grpc.aio.ServicerContext
    ) -> admin_pb2.ListUsageResponse:
        limit = request.limit or 100
        await self._ledger.get_account(request.account_id)  # 404 for an unknown account, not an empty list
        rows = await self._ledger.usage(request.account_id, limit=max(1, min(limit, 1000)))
        return admin_pb2.ListUsageResponse(
            data=[
                admin_pb2.UsageRecord(
                    created=int(row.created),
                    request_id=row.request_id,
                    model=row.model,
                    images_requested=row.images_requested,
                    images_delivered=row.images_delivered,
                    cost_usd=format_usd(row.cost_micros),
                    status=row.status,
                    error_code=row.error_code,
                )
                for row in rows
            ]
        )

    async def Reconcile(  # noqa: N802 - gRPC method name
        self, request: admin_pb2.ReconcileRequest, context: grpc.aio.ServicerContext
    ) -> admin_pb2.ReconcileResponse:
        report = await self._ledger.reconcile()
        return admin_pb2.ReconcileResponse(
            ok=report.ok, accounts_checked=report.accounts_checked, mismatches=list(report.mismatches)
        )

    async def SetRateLimits(  # noqa: N802 - gRPC method name
        self, request: admin_pb2.SetRateLimitsRequest, context: grpc.aio.ServicerContext
    ) -> admin_pb2.RateLimits:
        limits = await self._limiter.set_account_limits(
            request.account_id,
            requests_per_minute=request.requests_per_minute if request.HasField("requests_per_minute") else None,
            images_per_minute=request.images_per_minute if request.HasField("images_per_minute") else None,
            use_defaults=request.use_defaults,
        )
        return _rate_limits(limits)


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
        created=int(view.created),
    )


def _key(view: KeyView) -> admin_pb2.ApiKey:
    return admin_pb2.ApiKey(
        key_id=view.key_id,
        account_id=view.account_id,
        name=view.name,
        created=int(view.created),
        revoked=int(view.revoked or 0),
    )
