"""Micro-dollar parsing and formatting (server.ledger.money)."""

from __future__ import annotations

import pytest

from server.errors import InvalidRequestError
from server.ledger.money import MAX_AMOUNT_MICROS, MICROS_PER_USD, format_usd, parse_usd


@pytest.mark.parametrize(
    ("text", "micros"),
    [
        ("5.00", 5_000_000),
        ("5", 5_000_000),
        ("5.", 5_000_000),
        (".5", 500_000),
        ("2.50", 2_500_000),
        ("0.000001", 1),
        ("0.1", 100_000),
        ("0.2", 200_000),
        ("123.456789", 123_456_789),
        ("  7.25\n", 7_250_000),
        ("+1", 1_000_000),
        ("007.000100", 7_000_100),
        ("1000000", MAX_AMOUNT_MICROS),
        ("1000000.000000", MAX_AMOUNT_MICROS),
    ],
)
def test_parse_usd_accepts_decimal_dollars(text: str, micros: int) -> None:
    assert parse_usd(text) == micros


def test_parse_usd_is_exact_where_floats_are_not() -> None:
    # 0.1 + 0.2 != 0.3 in floats; in micro-dollars it is exact.
    assert parse_usd("0.1") + parse_usd("0.2") == parse_usd("0.3") == 300_000


def test_parse_usd_zero_only_when_allowed() -> None:
    assert parse_usd("0", allow_zero=True) == 0
    assert parse_usd("0.000000", allow_zero=True) == 0
    for text in ("0", "0.00", ".0", "0."):
        with pytest.raises(InvalidRequestError, match="greater than zero") as caught:
            parse_usd(text)
        assert caught.value.param == "amount"


@pytest.mark.parametrize(
    ("text", "message"),
    [
        ("", "empty"),
        ("   ", "empty"),
        ("-1", "negative"),
        ("-0.01", "negative"),
        ("-0.000001", "negative"),
        ("1.2345678", "more than 6 decimals"),
        ("0.0000001", "more than 6 decimals"),
        ("1000000.000001", "larger than the maximum"),
        ("99999999999", "larger than the maximum"),
        ("abc", "not a decimal number"),
        ("NaN", "not a decimal number"),
        ("nan", "not a decimal number"),
        ("inf", "not a decimal number"),
        ("-Infinity", "not a decimal number"),
        ("1e3", "not a decimal number"),
        ("0x10", "not a decimal number"),
        ("1,00", "not a decimal number"),
        ("1 000", "not a decimal number"),
        ("1.2.3", "not a decimal number"),
        (".", "not a decimal number"),
        ("-", "not a decimal number"),
        ("--1", "not a decimal number"),
        ("$5", "not a decimal number"),
        ("\u0665", "not a decimal number"),  # ARABIC-INDIC DIGIT FIVE: str.isdigit() says yes
        ("\uff15", "not a decimal number"),  # FULLWIDTH DIGIT FIVE
        ("9" * 5000, "not a decimal number"),  # refused before any int() conversion
    ],
)
def test_parse_usd_rejects(text: str, message: str) -> None:
    with pytest.raises(InvalidRequestError, match=message) as caught:
        parse_usd(text)
    error = caught.value
    assert (error.param, error.code, error.http_status) == ("amount", "invalid_value", 400)
    assert len(error.message) < 200


@pytest.mark.parametrize("value", [None, 5, 5.0, b"5.00"])
def test_parse_usd_rejects_non_strings(value: object) -> None:
    with pytest.raises(InvalidRequestError) as caught:
        parse_usd(value)  # type: ignore[arg-type]
    assert caught.value.param == "amount"


def test_parse_usd_names_the_given_param() -> None:
    with pytest.raises(InvalidRequestError) as caught:
        parse_usd("-1", param="balance_usd")
    assert caught.value.param == "balance_usd"


@pytest.mark.parametrize(
    ("micros", "text"),
    [
        (5_000_000, "5.000000"),
        (0, "0.000000"),
        (1, "0.000001"),
        (999_999, "0.999999"),
        (MICROS_PER_USD, "1.000000"),
        (123_456_789, "123.456789"),
        (MAX_AMOUNT_MICROS, "1000000.000000"),
        (-500_000, "-0.500000"),
        (-1, "-0.000001"),
        (-12_345_678, "-12.345678"),
        (2**63 - 1, "9223372036854.775807"),
    ],
)
def test_format_usd(micros: int, text: str) -> None:
    assert format_usd(micros) == text


@pytest.mark.parametrize("micros", [1, 10, 999_999, 1_000_000, 1_000_001, 40_000, 123_456_789, MAX_AMOUNT_MICROS])
def test_format_then_parse_round_trips(micros: int) -> None:
    assert parse_usd(format_usd(micros)) == micros
