"""The ledger on real databases: every test runs on SQLite and on PostgreSQL.

Balances are asserted to the micro-dollar. Nothing of ours is mocked; the only stand-in
is the clock, injected through the constructor.
"""

from __future__ import annotations

import asyncio
import re
import sqlite3
import string
import threading
import time
import zlib
from collections.abc import Awaitable, Callable
from pathlib import Path
from typing import Any

import pytest
from alembic import command
from alembic.autogenerate import compare_metadata
from alembic.config import Config
from alembic.migration import MigrationContext
from sqlalchemy import inspect, select, text
from sqlalchemy.exc import DBAPIError
from sqlalchemy.ext.asyncio import AsyncEngine

import server.ledger
from server.config import Tuning
from server.errors import AuthenticationError, InsufficientBalanceError, InvalidRequestError, NotFoundError
from server.ledger import AccountView, Ledger, Principal, Reservation, UsageView
from server.ledger.db import Database, create_engine, migrate
from server.ledger.keys import INVALID_API_KEY_MESSAGE, generate_api_key, hash_api_key, parse_api_key
from server.ledger.money import MAX_AMOUNT_MICROS, MAX_CREDITED_MICROS
from server.ledger.schema import ledger_entries, metadata

T0 = 1_700_000_000
TTL = 600
SECRET = b"test-key-hash-secret"
USD = 1_000_000
BASE62 = string.digits + string.ascii_uppercase + string.ascii_lowercase


def with_checksum(body: str) -> str:
    """Appends the documented key checksum (CRC32 in 6 base62 digits), to forge well-formed keys."""
    value, digits = zlib.crc32(body.encode()), ""
    for _ in range(6):
        value, digit = divmod(value, 62)
        digits = BASE62[digit] + digits
    return body + digits


class ManualClock:
    """Unix time that moves only when the test says so."""

    def __init__(self, now: float = T0) -> None:
        self.now = now

    def __call__(self) -> float:
        return self.now

    def advance(self, seconds: float) -> None:
        self.now += seconds


@pytest.fixture
def clock() -> ManualClock:
    return ManualClock()


@pytest.fixture
def ledger(database: Database, clock: ManualClock) -> Ledger:
    return Ledger(database, key_hash_secret=SECRET, reservation_ttl_seconds=TTL, clock=clock)


async def rows(engine: AsyncEngine, sql: str, **params: Any) -> list[tuple[Any, ...]]:
    async with engine.connect() as conn:
        return [tuple(row) for row in await conn.execute(text(sql), params)]


async def execute(engine: AsyncEngine, sql: str, **params: Any) -> None:
    async with engine.begin() as conn:
        await conn.execute(text(sql), params)


async def entries(engine: AsyncEngine, account_id: str) -> list[tuple[str, int, str | None]]:
    async with engine.connect() as conn:
        result = await conn.execute(
            select(ledger_entries.c.kind, ledger_entries.c.amount_micros, ledger_entries.c.reservation_id)
            .where(ledger_entries.c.account_id == account_id)
            .order_by(ledger_entries.c.id)
        )
        return [tuple(row) for row in result]  # type: ignore[misc]


async def money(ledger: Ledger, account_id: str) -> tuple[int, int, int, int]:
    """(balance, reserved, spent, credited) in micro-dollars."""
    view = await ledger.get_account(account_id)
    return view.balance_micros, view.reserved_micros, view.spent_micros, view.credited_micros


async def reserve(
    ledger: Ledger, account_id: str, amount: int, *, images: int = 1, request_id: str = "req"
) -> Reservation:
    return await ledger.reserve(account_id, amount, request_id=request_id, model="local-1", images=images)


# -- schema and migrations --------------------------------------------------------------


async def test_migrations_create_exactly_the_schema_the_code_uses(ledger_engine: AsyncEngine) -> None:
    def diff(sync_conn: Any) -> list[Any]:
        return compare_metadata(MigrationContext.configure(sync_conn, opts={"compare_type": True}), metadata)

    async with ledger_engine.connect() as conn:
        assert await conn.run_sync(diff) == []
    assert await rows(ledger_engine, "SELECT version_num FROM alembic_version") == [("0003",)]


async def test_migrate_twice_at_once_is_safe(database_url: str) -> None:
    # Two "processes" (engines) starting together against a fresh database, then again.
    engines = [create_engine(database_url) for _ in range(2)]
    try:
        await asyncio.wait_for(asyncio.gather(*(migrate(engine) for engine in engines)), timeout=60)
        await asyncio.wait_for(asyncio.gather(*(migrate(engine) for engine in engines)), timeout=60)
        await migrate(database_url)  # by URL: its own engine, disposed
        assert await rows(engines[0], "SELECT version_num FROM alembic_version") == [("0003",)]
    finally:
        for engine in engines:
            await engine.dispose()


async def test_downgrade_to_base_and_upgrade_again(database: Database, ledger_engine: AsyncEngine) -> None:
    config = Config(str(Path(server.ledger.__file__).with_name("alembic.ini")))

    def downgrade(sync_conn: Any) -> None:
        config.attributes["connection"] = sync_conn
        command.downgrade(config, "base")

    async with ledger_engine.begin() as conn:
        await conn.run_sync(downgrade)
    async with ledger_engine.connect() as conn:
        tables = await conn.run_sync(lambda sync_conn: sorted(inspect(sync_conn).get_table_names()))
    assert tables == ["alembic_version"]
    await migrate(ledger_engine)
    ledger = Ledger(database, key_hash_secret=SECRET, reservation_ttl_seconds=TTL)
    assert (await ledger.create_account("again", USD)).balance_micros == USD


