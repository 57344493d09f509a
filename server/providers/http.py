"""The HTTP discipline every upstream adapter shares.

An adapter owns its wire format and one table that maps its vendor's errors to a
``Kind``; this module owns everything else about talking to an upstream:

* **Bounded reads.** Bodies are streamed and abandoned past ``max_response_bytes``
  (a base64 answer with four 4K images is tens of MiB; a broken upstream could send more).
  A large body is read only once the process's ``AnswerGate`` (``server.providers.gate``)
  gives it a slot, held through the adapter's parsing and decoding when the adapter
  passes its ``answer()`` scope; without one, through the read.
* **Retries within the deadline.** Rate limits (429), 5xx, connection errors and read
  timeouts before the answer's head are retried with exponential backoff and jitter,
  honouring the upstream's own hint: the adapter's (Google's ``RetryInfo.retryDelay``),
  then ``retry-after-ms``, then ``Retry-After`` (seconds or an HTTP-date). A wait that does
  not fit before the deadline, or is longer than ``RetryPolicy.max_retry_after``, is not
  slept: the call fails at once with a retryable ``UpstreamError`` carrying the wait.
  A failure *after* the head arrived (a truncated body) is not retried: the upstream has
  probably generated, and billed, the images already.
* **Errors by type.** ``Kind`` -> exception happens in one place (``UpstreamHttp.error``).
  Our own credentials or credit being refused is our misconfiguration: the caller gets a
  generic 502 that never names the key, and the operator gets a loud ``logging.error``.
* **Answers are typed.** ``UpstreamResponse.parse`` validates a JSON body straight into the
  adapter's pydantic model (``UpstreamModel``; unknown fields ignored, ``Informational``
  fields read as absent when they have the wrong type, so a cosmetic field never fails a
  paid answer). Measured with ``python -m bench.parse`` on a 1.47 MB OpenAI answer: 0.14 ms
  and 1.47 MB allocated, against 0.56 ms and 2.94 MB for ``json.loads`` and the isinstance
  checks it replaced (6 MB, n=4: 0.5 ms / 5.9 MB against 7-12 ms / 11.7 MB): pydantic copies
  the base64 text once, ``json.loads`` first decodes the whole body to a str. Bodies above
  ``OFFLOAD_BYTES`` are parsed in a thread, but either parser holds the GIL throughout, so
  that shortens no stall of the event loop (59 MB: a 56 ms gap in a thread, 64 ms inline):
  about 1 ms per MB of answer, whichever way.
* **Images are checked before anyone sees them.** Strict base64 (a ``data:`` URL prefix is
  accepted, bad padding is not), magic-number sniffing and a full Pillow decode off the
  event loop; provider URLs are downloaded at once with the same size bound.

Nothing here sleeps past ``deadline`` (an absolute ``loop.time()``), and cancellation is
never swallowed: cancelling the caller closes the upstream connection.
"""

from __future__ import annotations

import asyncio
import binascii
import contextlib
import email.utils
import enum
import io
import json
import logging
import math
import random
import re
import time
from collections.abc import AsyncIterator, Awaitable, Callable, Mapping, Sequence
from dataclasses import dataclass
from typing import Annotated, Any, TypeVar

import aiohttp
import httpx
import pybase64
from PIL import Image, UnidentifiedImageError
from pydantic import (
    BaseModel,
    ConfigDict,
    Field,
    Strict,
    ValidationError,
    ValidatorFunctionWrapHandler,
    WrapValidator,
    model_validator,
)

from server.config import DEFAULT_TUNING
from server.errors import (
    ApiError,
    ContentPolicyError,
    DeadlineExceededError,
    UpstreamError,
)
from server.offload import OFFLOAD_BYTES, run_sized
from server.providers.base import GeneratedImage, InputImage, Progress, ProviderResult, TokenUsage
from server.providers.gate import AnswerGate, AnswerScope, answer_scope

__all__ = [
    "CREDENTIALS_MESSAGE",
    "Count",
    "ErrorBody",
    "ErrorTable",
    "Failure",
    "Informational",
    "Kind",
    "RetryPolicy",
    "UpstreamClient",
    "SseDecoder",
    "SseEvent",
    "UpstreamEvents",
    "UpstreamHttp",
    "UpstreamModel",
    "UpstreamResponse",
    "create_http_client",
    "decode_base64",
    "fan_out",
    "image_from_base64",
    "image_from_bytes",
    "input_base64",
    "input_bytes",
    "json_content",
    "lookup_kind",
    "parse_duration",
    "parse_json",
    "sniff_format",
]

logger = logging.getLogger(__name__)

# One generic message for our key *and* our credit: the caller cannot fix either, and the
# operator learns which it was from the log line.
CREDENTIALS_MESSAGE = "The upstream provider rejected the gateway's credentials"
DATA_URL_RE = re.compile(r"^data:image/[a-z0-9.+-]+;base64,", re.IGNORECASE)
DURATION_RE = re.compile(r"^\s*(\d+(?:\.\d+)?)s\s*$")
USER_AGENT = "imagegw/0.1"


class Kind(enum.Enum):
    """What an upstream failure means for us; each adapter's table maps into these."""

    CONTENT_POLICY = "content_policy"  # the provider's safety system refused: 400 to the caller
    CREDENTIALS = "credentials"  # our key is wrong or lacks permission: our misconfiguration
    ACCOUNT = "account"  # our credit, spend limit or daily quota is gone: our misconfiguration
    MODEL_UNAVAILABLE = "model_unavailable"  # the upstream does not serve the catalog's model
    REJECTED = "rejected"  # the upstream refused parameters we could not pre-validate
    RATE_LIMITED = "rate_limited"  # retry after the hinted wait
    TRANSIENT = "transient"  # 5xx, timeouts, connection errors: retry with backoff
    MALFORMED = "malformed"  # an answer we cannot use: never retried, never an empty success


