"""The idempotency store on real databases (SQLite and PostgreSQL): atomic claims,
replays, reuse with another body, failures that free the key, abandoned attempts,
expiry and the sweeper, waiting for a running attempt.

Nothing of ours is mocked; the clock is injected through the constructor, and the
"work" is a coroutine the test controls.
"""

from __future__ import annotations

import asyncio
import secrets

import pytest
from imagegw.v1 import images_pb2
from imagegw.v1.images_pb2 import GenerateImagesResponse as Response
from sqlalchemy import func, select
from sqlalchemy.ext.asyncio import AsyncEngine

from server.admission import Admissions
from server.errors import ConflictError, IdempotencyKeyReusedError, UpstreamError
from server.idempotency import Answer, Busy, Headers, IdempotencyStore, Owned, StoredResponse
from server.ledger import Ledger, Principal
from server.ledger.db import Database
from server.ledger.schema import idempotency_keys
from server.ratelimit import Limits, RateLimiter
from tests.service.test_ledger import SECRET, T0, TTL, ManualClock

DAY = 24 * 3600
LEASE = 120
HEADERS: Headers = (("x-imagegw-cost-usd", "0.002000"), ("x-imagegw-model", "local-1"))


@pytest.fixture
def clock() -> ManualClock:
    return ManualClock(T0)


@pytest.fixture
def ledger(database: Database, clock: ManualClock) -> Ledger:
    return Ledger(database, key_hash_secret=SECRET, reservation_ttl_seconds=TTL, clock=clock)


def new_store(db: Database, clock: ManualClock, *, max_wait: float = 30) -> IdempotencyStore:
    return IdempotencyStore(
        db,
        ttl_seconds=DAY,
        max_lease_seconds=LEASE,
        lease_grace_seconds=5,
        max_wait_seconds=max_wait,
        clock=clock,
    )


@pytest.fixture
def store(database: Database, clock: ManualClock) -> IdempotencyStore:
    return new_store(database, clock)


@pytest.fixture
async def account(ledger: Ledger) -> str:
    return (await ledger.create_account(f"acct-{secrets.token_hex(6)}", 0)).account_id


def response(tag: str, size: int = 16) -> Response:
    return Response(created=T0, data=[images_pb2.Image(b64_json=tag.encode() * size, revised_prompt=tag)])


class Work:
    """A produce() the test controls: counts calls, waits for a gate, then answers or fails."""

    def __init__(self, answer: Response, *, fail: BaseException | None = None, gated: bool = False) -> None:
        self.answer = answer
        self.fail = fail
        self.calls = 0
        self.started = asyncio.Event()
        self.gate = asyncio.Event()
        if not gated:
            self.gate.set()

    async def __call__(self) -> tuple[Response, Headers]:
        self.calls += 1
        self.started.set()
        await self.gate.wait()
        if self.fail is not None:
            raise self.fail
        return self.answer, HEADERS


async def run(
    store: IdempotencyStore,
    account: str,
    key: str | None,
    work: Work,
    *,
    request_hash: str = "h1",
    deadline: float | None = None,
) -> Answer[Response]:
    return await store.run(
        account, key, request_hash, request_id="req", deadline=deadline, produce=work, parse=Response.FromString
    )


async def count_rows(engine: AsyncEngine) -> int:
    async with engine.connect() as conn:
        return int((await conn.execute(select(func.count()).select_from(idempotency_keys))).scalar_one())


# -- claims -------------------------------------------------------------------------------


async def test_exactly_one_of_many_concurrent_claims_wins(
    database_url: str, store: IdempotencyStore, ledger_engine: AsyncEngine, clock: ManualClock, account: str
) -> None:
    other_db = Database(database_url)  # a second "replica"
    try:
        replicas = [store, new_store(other_db, clock)]
        claims = await asyncio.wait_for(
            asyncio.gather(
                *(replicas[i % 2].claim(account, "k", "h1", request_id=f"r{i}", lease_seconds=LEASE) for i in range(20))
            ),
            60,
        )
    finally:
        await other_db.close()
    assert sum(isinstance(c, Owned) for c in claims) == 1
    assert sum(isinstance(c, Busy) for c in claims) == 19
    assert await count_rows(ledger_engine) == 1


