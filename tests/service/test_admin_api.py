"""AdminService over a real gRPC channel: Google's API guidelines on the wire.

Required fields (from admin.proto's field_behavior annotations), request ids (AIP-155),
Timestamps, the usage status enum, page tokens (AIP-158), GetRateLimits.
"""

from __future__ import annotations

import json
import uuid

import grpc
import pytest
from google.protobuf.message import Message
from imagegw.v1 import admin_pb2, images_pb2

from tests.stack import InProcessStack


def openai_error(exc: grpc.aio.AioRpcError) -> dict[str, object]:
    error: dict[str, object] = json.loads(dict(exc.trailing_metadata())["x-openai-error"])["error"]
    return error


async def refused(call: object) -> tuple[grpc.StatusCode, dict[str, object]]:
    with pytest.raises(grpc.aio.AioRpcError) as caught:
        await call  # type: ignore[misc]
    return caught.value.code(), openai_error(caught.value)


@pytest.mark.parametrize(
    ("method", "request_message", "param"),
    [
        ("CreateAccount", admin_pb2.CreateAccountRequest(balance_usd="1"), "name"),
        ("CreditAccount", admin_pb2.CreditAccountRequest(amount_usd="1"), "account_id"),
        ("CreditAccount", admin_pb2.CreditAccountRequest(account_id="acct_x"), "amount_usd"),
        ("GetAccount", admin_pb2.GetAccountRequest(), "account_id"),
        ("CreateApiKey", admin_pb2.CreateApiKeyRequest(name="ci"), "account_id"),
        ("RevokeApiKey", admin_pb2.RevokeApiKeyRequest(), "key_id"),
        ("ListUsage", admin_pb2.ListUsageRequest(page_size=5), "account_id"),
        ("GetRateLimits", admin_pb2.GetRateLimitsRequest(), "account_id"),
        ("SetRateLimits", admin_pb2.SetRateLimitsRequest(requests_per_minute=1), "account_id"),
    ],
)
async def test_required_fields_are_named_when_missing(
    service: InProcessStack, method: str, request_message: Message, param: str
) -> None:
    code, error = await refused(getattr(service.admin.stub, method)(request_message, metadata=service.admin.auth))
    assert code == grpc.StatusCode.INVALID_ARGUMENT
    assert error == {
        "message": f"Missing required parameter: '{param}'.",
        "type": "invalid_request_error",
        "param": param,
        "code": "missing_required_parameter",
    }


async def test_a_repeated_request_id_answers_the_first_response_byte_for_byte(service: InProcessStack) -> None:
    account_id = await service.admin.account("1.00")
    credit = admin_pb2.CreditAccountRequest(account_id=account_id, amount_usd="2.50", request_id=str(uuid.uuid4()))
    first = await service.admin.stub.CreditAccount(credit, metadata=service.admin.auth)
    assert (first.account.balance_usd, first.account.credited_usd) == ("3.500000", "3.500000")
    await service.admin.stub.CreditAccount(
        admin_pb2.CreditAccountRequest(account_id=account_id, amount_usd="1"), metadata=service.admin.auth
    )
    again = await service.admin.stub.CreditAccount(credit, metadata=service.admin.auth)
    assert again.SerializeToString() == first.SerializeToString()
    assert (await service.admin.get(account_id)).balance_usd == "4.500000"
    other = admin_pb2.CreditAccountRequest(account_id=account_id, amount_usd="2.51", request_id=credit.request_id)
    code, error = await refused(service.admin.stub.CreditAccount(other, metadata=service.admin.auth))
    assert (code, error["code"], error["param"], error["type"]) == (
        grpc.StatusCode.FAILED_PRECONDITION, "request_id_reused", "request_id", "invalid_request_error"
    )
    bad = admin_pb2.CreditAccountRequest(account_id=account_id, amount_usd="1", request_id="with space")
    code, error = await refused(service.admin.stub.CreditAccount(bad, metadata=service.admin.auth))
    assert (code, error["param"]) == (grpc.StatusCode.INVALID_ARGUMENT, "request_id")
    assert (await service.admin.get(account_id)).balance_usd == "4.500000"
    assert (await service.admin.reconcile()).ok