RETRIED = frozenset({Kind.RATE_LIMITED, Kind.TRANSIENT})
# Error tables key on (HTTP status, vendor code); None matches any status or any code.
ErrorTable = Mapping[tuple[int | None, str | None], Kind]


@dataclass(frozen=True, slots=True)
class Failure:
    """One classified upstream failure: what it means and what the vendor said."""

    kind: Kind
    detail: str = ""
    status: int | None = None
    code: str | None = None
    # A wait the vendor put in the body (Google's RetryInfo); headers are read separately.
    retry_after: float | None = None


@dataclass(frozen=True, slots=True)
class RetryPolicy:
    """How hard to try one upstream call. Delays are seconds."""

    max_attempts: int = 3
    base_delay: float = 0.5
    max_delay: float = 8.0
    jitter: float = 0.25
    # A hint longer than this is not slept even when the deadline allows (OpenAI's SDK caps at 120 s).
    max_retry_after: float = 120.0
    # Wait after a 429 that carries no hint (Stability times a key out for 60 s).
    rate_limit_delay: float | None = None

    def backoff(self, attempt: int) -> float:
        """Exponential delay before retry number ``attempt`` (1-based), minus up to ``jitter``."""
        delay = min(self.base_delay * 2 ** (attempt - 1), self.max_delay)
        return delay * (1 - self.jitter * random.random())


T = TypeVar("T")
M = TypeVar("M", bound=BaseModel)


class UpstreamModel(BaseModel):
    """Base of the typed upstream answers: the fields an adapter reads, with their types.

    Unknown fields are ignored (providers add fields all the time). Not frozen: an adapter
    drops each base64 text (sets it to None) as soon as its image is decoded.
    """

    model_config = ConfigDict(extra="ignore")


class ErrorBody(UpstreamModel):
    """Base of the typed error bodies; a body wrapped in a one-element list is unwrapped
    (Google and some OpenAI-compatible hosts send ``[{"error": ...}]``)."""

    @model_validator(mode="before")
    @classmethod
    def _unwrap(cls, value: Any) -> Any:
        return value[0] if isinstance(value, list) and len(value) == 1 else value


def _or_none(value: Any, handler: ValidatorFunctionWrapHandler) -> Any:
    try:
        return handler(value)
    except ValidationError:
        return None


def _or_zero(value: Any, handler: ValidatorFunctionWrapHandler) -> Any:
    try:
        return handler(value)
    except ValidationError:
        return 0


# A field passed on or consulted but never needed: a value of the wrong type reads as absent.
Informational = Annotated[T | None, WrapValidator(_or_none)]
# A token count: a non-negative JSON integer, anything else reads as 0.
Count = Annotated[int, Strict(), Field(ge=0), WrapValidator(_or_zero)]


@dataclass(frozen=True, slots=True)
class UpstreamResponse:
    """A complete upstream answer, read within the size bound."""

    status: int
    headers: Mapping[str, str]  # case-insensitive (aiohttp's, or httpx.Headers)
    body: bytes
    url: str

    @property
    def content_type(self) -> str:
        return self.headers.get("content-type", "").split(";")[0].strip().lower()

    async def parse(self, model: type[M]) -> M:
        """The body validated into ``model``, or a MALFORMED UpstreamError (``parse_json``)."""
        return await parse_json(self.body, model, invalid=f"invalid JSON from {_host(self.url)} (HTTP {self.status})")

    def parse_or_none(self, model: type[M]) -> M | None:
        """The body validated into ``model`` when it is small and fits (error bodies), else None."""
        if len(self.body) > OFFLOAD_BYTES:
            return None
        try:
            return model.model_validate_json(self.body)
        except ValidationError:
            return None


async def parse_json(data: bytes, model: type[M], *, invalid: str) -> M:
    """JSON ``data`` validated straight into ``model`` (no dict first), in a thread when
    large; a MALFORMED UpstreamError saying ``invalid`` when it is not JSON, or naming the
    first field that does not fit."""
    try:
        return await run_sized(len(data), model.model_validate_json, data)
    except ValidationError as exc:
        first = exc.errors(include_url=False)[0]
        if first["type"] == "json_invalid":
            raise malformed(invalid) from exc
        where = ".".join(str(part) for part in first["loc"]) or "the top level"
        raise malformed(f"an answer of unexpected shape ({where}: {first['msg']})") from exc


@dataclass(frozen=True, slots=True)
class _Body:
    """What a request sends: at most one of JSON, multipart parts or encoded bytes."""

    json: Any = None
    files: Any = None
    content: bytes | None = None


async def json_content(body: object, *, size: int) -> bytes:
    """``body`` as JSON bytes (for ``send(content=...)`` with a JSON content type), encoded
    off the loop when ``size`` (its approximate length: the base64 images it carries) is
    large: an edit's input images make bodies of many megabytes."""
    return await run_sized(size, lambda: json.dumps(body, separators=(",", ":")).encode())


class _BodyError(Exception):
    """The answer's head arrived but its body could not be read in full."""


# Abandoned upstream exchanges still closing their connection (referenced until done).
_CLOSING: set[asyncio.Task[Any]] = set()


def _closed(task: asyncio.Task[Any]) -> None:
    _CLOSING.discard(task)
    if not task.cancelled():
        task.exception()  # retrieved: nobody awaits an abandoned exchange


