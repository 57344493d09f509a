"""ImageService: thin translation between protobuf and the generation use case.

Every generation, whichever RPC carries it, goes: Idempotency-Key metadata
(server.idempotency) -> the catalog's quote (400s) -> admission, one write transaction
(server.admission: the key is live, its rate limit counts the request, the
Idempotency-Key is claimed, the money reserved) -> the generation use case, at most once
per idempotency key (server.generation) -> the answer in the RPC's own shape:

* ``GenerateImages``: the typed response; headers as initial metadata.
* ``StreamGenerateImages``: one typed ``ImageGenerationEvent`` per event; the charge in
  the trailing metadata.
* ``GenerateImagesHttp`` (REST): OpenAI's JSON, or its Server-Sent Events for
  ``stream: true``, written here as ``google.api.HttpBody`` (server.api.rest). An error
  before the first byte keeps its HTTP status (the interceptor's trailers); after it, it
  is a last ``error`` event. A stream that is quiet for ``keepalive_seconds`` gets an SSE
  comment, so no proxy's idle timeout cuts a long generation.

A replay of a streamed request (same Idempotency-Key) streams the stored final images as
completed events, charging nothing.
"""

from __future__ import annotations

import asyncio
import contextlib
import hashlib
import json
import logging
from collections.abc import AsyncIterator, Awaitable, Callable
from dataclasses import dataclass, replace

import grpc
from google.api import httpbody_pb2
from google.protobuf import message_factory
from imagegw.v1 import images_pb2, images_pb2_grpc

from server.admission import Admissions
from server.api import rest
from server.api.interceptors import CallInfo, current_call
from server.catalog import RawImageRequest
from server.editing import EDIT_FIELDS, VARIATION_FIELDS, InputRequests
from server.errors import (
    ApiError,
    InternalError,
    InvalidRequestError,
    NotFoundError,
    PayloadTooLargeError,
    ServiceUnavailableError,
)
from server.generation import Generation, GenerationResult, StreamEvent, StreamSink
from server.idempotency import (
    REPLAY_HEADER,
    Answer,
    Headers,
    IdempotencyStore,
    fingerprint,
    parse_key,
)
from server.ledger import format_usd
from server.offload import run_sized
from server.providers.base import TokenUsage
from server.providers.gate import AnswerGate
from server.ratelimit import requested_images
from server.storage import ImageStore, UrlSigner, valid_image_id
from server.uploads import Upload, UploadLimits, read_upload

__all__ = ["ImageServicer", "add_to_server"]

log = logging.getLogger(__name__)

# Every RPC of the use case fingerprints under one name, so a key reused on another use
# case never matches while a gRPC retry of a REST request (same body) replays it.
_GENERATE_IMAGES = images_pb2.DESCRIPTOR.services_by_name["ImageService"].methods_by_name["GenerateImages"].full_name
_OPTIONAL_FIELDS = (
    "model",
    "n",
    "quality",
    "response_format",
    "size",
    "style",
    "user",
    "background",
    "moderation",
    "output_format",
    "output_compression",
    "stream",
    "partial_images",
)
# The event type prefix of each use case: `image_generation.completed`, `image_edit.partial_image`.
GENERATION = "image_generation"
EDIT = "image_edit"
COST_HEADER = "x-imagegw-cost-usd"

MODEL_HEADER = "x-imagegw-model"


@dataclass
class _Outcome:
    """A generation's answer and the response headers that go with it."""

    answer: Answer[images_pb2.GenerateImagesResponse]
    headers: list[tuple[str, str]]
    # The images' bytes when the message was built without them (``_run(bare=True)``).
    images: list[bytes | None] | None = None