async def test_a_repeated_key_creation_returns_the_key_without_its_string(service: InProcessStack) -> None:
    account_id = await service.admin.account("1.00")
    request = admin_pb2.CreateApiKeyRequest(account_id=account_id, name="ci", request_id="key-ci-1")
    first = await service.admin.stub.CreateApiKey(request, metadata=service.admin.auth)
    again = await service.admin.stub.CreateApiKey(request, metadata=service.admin.auth)
    assert first.key_string.startswith("sk-igw-") and again.key_string == ""
    assert again.api_key == first.api_key
    assert not first.api_key.HasField("revoke_time")
    revoke = admin_pb2.RevokeApiKeyRequest(key_id=first.api_key.key_id, request_id="revoke-ci-1")
    revoked = await service.admin.stub.RevokeApiKey(revoke, metadata=service.admin.auth)
    assert revoked.api_key.revoke_time.seconds >= first.api_key.create_time.seconds > 1_700_000_000
    assert (await service.admin.stub.RevokeApiKey(revoke, metadata=service.admin.auth)) == revoked


async def test_times_are_timestamps_and_status_is_an_enum(service: InProcessStack) -> None:
    account_id, key = await service.admin.funded_key("1.00")
    account = await service.admin.get(account_id)
    assert account.create_time.seconds > 1_700_000_000 and account.create_time.nanos == 0
    await service.images.GenerateImages(
        images_pb2.GenerateImagesRequest(prompt="p", size="256x256", n=2),
        metadata=(("authorization", f"Bearer {key}"),),
    )
    [record] = await service.admin.usage(account_id)  # a failed one: tests/service/test_grpc_api.py
    assert (record.status, record.cost_usd) == (admin_pb2.UsageRecord.STATUS_SUCCEEDED, "0.002000")
    assert record.create_time.seconds >= account.create_time.seconds


async def test_usage_pages_in_a_stable_order_with_opaque_tokens(service: InProcessStack) -> None:
    account_id, key = await service.admin.funded_key("1.00")
    other_id = await service.admin.account("1.00")
    for i in range(5):
        await service.images.GenerateImages(
            images_pb2.GenerateImagesRequest(prompt="p", size="256x256"),
            metadata=(("authorization", f"Bearer {key}"), ("x-request-id", f"page-{i}")),
        )
    stub, auth = service.admin.stub, service.admin.auth
    seen: list[str] = []
    request = admin_pb2.ListUsageRequest(account_id=account_id, page_size=2)
    tokens = []
    while True:
        page = await stub.ListUsage(request, metadata=auth)
        seen += [r.request_id for r in page.usage_records]
        if not page.next_page_token:
            break
        tokens.append(page.next_page_token)
        request.page_token = page.next_page_token
    assert seen == [f"page-{i}" for i in reversed(range(5))]
    assert len(tokens) == 2
    for token, account in (("not-a-token", account_id), ("e30", account_id), (tokens[0], other_id)):
        code, error = await refused(
            stub.ListUsage(admin_pb2.ListUsageRequest(account_id=account, page_token=token), metadata=auth)
        )
        assert (code, error["param"]) == (grpc.StatusCode.INVALID_ARGUMENT, "page_token")
    code, error = await refused(
        stub.ListUsage(admin_pb2.ListUsageRequest(account_id=account_id, page_size=-1), metadata=auth)
    )
    assert (code, error["param"]) == (grpc.StatusCode.INVALID_ARGUMENT, "page_size")
    # Larger than 1000 is read as 1000 (AIP-158), not refused.
    whole = await stub.ListUsage(admin_pb2.ListUsageRequest(account_id=account_id, page_size=5000), metadata=auth)
    assert (len(whole.usage_records), whole.next_page_token) == (5, "")


async def test_get_rate_limits_reads_and_set_rate_limits_needs_a_change(service: InProcessStack) -> None:
    account_id = await service.admin.account("1.00")
    shown = await service.admin.limits(account_id)
    assert (shown.requests_per_minute, shown.requests_per_minute_is_default) == (600, True)
    code, error = await refused(
        service.admin.stub.SetRateLimits(admin_pb2.SetRateLimitsRequest(account_id=account_id), metadata=service.admin.auth)
    )
    assert (code, error["code"]) == (grpc.StatusCode.INVALID_ARGUMENT, "missing_required_parameter")
    assert (await service.admin.set_limits(account_id, images_per_minute=7)).images_per_minute == 7
    assert (await service.admin.limits(account_id)).images_per_minute_is_default is False
