"""The SQLite writer's group commit on a real SQLite file: what queues together commits
together, a failing transaction is undone alone, a result means committed.

Commits are counted with SQLAlchemy's own ``commit`` event on the engine the writer uses.
"""

from __future__ import annotations

import asyncio
import sqlite3
import time
from pathlib import Path
from typing import Any

import pytest
from sqlalchemy import event
from sqlalchemy.engine import Connection, Engine

from server.ledger.db import create_sqlite_engine
from server.ledger.sqlite_writer import SqliteWriter


class Boom(Exception):
    pass


@pytest.fixture
def engine(tmp_path: Path) -> Engine:
    engine = create_sqlite_engine(f"sqlite:///{tmp_path / 'w.db'}")
    with engine.begin() as conn:
        conn.exec_driver_sql("CREATE TABLE t (id INTEGER PRIMARY KEY, v TEXT NOT NULL)")
    return engine


def count_commits(engine: Engine) -> list[int]:
    commits = [0]

    def on_commit(_conn: Any) -> None:
        commits[0] += 1

    event.listen(engine, "commit", on_commit)
    return commits


def insert(value: str, *, fail: bool = False) -> Any:
    def work(conn: Connection) -> int:
        row_id = conn.exec_driver_sql("INSERT INTO t (v) VALUES (?) RETURNING id", (value,)).scalar_one()
        if fail:
            raise Boom(value)  # after writing: the savepoint must undo the insert
        return int(row_id)

    return work


def values(path: Path) -> list[str]:
    with sqlite3.connect(path) as conn:
        return [row[0] for row in conn.execute("SELECT v FROM t ORDER BY id")]


async def test_queued_transactions_share_commits_and_a_failure_is_undone_alone(
    engine: Engine, tmp_path: Path
) -> None:
    commits = count_commits(engine)
    writer = SqliteWriter(engine)
    try:
        results = await asyncio.gather(
            *(writer.write(insert(f"v{i}", fail=i % 10 == 3)) for i in range(100)), return_exceptions=True
        )
    finally:
        await writer.close()
    failed = [r for r in results if isinstance(r, Boom)]
    assert [str(e) for e in failed] == [f"v{i}" for i in range(100) if i % 10 == 3]
    assert all(isinstance(r, int) for r in results if not isinstance(r, Boom))
    assert values(tmp_path / "w.db") == [f"v{i}" for i in range(100) if i % 10 != 3]
    # 100 transactions were queued at once: at most 64 per commit, so a handful of commits.
    assert 2 <= commits[0] <= 10


async def test_a_lone_transaction_commits_before_its_result_and_rolls_back_on_error(
    engine: Engine, tmp_path: Path
) -> None:
    commits = count_commits(engine)
    writer = SqliteWriter(engine)
    try:
        assert await writer.write(insert("a")) == 1
        assert values(tmp_path / "w.db") == ["a"]  # visible to another connection at once
        with pytest.raises(Boom):
            await writer.write(insert("b", fail=True))
        assert values(tmp_path / "w.db") == ["a"]
        assert commits[0] == 1
    finally:
        await writer.close()


async def test_a_cancelled_caller_does_not_stop_its_transaction(engine: Engine, tmp_path: Path) -> None:
    writer = SqliteWriter(engine)
    try:
        started = asyncio.Event()
        loop = asyncio.get_running_loop()

        def slow(conn: Connection) -> None:
            loop.call_soon_threadsafe(started.set)
            conn.exec_driver_sql("INSERT INTO t (v) VALUES ('slow')")
            time.sleep(0.2)  # the caller is cancelled meanwhile

        task = asyncio.create_task(writer.write(slow))
        await started.wait()
        task.cancel()
        with pytest.raises(asyncio.CancelledError):
            await task
        assert await writer.write(insert("after")) == 2  # the writer is still healthy
    finally:
        await writer.close()
    assert values(tmp_path / "w.db") == ["slow", "after"]


async def test_close_finishes_what_is_queued(engine: Engine, tmp_path: Path) -> None:
    writer = SqliteWriter(engine)
    pending = [asyncio.ensure_future(writer.write(insert(f"q{i}"))) for i in range(20)]
    await asyncio.sleep(0)
    await writer.close()
    assert sorted(await asyncio.gather(*pending)) == list(range(1, 21))
    assert len(values(tmp_path / "w.db")) == 20
