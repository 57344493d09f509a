"""The ledger's tables, as SQLAlchemy Core metadata (one schema for SQLite and PostgreSQL).

This module describes the schema *as the code sees it*; the database is created and
changed only by the Alembic revisions in ``server/ledger/migrations/versions/`` (which
spell the tables out, so that an old revision never changes when this file does).
``tests/service/test_ledger.py`` checks that the two agree.

* ``accounts``: one row per account. ``balance_micros`` (available money),
  ``reserved_micros`` (held by requests in flight), ``spent_micros`` (captured) and
  ``credited_micros`` (all credits) are caches of the ledger, updated in the same
  transaction as the entries that justify them; ``balance + reserved + spent ==
  credited`` always, and ``CHECK (balance_micros >= 0)`` makes overdraft impossible
  even for a buggy query.
* ``api_keys``: only the HMAC of a key is stored; ``revoked_at`` is set once.
* ``reservations``: money held for one request, ``open`` until the request path
  settles it (``settled``) or the sweeper releases it after ``expires_at`` (``expired``).
* ``ledger_entries``: append-only (database triggers refuse UPDATE and DELETE). Kinds:
  ``credit`` (money in), ``reserve`` (available -> held), ``capture`` (held -> spent),
  ``release`` (held -> available). Amounts are never negative; the kind gives the sign.
* ``usage_records``: one row per settled reservation (UNIQUE ``reservation_id``), what
  ``imagegw usage`` lists.
* ``accounts.rate_limit_rpm`` / ``rate_limit_ipm``: per-account overrides of the
  per-key rate limits (NULL: the server default; 0: unlimited), see :mod:`server.ratelimit`.
* ``rate_limit_counters``: one row per API key, the requests and images counted in its
  current one-minute window (:mod:`server.ratelimit`).
* ``idempotency_keys``: one row per (account, ``Idempotency-Key``): the request's hash,
  ``in_progress`` while its first attempt runs (owned by ``owner`` until
  ``locked_until``), then ``completed`` with the serialized response, until
  ``expires_at`` (:mod:`server.idempotency`).
* ``admin_requests``: one row per ``request_id`` of a mutating admin call (AIP-155): the
  method, a hash of the request and the response the first call got, written in the
  same transaction as the change itself (:mod:`server.ledger.requests`).

Money columns are BIGINT micro-dollars; times are BIGINT unix seconds.
"""

from __future__ import annotations

from sqlalchemy import (
    BigInteger,
    CheckConstraint,
    Column,
    ForeignKey,
    Index,
    Integer,
    LargeBinary,
    MetaData,
    String,
    Table,
    Text,
)

__all__ = [
    "ENTRY_KINDS",
    "IDEMPOTENCY_STATES",
    "RESERVATION_STATUSES",
    "USAGE_STATUSES",
    "accounts",
    "admin_requests",
    "api_keys",
    "idempotency_keys",
    "ledger_entries",
    "metadata",
    "rate_limit_counters",
    "reservations",
    "usage_records",
]

ENTRY_KINDS = ("credit", "reserve", "capture", "release")
RESERVATION_STATUSES = ("open", "settled", "expired")
USAGE_STATUSES = ("succeeded", "failed")
IDEMPOTENCY_STATES = ("in_progress", "completed")

# Deterministic constraint names, so that migrations can refer to them on both engines.
metadata = MetaData(
    naming_convention={
        "ix": "ix_%(table_name)s_%(column_0_N_name)s",
        "uq": "uq_%(table_name)s_%(column_0_N_name)s",
        "ck": "ck_%(table_name)s_%(constraint_name)s",
        "fk": "fk_%(table_name)s_%(column_0_name)s_%(referred_table_name)s",
        "pk": "pk_%(table_name)s",
    }
)

# SQLite only auto-increments an "INTEGER PRIMARY KEY" (a rowid alias); BIGINT would not.
_SERIAL = BigInteger().with_variant(Integer(), "sqlite")


def _in(column: str, values: tuple[str, ...]) -> str:
    return f"{column} IN ({', '.join(repr(v) for v in values)})"


accounts = Table(
    "accounts",
    metadata,
    Column("id", String(40), primary_key=True),
    Column("name", String(100), nullable=False, unique=True),
    Column("balance_micros", BigInteger, nullable=False),
    Column("reserved_micros", BigInteger, nullable=False),
    Column("spent_micros", BigInteger, nullable=False),
    Column("credited_micros", BigInteger, nullable=False),
    Column("created_at", BigInteger, nullable=False),
    # Rate-limit overrides for each of the account's keys; NULL: server default, 0: unlimited.
    Column("rate_limit_rpm", Integer, nullable=True),
    Column("rate_limit_ipm", Integer, nullable=True),
    CheckConstraint("balance_micros >= 0", name="balance_not_negative"),
    CheckConstraint("reserved_micros >= 0", name="reserved_not_negative"),
    CheckConstraint("spent_micros >= 0", name="spent_not_negative"),
    CheckConstraint("credited_micros >= 0", name="credited_not_negative"),
)

