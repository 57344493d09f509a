"""Admission: everything a paid request must pass before its upstream call, in one write
transaction.

    BEGIN
      the API key is still live          (Ledger.key_is_live: a revocation counts at once)
      the rate limit counts the request  (RateLimiter.counting; over the limit: 429, rollback)
      the Idempotency-Key is claimed     (IdempotencyStore; only with the header)
      the money is reserved              (PendingReservation; short: the claim is released, 402)
    COMMIT

Each step is a plain-SQL program of its own module (:mod:`server.ledger.plain`), composed
here. As separate transactions they cost three queue hops, savepoints and commits per
request on SQLite (and three round trips on PostgreSQL), and the key lookup a read of its
own; the outcome of each is the same as before they were joined:

* a request over its rate limit changes nothing (the transaction rolls back);
* a request refused for its balance is counted, and holds no claim;
* a replay, or a retry that finds its key's first attempt still running, is counted and
  reserves nothing; a retry that later takes the key over reserves in that claim's
  transaction (``before`` runs once per request, ``after`` per claim won);
* a request refused before admission (a bad request: 400) is counted alone
  (:meth:`Admissions.count`), as any request is.

Settlement stays its own transaction after the upstream call (``Ledger.settle``).
"""

from __future__ import annotations

from server.ledger import Database, Ledger, Principal, Reservation
from server.ledger.plain import Program
from server.ledger.store import PendingReservation
from server.ratelimit import Quota, RateLimiter

__all__ = ["Admission", "Admissions"]


class Admission:
    """One request's admission (:class:`server.idempotency.Admit`): given to
    ``IdempotencyStore.run``, which runs it in the claim's transaction; afterwards
    :attr:`quota` is the rate-limit window and :meth:`admitted` the reservation."""

    def __init__(
        self, ledger: Ledger, limiter: RateLimiter, principal: Principal, images: int, pending: PendingReservation
    ) -> None:
        self._ledger = ledger
        self._limiter = limiter
        self._principal = principal
        self._images = images
        self._pending = pending
        self._short: int | None = None
        self.quota: Quota | None = None

    def before(self) -> Program[None]:
        yield from self._ledger.key_is_live(self._principal)
        self.quota = yield from self._limiter.counting(self._principal, images=self._images)

    def after(self) -> Program[bool]:
        self._short = yield from self._pending.program()
        return self._short is None

    def refusal(self) -> BaseException:
        try:
            self._pending.made(self._short)
        except Exception as exc:  # the InsufficientBalanceError it raises
            return exc
        raise AssertionError("refusal() of an admitted request")

    async def abandoned(self) -> None:
        """The request went away while this admission committed: its reservation is
        released (the rate limit still counts it, as any request that arrived)."""
        if self._short is None:
            await self._ledger.release(self.admitted().reservation_id, error_code="cancelled")

    def admitted(self) -> Reservation:
        """The reservation, once ``after`` made it (logged once, here)."""
        return self._pending.made(None)

    def headers(self) -> tuple[tuple[str, str], ...]:
        """The ``x-ratelimit-*`` response headers (none when the key is unlimited)."""
        return self.quota.headers() if self.quota is not None else ()


class Admissions:
    """Makes each request's :class:`Admission` (one per process, built by the composition root)."""

    def __init__(self, db: Database, ledger: Ledger, limiter: RateLimiter) -> None:
        self._db = db
        self._ledger = ledger
        self._limiter = limiter

    def admission(self, principal: Principal, *, images: int, pending: PendingReservation) -> Admission:
        return Admission(self._ledger, self._limiter, principal, images, pending)

    async def count(self, principal: Principal, *, images: int) -> None:
        """Counts a request refused before admission (its own error follows); raises
        AuthenticationError or RateLimitError first, as admission would."""

        def counting() -> Program[None]:
            yield from self._ledger.key_is_live(principal)
            yield from self._limiter.counting(principal, images=images)

        await self._db.write_plain(counting())
