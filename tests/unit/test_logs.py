"""server.logs: every line is one JSON object with its extra fields and the call's bound ones."""

from __future__ import annotations

import asyncio
import io
import json
import logging
from collections.abc import Iterator

import pytest

from server.logs import bind_call, configure_logging


@pytest.fixture
def output() -> Iterator[io.StringIO]:
    """configure_logging into a buffer; the root logger is restored afterwards."""
    root = logging.getLogger()
    saved = (root.handlers[:], root.level)
    stream = io.StringIO()
    configure_logging("INFO", stream)
    try:
        yield stream
    finally:
        root.handlers[:] = saved[0]
        root.setLevel(saved[1])


def lines(stream: io.StringIO) -> list[dict[str, object]]:
    return [json.loads(line) for line in stream.getvalue().splitlines()]


def test_extra_fields_and_bound_fields_are_kept(output: io.StringIO) -> None:
    unbind = bind_call(request_id="req-1", method="/imagegw.v1.AdminService/CreditAccount")
    logging.getLogger("server.ledger.store").info(
        "account credited", extra={"account_id": "acct_1", "amount_micros": 2_500_000}
    )
    unbind()
    logging.getLogger("imagegw").info("models enabled: %s", "local-1")
    first, second = lines(output)
    assert list(first)[:4] == ["time", "level", "logger", "message"]
    assert {k: v for k, v in first.items() if k != "time"} == {
        "level": "info",
        "logger": "server.ledger.store",
        "message": "account credited",
        "account_id": "acct_1",
        "amount_micros": 2_500_000,
        "request_id": "req-1",
        "method": "/imagegw.v1.AdminService/CreditAccount",
    }
    assert str(first["time"]).endswith("Z")
    # Unbound again: the next line has no request id; %-style arguments are applied.
    assert (second["message"], "request_id" in second) == ("models enabled: local-1", False)


def test_an_extra_field_wins_over_the_bound_one(output: io.StringIO) -> None:
    unbind = bind_call(request_id="the-call")
    logging.getLogger("t").info("expired reservation released", extra={"request_id": "the-reservation"})
    unbind()
    assert lines(output)[0]["request_id"] == "the-reservation"


def test_exceptions_and_odd_values_are_written(output: io.StringIO) -> None:
    try:
        raise ValueError("boom")
    except ValueError:
        logging.getLogger("t").exception("unhandled error", extra={"path": io.StringIO})
    [line] = lines(output)
    assert line["level"] == "error" and "ValueError: boom" in str(line["exception"])
    assert "StringIO" in str(line["path"])


async def test_concurrent_calls_keep_their_own_request_ids(output: io.StringIO) -> None:
    async def call(request_id: str) -> None:
        unbind = bind_call(request_id=request_id)
        for _ in range(3):
            await asyncio.sleep(0)
            logging.getLogger("t").info("step", extra={"mine": request_id})
        # A task started inside the call (a settlement) keeps the binding, even after the call unbinds.
        async def settle() -> None:
            await asyncio.sleep(0.01)
            logging.getLogger("t").info("settled", extra={"mine": request_id})

        child = asyncio.create_task(settle())
        unbind()
        await child

    await asyncio.gather(*(call(f"r{i}") for i in range(5)))
    seen = lines(output)
    assert len(seen) == 20 and all(line["request_id"] == line["mine"] for line in seen)


def test_below_the_level_nothing_is_written(output: io.StringIO) -> None:
    logging.getLogger("t").debug("noise")
    assert output.getvalue() == ""