async def test_ledger_entries_and_usage_are_append_only(ledger: Ledger, ledger_engine: AsyncEngine) -> None:
    account = await ledger.create_account("acme", 5 * USD)
    rsv = await reserve(ledger, account.account_id, USD)
    await ledger.release(rsv.reservation_id, error_code="upstream_error")
    for sql in (
        "UPDATE ledger_entries SET amount_micros = 0",
        "DELETE FROM ledger_entries",
        "UPDATE usage_records SET cost_micros = 1",
        "DELETE FROM usage_records",
    ):
        with pytest.raises(DBAPIError, match="append-only"):
            await execute(ledger_engine, sql)
    assert len(await entries(ledger_engine, account.account_id)) == 3


async def test_the_database_refuses_a_negative_balance(ledger: Ledger, ledger_engine: AsyncEngine) -> None:
    account = await ledger.create_account("acme", USD)
    with pytest.raises(DBAPIError):
        await execute(ledger_engine, "UPDATE accounts SET balance_micros = -1 WHERE id = :id", id=account.account_id)
    assert await money(ledger, account.account_id) == (USD, 0, 0, USD)


async def test_sqlite_connections_use_wal_foreign_keys_and_a_busy_timeout(tmp_path: Path) -> None:
    engine = create_engine(f"sqlite:///{tmp_path / 'var' / 'new' / 'imagegw.db'}")  # driver added, dirs made
    try:
        assert engine.url.drivername == "sqlite+aiosqlite"
        assert await rows(engine, "PRAGMA journal_mode") == [("wal",)]
        assert await rows(engine, "PRAGMA foreign_keys") == [(1,)]
        assert await rows(engine, "PRAGMA busy_timeout") == [(30000,)]
    finally:
        await engine.dispose()


async def test_sqlite_transactions_run_on_threads_with_the_same_connection_settings(tmp_path: Path) -> None:
    db = Database(f"sqlite:///{tmp_path / 'imagegw.db'}")
    try:
        pragmas = "SELECT * FROM pragma_journal_mode, pragma_foreign_keys, pragma_busy_timeout"
        assert await db.read(lambda conn: conn.exec_driver_sql(pragmas).all()) == [("wal", 1, 30000)]

        def other_writer_is_locked_out(_conn: Any) -> bool:
            # BEGIN IMMEDIATE: the write lock is held before any statement has written.
            other = sqlite3.connect(tmp_path / "imagegw.db", timeout=0, isolation_level=None)
            try:
                other.execute("BEGIN IMMEDIATE")
            except sqlite3.OperationalError as exc:
                return "locked" in str(exc)
            finally:
                other.close()
            return False

        assert await db.write(other_writer_is_locked_out) is True
        writers = await asyncio.gather(*(db.write(lambda conn: threading.current_thread().name) for _ in range(5)))
        assert len(set(writers)) == 1 and writers[0].startswith("imagegw-db-writer")
        with pytest.raises(ValueError, match="in-memory"):
            Database("sqlite+aiosqlite://")
    finally:
        await db.close()


# -- accounts -----------------------------------------------------------------------------


async def test_create_get_and_find_account(ledger: Ledger, ledger_engine: AsyncEngine) -> None:
    created = await ledger.create_account("acme", 5 * USD)
    assert re.fullmatch(r"acct_[a-z0-9]{20}", created.account_id)
    assert created == AccountView(created.account_id, "acme", 5_000_000, 0, 0, 5_000_000, T0)
    assert await ledger.get_account(created.account_id) == created
    assert await ledger.find_account_by_name("acme") == created
    assert await ledger.find_account_by_name("nobody") is None
    assert await entries(ledger_engine, created.account_id) == [("credit", 5_000_000, None)]


async def test_create_account_with_zero_balance_writes_no_entry(ledger: Ledger, ledger_engine: AsyncEngine) -> None:
    created = await ledger.create_account("  free  ", 0)
    assert (created.name, await money(ledger, created.account_id)) == ("free", (0, 0, 0, 0))
    assert await entries(ledger_engine, created.account_id) == []


async def test_duplicate_account_name_is_refused(ledger: Ledger, ledger_engine: AsyncEngine) -> None:
    first = await ledger.create_account("acme", USD)
    for name in ("acme", " acme "):
        with pytest.raises(InvalidRequestError) as caught:
            await ledger.create_account(name, 2 * USD)
        assert (caught.value.code, caught.value.param) == ("account_exists", "name")
    assert await rows(ledger_engine, "SELECT id, balance_micros FROM accounts") == [(first.account_id, USD)]


@pytest.mark.parametrize("name", ["", "   ", "x" * 101, "a\nb", "tab\there", None, 5])
async def test_bad_account_names_are_refused(ledger: Ledger, ledger_engine: AsyncEngine, name: object) -> None:
    with pytest.raises(InvalidRequestError) as caught:
        await ledger.create_account(name, USD)  # type: ignore[arg-type]
    assert caught.value.param == "name"
    assert await rows(ledger_engine, "SELECT count(*) FROM accounts") == [(0,)]