async def test_completed_key_replays_the_stored_bytes(store: IdempotencyStore, account: str) -> None:
    owned = await store.claim(account, "k", "h1", request_id="r1", lease_seconds=LEASE)
    assert isinstance(owned, Owned)
    body = response("A", size=3_000_000).SerializeToString()  # a few MB, like real b64 answers
    assert await store.complete(account, "k", owned.owner, body, HEADERS)
    replay = await store.claim(account, "k", "h1", request_id="r2", lease_seconds=LEASE)
    assert replay == StoredResponse(body=body, headers=HEADERS)


async def test_another_body_with_the_same_key_is_refused(store: IdempotencyStore, account: str) -> None:
    owned = await store.claim(account, "k", "h1", request_id="r1", lease_seconds=LEASE)
    assert isinstance(owned, Owned)
    with pytest.raises(IdempotencyKeyReusedError) as caught:  # while in progress
        await store.claim(account, "k", "h2", request_id="r2", lease_seconds=LEASE)
    assert (caught.value.http_status, caught.value.code, caught.value.param) == (
        400, "idempotency_key_reused", "Idempotency-Key"
    )
    await store.complete(account, "k", owned.owner, b"done", HEADERS)
    with pytest.raises(IdempotencyKeyReusedError):  # and once completed
        await store.claim(account, "k", "h2", request_id="r3", lease_seconds=LEASE)


async def test_keys_are_scoped_to_the_account(store: IdempotencyStore, ledger: Ledger, account: str) -> None:
    other = (await ledger.create_account(f"acct-{secrets.token_hex(6)}", 0)).account_id
    assert isinstance(await store.claim(account, "k", "h1", request_id="r1", lease_seconds=LEASE), Owned)
    assert isinstance(await store.claim(other, "k", "h2", request_id="r2", lease_seconds=LEASE), Owned)


async def test_abandoned_key_can_be_claimed_again(store: IdempotencyStore, account: str) -> None:
    first = await store.claim(account, "k", "h1", request_id="r1", lease_seconds=LEASE)
    assert isinstance(first, Owned)
    assert not await store.abandon(account, "k", "someone-else")
    assert await store.abandon(account, "k", first.owner)
    # After a failure the key is free, even for another body.
    assert isinstance(await store.claim(account, "k", "h2", request_id="r2", lease_seconds=LEASE), Owned)


async def test_an_attempt_past_its_lease_is_taken_over(
    store: IdempotencyStore, account: str, clock: ManualClock
) -> None:
    first = await store.claim(account, "k", "h1", request_id="r1", lease_seconds=10)
    assert isinstance(first, Owned)
    clock.advance(9)
    assert isinstance(await store.claim(account, "k", "h1", request_id="r2", lease_seconds=10), Busy)
    clock.advance(1)  # the lease has run out: the first attempt's process died
    second = await store.claim(account, "k", "h1", request_id="r3", lease_seconds=10)
    assert isinstance(second, Owned) and second.owner != first.owner
    # The first attempt, if it were still alive, can neither complete nor free the key.
    assert not await store.complete(account, "k", first.owner, b"late", HEADERS)
    assert not await store.abandon(account, "k", first.owner)
    assert await store.complete(account, "k", second.owner, b"second", HEADERS)
    replay = await store.claim(account, "k", "h1", request_id="r4", lease_seconds=10)
    assert replay == StoredResponse(b"second", HEADERS)


async def test_expired_answers_are_gone_and_the_sweeper_deletes_them(
    store: IdempotencyStore, account: str, clock: ManualClock, ledger_engine: AsyncEngine
) -> None:
    done = await store.claim(account, "done", "h1", request_id="r1", lease_seconds=LEASE)
    assert isinstance(done, Owned)
    await store.complete(account, "done", done.owner, b"old", HEADERS)
    clock.advance(DAY - 1)
    running = await store.claim(account, "running", "h1", request_id="r2", lease_seconds=LEASE)
    assert isinstance(running, Owned)
    assert await store.claim(account, "done", "h1", request_id="r3", lease_seconds=LEASE) == StoredResponse(
        b"old", HEADERS
    )
    assert await store.delete_expired() == 0
    clock.advance(1)  # 24 h after the first answer
    assert await store.delete_expired() == 1
    assert await count_rows(ledger_engine) == 1  # the running one stays
    again = await store.claim(account, "done", "h2", request_id="r4", lease_seconds=LEASE)
    assert isinstance(again, Owned)  # a new request now, whatever its body


