"""The ledger: accounts, API keys, prepaid balances, reservations and usage.

Life cycle of one paid request (issue 3, "money flow")::

    reserve ──commit──> provider call ──> settle ──commit
      available -> held   (no database      held -> spent      (captured, <= held)
      entry 'reserve'      transaction      held -> available  (the rest)
                           is open)         entries 'capture' / 'release', one usage row

    killed or lost between reserve and settle: after expires_at the sweeper
    (release_expired) moves everything held back to available.

* :meth:`Ledger.reserve` is one short transaction around a conditional update,
  ``UPDATE accounts SET balance_micros = balance_micros - :x WHERE id = :id AND
  balance_micros >= :x``, which cannot overdraw on either engine (plus
  ``CHECK (balance_micros >= 0)``); zero rows updated means 402. It commits before
  returning, so no transaction is held across the provider call.
* :meth:`Ledger.settle` captures what was delivered and releases the rest, in one
  transaction. It first *claims* the reservation (``UPDATE ... WHERE status = 'open'``),
  so a second settle, a concurrent settle, or a settle racing the sweeper does nothing:
  each reservation is closed exactly once (and ``usage_records.reservation_id`` is
  UNIQUE besides). :meth:`Ledger.release` is a settle that captures nothing.
* :meth:`Ledger.release_expired` is the sweeper. A reservation still open at its
  ``expires_at`` belongs to a request that died with its process; the sweeper releases
  it in full (usage status ``failed``, error ``reservation_expired``). The TTL
  (``reservation_ttl_seconds``, 30 min by default) is longer than any request deadline,
  so a live request is never swept; if one were, its late settle finds the reservation
  closed and captures nothing (the images are free, never double-charged). A caller
  cancelled while ``reserve`` commits may hold a reservation it never learns about; the
  sweeper returns that money too.

``ledger_entries`` is append-only; ``accounts`` holds running totals that are a cache of
it, updated in the same transactions. :meth:`Ledger.reconcile` recomputes everything from
the entries and reports any difference: for each account, ``balance == credits -
captures - open reservations``, ``reserved == open reservations`` and ``spent ==
captures``.

API keys: see :mod:`server.ledger.keys`. :meth:`Ledger.authenticate` may answer from
memory for a few seconds (``max_age``), but a paid request's admission transaction checks
its key again (:meth:`Ledger.key_is_live`), so a revocation applies to the very next paid
request on every replica.

Every transaction is one synchronous function given to :class:`~server.ledger.db.Database`
(``write`` or ``read``), which runs it whole: on SQLite on its writer thread, so the write
lock is held only while the function runs. The hot ones (reserve, settle, the key lookup)
are plain-SQL programs (:mod:`server.ledger.plain`) given to ``write_plain`` and
``read_plain``; :meth:`Ledger.prepare_reservation` hands the reservation to a larger
transaction (admission: :mod:`server.admission`).

All amounts are integer micro-dollars (:mod:`server.ledger.money`); all times are integer
unix seconds from the injected ``clock``.
"""

from __future__ import annotations

import hmac
import logging
import math
import secrets
import string
import time
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any, cast

from sqlalchemy import case, func, select
from sqlalchemy.engine import Connection
from sqlalchemy.exc import IntegrityError

from server.config import DEFAULT_TUNING
from server.errors import (
    AuthenticationError,
    InsufficientBalanceError,
    InvalidRequestError,
    NotFoundError,
)
from server.ledger.db import Database
from server.ledger.keys import (
    INVALID_API_KEY_MESSAGE,
    generate_api_key,
    hash_api_key,
    parse_api_key,
)
from server.ledger.money import MAX_AMOUNT_MICROS, MAX_CREDITED_MICROS, format_usd
from server.ledger.plain import Execute, Fetch, Program, Sql
from server.ledger.requests import Once, begin, finish
from server.ledger.schema import (
    USAGE_STATUSES,
    accounts,
    api_keys,
    ledger_entries,
    reservations,
    usage_records,
)

__all__ = [
    "AccountView",
    "KeyView",
    "Ledger",
    "PendingReservation",
    "Principal",
    "ReconcileReport",
    "Reservation",
    "UsagePage",
    "UsageView",
]

logger = logging.getLogger(__name__)

MAX_NAME_LENGTH = 100
MAX_USAGE_PAGE_SIZE = 1000
# Error code written on usage rows of reservations released by the sweeper.
EXPIRED_ERROR_CODE = "reservation_expired"