def _abandon(exchange: asyncio.Task[Any]) -> None:
    """Cancels an exchange nobody waits for any more, once, and keeps it referenced until
    httpcore has closed its connection."""
    if not exchange.done():
        exchange.cancel()
        _CLOSING.add(exchange)
        exchange.add_done_callback(_closed)


@dataclass(frozen=True, slots=True)
class SseEvent:
    """One Server-Sent Event: its ``event:`` name (None when absent) and its data."""

    event: str | None
    data: bytes


class SseDecoder:
    """Server-Sent Events from a byte stream, each at most ``limit`` bytes (an upstream
    that never ends a line cannot grow our memory past it). Comments, ``id:`` and
    ``retry:`` lines are skipped."""

    def __init__(self, limit: int) -> None:
        self._limit = limit
        self._buffer = bytearray()
        self._event: str | None = None
        self._data: list[bytes] = []
        self._size = 0

    @property
    def pending(self) -> bool:
        """Whether an event was begun and not finished by a blank line."""
        return bool(self._data or self._event is not None or self._buffer.strip())

    def feed(self, chunk: bytes) -> list[SseEvent]:
        self._buffer += chunk
        events: list[SseEvent] = []
        start = 0
        while True:
            end = self._buffer.find(b"\n", start)
            if end < 0:
                break
            line = bytes(self._buffer[start:end]).removesuffix(b"\r")
            start = end + 1
            event = self._line(line)
            if event is not None:
                events.append(event)
        del self._buffer[:start]
        if self._size + len(self._buffer) > self._limit:
            raise _BodyError(f"an event above the {self._limit}-byte limit")
        return events

    def _line(self, line: bytes) -> SseEvent | None:
        if not line:
            if not self._data and self._event is None:
                return None
            event = SseEvent(self._event, b"\n".join(self._data))
            self._event, self._data, self._size = None, [], 0
            return event
        if line.startswith(b":"):
            return None
        name, _, value = line.partition(b":")
        value = value.removeprefix(b" ")
        if name == b"data":
            self._data.append(value)
            self._size += len(value)
        elif name == b"event":
            self._event = value.decode("utf-8", "replace")
        return None


class UpstreamEvents:
    """An upstream's Server-Sent Events as they arrive (``async for``), bounded per event
    and by the request's deadline; a stream cut short raises a MALFORMED UpstreamError."""

    def __init__(
        self,
        status: int,
        headers: Mapping[str, str],
        queue: asyncio.Queue[SseEvent | BaseException | None],
        exchange: asyncio.Task[None],
        *,
        deadline: float,
        url: str,
    ) -> None:
        self.status = status
        self.headers = headers
        self._queue = queue
        self._exchange = exchange
        self._deadline = deadline
        self._url = url

    def __aiter__(self) -> UpstreamEvents:
        return self

    async def __anext__(self) -> SseEvent:
        try:
            async with asyncio.timeout_at(self._deadline):
                item = await self._queue.get()
        except TimeoutError as exc:
            raise DeadlineExceededError("The upstream provider did not finish before the request's deadline.") from exc
        if item is None:
            raise StopAsyncIteration
        if isinstance(item, BaseException):
            raise item
        return item

    def close(self) -> None:
        """Stops reading and closes the connection (in the background)."""
        _abandon(self._exchange)


def _in_words(exc: httpx.TransportError) -> str:
    """A transport failure as a client may read it: what happened, not a library's class
    name (the class and its text go to the log)."""
    logger.info("upstream transport error: %s: %s", type(exc).__name__, exc)
    match exc:
        case httpx.TimeoutException():
            return "connection timed out"
        case httpx.ConnectError():
            return "connection refused or unreachable"
        case httpx.RemoteProtocolError():
            return "connection closed early"
        case _:
            return "connection error"


def _transport_error(exc: BaseException) -> httpx.TransportError:
    """aiohttp's failure as the httpx error httpcore raised for the same one (the
    vocabulary of ``UpstreamHttp``'s retries; ``_in_words`` says them to clients)."""
    if isinstance(exc, aiohttp.ServerDisconnectedError):
        return httpx.RemoteProtocolError("Server disconnected without sending a response.")
    if isinstance(exc, aiohttp.ClientPayloadError):
        return httpx.RemoteProtocolError(f"peer closed connection without sending complete message body: {exc}")
    if isinstance(exc, aiohttp.ClientConnectorError):
        return httpx.ConnectError(str(exc))
    if isinstance(exc, (aiohttp.ServerTimeoutError, TimeoutError)):
        return httpx.ConnectTimeout(str(exc) or "connect timed out")
    if isinstance(exc, aiohttp.ClientResponseError):
        return httpx.RemoteProtocolError(str(exc))  # not HTTP/1.1 as aiohttp knows it
    return httpx.ReadError(str(exc))