class ImageServicer(images_pb2_grpc.ImageServiceServicer):
    """Generates images and serves stored image files."""

    def __init__(
        self,
        *,
        generation: Generation,
        store: ImageStore,
        signer: UrlSigner,
        admissions: Admissions,
        idempotency: IdempotencyStore,
        inputs: InputRequests,
        limits: UploadLimits,
        keepalive_seconds: float = 15.0,
        gate: AnswerGate | None = None,
    ) -> None:
        self._generation = generation
        self._inputs = inputs
        self._limits = limits
        self._store = store
        self._signer = signer
        self._admissions = admissions
        self._idempotency = idempotency
        self._keepalive = keepalive_seconds
        self._gate = gate  # the providers' answer gate (server.providers.gate)

    # -- generations: three ways to receive the same use case ------------------------------

    async def GenerateImages(  # noqa: N802 - gRPC method name
        self, request: images_pb2.GenerateImagesRequest, context: grpc.aio.ServicerContext
    ) -> images_pb2.GenerateImagesResponse:
        _refuse_stream(request.stream, "StreamGenerateImages")
        return await self._answer(_raw_generation(request), context, _proto_hash(request))

    # grpc.aio's writer style: the handler writes with context.write and returns None.
    async def StreamGenerateImages(  # type: ignore[override]  # noqa: N802 - gRPC method name
        self, request: images_pb2.GenerateImagesRequest, context: grpc.aio.ServicerContext
    ) -> None:
        streamed = images_pb2.GenerateImagesRequest()
        streamed.CopyFrom(request)
        streamed.stream = True  # implied by the RPC
        await self._answer_stream(_raw_generation(streamed), context, _proto_hash(streamed), GENERATION)

    async def GenerateImagesHttp(  # type: ignore[override]  # noqa: N802 - gRPC method name
        self, request: images_pb2.GenerateImagesRequest, context: grpc.aio.ServicerContext
    ) -> None:
        await self._answer_http(_raw_generation(request), context, _proto_hash(request), GENERATION)

    # -- edits and variations: the same, with the caller's images -------------------------

    async def EditImages(  # noqa: N802 - gRPC method name
        self, request: images_pb2.EditImagesRequest, context: grpc.aio.ServicerContext
    ) -> images_pb2.GenerateImagesResponse:
        _refuse_stream(request.stream, "StreamEditImages")
        raw = await self._raw_edit(request)
        return await self._answer(raw, context, _inputs_hash(raw))

    async def StreamEditImages(  # type: ignore[override]  # noqa: N802 - gRPC method name
        self, request: images_pb2.EditImagesRequest, context: grpc.aio.ServicerContext
    ) -> None:
        raw = replace(await self._raw_edit(request), stream=True)  # implied by the RPC
        await self._answer_stream(raw, context, _inputs_hash(raw), EDIT)

    async def EditImagesHttp(  # type: ignore[override]  # noqa: N802 - gRPC method name
        self, requests: AsyncIterator[httpbody_pb2.HttpBody], context: grpc.aio.ServicerContext
    ) -> None:
        upload = await _read_body(requests, self._limits)
        try:
            raw = await self._inputs.from_upload(upload, "edit")
            await self._answer_http(raw, context, _inputs_hash(raw), EDIT)
        finally:
            upload.close()

    async def CreateImageVariation(  # noqa: N802 - gRPC method name
        self, request: images_pb2.CreateImageVariationRequest, context: grpc.aio.ServicerContext
    ) -> images_pb2.GenerateImagesResponse:
        fields = {
            name: getattr(request, name)
            for name in VARIATION_FIELDS
            if request.HasField(name)  # type: ignore[arg-type]  # names from VARIATION_FIELDS
        }
        images = [(request.image.data, request.image.filename)] if request.HasField("image") else []
        raw = await self._inputs.from_message("variation", fields, images, None)
        return await self._answer(raw, context, _inputs_hash(raw))

    async def CreateImageVariationHttp(  # type: ignore[override]  # noqa: N802 - gRPC method name
        self, requests: AsyncIterator[httpbody_pb2.HttpBody], context: grpc.aio.ServicerContext
    ) -> None:
        upload = await _read_body(requests, self._limits)
        try:
            raw = await self._inputs.from_upload(upload, "variation")
            await self._answer_http(raw, context, _inputs_hash(raw), GENERATION)
        finally:
            upload.close()

    async def _raw_edit(self, request: images_pb2.EditImagesRequest) -> RawImageRequest:
        fields = {
            name: getattr(request, name)
            for name in EDIT_FIELDS
            if name == "prompt" or request.HasField(name)  # type: ignore[arg-type]  # names from EDIT_FIELDS
        }
        images = [(image.data, image.filename) for image in request.image]
        mask = (request.mask.data, request.mask.filename) if request.HasField("mask") else None
        return await self._inputs.from_message("edit", fields, images, mask)

    # -- answering ---------------------------------------------------------------------------

    async def _answer(
        self, raw: RawImageRequest, context: grpc.aio.ServicerContext, request_hash: RequestHash
    ) -> images_pb2.GenerateImagesResponse:
        """The typed unary answer."""
        outcome = await self._run(raw, context, request_hash, None)
        # Response headers travel as initial metadata, sent only once the call has
        # succeeded (an error after initial metadata would lose its HTTP status in Envoy).
        await context.send_initial_metadata(tuple(outcome.headers))
        return outcome.answer.message

    async def _answer_stream(
        self, raw: RawImageRequest, context: grpc.aio.ServicerContext, request_hash: RequestHash, events: str
    ) -> None:
        """Typed events over gRPC; the charge in the trailing metadata."""
        writer = _Writer(context, lambda event: event, events)
        outcome = await self._run(raw, context, request_hash, writer)
        if outcome.answer.replayed:
            for event in _replayed_events(outcome.answer.message, events):
                await writer.write(event, outcome.headers)
        await writer.open(outcome.headers)  # even when nothing was streamed
        context.set_trailing_metadata(tuple(h for h in outcome.headers if h[0] in (COST_HEADER, MODEL_HEADER)))

    async def _answer_http(
        self, raw: RawImageRequest, context: grpc.aio.ServicerContext, request_hash: RequestHash, events: str
    ) -> None:
        """OpenAI's REST answer: one JSON body, or Server-Sent Events with ``stream``."""
        if not raw.stream:
            # A large upstream answer keeps its gate slot until its REST answer is written
            # (server.providers.gate): decoded images waiting for their turn on a busy loop
            # would otherwise pile up beyond the gate's bound.
            async with self._gate.request() if self._gate is not None else contextlib.nullcontext():
                outcome = await self._run(raw, context, request_hash, None, bare=True)
                message, images = outcome.answer.message, outcome.images
                size = message.ByteSize() + sum(len(image or b"") for image in images or ())
                body = await run_sized(size, rest.images_response, message, images)
                headers = tuple(outcome.headers)
                del outcome, message, images  # the body holds all of it now
                await context.send_initial_metadata(headers)
                await context.write(body)  # a serialized HttpBody (see add_to_server)
            return
        writer = _Writer(
            context,
            lambda event: rest.sse_event(event, prefix=events),
            events,
        )
        call = current_call()
        async with _keepalive(writer, call, self._keepalive):
            try:
                outcome = await self._run(raw, context, request_hash, writer)
            except asyncio.CancelledError:
                if not (call.shutting_down and writer.opened):
                    raise  # the caller left, or nothing was sent yet (the interceptor answers 503)
                # Past the shutdown's grace period: the stream ends with a retryable error event.
                task = asyncio.current_task()
                assert task is not None
                task.uncancel()
                await self._stream_error(writer, call, ServiceUnavailableError.shutting_down())
                return
            except ApiError as exc:
                if not writer.opened:
                    raise  # nothing sent yet: the caller gets the real HTTP status
                # The status line (200) is gone: the error becomes the stream's last event.
                await self._stream_error(writer, call, exc)
                return
            if outcome.answer.replayed:
                for event in _replayed_events(outcome.answer.message, events):
                    await writer.write(event, outcome.headers)
            call.answered = True

    @staticmethod
    async def _stream_error(writer: _Writer, call: CallInfo, error: ApiError) -> None:
        call.handled_error = error
        await writer.write_raw(rest.error_event(error), [])

    async def _run(
        self,
        raw: RawImageRequest,
        context: grpc.aio.ServicerContext,
        request_hash: RequestHash,
        writer: _Writer | None,
        *,
        bare: bool = False,
    ) -> _Outcome:
        """Admits and runs the generation. ``bare``: the caller renders the answer itself
        (REST), so unless the message is stored for replays (an Idempotency-Key) it is
        built without the images' bytes, which come separately (``_Outcome.images``): a
        1.5 MB image is not copied into the message and out again."""
        call = current_call()
        principal = call.principal
        if principal is None:  # the interceptor's policy guarantees one
            raise InternalError("a generation ran without a principal")
        idempotency_key = parse_key(context.invocation_metadata())
        call.log_fields["model"] = raw.model or "default"
        if raw.operation != "generate":
            call.log_fields["operation"] = raw.operation
        remaining = context.time_remaining()
        # Finish a little before the caller's deadline, so that the caller gets our 504
        # (with its OpenAI body) rather than a transport timeout.
        deadline = None if remaining is None else asyncio.get_running_loop().time() + remaining * 0.95 - 0.05
        images = requested_images(raw.n)
        try:
            quote = self._generation.quote(raw, sink=writer is not None)
        except ApiError:
            # A bad request counts against the rate limit like any other (a 429 first).
            await self._admissions.count(principal, images=images)
            raise
        # One write transaction before the upstream call: the key, the rate limit (a
        # limited request costs nothing), the Idempotency-Key and the reservation.
        admission = self._admissions.admission(
            principal,
            images=images,
            pending=self._generation.prepare(principal, quote, request_id=call.request_id, deadline=deadline),
        )
        headers = [("x-request-id", call.request_id)]
        if writer is not None:
            writer.headers = headers
        bare = bare and idempotency_key is None
        bare_images: list[bytes | None] | None = None

        async def generate() -> tuple[images_pb2.GenerateImagesResponse, Headers]:
            headers.extend(admission.headers())  # before the first streamed event
            result = await self._generation.generate(
                quote,
                admission.admitted(),
                deadline=deadline,
                sink=writer,
                keep_images=idempotency_key is not None,
            )
            call.log_fields.update(
                model=result.model, provider=result.provider, images=len(result.images), cost_micros=result.cost_micros
            )
            nonlocal bare_images
            if bare:
                bare_images = [image.data for image in result.images]
            response = _response(result, streamed=writer is not None, last=writer.last if writer else None, bare=bare)
            return response, ((COST_HEADER, format_usd(result.cost_micros)), (MODEL_HEADER, result.model))

        answer = await self._idempotency.run(
            principal.account_id,
            idempotency_key,
            await request_hash() if idempotency_key is not None else "",
            request_id=call.request_id,
            deadline=deadline,
            produce=generate,
            parse=images_pb2.GenerateImagesResponse.FromString,
            admit=admission,
        )
        if answer.replayed:
            headers.extend(admission.headers())
        headers += answer.headers
        if answer.replayed:  # nothing generated or charged this time
            # The stored links were signed for the first answer's hour: sign them again, so
            # a replay within the idempotency window gets links that work (the images of a
            # keyed request are kept that long).
            for image in answer.message.data:
                if image.HasField("url"):
                    image.url = await self._generation.relink(image.url)
            call.log_fields.update(idempotent_replay=True, images=len(answer.message.data), cost_micros=0)
            headers.append((REPLAY_HEADER, "true"))
        return _Outcome(answer, headers, bare_images)

    async def GetImageFile(  # type: ignore[override]  # noqa: N802 - gRPC method name
        self, request: images_pb2.GetImageFileRequest, context: grpc.aio.ServicerContext
    ) -> bytes:
        current_call().log_fields["image_id"] = request.image_id
        if not valid_image_id(request.image_id):
            raise NotFoundError(f"No image with id '{request.image_id}'.", param="image_id")
        remaining = self._signer.verify(request.image_id, request.expires, request.signature)
        image = await self._store.get(request.image_id)
        if image is None:
            raise NotFoundError(f"No image with id '{request.image_id}'.", param="image_id")
        # The bytes never change for an id; caching is safe until the link expires.
        await context.send_initial_metadata((("cache-control", f"private, max-age={remaining}, immutable"),))
        return rest.frame(image.content_type, [image.data])  # a serialized HttpBody (see add_to_server)


