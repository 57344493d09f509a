"""Idempotent retries: an ``Idempotency-Key`` makes a paid request safe to send again.

A caller that sends ``Idempotency-Key: <key>`` (HTTP header; gRPC metadata
``idempotency-key``) gets, for every later request with the same key and the same body
within ``IMAGEGW_IDEMPOTENCY_TTL_SECONDS`` (24 h), the first request's response again:
the same serialized message (same images, same URLs), the same cost and model headers,
plus ``x-imagegw-idempotent-replay: true``, and no new charge. Keys are scoped to the
account; the state lives in the shared database (table ``idempotency_keys``), so it works
across replicas.

Life of a key (one row per (account, key))::

    claim ── INSERT ... ON CONFLICT DO NOTHING ──> we own it: state in_progress, owner, locked_until
      │                                             │ produce() succeeds -> completed (response stored)
      │                                             │ produce() fails (any error, cancellation)
      │                                             │      -> row deleted: a retry runs afresh
      │                                             │ process dies -> locked_until passes -> abandoned:
      │                                             │      the next claim takes the row over
      └─ row exists ── different request hash ─> 400 idempotency_key_reused
                    ── completed ──────────────> replay the stored response
                    ── in_progress ────────────> wait (poll, reads only) until it completes
                                                  (replay), fails or is abandoned (claim again),
                                                  or the caller's deadline is near: 409
                                                  idempotency_key_in_use (retryable)

* The claim is atomic: one write transaction whose INSERT either creates the row or
  conflicts with the unique (account, key) primary key; the loser of a race sees the
  winner's row (PostgreSQL waits for the winner's transaction; SQLite serialises writers
  with ``BEGIN IMMEDIATE``). Taking over an expired or abandoned row is a conditional
  UPDATE that re-checks the condition, so only one taker wins.
* Completing and abandoning are conditional on ``owner``: an attempt that lost its row
  (it ran past ``locked_until`` and someone took over) changes nothing.
* ``locked_until`` is the first attempt's deadline plus the reservation grace (the
  reservation TTL when the caller set no deadline): past it the attempt cannot still be
  running, exactly like the ledger's reservations.
* The request hash is SHA-256 over the method name and the canonical request: the set
  fields of the request message as JSON with sorted keys (:func:`fingerprint`). Fields
  that were not sent are not part of it, so ``"n": 1`` and no ``n`` are different bodies.
* Expired rows (``expires_at`` passed, not held by a live attempt) are deleted by the
  sweeper (:meth:`IdempotencyStore.delete_expired`); until then they count as absent.

Requests without the header do not touch the table at all.
"""

from __future__ import annotations

import asyncio
import hashlib
import json
import logging
import math
import secrets
import time
from collections.abc import Awaitable, Callable, Iterable
from dataclasses import dataclass
from typing import Any, Final, Generic, Protocol, TypeVar

from google.protobuf import json_format
from google.protobuf.message import Message
from sqlalchemy import and_, delete, or_, select, tuple_, update
from sqlalchemy.engine import Connection

from server.config import DEFAULT_TUNING
from server.errors import ConflictError, IdempotencyKeyReusedError, InvalidRequestError
from server.ledger.db import Database
from server.ledger.plain import Execute, Fetch, Program, Sql
from server.ledger.schema import idempotency_keys
from server.offload import run_sized

__all__ = [
    "HEADER",
    "Admit",
    "MAX_KEY_LENGTH",
    "REPLAY_HEADER",
    "Answer",
    "Busy",
    "Claim",
    "Headers",
    "IdempotencyStore",
    "Owned",
    "Refused",
    "Retry",
    "StoredResponse",
    "fingerprint",
    "parse_key",
]

log = logging.getLogger(__name__)

HEADER: Final = "idempotency-key"
REPLAY_HEADER: Final = "x-imagegw-idempotent-replay"
MAX_KEY_LENGTH: Final = 255
_PARAM: Final = "Idempotency-Key"
# Waiting for an in-progress attempt: reads with exponential back-off between these.
_POLL_FIRST_SECONDS: Final = 0.05
_POLL_MAX_SECONDS: Final = 1.0