class UpstreamClient:
    """The HTTP client of one provider: aiohttp's connection pool and C HTTP parser.

    httpx's client and httpcore's pool cost 650 µs of CPU per exchange with a tiny
    answer, 40 % of the server's CPU once the database was plain SQL; aiohttp under
    httpx (a transport) 390 µs; aiohttp alone 209 µs (bench/README.md, round three). So
    requests go straight to aiohttp. httpx stays where it does something aiohttp would
    do differently: a multipart body is httpx's encoding (``httpx.Request(files=...)``:
    the same bytes and Content-Length as before), and failures are httpx's exception
    types (``_transport_error``). No environment proxies, httpx's trust store (certifi),
    no redirects, gzip and deflate decoded (as httpx did). The session is made in the
    event loop, on first use; the composition root closes it (``aclose``).
    """

    def __init__(self, *, max_connections: int, connect_timeout: float = 10.0) -> None:
        self._limit = max_connections
        self._connect_timeout = connect_timeout
        self._session: aiohttp.ClientSession | None = None

    def _open(self) -> aiohttp.ClientSession:
        connector = aiohttp.TCPConnector(limit=self._limit, limit_per_host=0, ssl=httpx.create_ssl_context())
        return aiohttp.ClientSession(
            connector=connector,
            headers={"user-agent": USER_AGENT, "accept": "*/*", "accept-encoding": "gzip, deflate"},
            timeout=aiohttp.ClientTimeout(total=None, sock_connect=self._connect_timeout),
        )

    @contextlib.asynccontextmanager
    async def request(
        self, method: str, url: str, *, headers: Mapping[str, str] | None, body: _Body
    ) -> AsyncIterator[aiohttp.ClientResponse]:
        """The answer's head (status, headers); its body is read from ``content``. Raises
        httpx's TransportError subclasses. The connection goes back to the pool when the
        body was read to its end, and is closed otherwise."""
        session = self._session = self._session or self._open()
        sent: dict[str, str] = dict(headers or {})
        data: Any = body.content
        if body.json is not None:
            data = json.dumps(body.json, ensure_ascii=False, separators=(",", ":"), allow_nan=False).encode()
            sent.setdefault("content-type", "application/json")
        elif body.files is not None:
            encoded = httpx.Request(method, url, files=body.files)
            sent.update((k, v) for k, v in encoded.headers.items() if k in ("content-type", "content-length"))
            data = encoded.stream  # read as it is sent, file by file
        elif data is not None:
            sent.setdefault("content-type", "application/json")
        try:
            response = await session.request(method, url, headers=sent, data=data, allow_redirects=False)
        except aiohttp.ClientError as exc:
            raise _transport_error(exc) from exc
        except TimeoutError as exc:  # aiohttp's connect timeout
            raise _transport_error(exc) from exc
        try:
            yield response
        finally:
            if response.content.at_eof():
                response.release()
            else:
                response.close()

    async def aclose(self) -> None:
        if self._session is not None:
            await self._session.close()

    async def __aenter__(self) -> UpstreamClient:
        return self

    async def __aexit__(self, *_: object) -> None:
        await self.aclose()


async def _chunks(response: aiohttp.ClientResponse) -> AsyncIterator[bytes]:
    """The body as it arrives (decoded), failures as httpx's."""
    try:
        async for chunk in response.content.iter_any():
            yield chunk
    except aiohttp.ClientError as exc:
        raise _transport_error(exc) from exc


def create_http_client(*, max_connections: int = DEFAULT_TUNING.upstream_max_connections) -> UpstreamClient:
    """A pooled client fit for one provider; the composition root owns and closes it.

    There is no read timeout: each call is bounded by its request's deadline (a
    generation may take minutes). Redirects are not followed, so a key never travels to a
    host the adapter did not pick.
    """
    return UpstreamClient(max_connections=max_connections)


def malformed(detail: str) -> UpstreamError:
    """The caller-facing error for an answer we cannot use."""
    logger.warning("malformed upstream answer: %s", detail)
    return UpstreamError(f"The upstream provider returned a malformed answer: {detail}.", retryable=False)


def lookup_kind(table: ErrorTable, status: int, codes: Sequence[str | None]) -> Kind:
    """The table's kind for ``status`` and the first matching vendor code, most specific first.

    Codes are structured fields (OpenAI ``error.code``/``type``, Google ``status`` and
    ``ErrorInfo.reason``, Stability ``name``), never message text. Unlisted statuses fall
    back by class: 408/409/5xx transient, 429 rate limited, anything else rejected.
    """
    for code in codes:
        if code is not None and (status, code) in table:
            return table[(status, code)]
    for code in codes:
        if code is not None and (None, code) in table:
            return table[(None, code)]
    if (status, None) in table:
        return table[(status, None)]
    if status in (408, 409) or status >= 500:
        return Kind.TRANSIENT
    if status == 429:
        return Kind.RATE_LIMITED
    return Kind.REJECTED


def parse_duration(value: object) -> float | None:
    """Seconds from a protobuf JSON Duration such as ``"12.5s"``; None if it is not one."""
    if not isinstance(value, str):
        return None
    match = DURATION_RE.match(value)
    return float(match.group(1)) if match else None


def retry_after_from_headers(headers: Mapping[str, str]) -> float | None:
    """``retry-after-ms`` (float ms), else ``Retry-After`` (seconds or HTTP-date), in seconds."""
    raw_ms = headers.get("retry-after-ms")
    if raw_ms is not None:
        try:
            value = float(raw_ms) / 1000
            if math.isfinite(value) and value >= 0:
                return value
        except ValueError:
            pass
    raw = headers.get("retry-after")
    if raw is None:
        return None
    try:
        value = float(raw)
        return value if math.isfinite(value) and value >= 0 else None
    except ValueError:
        pass
    try:
        when = email.utils.parsedate_to_datetime(raw)
    except (TypeError, ValueError, IndexError):
        return None
    if when is None:  # pragma: no cover - older Pythons returned None instead of raising
        return None
    return max(0.0, when.timestamp() - time.time())


def _host(url: str) -> str:
    try:
        return httpx.URL(url).host or "upstream"
    except httpx.InvalidURL:  # pragma: no cover - we only build valid URLs
        return "upstream"


