"""``imagegw serve`` with its SQLite writer timed: the bench's only probe inside the server.

SQLite has one writer; imagegw runs every write transaction (ledger reservations and
settlements, rate-limit counters, idempotency keys) on the one writer thread of
``server.ledger.sqlite_writer.SqliteWriter``, which commits what has queued together. If
that thread is busy all the time, it decides throughput, and neither py-spy nor CPU time
shows the queue in front of it. This wrapper times ``SqliteWriter._commit`` (one batch,
BEGIN IMMEDIATE to COMMIT: the time SQLite's write lock is held; "acquisitions" are
commits, "units" the transactions in them) and ``Database.write`` (queueing included), and writes
the totals (including the hold in progress) as JSON to ``$BENCH_LOCK_STATS`` five times a
second. A few ``perf_counter()`` calls per transaction; nothing else in the server changes.
When the server no longer has those methods, or runs on PostgreSQL, the file says
``"instrumented": false`` or counts nothing, and the bench leaves the column empty.

    BENCH_LOCK_STATS=/tmp/lock.json python -m bench.instrument   # instead of: imagegw serve
"""

from __future__ import annotations

import json
import os
import runpy
import sys
import threading
import time
from pathlib import Path
from typing import Any

__all__ = ["install", "main"]

STATS: dict[str, Any] = {
    "instrumented": False,
    "acquired": 0,
    "wait_s": 0.0,
    "hold_s": 0.0,
    "held_since": None,  # perf_counter() when the current hold began
}


def install(stats_path: Path) -> bool:
    """Times the server's SQLite writer; starts the thread that writes the totals."""
    from server.ledger import db, sqlite_writer

    writer = getattr(sqlite_writer, "SqliteWriter", None)
    database = getattr(db, "Database", None)
    if writer is not None and database is not None and hasattr(writer, "_commit"):
        commit, write = writer._commit, database.write

        def timed_commit(self: Any, *args: Any) -> Any:
            batch = args[-1]  # (batch), or (connection, batch) since the writer keeps its connection
            started = time.perf_counter()
            STATS["held_since"] = started
            try:
                return commit(self, *args)
            finally:
                STATS["hold_s"] += time.perf_counter() - started
                STATS["held_since"] = None
                STATS["acquired"] += 1
                STATS["units"] = STATS.get("units", 0) + len(batch)

        async def timed_write(self: Any, work: Any) -> Any:
            if self.dialect != "sqlite":
                return await write(self, work)
            started, hold_before = time.perf_counter(), STATS["hold_s"]
            try:
                return await write(self, work)
            finally:
                # Waiting = in the writer's queue: the whole call minus the holds that
                # finished meanwhile (an estimate when batches overlap the call).
                STATS["wait_s"] += max(0.0, time.perf_counter() - started - (STATS["hold_s"] - hold_before))

        writer._commit = timed_commit
        database.write = timed_write
        STATS["instrumented"] = True

    def dump() -> None:
        tmp = stats_path.with_suffix(".tmp")
        while True:
            # hold_s counts finished holds; add the current one so that totals read at
            # any moment are exact (a hold can last seconds when the loop is overloaded).
            snapshot = dict(STATS)
            held_since = snapshot.pop("held_since", None)
            if held_since is not None:
                snapshot["hold_s"] += time.perf_counter() - held_since
            tmp.write_text(json.dumps(snapshot))
            tmp.replace(stats_path)
            time.sleep(0.2)

    threading.Thread(target=dump, daemon=True, name="bench-lock-stats").start()
    return bool(STATS["instrumented"])


def main() -> None:
    install(Path(os.environ["BENCH_LOCK_STATS"]))
    sys.argv = ["imagegw", "serve"]
    runpy.run_module("server.cli", run_name="__main__", alter_sys=True)


if __name__ == "__main__":
    main()