async def test_name_of_exactly_100_characters_is_fine(ledger: Ledger) -> None:
    assert (await ledger.create_account("é" * 100, 0)).name == "é" * 100


@pytest.mark.parametrize("balance", [-1, MAX_AMOUNT_MICROS + 1, True, 1.5, "5"])
async def test_bad_opening_balances_are_refused(ledger: Ledger, ledger_engine: AsyncEngine, balance: object) -> None:
    with pytest.raises(InvalidRequestError) as caught:
        await ledger.create_account("acme", balance)  # type: ignore[arg-type]
    assert caught.value.param == "balance"
    assert await rows(ledger_engine, "SELECT count(*) FROM accounts") == [(0,)]


async def test_credit_adds_to_balance(ledger: Ledger, ledger_engine: AsyncEngine, clock: ManualClock) -> None:
    account = await ledger.create_account("acme", 5 * USD)
    clock.advance(10)
    after = await ledger.credit(account.account_id, 2_500_000)
    assert after == AccountView(account.account_id, "acme", 7_500_000, 0, 0, 7_500_000, T0)
    after = await ledger.credit(account.account_id, 1)
    assert (after.balance_micros, after.credited_micros) == (7_500_001, 7_500_001)
    assert await entries(ledger_engine, account.account_id) == [
        ("credit", 5_000_000, None),
        ("credit", 2_500_000, None),
        ("credit", 1, None),
    ]
    assert (await ledger.reconcile()).ok


@pytest.mark.parametrize("amount", [0, -1, MAX_AMOUNT_MICROS + 1, True, 2.5])
async def test_bad_credit_amounts_change_nothing(ledger: Ledger, amount: object) -> None:
    account = await ledger.create_account("acme", 5 * USD)
    with pytest.raises(InvalidRequestError) as caught:
        await ledger.credit(account.account_id, amount)  # type: ignore[arg-type]
    assert caught.value.param == "amount"
    assert await money(ledger, account.account_id) == (5 * USD, 0, 0, 5 * USD)


async def test_credit_largest_single_amount(ledger: Ledger) -> None:
    account = await ledger.create_account("acme", 0)
    assert (await ledger.credit(account.account_id, MAX_AMOUNT_MICROS)).balance_micros == MAX_AMOUNT_MICROS


async def test_credit_stops_at_the_lifetime_credit_cap(ledger: Ledger, ledger_engine: AsyncEngine) -> None:
    account = await ledger.create_account("acme", 0)
    # A thousand maximal credits would take a while; start the account next to the cap.
    near = MAX_CREDITED_MICROS - 5
    await execute(
        ledger_engine,
        "UPDATE accounts SET balance_micros = :v, credited_micros = :v WHERE id = :id",
        v=near,
        id=account.account_id,
    )
    with pytest.raises(InvalidRequestError, match="lifetime credits") as caught:
        await ledger.credit(account.account_id, 6)
    assert caught.value.param == "amount"
    assert (await ledger.credit(account.account_id, 5)).credited_micros == MAX_CREDITED_MICROS


async def test_unknown_accounts_are_not_found(ledger: Ledger, ledger_engine: AsyncEngine) -> None:
    calls: list[Callable[[], Awaitable[object]]] = [
        lambda: ledger.get_account("acct_nope"),
        lambda: ledger.credit("acct_nope", USD),
        lambda: ledger.create_key("acct_nope"),
        lambda: ledger.usage("acct_nope"),
        lambda: reserve(ledger, "acct_nope", USD),
        lambda: reserve(ledger, "acct_nope", 0),
    ]
    for call in calls:
        with pytest.raises(NotFoundError) as caught:
            await call()
        assert caught.value.param == "account_id"
    assert await rows(ledger_engine, "SELECT count(*) FROM ledger_entries") == [(0,)]


# -- API keys -------------------------------------------------------------------------------


async def test_create_key_and_authenticate(ledger: Ledger, ledger_engine: AsyncEngine) -> None:
    account = await ledger.create_account("acme", USD)
    key, api_key = await ledger.create_key(account.account_id, "ci")
    assert re.fullmatch(r"key_[a-z0-9]{16}", key.key_id)
    assert api_key.startswith("sk-igw-" + key.key_id.removeprefix("key_") + "_")
    assert (key.account_id, key.name, key.created, key.revoked) == (account.account_id, "ci", T0, None)
    assert await ledger.authenticate(api_key) == Principal(account.account_id, key.key_id)
    # Only the keyed hash is stored; the key itself is nowhere in the database.
    stored = await rows(ledger_engine, "SELECT * FROM api_keys")
    assert stored == [(key.key_id, account.account_id, "ci", hash_api_key(api_key, SECRET), T0, None)]
    assert not any(api_key in str(value) for value in stored[0])


async def test_every_bad_key_gets_the_same_401(ledger: Ledger) -> None:
    account = await ledger.create_account("acme", USD)
    key, api_key = await ledger.create_key(account.account_id)
    _, unknown = generate_api_key()  # well-formed, never stored
    wrong_secret = with_checksum(api_key[: -6 - 32] + "x" * 32)  # real key id, forged secret
    bad_checksum = api_key[:-1] + ("0" if api_key[-1] != "0" else "1")
    cases = {
        "missing": None,
        "empty": "",
        "malformed": "sk-igw-not-a-key",
        "openai key": "sk-proj-" + "a" * 40,
        "bad checksum": bad_checksum,
        "unknown key id": unknown,
        "wrong secret": wrong_secret,
    }
    for label, value in cases.items():
        with pytest.raises(AuthenticationError) as caught:
            await ledger.authenticate(value)
        assert caught.value.message == INVALID_API_KEY_MESSAGE, label
        assert (caught.value.code, caught.value.http_status) == ("invalid_api_key", 401), label
        if value:
            assert value not in caught.value.openai_json(), label
    assert await ledger.authenticate(api_key) == Principal(account.account_id, key.key_id)


