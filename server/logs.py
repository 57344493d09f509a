"""Logs: one JSON object per line on stderr, carrying every field of the call and the RPC's.

Modules log with the standard library, fields as ``extra``::

    log.info("account credited", extra={"account_id": account_id, "amount_micros": amount})

and structlog's :class:`~structlog.stdlib.ProcessorFormatter` renders each record (ours
and the libraries') as one JSON object: ``time``, ``level``, ``logger``, ``message``, then
every ``extra`` field, then the fields bound to the current RPC (:func:`bind_call`: the
interceptor binds ``request_id`` and ``method`` for the whole call, so every line logged
while handling it, the ledger's included, carries them). The binding lives in a context
variable, so concurrent RPCs (one asyncio task each) never see each other's, and a task
started inside a call (its settlement) keeps it. A field given in ``extra`` wins over a
bound one of the same name (the sweeper logs the request id of the reservation it
releases). Nothing is formatted to a string and parsed back.

Never log a secret: API keys, the admin token and provider keys are not fields of any
log call, and the interceptor does not log metadata.
"""

from __future__ import annotations

import json
import logging
import sys
from collections.abc import Callable
from typing import Any, TextIO

import structlog
from structlog.typing import EventDict, WrappedLogger

__all__ = ["bind_call", "configure_logging", "json_formatter"]

# The keys every line starts with, in this order; the fields follow.
_FIRST = ("time", "level", "logger", "message")


def _first_keys_first(_logger: WrappedLogger, _method: str, event: EventDict) -> EventDict:
    return {**{key: event.pop(key) for key in _FIRST if key in event}, **event}


def _json(event: Any, **_kwargs: Any) -> str:
    # default=str: a field of another type (a Path, a Decimal) is written, not an error.
    return json.dumps(event, separators=(",", ":"), default=str)


def configure_logging(level: str, stream: TextIO | None = None) -> None:
    """Sends every log record, as one JSON line, to ``stream`` (stderr by default),
    replacing any handler configured before."""
    handler = logging.StreamHandler(stream or sys.stderr)
    handler.setFormatter(json_formatter())
    logging.basicConfig(level=level.upper(), handlers=[handler], force=True)
    # httpx logs every upstream request at INFO ("HTTP Request: POST ..."): a fourth line
    # per generation, about 17 µs of the event loop's time each, saying what the access
    # line and the upstream metrics already say. At DEBUG it is logged again.
    debug = logging.getLogger().getEffectiveLevel() <= logging.DEBUG
    logging.getLogger("httpx").setLevel(logging.NOTSET if debug else logging.WARNING)


def json_formatter() -> logging.Formatter:
    """The formatter of :func:`configure_logging`: one JSON object per record."""
    return structlog.stdlib.ProcessorFormatter(
        # Run on each record: its extra fields first (so they win), then the call's.
        foreign_pre_chain=[
            structlog.stdlib.ExtraAdder(),
            structlog.contextvars.merge_contextvars,
            structlog.stdlib.add_log_level,
            structlog.stdlib.add_logger_name,
            structlog.processors.TimeStamper(fmt="iso", utc=True, key="time"),
        ],
        processors=[
            structlog.stdlib.ProcessorFormatter.remove_processors_meta,
            structlog.processors.format_exc_info,
            structlog.processors.EventRenamer("message"),
            _first_keys_first,
            structlog.processors.JSONRenderer(serializer=_json),
        ],
    )


def bind_call(**fields: Any) -> Callable[[], None]:
    """Adds ``fields`` to every line logged in this context (this task, and tasks it
    starts from now on); returns the function that takes them off again."""
    tokens = structlog.contextvars.bind_contextvars(**fields)
    return lambda: structlog.contextvars.reset_contextvars(**tokens)
