"""The server interceptor: request id, authentication, one log line per call, and the
single place where errors become wire statuses.

Every RPC handler (unary or streaming, ours or health and reflection) is wrapped so that,
in order:
1. the request id is taken from ``x-request-id`` (Envoy keeps or generates one) or made;
2. the caller is authenticated according to the method's policy (public, API key, or
   admin token) and the principal is put in a context variable for the servicer;
3. an ``ApiError`` raised anywhere becomes the gRPC status of its row in
   ``server.errors`` with ``google.rpc.ErrorInfo`` details, plus the ``x-http-status``,
   ``x-openai-error`` and ``x-should-retry`` trailing metadata that Envoy's Lua filter
   turns into the HTTP status and OpenAI body; anything else is a bug: logged with the
   request id and answered as a generic 500, with no class names or stack traces;
4. one access log line records the outcome (``imagegw.access``, "request finished"); health
   checks are only counted in metrics.

``request_id`` and ``method`` are bound to the call's logging context
(:func:`server.logs.bind_call`) for the whole call, so every line logged while handling
it carries them, the access line included.

A method without a policy is refused: ``check_policies`` at start-up for every method the
server registers, and the interceptor again per call (UNIMPLEMENTED), so no RPC can run
unguarded. Streaming handlers get exactly the same treatment; a stream that reported an
error in-band (a REST stream's last ``error`` event) sets ``CallInfo.handled_error`` so
that the log line and the metrics say what the caller saw.
"""

from __future__ import annotations

import asyncio
import contextvars
import enum
import hmac
import inspect
import logging
import time
import uuid
from collections.abc import Awaitable, Callable, Iterable, Mapping
from dataclasses import dataclass, field
from typing import Any

import grpc
from google.protobuf import any_pb2
from google.rpc import error_details_pb2, status_pb2
from grpc_status import rpc_status

from server.errors import (
    ERROR_DOMAIN,
    ApiError,
    AuthenticationError,
    InternalError,
    ServiceUnavailableError,
)
from server.ledger import Ledger, Principal
from server.logs import bind_call
from server.metrics import Metrics

__all__ = ["CallInfo", "MethodPolicy", "ServerInterceptor", "check_policies", "current_call"]

log = logging.getLogger("imagegw.access")


class MethodPolicy(enum.Enum):
    """Who may call a method."""

    PUBLIC = "public"  # health, reflection, signed image URLs (the signature is the credential)
    API_KEY = "api_key"  # callers with an account
    ADMIN = "admin"  # operators with IMAGEGW_ADMIN_TOKEN


@dataclass
class CallInfo:
    """Per-call facts shared by the interceptor and the servicer (via a context variable)."""

    request_id: str
    method: str
    principal: Principal | None = None
    # Fields the servicer adds to the access log line (model, images, cost, ...).
    log_fields: dict[str, Any] = field(default_factory=dict)
    # An error the handler already reported to the caller in-band (after a stream's first
    # event); the call itself ends OK.
    handled_error: ApiError | None = None
    # The whole answer went out (a stream's last event): a hang-up after it changes nothing.
    answered: bool = False
    # Set by abort_in_flight before it cancels the handler: the cancellation is the server
    # shutting down, not the caller leaving (a stream still open says so in-band).
    shutting_down: bool = False


_CURRENT: contextvars.ContextVar[CallInfo] = contextvars.ContextVar("imagegw_call")


def current_call() -> CallInfo:
    """The CallInfo of the RPC being handled; only valid inside a handler."""
    return _CURRENT.get()


def check_policies(methods: Iterable[str], policies: Mapping[str, MethodPolicy]) -> None:
    """Raises ValueError naming every method that has no policy (a start-up check)."""
    missing = sorted(set(methods) - set(policies))
    if missing:
        raise ValueError(f"RPCs without an access policy (add them to METHOD_POLICIES): {', '.join(missing)}")


def error_trailers(error: ApiError, request_id: str) -> tuple[grpc.StatusCode, str, tuple[tuple[str, str | bytes], ...]]:
    """The status code, message and trailing metadata that carry ``error`` on the wire."""
    info = error_details_pb2.ErrorInfo(
        reason=error.reason,
        domain=ERROR_DOMAIN,
        metadata={"type": error.openai_type, "param": error.param or "", "code": error.code or ""},
    )
    detail = any_pb2.Any()
    detail.Pack(info)
    status = rpc_status.to_status(
        status_pb2.Status(code=error.grpc_code.value[0], message=error.message, details=[detail])
    )
    metadata: list[tuple[str, str | bytes]] = list(status.trailing_metadata)
    metadata += [
        ("x-http-status", str(error.http_status)),
        ("x-openai-error", error.openai_json()),
        ("x-should-retry", "true" if error.should_retry else "false"),
        ("x-request-id", request_id),
    ]
    if error.retry_after is not None:
        metadata.append(("retry-after", str(max(1, round(error.retry_after)))))
    metadata += list(error.headers.items())
    return status.code, error.message, tuple(metadata)