class UpstreamHttp:
    """One provider's calls: bounded reads, retries within the deadline, errors by kind."""

    def __init__(
        self,
        client: UpstreamClient,
        *,
        provider: str,
        max_response_bytes: int,
        retry: RetryPolicy,
        key_setting: str,
        on_retry: Callable[[], None] | None = None,
        sleep: Callable[[float], Awaitable[None]] = asyncio.sleep,
        gate: AnswerGate | None = None,
        fan_out_width: int = DEFAULT_TUNING.fan_out_width,
    ) -> None:
        self.client = client
        self.gate = gate
        # How many calls one request makes at once where this provider makes one image per
        # call (the adapter's fan_out).
        self.fan_out_width = fan_out_width
        # Told of every retry (the composition root counts them in a metric).
        self.on_retry = on_retry
        # Every wait before a retry; tests pass one that records the waits instead of sleeping.
        self.sleep = sleep
        self.provider = provider
        self.max_response_bytes = max_response_bytes
        self.retry = retry
        # Named in the loud log line so the operator knows what to fix.
        self.key_setting = key_setting

    def answer(self) -> AnswerScope:
        """A claim on the gate for one answer: ``async with`` it around ``send(scope=...)``
        and the parsing and decoding of what came back, so that a large answer keeps its
        slot until its images are bytes that have been checked (in a request that holds
        its slot until its answer is written, ``AnswerGate.request``, a share of that one)."""
        return answer_scope(self.gate)

    async def send(
        self,
        method: str,
        url: str,
        *,
        deadline: float,
        classify: Callable[[UpstreamResponse], Failure],
        headers: Mapping[str, str] | None = None,
        json_body: Any = None,
        files: Any = None,
        content: bytes | None = None,
        operation: str = "request",
        scope: AnswerScope | None = None,
    ) -> UpstreamResponse:
        """Sends one logical request and returns its 2xx answer, retrying what is transient.

        The body is ``json_body``, or multipart ``files`` (httpx's list of parts), or
        ``content`` already encoded (a large JSON body made off the loop: ``json_content``).
        ``classify`` turns a non-2xx answer into a ``Failure`` using the adapter's table.
        Raises the mapped ``ApiError``; ``DeadlineExceededError`` when ``deadline`` passes
        while waiting for the upstream (or for the gate). Without ``scope``, a large body
        holds its gate slot only while it is read.
        """
        if scope is None:
            async with self.answer() as own:
                return await self.send(
                    method, url, deadline=deadline, classify=classify, headers=headers, json_body=json_body,
                    files=files, content=content, operation=operation, scope=own,
                )
        body = _Body(json_body, files, content)
        answer = await self._retrying(
            lambda: self._attempt(method, url, deadline=deadline, headers=headers, payload=body, scope=scope),
            deadline=deadline,
            classify=classify,
            operation=operation,
            scope=scope,
        )
        assert isinstance(answer, UpstreamResponse)
        return answer

    @contextlib.asynccontextmanager
    async def stream(
        self,
        method: str,
        url: str,
        *,
        deadline: float,
        classify: Callable[[UpstreamResponse], Failure],
        headers: Mapping[str, str] | None = None,
        json_body: Any = None,
        files: Any = None,
        operation: str = "request",
        scope: AnswerScope | None = None,
    ) -> AsyncIterator[UpstreamEvents | UpstreamResponse]:
        """Like ``send``, for an upstream that may answer Server-Sent Events: yields the
        events as they arrive (``UpstreamEvents``), or the whole 2xx answer when the
        upstream answered something else (a host that ignores ``stream``). Failures before
        the head are retried as in ``send``; the connection is closed on exit. Events are
        not gated (the stream holds at most a few of them); a whole answer is, in ``scope``."""
        if scope is None:
            async with self.answer() as own, self.stream(
                method, url, deadline=deadline, classify=classify, headers=headers, json_body=json_body,
                files=files, operation=operation, scope=own,
            ) as opened:
                yield opened
            return
        body = _Body(json_body, files, None)
        opened = await self._retrying(
            lambda: self._open_events(method, url, deadline=deadline, headers=headers, payload=body, scope=scope),
            deadline=deadline,
            classify=classify,
            operation=operation,
            scope=scope,
        )
        try:
            yield opened
        finally:
            if isinstance(opened, UpstreamEvents):
                opened.close()

    async def _retrying(
        self,
        attempt_once: Callable[[], Awaitable[UpstreamResponse | UpstreamEvents]],
        *,
        deadline: float,
        classify: Callable[[UpstreamResponse], Failure],
        operation: str,
        scope: AnswerScope,
    ) -> UpstreamResponse | UpstreamEvents:
        loop = asyncio.get_running_loop()
        # A slot the scope took for an earlier answer (a download inside it) is not ours to give back.
        held_before = scope.held
        attempt = 0
        while True:
            attempt += 1
            response: UpstreamResponse | None = None
            try:
                answer = await attempt_once()
            except httpx.TransportError as exc:
                failure = Failure(Kind.TRANSIENT, detail=f"{_in_words(exc)} on {operation}")
            else:
                if isinstance(answer, UpstreamEvents) or 200 <= answer.status < 300:
                    return answer
                response = answer
                failure = classify(response)
            if not held_before:
                # A large error page is done with; its slot must not be held through a backoff.
                scope.release()
            if failure.kind not in RETRIED:
                raise self.error(failure)
            should_retry = response.headers.get("x-should-retry") if response is not None else None
            if should_retry == "false":
                # The vendor says this one will not get better (OpenAI sends it on some 500s).
                logger.warning("%s %s: HTTP %s marked x-should-retry: false", self.provider, operation, failure.status)
                raise UpstreamError(
                    f"The upstream provider failed (HTTP {failure.status}) and asked not to be retried.", retryable=False
                )
            hint = failure.retry_after
            if hint is None and response is not None:
                hint = retry_after_from_headers(response.headers)
            if hint is None and failure.kind is Kind.RATE_LIMITED:
                hint = self.retry.rate_limit_delay
            delay = hint if hint is not None else self.retry.backoff(attempt)
            what = "is rate limiting the gateway" if failure.kind is Kind.RATE_LIMITED else "is failing"
            status = f"HTTP {failure.status}" if failure.status is not None else failure.detail
            if attempt >= self.retry.max_attempts:
                logger.warning("%s %s: giving up after %d attempts (%s)", self.provider, operation, attempt, status)
                raise UpstreamError(
                    f"The upstream provider {what} ({status}); gave up after {attempt} attempts.",
                    retryable=True,
                    retry_after=hint,
                )
            if delay > self.retry.max_retry_after or loop.time() + delay >= deadline:
                logger.warning(
                    "%s %s: %s, retry in %.2f s does not fit the deadline", self.provider, operation, status, delay
                )
                raise UpstreamError(
                    f"The upstream provider {what} ({status}); retry after {math.ceil(delay)} s.",
                    retryable=True,
                    retry_after=delay,
                )
            logger.info("%s %s: %s, attempt %d, retrying in %.2f s", self.provider, operation, status, attempt, delay)
            if self.on_retry is not None:
                self.on_retry()
            await self.sleep(delay)

    async def _attempt(
        self,
        method: str,
        url: str,
        *,
        deadline: float,
        headers: Mapping[str, str] | None,
        payload: _Body,
        scope: AnswerScope,
    ) -> UpstreamResponse:
        # In the caller's own task: a cancellation (however many, a fan-out's deadline and
        # its parent's at the same instant) ends the exchange, whose cleanup closes the
        # connection without awaiting anything (UpstreamClient.request), so nothing can
        # interrupt it. (httpcore's cleanup awaited, so the exchange had its own task,
        # cancelled once: a task and a shield per call.)
        try:
            async with asyncio.timeout_at(deadline):
                status, response_headers, body = await self._exchange(
                    method, url, headers=headers, payload=payload, scope=scope
                )
        except TimeoutError as exc:
            raise DeadlineExceededError("The upstream provider did not answer before the request's deadline.") from exc
        except _BodyError as exc:
            raise malformed(f"{exc} from {_host(url)}") from exc
        return UpstreamResponse(status=status, headers=response_headers, body=body, url=url)

    async def _exchange(
        self, method: str, url: str, *, headers: Mapping[str, str] | None, payload: _Body, scope: AnswerScope
    ) -> tuple[int, Mapping[str, str], bytes]:
        async with self.client.request(method, url, headers=headers, body=payload) as response:
            body = await self._read_bounded(response, scope)
        return response.status, response.headers, body

    async def _read_bounded(self, response: aiohttp.ClientResponse, scope: AnswerScope) -> bytes:
        limit = self.max_response_bytes
        declared = response.headers.get("content-length")
        if declared is not None and declared.isdigit() and int(declared) > limit:
            raise _BodyError(f"an answer of {declared} bytes, above the {limit}-byte limit")
        # A large body waits for a gate slot before it is read (a chunked one, once it has
        # grown that large); until then it stays in the socket.
        large = scope.large_bytes
        if large is not None and declared is not None and declared.isdigit() and int(declared) >= large:
            await scope.admit()
            large = None
        chunks: list[bytes] = []
        size = 0
        try:
            async for chunk in _chunks(response):
                size += len(chunk)
                if size > limit:
                    raise _BodyError(f"an answer above the {limit}-byte limit")
                chunks.append(chunk)
                if large is not None and size >= large:
                    await scope.admit()
                    large = None
        except httpx.TransportError as exc:
            # The head arrived, so the upstream did the work; a retry could bill twice. (A
            # gzip body that does not decode ends here too: aiohttp reports it as cut short.)
            raise _BodyError(f"a truncated answer ({_in_words(exc)} after {size} bytes)") from exc
        return b"".join(chunks)

    async def _open_events(
        self,
        method: str,
        url: str,
        *,
        deadline: float,
        headers: Mapping[str, str] | None,
        payload: _Body,
        scope: AnswerScope,
    ) -> UpstreamResponse | UpstreamEvents:
        # As in _attempt, the exchange runs in its own task, cancelled at most once; it
        # hands the head over, then each event through a small queue (back-pressure: the
        # upstream is read only as fast as the caller takes the events).
        head: asyncio.Future[UpstreamResponse | tuple[int, Mapping[str, str]]] = asyncio.get_running_loop().create_future()
        queue: asyncio.Queue[SseEvent | BaseException | None] = asyncio.Queue(maxsize=2)
        exchange = asyncio.create_task(self._event_exchange(method, url, headers, payload, head, queue, scope))
        opened = False
        try:
            async with asyncio.timeout_at(deadline):
                answer = await asyncio.shield(head)
            if isinstance(answer, UpstreamResponse):
                return answer
            opened = True
            return UpstreamEvents(answer[0], answer[1], queue, exchange, deadline=deadline, url=url)
        except TimeoutError as exc:
            raise DeadlineExceededError("The upstream provider did not answer before the request's deadline.") from exc
        except _BodyError as exc:
            raise malformed(f"{exc} from {_host(url)}") from exc
        finally:
            if not opened:
                _abandon(exchange)

    async def _event_exchange(
        self,
        method: str,
        url: str,
        headers: Mapping[str, str] | None,
        payload: _Body,
        head: asyncio.Future[UpstreamResponse | tuple[int, Mapping[str, str]]],
        queue: asyncio.Queue[SseEvent | BaseException | None],
        scope: AnswerScope,
    ) -> None:
        try:
            async with self.client.request(method, url, headers=headers, body=payload) as response:
                content_type = response.headers.get("content-type", "").split(";")[0].strip().lower()
                if not (200 <= response.status < 300 and content_type == "text/event-stream"):
                    body = await self._read_bounded(response, scope)
                    head.set_result(UpstreamResponse(response.status, response.headers, body, url))
                    return
                head.set_result((response.status, response.headers))
                decoder = SseDecoder(self.max_response_bytes)
                try:
                    async for chunk in _chunks(response):
                        for event in decoder.feed(chunk):
                            await queue.put(event)
                except httpx.TransportError as exc:
                    # Events already went to the caller; the rest is lost, never retried.
                    await queue.put(malformed(f"a stream cut short ({_in_words(exc)}) from {_host(url)}"))
                    return
                if decoder.pending:
                    await queue.put(malformed(f"a stream that ended inside an event from {_host(url)}"))
                    return
                await queue.put(None)
        except asyncio.CancelledError:
            raise
        except BaseException as exc:  # noqa: BLE001 - handed to whoever waits: the head or the reader
            if not head.done():
                head.set_exception(exc)
            else:
                await queue.put(malformed(f"{exc} from {_host(url)}") if isinstance(exc, _BodyError) else exc)

    def error(self, failure: Failure) -> ApiError:
        """The caller-facing exception for a failure that is not retried."""
        where = f"HTTP {failure.status}" if failure.status is not None else "no status"
        match failure.kind:
            case Kind.CONTENT_POLICY:
                return ContentPolicyError("The upstream provider's safety system rejected the request.")
            case Kind.CREDENTIALS:
                logger.error(
                    "%s rejected the gateway's credentials (%s, code %s); check %s",
                    self.provider,
                    where,
                    failure.code,
                    self.key_setting,
                )
                return UpstreamError(CREDENTIALS_MESSAGE, retryable=False)
            case Kind.ACCOUNT:
                logger.error(
                    "%s refused the gateway's account: credit or quota exhausted (%s, code %s); top up the account behind %s",
                    self.provider,
                    where,
                    failure.code,
                    self.key_setting,
                )
                return UpstreamError(CREDENTIALS_MESSAGE, retryable=False)
            case Kind.MODEL_UNAVAILABLE:
                logger.error("%s does not serve the requested model (%s): %s", self.provider, where, failure.detail)
                return UpstreamError("The upstream provider does not serve this model.", retryable=False)
            case Kind.REJECTED:
                logger.warning("%s rejected a request (%s, code %s): %s", self.provider, where, failure.code, failure.detail)
                detail = f": {failure.detail[:300]}" if failure.detail else ""
                return UpstreamError(f"The upstream provider rejected the request ({where}){detail}", retryable=False)
            case Kind.MALFORMED:
                return malformed(failure.detail or where)
            case Kind.RATE_LIMITED | Kind.TRANSIENT:  # pragma: no cover - send() retries these
                return UpstreamError(f"The upstream provider failed ({where}).", retryable=True)

    async def download_image(self, url: str, *, deadline: float, scope: AnswerScope | None = None) -> GeneratedImage:
        """Fetches an image the provider only linked to (DALL·E, BFL), at once and bounded.

        Sends no credentials: delivery URLs are pre-signed and often on another host. A
        large image keeps its gate slot until it has been checked (the caller's ``scope``,
        whose slot it shares, or its own).
        """
        if httpx.URL(url).scheme not in ("http", "https"):
            raise malformed("an image URL that is not http(s)")
        if scope is None:
            async with self.answer() as own:
                return await self.download_image(url, deadline=deadline, scope=own)
        response = await self.send(
            "GET", url, deadline=deadline, classify=_classify_download, operation="image download", scope=scope
        )
        return await image_from_bytes(response.body)


