"""The database work of one generation on PostgreSQL, measured (issue 12, part 6).

    .venv/bin/python -m bench.db_work [--requests 1000] [--concurrency 16]

Starts a throwaway PostgreSQL (tests/fakes/postgres.py: fsync off, so commit costs are a
lower bound) and the production server in this process (tests/stack.in_process_stack:
rate limits on, as in production), then sends ``requests`` one-image ``local-1`` requests
over gRPC, ``concurrency`` at a time, for each response format. Counted on the server's
engine with SQLAlchemy events: transactions (``begin``; split into writes and read-only
ones) and statements (``before_cursor_execute``); and, for the hot transactions that run
as plain SQL on asyncpg (server.ledger.plain: admission, settlement, the key lookup),
by wrapping ``Database.write_plain``/``read_plain`` and the programs' statements; measured from /proc: the CPU time of
every PostgreSQL process of the cluster (the backends serving the pool and the
background writers) over the run. Prints a markdown table per request and what one
PostgreSQL core would carry at that cost; the figures of one run are in bench/README.md.
"""

from __future__ import annotations

import argparse
import asyncio
import os
import sys
import tempfile
import time
from collections import Counter
from pathlib import Path
from typing import Any

from sqlalchemy import event

CLOCK_TICKS = os.sysconf("SC_CLK_TCK")


def postgres_cpu_seconds(data_dir: Path) -> float:
    """utime + stime of the postmaster and of every process it forked, living or gone.

    Backends and workers that exited during the run are counted through the postmaster's
    cutime + cstime (the kernel adds a reaped child's time there); summing only the living
    ones made the figure go down, even below zero, when a pooled connection was replaced."""
    postmaster = int((data_dir / "postmaster.pid").read_text().splitlines()[0])
    total = 0
    for entry in Path("/proc").iterdir():
        if not entry.name.isdigit():
            continue
        try:
            fields = (entry / "stat").read_text().rsplit(")", 1)[1].split()
        except OSError:
            continue
        pid, ppid = int(entry.name), int(fields[1])
        if pid == postmaster:
            total += sum(int(field) for field in fields[11:15])
        elif ppid == postmaster:
            total += int(fields[11]) + int(fields[12])
    return total / CLOCK_TICKS


async def measure(url: str, data_dir: Path, requests: int, concurrency: int) -> list[dict[str, Any]]:
    from imagegw.v1 import images_pb2

    from tests.stack import in_process_stack

    rows = []
    with tempfile.TemporaryDirectory() as var:
        # Rate limits on, as in production (every request is counted), too high to refuse any.
        async with in_process_stack(
            Path(var), database_url=url, rate_limit_rpm=1_000_000, rate_limit_ipm=1_000_000
        ) as stack:
            engine = stack.app.ledger._db.engine.sync_engine  # noqa: SLF001 - the server's own engine
            counts: Counter[str] = Counter()

            @event.listens_for(engine, "begin")
            def _begin(conn: Any) -> None:
                counts["read" if conn.get_execution_options().get("imagegw_read_only") else "write"] += 1

            shapes: Counter[str] = Counter()

            @event.listens_for(engine, "before_cursor_execute")
            def _statement(conn: Any, cursor: Any, statement: str, *args: Any) -> None:
                counts["statements"] += 1
                shapes[" ".join(statement.split())[:70]] += 1

            _count_plain(counts, shapes)

            for response_format in ("b64_json", "url"):
                account_id, key = await stack.admin.funded_key("1000.00")
                metadata = (("authorization", f"Bearer {key}"),)
                gate = asyncio.Semaphore(concurrency)

                async def one(index: int) -> None:
                    async with gate:
                        await stack.images.GenerateImages(
                            images_pb2.GenerateImagesRequest(
                                prompt=f"a tiny boat {index}", size="256x256", response_format=response_format
                            ),
                            metadata=metadata,
                        )

                await asyncio.gather(*(one(i) for i in range(32)))  # warm-up: pool, caches
                counts.clear()
                shapes.clear()
                cpu, wall = postgres_cpu_seconds(data_dir), time.perf_counter()
                await asyncio.gather(*(one(i) for i in range(requests)))
                wall, cpu = time.perf_counter() - wall, postgres_cpu_seconds(data_dir) - cpu
                account = await stack.admin.get(account_id)
                assert account.spent_usd == f"{(32 + requests) * 1000 / 1e6:.6f}", account
                rows.append({
                    "format": response_format,
                    "requests": requests,
                    "writes": counts["write"] / requests,
                    "reads": counts["read"] / requests,
                    "statements": counts["statements"] / requests,
                    "pg_cpu_ms": cpu * 1000 / requests,
                    "gateway_rps": requests / wall,
                    "shapes": {shape: count / requests for shape, count in shapes.most_common()},
                })
    return rows


def _count_plain(counts: Counter[str], shapes: Counter[str]) -> None:
    """Counts the plain-SQL transactions and their statements, which SQLAlchemy's events
    do not see (they run on the asyncpg connection itself)."""
    from server.ledger import db
    from server.ledger.db import Database

    run = db.run_asyncpg

    async def counted_run(connection: Any, program: Any) -> Any:
        def watched() -> Any:
            reply = None
            try:
                while True:
                    step = program.send(reply)
                    counts["statements"] += 1
                    shapes[" ".join(step.sql.postgresql.split())[:70]] += 1
                    reply = yield step
            except StopIteration as done:
                return done.value

        return await run(connection, watched())

    write, read = Database.write_plain, Database.read_plain

    async def counted_write(self: Any, program: Any) -> Any:
        counts["write"] += 1
        return await write(self, program)

    async def counted_read(self: Any, program: Any) -> Any:
        counts["read"] += 1
        return await read(self, program)

    db.run_asyncpg = counted_run  # type: ignore[assignment]
    Database.write_plain = counted_write  # type: ignore[method-assign]
    Database.read_plain = counted_read  # type: ignore[method-assign]


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m bench.db_work", description=__doc__.split("\n")[0])
    parser.add_argument("--requests", type=int, default=1000)
    parser.add_argument("--concurrency", type=int, default=16)
    args = parser.parse_args(argv)
    from tests.fakes.postgres import running_postgres

    with running_postgres() as pg:
        rows = asyncio.run(measure(pg.url, pg.base_dir / "data", args.requests, args.concurrency))
        version = (pg.bindir.parent.name)
    print(f"PostgreSQL {version}, {args.requests} one-image local-1 requests per row, {args.concurrency} at a time:\n")
    print("| response_format | write transactions | read transactions | statements | PostgreSQL CPU ms | "
          "requests/s one PostgreSQL core carries (extrapolated) | gateway req/s in this run |")
    print("|---|--:|--:|--:|--:|--:|--:|")
    for row in rows:
        print(
            f"| {row['format']} | {row['writes']:.2f} | {row['reads']:.2f} | {row['statements']:.2f} "
            f"| {row['pg_cpu_ms']:.2f} | {1000 / row['pg_cpu_ms']:.0f} | {row['gateway_rps']:.0f} |"
        )
    print("\nStatements per request (the first row):\n")
    for shape, count in rows[0]["shapes"].items():
        print(f"- {count:.2f} x `{shape}...`")
    return 0


if __name__ == "__main__":
    sys.exit(main())
