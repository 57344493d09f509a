"""SQLite's one writer, with group commit: many write transactions, one COMMIT.

SQLite has a single write lock and, with ``synchronous=FULL``, one fsync per COMMIT. Run
one by one, the write transactions of a busy server queue behind each other's fsync and
behind the GIL, which the thread running them must win back after every statement. When
a 1-second upstream answers 64 requests at once, 64 settlements (and the next wave's
rate-limit counts and reservations) arrive together.

So one thread runs every write transaction, and whatever has queued while it was busy is
run together in **one** SQLite transaction (``BEGIN IMMEDIATE`` ... ``COMMIT``), each unit
inside its own ``SAVEPOINT``:

* a unit that raises is rolled back to its savepoint alone; its caller gets the
  exception and the other units go on (exactly as if it had been its own transaction);
* every caller gets its result only after the shared COMMIT succeeded, so a result
  always means "durable"; if the COMMIT fails, every unit of the batch gets that error
  and none of them happened;
* the units of one batch run one after the other on one connection, each seeing the
  ones before it, so the outcome is that of running them in that order.

A batch holds the write lock no longer than its units take to run, and at most
``max_batch`` units: other processes on the same file still get their turn. A lone unit
runs without a savepoint.
"""

from __future__ import annotations

import asyncio
import logging
import queue
import threading
from collections.abc import Callable, Generator
from dataclasses import dataclass
from typing import Any, Final, Generic, TypeVar

from sqlalchemy.engine import Connection, Engine

from server.config import DEFAULT_TUNING
from server.ledger.plain import Program, run_sqlite

__all__ = ["SqliteWriter"]

log = logging.getLogger(__name__)

T = TypeVar("T")
_STOP: Final = object()


@dataclass(slots=True)
class _Unit(Generic[T]):
    # A function of SQLAlchemy's connection, or a plain-SQL program (server.ledger.plain).
    work: Callable[[Connection], T] | Program[T]
    future: asyncio.Future[T]
    result: Any = None
    error: BaseException | None = None


class SqliteWriter:
    """Runs write transactions on one thread, committing what has queued together.

    The thread keeps one connection for its whole life (no pool checkout per batch) and
    marks each unit's savepoint on the ``sqlite3`` connection itself.

    Args:
        engine: a synchronous SQLite engine whose ``begin`` emits ``BEGIN IMMEDIATE``.
        max_batch: at most this many units per COMMIT.
    """

    def __init__(
        self, engine: Engine, *, max_batch: int = DEFAULT_TUNING.sqlite_writer_batch, name: str = "imagegw-db-writer"
    ) -> None:
        self._engine = engine
        self._max_batch = max_batch
        self._queue: queue.SimpleQueue[Any] = queue.SimpleQueue()
        self._thread = threading.Thread(target=self._run, name=name, daemon=True)
        self._thread.start()

    async def write(self, work: Callable[[Connection], T]) -> T:
        """Runs ``work`` in a write transaction; returns once it is committed."""
        future: asyncio.Future[T] = asyncio.get_running_loop().create_future()
        self._queue.put(_Unit(work, future))
        return await future

    async def write_plain(self, program: Program[T]) -> T:
        """Runs a plain-SQL program in a write transaction; returns once it is committed."""
        future: asyncio.Future[T] = asyncio.get_running_loop().create_future()
        self._queue.put(_Unit(program, future))
        return await future

    async def close(self) -> None:
        """Finishes what is queued, then stops the thread."""
        self._queue.put(_STOP)
        await asyncio.to_thread(self._thread.join)

    # -- the writer thread ------------------------------------------------------------

    def _run(self) -> None:
        conn: Connection | None = None
        try:
            while True:
                first = self._queue.get()
                if first is _STOP:
                    return
                batch = [first]
                stopping = False
                while len(batch) < self._max_batch:
                    try:
                        unit = self._queue.get_nowait()
                    except queue.Empty:
                        break
                    if unit is _STOP:
                        stopping = True
                        break
                    batch.append(unit)
                if conn is None:
                    conn = self._connect(batch)
                if conn is not None and not self._commit(conn, batch):
                    # BEGIN or COMMIT itself failed: start the next batch on a fresh connection.
                    conn.close()
                    conn = None
                self._deliver(batch)
                if stopping:
                    return
        finally:
            if conn is not None:
                conn.close()

    def _connect(self, batch: list[_Unit[Any]]) -> Connection | None:
        try:
            return self._engine.connect()
        except Exception as exc:
            for unit in batch:
                unit.error = exc
            return None

    @staticmethod
    def _unit(conn: Connection, driver: Any, unit: _Unit[Any]) -> Any:
        if isinstance(unit.work, Generator):
            return run_sqlite(driver, unit.work)
        return unit.work(conn)

    def _commit(self, conn: Connection, batch: list[_Unit[Any]]) -> bool:
        """Runs ``batch`` in one transaction. False when the transaction itself failed
        (BEGIN, a savepoint or COMMIT), not merely a unit in it."""
        own_error = False
        try:
            with conn.begin():
                driver: Any = conn.connection.driver_connection
                if len(batch) == 1:
                    unit = batch[0]
                    try:
                        unit.result = self._unit(conn, driver, unit)
                    except Exception as exc:
                        unit.error = exc
                        own_error = True
                        raise
                else:
                    for unit in batch:
                        # Straight on sqlite3: SQLAlchemy's begin_nested() was a third of
                        # the writer's CPU per unit, exec_driver_sql still tens of µs.
                        driver.execute("SAVEPOINT unit")
                        try:
                            unit.result = self._unit(conn, driver, unit)
                        except Exception as exc:
                            driver.execute("ROLLBACK TO unit")
                            unit.error = exc
                        driver.execute("RELEASE unit")
        except Exception as exc:
            # A lone unit's own error, or BEGIN/COMMIT failing: nothing of the batch
            # was committed, so every unit fails with it (its own error if it had one).
            for unit in batch:
                if unit.error is None:
                    unit.error = exc
            return own_error
        return True

    @staticmethod
    def _deliver(batch: list[_Unit[Any]]) -> None:
        # One wake-up of each waiting loop per batch, not one per unit.
        loops: dict[asyncio.AbstractEventLoop, list[_Unit[Any]]] = {}
        for unit in batch:
            loops.setdefault(unit.future.get_loop(), []).append(unit)
        for loop, units in loops.items():
            try:
                loop.call_soon_threadsafe(_resolve, units)
            except RuntimeError:
                log.warning("a write transaction finished after its event loop closed")


def _resolve(units: list[_Unit[Any]]) -> None:
    for unit in units:
        if unit.future.done():  # the caller was cancelled; the transaction still happened
            continue
        if unit.error is not None:
            unit.future.set_exception(unit.error)
        else:
            unit.future.set_result(unit.result)