class _Writer(StreamSink):
    """Writes a stream's messages: response headers before the first one, one message at
    a time (events and keepalives come from two tasks), and the time of the last write."""

    def __init__(
        self,
        context: grpc.aio.ServicerContext,
        render: Callable[[images_pb2.ImageGenerationEvent], object],
        events: str,
    ) -> None:
        self._context = context
        self._render = render
        self._events = events
        self._lock = asyncio.Lock()
        self.headers: list[tuple[str, str]] = []
        self.opened = False
        self.last_write = asyncio.get_running_loop().time()
        # The last completed event sent: a streamed answer is stored with its fields.
        self.last: images_pb2.ImageGenerationEvent | None = None

    async def send(self, event: StreamEvent, delivered: Callable[[], None]) -> None:
        message = _event(event, self._events)

        def written() -> None:
            if event.kind == "completed":
                self.last = message
            delivered()

        await self.write(message, [*self.headers, (MODEL_HEADER, event.model)], written)

    async def write(
        self,
        event: images_pb2.ImageGenerationEvent,
        headers: list[tuple[str, str]],
        written: Callable[[], None] | None = None,
    ) -> None:
        await self.write_raw(await run_sized(len(event.b64_json), self._render, event), headers, written)

    async def write_raw(
        self, message: object, headers: list[tuple[str, str]], written: Callable[[], None] | None = None
    ) -> None:
        """Writes ``message``; ``written`` (an event that is charged) is called once gRPC
        has sent it. A cancellation during such a write waits for its outcome (at once:
        sent, or failed because the call is gone): a shutdown cancels calls that are still
        open, and an event they sent reached the caller, so it is charged."""
        async with self._lock:
            await self._open_locked(headers)
            if written is None:  # a keepalive or the error event: nothing is charged for it
                await self._context.write(message)
            else:
                write = asyncio.ensure_future(self._context.write(message))
                try:
                    await asyncio.shield(write)
                except asyncio.CancelledError:
                    with contextlib.suppress(Exception):
                        await asyncio.shield(write)
                        written()
                    raise
            self.last_write = asyncio.get_running_loop().time()
        if written is not None:
            written()

    async def open(self, headers: list[tuple[str, str]]) -> None:
        async with self._lock:
            await self._open_locked(headers)

    async def _open_locked(self, headers: list[tuple[str, str]]) -> None:
        if not self.opened:
            self.opened = True
            await self._context.send_initial_metadata(tuple(dict(headers).items()))


