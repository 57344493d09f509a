"""The hot transactions in plain SQL, run by each engine's own driver.

Every generation runs a few short transactions (admission before the upstream call,
settlement after it, a key lookup). Through SQLAlchemy each statement costs about a
hundred microseconds of Python (execution context, result proxy, events); measured on
SQLite, a reservation took 300 µs and a settlement 475 µs of CPU, against 26 µs and a
similar figure as the same statements run straight on ``sqlite3`` (``bench/README.md``,
round three). That Python runs under the GIL the event loop needs. So these
transactions are written once as **programs**, and each driver runs them:

* A program is a generator that yields statements (:class:`Execute`: the number of rows
  it changed comes back; :class:`Fetch`: its first row, a tuple, or None) and returns
  the transaction's result. It holds the logic once for both engines and composes with
  ``yield from`` (admission is the rate limit, the idempotency claim and the reservation
  in one transaction).
* SQL is written once, with PostgreSQL's numbered parameters (``$1``); :class:`Sql`
  keeps SQLite's spelling of the same text (``?1``), which binds the same tuple.
* :func:`run_sqlite` runs a program on a ``sqlite3`` connection (the writer or a reader
  thread, inside the transaction :class:`~server.ledger.db.Database` opened);
  :func:`run_asyncpg` on an asyncpg connection, awaiting each statement.

SQLAlchemy keeps everything else (administration, listings, the sweepers, migrations),
where clarity matters more than microseconds.
"""

from __future__ import annotations

import re
from collections.abc import Generator
from dataclasses import dataclass
from typing import Any, TypeVar

__all__ = ["Execute", "Fetch", "Program", "Sql", "run_asyncpg", "run_sqlite"]

T = TypeVar("T")

_NUMBERED = re.compile(r"\$(\d+)")


class Sql:
    """One statement's text for both engines: PostgreSQL's ``$n`` parameters, and the
    same text with SQLite's ``?n`` (both bind the n-th value of one tuple)."""

    __slots__ = ("postgresql", "sqlite")

    def __init__(self, text: str) -> None:
        self.postgresql = " ".join(text.split())
        self.sqlite = _NUMBERED.sub(r"?\1", self.postgresql)

    def __repr__(self) -> str:
        return f"Sql({self.postgresql!r})"


@dataclass(frozen=True, slots=True)
class Execute:
    """Runs a statement; the program receives how many rows it changed."""

    sql: Sql
    args: tuple[Any, ...] = ()


@dataclass(frozen=True, slots=True)
class Fetch:
    """Runs a statement; the program receives its first row (a tuple) or None."""

    sql: Sql
    args: tuple[Any, ...] = ()


Program = Generator[Execute | Fetch, Any, T]


def run_sqlite(connection: Any, program: Program[T]) -> T:
    """Runs ``program`` on a ``sqlite3`` connection, in the transaction already open."""
    reply: Any = None
    try:
        while True:
            step = program.send(reply)
            cursor = connection.execute(step.sql.sqlite, step.args)
            reply = cursor.fetchone() if type(step) is Fetch else cursor.rowcount
    except StopIteration as done:
        return done.value  # type: ignore[no-any-return]
    finally:
        program.close()


async def run_asyncpg(connection: Any, program: Program[T]) -> T:
    """Runs ``program`` on an asyncpg connection, in the transaction already open."""
    reply: Any = None
    try:
        while True:
            step = program.send(reply)
            if type(step) is Fetch:
                row = await connection.fetchrow(step.sql.postgresql, *step.args)
                reply = None if row is None else tuple(row)
            else:
                # asyncpg returns the command tag: "UPDATE 1", "INSERT 0 1", "DELETE 3".
                tag = await connection.execute(step.sql.postgresql, *step.args)
                reply = int(tag.rsplit(" ", 1)[-1])
    except StopIteration as done:
        return done.value  # type: ignore[no-any-return]
    finally:
        program.close()