def _classify_download(response: UpstreamResponse) -> Failure:
    # An expired signed URL answers 403 (Azure blob AuthenticationFailed) or 404: not retried.
    if response.status == 429:
        return Failure(Kind.RATE_LIMITED, status=429)
    if response.status >= 500:
        return Failure(Kind.TRANSIENT, status=response.status)
    return Failure(Kind.MALFORMED, detail=f"the image URL answered HTTP {response.status}", status=response.status)


def sniff_format(data: bytes) -> str | None:
    """``png``, ``jpeg`` or ``webp`` from the magic number, else None."""
    if data.startswith(b"\x89PNG\r\n\x1a\n"):
        return "png"
    if data.startswith(b"\xff\xd8\xff"):
        return "jpeg"
    if len(data) >= 12 and data[:4] == b"RIFF" and data[8:12] == b"WEBP":
        return "webp"
    return None


_PIL_FORMATS = {"PNG": "png", "JPEG": "jpeg", "WEBP": "webp"}


def _decode_check(data: bytes) -> str:
    # Runs in a worker thread. Checks that the image is whole without decoding its pixels
    # (a full decode was 44% of the server's CPU on 1.5 MB images): PNG chunk CRCs up to
    # IEND, JPEG's end-of-image marker, WebP's RIFF length. Truncated or corrupt bytes fail.
    with Image.open(io.BytesIO(data)) as image:
        fmt = _PIL_FORMATS.get(image.format or "")
        if fmt is None:
            raise ValueError(f"unexpected image format {image.format}")
        if fmt == "png":
            image.verify()
    if fmt == "jpeg" and b"\xff\xd9" not in data[-64:]:
        raise ValueError("JPEG without its end-of-image marker")
    if fmt == "webp" and int.from_bytes(data[4:8], "little") + 8 != len(data):
        raise ValueError("WebP whose RIFF length does not match its size")
    return fmt


