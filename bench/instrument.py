"""``imagegw serve`` with its SQLite write lock timed: the bench's only probe inside the server.

SQLite has one writer; imagegw queues its writers (ledger reservations and settlements,
rate-limit counters, idempotency keys) on one ``asyncio.Lock`` per engine
(``server.ledger.db.write_lock``). Under load that lock decides throughput, and neither
py-spy nor CPU time shows it: waiting on it costs nothing. This wrapper replaces
``write_lock`` (in every ``server`` module that imported it) with one handing out an
``asyncio.Lock`` subclass that adds up acquisitions, time waited and time held, and writes
the totals (including the hold in progress) as JSON to ``$BENCH_LOCK_STATS`` five times
a second. Two ``perf_counter()``
calls per acquisition; nothing else in the server changes. When the server no longer
has that function (e.g. it moved to PostgreSQL or another design), the file says
``"instrumented": false`` and the bench leaves the column empty.

    BENCH_LOCK_STATS=/tmp/lock.json python -m bench.instrument   # instead of: imagegw serve
"""

from __future__ import annotations

import asyncio
import json
import os
import runpy
import sys
import threading
import time
from pathlib import Path
from typing import Any

__all__ = ["TimedLock", "install", "main"]

STATS: dict[str, Any] = {
    "instrumented": False,
    "acquired": 0,
    "wait_s": 0.0,
    "hold_s": 0.0,
    "held_since": None,  # perf_counter() when the current hold began
}


class TimedLock(asyncio.Lock):
    """An ``asyncio.Lock`` that adds its waits and holds to ``STATS``."""

    _held_since = 0.0

    async def acquire(self) -> bool:  # type: ignore[override]
        started = time.perf_counter()
        result = await super().acquire()
        now = time.perf_counter()
        STATS["acquired"] += 1
        STATS["wait_s"] += now - started
        STATS["held_since"] = self._held_since = now
        return result

    def release(self) -> None:
        STATS["hold_s"] += time.perf_counter() - self._held_since
        STATS["held_since"] = None
        super().release()


def install(stats_path: Path) -> bool:
    """Patches ``write_lock`` everywhere it was imported; starts the writer thread."""
    import server.app  # noqa: F401 - imports every module that may hold write_lock
    from server.ledger import db

    original = getattr(db, "write_lock", None)
    if original is not None and hasattr(db, "_WRITE_LOCKS"):

        def write_lock(engine: Any) -> asyncio.Lock | None:
            if engine.dialect.name != "sqlite":
                return None
            lock = db._WRITE_LOCKS.get(engine)
            if lock is None:
                lock = TimedLock()
                db._WRITE_LOCKS[engine] = lock
            return lock

        for name, module in list(sys.modules.items()):
            if (name == "server" or name.startswith("server.")) and getattr(module, "write_lock", None) is original:
                module.write_lock = write_lock  # type: ignore[attr-defined]
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
