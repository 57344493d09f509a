"""Database engines for the ledger (SQLite or PostgreSQL) and the migration runner.

One schema, two engines:

* **SQLite** (``sqlite+aiosqlite:///var/imagegw.db``, the embedded default). SQLite allows
  one writer at a time. Left to itself, Python's ``sqlite3`` opens a *deferred*
  transaction, which takes the write lock only at the first write; two such
  transactions that both read first then both try to write deadlock, and SQLite fails
  one of them at once with ``database is locked`` (the busy timeout cannot help: waiting
  would never end). So every connection is switched to explicit transaction control
  and :func:`create_engine` emits ``BEGIN IMMEDIATE`` for every transaction: a writer
  takes the write lock *before* its first statement, and concurrent writers (other
  coroutines, other processes) queue on ``busy_timeout`` (30 s) instead of failing.
  Read-only work opts out through :data:`READ_ONLY` (plain deferred ``BEGIN``): in WAL
  mode readers never wait for the writer, so authentication and listings are not
  serialised behind reservations. Also per connection: ``journal_mode=WAL``,
  ``foreign_keys=ON`` (off by default in SQLite). Within one process the ledger also
  queues its writers on an asyncio lock (see ``Ledger._write``), which is faster than
  SQLite's sleeping busy handler; across processes ``BEGIN IMMEDIATE`` is what counts.
* **PostgreSQL** (``postgresql+asyncpg://...``). READ COMMITTED, the default, is what
  the ledger's conditional updates need: ``UPDATE ... WHERE balance_micros >= :x`` waits
  for a concurrent writer's row lock and re-checks its WHERE clause on the new row
  version, so it can never overdraw. The pool is sized for a replica (10 + 20 overflow)
  and pings connections, because replicas outlive database restarts.

:func:`migrate` upgrades the schema to the newest Alembic revision, from inside the
server (on start) or the CLI, and is safe when several processes start at once.
"""

from __future__ import annotations

import asyncio
import hashlib
import sqlite3
import time
import weakref
from collections.abc import AsyncIterator
from contextlib import asynccontextmanager
from pathlib import Path
from typing import Any, Final

from alembic import command
from alembic.config import Config
from sqlalchemy import event, text
from sqlalchemy.engine import Connection, make_url
from sqlalchemy.engine.interfaces import DBAPIConnection
from sqlalchemy.ext.asyncio import AsyncConnection, AsyncEngine, create_async_engine
from sqlalchemy.pool import ConnectionPoolEntry

__all__ = [
    "MIGRATION_LOCK_KEY",
    "READ_ONLY",
    "SQLITE_BUSY_TIMEOUT_MS",
    "create_engine",
    "migrate",
    "normalize_url",
    "write_lock",
    "write_transaction",
]

SQLITE_BUSY_TIMEOUT_MS: Final = 30_000
# Execution option marking read-only work: on SQLite it gets a deferred BEGIN instead of
# BEGIN IMMEDIATE (see the module docstring); other engines ignore it.
READ_ONLY: Final[dict[str, Any]] = {"imagegw_read_only": True}

_ALEMBIC_INI: Final = Path(__file__).with_name("alembic.ini")
# Key of the PostgreSQL advisory lock that serialises migrations across processes: a
# fixed 64-bit number derived from a name, so that it cannot collide by accident.
MIGRATION_LOCK_KEY: Final = int.from_bytes(hashlib.sha256(b"imagegw.ledger.migrate").digest()[:8], "big", signed=True)


def normalize_url(url: str) -> str:
    """Puts the async driver into a database URL (``sqlite://`` -> ``sqlite+aiosqlite://``,
    ``postgres://`` and ``postgresql://`` -> ``postgresql+asyncpg://``), so operators can
    paste the URL their database provider gives them.

    Raises:
        ValueError: not an SQLite or PostgreSQL URL, or another driver was named.
    """
    parsed = make_url(url)
    backend, _, driver = parsed.drivername.partition("+")
    if backend == "sqlite" and driver in ("", "aiosqlite"):
        parsed = parsed.set(drivername="sqlite+aiosqlite")
    elif backend in ("postgres", "postgresql") and driver in ("", "asyncpg"):
        parsed = parsed.set(drivername="postgresql+asyncpg")
    else:
        raise ValueError(
            f"unsupported database URL scheme {parsed.drivername!r}: use sqlite+aiosqlite:// or postgresql+asyncpg://"
        )
    return parsed.render_as_string(hide_password=False)


def create_engine(url: str) -> AsyncEngine:
    """Builds the async engine for ``url`` with the ledger's per-engine settings.

    For an SQLite file, its parent directory is created when missing (the embedded
    default lives under ``var/``). The caller owns the engine and must ``dispose()`` it.
    """
    parsed = make_url(normalize_url(url))
    if parsed.get_backend_name() == "postgresql":
        return create_async_engine(
            parsed,
            pool_size=10,
            max_overflow=20,
            pool_pre_ping=True,
            # Recycle before typical server/proxy idle timeouts cut connections.
            pool_recycle=1800,
            connect_args={"server_settings": {"application_name": "imagegw"}},
        )
    database = parsed.database or ""
    in_memory = database in ("", ":memory:") or parsed.query.get("mode") == "memory"
    if not in_memory and not database.startswith("file:"):
        Path(database).expanduser().parent.mkdir(parents=True, exist_ok=True)
    engine = create_async_engine(parsed)
    event.listen(engine.sync_engine, "connect", _sqlite_on_connect)
    event.listen(engine.sync_engine, "begin", _sqlite_on_begin)
    return engine