Headers = tuple[tuple[str, str], ...]
M = TypeVar("M", bound=Message)
T = TypeVar("T")

# The claim in plain SQL (server.ledger.plain): with a key, every paid request runs it.
_CLAIM = Sql(
    """INSERT INTO idempotency_keys (account_id, idempotency_key, request_hash, state, owner, locked_until,
    request_id, response, response_headers, created_at, expires_at)
    VALUES ($1, $2, $3, 'in_progress', $4, $5, $6, NULL, NULL, $7, $8)
    ON CONFLICT (account_id, idempotency_key) DO NOTHING"""
)
_EXISTING = Sql(
    "SELECT request_hash, state, locked_until, expires_at FROM idempotency_keys WHERE account_id = $1 AND idempotency_key = $2"
)
# Taking over an expired or abandoned row re-checks that it still is, so only one taker wins.
_TAKE_OVER = Sql(
    """UPDATE idempotency_keys SET request_hash = $3, state = 'in_progress', owner = $4, locked_until = $5,
    request_id = $6, response = NULL, response_headers = NULL, created_at = $7, expires_at = $8
    WHERE account_id = $1 AND idempotency_key = $2
    AND (expires_at <= $7 OR (state = 'in_progress' AND locked_until <= $7))"""
)
_ABANDON = Sql(
    "DELETE FROM idempotency_keys WHERE account_id = $1 AND idempotency_key = $2 AND owner = $3 AND state = 'in_progress'"
)


class Admit(Protocol):
    """What a paid request does in the same write transaction as its claim
    (``server.admission``): one transaction before the upstream call, key or no key."""

    def before(self) -> Program[None]:
        """Runs once, before the first claim (a key still live, the rate limit). Raising
        rolls the transaction back: nothing is counted, claimed or reserved."""
        ...

    def after(self) -> Program[bool]:
        """Runs when the claim is won (or without a key): the reservation. False when it
        is refused; then the claim is released in the same transaction."""
        ...

    def refusal(self) -> BaseException:
        """The error for a refused ``after``, raised once the transaction committed."""
        ...

    async def abandoned(self) -> None:
        """The request went away while its admitting transaction committed: gives back
        what ``after`` reserved, which nobody will use or settle."""
        ...


def parse_key(metadata: Iterable[tuple[str, str | bytes]] | None) -> str | None:
    """The ``idempotency-key`` value from request metadata, or None when absent.

    Raises:
        InvalidRequestError: sent more than once, empty, longer than 255 characters, or
            not printable ASCII (``param`` is ``Idempotency-Key``).
    """
    values = [value for key, value in metadata or () if key.lower() == HEADER]
    if not values:
        return None
    if len(values) > 1:
        raise InvalidRequestError("Send at most one Idempotency-Key header.", param=_PARAM)
    value = values[0]
    if not isinstance(value, str) or not 1 <= len(value) <= MAX_KEY_LENGTH or not _printable_ascii(value):
        raise InvalidRequestError(
            f"The Idempotency-Key header must be 1 to {MAX_KEY_LENGTH} printable ASCII characters.", param=_PARAM
        )
    return value


def _printable_ascii(value: str) -> bool:
    return all(" " <= char <= "~" for char in value)


def fingerprint(method: str, request: Message) -> str:
    """SHA-256 (hex) of the method and the canonical request: its set fields as JSON
    with sorted keys and no whitespace (bytes as base64, names as in the proto)."""
    fields = json_format.MessageToDict(request, preserving_proto_field_name=True)
    canonical = json.dumps([method, fields], sort_keys=True, separators=(",", ":"), ensure_ascii=True)
    return hashlib.sha256(canonical.encode("ascii")).hexdigest()


@dataclass(frozen=True, slots=True)
class StoredResponse:
    """A completed attempt's response as stored: the serialized message and its headers."""

    body: bytes
    headers: Headers