async def test_an_expired_row_still_counts_as_absent_before_the_sweep(
    store: IdempotencyStore, account: str, clock: ManualClock
) -> None:
    done = await store.claim(account, "k", "h1", request_id="r1", lease_seconds=LEASE)
    assert isinstance(done, Owned)
    await store.complete(account, "k", done.owner, b"old", HEADERS)
    clock.advance(DAY)
    assert isinstance(await store.claim(account, "k", "h2", request_id="r2", lease_seconds=LEASE), Owned)


async def test_sweeper_deletes_in_batches(
    store: IdempotencyStore, account: str, clock: ManualClock, ledger_engine: AsyncEngine
) -> None:
    completed = {"request_hash": "h", "state": "completed", "request_id": "r", "response": b"x"}
    async with ledger_engine.begin() as conn:
        await conn.execute(
            idempotency_keys.insert(),
            [
                {**completed, "account_id": account, "idempotency_key": f"k{i}", "created_at": T0, "expires_at": T0 + i}
                for i in range(1, 1204)
            ],
        )
    clock.advance(1202)
    assert await store.delete_expired() == 1202  # three batches
    assert await count_rows(ledger_engine) == 1


# -- run() --------------------------------------------------------------------------------


async def test_without_a_key_it_just_runs(store: IdempotencyStore, account: str, ledger_engine: AsyncEngine) -> None:
    work = Work(response("A"))
    for _ in range(2):
        assert await run(store, account, None, work) == Answer(response("A"), HEADERS, replayed=False)
    assert work.calls == 2
    assert await count_rows(ledger_engine) == 0


async def test_run_twice_produces_once_and_replays_identical_bytes(store: IdempotencyStore, account: str) -> None:
    work = Work(response("A"))
    first = await run(store, account, "k", work)
    second = await run(store, account, "k", work)
    assert work.calls == 1
    assert (first.replayed, second.replayed) == (False, True)
    assert second.message.SerializeToString() == first.message.SerializeToString()
    assert second.headers == first.headers == HEADERS


async def test_a_replay_waits_for_the_running_attempt(store: IdempotencyStore, account: str) -> None:
    work = Work(response("A"), gated=True)
    first = asyncio.create_task(run(store, account, "k", work))
    await asyncio.wait_for(work.started.wait(), 10)
    waiters = [asyncio.create_task(run(store, account, "k", work)) for _ in range(3)]
    await asyncio.sleep(0.3)
    assert not any(w.done() for w in waiters)
    work.gate.set()
    answers = await asyncio.wait_for(asyncio.gather(first, *waiters), 30)
    assert work.calls == 1
    assert [a.replayed for a in answers] == [False, True, True, True]
    assert all(a.message == response("A") for a in answers)


async def test_a_replay_still_waiting_at_its_deadline_gets_409(store: IdempotencyStore, account: str) -> None:
    work = Work(response("A"), gated=True)
    first = asyncio.create_task(run(store, account, "k", work))
    await asyncio.wait_for(work.started.wait(), 10)
    loop = asyncio.get_running_loop()
    started = loop.time()
    with pytest.raises(ConflictError) as caught:
        await run(store, account, "k", work, deadline=started + 0.5)
    assert 0.5 <= loop.time() - started < 2.5
    error = caught.value
    assert (error.http_status, error.code, error.should_retry, error.retry_after) == (
        409, "idempotency_key_in_use", True, 1
    )
    work.gate.set()
    assert (await first).replayed is False
    assert (await run(store, account, "k", work)).replayed is True
    assert work.calls == 1


async def test_a_failed_attempt_frees_the_key_for_the_retry(
    store: IdempotencyStore, account: str, ledger_engine: AsyncEngine
) -> None:
    failing = Work(response("A"), fail=UpstreamError("boom"))
    with pytest.raises(UpstreamError):
        await run(store, account, "k", failing)
    assert await count_rows(ledger_engine) == 0
    working = Work(response("B"))
    answer = await run(store, account, "k", working)
    assert (answer.message, answer.replayed, working.calls) == (response("B"), False, 1)


async def test_a_waiter_runs_the_request_itself_when_the_first_attempt_fails(
    store: IdempotencyStore, account: str
) -> None:
    failing = Work(response("A"), fail=UpstreamError("boom"), gated=True)
    first = asyncio.create_task(run(store, account, "k", failing))
    await asyncio.wait_for(failing.started.wait(), 10)
    working = Work(response("B"))
    waiter = asyncio.create_task(run(store, account, "k", working))
    await asyncio.sleep(0.2)
    failing.gate.set()
    with pytest.raises(UpstreamError):
        await first
    answer = await asyncio.wait_for(waiter, 30)
    assert (answer.message, answer.replayed, working.calls) == (response("B"), False, 1)


