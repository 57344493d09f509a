"""``imagegw serve`` with its SQLite writer timed: the bench's only probe inside the server.

SQLite has one writer; imagegw runs every write transaction (ledger reservations and
settlements, rate-limit counters, idempotency keys) on the one writer thread of
``server.ledger.db.Database``. If that thread is busy all the time, it decides throughput,
and neither py-spy nor CPU time shows the queue in front of it. This wrapper times
``Database._run_sqlite`` on the writer thread (the transaction, BEGIN IMMEDIATE to COMMIT:
the time SQLite's write lock is held) and ``Database.write`` (queueing included), and writes
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
    """Times ``Database``'s SQLite writer; starts the thread that writes the totals."""
    from server.ledger import db

    database = getattr(db, "Database", None)
    if database is not None and hasattr(database, "_run_sqlite"):
        run, write = database._run_sqlite, database.write

        def timed_run(engine: Any, work: Any) -> Any:
            if not threading.current_thread().name.startswith("imagegw-db-writer"):
                return run(engine, work)  # a read
            started = time.perf_counter()
            STATS["held_since"] = started
            try:
                return run(engine, work)
            finally:
                STATS["hold_s"] += time.perf_counter() - started
                STATS["held_since"] = None
                STATS["acquired"] += 1

        async def timed_write(self: Any, work: Any) -> Any:
            if self.dialect != "sqlite":
                return await write(self, work)
            started, hold_before = time.perf_counter(), STATS["hold_s"]
            try:
                return await write(self, work)
            finally:
                # Waiting = in the writer's queue: the whole call minus this hold. (Other
                # holds finishing meanwhile make this an upper bound of the queueing.)
                STATS["wait_s"] += max(0.0, time.perf_counter() - started - (STATS["hold_s"] - hold_before))

        database._run_sqlite = staticmethod(timed_run)
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