async def test_keys_hashed_under_another_secret_do_not_authenticate(ledger: Ledger, database: Database) -> None:
    account = await ledger.create_account("acme", USD)
    _, api_key = await ledger.create_key(account.account_id)
    other = Ledger(database, key_hash_secret=b"another-secret", reservation_ttl_seconds=TTL)
    with pytest.raises(AuthenticationError):
        await other.authenticate(api_key)


async def test_revocation_applies_to_the_next_request_on_every_replica(
    ledger: Ledger, database_url: str, clock: ManualClock
) -> None:
    # A second replica: its own engine and ledger on the same database.
    replica_db = Database(database_url)
    try:
        replica = Ledger(replica_db, key_hash_secret=SECRET, reservation_ttl_seconds=TTL, clock=clock)
        account = await ledger.create_account("acme", USD)
        key, api_key = await ledger.create_key(account.account_id)
        _, other_key = await ledger.create_key(account.account_id, "other")
        assert await replica.authenticate(api_key) == Principal(account.account_id, key.key_id)
        clock.advance(30)
        revoked = await ledger.revoke_key(key.key_id)
        assert revoked.revoked == T0 + 30
        for where in (ledger, replica):
            with pytest.raises(AuthenticationError) as caught:
                await where.authenticate(api_key)
            assert caught.value.message == INVALID_API_KEY_MESSAGE
            assert (await where.authenticate(other_key)).account_id == account.account_id
    finally:
        await replica_db.close()


async def test_a_remembered_key_still_stops_paid_requests_at_once_and_free_calls_within_the_bound(
    ledger: Ledger, database_url: str, clock: ManualClock
) -> None:
    # Authentication may answer from memory for max_age seconds; a paid request's admission
    # transaction checks the key itself (key_is_live), so a revocation stops it at once.
    replica_db = Database(database_url)
    try:
        replica = Ledger(replica_db, key_hash_secret=SECRET, reservation_ttl_seconds=TTL, clock=clock)
        account = await ledger.create_account("acme", USD)
        key, api_key = await ledger.create_key(account.account_id)
        principal = Principal(account.account_id, key.key_id)
        for where in (ledger, replica):
            assert await where.authenticate(api_key, max_age=10) == principal
        await replica_db.write_plain(replica.key_is_live(principal))  # live: nothing raised
        clock.advance(5)
        await ledger.revoke_key(key.key_id)
        # The replica that revoked it forgot it; the other still remembers it for free calls...
        with pytest.raises(AuthenticationError):
            await ledger.authenticate(api_key, max_age=10)
        assert await replica.authenticate(api_key, max_age=10) == principal
        # ...but not for a paid one: admission refuses it on every replica, and forgets it.
        for where, db in ((ledger, ledger._db), (replica, replica_db)):
            with pytest.raises(AuthenticationError) as caught:
                await db.write_plain(where.key_is_live(principal))
            assert caught.value.message == INVALID_API_KEY_MESSAGE
        with pytest.raises(AuthenticationError):
            await replica.authenticate(api_key, max_age=10)
        # Without admission in between, the memory ends with max_age.
        _, other_key = await ledger.create_key(account.account_id, "other")
        assert (await replica.authenticate(other_key, max_age=10)).account_id == account.account_id
        await ledger.revoke_key(parse_api_key(other_key))
        clock.advance(10)
        assert (await replica.authenticate(other_key, max_age=10)).account_id == account.account_id
        clock.advance(0.5)
        with pytest.raises(AuthenticationError):
            await replica.authenticate(other_key, max_age=10)
    finally:
        await replica_db.close()


async def test_revoke_is_idempotent_and_unknown_keys_are_not_found(ledger: Ledger, clock: ManualClock) -> None:
    account = await ledger.create_account("acme", USD)
    key, _ = await ledger.create_key(account.account_id, "ci")
    first = await ledger.revoke_key(key.key_id)
    clock.advance(100)
    second = await ledger.revoke_key(key.key_id)
    assert first == second
    assert (second.key_id, second.account_id, second.name, second.created, second.revoked) == (
        key.key_id, account.account_id, "ci", T0, T0
    )
    with pytest.raises(NotFoundError) as caught:
        await ledger.revoke_key("key_doesnotexist0000")
    assert caught.value.param == "key_id"


async def test_key_name_too_long_is_refused(ledger: Ledger) -> None:
    account = await ledger.create_account("acme", USD)
    with pytest.raises(InvalidRequestError) as caught:
        await ledger.create_key(account.account_id, "k" * 101)
    assert caught.value.param == "name"


# -- reserve, capture, release --------------------------------------------------------------