def decode_base64(value: object) -> bytes:
    """Strict standard base64 (RFC 4648, padded); a ``data:image/...;base64,`` prefix is dropped."""
    if not isinstance(value, str) or not value:
        raise malformed("an image field that is not a base64 string")
    text = DATA_URL_RE.sub("", value.strip(), count=1)
    try:
        # SIMD decoding, 40x binascii's speed (the largest CPU cost of a 1.5 MB image was
        # here); validate: only the standard alphabet and padding, as binascii's strict mode.
        return pybase64.b64decode(text, validate=True)
    except (binascii.Error, ValueError) as exc:
        raise malformed("image data that is not valid base64") from exc


async def image_from_bytes(data: bytes, *, revised_prompt: str | None = None) -> GeneratedImage:
    """Checks that ``data`` is a whole PNG, JPEG or WebP image; the format comes from the bytes."""
    sniffed = sniff_format(data)
    if sniffed is None:
        raise malformed("bytes that are not a PNG, JPEG or WebP image")
    try:
        # A small image is checked on the loop: a thread hop costs more than its check.
        decoded = await run_sized(len(data), _decode_check, data)
    # Pillow reports a broken PNG chunk checksum as SyntaxError.
    except (OSError, ValueError, SyntaxError, UnidentifiedImageError, Image.DecompressionBombError) as exc:
        raise malformed(f"a {sniffed} image that does not decode") from exc
    return GeneratedImage(data=data, format=decoded, revised_prompt=revised_prompt)


