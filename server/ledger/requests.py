"""Request ids (Google's AIP-155): an operator's change done at most once per id.

A mutating AdminService call may carry a ``request_id``. The change and the record of
its id commit in **one** transaction, so a retried call (a client deadline that expired
while the server still committed, a CLI run again with ``--request-id``) can never be
applied twice::

    transaction of the change
      begin(): INSERT INTO admin_requests (request_id, ...) ON CONFLICT DO NOTHING
         inserted        -> do the change, then finish(): store the response; COMMIT
         already there   -> same fingerprint: raise Replayed(stored response)  (nothing changes)
                            other fingerprint: raise request_id_reused (400)

* Races are settled by the primary key. On PostgreSQL a second transaction inserting the
  same id waits for the first one's COMMIT, then finds its row (READ COMMITTED reads
  the committed row in the next statement) and replays it; if the first one rolled
  back, the second one's insert goes through and it does the change itself. On SQLite
  write transactions run one at a time (``BEGIN IMMEDIATE``, and one writer thread per
  process), so the second one simply sees the row.
* A change that fails (unknown account, bad amount, ...) rolls its claim back with it:
  only done changes are remembered, and a retry of a failed call runs afresh.
* The fingerprint is the caller's (SHA-256 of the request message, see
  :func:`server.idempotency.fingerprint`); the stored response is whatever the caller's
  ``encode`` makes of the change's result (the serialized response message), so a
  replay answers exactly what the first call answered.
* Records are kept: a retry is safe however late it comes, and operators' changes are
  few (one row each).
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass
from typing import Any, Final, Generic, TypeVar

from sqlalchemy import select
from sqlalchemy.dialects import postgresql, sqlite
from sqlalchemy.engine import Connection

from server.errors import IdempotencyKeyReusedError, InvalidRequestError
from server.ledger.schema import admin_requests

__all__ = ["MAX_REQUEST_ID_LENGTH", "Once", "Replayed", "begin", "check_request_id", "finish"]

T = TypeVar("T")

MAX_REQUEST_ID_LENGTH: Final = 100


@dataclass(frozen=True, slots=True)
class Once(Generic[T]):
    """A change to make at most once: its request id, the method, a fingerprint of the
    request, and how its result is stored for replays."""

    request_id: str
    method: str
    fingerprint: str
    encode: Callable[[T], bytes]


class Replayed(Exception):  # noqa: N818 - an outcome, not a failure
    """The request id was done before with the same request; ``response`` is the stored
    answer of that first call. Raised from inside the transaction, so nothing changes."""

    def __init__(self, response: bytes) -> None:
        super().__init__("request already done")
        self.response = response


def check_request_id(value: str) -> str:
    """Returns ``value`` if it is a valid request id: 1-100 printable ASCII characters.

    Raises:
        InvalidRequestError: anything else (``param="request_id"``).
    """
    if not 1 <= len(value) <= MAX_REQUEST_ID_LENGTH or not all(" " < char <= "~" for char in value):
        raise InvalidRequestError(
            f"The request_id must be 1 to {MAX_REQUEST_ID_LENGTH} printable ASCII characters without spaces, "
            "for example a UUID.",
            param="request_id",
        )
    return value


def begin(conn: Connection, once: Once[Any] | None, now: int) -> None:
    """The first statement of a change's transaction: claims the request id.

    Raises:
        Replayed: the id was done with the same request (the caller answers its response).
        IdempotencyKeyReusedError: the id was done with another request.
    """
    if once is None:
        return
    insert = postgresql.insert if conn.dialect.name == "postgresql" else sqlite.insert
    claimed = conn.execute(
        insert(admin_requests)
        .values(
            request_id=once.request_id,
            method=once.method,
            request_hash=once.fingerprint,
            response=None,
            created_at=now,
        )
        .on_conflict_do_nothing(index_elements=[admin_requests.c.request_id])
    )
    if claimed.rowcount == 1:
        return
    row = conn.execute(
        select(admin_requests.c.request_hash, admin_requests.c.response).where(
            admin_requests.c.request_id == once.request_id
        )
    ).one()
    if row.request_hash != once.fingerprint:
        raise IdempotencyKeyReusedError(
            "This request_id was already used with a different request. Use a new request_id for a new "
            "request, or send exactly the same request again to get its result.",
            param="request_id",
            code="request_id_reused",
        )
    raise Replayed(bytes(row.response))


def finish(conn: Connection, once: Once[T] | None, result: T) -> None:
    """The last statement of a change's transaction: stores its response for replays."""
    if once is None:
        return
    conn.execute(
        admin_requests.update()
        .where(admin_requests.c.request_id == once.request_id)
        .values(response=once.encode(result))
    )