async def test_partial_capture_releases_the_rest(
    ledger: Ledger, ledger_engine: AsyncEngine, clock: ManualClock
) -> None:
    account = await ledger.create_account("acme", 5 * USD)
    rsv = await ledger.reserve(account.account_id, 3 * 40_000, request_id="req-1", model="local-1", images=3)
    assert re.fullmatch(r"rsv_[a-z0-9]{20}", rsv.reservation_id)
    assert rsv == Reservation(rsv.reservation_id, account.account_id, "req-1", "local-1", 3, 120_000, T0, T0 + TTL)
    assert await money(ledger, account.account_id) == (4_880_000, 120_000, 0, 5_000_000)

    clock.advance(7)
    captured = await ledger.settle(rsv.reservation_id, captured_micros=80_000, images_delivered=2, status="succeeded")
    assert captured == 80_000
    assert await money(ledger, account.account_id) == (4_920_000, 0, 80_000, 5_000_000)
    assert await entries(ledger_engine, account.account_id) == [
        ("credit", 5_000_000, None),
        ("reserve", 120_000, rsv.reservation_id),
        ("capture", 80_000, rsv.reservation_id),
        ("release", 40_000, rsv.reservation_id),
    ]
    assert (await ledger.usage(account.account_id)).records == [
        UsageView(T0 + 7, "req-1", "local-1", 3, 2, 80_000, "succeeded", "")
    ]
    closed = "SELECT status, captured_micros, closed_at FROM reservations WHERE id = :id"
    assert await rows(ledger_engine, closed, id=rsv.reservation_id) == [("settled", 80_000, T0 + 7)]
    assert (await ledger.reconcile()).ok


async def test_full_capture_writes_no_release(ledger: Ledger, ledger_engine: AsyncEngine) -> None:
    account = await ledger.create_account("acme", USD)
    rsv = await reserve(ledger, account.account_id, USD)
    assert await money(ledger, account.account_id) == (0, USD, 0, USD)
    assert await ledger.settle(rsv.reservation_id, captured_micros=USD, images_delivered=1, status="succeeded") == USD
    assert await money(ledger, account.account_id) == (0, 0, USD, USD)
    assert [kind for kind, _, _ in await entries(ledger_engine, account.account_id)] == ["credit", "reserve", "capture"]


async def test_settle_twice_is_a_no_op(ledger: Ledger, ledger_engine: AsyncEngine) -> None:
    account = await ledger.create_account("acme", 5 * USD)
    rsv = await reserve(ledger, account.account_id, 2 * USD, images=2)
    assert await ledger.settle(rsv.reservation_id, captured_micros=USD, images_delivered=1, status="succeeded") == USD
    after_first = await money(ledger, account.account_id)
    assert after_first == (4 * USD, 0, USD, 5 * USD)
    assert await ledger.settle(rsv.reservation_id, captured_micros=2 * USD, images_delivered=2, status="succeeded") == 0
    await ledger.release(rsv.reservation_id, error_code="cancelled")
    assert await money(ledger, account.account_id) == after_first
    assert len((await ledger.usage(account.account_id)).records) == 1
    assert len(await entries(ledger_engine, account.account_id)) == 4
    assert (await ledger.reconcile()).ok


async def test_concurrent_settles_close_a_reservation_once(ledger: Ledger) -> None:
    account = await ledger.create_account("acme", 5 * USD)
    rsv = await reserve(ledger, account.account_id, 3 * USD, images=3)
    results = await asyncio.gather(
        *(
            ledger.settle(rsv.reservation_id, captured_micros=amount, images_delivered=1, status="succeeded")
            for amount in (USD, 2 * USD, 3 * USD, USD, 2 * USD)
        ),
        ledger.release(rsv.reservation_id, error_code="cancelled"),
    )
    winners = [r for r in results[:-1] if r]
    balance, reserved, spent, credited = await money(ledger, account.account_id)
    assert len(winners) <= 1 and reserved == 0 and credited == 5 * USD
    assert spent == (winners[0] if winners else 0) and balance == 5 * USD - spent
    assert len((await ledger.usage(account.account_id)).records) == 1
    assert (await ledger.reconcile()).ok


async def test_release_refunds_everything(ledger: Ledger, ledger_engine: AsyncEngine, clock: ManualClock) -> None:
    account = await ledger.create_account("acme", 5 * USD)
    rsv = await ledger.reserve(account.account_id, 1_234_567, request_id="req-9", model="gpt-image-1", images=4)
    clock.advance(3)
    assert await ledger.release(rsv.reservation_id, error_code="upstream_error") is None
    assert await money(ledger, account.account_id) == (5 * USD, 0, 0, 5 * USD)
    assert (await ledger.usage(account.account_id)).records == [
        UsageView(T0 + 3, "req-9", "gpt-image-1", 4, 0, 0, "failed", "upstream_error")
    ]
    assert await entries(ledger_engine, account.account_id) == [
        ("credit", 5_000_000, None),
        ("reserve", 1_234_567, rsv.reservation_id),
        ("release", 1_234_567, rsv.reservation_id),
    ]
    assert (await ledger.reconcile()).ok


async def test_capturing_more_than_reserved_is_refused_and_changes_nothing(ledger: Ledger) -> None:
    account = await ledger.create_account("acme", 5 * USD)
    rsv = await reserve(ledger, account.account_id, USD)
    with pytest.raises(ValueError, match="cannot capture"):
        await ledger.settle(rsv.reservation_id, captured_micros=USD + 1, images_delivered=1, status="succeeded")
    assert await money(ledger, account.account_id) == (4 * USD, USD, 0, 5 * USD)
    # Still open: the caller's release (or the sweeper) closes it.
    assert await ledger.settle(rsv.reservation_id, captured_micros=USD, images_delivered=1, status="succeeded") == USD