@dataclass(frozen=True, slots=True)
class Answer(Generic[M]):
    """What to send back: the response message, its headers, and whether it is a replay."""

    message: M
    headers: Headers
    replayed: bool


@dataclass(frozen=True, slots=True)
class Owned:
    """The claim won: run the request, then complete or abandon the key as ``owner``."""

    owner: str


@dataclass(frozen=True, slots=True)
class Busy:
    """Another attempt holds the key and is still running."""


@dataclass(frozen=True, slots=True)
class Retry:
    """The row changed between two statements of the claim; claim again."""


@dataclass(frozen=True, slots=True)
class Refused:
    """The claim was won but admission refused the request (its reservation); the claim
    was released in the same transaction."""


Claim = Owned | StoredResponse | Busy | Retry


class IdempotencyStore:
    """Idempotency keys in the shared database (see the module docstring).

    Args:
        engine: the ledger's engine (migrated).
        ttl_seconds: how long a key's answer is replayed (24 h by default).
        max_lease_seconds: how long an attempt with no deadline holds its key (the
            reservation TTL: longer than any request).
        lease_grace_seconds: how long after its deadline an attempt still holds its key.
        max_wait_seconds: how long a replay waits for a running attempt when the caller
            set no deadline.
        sweep_batch: the sweeper deletes this many rows per transaction.
        clock: unix time in seconds; injectable for tests.
    """

    def __init__(
        self,
        db: Database,
        *,
        ttl_seconds: int,
        max_lease_seconds: int,
        lease_grace_seconds: float,
        max_wait_seconds: float,
        sweep_batch: int = DEFAULT_TUNING.sweep_batch,
        clock: Callable[[], float] = time.time,
    ) -> None:
        if ttl_seconds <= 0 or max_lease_seconds <= 0:
            raise ValueError("ttl_seconds and max_lease_seconds must be positive")
        self._db = db
        self._ttl = ttl_seconds
        self._max_lease = max_lease_seconds
        self._grace = lease_grace_seconds
        self._max_wait = max_wait_seconds
        self._sweep_batch = sweep_batch
        self._clock = clock
        # Bookkeeping that outlives a cancelled request (storing its answer, undoing its
        # admission), referenced until done so that it is never collected mid-way.
        self._background: set[asyncio.Future[Any]] = set()

    def _now(self) -> int:
        return int(self._clock())

    async def run(
        self,
        account_id: str,
        key: str | None,
        request_hash: str,
        *,
        request_id: str,
        deadline: float | None,
        produce: Callable[[], Awaitable[tuple[M, Headers]]],
        parse: Callable[[bytes], M],
        admit: Admit | None = None,
    ) -> Answer[M]:
        """Runs ``produce`` at most once per (account, key, request) and replays its answer.

        Args:
            key: the caller's Idempotency-Key; None runs ``produce`` with no bookkeeping.
            request_hash: :func:`fingerprint` of the request.
            deadline: the caller's deadline (event-loop time) or None: bounds both the
                lease of a first attempt and how long a replay waits for one.
            produce: makes the response message and its response headers.
            parse: turns stored bytes back into the message (``Message.FromString``).
            admit: runs in the claim's write transaction (:class:`Admit`); ``produce`` is
                called only once it admitted the request.

        Raises:
            IdempotencyKeyReusedError: the key was used with a different request.
            ConflictError: an attempt with this key was still running at the deadline.
            Whatever ``produce`` raises (the key is then released for a retry).
        """
        if key is None:
            if admit is not None and not await self._committed(
                self._db.write_plain(_admitting(admit)), lambda admitted: self._undo(admitted, admit)
            ):
                raise admit.refusal()
            message, headers = await produce()
            return Answer(message, headers, replayed=False)
        loop = asyncio.get_running_loop()
        wait_until = loop.time() + self._max_wait if deadline is None else deadline
        first = admit
        while True:
            lease = self._lease_seconds(deadline, loop.time())
            claimed = await self.claim(
                account_id, key, request_hash, request_id=request_id, lease_seconds=lease, admit=admit, first=first
            )
            first = None  # the rate limit counts a request once, however often it claims
            if isinstance(claimed, Refused):
                assert admit is not None
                raise admit.refusal()
            if isinstance(claimed, Owned):
                return await self._produce(account_id, key, claimed.owner, produce)
            if isinstance(claimed, StoredResponse):
                return Answer(await run_sized(len(claimed.body), parse, claimed.body), claimed.headers, replayed=True)
            if isinstance(claimed, Busy):
                finished = await self._wait(account_id, key, request_hash, wait_until)
                if finished is not None:
                    message = await run_sized(len(finished.body), parse, finished.body)
                    return Answer(message, finished.headers, replayed=True)
            # Released, abandoned or expired meanwhile (or Retry): claim again.

    async def _committed(self, write: Awaitable[T], undo: Callable[[T], Awaitable[None]]) -> T:
        """The outcome of an admitting ``write``, which runs to its end even if the caller
        goes away meanwhile (SQLite's writer would run it anyway, PostgreSQL may be at its
        COMMIT): then ``undo`` gives back what it admitted, at once rather than when the
        sweeper finds the reservation and the claim expired after the request's deadline."""
        task = asyncio.ensure_future(write)
        try:
            return await asyncio.shield(task)
        except asyncio.CancelledError:
            task.add_done_callback(lambda done: self._undo_later(done, undo))
            self._track(task)  # so that a shutdown waits for it and its undo
            raise

    def _undo_later(self, done: asyncio.Future[T], undo: Callable[[T], Awaitable[None]]) -> None:
        if done.cancelled() or done.exception() is not None:
            return  # nothing was admitted
        self._in_background(undo(done.result()))

    def _in_background(self, work: Awaitable[None]) -> asyncio.Future[None]:
        return self._track(asyncio.ensure_future(work))

    def _track(self, task: asyncio.Future[T]) -> asyncio.Future[T]:
        self._background.add(task)
        task.add_done_callback(self._background.discard)
        return task

    async def wait_settled(self) -> None:
        """Waits for the bookkeeping of requests that went away (an answer being stored,
        an admission being undone) to finish: at shutdown, before the database closes, so
        that none of it is left to a lease or the sweeper."""
        while self._background:
            await asyncio.gather(*self._background, return_exceptions=True)

    async def _undo(self, admitted: bool, admit: Admit | None, claim: tuple[str, str, str] | None = None) -> None:
        if not admitted:
            return
        if claim is not None:
            await self._abandon_quietly(*claim)
        if admit is not None:
            try:
                await admit.abandoned()
            except Exception:
                # The reservation expires after the request's deadline; the sweeper releases it then.
                log.exception("could not release the reservation of a request that went away")

    def _lease_seconds(self, deadline: float | None, now: float) -> int:
        if deadline is None:
            return self._max_lease
        return max(1, min(self._max_lease, math.ceil(deadline - now + self._grace)))

    async def _produce(
        self, account_id: str, key: str, owner: str, produce: Callable[[], Awaitable[tuple[M, Headers]]]
    ) -> Answer[M]:
        try:
            message, headers = await produce()
        except BaseException:
            # Shielded: a cancelled request must still free its key for the retry.
            await asyncio.shield(self._abandon_quietly(account_id, key, owner))
            raise
        # Shielded as a whole, serializing included: the answer exists and is paid for, so a
        # caller that goes away now must not leave the key held until its lease runs out.
        await asyncio.shield(self._in_background(self._keep(account_id, key, owner, message, headers)))
        return Answer(message, headers, replayed=False)

    async def _keep(self, account_id: str, key: str, owner: str, message: Message, headers: Headers) -> None:
        try:
            body = await run_sized(message.ByteSize(), message.SerializeToString)
            await self.complete(account_id, key, owner, body, headers)
        except Exception:
            # The caller still gets its (paid) answer; the key is freed rather than stuck.
            log.exception("could not store the idempotent response", extra={"account_id": account_id})
            await self._abandon_quietly(account_id, key, owner)

    async def _wait(self, account_id: str, key: str, request_hash: str, wait_until: float) -> StoredResponse | None:
        """Polls (reads only) until the running attempt completes (returns its response)
        or the row is gone or claimable (returns None); 409 at ``wait_until``."""
        loop = asyncio.get_running_loop()
        delay = _POLL_FIRST_SECONDS
        while True:
            remaining = wait_until - loop.time()
            if remaining <= 0:
                raise ConflictError(
                    "A request with this Idempotency-Key is still in progress. Retry it later to get its result.",
                    code="idempotency_key_in_use",
                    retry_after=1,
                )
            await asyncio.sleep(min(delay, remaining))
            delay = min(delay * 2, _POLL_MAX_SECONDS)
            row = await self._read(account_id, key, with_response=True)
            if row is None or self._claimable(row, self._now()):
                return None
            if row.request_hash != request_hash:
                raise _reused()
            if row.state == "completed":
                return _stored(row)

    # -- the steps, public for tests -----------------------------------------------------

    async def claim(
        self,
        account_id: str,
        key: str,
        request_hash: str,
        *,
        request_id: str,
        lease_seconds: int,
        admit: Admit | None = None,
        first: Admit | None = None,
    ) -> Claim | Refused:
        """One claim attempt, atomic: :class:`Owned` (run the request), a
        :class:`StoredResponse` (replay it), :class:`Busy` (another attempt is running)
        or :class:`Retry` (the row changed under us). With ``admit``, its ``after`` runs in
        the same transaction once the claim is won (:class:`Refused` if it refused), and
        ``first``'s ``before`` ahead of the claim.

        Raises:
            IdempotencyKeyReusedError: the key is held or completed for another request.
        """
        now = self._now()
        owner = secrets.token_hex(16)
        claim = (account_id, key, request_hash, owner, now + lease_seconds, request_id[:255], now, now + self._ttl)

        def attempt() -> Program[Owned | Retry | Refused | Any]:
            """Owned, Retry, Refused, or the existing row that cannot be claimed."""
            if first is not None:
                yield from first.before()
            outcome = yield from self._claiming(claim, now)
            if admit is not None and isinstance(outcome, Owned) and not (yield from admit.after()):
                yield Execute(_ABANDON, (account_id, key, owner))
                return Refused()
            return outcome

        existing = await self._committed(
            self._db.write_plain(attempt()),
            lambda outcome: self._undo(isinstance(outcome, Owned), admit, (account_id, key, owner)),
        )
        if isinstance(existing, (Owned, Retry, Refused)):
            return existing
        request_hash_then, state = existing[0], existing[1]
        if request_hash_then != request_hash:
            raise _reused()
        if state == "in_progress":
            return Busy()
        # Completed: read the (possibly large) response outside the write transaction.
        stored = await self._read(account_id, key, with_response=True)
        if stored is None or stored.state != "completed" or stored.request_hash != request_hash:
            return Retry()
        return _stored(stored)

    def _claiming(self, claim: tuple[Any, ...], now: int) -> Program[Owned | Retry | Any]:
        account_id, key, owner = claim[0], claim[1], claim[3]
        if (yield Execute(_CLAIM, claim)) == 1:
            return Owned(owner)
        existing = yield Fetch(_EXISTING, (account_id, key))
        if existing is None:
            return Retry()  # deleted between the conflict and the read
        _, state, locked_until, expires_at = existing
        if _claimable(state, locked_until, expires_at, now):
            taken = yield Execute(_TAKE_OVER, claim)
            return Owned(owner) if taken == 1 else Retry()
        return existing

    async def complete(self, account_id: str, key: str, owner: str, body: bytes, headers: Headers) -> bool:
        """Stores the owner's response; False when the owner no longer holds the key."""
        statement = (
            update(idempotency_keys)
            .where(_pk(account_id, key), idempotency_keys.c.owner == owner, idempotency_keys.c.state == "in_progress")
            .values(
                state="completed",
                owner=None,
                locked_until=None,
                response=body,
                response_headers=json.dumps([list(pair) for pair in headers], separators=(",", ":")),
            )
        )
        done = await self._db.write(lambda conn: conn.execute(statement).rowcount == 1)
        if not done:
            log.warning("idempotency key lost before completion", extra={"account_id": account_id})
        return done

    async def abandon(self, account_id: str, key: str, owner: str) -> bool:
        """Frees the owner's in-progress key (its attempt failed); False if not held."""
        statement = delete(idempotency_keys).where(
            _pk(account_id, key), idempotency_keys.c.owner == owner, idempotency_keys.c.state == "in_progress"
        )
        return await self._db.write(lambda conn: conn.execute(statement).rowcount == 1)

    async def _abandon_quietly(self, account_id: str, key: str, owner: str) -> None:
        try:
            await self.abandon(account_id, key, owner)
        except Exception:
            # The lease runs out at locked_until; then the key can be claimed again.
            log.exception("could not release an idempotency key", extra={"account_id": account_id})

    async def delete_expired(self) -> int:
        """The sweeper: deletes rows past ``expires_at`` that no live attempt holds.

        Returns:
            How many rows were deleted.
        """
        now = self._now()
        row = idempotency_keys.c
        expired = and_(row.expires_at <= now, or_(row.state == "completed", row.locked_until <= now))
        batch = select(row.account_id, row.idempotency_key).where(expired).limit(self._sweep_batch)

        def delete_batch(conn: Connection) -> tuple[int, int]:
            """(rows found, rows deleted): one batch, one short transaction."""
            keys = [tuple(key) for key in conn.execute(batch)]
            if not keys:
                return 0, 0
            gone = conn.execute(
                delete(idempotency_keys).where(tuple_(row.account_id, row.idempotency_key).in_(keys), expired)
            )
            return len(keys), gone.rowcount

        deleted = 0
        while True:
            found, gone = await self._db.write(delete_batch)
            deleted += gone
            if found < self._sweep_batch:
                break
        return deleted

    # -- helpers ------------------------------------------------------------------------

    @staticmethod
    def _claimable(row: Any, now: int) -> bool:
        return _claimable(row.state, row.locked_until, row.expires_at, now)

    async def _read(self, account_id: str, key: str, *, with_response: bool) -> Any:
        query = _select(account_id, key, with_response=with_response)
        return await self._db.read(lambda conn: conn.execute(query).first())


