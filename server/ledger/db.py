"""The ledger's database (SQLite or PostgreSQL): engines, how transactions run, migrations.

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
  ``foreign_keys=ON`` (off by default in SQLite). Within one process writers queue on
  :class:`Database`'s one writer thread, which hands the lock over at once where SQLite's
  busy handler would poll with sleeps; across processes ``BEGIN IMMEDIATE`` is what counts.
* **PostgreSQL** (``postgresql+asyncpg://...``). READ COMMITTED, the default, is what
  the ledger's conditional updates need: ``UPDATE ... WHERE balance_micros >= :x`` waits
  for a concurrent writer's row lock and re-checks its WHERE clause on the new row
  version, so it can never overdraw. The pool is sized for a replica (``Tuning``: 10 + 20
  overflow by default) and pings connections, because replicas outlive database restarts.
  With ``metrics``, the pool reports connections in use, and how long getting one took and
  how often every connection was taken (``imagegw_db_pool_*``): the first sign that a
  replica needs a bigger pool or PostgreSQL more connections (README, "Production").

:func:`migrate` upgrades the schema to the newest Alembic revision, from inside the
server (on start) or the CLI, and is safe when several processes start at once.
"""

from __future__ import annotations

import asyncio
import contextlib
import hashlib
import sqlite3
import time
from collections.abc import AsyncIterator, Callable
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path
from typing import TYPE_CHECKING, Any, Final, TypeVar

import sqlalchemy
from alembic import command
from alembic.config import Config
from sqlalchemy import event, text
from sqlalchemy.engine import Connection, Engine, make_url
from sqlalchemy.engine.interfaces import DBAPIConnection
from sqlalchemy.ext.asyncio import AsyncEngine, create_async_engine
from sqlalchemy.pool import ConnectionPoolEntry

from server.config import DEFAULT_TUNING, Tuning
from server.ledger.plain import Program, run_asyncpg, run_sqlite
from server.ledger.sqlite_writer import SqliteWriter

if TYPE_CHECKING:
    from sqlalchemy.ext.asyncio import AsyncConnection

    from server.metrics import Metrics

__all__ = [
    "MIGRATION_LOCK_KEY",
    "READ_ONLY",
    "SQLITE_BUSY_TIMEOUT_MS",
    "Database",
    "create_engine",
    "create_sqlite_engine",
    "migrate",
    "normalize_url",
]

T = TypeVar("T")

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