# The statements of the hot path (every generation reserves and settles), in plain SQL
# run straight by the driver (server.ledger.plain): through SQLAlchemy they were most of
# the server's database CPU in the benchmark (bench/README.md).
_RESERVE = Sql(
    """UPDATE accounts SET balance_micros = balance_micros - $2, reserved_micros = reserved_micros + $2
    WHERE id = $1 AND balance_micros >= $2"""
)
_BALANCE = Sql("SELECT balance_micros FROM accounts WHERE id = $1")
_INSERT_RESERVATION = Sql(
    """INSERT INTO reservations (id, account_id, request_id, model, images, amount_micros, status,
    captured_micros, created_at, expires_at, closed_at) VALUES ($1, $2, $3, $4, $5, $6, 'open', NULL, $7, $8, NULL)"""
)
_INSERT_ENTRY = Sql(
    "INSERT INTO ledger_entries (account_id, kind, amount_micros, reservation_id, created_at) VALUES ($1, $2, $3, $4, $5)"
)
# The claim: whoever flips status from 'open' owns the close. A concurrent settle or
# sweeper (other task, other replica) updates zero rows and stops.
_CLAIM = Sql(
    """UPDATE reservations SET status = $2, captured_micros = $3, closed_at = $4
    WHERE id = $1 AND status = 'open' AND amount_micros >= $3
    RETURNING account_id, amount_micros, request_id, model, images"""
)
_RESERVATION_STATE = Sql("SELECT status, amount_micros FROM reservations WHERE id = $1")
_SETTLE_ACCOUNT = Sql(
    """UPDATE accounts SET balance_micros = balance_micros + $2, reserved_micros = reserved_micros - $3,
    spent_micros = spent_micros + $4 WHERE id = $1"""
)
_INSERT_USAGE = Sql(
    """INSERT INTO usage_records (account_id, reservation_id, request_id, model, images_requested,
    images_delivered, cost_micros, status, error_code, created_at) VALUES ($1, $2, $3, $4, $5, $6, $7, $8, $9, $10)"""
)
_API_KEY = Sql("SELECT account_id, key_hash, revoked_at FROM api_keys WHERE id = $1")
_ID_ALPHABET = string.ascii_lowercase + string.digits


def _new_id(prefix: str) -> str:
    # 20 characters of [a-z0-9] carrying 103 random bits (36**20 > 2**103), so ids never
    # collide in practice. One call for the randomness: 20 secrets.choice() calls were
    # 20 reads of the OS random source, 3 % of the server's CPU per request.
    number, chars = secrets.randbits(103), []
    for _ in range(20):
        number, digit = divmod(number, 36)
        chars.append(_ID_ALPHABET[digit])
    return prefix + "".join(chars)


def _clip(value: str, length: int) -> str:
    # request ids come from a client-settable header and model ids from the catalog;
    # keep them within the column width so both engines accept them.
    return value[:length]


def _shown(value: object) -> str:
    # For echoing caller input in error messages: bounded, printable.
    text_ = str(value)
    return repr(text_ if len(text_) <= 64 else text_[:64] + "...")


@dataclass(frozen=True, slots=True)
class AccountView:
    """An account and its money, in micro-dollars.

    ``balance_micros`` is available for new requests, ``reserved_micros`` is held by
    requests in flight, ``spent_micros`` was captured, ``credited_micros`` was ever
    credited; ``balance + reserved + spent == credited``.
    """

    account_id: str
    name: str
    balance_micros: int
    reserved_micros: int
    spent_micros: int
    credited_micros: int
    created: int


@dataclass(frozen=True, slots=True)
class KeyView:
    """An API key without its secret; ``revoked`` is the unix time of revocation or None."""

    key_id: str
    account_id: str
    name: str
    created: int
    revoked: int | None


@dataclass(frozen=True, slots=True)
class Principal:
    """Who is calling: the account a valid API key spends from, and the key's id."""

    account_id: str
    key_id: str


@dataclass(frozen=True, slots=True)
class Reservation:
    """Money held for one request until it is settled or expires (at ``expires_at``)."""

    reservation_id: str
    account_id: str
    request_id: str
    model: str
    images: int
    amount_micros: int
    created: int
    expires_at: int


