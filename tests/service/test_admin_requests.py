"""Request ids of operators' changes (AIP-155) on real databases: SQLite and PostgreSQL.

A change with a request id happens at most once: a repeat gets the first answer and
changes nothing, however it races the first (same process, another replica); a repeat
with another request is refused; a change that failed leaves nothing behind.
"""

from __future__ import annotations

import asyncio
from typing import Any

import pytest
from sqlalchemy import text
from sqlalchemy.ext.asyncio import AsyncEngine

from server.errors import IdempotencyKeyReusedError, InvalidRequestError, NotFoundError
from server.ledger import AccountView, Database, KeyView, Ledger, Once, Replayed, check_request_id
from server.ratelimit import AccountLimits, Limits, RateLimiter

SECRET = b"test-key-hash-secret"
USD = 1_000_000


def once(request_id: str, fingerprint: str = "body-1", method: str = "CreditAccount") -> Once[Any]:
    # The servicer stores the serialized response message; any bytes of the result do here.
    return Once(request_id=request_id, method=method, fingerprint=fingerprint, encode=lambda result: repr(result).encode())


@pytest.fixture
def ledger(database: Database) -> Ledger:
    return Ledger(database, key_hash_secret=SECRET, reservation_ttl_seconds=600)


async def scalar(engine: AsyncEngine, sql: str, **params: Any) -> Any:
    async with engine.connect() as conn:
        return (await conn.execute(text(sql), params)).scalar_one()


async def test_a_repeated_credit_replays_the_first_answer_and_credits_once(
    ledger: Ledger, ledger_engine: AsyncEngine
) -> None:
    account = await ledger.create_account("acme", USD)
    first = await ledger.credit(account.account_id, 2 * USD, once=once("r-1"))
    assert (first.balance_micros, first.credited_micros) == (3 * USD, 3 * USD)
    await ledger.credit(account.account_id, USD)  # moves the balance on, so a replay is visibly the first answer
    with pytest.raises(Replayed) as replay:
        await ledger.credit(account.account_id, 2 * USD, once=once("r-1"))
    assert replay.value.response == repr(first).encode()
    after = await ledger.get_account(account.account_id)
    assert (after.balance_micros, after.credited_micros) == (4 * USD, 4 * USD)
    assert await scalar(ledger_engine, "SELECT count(*) FROM ledger_entries WHERE kind = 'credit'") == 3
    assert await scalar(ledger_engine, "SELECT method FROM admin_requests WHERE request_id = 'r-1'") == "CreditAccount"
    assert (await ledger.reconcile()).ok


async def test_the_same_id_with_another_request_is_refused_and_changes_nothing(ledger: Ledger) -> None:
    account = await ledger.create_account("acme", USD)
    await ledger.credit(account.account_id, USD, once=once("r-1", "body-1"))
    with pytest.raises(IdempotencyKeyReusedError) as caught:
        await ledger.credit(account.account_id, USD, once=once("r-1", "body-2"))
    assert (caught.value.code, caught.value.param, caught.value.http_status) == ("request_id_reused", "request_id", 400)
    # Another method with the same id: its fingerprint differs (it hashes the request's type).
    with pytest.raises(IdempotencyKeyReusedError):
        await ledger.create_account("other", USD, once=once("r-1", "create-body", method="CreateAccount"))
    assert (await ledger.get_account(account.account_id)).balance_micros == 2 * USD


async def test_a_failed_change_leaves_no_record_so_its_retry_runs(ledger: Ledger, ledger_engine: AsyncEngine) -> None:
    with pytest.raises(NotFoundError):
        await ledger.credit("acct_nope", USD, once=once("r-1"))
    account = await ledger.create_account("acme", 0)
    with pytest.raises(InvalidRequestError):
        await ledger.credit(account.account_id, -5, once=once("r-1"))
    assert await scalar(ledger_engine, "SELECT count(*) FROM admin_requests") == 0
    assert (await ledger.credit(account.account_id, USD, once=once("r-1"))).balance_micros == USD


