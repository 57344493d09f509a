"""The ledger: accounts, API keys, prepaid balances, reservations and usage (issue 3).

Money moves in one life cycle, reserve -> capture | release, with a sweeper for
reservations orphaned by a crash; see :mod:`server.ledger.store` for the details and
:mod:`server.ledger.db` for the two database engines (SQLite, PostgreSQL).

Modules:
    money   -- integer micro-dollars and their six-decimal text form
    keys    -- API key format, checksum and keyed hash
    schema  -- the tables (SQLAlchemy Core)
    requests -- request ids of operators' changes (AIP-155): done at most once each
    db      -- :class:`Database` (how transactions run on each engine), ``migrate()``
               (Alembic, in ``migrations/``)
    store   -- :class:`Ledger`, the only API the rest of the server uses
"""

from __future__ import annotations

from server.ledger.db import Database, create_engine, migrate
from server.ledger.keys import generate_api_key, hash_api_key, parse_api_key
from server.ledger.money import format_usd, parse_usd
from server.ledger.requests import Once, Replayed, check_request_id
from server.ledger.store import (
    AccountView,
    KeyView,
    Ledger,
    Principal,
    ReconcileReport,
    Reservation,
    UsagePage,
    UsageView,
)

__all__ = [
    "AccountView",
    "Database",
    "KeyView",
    "Ledger",
    "Once",
    "Principal",
    "ReconcileReport",
    "Replayed",
    "Reservation",
    "UsagePage",
    "UsageView",
    "create_engine",
    "format_usd",
    "check_request_id",
    "generate_api_key",
    "hash_api_key",
    "migrate",
    "parse_api_key",
    "parse_usd",
]