def create_engine(
    url: str,
    *,
    pool_size: int = DEFAULT_TUNING.database_pool_size,
    max_overflow: int = DEFAULT_TUNING.database_max_overflow,
) -> AsyncEngine:
    """Builds the async engine for ``url`` with the ledger's per-engine settings
    (``pool_size`` and ``max_overflow``: PostgreSQL's connection pool).

    For an SQLite file, its parent directory is created when missing (the embedded
    default lives under ``var/``). The caller owns the engine and must ``dispose()`` it.
    """
    parsed = make_url(normalize_url(url))
    if parsed.get_backend_name() == "postgresql":
        return create_async_engine(
            parsed,
            pool_size=pool_size,
            max_overflow=max_overflow,
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


def create_sqlite_engine(url: str, *, pool_size: int = 5) -> Engine:
    """A synchronous engine (plain ``sqlite3``) on an SQLite file, for use from threads,
    with the same per-connection settings and ``BEGIN IMMEDIATE`` as :func:`create_engine`.

    Raises:
        ValueError: an in-memory database (each connection would get its own).
    """
    parsed = make_url(normalize_url(url)).set(drivername="sqlite+pysqlite")
    if parsed.database in (None, "", ":memory:") or parsed.query.get("mode") == "memory":
        raise ValueError("an in-memory SQLite database cannot be shared by threads: use a file")
    engine = sqlalchemy.create_engine(
        parsed,
        # The pool hands connections to the writer and reader threads in turn.
        connect_args={"check_same_thread": False},
        pool_size=pool_size,
        max_overflow=0,
    )
    event.listen(engine, "connect", _sqlite_on_connect)
    event.listen(engine, "begin", _sqlite_on_begin)
    return engine


class Database:
    """The ledger's database, and how every transaction on it runs.

    The ledger, the rate limiter and the idempotency keys write through one ``Database``.
    A transaction is one synchronous function of a SQLAlchemy :class:`Connection`, given
    to :meth:`write` (committed when it returns, rolled back when it raises) or
    :meth:`read`:

    * **SQLite**: the function runs, whole, on a thread with plain ``sqlite3``: writes on
      the one writer thread of :class:`~server.ledger.sqlite_writer.SqliteWriter` (SQLite
      has one writer at a time anyway; what queues meanwhile is committed together),
      reads on a few reader threads (WAL readers never wait for the writer). The write
      lock is held while the functions run, not across event-loop turns, one per
      statement, as with an async driver: that made the lock, held ~5 ms per transaction
      under load, the ceiling of the whole server (``bench/README.md``). Other processes
      still queue on ``BEGIN IMMEDIATE``.
    * **PostgreSQL**: the function runs on the event loop through asyncpg
      (``AsyncConnection.run_sync``); no process-wide lock, concurrent transactions.

    The hot transactions are plain-SQL programs (:mod:`server.ledger.plain`) given to
    :meth:`write_plain` or :meth:`read_plain`: the same threads on SQLite, each statement
    straight on ``sqlite3``; on PostgreSQL straight on the asyncpg connection of SQLAlchemy's
    pool. Both kinds of write share SQLite's one writer and its group commits.

    ``engine`` (async) is there for migrations and tools; the caller closes the database
    with :meth:`close`. ``tuning`` sizes the pools, reader threads and writer batches.
    """

    def __init__(self, url: str, *, tuning: Tuning = DEFAULT_TUNING, metrics: Metrics | None = None) -> None:
        self.engine = create_engine(
            url, pool_size=tuning.database_pool_size, max_overflow=tuning.database_max_overflow
        )
        # Connections the PostgreSQL pool may hand out before a transaction must wait.
        self._pool_capacity = tuning.database_pool_size + tuning.database_max_overflow
        readers = tuning.sqlite_readers
        self.dialect: str = self.engine.dialect.name
        self._metrics = metrics
        self._reader = self.engine.execution_options(**READ_ONLY)
        # reconcile() reads aggregates that must agree with each other: on PostgreSQL that
        # needs one snapshot for the whole transaction; an SQLite read is a snapshot already.
        self._snapshot_reader = (
            self._reader.execution_options(isolation_level="REPEATABLE READ")
            if self.dialect == "postgresql"
            else self._reader
        )
        self._sqlite: Engine | None = None
        if self.dialect == "sqlite":
            self._sqlite = create_sqlite_engine(url, pool_size=readers + 1)
            self._sqlite_reader = self._sqlite.execution_options(**READ_ONLY)
            self._writer = SqliteWriter(self._sqlite, max_batch=tuning.sqlite_writer_batch)
            self._readers = ThreadPoolExecutor(readers, thread_name_prefix="imagegw-db-reader")
        if metrics is not None:
            pool = (self._sqlite or self.engine.sync_engine).pool
            event.listen(pool, "checkout", lambda *_: metrics.db_pool_in_use.inc())
            event.listen(pool, "checkin", lambda *_: metrics.db_pool_in_use.dec())

    @contextlib.asynccontextmanager
    async def _connect(self, engine: AsyncEngine) -> AsyncIterator[AsyncConnection]:
        """A pooled PostgreSQL connection; with metrics, times getting it and counts the
        times every connection was in use."""
        if self._metrics is None:
            async with engine.connect() as conn:
                yield conn
            return
        if self.engine.pool.checkedout() >= self._pool_capacity:  # type: ignore[attr-defined]
            self._metrics.db_pool_waits.inc()
        started = time.perf_counter()
        async with engine.connect() as conn:
            self._metrics.db_pool_acquire_seconds.observe(time.perf_counter() - started)
            yield conn

    async def write(self, work: Callable[[Connection], T]) -> T:
        """Runs ``work`` in one write transaction (``BEGIN IMMEDIATE`` on SQLite) and commits;
        whatever it raises rolls the transaction back and propagates."""
        if self._sqlite is None:
            async with self._connect(self.engine) as conn, conn.begin():
                return await conn.run_sync(work)
        return await self._writer.write(work)

    async def write_plain(self, program: Program[T]) -> T:
        """Runs a plain-SQL program in one write transaction and commits, like :meth:`write`."""
        if self._sqlite is None:
            async with self.engine.connect() as conn:
                driver: Any = (await conn.get_raw_connection()).driver_connection
                async with driver.transaction():
                    return await run_asyncpg(driver, program)
        return await self._writer.write_plain(program)

    async def read_plain(self, program: Program[T]) -> T:
        """Runs a plain-SQL program in a read-only transaction (one snapshot)."""
        if self._sqlite is None:
            async with self.engine.connect() as conn:
                driver: Any = (await conn.get_raw_connection()).driver_connection
                async with driver.transaction(readonly=True):
                    return await run_asyncpg(driver, program)
        return await asyncio.get_running_loop().run_in_executor(self._readers, self._read_sqlite_plain, program)

    def _read_sqlite_plain(self, program: Program[T]) -> T:
        assert self._sqlite is not None
        connection = self._sqlite.raw_connection()
        try:
            driver: Any = connection.driver_connection
            driver.execute("BEGIN")
            try:
                return run_sqlite(driver, program)
            finally:
                driver.execute("ROLLBACK")
        finally:
            connection.close()  # back to the pool

    async def write_then(self, work: Callable[[Connection], T], then: Callable[[T], None]) -> T:
        """Like :meth:`write`, then calls ``then(result)`` once the transaction committed,
        even if the caller was cancelled meanwhile: the transaction runs to its end either
        way (on SQLite it would anyway), so an operator's change that committed is always
        followed by its log line, never lost with a client that stopped waiting."""

        async def write_and_then() -> T:
            result = await self.write(work)
            then(result)
            return result

        task = asyncio.ensure_future(write_and_then())
        # Its outcome is the caller's; if the caller is gone, nobody else wants it.
        task.add_done_callback(lambda done: done.cancelled() or done.exception())
        return await asyncio.shield(task)

    async def read(self, work: Callable[[Connection], T], *, snapshot: bool = False) -> T:
        """Runs ``work`` in a read-only transaction (rolled back); ``snapshot`` makes every
        statement in it see the same snapshot (REPEATABLE READ on PostgreSQL)."""
        if self._sqlite is None:
            async with self._connect(self._snapshot_reader if snapshot else self._reader) as conn:
                return await conn.run_sync(work)
        return await asyncio.get_running_loop().run_in_executor(self._readers, self._read_sqlite, work)

    def _read_sqlite(self, work: Callable[[Connection], T]) -> T:
        with self._sqlite_reader.begin() as conn:
            return work(conn)

    async def close(self) -> None:
        """Waits for the transactions in progress, then closes every connection."""
        if self._sqlite is not None:
            # Joining the threads blocks; a worker thread does it, not the loop.
            await self._writer.close()
            await asyncio.to_thread(self._readers.shutdown)
            await asyncio.to_thread(self._sqlite.dispose)
        await self.engine.dispose()


def _set_wal(cursor: Any) -> None:
    # Two connections switching a fresh file to WAL at the same moment: SQLite answers the
    # loser "database is locked" at once, without consulting busy_timeout. This runs in
    # a database thread (aiosqlite's, or the writer's or a reader's), so a short blocking
    # wait here never stalls the event loop.
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
