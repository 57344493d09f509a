"""The rate limiter on real databases (SQLite and PostgreSQL): exact counts under
concurrency, across "replicas" (separate engines on one database), windows, overrides.

Nothing of ours is mocked; the clock is injected through the constructor.
"""

from __future__ import annotations

import asyncio
import secrets
from collections.abc import Awaitable, Sequence

import pytest
from sqlalchemy import select
from sqlalchemy.ext.asyncio import AsyncEngine

from server.errors import InvalidRequestError, NotFoundError, RateLimitError
from server.ledger import Ledger, Principal
from server.ledger.db import Database
from server.ledger.schema import rate_limit_counters
from server.ratelimit import Limits, Quota, RateLimiter
from tests.service.test_ledger import SECRET, TTL, ManualClock

# 20 s into a window: 40 s until it ends.
T0 = 1_700_000_000
DEFAULTS = Limits(requests_per_minute=600, images_per_minute=3000)


@pytest.fixture
def clock() -> ManualClock:
    return ManualClock(T0)


@pytest.fixture
def ledger(database: Database, clock: ManualClock) -> Ledger:
    return Ledger(database, key_hash_secret=SECRET, reservation_ttl_seconds=TTL, clock=clock)


@pytest.fixture
def limiter(database: Database, clock: ManualClock) -> RateLimiter:
    return RateLimiter(database, defaults=DEFAULTS, clock=clock)


async def principal(ledger: Ledger) -> Principal:
    account = await ledger.create_account(f"acct-{secrets.token_hex(6)}", 0)
    key, _ = await ledger.create_key(account.account_id)
    return Principal(account.account_id, key.key_id)


async def outcomes(calls: Sequence[Awaitable[Quota | None]]) -> tuple[list[Quota], list[RateLimitError]]:
    results = await asyncio.wait_for(asyncio.gather(*calls, return_exceptions=True), 60)
    admitted = [r for r in results if isinstance(r, Quota)]
    refused = [r for r in results if isinstance(r, RateLimitError)]
    assert len(admitted) + len(refused) == len(results), results
    return admitted, refused


async def test_exactly_the_limit_is_admitted_out_of_concurrent_requests(ledger: Ledger, limiter: RateLimiter) -> None:
    who = await principal(ledger)
    await limiter.set_account_limits(who.account_id, requests_per_minute=5)
    admitted, refused = await outcomes([asyncio.ensure_future(limiter.acquire(who, images=1)) for _ in range(12)])
    assert (len(admitted), len(refused)) == (5, 7)
    assert sorted(q.requests_used for q in admitted) == [1, 2, 3, 4, 5]
    for error in refused:
        assert (error.http_status, error.openai_type, error.code, error.should_retry) == (
            429, "requests", "rate_limit_exceeded", True
        )
        assert error.retry_after == 40
        assert error.headers["x-ratelimit-remaining-requests"] == "0"
        assert error.message == (
            f"Rate limit reached for requests per minute (RPM) on API key {who.key_id}: "
            "Limit 5, Used 5, Requested 1. Please try again in 40s."
        )


async def test_replicas_sharing_the_database_share_the_limit(
    database_url: str, ledger: Ledger, database: Database, clock: ManualClock
) -> None:
    who = await principal(ledger)
    other_db = Database(database_url)
    try:
        replicas = [RateLimiter(db, defaults=DEFAULTS, clock=clock) for db in (database, other_db)]
        await replicas[0].set_account_limits(who.account_id, requests_per_minute=7)
        calls = [asyncio.ensure_future(replicas[i % 2].acquire(who, images=1)) for i in range(30)]
        admitted, refused = await outcomes(calls)
    finally:
        await other_db.close()
    assert (len(admitted), len(refused)) == (7, 23)


async def test_images_per_minute_counts_n(ledger: Ledger, limiter: RateLimiter) -> None:
    who = await principal(ledger)
    await limiter.set_account_limits(who.account_id, images_per_minute=10)
    first = await limiter.acquire(who, images=4)
    second = await limiter.acquire(who, images=4)
    assert (first, second) == (
        Quota(Limits(600, 10), requests_used=1, images_used=4, reset_seconds=40),
        Quota(Limits(600, 10), requests_used=2, images_used=8, reset_seconds=40),
    )
    with pytest.raises(RateLimitError) as caught:
        await limiter.acquire(who, images=4)
    assert caught.value.message == (
        f"Rate limit reached for images per minute (IPM) on API key {who.key_id}: "
        "Limit 10, Used 8, Requested 4. Please try again in 40s."
    )
    assert caught.value.headers == {
        "x-ratelimit-limit-requests": "600",
        "x-ratelimit-remaining-requests": "598",
        "x-ratelimit-reset-requests": "40s",
        "x-ratelimit-limit-images": "10",
        "x-ratelimit-remaining-images": "2",
        "x-ratelimit-reset-images": "40s",
    }
    # The refused request counted nothing: two images still fit.
    assert await limiter.acquire(who, images=2) == Quota(Limits(600, 10), 3, 10, 40)


async def test_a_request_larger_than_the_images_limit_is_refused_for_good(ledger: Ledger, limiter: RateLimiter) -> None:
    who = await principal(ledger)
    await limiter.set_account_limits(who.account_id, images_per_minute=3)
    with pytest.raises(RateLimitError) as caught:
        await limiter.acquire(who, images=4)
    error = caught.value
    assert (error.http_status, error.should_retry, error.retry_after) == (429, False, None)
    assert "Limit 3, Requested 4" in error.message
    assert await limiter.acquire(who, images=3) == Quota(Limits(600, 3), 1, 3, 40)