# One writer queue per SQLite engine, shared by every component that writes through it
# (ledger, idempotency keys, rate-limit counters); see write_lock().
_WRITE_LOCKS: weakref.WeakKeyDictionary[AsyncEngine, asyncio.Lock] = weakref.WeakKeyDictionary()


def write_lock(engine: AsyncEngine) -> asyncio.Lock | None:
    """The in-process queue of SQLite writers on ``engine`` (None on PostgreSQL).

    SQLite has one writer at a time anyway. Queueing this process's writers on an
    asyncio lock hands the write lock over as soon as it is free, where SQLite's busy
    handler would poll with sleeps; other processes still queue on ``busy_timeout``.
    Every component that writes through the same engine gets the same lock, so they
    queue together instead of competing through the busy handler.
    """
    if engine.dialect.name != "sqlite":
        return None
    lock = _WRITE_LOCKS.get(engine)
    if lock is None:
        lock = _WRITE_LOCKS[engine] = asyncio.Lock()
    return lock


@asynccontextmanager
async def write_transaction(engine: AsyncEngine) -> AsyncIterator[AsyncConnection]:
    """One short write transaction (BEGIN IMMEDIATE on SQLite, behind :func:`write_lock`),
    committed on exit, rolled back on an exception."""
    lock = write_lock(engine)
    if lock is None:
        async with engine.begin() as conn:
            yield conn
        return
    async with lock, engine.begin() as conn:
        yield conn


def _set_wal(cursor: Any) -> None:
    # Two connections switching a fresh file to WAL at the same moment: SQLite answers the
    # loser "database is locked" at once, without consulting busy_timeout. This runs in
    # aiosqlite's worker thread, so a short blocking wait here never stalls the event loop.
    for attempt in range(100):
        try:
            cursor.execute("PRAGMA journal_mode = WAL")
            return
        except sqlite3.OperationalError as exc:
            if exc.sqlite_errorcode != sqlite3.SQLITE_BUSY or attempt == 99:
                raise
            time.sleep(0.02)


def _sqlite_on_connect(dbapi_connection: DBAPIConnection, _record: ConnectionPoolEntry) -> None:
    # Take transaction control away from the sqlite3 module (it would emit a deferred
    # BEGIN before DML only); _sqlite_on_begin emits our own BEGIN. SQLAlchemy's
    # documented recipe for Python < 3.12 (sqlite3 has no `autocommit` attribute there).
    dbapi_connection.isolation_level = None  # type: ignore[attr-defined]
    cursor = dbapi_connection.cursor()
    try:
        # busy_timeout first: switching to WAL needs a lock another process may hold.
        cursor.execute(f"PRAGMA busy_timeout = {SQLITE_BUSY_TIMEOUT_MS}")
        cursor.execute("PRAGMA foreign_keys = ON")
        # WAL: readers and the one writer do not block each other. The setting is
        # persistent in the file; re-asserting it is a no-op. (In-memory: stays "memory".)
        _set_wal(cursor)
        # synchronous stays at its default, FULL: a committed capture or credit must
        # survive a power cut, and the ledger's write rate makes the fsync affordable.
    finally:
        cursor.close()


def _sqlite_on_begin(connection: Connection) -> None:
    read_only = connection.get_execution_options().get("imagegw_read_only", False)
    connection.exec_driver_sql("BEGIN" if read_only else "BEGIN IMMEDIATE")


def _alembic_config() -> Config:
    config = Config(str(_ALEMBIC_INI))
    # Absolute, so neither the working directory nor how the package was installed matters.
    config.set_main_option("script_location", str(_ALEMBIC_INI.with_name("migrations")))
    return config


def _upgrade(connection: Connection, config: Config) -> None:
    config.attributes["connection"] = connection
    command.upgrade(config, "head")


async def migrate(engine_or_url: AsyncEngine | str) -> None:
    """Upgrades the ledger schema to the newest revision (``alembic upgrade head``).

    Runs the whole upgrade in one transaction on one connection; Alembic's synchronous
    API is driven through ``AsyncConnection.run_sync``, so every database round trip is
    awaited on the event loop's driver (only reading the few small revision files is
    synchronous, once, at start-up).

    Safe when several processes start at once against the same database: on PostgreSQL
    the transaction first takes a transaction-scoped advisory lock
    (``pg_advisory_xact_lock``), on SQLite the ``BEGIN IMMEDIATE`` write lock; the
    second process waits, then finds the schema at head and does nothing.

    Args:
        engine_or_url: an engine from :func:`create_engine` (left open), or a URL (an
            engine is made for the upgrade and disposed).
    """
    engine = engine_or_url if isinstance(engine_or_url, AsyncEngine) else create_engine(engine_or_url)
    try:
        config = _alembic_config()
        async with engine.begin() as connection:
            if connection.dialect.name == "postgresql":
                await connection.execute(text("SELECT pg_advisory_xact_lock(:key)"), {"key": MIGRATION_LOCK_KEY})
            await connection.run_sync(_upgrade, config)
    finally:
        if engine is not engine_or_url:
            await engine.dispose()