@contextlib.asynccontextmanager
async def _keepalive(writer: _Writer, call: CallInfo, interval: float) -> AsyncIterator[None]:
    """Writes an SSE comment whenever the stream has been quiet for ``interval`` seconds."""

    async def beat() -> None:
        loop = asyncio.get_running_loop()
        while True:
            await asyncio.sleep(max(0.0, writer.last_write + interval - loop.time()))
            if loop.time() - writer.last_write >= interval:
                try:
                    await writer.write_raw(
                        rest.keepalive(), writer.headers
                    )
                except Exception as exc:  # the call ended under us; the handler sees why
                    log.debug("keepalive stopped: %r", exc)
                    return

    task = asyncio.create_task(beat(), name=f"keepalive-{call.request_id}")
    try:
        yield
    finally:
        task.cancel()
        with contextlib.suppress(asyncio.CancelledError):
            await task


def _event(event: StreamEvent, events: str) -> images_pb2.ImageGenerationEvent:
    message = images_pb2.ImageGenerationEvent(
        type=f"{events}.{event.kind}",
        b64_json=event.data,
        created_at=event.created_at,
        size=event.size,
        quality=event.quality,
        background=event.background,
        output_format=event.output_format,
        image_index=event.image_index,
        partial_image_index=event.partial_image_index,
        revised_prompt=event.revised_prompt,
    )
    if event.usage is not None:
        message.usage.CopyFrom(_usage(event.usage))
    return message


