"""Money as integer micro-dollars, and its one text form: six-decimal US dollars.

Every amount the ledger stores, adds or compares is an ``int`` of micro-dollars
(1 USD = 1_000_000). Floats never touch money: ``0.1 + 0.2`` is not ``0.3``, and a
ledger that must prove ``balance == credits - captures - open reservations`` to the
micro-dollar cannot afford that. Text enters only through :func:`parse_usd` (operator
input such as ``"5.00"``) and leaves only through :func:`format_usd` (``"5.000000"``,
the shape used by the admin API, the CLI and the ``x-imagegw-cost-usd`` header).

Bounds, chosen so no sum the ledger ever forms can overflow a signed 64-bit BIGINT
(SQLite would silently turn an overflowing integer into a REAL):

* one amount (an opening balance, a credit) is at most :data:`MAX_AMOUNT_MICROS`,
  ``10**12`` micro-dollars, i.e. one million dollars;
* the lifetime credits of one account are at most :data:`MAX_CREDITED_MICROS`,
  ``10**15`` micro-dollars (one billion dollars); every other column of an account
  (balance, reserved, spent) is bounded by its credits.
"""

from __future__ import annotations

import re

from server.errors import InvalidRequestError

__all__ = [
    "MAX_AMOUNT_MICROS",
    "MAX_CREDITED_MICROS",
    "MICROS_PER_USD",
    "format_usd",
    "parse_usd",
]

MICROS_PER_USD = 1_000_000
MAX_AMOUNT_MICROS = 10**12
MAX_CREDITED_MICROS = 10**15

# ASCII digits only: ``\d`` would also accept Arabic-Indic and other Unicode digits.
# A leading sign is matched so that "-1" gets the "negative" message, not "not a number".
_USD = re.compile(r"(?P<sign>[+-]?)(?P<units>[0-9]*)(?:\.(?P<frac>[0-9]*))?", re.ASCII)
# Longer inputs are rejected before any integer conversion (no quadratic int() on
# megabytes of digits, and a short error message).
_MAX_TEXT_LENGTH = 40


def parse_usd(text: str, *, allow_zero: bool = False, param: str = "amount") -> int:
    """Parses a decimal amount of US dollars into micro-dollars.

    Accepts ``"5"``, ``"5.00"``, ``"0.000001"``, ``".5"`` and ``"5."`` (surrounding
    whitespace is ignored); never goes through ``float``.

    Args:
        text: the amount as written by the operator.
        allow_zero: accept ``"0"`` (an opening balance may be zero, a credit may not).
        param: the request field named in the error.

    Returns:
        The amount in micro-dollars, ``0 <= amount <= MAX_AMOUNT_MICROS``.

    Raises:
        InvalidRequestError: (``param="amount"`` by default) for empty, non-numeric,
            NaN/infinity, negative, zero (unless allowed), more than six decimals,
            or more than :data:`MAX_AMOUNT_MICROS`.
    """
    if not isinstance(text, str):
        raise InvalidRequestError("The amount must be a string of US dollars, like '5.00'.", param=param)
    stripped = text.strip()
    if not stripped:
        raise InvalidRequestError("The amount is empty; give US dollars, like '5.00'.", param=param)
    shown = stripped if len(stripped) <= _MAX_TEXT_LENGTH else stripped[:_MAX_TEXT_LENGTH] + "..."
    match = _USD.fullmatch(stripped) if len(stripped) <= _MAX_TEXT_LENGTH else None
    if match is None or not (match["units"] or match["frac"]):
        raise InvalidRequestError(
            f"The amount {shown!r} is not a decimal number of US dollars, like '5.00'.", param=param
        )
    units, frac = match["units"] or "0", match["frac"] or ""
    if len(frac) > 6:
        raise InvalidRequestError(
            f"The amount {shown!r} has more than 6 decimals; the smallest unit is 0.000001 USD.", param=param
        )
    micros = int(units) * MICROS_PER_USD + int(frac.ljust(6, "0"))
    if match["sign"] == "-" and micros != 0:
        raise InvalidRequestError(f"The amount {shown!r} is negative.", param=param)
    if micros == 0 and not allow_zero:
        raise InvalidRequestError(f"The amount {shown!r} must be greater than zero.", param=param)
    if micros > MAX_AMOUNT_MICROS:
        raise InvalidRequestError(
            f"The amount {shown!r} is larger than the maximum of {format_usd(MAX_AMOUNT_MICROS)} USD.",
            param=param,
        )
    return micros


def format_usd(micros: int) -> str:
    """Formats micro-dollars as US dollars with exactly six decimals.

    ``5_000_000 -> "5.000000"``, ``1 -> "0.000001"``, ``-500_000 -> "-0.500000"``.
    """
    sign = "-" if micros < 0 else ""
    units, frac = divmod(abs(micros), MICROS_PER_USD)
    return f"{sign}{units}.{frac:06d}"
