"""Rate limits per API key: requests per minute and images per minute, exact across replicas.

Model: a **fixed one-minute window** per API key (windows start at whole unix minutes),
counted in the database that every replica shares, so the limit is exact across
replicas: of any number of concurrent requests on one key, in one window, exactly
``limit`` are admitted, whichever replicas they reach. Nothing is kept in process memory.

Counting is part of a short write transaction (the request's admission, see
:mod:`server.admission`, or :meth:`RateLimiter.acquire` alone): it reads the account's
limits, then runs one statement, an upsert on the key's row of ``rate_limit_counters``::

    INSERT INTO rate_limit_counters (key_id, window_start, requests, images)
    VALUES (:key, :window, 1, :n)
    ON CONFLICT (key_id) DO UPDATE SET
        requests     = CASE WHEN <row in this window> THEN requests + 1 ELSE 1 END,
        images       = CASE WHEN <row in this window> THEN images + :n ELSE :n END,
        window_start = CASE WHEN <row in this window> THEN window_start ELSE :window END
    WHERE NOT <row in this window>                              -- a new window starts
       OR ((:rpm = 0 OR requests + 1 <= :rpm)                   -- room left in this one
           AND (:ipm = 0 OR images + :n <= :ipm))               -- (a limit of 0: none)
    RETURNING window_start, requests, images

It returns a row exactly when the request is admitted. On PostgreSQL the upsert locks
the key's row, so concurrent requests queue on it and each sees its predecessor's count;
on SQLite the write transaction is ``BEGIN IMMEDIATE``. A refused request changes
nothing: it is not counted (retrying after ``Retry-After`` works), and it happens before
any reservation, so nothing is reserved or charged for it. "In this window" is
``window_start >= :window``: a replica whose clock lags counts into the newer window
another replica already opened, never resets it.

Limits: ``IMAGEGW_RATE_LIMIT_RPM`` / ``IMAGEGW_RATE_LIMIT_IPM`` for every key, overridden
per account (``accounts.rate_limit_rpm`` / ``rate_limit_ipm``; NULL means the default) by
``AdminService.SetRateLimits`` (``imagegw accounts limits``; ``GetRateLimits`` reads them). 0 means unlimited; when
both are unlimited nothing is written at all. The overrides are read on every request
(no cache), so a change applies to the next request on every replica. A request counts
as one request and as its ``n`` images (1 when absent); a request for more images than
the images limit can never pass and gets a 429 that says so, without ``Retry-After``.

A fixed window lets a key send up to twice its limit across a window boundary (the end
of one minute and the start of the next); it never admits more than the limit within
one window. The response headers follow OpenAI's: ``x-ratelimit-limit-requests``,
``x-ratelimit-remaining-requests``, ``x-ratelimit-reset-requests`` (time until the
window ends, for example ``12s``) and the ``-images`` trio; a 429 also has
``Retry-After`` (whole seconds until the window ends).
"""

from __future__ import annotations

import logging
import math
import time
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any, Final

from sqlalchemy import bindparam, select
from sqlalchemy.engine import Connection

from server.errors import InvalidRequestError, NotFoundError, RateLimitError
from server.ledger import Principal
from server.ledger.db import Database
from server.ledger.plain import Fetch, Program, Sql
from server.ledger.requests import Once, begin, finish
from server.ledger.schema import accounts

_ACCOUNT_LIMITS = select(accounts.c.rate_limit_rpm, accounts.c.rate_limit_ipm).where(accounts.c.id == bindparam("a_id"))
# Admission's statements in plain SQL (server.ledger.plain): every paid request runs them.
_LIMITS = Sql("SELECT rate_limit_rpm, rate_limit_ipm FROM accounts WHERE id = $1")
# The upsert of the module docstring; a limit of 0 has no room condition.
_COUNT = Sql(
    """INSERT INTO rate_limit_counters AS c (key_id, window_start, requests, images) VALUES ($1, $2, 1, $3)
    ON CONFLICT (key_id) DO UPDATE SET
        requests = CASE WHEN c.window_start >= $2 THEN c.requests + 1 ELSE 1 END,
        images = CASE WHEN c.window_start >= $2 THEN c.images + $3 ELSE $3 END,
        window_start = CASE WHEN c.window_start >= $2 THEN c.window_start ELSE $2 END
    WHERE c.window_start < $2 OR (($4 = 0 OR c.requests + 1 <= $4) AND ($5 = 0 OR c.images + $3 <= $5))
    RETURNING window_start, requests, images"""
)
_COUNTER = Sql("SELECT window_start, requests, images FROM rate_limit_counters WHERE key_id = $1")

__all__ = [
    "MAX_LIMIT",
    "WINDOW_SECONDS",
    "AccountLimits",
    "Limits",
    "Quota",
    "RateLimiter",
    "format_reset",
    "requested_images",
    "window_start",
]

log = logging.getLogger(__name__)