def _replayed_events(response: images_pb2.GenerateImagesResponse, prefix: str) -> list[images_pb2.ImageGenerationEvent]:
    """A stored streamed answer as its completed events (the request's usage on the last)."""
    events = []
    for index, image in enumerate(response.data):
        event = images_pb2.ImageGenerationEvent(
            type=f"{prefix}.completed",
            b64_json=image.b64_json,
            created_at=response.created,
            size=response.size,
            quality=response.quality,
            background=response.background,
            output_format=response.output_format,
            image_index=index,
            revised_prompt=image.revised_prompt if image.HasField("revised_prompt") else None,
        )
        if index == len(response.data) - 1:
            event.usage.CopyFrom(response.usage)
        events.append(event)
    return events


def _usage(usage: TokenUsage) -> images_pb2.Usage:
    return images_pb2.Usage(
        prompt_tokens=usage.input_tokens,
        completion_tokens=usage.output_tokens,
        total_tokens=usage.input_tokens + usage.output_tokens,
        input_tokens=usage.input_tokens,
        output_tokens=usage.output_tokens,
        input_tokens_details=images_pb2.InputTokensDetails(
            text_tokens=usage.input_text_tokens, image_tokens=usage.input_image_tokens
        ),
        output_tokens_details=images_pb2.OutputTokensDetails(
            image_tokens=usage.output_image_tokens, text_tokens=usage.output_text_tokens
        ),
    )


def _response(
    result: GenerationResult, *, streamed: bool, last: images_pb2.ImageGenerationEvent | None, bare: bool = False
) -> images_pb2.GenerateImagesResponse:
    """The typed answer; ``bare``: without the images' bytes (see ``_run``)."""
    response = images_pb2.GenerateImagesResponse(
        created=result.created,
        data=[
            images_pb2.Image(url=image.url, b64_json=None if bare else image.data, revised_prompt=image.revised_prompt)
            for image in result.images
        ],
        background=result.background,
        output_format=result.output_format,
        size=result.size,
        quality=result.quality,
        usage=_usage(result.usage),
    )
    if streamed and last is not None:
        # Stored for replays, which are streamed as completed events: those need every
        # field an event has, even where the provider reported none.
        for name in ("background", "output_format", "size", "quality"):
            if not response.HasField(name):
                setattr(response, name, getattr(last, name))
    return response