async def test_concurrent_repeats_on_two_replicas_credit_once(ledger: Ledger, database_url: str) -> None:
    replica_db = Database(database_url)
    try:
        replica = Ledger(replica_db, key_hash_secret=SECRET, reservation_ttl_seconds=600)
        account = await ledger.create_account("acme", 0)

        async def attempt(where: Ledger) -> AccountView | bytes:
            try:
                return await where.credit(account.account_id, USD, once=once("same"))
            except Replayed as replay:
                return replay.response

        outcomes = await asyncio.gather(*(attempt(ledger if i % 2 else replica) for i in range(12)))
        done = [o for o in outcomes if isinstance(o, AccountView)]
        assert len(done) == 1
        assert [o for o in outcomes if isinstance(o, bytes)] == [repr(done[0]).encode()] * 11
        assert (await ledger.get_account(account.account_id)).balance_micros == USD
        assert (await replica.reconcile()).ok
    finally:
        await replica_db.close()


async def test_create_account_key_and_revoke_are_done_once(ledger: Ledger, ledger_engine: AsyncEngine) -> None:
    account = await ledger.create_account("acme", USD, once=once("a", method="CreateAccount"))
    with pytest.raises(Replayed):
        await ledger.create_account("acme", USD, once=once("a", method="CreateAccount"))
    key, api_key = await ledger.create_key(account.account_id, "ci", once=once("k", method="CreateApiKey"))
    with pytest.raises(Replayed) as replay:
        await ledger.create_key(account.account_id, "ci", once=once("k", method="CreateApiKey"))
    # What a repeat gets is made from the key's public view alone: the key itself is never stored.
    assert replay.value.response == repr(key).encode() and api_key.encode() not in replay.value.response
    assert await scalar(ledger_engine, "SELECT count(*) FROM api_keys") == 1
    revoked = await ledger.revoke_key(key.key_id, once=once("v", method="RevokeApiKey"))
    with pytest.raises(Replayed) as replay:
        await ledger.revoke_key(key.key_id, once=once("v", method="RevokeApiKey"))
    assert isinstance(revoked, KeyView) and replay.value.response == repr(revoked).encode()
    assert await scalar(ledger_engine, "SELECT count(*) FROM accounts") == 1


async def test_set_rate_limits_is_done_once_and_never_a_read(database: Database) -> None:
    ledger = Ledger(database, key_hash_secret=SECRET, reservation_ttl_seconds=600)
    limiter = RateLimiter(database, defaults=Limits(requests_per_minute=600, images_per_minute=3000))
    account = await ledger.create_account("acme", 0)
    limits = await limiter.set_account_limits(account.account_id, requests_per_minute=5, once=once("l", method="SetRateLimits"))
    assert limits == AccountLimits(account.account_id, Limits(5, 3000), False, True)
    await limiter.set_account_limits(account.account_id, requests_per_minute=9)
    with pytest.raises(Replayed) as replay:
        await limiter.set_account_limits(account.account_id, requests_per_minute=5, once=once("l", method="SetRateLimits"))
    assert replay.value.response == repr(limits).encode()
    assert (await limiter.account_limits(account.account_id)).limits.requests_per_minute == 9
    with pytest.raises(InvalidRequestError) as caught:
        await limiter.set_account_limits(account.account_id)
    assert caught.value.code == "missing_required_parameter"


@pytest.mark.parametrize("request_id", ["", " ", "a b", "x" * 101, "naïve", "tab\there"])
def test_bad_request_ids_are_refused(request_id: str) -> None:
    with pytest.raises(InvalidRequestError) as caught:
        check_request_id(request_id)
    assert caught.value.param == "request_id"


def test_good_request_ids() -> None:
    for request_id in ("7f0c2a4e-8b1d-4c3e-9f2a-0b1c2d3e4f5a", "invoice-2025-0117", "x" * 100):
        assert check_request_id(request_id) == request_id