class PendingReservation:
    """A reservation prepared by :meth:`Ledger.prepare_reservation`, made by running
    :meth:`program` in a write transaction (alone, or within admission's), then
    :meth:`made` with what the program returned."""

    __slots__ = ("reservation",)

    def __init__(self, reservation: Reservation) -> None:
        self.reservation = reservation  # what it is once made

    def program(self) -> Program[int | None]:
        """Holds the money; returns None, or the available balance when it is short (then
        nothing was written)."""
        r = self.reservation
        # The whole admission decision is this one statement: it cannot overdraw,
        # however many requests race for the same balance, on either engine.
        if (yield Execute(_RESERVE, (r.account_id, r.amount_micros))) == 0:
            row = yield Fetch(_BALANCE, (r.account_id,))
            if row is None:
                raise NotFoundError(f"No account with id {_shown(r.account_id)}.", param="account_id")
            return int(row[0])
        yield Execute(
            _INSERT_RESERVATION,
            (r.reservation_id, r.account_id, r.request_id, r.model, r.images, r.amount_micros, r.created, r.expires_at),
        )
        yield Execute(_INSERT_ENTRY, (r.account_id, "reserve", r.amount_micros, r.reservation_id, r.created))
        return None

    def made(self, short: int | None) -> Reservation:
        """The reservation, given what :meth:`program` returned once its transaction committed.

        Raises:
            InsufficientBalanceError: the balance was short; nothing was reserved.
        """
        r = self.reservation
        if short is not None:
            raise InsufficientBalanceError(
                f"Insufficient balance: this request costs {format_usd(r.amount_micros)} USD "
                f"but the account has {format_usd(short)} USD available. Add credit and retry."
            )
        _log_money("reserved", r.account_id, r.amount_micros, r.reservation_id, r.request_id)
        return r


@dataclass(frozen=True, slots=True)
class UsageView:
    """One settled request: what was asked, delivered and charged."""

    created: int
    request_id: str
    model: str
    images_requested: int
    images_delivered: int
    cost_micros: int
    status: str
    error_code: str


@dataclass(frozen=True, slots=True)
class UsagePage:
    """One page of an account's usage, newest first; ``next_before_id`` is the
    ``before_id`` of the next page, None on the last one."""

    records: list[UsageView]
    next_before_id: int | None


@dataclass(frozen=True, slots=True)
class ReconcileReport:
    """The result of :meth:`Ledger.reconcile`: ``ok`` when ``mismatches`` is empty."""

    ok: bool
    accounts_checked: int
    mismatches: list[str]


def _account_view(row: Any) -> AccountView:
    return AccountView(
        account_id=row.id,
        name=row.name,
        balance_micros=row.balance_micros,
        reserved_micros=row.reserved_micros,
        spent_micros=row.spent_micros,
        credited_micros=row.credited_micros,
        created=row.created_at,
    )


def _key_view(row: Any) -> KeyView:
    return KeyView(
        key_id=row.id, account_id=row.account_id, name=row.name, created=row.created_at, revoked=row.revoked_at
    )


def _check_name(name: object, *, param: str, required: bool) -> str:
    if not isinstance(name, str):
        raise InvalidRequestError("The name must be a string.", param=param)
    name = name.strip()
    if required and not name:
        raise InvalidRequestError("The name must not be empty.", param=param)
    if len(name) > MAX_NAME_LENGTH:
        raise InvalidRequestError(f"The name is longer than {MAX_NAME_LENGTH} characters.", param=param)
    if not name.isprintable():
        raise InvalidRequestError("The name must not contain control characters.", param=param)
    return name


def _is_int(value: object) -> bool:
    return isinstance(value, int) and not isinstance(value, bool)