RequestHash = Callable[[], Awaitable[str]]


def _refuse_stream(stream: bool, rpc: str) -> None:
    if stream:
        raise InvalidRequestError(
            f"This RPC answers once; call {rpc} to stream.", param="stream", code="unsupported_parameter"
        )


def _raw_generation(request: images_pb2.GenerateImagesRequest) -> RawImageRequest:
    return RawImageRequest(
        prompt=request.prompt,
        **{name: getattr(request, name) for name in _OPTIONAL_FIELDS if request.HasField(name)},  # type: ignore[arg-type]
    )


def _proto_hash(request: images_pb2.GenerateImagesRequest) -> RequestHash:
    async def compute() -> str:
        return fingerprint(_GENERATE_IMAGES, request)

    return compute


def _inputs_hash(raw: RawImageRequest) -> RequestHash:
    """The fingerprint of an edit or a variation: its fields and the SHA-256 of each image
    (hashing reads the images, so it runs in a worker and only for an Idempotency-Key)."""

    async def compute() -> str:
        def digest() -> str:
            fields = {
                name: getattr(raw, name)
                for name in EDIT_FIELDS
                if name != "prompt" and getattr(raw, name, None) is not None
            }
            images = [image.sha256() for image in raw.images]
            mask = raw.mask.sha256() if raw.mask is not None else None
            canonical = json.dumps(
                [raw.operation, raw.prompt, fields, images, mask], sort_keys=True, separators=(",", ":")
            )
            return hashlib.sha256(canonical.encode()).hexdigest()

        return await asyncio.to_thread(digest)

    return compute


async def _read_body(requests: AsyncIterator[httpbody_pb2.HttpBody], limits: UploadLimits) -> Upload:
    """The streamed REST body (edits, variations): the first message names the content type.

    Over a limit, parsing and storing stop at once; the rest of the body is then read and
    dropped (up to ``limits.max_total_bytes`` more) before the 413 goes out: an HTTP/1.1
    client still sending its body would otherwise see the connection closed under it,
    not the answer.
    """
    iterator = aiter(requests)
    first = await anext(iterator, None)
    if first is None:
        raise InvalidRequestError("The request has no body.")
    # How much of the body was read, in the access log line.
    log_fields = current_call().log_fields
    log_fields["upload_bytes"] = len(first.data)

    async def rest_of() -> AsyncIterator[bytes]:
        async for message in iterator:
            log_fields["upload_bytes"] += len(message.data)
            yield message.data

    try:
        return await read_upload(first.content_type, first.data, rest_of(), limits)
    except PayloadTooLargeError:
        log_fields["refused_at_bytes"] = log_fields["upload_bytes"]
        async for message in iterator:
            log_fields["upload_bytes"] += len(message.data)
            if log_fields["upload_bytes"] - log_fields["refused_at_bytes"] > limits.max_total_bytes:
                break
        raise


def add_to_server(servicer: ImageServicer, server: grpc.aio.Server) -> None:
    """Registers ImageService as the generated ``add_ImageServiceServicer_to_server`` does,
    except that the RPCs answering ``google.api.HttpBody`` have no response serializer: the
    servicer writes them already serialized (``rest.frame``), saving a whole-size copy of
    every REST answer. Clients see ordinary HttpBody messages."""
    service = images_pb2.DESCRIPTOR.services_by_name["ImageService"]
    handlers: dict[str, grpc.RpcMethodHandler] = {}
    for method in service.methods:
        request = message_factory.GetMessageClass(method.input_type)
        response = message_factory.GetMessageClass(method.output_type)
        serializer = None if method.output_type is httpbody_pb2.HttpBody.DESCRIPTOR else response.SerializeToString
        make = {
            (False, False): grpc.unary_unary_rpc_method_handler,
            (False, True): grpc.unary_stream_rpc_method_handler,
            (True, False): grpc.stream_unary_rpc_method_handler,
            (True, True): grpc.stream_stream_rpc_method_handler,
        }[(method.client_streaming, method.server_streaming)]
        handlers[method.name] = make(
            getattr(servicer, method.name), request_deserializer=request.FromString, response_serializer=serializer
        )
    server.add_generic_rpc_handlers((grpc.method_handlers_generic_handler(service.full_name, handlers),))
    server.add_registered_method_handlers(service.full_name, handlers)