WINDOW_SECONDS: Final = 60
# Largest limit accepted (settings and overrides): far below any column's range.
MAX_LIMIT: Final = 1_000_000
# A request counts at most this many images (OpenAI's largest n); larger values are
# refused by validation right after the limiter anyway.
MAX_IMAGES_PER_REQUEST: Final = 10

Headers = tuple[tuple[str, str], ...]


@dataclass(frozen=True, slots=True)
class Limits:
    """Per-key limits per minute; 0 means unlimited."""

    requests_per_minute: int
    images_per_minute: int

    @property
    def unlimited(self) -> bool:
        return not self.requests_per_minute and not self.images_per_minute


@dataclass(frozen=True, slots=True)
class AccountLimits:
    """An account's effective limits, and which of them are the server's defaults."""

    account_id: str
    limits: Limits
    requests_is_default: bool
    images_is_default: bool


@dataclass(frozen=True, slots=True)
class Quota:
    """A key's window as one request left it: what the response headers report."""

    limits: Limits
    requests_used: int
    images_used: int
    reset_seconds: int  # whole seconds until the window ends, 1..60

    def headers(self) -> Headers:
        """OpenAI's ``x-ratelimit-*`` headers, for each dimension that has a limit."""
        result: list[tuple[str, str]] = []
        reset = format_reset(self.reset_seconds)
        for name, limit, used in (
            ("requests", self.limits.requests_per_minute, self.requests_used),
            ("images", self.limits.images_per_minute, self.images_used),
        ):
            if limit:
                result += [
                    (f"x-ratelimit-limit-{name}", str(limit)),
                    (f"x-ratelimit-remaining-{name}", str(max(0, limit - used))),
                    (f"x-ratelimit-reset-{name}", reset),
                ]
        return tuple(result)