class ServerInterceptor(grpc.aio.ServerInterceptor):
    """Wraps every unary handler; see the module docstring."""

    def __init__(
        self,
        *,
        ledger: Ledger,
        admin_token: str,
        policies: Mapping[str, MethodPolicy],
        metrics: Metrics,
        key_cache_seconds: float = 0.0,
    ) -> None:
        self._ledger = ledger
        # How long a key read from the database is believed (Ledger.authenticate's
        # max_age); paid requests check it again in their admission transaction.
        self._key_cache_seconds = key_cache_seconds
        self._admin_token = admin_token.encode()
        self._policies = policies
        self._metrics = metrics
        # Handlers running now, so that shutdown can wait for them and, past its grace
        # period, end them with a retryable 503 instead of a bare transport reset.
        self._running: dict[asyncio.Task[Any], CallInfo] = {}
        self._idle = asyncio.Event()
        self._idle.set()
        self._aborting = False

    async def wait_idle(self) -> None:
        """Returns once no handler is running."""
        await self._idle.wait()

    def abort_in_flight(self) -> int:
        """Ends every running handler with ServiceUnavailableError (503, retryable); their
        reservations are released as for any failure. Returns how many were running."""
        self._aborting = True
        for task, call in self._running.items():
            call.shutting_down = True
            task.cancel("server shutting down")
        return len(self._running)
    async def intercept_service(
        self,
        continuation: Callable[[grpc.HandlerCallDetails], Awaitable[grpc.RpcMethodHandler]],
        handler_call_details: grpc.HandlerCallDetails,
    ) -> grpc.RpcMethodHandler:
        handler = await continuation(handler_call_details)
        if handler is None:
            return handler  # grpc answers UNIMPLEMENTED for unknown methods
        method = handler_call_details.method
        policy = self._policies.get(method)
        if policy is None:
            return _unimplemented(handler)
        serializers = {
            "request_deserializer": handler.request_deserializer,
            "response_serializer": handler.response_serializer,
        }
        if handler.unary_unary is not None:
            unary = handler.unary_unary

            async def unary_unary(request: Any, context: grpc.aio.ServicerContext) -> Any:
                return await self._handle(method, policy, lambda: unary(request, context), context)

            return grpc.unary_unary_rpc_method_handler(unary_unary, **serializers)
        if handler.stream_unary is not None:
            gathered = handler.stream_unary

            async def stream_unary(requests: Any, context: grpc.aio.ServicerContext) -> Any:
                return await self._handle(method, policy, lambda: gathered(requests, context), context)

            return grpc.stream_unary_rpc_method_handler(stream_unary, **serializers)
        # Streaming answers: the wrapper is a coroutine that writes what the handler yields
        # (grpc.aio runs coroutine handlers in its reader/writer mode), so errors and the
        # log line cover the whole stream.
        if handler.unary_stream is not None:
            streaming = handler.unary_stream

            async def unary_stream(request: Any, context: grpc.aio.ServicerContext) -> None:
                await self._handle(method, policy, lambda: _drive(streaming(request, context), context), context)

            return grpc.unary_stream_rpc_method_handler(unary_stream, **serializers)
        both = handler.stream_stream

        async def stream_stream(requests: Any, context: grpc.aio.ServicerContext) -> None:
            await self._handle(method, policy, lambda: _drive(both(requests, context), context), context)

        return grpc.stream_stream_rpc_method_handler(stream_stream, **serializers)

    async def _handle(
        self,
        method: str,
        policy: MethodPolicy,
        behavior: Callable[[], Awaitable[Any]],
        context: grpc.aio.ServicerContext,
    ) -> Any:
        metadata = _metadata(context)
        call = CallInfo(request_id=metadata.get("x-request-id") or str(uuid.uuid4()), method=method)
        token = _CURRENT.set(call)
        unbind = bind_call(request_id=call.request_id, method=method)
        started = time.perf_counter()
        outcome, status = "ok", 200
        short_method = method.rsplit("/", 1)[-1]
        in_flight = self._metrics.in_flight.labels(short_method)
        in_flight.inc()
        task = asyncio.current_task()
        assert task is not None
        self._running[task] = call
        self._idle.clear()
        try:
            try:
                await self._authenticate(policy, metadata, call)
                result = await behavior()
                if call.handled_error is not None:
                    outcome, status = call.handled_error.code or call.handled_error.reason, call.handled_error.http_status
                return result
            except asyncio.CancelledError:
                if not self._aborting:
                    raise
                # Cancelled by abort_in_flight, not by the client: the call is still open,
                # so answer it with a retryable error the SDK will retry elsewhere.
                task.uncancel()
                raise ServiceUnavailableError.shutting_down() from None
        except ApiError as exc:
            outcome, status = exc.code or exc.reason, exc.http_status
            code, message, trailers = error_trailers(exc, call.request_id)
            await context.abort(code, message, trailing_metadata=trailers)
        except asyncio.CancelledError:
            # A stream whose answer was complete (its last event, or its error event, was
            # written) when the caller hung up ends as what the caller saw.
            if call.handled_error is not None:
                outcome, status = call.handled_error.code or call.handled_error.reason, call.handled_error.http_status
            elif not call.answered:
                outcome, status = "cancelled", 499
            raise
        except grpc.aio.AbortError:
            raise
        except Exception:
            outcome, status = "internal_error", 500
            log.exception("unhandled error")
            code, message, trailers = error_trailers(
                InternalError("The server had an error while processing your request."), call.request_id
            )
            await context.abort(code, message, trailing_metadata=trailers)
        finally:
            elapsed = time.perf_counter() - started
            _CURRENT.reset(token)
            self._running.pop(task, None)
            if not self._running:
                self._idle.set()
            in_flight.dec()
            call.log_fields["status"] = status
            # Envoy checks every worker's health every second: count it, don't log it.
            if not method.startswith(_HEALTH):
                self._log(outcome, elapsed, call.log_fields)
            unbind()
            self._metrics.requests.labels(
                short_method, call.log_fields.get("model", ""), call.log_fields.get("provider", ""), str(status)
            ).inc()
            self._metrics.request_seconds.labels(short_method).observe(elapsed)

    async def _authenticate(self, policy: MethodPolicy, metadata: Mapping[str, str], call: CallInfo) -> None:
        if policy is MethodPolicy.PUBLIC:
            return
        token = _bearer(metadata.get("authorization", ""))
        if policy is MethodPolicy.ADMIN:
            if not token or not hmac.compare_digest(token.encode(), self._admin_token):
                raise AuthenticationError("Invalid admin token.", code="invalid_admin_token")
            return
        if not token:
            raise AuthenticationError(
                "You didn't provide an API key. Provide it in the Authorization header as 'Bearer YOUR_KEY'."
            )
        call.principal = await self._ledger.authenticate(token, max_age=self._key_cache_seconds)
        call.log_fields["account_id"] = call.principal.account_id

    def _log(self, outcome: str, elapsed: float, fields: dict[str, Any]) -> None:
        # request_id and method come from the call's logging context (bind_call).
        log.info("request finished", extra={"outcome": outcome, "latency_ms": round(elapsed * 1000, 1), **fields})


