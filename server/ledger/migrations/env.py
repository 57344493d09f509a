"""Alembic environment for the ledger database.

Normally Alembic runs inside the server: :func:`server.ledger.db.migrate` opens an async
connection, takes the cross-process migration lock, and calls ``command.upgrade`` through
``connection.run_sync`` with that connection in ``config.attributes["connection"]``; this
file then just runs the revisions on it (inside the caller's transaction).

Run from the ``alembic`` command line instead (``alembic -c server/ledger/alembic.ini -x
url=... upgrade head``), it builds its own engine with :func:`server.ledger.db.create_engine`
(so SQLite gets the same pragmas) and runs the same way. Offline (``--sql``) mode is not
supported: the schema has dialect-specific triggers and is only ever applied online.
"""

from __future__ import annotations

import asyncio

from alembic import context
from sqlalchemy.engine import Connection

from server.ledger.schema import metadata


def _run(connection: Connection) -> None:
    context.configure(connection=connection, target_metadata=metadata, compare_type=True)
    with context.begin_transaction():
        context.run_migrations()


async def _run_standalone(url: str) -> None:
    from server.ledger.db import create_engine

    engine = create_engine(url)
    try:
        async with engine.connect() as connection:
            await connection.run_sync(_run)
            await connection.commit()
    finally:
        await engine.dispose()


def _main() -> None:
    if context.is_offline_mode():
        raise RuntimeError("offline (--sql) migrations are not supported; run them against a database")
    connection = context.config.attributes.get("connection")
    if connection is not None:
        _run(connection)
        return
    url = context.get_x_argument(as_dictionary=True).get("url") or context.config.get_main_option("sqlalchemy.url")
    if not url:
        raise RuntimeError("no database: pass -x url=<database url> (or call server.ledger.db.migrate)")
    asyncio.run(_run_standalone(url))


_main()