class Ledger:
    """Accounts, keys and money on one database (see the module docstring for the life cycle).

    Args:
        db: the database, already migrated; not closed by the ledger.
        key_hash_secret: the server secret API keys are HMAC-ed with; every replica
            must use the same one.
        reservation_ttl_seconds: how long a reservation stays open before the sweeper
            may release it; longer than any request deadline.
        sweep_batch: the sweeper reads expired reservations this many at a time.
        clock: unix time in seconds; injectable for tests.
    """

    def __init__(
        self,
        db: Database,
        *,
        key_hash_secret: bytes,
        reservation_ttl_seconds: int,
        sweep_batch: int = DEFAULT_TUNING.sweep_batch,
        clock: Callable[[], float] = time.time,
    ) -> None:
        if not key_hash_secret:
            raise ValueError("key_hash_secret must not be empty")
        if reservation_ttl_seconds <= 0:
            raise ValueError("reservation_ttl_seconds must be positive")
        self._db = db
        self._key_hash_secret = key_hash_secret
        self._ttl = reservation_ttl_seconds
        self._sweep_batch = sweep_batch
        self._clock = clock
        # authenticate()'s memory: key id -> (key hash, account id, when it was read).
        self._keys: dict[str, tuple[str, str, float]] = {}

    def _now(self) -> int:
        return int(self._clock())

    # -- accounts -----------------------------------------------------------------

    async def create_account(
        self, name: str, balance_micros: int, *, once: Once[AccountView] | None = None
    ) -> AccountView:
        """Creates an account with an opening balance (written to the ledger as a credit).

        ``once`` makes it happen at most once per request id (:mod:`server.ledger.requests`).

        Raises:
            Replayed: ``once``'s request id was done before; nothing changed.
            InvalidRequestError: empty, too long or duplicate name (``code="account_exists"``),
                negative or too large balance.
        """
        name = _check_name(name, param="name", required=True)
        if not _is_int(balance_micros) or not 0 <= balance_micros <= MAX_AMOUNT_MICROS:
            raise InvalidRequestError(
                f"The opening balance must be between 0 and {format_usd(MAX_AMOUNT_MICROS)} USD.", param="balance"
            )
        account_id, now = _new_id("acct_"), self._now()
        exists = InvalidRequestError(
            f"An account named {_shown(name)} already exists.", param="name", code="account_exists"
        )

        view = AccountView(account_id, name, balance_micros, 0, 0, balance_micros, now)

        def create(conn: Connection) -> None:
            begin(conn, once, now)
            if conn.execute(select(accounts.c.id).where(accounts.c.name == name)).first() is not None:
                raise exists
            conn.execute(
                accounts.insert().values(
                    id=account_id,
                    name=name,
                    balance_micros=balance_micros,
                    reserved_micros=0,
                    spent_micros=0,
                    credited_micros=balance_micros,
                    created_at=now,
                )
            )
            if balance_micros:
                _entry(conn, account_id, "credit", balance_micros, None, now)
            finish(conn, once, view)

        def log(_: None) -> None:
            logger.info("account created", extra={"account_id": account_id, "amount_micros": balance_micros})

        try:
            await self._db.write_then(create, log)
        except IntegrityError:
            # Another replica inserted the same name between our check and our insert.
            raise exists from None
        return view

    async def credit(
        self, account_id: str, amount_micros: int, *, once: Once[AccountView] | None = None
    ) -> AccountView:
        """Adds money to an account's balance (a ``credit`` entry).

        ``once`` makes it happen at most once per request id (:mod:`server.ledger.requests`):
        a retried credit is never credited twice.

        Raises:
            Replayed: ``once``'s request id was done before; nothing changed.
            InvalidRequestError: ``amount_micros`` not positive, above
                :data:`~server.ledger.money.MAX_AMOUNT_MICROS`, or the account's lifetime
                credits would pass :data:`~server.ledger.money.MAX_CREDITED_MICROS`.
            NotFoundError: no such account.
        """
        if not _is_int(amount_micros) or not 0 < amount_micros <= MAX_AMOUNT_MICROS:
            raise InvalidRequestError(
                f"The amount must be greater than 0 and at most {format_usd(MAX_AMOUNT_MICROS)} USD.", param="amount"
            )
        now = self._now()

        def credit(conn: Connection) -> AccountView:
            begin(conn, once, now)
            updated = conn.execute(
                accounts.update()
                .where(accounts.c.id == account_id)
                # Bounds every account column far below BIGINT (see server.ledger.money).
                .where(accounts.c.credited_micros <= MAX_CREDITED_MICROS - amount_micros)
                .values(
                    balance_micros=accounts.c.balance_micros + amount_micros,
                    credited_micros=accounts.c.credited_micros + amount_micros,
                )
            )
            if updated.rowcount == 0:
                _require_account(conn, account_id)
                raise InvalidRequestError(
                    "This credit would take the account's lifetime credits past "
                    f"{format_usd(MAX_CREDITED_MICROS)} USD.",
                    param="amount",
                )
            _entry(conn, account_id, "credit", amount_micros, None, now)
            view = _account_view(_require_account(conn, account_id))
            finish(conn, once, view)
            return view

        def log(_: AccountView) -> None:
            logger.info("account credited", extra={"account_id": account_id, "amount_micros": amount_micros})

        return await self._db.write_then(credit, log)

    async def get_account(self, account_id: str) -> AccountView:
        """Returns an account. Raises NotFoundError when there is none with that id."""
        return _account_view(await self._db.read(lambda conn: _require_account(conn, account_id)))

    async def find_account_by_name(self, name: str) -> AccountView | None:
        """Returns the account with that exact name, or None."""
        row = await self._db.read(lambda conn: conn.execute(select(accounts).where(accounts.c.name == name)).first())
        return None if row is None else _account_view(row)

    # -- API keys -------------------------------------------------------------------

    async def create_key(
        self, account_id: str, name: str = "", *, once: Once[KeyView] | None = None
    ) -> tuple[KeyView, str]:
        """Issues a new API key for an account.

        ``once`` makes it happen at most once per request id (:mod:`server.ledger.requests`);
        its stored response is made from the :class:`KeyView` alone, never the key.

        Returns:
            The key's public view and the API key itself, which is not stored (only its
            HMAC is) and so can be shown this once only.

        Raises:
            InvalidRequestError: name longer than 100 characters.
            NotFoundError: no such account.
            Replayed: ``once``'s request id was done before; nothing changed.
        """
        name = _check_name(name, param="name", required=False)
        key_id, api_key = generate_api_key()
        now = self._now()
        key_hash = hash_api_key(api_key, self._key_hash_secret)
        view = KeyView(key_id, account_id, name, now, None)

        def create(conn: Connection) -> None:
            begin(conn, once, now)
            _require_account(conn, account_id)
            conn.execute(
                api_keys.insert().values(
                    id=key_id, account_id=account_id, name=name, key_hash=key_hash, created_at=now, revoked_at=None
                )
            )
            finish(conn, once, view)

        def log(_: None) -> None:
            logger.info("api key created", extra={"account_id": account_id, "key_id": key_id})

        await self._db.write_then(create, log)
        return view, api_key

    async def revoke_key(self, key_id: str, *, once: Once[KeyView] | None = None) -> KeyView:
        """Revokes a key; the next paid request with it fails on every replica (see
        :meth:`authenticate` for free calls).

        Idempotent: revoking a revoked key keeps the first revocation time. ``once``
        records the call's request id (:mod:`server.ledger.requests`).

        Raises:
            NotFoundError: no key with that id.
            Replayed: ``once``'s request id was done before; nothing changed.
        """
        now = self._now()

        def revoke(conn: Connection) -> KeyView:
            begin(conn, once, now)
            conn.execute(
                api_keys.update().where(api_keys.c.id == key_id, api_keys.c.revoked_at.is_(None)).values(revoked_at=now)
            )
            row = conn.execute(select(api_keys).where(api_keys.c.id == key_id)).first()
            if row is None:
                raise NotFoundError(f"No API key with id {_shown(key_id)}.", param="key_id")
            view = _key_view(row)
            finish(conn, once, view)
            return view

        def log(view: KeyView) -> None:
            self.forget_key(key_id)
            logger.info("api key revoked", extra={"account_id": view.account_id, "key_id": key_id})

        return await self._db.write_then(revoke, log)

    async def authenticate(self, api_key: str | None, *, max_age: float = 0.0) -> Principal:
        """Checks an API key against the database.

        ``max_age`` > 0 lets a key that was valid when read within the last ``max_age``
        seconds (by the ledger's clock) be accepted from this process's memory. Every
        paid request checks its key again inside its admission transaction
        (:meth:`key_is_live`), and :meth:`revoke_key` forgets the key here at once, so a
        revocation stops paid requests at once on every replica; what the cache can
        still let through on other replicas, for at most ``max_age`` seconds, is free
        calls (model listings). ``max_age`` 0 (the default) always reads.

        Raises:
            AuthenticationError: missing, malformed, unknown or revoked key, always with
                the same message, which never contains the key.
        """
        key_id = parse_api_key(api_key)  # format and checksum: no DB round trip for typos
        presented = hash_api_key(cast(str, api_key), self._key_hash_secret)  # parse_api_key accepted it
        now = self._clock()
        known = self._keys.get(key_id) if max_age > 0 else None
        if known is not None and now - known[2] <= max_age:
            key_hash, account_id = known[0], known[1]
        else:
            row = await self._db.read_plain(_key_row(key_id))
            if row is None or row[2] is not None:
                self._keys.pop(key_id, None)
                raise AuthenticationError(INVALID_API_KEY_MESSAGE)
            account_id, key_hash = row[0], row[1]
            self._keys[key_id] = (key_hash, account_id, now)
        # Constant-time comparison of the hashes: timing reveals nothing about the secret.
        if not hmac.compare_digest(presented, key_hash):
            raise AuthenticationError(INVALID_API_KEY_MESSAGE)
        return Principal(account_id=account_id, key_id=key_id)

    def forget_key(self, key_id: str) -> None:
        """Drops a key from :meth:`authenticate`'s memory (it was revoked). Safe from any
        thread: one ``dict.pop``."""
        self._keys.pop(key_id, None)

    # -- money ----------------------------------------------------------------------

    async def reserve(
        self,
        account_id: str,
        amount_micros: int,
        *,
        request_id: str,
        model: str,
        images: int,
        ttl_seconds: float | None = None,
    ) -> Reservation:
        """Holds ``amount_micros`` of the account's balance for one request, and commits.

        A zero amount (a free model) is allowed and still makes a reservation, so that
        the request gets its usage row like any other. ``ttl_seconds`` (at most the
        ledger's TTL) lets a request whose deadline is near have its reservation expire
        soon after it: once the deadline has passed the request cannot still be running,
        so a reservation left by a crash is released that much sooner.

        Raises:
            InsufficientBalanceError: the balance is below the amount; nothing changed.
            NotFoundError: no such account.
            ValueError: negative amount or image count (a caller bug).
        """
        pending = self.prepare_reservation(
            account_id, amount_micros, request_id=request_id, model=model, images=images, ttl_seconds=ttl_seconds
        )
        return pending.made(await self._db.write_plain(pending.program()))

    def prepare_reservation(
        self,
        account_id: str,
        amount_micros: int,
        *,
        request_id: str,
        model: str,
        images: int,
        ttl_seconds: float | None = None,
    ) -> PendingReservation:
        """A reservation to make inside a larger write transaction (:class:`PendingReservation`):
        :meth:`reserve` without the transaction. Raises ValueError as :meth:`reserve` does."""
        if not _is_int(amount_micros) or amount_micros < 0:
            raise ValueError("amount_micros must be a non-negative int")
        if not _is_int(images) or images < 0:
            raise ValueError("images must be a non-negative int")
        now_f = self._clock()
        # expires_at is rounded up, so a reservation lives at least the whole TTL.
        ttl = self._ttl if ttl_seconds is None else max(1, min(self._ttl, math.ceil(ttl_seconds)))
        return PendingReservation(
            Reservation(
                reservation_id=_new_id("rsv_"),
                account_id=account_id,
                request_id=_clip(request_id, 255),
                model=_clip(model, 255),
                images=images,
                amount_micros=amount_micros,
                created=int(now_f),
                expires_at=math.ceil(now_f) + ttl,
            )
        )

    def key_is_live(self, principal: Principal) -> Program[None]:
        """A statement for a write transaction: raises AuthenticationError (rolling the
        transaction back) when the principal's key was revoked meanwhile. Admission runs
        it, so a revocation stops every paid request at once on every replica, whatever
        :meth:`authenticate` remembers."""
        row = yield Fetch(_API_KEY, (principal.key_id,))
        if row is None or row[2] is not None:
            self.forget_key(principal.key_id)
            raise AuthenticationError(INVALID_API_KEY_MESSAGE)

    async def settle(
        self,
        reservation_id: str,
        *,
        captured_micros: int,
        images_delivered: int,
        status: str,
        error_code: str = "",
    ) -> int:
        """Closes a reservation: captures ``captured_micros``, releases the rest, records usage.

        One transaction. Idempotent and race-safe: if the reservation is already closed
        (settled before, or released by the sweeper) nothing happens and 0 is returned.

        Args:
            captured_micros: what the delivered images cost, at most the reserved amount.
            images_delivered: images actually returned to the caller.
            status: ``"succeeded"`` or ``"failed"`` (for the usage row).
            error_code: the error code of a failed request, for the usage row.

        Returns:
            The amount captured now (0 when the reservation was already closed).

        Raises:
            NotFoundError: no such reservation.
            ValueError: captured amount negative or above the reserved amount, negative
                image count, unknown status (caller bugs; nothing is changed).
        """
        if status not in USAGE_STATUSES:
            raise ValueError(f"status must be one of {USAGE_STATUSES}")
        if not _is_int(captured_micros) or captured_micros < 0:
            raise ValueError("captured_micros must be a non-negative int")
        if not _is_int(images_delivered) or images_delivered < 0:
            raise ValueError("images_delivered must be a non-negative int")
        captured = await self._close(
            reservation_id,
            captured_micros=captured_micros,
            images_delivered=images_delivered,
            status=status,
            error_code=error_code,
            closed_status="settled",
        )
        return captured or 0

    async def release(self, reservation_id: str, *, error_code: str) -> None:
        """Releases a whole reservation back to the balance (a failed request); idempotent."""
        await self.settle(reservation_id, captured_micros=0, images_delivered=0, status="failed", error_code=error_code)

    async def release_expired(self) -> int:
        """The sweeper: releases every open reservation whose ``expires_at`` has passed.

        Each reservation is released in its own short transaction, exactly like a failed
        settle (usage status ``failed``, error code ``reservation_expired``); racing a late
        settle or another replica's sweeper is safe.

        Returns:
            How many reservations this call released.
        """
        now = self._now()
        released = 0
        while True:
            ids: list[str] = await self._db.read(
                lambda conn: list(
                    conn.scalars(
                        select(reservations.c.id)
                        .where(reservations.c.status == "open", reservations.c.expires_at <= now)
                        .order_by(reservations.c.expires_at, reservations.c.id)
                        .limit(self._sweep_batch)
                    )
                )
            )
            if not ids:
                break
            for reservation_id in ids:
                claimed = await self._close(
                    reservation_id,
                    captured_micros=0,
                    images_delivered=0,
                    status="failed",
                    error_code=EXPIRED_ERROR_CODE,
                    closed_status="expired",
                )
                released += claimed is not None
        if released:
            logger.warning("released expired reservations", extra={"count": released})
        return released

    async def _close(
        self,
        reservation_id: str,
        *,
        captured_micros: int,
        images_delivered: int,
        status: str,
        error_code: str,
        closed_status: str,
    ) -> int | None:
        """Settles or expires one reservation; returns the captured amount, or None if it
        was already closed. Logs the money it moved (captured, released)."""
        now = self._now()

        def close() -> Program[Any]:
            row = yield Fetch(_CLAIM, (reservation_id, closed_status, captured_micros, now))
            if row is None:
                state = yield Fetch(_RESERVATION_STATE, (reservation_id,))
                if state is None:
                    raise NotFoundError(f"No reservation with id {_shown(reservation_id)}.", param="reservation_id")
                if state[0] != "open":
                    return None  # closed before: by an earlier settle, a concurrent one or the sweeper
                raise ValueError(f"cannot capture {captured_micros} micros from a reservation of {state[1]} micros")
            account_id, amount, request_id, model, images = row
            released = amount - captured_micros
            yield Execute(_SETTLE_ACCOUNT, (account_id, released, amount, captured_micros))
            # Zero-amount entries carry no information; the reservation row records both.
            if captured_micros:
                yield Execute(_INSERT_ENTRY, (account_id, "capture", captured_micros, reservation_id, now))
            if released:
                yield Execute(_INSERT_ENTRY, (account_id, "release", released, reservation_id, now))
            yield Execute(
                _INSERT_USAGE,
                (
                    account_id,
                    reservation_id,
                    request_id,
                    model,
                    images,
                    images_delivered,
                    captured_micros,
                    status,
                    _clip(error_code, 100),
                    now,
                ),
            )
            return account_id, amount, request_id

        closed = await self._db.write_plain(close())
        if closed is None:
            return None
        account_id, amount, request_id = closed
        if captured_micros:
            _log_money("captured", account_id, captured_micros, reservation_id, request_id)
        if released := amount - captured_micros:
            message = "released" if closed_status == "settled" else "expired reservation released"
            _log_money(message, account_id, released, reservation_id, request_id, error_code=error_code)
        return captured_micros

    async def usage(self, account_id: str, *, page_size: int = 100, before_id: int | None = None) -> UsagePage:
        """One page of an account's usage rows, newest first (by row id, so the order is
        stable: rows added while paging come before the first page, never inside a later one).

        Args:
            page_size: rows per page, 1..1000.
            before_id: the previous page's ``next_before_id``; None for the first page.

        Raises:
            InvalidRequestError: ``page_size`` outside 1..1000.
            NotFoundError: no such account.
        """
        if not _is_int(page_size) or not 1 <= page_size <= MAX_USAGE_PAGE_SIZE:
            raise InvalidRequestError(
                f"The page_size must be between 1 and {MAX_USAGE_PAGE_SIZE}.", param="page_size"
            )
        query = select(usage_records).where(usage_records.c.account_id == account_id)
        if before_id is not None:
            query = query.where(usage_records.c.id < before_id)
        # One row more than the page: whether it exists says whether there is a next page.
        query = query.order_by(usage_records.c.id.desc()).limit(page_size + 1)

        def usage(conn: Connection) -> Any:
            _require_account(conn, account_id)
            return conn.execute(query).all()

        rows = await self._db.read(usage)
        more = len(rows) > page_size
        rows = rows[:page_size]
        records = [
            UsageView(
                created=row.created_at,
                request_id=row.request_id,
                model=row.model,
                images_requested=row.images_requested,
                images_delivered=row.images_delivered,
                cost_micros=row.cost_micros,
                status=row.status,
                error_code=row.error_code,
            )
            for row in rows
        ]
        return UsagePage(records=records, next_before_id=rows[-1].id if more else None)

    # -- audit ----------------------------------------------------------------------

    async def reconcile(self) -> ReconcileReport:
        """Recomputes every account from the append-only ledger and reports differences.

        For each account, from ``ledger_entries`` (open = reserves - captures - releases):
        ``balance == credits - captures - open``, ``reserved == open`` (and equal to the sum
        of its open reservations), ``spent == captures``, ``credited == credits``. Also
        checks that every closed reservation was captured plus released exactly once, and
        an open one not at all. Reads one consistent snapshot; changes nothing.
        """
        entry = ledger_entries.c

        def total(kind: str) -> Any:
            return func.coalesce(func.sum(case((entry.kind == kind, entry.amount_micros), else_=0)), 0)

        def read(conn: Connection) -> tuple[Any, Any, Any, Any]:
            account_rows = (conn.execute(select(accounts).order_by(accounts.c.id))).all()
            sums = {
                row.account_id: row
                for row in conn.execute(
                    select(
                        entry.account_id,
                        total("credit").label("credits"),
                        total("reserve").label("reserves"),
                        total("capture").label("captures"),
                        total("release").label("releases"),
                    ).group_by(entry.account_id)
                )
            }
            open_held = {
                row.account_id: int(row.held)
                for row in conn.execute(
                    select(reservations.c.account_id, func.sum(reservations.c.amount_micros).label("held"))
                    .where(reservations.c.status == "open")
                    .group_by(reservations.c.account_id)
                )
            }
            settled = func.coalesce(func.sum(entry.amount_micros), 0)
            bad_reservations = conn.execute(
                select(
                    reservations.c.id,
                    reservations.c.account_id,
                    reservations.c.status,
                    reservations.c.amount_micros,
                    settled.label("settled"),
                )
                .select_from(
                    reservations.outerjoin(
                        ledger_entries,
                        (entry.reservation_id == reservations.c.id) & entry.kind.in_(("capture", "release")),
                    )
                )
                .group_by(
                    reservations.c.id,
                    reservations.c.account_id,
                    reservations.c.status,
                    reservations.c.amount_micros,
                )
                .having(
                    ((reservations.c.status == "open") & (settled != 0))
                    | ((reservations.c.status != "open") & (settled != reservations.c.amount_micros))
                )
                .order_by(reservations.c.id)
            ).all()
            return account_rows, sums, open_held, bad_reservations

        account_rows, sums, open_held, bad_reservations = await self._db.read(read, snapshot=True)
        mismatches: list[str] = []
        for account in account_rows:
            sum_row = sums.get(account.id)
            # PostgreSQL's SUM(bigint) is NUMERIC (a Decimal here): int() is exact.
            credits, reserves, captures, releases = (
                (int(sum_row.credits), int(sum_row.reserves), int(sum_row.captures), int(sum_row.releases))
                if sum_row is not None
                else (0, 0, 0, 0)
            )
            open_from_entries = reserves - captures - releases
            checks = (
                (
                    "balance_micros",
                    account.balance_micros,
                    "credits - captures - open reservations",
                    credits - captures - open_from_entries,
                ),
                ("reserved_micros", account.reserved_micros, "reserves - captures - releases", open_from_entries),
                ("spent_micros", account.spent_micros, "captures", captures),
                ("credited_micros", account.credited_micros, "credits", credits),
            )
            for column, actual, formula, wanted in checks:
                if actual != wanted:
                    mismatches.append(f"{account.id}: {column} is {actual} but the ledger says {formula} = {wanted}")
            held = open_held.get(account.id, 0)
            if held != open_from_entries:
                mismatches.append(
                    f"{account.id}: open reservations hold {held} but the ledger says "
                    f"reserves - captures - releases = {open_from_entries}"
                )
        for row in bad_reservations:
            mismatches.append(
                f"{row.account_id}: reservation {row.id} ({row.status}, {row.amount_micros}) "
                f"has {int(row.settled)} captured plus released"
            )
        if mismatches:
            logger.error("ledger reconcile found mismatches", extra={"count": len(mismatches)})
        return ReconcileReport(ok=not mismatches, accounts_checked=len(account_rows), mismatches=mismatches)


def _log_money(
    message: str, account_id: str, amount_micros: int, reservation_id: str, request_id: str, **fields: str
) -> None:
    # request_id is the reservation's own: the sweeper runs outside any request.
    logger.info(
        message,
        extra={
            "account_id": account_id,
            "amount_micros": amount_micros,
            "reservation_id": reservation_id,
            "request_id": request_id,
            **fields,
        },
    )


def _key_row(key_id: str) -> Program[Any]:
    return (yield Fetch(_API_KEY, (key_id,)))


def _require_account(conn: Connection, account_id: str) -> Any:
    row = conn.execute(select(accounts).where(accounts.c.id == account_id)).first()
    if row is None:
        raise NotFoundError(f"No account with id {_shown(account_id)}.", param="account_id")
    return row


def _entry(
    conn: Connection, account_id: str, kind: str, amount_micros: int, reservation_id: str | None, now: int
) -> None:
    conn.execute(
        ledger_entries.insert(),
        {
            "account_id": account_id,
            "kind": kind,
            "amount_micros": amount_micros,
            "reservation_id": reservation_id,
            "created_at": now,
        },
    )