api_keys = Table(
    "api_keys",
    metadata,
    Column("id", String(40), primary_key=True),
    Column("account_id", String(40), ForeignKey("accounts.id"), nullable=False, index=True),
    Column("name", String(100), nullable=False),
    Column("key_hash", String(64), nullable=False),
    Column("created_at", BigInteger, nullable=False),
    Column("revoked_at", BigInteger, nullable=True),
)

reservations = Table(
    "reservations",
    metadata,
    Column("id", String(40), primary_key=True),
    Column("account_id", String(40), ForeignKey("accounts.id"), nullable=False, index=True),
    Column("request_id", String(255), nullable=False),
    Column("model", String(255), nullable=False),
    Column("images", Integer, nullable=False),
    Column("amount_micros", BigInteger, nullable=False),
    Column("status", String(16), nullable=False),
    Column("captured_micros", BigInteger, nullable=True),
    Column("created_at", BigInteger, nullable=False),
    Column("expires_at", BigInteger, nullable=False),
    Column("closed_at", BigInteger, nullable=True),
    CheckConstraint("amount_micros >= 0", name="amount_not_negative"),
    CheckConstraint(
        "captured_micros IS NULL OR (captured_micros >= 0 AND captured_micros <= amount_micros)",
        name="captured_within_amount",
    ),
    CheckConstraint(_in("status", RESERVATION_STATUSES), name="status_known"),
    # The sweeper's query: open reservations past their deadline.
    Index("ix_reservations_status_expires_at", "status", "expires_at"),
)

ledger_entries = Table(
    "ledger_entries",
    metadata,
    Column("id", _SERIAL, primary_key=True, autoincrement=True),
    Column("account_id", String(40), ForeignKey("accounts.id"), nullable=False, index=True),
    Column("kind", String(16), nullable=False),
    Column("amount_micros", BigInteger, nullable=False),
    Column("reservation_id", String(40), ForeignKey("reservations.id"), nullable=True, index=True),
    Column("created_at", BigInteger, nullable=False),
    CheckConstraint("amount_micros >= 0", name="amount_not_negative"),
    CheckConstraint(_in("kind", ENTRY_KINDS), name="kind_known"),
)

usage_records = Table(
    "usage_records",
    metadata,
    Column("id", _SERIAL, primary_key=True, autoincrement=True),
    Column("account_id", String(40), ForeignKey("accounts.id"), nullable=False),
    # UNIQUE: a reservation is billed at most once, whatever races the code has.
    Column("reservation_id", String(40), ForeignKey("reservations.id"), nullable=False, unique=True),
    Column("request_id", String(255), nullable=False),
    Column("model", String(255), nullable=False),
    Column("images_requested", Integer, nullable=False),
    Column("images_delivered", Integer, nullable=False),
    Column("cost_micros", BigInteger, nullable=False),
    Column("status", String(16), nullable=False),
    Column("error_code", String(100), nullable=False),
    Column("created_at", BigInteger, nullable=False),
    CheckConstraint("cost_micros >= 0", name="cost_not_negative"),
    CheckConstraint(_in("status", USAGE_STATUSES), name="status_known"),
    # `imagegw usage`: an account's rows, newest first.
    Index("ix_usage_records_account_id_id", "account_id", "id"),
)

rate_limit_counters = Table(
    "rate_limit_counters",
    metadata,
    Column("key_id", String(40), ForeignKey("api_keys.id"), primary_key=True),
    # Unix time of the start of the key's current one-minute window.
    Column("window_start", BigInteger, nullable=False),
    Column("requests", Integer, nullable=False),
    Column("images", Integer, nullable=False),
)

idempotency_keys = Table(
    "idempotency_keys",
    metadata,
    Column("account_id", String(40), ForeignKey("accounts.id"), primary_key=True),
    Column("idempotency_key", String(255), primary_key=True),
    # SHA-256 (hex) of the method and the canonical request.
    Column("request_hash", String(64), nullable=False),
    Column("state", String(16), nullable=False),
    # The attempt that holds an in_progress row, and until when (then it is abandoned).
    Column("owner", String(40), nullable=True),
    Column("locked_until", BigInteger, nullable=True),
    Column("request_id", String(255), nullable=False),
    # The serialized response message and its response headers (JSON), once completed.
    Column("response", LargeBinary, nullable=True),
    Column("response_headers", Text, nullable=True),
    Column("created_at", BigInteger, nullable=False),
    Column("expires_at", BigInteger, nullable=False),
    CheckConstraint(_in("state", IDEMPOTENCY_STATES), name="state_known"),
    # The sweeper's query: rows past their expiry.
    Index("ix_idempotency_keys_expires_at", "expires_at"),
)

admin_requests = Table(
    "admin_requests",
    metadata,
    Column("request_id", String(100), primary_key=True),
    # The RPC, for example "CreditAccount".
    Column("method", String(100), nullable=False),
    # SHA-256 (hex) of the method and the canonical request.
    Column("request_hash", String(64), nullable=False),
    # The serialized response message; NULL only inside the claiming transaction.
    Column("response", LargeBinary, nullable=True),
    Column("created_at", BigInteger, nullable=False),
)