async def test_settle_argument_and_lookup_errors(ledger: Ledger) -> None:
    account = await ledger.create_account("acme", 5 * USD)
    rsv = await reserve(ledger, account.account_id, USD)
    for kwargs in (
        {"captured_micros": -1, "images_delivered": 0, "status": "failed"},
        {"captured_micros": 0, "images_delivered": -1, "status": "failed"},
        {"captured_micros": 0, "images_delivered": 0, "status": "done"},
    ):
        with pytest.raises(ValueError):
            await ledger.settle(rsv.reservation_id, **kwargs)  # type: ignore[arg-type]
    with pytest.raises(NotFoundError) as caught:
        await ledger.settle("rsv_nope", captured_micros=0, images_delivered=0, status="failed")
    assert caught.value.param == "reservation_id"
    assert await money(ledger, account.account_id) == (4 * USD, USD, 0, 5 * USD)


async def test_insufficient_balance_changes_nothing(ledger: Ledger, ledger_engine: AsyncEngine) -> None:
    account = await ledger.create_account("acme", USD)
    with pytest.raises(InsufficientBalanceError) as caught:
        await reserve(ledger, account.account_id, USD + 1)
    error = caught.value
    assert (error.code, error.http_status, error.openai_type, error.should_retry) == (
        "insufficient_balance", 402, "insufficient_quota", False
    )
    assert "1.000001 USD" in error.message and "1.000000 USD available" in error.message
    assert await money(ledger, account.account_id) == (USD, 0, 0, USD)
    assert await rows(ledger_engine, "SELECT count(*) FROM reservations") == [(0,)]
    assert await entries(ledger_engine, account.account_id) == [("credit", USD, None)]
    # The exact balance is fine, and then nothing more is.
    await reserve(ledger, account.account_id, USD)
    with pytest.raises(InsufficientBalanceError, match="0.000000 USD available"):
        await reserve(ledger, account.account_id, 1)
    assert await money(ledger, account.account_id) == (0, USD, 0, USD)


async def test_free_requests_reserve_zero(ledger: Ledger) -> None:
    account = await ledger.create_account("broke", 0)
    rsv = await reserve(ledger, account.account_id, 0)
    assert await ledger.settle(rsv.reservation_id, captured_micros=0, images_delivered=1, status="succeeded") == 0
    assert await money(ledger, account.account_id) == (0, 0, 0, 0)
    assert [(u.cost_micros, u.status) for u in (await ledger.usage(account.account_id)).records] == [(0, "succeeded")]
    assert (await ledger.reconcile()).ok


@pytest.mark.parametrize(("amount", "images"), [(-1, 1), (1, -1), (1.0, 1), (True, 1)])
async def test_reserve_refuses_caller_bugs(ledger: Ledger, amount: object, images: object) -> None:
    account = await ledger.create_account("acme", USD)
    with pytest.raises(ValueError):
        await ledger.reserve(
            account.account_id, amount, request_id="r", model="m", images=images  # type: ignore[arg-type]
        )
    assert await money(ledger, account.account_id) == (USD, 0, 0, USD)


async def test_long_request_ids_are_clipped(ledger: Ledger) -> None:
    account = await ledger.create_account("acme", USD)
    rsv = await ledger.reserve(account.account_id, 1, request_id="r" * 1000, model="local-1", images=1)
    assert rsv.request_id == "r" * 255
    await ledger.settle(rsv.reservation_id, captured_micros=1, images_delivered=1, status="succeeded")
    assert (await ledger.usage(account.account_id)).records[0].request_id == "r" * 255


# -- the sweeper ------------------------------------------------------------------------------


async def test_release_expired_after_the_ttl(ledger: Ledger, ledger_engine: AsyncEngine, clock: ManualClock) -> None:
    account = await ledger.create_account("acme", 5 * USD)
    orphan = await ledger.reserve(account.account_id, 2 * USD, request_id="crashed", model="local-1", images=2)
    clock.advance(60)
    settled = await reserve(ledger, account.account_id, USD, request_id="ok")
    await ledger.settle(settled.reservation_id, captured_micros=USD, images_delivered=1, status="succeeded")
    clock.advance(60)
    young = await reserve(ledger, account.account_id, USD, request_id="in-flight")
    assert await money(ledger, account.account_id) == (USD, 3 * USD, USD, 5 * USD)

    clock.advance(TTL - 120 - 1)  # one second before the orphan's deadline
    assert await ledger.release_expired() == 0
    clock.advance(1)  # exactly at expires_at
    assert await ledger.release_expired() == 1
    assert await ledger.release_expired() == 0
    assert await money(ledger, account.account_id) == (3 * USD, USD, USD, 5 * USD)
    assert await rows(
        ledger_engine, "SELECT status, captured_micros FROM reservations WHERE id = :id", id=orphan.reservation_id
    ) == [("expired", 0)]
    assert (await ledger.usage(account.account_id)).records[0] == UsageView(
        T0 + TTL, "crashed", "local-1", 2, 0, 0, "failed", "reservation_expired"
    )
    # The request came back after all: too late, it captures nothing.
    assert await ledger.settle(orphan.reservation_id, captured_micros=USD, images_delivered=1, status="succeeded") == 0
    assert await money(ledger, account.account_id) == (3 * USD, USD, USD, 5 * USD)

    clock.advance(120)
    assert await ledger.release_expired() == 1  # the young one, in its turn
    assert await money(ledger, account.account_id) == (4 * USD, 0, USD, 5 * USD)
    assert young.expires_at == T0 + 120 + TTL
    assert len((await ledger.usage(account.account_id)).records) == 3
    assert (await ledger.reconcile()).ok