async def image_from_base64(value: object, *, revised_prompt: str | None = None) -> GeneratedImage:
    """Decodes a base64 image field (off the loop when large) and validates the image."""
    if isinstance(value, str) and len(value) > OFFLOAD_BYTES:
        data = await asyncio.to_thread(decode_base64, value)
    else:
        data = decode_base64(value)
    return await image_from_bytes(data, revised_prompt=revised_prompt)


async def input_bytes(image: InputImage) -> bytes:
    """A caller's image as sent (read from its temporary file off the loop when large)."""
    return await run_sized(image.size, image.read)


async def input_base64(image: InputImage) -> str:
    """A caller's image as standard base64, for upstreams that take images inside JSON."""
    return await run_sized(image.size * 4 // 3, lambda: pybase64.b64encode(image.read()).decode("ascii"))


def sum_usage(usages: Sequence[TokenUsage]) -> TokenUsage:
    """Token counts of several upstream calls added up."""
    return TokenUsage(
        input_text_tokens=sum(u.input_text_tokens for u in usages),
        input_image_tokens=sum(u.input_image_tokens for u in usages),
        output_image_tokens=sum(u.output_image_tokens for u in usages),
        output_text_tokens=sum(u.output_text_tokens for u in usages),
    )


@dataclass(frozen=True, slots=True)
class _Outcome:
    result: ProviderResult | None = None
    error: ApiError | None = None


async def fan_out(
    n: int,
    one: Callable[[int], Awaitable[ProviderResult]],
    *,
    concurrency: int,
    provider: str,
    progress: Progress | None = None,
) -> ProviderResult:
    """Makes ``n`` single-image calls, at most ``concurrency`` at a time, and merges them.

    With ``progress`` (a streamed request), each call's image is reported as soon as that
    call returns, so the caller sees the first image without waiting for the slowest.

    Images that survive are returned even when other calls were moderated or failed
    (the use case charges only what is delivered). With none: ``ContentPolicyError`` when
    every failure was the provider's safety system, else the first other error, so a
    transient failure stays retryable.
    """
    semaphore = asyncio.Semaphore(max(1, concurrency))

    async def guarded(index: int) -> _Outcome:
        async with semaphore:
            try:
                result = await one(index)
            except ApiError as exc:  # CancelledError and bugs propagate
                return _Outcome(error=exc)
        if progress is not None:
            for image in result.images:
                await progress.image(index, image, result)
        return _Outcome(result=result)

    try:
        async with asyncio.TaskGroup() as group:
            tasks = [group.create_task(guarded(index)) for index in range(n)]
    except BaseExceptionGroup as group_error:
        # Only non-ApiError exceptions (bugs) get here; surface the first as itself.
        raise group_error.exceptions[0] from None
    outcomes = [task.result() for task in tasks]
    images = [image for o in outcomes if o.result is not None for image in o.result.images]
    usage = sum_usage([o.result.usage for o in outcomes if o.result is not None])
    errors = [o.error for o in outcomes if o.error is not None]
    if images:
        if errors:
            logger.warning(
                "%s delivered %d of %d images (%s)", provider, len(images), n, ", ".join(type(e).__name__ for e in errors)
            )
        first = next(o.result for o in outcomes if o.result is not None)
        return ProviderResult(
            images=images,
            usage=usage,
            size=first.size,
            quality=first.quality,
            background=first.background,
            output_format=first.output_format,
        )
    others = [e for e in errors if not isinstance(e, ContentPolicyError)]
    if others:
        raise others[0]
    if errors:
        raise errors[0]
    raise malformed("no images")  # pragma: no cover - n >= 1 gives an outcome per call