def _claimable(state: str, locked_until: int | None, expires_at: int, now: int) -> bool:
    """Expired, or held by an attempt that ran past its lease (its process died); the
    same condition as ``_TAKE_OVER``'s."""
    return expires_at <= now or (state == "in_progress" and (locked_until or 0) <= now)


def _admitting(admit: Admit) -> Program[bool]:
    """Admission without an Idempotency-Key: ``before``, then ``after``."""
    yield from admit.before()
    return (yield from admit.after())


def _select(account_id: str, key: str, *, with_response: bool) -> Any:
    row = idempotency_keys.c
    columns = [row.request_hash, row.state, row.locked_until, row.expires_at]
    if with_response:
        columns += [row.response, row.response_headers]
    return select(*columns).where(_pk(account_id, key))


def _pk(account_id: str, key: str) -> Any:
    return and_(idempotency_keys.c.account_id == account_id, idempotency_keys.c.idempotency_key == key)


def _stored(row: Any) -> StoredResponse:
    headers = tuple((str(name), str(value)) for name, value in json.loads(row.response_headers or "[]"))
    return StoredResponse(body=bytes(row.response), headers=headers)


def _reused() -> IdempotencyKeyReusedError:
    return IdempotencyKeyReusedError(
        "This Idempotency-Key was already used with a different request. "
        "Use a new key for a new request, or send exactly the same request to get its result.",
        param=_PARAM,
    )