def window_start(now: float) -> int:
    """Unix time of the start of the one-minute window holding ``now``."""
    return int(now // WINDOW_SECONDS) * WINDOW_SECONDS


def reset_seconds(window: int, now: float) -> int:
    """Whole seconds (rounded up, 1..60) until the window that starts at ``window`` ends."""
    return max(1, min(WINDOW_SECONDS, math.ceil(window + WINDOW_SECONDS - now)))


def format_reset(seconds: int) -> str:
    """A duration the way OpenAI's ``x-ratelimit-reset-*`` headers write it: ``12s``, ``1m0s``."""
    minutes, rest = divmod(max(0, seconds), 60)
    return f"{minutes}m{rest}s" if minutes else f"{rest}s"


def requested_images(n: int | None) -> int:
    """Images a request counts for: its ``n`` (1 when absent), within 1..10."""
    return 1 if n is None else max(1, min(n, MAX_IMAGES_PER_REQUEST))


def _check_limit(value: object, param: str) -> int:
    if not isinstance(value, int) or isinstance(value, bool) or not 0 <= value <= MAX_LIMIT:
        raise InvalidRequestError(
            f"The {param.replace('_', ' ')} limit must be a whole number from 0 (unlimited) to {MAX_LIMIT}.",
            param=param,
        )
    return value


class RateLimiter:
    """Admits or refuses requests per API key (see the module docstring).

    Args:
        engine: the ledger's engine (migrated).
        defaults: the limits of keys whose account has no override.
        clock: unix time in seconds; injectable for tests.
    """

    def __init__(self, db: Database, *, defaults: Limits, clock: Callable[[], float] = time.time) -> None:
        _check_limit(defaults.requests_per_minute, "requests_per_minute")
        _check_limit(defaults.images_per_minute, "images_per_minute")
        self._db = db
        self._defaults = defaults
        self._clock = clock

    # -- admission ------------------------------------------------------------------------

    async def acquire(self, principal: Principal, *, images: int) -> Quota | None:
        """Counts one request for ``images`` images against the key's current window.

        Returns:
            The window after this request (for the response headers), or None when the
            key is unlimited in both dimensions.

        Raises:
            RateLimitError: over a limit; nothing was counted. Carries ``Retry-After``
                and the ``x-ratelimit-*`` headers.
        """
        # One transaction reads the limits and counts: one database round trip per request.
        return await self._db.write_plain(self.counting(principal, images=images))

    def counting(self, principal: Principal, *, images: int) -> Program[Quota | None]:
        """:meth:`acquire` as statements of a write transaction (admission runs them with
        its others): returns the quota, or raises RateLimitError, which rolls the
        transaction back (a refused request changes nothing)."""
        if images < 1:
            raise ValueError("images must be at least 1")
        now = self._clock()
        window = window_start(now)
        row = yield Fetch(_LIMITS, (principal.account_id,))
        limits = self._limits(row)
        if limits.unlimited:
            return None
        if limits.images_per_minute and images > limits.images_per_minute:
            quota = Quota(limits, 0, 0, reset_seconds(window, now))
            raise RateLimitError(
                f"Request too large for images per minute (IPM) on API key {principal.key_id}: "
                f"Limit {limits.images_per_minute}, Requested {images}. Ask for fewer images per request.",
                retryable=False,
                headers=dict(quota.headers()),
            )
        rpm, ipm = limits.requests_per_minute, limits.images_per_minute
        admitted = yield Fetch(_COUNT, (principal.key_id, window, images, rpm, ipm))
        if admitted is not None:
            return Quota(limits, admitted[1], admitted[2], reset_seconds(admitted[0], now))
        current = yield Fetch(_COUNTER, (principal.key_id,))
        assert current is not None  # the upsert found the row and left it alone
        started, requests, counted = current
        quota = Quota(limits, requests, counted, reset_seconds(started, now))
        if rpm and requests + 1 > rpm:
            what, limit, used, requested = "requests per minute (RPM)", rpm, requests, 1
        else:
            what, limit, used, requested = "images per minute (IPM)", ipm, counted, images
        raise RateLimitError(
            f"Rate limit reached for {what} on API key {principal.key_id}: Limit {limit}, Used {used}, "
            f"Requested {requested}. Please try again in {quota.reset_seconds}s.",
            retry_after=quota.reset_seconds,
            headers=dict(quota.headers()),
        )

    # -- per-account overrides ------------------------------------------------------------

    async def account_limits(self, account_id: str) -> AccountLimits:
        """The account's effective limits. Raises NotFoundError for an unknown account."""
        return await self._account_limits(account_id, require=True)

    async def set_account_limits(
        self,
        account_id: str,
        *,
        requests_per_minute: int | None = None,
        images_per_minute: int | None = None,
        use_defaults: bool = False,
        once: Once[AccountLimits] | None = None,
    ) -> AccountLimits:
        """Sets an account's overrides and returns the limits then in force; ``None`` keeps
        the current setting, and ``use_defaults`` first drops both overrides (so the
        defaults apply to whatever is not set in this call). ``once`` makes it happen at
        most once per request id (:mod:`server.ledger.requests`).

        Raises:
            InvalidRequestError: a limit outside 0..1,000,000, or nothing to change (reading
                the limits is :meth:`account_limits`).
            NotFoundError: no such account.
            Replayed: ``once``'s request id was done before; nothing changed.
        """
        values: dict[str, int | None] = {}
        if use_defaults:
            values = {"rate_limit_rpm": None, "rate_limit_ipm": None}
        if requests_per_minute is not None:
            values["rate_limit_rpm"] = _check_limit(requests_per_minute, "requests_per_minute")
        if images_per_minute is not None:
            values["rate_limit_ipm"] = _check_limit(images_per_minute, "images_per_minute")
        if not values:
            raise InvalidRequestError(
                "Set requests_per_minute, images_per_minute or use_defaults; GetRateLimits reads the limits.",
                param="requests_per_minute",
                code="missing_required_parameter",
            )
        statement = accounts.update().where(accounts.c.id == account_id).values(**values)
        now = int(self._clock())

        def change(conn: Connection) -> AccountLimits:
            begin(conn, once, now)
            if conn.execute(statement).rowcount == 0:
                raise NotFoundError(f"No account with id {account_id[:64]!r}.", param="account_id")
            limits = self._effective(account_id, conn.execute(_ACCOUNT_LIMITS, {"a_id": account_id}).first())
            finish(conn, once, limits)
            return limits

        def changed(limits: AccountLimits) -> None:
            log.info(
                "rate limits changed",
                extra={
                    "account_id": account_id,
                    "requests_per_minute": limits.limits.requests_per_minute,
                    "images_per_minute": limits.limits.images_per_minute,
                },
            )

        return await self._db.write_then(change, changed)

    async def _account_limits(self, account_id: str, *, require: bool = False) -> AccountLimits:
        row = await self._db.read(lambda conn: conn.execute(_ACCOUNT_LIMITS, {"a_id": account_id}).first())
        if row is None and require:
            raise NotFoundError(f"No account with id {account_id[:64]!r}.", param="account_id")
        return self._effective(account_id, row)

    def _limits(self, row: Any) -> Limits:
        """The limits from an account's (rate_limit_rpm, rate_limit_ipm) row."""
        rpm, ipm = (None, None) if row is None else row
        return Limits(
            requests_per_minute=self._defaults.requests_per_minute if rpm is None else rpm,
            images_per_minute=self._defaults.images_per_minute if ipm is None else ipm,
        )

    def _effective(self, account_id: str, row: Any) -> AccountLimits:
        """The limits from an account's overrides row (None: no such account, defaults)."""
        rpm = None if row is None else row.rate_limit_rpm
        ipm = None if row is None else row.rate_limit_ipm
        return AccountLimits(
            account_id=account_id,
            limits=Limits(
                requests_per_minute=self._defaults.requests_per_minute if rpm is None else rpm,
                images_per_minute=self._defaults.images_per_minute if ipm is None else ipm,
            ),
            requests_is_default=rpm is None,
            images_is_default=ipm is None,
        )