async def test_a_cancelled_attempt_frees_the_key(
    store: IdempotencyStore, account: str, ledger_engine: AsyncEngine
) -> None:
    work = Work(response("A"), gated=True)
    first = asyncio.create_task(run(store, account, "k", work))
    await asyncio.wait_for(work.started.wait(), 10)
    first.cancel()
    with pytest.raises(asyncio.CancelledError):
        await first
    for _ in range(50):  # the release is shielded and lands just after the cancellation
        if await count_rows(ledger_engine) == 0:
            break
        await asyncio.sleep(0.05)
    assert await count_rows(ledger_engine) == 0


async def test_a_waiter_sees_a_reuse_with_another_body(store: IdempotencyStore, account: str) -> None:
    work = Work(response("A"), gated=True)
    first = asyncio.create_task(run(store, account, "k", work))
    await asyncio.wait_for(work.started.wait(), 10)
    with pytest.raises(IdempotencyKeyReusedError):
        await run(store, account, "k", work, request_hash="other")
    work.gate.set()
    await first


async def test_an_attempt_cancelled_after_its_answer_was_made_keeps_the_answer(
    store: IdempotencyStore, account: str
) -> None:
    """The caller goes away just after produce() returned (the request was done and paid
    for), while its large answer is being serialized: the key keeps that answer for the
    retry rather than staying held until its lease runs out (and then running again)."""
    big = response("A", size=400_000)  # serialized off the loop: the cancellation lands there

    async def produce_then_hang_up() -> tuple[Response, Headers]:
        task = asyncio.current_task()
        assert task is not None
        asyncio.get_running_loop().call_soon(task.cancel)
        return big, HEADERS

    first = asyncio.create_task(
        store.run(account, "k", "h1", request_id="req", deadline=None, produce=produce_then_hang_up, parse=Response.FromString)
    )
    with pytest.raises(asyncio.CancelledError):
        await first
    retry = Work(response("B"))
    answer = await asyncio.wait_for(run(store, account, "k", retry, deadline=asyncio.get_running_loop().time() + 5), 10)
    assert (answer.message, answer.replayed, retry.calls) == (big, True, 0)


@pytest.mark.parametrize("idempotency_key", [None, "k"], ids=["no-key", "key"])
async def test_a_request_cancelled_during_its_admission_holds_no_money_and_no_key(
    store: IdempotencyStore,
    ledger: Ledger,
    database: Database,
    clock: ManualClock,
    ledger_engine: AsyncEngine,
    idempotency_key: str | None,
) -> None:
    """The caller goes away while its admission transaction (the key, the rate limit, the
    Idempotency-Key, the reservation) is committing: the transaction runs to its end, but
    nobody will generate or settle, so what it reserved and claimed is given back at once,
    not held until the sweeper releases it after the request's deadline."""
    created = await ledger.create_account(f"acct-{secrets.token_hex(6)}", 1_000_000)
    api_key, _ = await ledger.create_key(created.account_id)
    who = Principal(created.account_id, api_key.key_id)
    admissions = Admissions(database, ledger, RateLimiter(database, defaults=Limits(600, 3000), clock=clock))
    admission = admissions.admission(
        who, images=1, pending=ledger.prepare_reservation(who.account_id, 5_000, request_id="req", model="m", images=1)
    )
    work = Work(response("A"))

    async def admitted_then_gone() -> Answer[Response]:
        task = asyncio.current_task()
        assert task is not None
        asyncio.get_running_loop().call_soon(task.cancel)  # lands while admission is under way
        return await store.run(
            who.account_id, idempotency_key, "h1", request_id="req", deadline=None, produce=work,
            parse=Response.FromString, admit=admission,
        )

    with pytest.raises(asyncio.CancelledError):
        await asyncio.create_task(admitted_then_gone())
    # What a shutdown waits for: the admission's transaction and then its undoing.
    await store.wait_settled()
    account = await ledger.get_account(who.account_id)
    assert (account.reserved_micros, account.balance_micros, await count_rows(ledger_engine), work.calls) == (
        0, 1_000_000, 0, 0
    )
    assert (await ledger.reconcile()).ok