def _metadata(context: grpc.aio.ServicerContext) -> dict[str, str]:
    result: dict[str, str] = {}
    for key, value in context.invocation_metadata() or ():
        if isinstance(value, str):
            result[key.lower()] = value
    return result


def _bearer(header: str) -> str:
    scheme, _, credentials = header.strip().partition(" ")
    if scheme.lower() != "bearer":
        return ""
    return credentials.strip()


async def _drive(produced: Any, context: grpc.aio.ServicerContext) -> None:
    """Runs a streaming handler of either style: an async generator (each message is
    written here) or a coroutine that writes with ``context.write`` itself."""
    if inspect.isasyncgen(produced):
        async for message in produced:
            await context.write(message)
    else:
        await produced


def _unimplemented(handler: grpc.RpcMethodHandler) -> grpc.RpcMethodHandler:
    """A method that has no policy is not served (check_policies stops that at start-up)."""

    async def refuse(request: Any, context: grpc.aio.ServicerContext) -> Any:
        await context.abort(grpc.StatusCode.UNIMPLEMENTED, "Method not found.")

    serializers = {"request_deserializer": handler.request_deserializer, "response_serializer": handler.response_serializer}
    if handler.unary_unary is not None:
        return grpc.unary_unary_rpc_method_handler(refuse, **serializers)
    if handler.stream_unary is not None:
        return grpc.stream_unary_rpc_method_handler(refuse, **serializers)
    if handler.unary_stream is not None:
        return grpc.unary_stream_rpc_method_handler(refuse, **serializers)
    return grpc.stream_stream_rpc_method_handler(refuse, **serializers)


_HEALTH = "/grpc.health.v1.Health/"