async def test_a_new_window_starts_afresh(ledger: Ledger, limiter: RateLimiter, clock: ManualClock) -> None:
    who = await principal(ledger)
    await limiter.set_account_limits(who.account_id, requests_per_minute=2)
    await limiter.acquire(who, images=1)
    await limiter.acquire(who, images=1)
    clock.advance(39.5)  # 0.5 s left
    with pytest.raises(RateLimitError) as caught:
        await limiter.acquire(who, images=1)
    assert caught.value.retry_after == 1 and caught.value.headers["x-ratelimit-reset-requests"] == "1s"
    clock.advance(0.5)  # the next window
    assert await limiter.acquire(who, images=1) == Quota(Limits(2, 3000), 1, 1, 60)


async def test_a_lagging_replica_counts_into_the_newer_window(
    ledger: Ledger, database: Database, clock: ManualClock
) -> None:
    who = await principal(ledger)
    ahead = RateLimiter(database, defaults=Limits(2, 0), clock=lambda: clock() + 60)
    behind = RateLimiter(database, defaults=Limits(2, 0), clock=clock)
    await ahead.acquire(who, images=1)
    # The lagging replica must not reset the window the other one opened.
    assert await behind.acquire(who, images=1) == Quota(Limits(2, 0), 2, 2, 60)
    with pytest.raises(RateLimitError):
        await behind.acquire(who, images=1)


async def test_keys_are_limited_separately(ledger: Ledger, limiter: RateLimiter) -> None:
    who = await principal(ledger)
    second_key, _ = await ledger.create_key(who.account_id)
    sibling = Principal(who.account_id, second_key.key_id)
    await limiter.set_account_limits(who.account_id, requests_per_minute=1)
    await limiter.acquire(who, images=1)
    with pytest.raises(RateLimitError):
        await limiter.acquire(who, images=1)
    assert (await limiter.acquire(sibling, images=1)) == Quota(Limits(1, 3000), 1, 1, 40)


async def test_overrides_defaults_and_unlimited(
    ledger: Ledger, limiter: RateLimiter, ledger_engine: AsyncEngine
) -> None:
    who = await principal(ledger)
    shown = await limiter.account_limits(who.account_id)
    assert (shown.limits, shown.requests_is_default, shown.images_is_default) == (DEFAULTS, True, True)
    changed = await limiter.set_account_limits(who.account_id, requests_per_minute=5)
    assert (changed.limits, changed.requests_is_default, changed.images_is_default) == (Limits(5, 3000), False, True)
    changed = await limiter.set_account_limits(who.account_id, images_per_minute=0)
    assert (changed.limits, changed.requests_is_default, changed.images_is_default) == (Limits(5, 0), False, False)
    # Nothing to change is refused: reading is account_limits (GetRateLimits), not a set.
    with pytest.raises(InvalidRequestError) as caught:
        await limiter.set_account_limits(who.account_id)
    assert (caught.value.code, caught.value.param) == ("missing_required_parameter", "requests_per_minute")
    assert await limiter.account_limits(who.account_id) == changed
    # Back to the defaults, keeping one override given in the same call.
    changed = await limiter.set_account_limits(who.account_id, use_defaults=True, images_per_minute=9)
    assert (changed.limits, changed.requests_is_default, changed.images_is_default) == (Limits(600, 9), True, False)
    changed = await limiter.set_account_limits(who.account_id, use_defaults=True)
    assert (changed.limits, changed.requests_is_default, changed.images_is_default) == (DEFAULTS, True, True)

    unlimited = await principal(ledger)
    await limiter.set_account_limits(unlimited.account_id, requests_per_minute=0, images_per_minute=0)
    assert [await limiter.acquire(unlimited, images=10) for _ in range(3)] == [None, None, None]
    async with ledger_engine.connect() as conn:
        rows = (
            await conn.execute(select(rate_limit_counters).where(rate_limit_counters.c.key_id == unlimited.key_id))
        ).all()
    assert rows == []  # unlimited keys write nothing


@pytest.mark.parametrize(
    ("rpm", "ipm", "param"),
    [(-1, None, "requests_per_minute"), (1_000_001, None, "requests_per_minute"), (None, -5, "images_per_minute")],
)
async def test_bad_limits_are_refused_and_change_nothing(
    ledger: Ledger, limiter: RateLimiter, rpm: int | None, ipm: int | None, param: str
) -> None:
    who = await principal(ledger)
    with pytest.raises(InvalidRequestError) as caught:
        await limiter.set_account_limits(who.account_id, requests_per_minute=rpm, images_per_minute=ipm)
    assert caught.value.param == param
    assert (await limiter.account_limits(who.account_id)).limits == DEFAULTS


async def test_unknown_accounts_are_not_found(limiter: RateLimiter) -> None:
    with pytest.raises(NotFoundError):
        await limiter.set_account_limits("acct_nope", requests_per_minute=1)
    with pytest.raises(NotFoundError):
        await limiter.account_limits("acct_nope")


async def test_defaults_are_checked(database: Database) -> None:
    with pytest.raises(InvalidRequestError):
        RateLimiter(database, defaults=Limits(-1, 0))