async def test_the_sweeper_works_through_batches_smaller_than_the_backlog(
    database: Database, clock: ManualClock
) -> None:
    ledger = Ledger(database, key_hash_secret=SECRET, reservation_ttl_seconds=TTL, sweep_batch=2, clock=clock)
    account = await ledger.create_account("acme", 5 * USD)
    for i in range(5):
        await reserve(ledger, account.account_id, USD, request_id=f"crashed-{i}")
    clock.advance(TTL)
    assert await ledger.release_expired() == 5
    assert await money(ledger, account.account_id) == (5 * USD, 0, 0, 5 * USD)


async def test_the_database_pool_is_sized_by_tuning(database_url: str) -> None:
    db = Database(database_url, tuning=Tuning(database_pool_size=3, sqlite_readers=2))
    try:
        if db.dialect == "postgresql":
            assert db.engine.pool.size() == 3  # type: ignore[attr-defined]
        else:
            # The SQLite pool holds the readers and the writer.
            assert db._sqlite is not None and db._sqlite.pool.size() == 3  # type: ignore[attr-defined]
    finally:
        await db.close()


async def test_expires_at_rounds_up_so_the_whole_ttl_is_granted(ledger: Ledger, clock: ManualClock) -> None:
    account = await ledger.create_account("acme", USD)
    clock.advance(0.25)
    rsv = await reserve(ledger, account.account_id, 1)
    assert (rsv.created, rsv.expires_at) == (T0, T0 + 1 + TTL)
    clock.advance(TTL)  # T0 + 0.25 + TTL: a full TTL has passed, but not expires_at
    assert await ledger.release_expired() == 0
    clock.advance(0.75)
    assert await ledger.release_expired() == 1


async def test_sweeper_racing_settles_closes_each_reservation_once(ledger: Ledger, clock: ManualClock) -> None:
    account = await ledger.create_account("acme", 100 * USD)
    held = [await reserve(ledger, account.account_id, USD, request_id=f"r{i}") for i in range(30)]
    clock.advance(TTL)
    settles = [
        ledger.settle(r.reservation_id, captured_micros=USD, images_delivered=1, status="succeeded") for r in held
    ]
    results = await asyncio.wait_for(asyncio.gather(*settles, ledger.release_expired(), ledger.release_expired()), 60)
    captured, swept = sum(results[:-2]), results[-2] + results[-1]
    assert captured % USD == 0 and captured // USD + swept == 30
    assert await money(ledger, account.account_id) == (100 * USD - captured, 0, captured, 100 * USD)
    assert len((await ledger.usage(account.account_id, page_size=1000)).records) == 30
    assert (await ledger.reconcile()).ok


# -- usage and reconcile ------------------------------------------------------------------------


async def test_usage_is_newest_first_and_paged(ledger: Ledger, clock: ManualClock) -> None:
    account = await ledger.create_account("acme", 10 * USD)
    other = await ledger.create_account("other", 10 * USD)
    for i in range(5):
        rsv = await reserve(ledger, account.account_id, USD, request_id=f"req-{i}")
        await ledger.settle(rsv.reservation_id, captured_micros=USD, images_delivered=1, status="succeeded")
    rsv = await reserve(ledger, other.account_id, USD, request_id="theirs")
    await ledger.release(rsv.reservation_id, error_code="timeout")
    whole = await ledger.usage(account.account_id)
    assert [u.request_id for u in whole.records] == [f"req-{i}" for i in reversed(range(5))]
    assert whole.next_before_id is None
    first = await ledger.usage(account.account_id, page_size=2)
    assert ([u.request_id for u in first.records], first.next_before_id is not None) == (["req-4", "req-3"], True)
    # A row added while paging comes before the first page, never inside a later one.
    rsv = await reserve(ledger, account.account_id, USD, request_id="late")
    await ledger.release(rsv.reservation_id, error_code="timeout")
    second = await ledger.usage(account.account_id, page_size=2, before_id=first.next_before_id)
    assert [u.request_id for u in second.records] == ["req-2", "req-1"]
    last = await ledger.usage(account.account_id, page_size=2, before_id=second.next_before_id)
    assert ([u.request_id for u in last.records], last.next_before_id) == (["req-0"], None)
    exact = await ledger.usage(account.account_id, page_size=6)
    assert (len(exact.records), exact.next_before_id) == (6, None)  # exactly full: no empty last page
    assert [u.request_id for u in (await ledger.usage(other.account_id)).records] == ["theirs"]
    for size in (0, -1, 1001):
        with pytest.raises(InvalidRequestError) as caught:
            await ledger.usage(account.account_id, page_size=size)
        assert caught.value.param == "page_size"


async def test_reconcile_on_an_empty_ledger(ledger: Ledger) -> None:
    report = await ledger.reconcile()
    assert (report.ok, report.accounts_checked, report.mismatches) == (True, 0, [])


async def test_reconcile_holds_with_open_reservations(ledger: Ledger) -> None:
    a = await ledger.create_account("a", 5 * USD)
    b = await ledger.create_account("b", 0)
    await ledger.credit(b.account_id, 3 * USD)
    open_a = await reserve(ledger, a.account_id, 1_500_000)
    done = await reserve(ledger, b.account_id, 2 * USD)
    await ledger.settle(done.reservation_id, captured_micros=1_999_999, images_delivered=1, status="succeeded")
    report = await ledger.reconcile()
    assert (report.ok, report.accounts_checked, report.mismatches) == (True, 2, [])
    assert await money(ledger, a.account_id) == (3_500_000, 1_500_000, 0, 5 * USD)
    assert await money(ledger, b.account_id) == (1_000_001, 0, 1_999_999, 3 * USD)
    assert open_a.amount_micros == 1_500_000


async def test_reconcile_detects_a_corrupted_balance(ledger: Ledger, ledger_engine: AsyncEngine) -> None:
    good = await ledger.create_account("good", 5 * USD)
    bad = await ledger.create_account("bad", 5 * USD)
    rsv = await reserve(ledger, bad.account_id, USD)
    nudge = "UPDATE accounts SET balance_micros = balance_micros + :by WHERE id = :id"
    await execute(ledger_engine, nudge, by=1, id=bad.account_id)
    report = await ledger.reconcile()
    assert (report.ok, report.accounts_checked) == (False, 2)
    assert report.mismatches == [
        f"{bad.account_id}: balance_micros is 4000001 but the ledger says "
        "credits - captures - open reservations = 4000000"
    ]
    assert good.account_id not in "".join(report.mismatches)
    # Undo the corruption: consistent again, and the reservation settles normally.
    await execute(ledger_engine, nudge, by=-1, id=bad.account_id)
    await ledger.settle(rsv.reservation_id, captured_micros=USD, images_delivered=1, status="succeeded")
    assert (await ledger.reconcile()).ok


async def test_reconcile_detects_a_reservation_out_of_step(ledger: Ledger, ledger_engine: AsyncEngine) -> None:
    account = await ledger.create_account("acme", 5 * USD)
    rsv = await reserve(ledger, account.account_id, USD)
    # Closed behind the ledger's back: the row says settled, no entries say so.
    await execute(ledger_engine, "UPDATE reservations SET status = 'settled' WHERE id = :id", id=rsv.reservation_id)
    report = await ledger.reconcile()
    assert not report.ok
    assert report.mismatches == [
        f"{account.account_id}: open reservations hold 0 but the ledger says reserves - captures - releases = {USD}",
        f"{account.account_id}: reservation {rsv.reservation_id} (settled, {USD}) has 0 captured plus released",
    ]


# -- the concurrency proof --------------------------------------------------------------------

K = 37
CALLERS = 200
UNIT = 40_000  # local-1's price of one image, say


@pytest.mark.timeout(120)
@pytest.mark.parametrize("replicas", [1, 2])
async def test_concurrent_reserves_never_overdraw(
    ledger: Ledger, database_url: str, clock: ManualClock, replicas: int
) -> None:
    """200 concurrent one-unit reservations against a balance of exactly 37 units.

    With ``replicas=2`` half the callers go through a second engine and ledger on the
    same database, as two server processes would: then no in-process lock helps, and
    only the database (BEGIN IMMEDIATE on SQLite, row locks on PostgreSQL) decides.
    """
    extra_dbs = [Database(database_url) for _ in range(replicas - 1)]
    try:
        ledgers = [ledger] + [
            Ledger(db, key_hash_secret=SECRET, reservation_ttl_seconds=TTL, clock=clock) for db in extra_dbs
        ]
        account = await ledger.create_account("k-units", K * UNIT)

        started = time.monotonic()
        results = await asyncio.wait_for(
            asyncio.gather(
                *(
                    ledgers[i % replicas].reserve(
                        account.account_id, UNIT, request_id=f"req-{i}", model="local-1", images=1
                    )
                    for i in range(CALLERS)
                ),
                return_exceptions=True,
            ),
            timeout=60,
        )
        elapsed = time.monotonic() - started

        won = [r for r in results if isinstance(r, Reservation)]
        refused = [r for r in results if isinstance(r, InsufficientBalanceError)]
        unexpected = [r for r in results if not isinstance(r, (Reservation, InsufficientBalanceError))]
        assert unexpected == []
        assert (len(won), len(refused)) == (K, CALLERS - K)
        assert len({r.reservation_id for r in won}) == K
        assert await money(ledger, account.account_id) == (0, K * UNIT, 0, K * UNIT)
        assert (await ledger.reconcile()).ok

        captured = await asyncio.wait_for(
            asyncio.gather(
                *(
                    ledgers[i % replicas].settle(
                        r.reservation_id, captured_micros=UNIT, images_delivered=1, status="succeeded"
                    )
                    for i, r in enumerate(won)
                )
            ),
            timeout=60,
        )
        assert captured == [UNIT] * K
        assert await money(ledger, account.account_id) == (0, 0, K * UNIT, K * UNIT)
        report = await ledger.reconcile()
        assert (report.ok, report.accounts_checked, report.mismatches) == (True, 1, [])
        assert len((await ledger.usage(account.account_id, page_size=1000)).records) == K
        assert elapsed < 60
    finally:
        for db in extra_dbs:
            await db.close()
