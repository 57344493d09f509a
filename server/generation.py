"""The generation use case: from a caller's raw request to delivered, paid-for images.

    resolve (catalog: model, parameters, price; 400s: ``quote``)
      -> reserve n x unit price (committed by admission, ``server.admission``, from the
         reservation ``prepare`` makes; 402 when short)
      -> call the provider within the deadline (fallback models on transient failure)
      -> deliver (store the images and sign URLs, or return the bytes)
      -> settle: capture the delivered images, release the rest (shielded from
         cancellation; a crash leaves a reservation the sweeper releases)

No database transaction spans the provider call, and every exit path settles the
reservation: success captures what was delivered, any error or cancellation (the client
went away, the deadline ran out) releases everything that was not delivered.

Streaming is the same use case with a ``StreamSink``: partial images and each final image
go to the sink as the provider makes them (``server.providers.base.Progress``), and an
event counts as **delivered** once the sink reports it so, that is once the server's write
of it to the caller's connection completed (for REST, to Envoy, which forwards it at
once), even when the request was cancelled while that write was under way. A streamed request is charged for the events delivered: each completed image at
the model's price and each partial image at its partial price, never more than was
reserved; if it fails or the caller goes away midway, what was delivered until then is
charged and the rest released, at the prices of the model that made it (a fallback's, if
the primary failed first). Once anything was delivered no fallback model is tried (the
caller already holds the first model's pictures). Once every image asked for was delivered
the request has succeeded, whatever the provider or the caller does after that (an upstream
error, a hang-up while the upstream closes its stream or while the money settles): it is
settled as delivered and its result returned, so an Idempotency-Key keeps its answer.

A ``url`` answer whose images cannot be stored (the store's own retries included) fails
with 503 ``image_store_unavailable`` and is not charged: the caller cannot use a link to
nothing, and an answer in another format than asked would break it. The provider may have
billed the gateway for those images: that is logged (an error line with the request id)
and counted (``imagegw_images_not_stored_total``), never silent.
"""

from __future__ import annotations

import asyncio
import itertools
import logging
import time
from collections import Counter
from collections.abc import Awaitable, Callable, Mapping
from dataclasses import dataclass, field, replace
from typing import Literal, Protocol

from server.catalog import ModelCatalog, Quote, RawImageRequest
from server.errors import ApiError, DeadlineExceededError, InternalError, ServiceUnavailableError, UpstreamError
from server.ledger import Ledger, Principal, Reservation
from server.ledger.store import PendingReservation
from server.metrics import Metrics
from server.providers.base import (
    GeneratedImage,
    ImageProvider,
    ProviderResult,
    TokenUsage,
)
from server.providers.http import sum_usage
from server.storage import ImageStore, StoreError, UrlSigner, new_image_id, valid_image_id

__all__ = ["DeliveredImage", "Generation", "GenerationResult", "StreamEvent", "StreamSink"]

log = logging.getLogger(__name__)


@dataclass(frozen=True, slots=True)
class DeliveredImage:
    """One image as the caller receives it: a signed URL or the bytes."""

    url: str | None
    data: bytes | None
    revised_prompt: str | None


@dataclass(frozen=True, slots=True)
class GenerationResult:
    """Everything the response needs."""

    created: int
    images: list[DeliveredImage]
    usage: TokenUsage
    cost_micros: int
    model: str
    provider: str
    size: str | None = None
    quality: str | None = None
    background: str | None = None
    output_format: str | None = None


@dataclass(frozen=True, slots=True)
class StreamEvent:
    """One event of a streamed generation (OpenAI's ImageGenStreamEvent, with raw bytes)."""

    kind: Literal["partial_image", "completed"]
    model: str  # the catalog model making it (a fallback, if the primary failed first)
    image_index: int
    data: bytes
    created_at: int
    size: str
    quality: str
    background: str
    output_format: str
    partial_image_index: int | None = None
    # Completed events only. Summed over a request's completed events it is the usage
    # the upstream reported (per image where it reports so, else all on the last one).
    usage: TokenUsage | None = None
    revised_prompt: str | None = None


class StreamSink(Protocol):
    """Where a streamed generation's events go."""

    async def send(self, event: StreamEvent, delivered: Callable[[], None]) -> None:
        """Sends ``event`` and calls ``delivered`` once it is on its way to the caller (then
        it is charged); raises ``asyncio.CancelledError`` when the request is cancelled. A
        cancellation that comes while the event is being written waits for that write's
        outcome, so ``delivered`` is called exactly when the event went out."""
        ...


@dataclass
class _Delivery:
    """The ``Progress`` of a streamed request: turns the provider's images into events,
    sends them and counts what was delivered (the money follows these counts)."""

    sink: StreamSink
    quote: Quote
    clock: Callable[[], float]
    images: int = 0
    partials: int = 0
    # Something may have reached the caller (a send began): no fallback model any more.
    started: bool = False
    _sent: set[int] = field(default_factory=set)  # id() of the GeneratedImages already sent
    _indexes: set[int] = field(default_factory=set)
    _partials_of: Counter[int] = field(default_factory=Counter)  # partials sent, by image
    _usage_reported: bool = False
    # The completed images delivered, in order, with the usage reported with each.
    _delivered: list[tuple[GeneratedImage, TokenUsage | None]] = field(default_factory=list)
    _last: ProviderResult | None = None

    @property
    def complete(self) -> bool:
        """Every image the caller asked for was delivered."""
        return self.images >= self.quote.request.n

    def result(self) -> ProviderResult:
        """What was delivered, as the provider's result (for a request that ends after
        its last image was delivered, whatever the provider did next)."""
        usages = [usage for _, usage in self._delivered if usage is not None]
        reported = self._last or ProviderResult(images=[])
        return ProviderResult(
            images=[image for image, _ in self._delivered],
            usage=sum_usage(usages),
            size=reported.size,
            quality=reported.quality,
            background=reported.background,
            output_format=reported.output_format,
        )

    def _event(
        self,
        kind: Literal["partial_image", "completed"],
        image_index: int,
        image: GeneratedImage,
        result: ProviderResult | None = None,
        **extra: object,
    ) -> StreamEvent:
        request = self.quote.request
        return StreamEvent(
            kind=kind,
            model=self.quote.spec.id,
            image_index=image_index,
            data=image.data,
            created_at=int(self.clock()),
            size=(result and result.size) or request.size,
            quality=(result and result.quality) or request.quality,
            background=(result and result.background) or request.background or "auto",
            output_format=image.format,
            **extra,  # type: ignore[arg-type]
        )

    async def partial(
        self, image_index: int, partial_index: int, image: GeneratedImage, reported: ProviderResult | None = None
    ) -> None:
        request = self.quote.request
        if image_index >= request.n or self._partials_of[image_index] >= request.partial_images:
            self._beyond_request("a partial image", image_index)
            return
        self._partials_of[image_index] += 1
        self.started = True
        event = self._event("partial_image", image_index, image, reported, partial_image_index=partial_index)
        await self.sink.send(event, self._partial_delivered)

    def _beyond_request(self, what: str, image_index: int) -> None:
        # An upstream that sends more than was asked (images, partial images) is not
        # relayed past the request: the caller asked for, and was reserved for, no more.
        log.warning("the provider sent %s beyond the request (image %d); not relayed", what, image_index)

    def _partial_delivered(self) -> None:
        self.partials += 1

    async def image(self, image_index: int, image: GeneratedImage, reported: ProviderResult | None = None) -> None:
        self._usage_reported |= reported is not None
        await self._completed(image_index, image, reported.usage if reported else None, reported)

    async def _completed(
        self, image_index: int, image: GeneratedImage, usage: TokenUsage | None, result: ProviderResult | None = None
    ) -> None:
        if image_index >= self.quote.request.n or image_index in self._indexes:
            self._beyond_request("an image", image_index)
            return
        self.started = True
        self._sent.add(id(image))
        self._indexes.add(image_index)
        event = self._event(
            "completed", image_index, image, result, usage=usage or TokenUsage(), revised_prompt=image.revised_prompt
        )

        def delivered() -> None:
            self.images += 1
            self._delivered.append((image, usage))
            self._last = result or self._last

        await self.sink.send(event, delivered)

    async def finish(self, images: list[GeneratedImage], result: ProviderResult) -> None:
        """Sends, in order, the images the provider did not report as it went; the last
        one carries the request's usage unless the provider reported usage per image."""
        rest = [image for image in images if id(image) not in self._sent]
        free = (index for index in itertools.count() if index not in self._indexes)
        for position, image in enumerate(rest):
            usage = result.usage if position == len(rest) - 1 and not self._usage_reported else None
            await self._completed(next(free), image, usage, result)


class Generation:
    """Runs generations. One instance serves every request; it holds no per-request state."""

    def __init__(
        self,
        *,
        catalog: ModelCatalog,
        providers: Mapping[str, ImageProvider],
        ledger: Ledger,
        store: ImageStore,
        signer: UrlSigner,
        metrics: Metrics,
        reservation_grace_seconds: float = 30.0,
        clock: Callable[[], float] = time.time,
        presign: Callable[[str], Awaitable[str | None]] | None = None,
    ) -> None:
        self._catalog = catalog
        self._providers = providers  # by model id
        self._ledger = ledger
        self._store = store
        self._signer = signer
        # IMAGEGW_URL_MODE=presigned: the store's own URLs instead of the gateway's.
        self._presign = presign
        self._metrics = metrics
        # Time after a request's deadline for its settlement to land before the sweeper
        # may treat its reservation as orphaned.
        self._reservation_grace = reservation_grace_seconds
        self._clock = clock
        # Settlements outlive cancelled requests (they are shielded); shutdown waits for
        # them so that no money is left reserved by a clean stop.
        self._settling: set[asyncio.Task[None]] = set()

    def quote(self, raw: RawImageRequest, *, sink: bool) -> Quote:
        """The catalog's model, parameters and price for ``raw`` (400s); ``sink``: the
        caller can take a stream."""
        quote = self._catalog.resolve(raw)
        if quote.stream and not sink:
            raise InternalError("a streamed request needs a sink")
        return quote

    def prepare(self, principal: Principal, quote: Quote, *, request_id: str, deadline: float | None) -> PendingReservation:
        """The reservation ``quote`` needs, to be made by admission (``server.admission``)
        before :meth:`generate` runs with it."""
        # Past the caller's deadline this request cannot be running any more, so if the
        # process dies, the sweeper may release the reservation soon after it.
        ttl = None if deadline is None else deadline - asyncio.get_running_loop().time() + self._reservation_grace
        return self._ledger.prepare_reservation(
            principal.account_id,
            quote.amount_micros,
            request_id=request_id,
            model=quote.spec.id,
            images=quote.request.n,
            ttl_seconds=ttl,
        )

    async def generate(
        self,
        quote: Quote,
        reservation: Reservation,
        *,
        deadline: float | None,
        sink: StreamSink | None = None,
        keep_images: bool = False,
    ) -> GenerationResult:
        """Generates, delivers and charges ``reservation`` (made for ``quote`` by
        admission); raises an ``ApiError`` for every refusal.

        ``deadline`` is the caller's absolute loop time (from the gRPC deadline), or None.
        With ``sink`` (a request with ``stream: true``), images and partial images are sent
        to it as they are made (see the module docstring for what is charged); the result
        still carries every final image, as bytes. ``keep_images``: a ``url`` answer's
        images stay as long as an idempotent replay may ask for them (``imgk-`` ids). The
        reservation is settled whatever happens.
        """
        self._metrics.reservations_open.inc()
        stream = _Delivery(sink, quote, self._clock) if quote.stream and sink is not None else None
        served = quote
        delivered = 0
        usage: TokenUsage | None = None
        error_code = ""
        answered = False  # a stream that delivered every image and returns its result
        try:
            try:
                served, result = await self._call_with_fallbacks(quote, deadline, stream)
            except (ApiError, asyncio.CancelledError) as exc:
                if stream is None or not stream.complete:
                    raise
                # Every image the caller asked for was delivered: what the provider did
                # next (an error, a cut stream, the caller hanging up while the upstream
                # closed its stream) changes nothing the caller holds or owes. The request
                # succeeded, and its answer is kept for its Idempotency-Key.
                if isinstance(exc, asyncio.CancelledError):
                    _uncancel()
                served, result = stream.quote, stream.result()
            usage = result.usage
            images = result.images[: quote.request.n]
            if stream is not None:
                await stream.finish(images, result)
                payload = [DeliveredImage(url=None, data=image.data, revised_prompt=image.revised_prompt) for image in images]
            else:
                try:
                    payload = await self._deliver(images, quote.response_format, keep_images)
                except StoreError as exc:
                    self._metrics.images_not_stored.labels(served.spec.id).inc(len(images))
                    log.error(
                        "request %s: %d image(s) from %s could not be stored (%s); the request fails uncharged, "
                        "the provider may have billed them", reservation.request_id, len(images), served.spec.id, exc,
                    )
                    raise ServiceUnavailableError(
                        "The generated images could not be stored, so no URL can be returned; nothing was charged. "
                        "Retry, or ask for response_format b64_json.",
                        code="image_store_unavailable",
                        retryable=exc.retryable,
                    ) from exc
            delivered = len(payload)
            self._metrics.images.labels(served.spec.id, served.spec.provider).inc(delivered)
            answered = stream is not None and stream.complete
            return GenerationResult(
                created=int(self._clock()),
                images=payload,
                usage=result.usage,
                cost_micros=_cost(quote, served, delivered, stream.partials if stream else 0, usage),
                model=served.spec.id,
                provider=served.spec.provider,
                size=result.size,
                quality=result.quality,
                background=result.background,
                output_format=result.output_format,
            )
        except ApiError as exc:
            error_code = exc.code
            raise
        except asyncio.CancelledError:
            error_code = "cancelled"
            raise
        except BaseException:
            error_code = "internal_error"
            raise
        finally:
            if stream is not None:
                # What reached the caller is paid for, whatever happened after it, at the
                # prices of the model that made it (a fallback's, if the primary failed).
                delivered = stream.images
                captured = _cost(quote, stream.quote, stream.images, stream.partials, usage)
            else:
                captured = _cost(quote, served, delivered, 0, usage)
            # Shielded: a second cancellation must not stop the money from settling. If the
            # process dies here, the reservation expires and the sweeper releases it.
            settle = asyncio.create_task(self._settle(quote, reservation.reservation_id, captured, delivered, error_code))
            self._settling.add(settle)
            settle.add_done_callback(self._settling.discard)
            try:
                await asyncio.shield(settle)
            except asyncio.CancelledError:
                if not answered:
                    raise
                # The caller hung up after its last image, while this settled: the stream
                # is still a success, returned so that its Idempotency-Key keeps it.
                _uncancel()
                await asyncio.shield(settle)

    async def wait_settled(self) -> None:
        """Waits for every settlement still in progress (used at shutdown)."""
        if self._settling:
            await asyncio.gather(*self._settling, return_exceptions=True)

    async def _settle(self, quote: Quote, reservation_id: str, captured: int, delivered: int, error_code: str) -> None:
        try:
            await self._ledger.settle(
                reservation_id,
                captured_micros=captured,
                images_delivered=delivered,
                status="succeeded" if delivered and not error_code else "failed",
                error_code=error_code,
            )
        finally:
            self._metrics.reservations_open.dec()
        self._metrics.captured_micros.labels(quote.spec.id).inc(captured)
        self._metrics.released_micros.labels(quote.spec.id).inc(quote.amount_micros - captured)

    async def _call_with_fallbacks(
        self, quote: Quote, deadline: float | None, stream: _Delivery | None
    ) -> tuple[Quote, ProviderResult]:
        """Calls the model, then its fallbacks (same deadline and reservation) while the
        failure is transient and nothing was streamed yet. Content-policy refusals and bad
        requests never fall back."""
        candidates = [quote]
        for fallback_id in quote.spec.fallbacks:
            assert quote.raw is not None  # the catalog keeps the caller's request on every quote
            try:
                candidates.append(self._catalog.resolve(replace(quote.raw, model=fallback_id)))
            except ApiError:
                continue  # the fallback cannot take these parameters or is not enabled
        last_error: UpstreamError | DeadlineExceededError | None = None
        loop = asyncio.get_running_loop()
        for candidate in candidates:
            if stream is not None:
                stream.quote = candidate
            try:
                return candidate, await self._call(candidate, deadline, stream)
            except UpstreamError as exc:
                if not exc.should_retry or (stream is not None and stream.started):
                    raise
                last_error = exc
            except DeadlineExceededError as exc:
                # The model's own timeout is a transient failure of that model; the caller's
                # deadline running out is final.
                if (deadline is not None and loop.time() >= deadline) or (stream is not None and stream.started):
                    raise
                last_error = exc
            if candidate is not candidates[-1]:
                following = candidates[candidates.index(candidate) + 1]
                self._metrics.fallbacks.labels(quote.spec.id, following.spec.id).inc()
                log.warning(
                    "model %s failed (%s); falling back to %s", candidate.spec.id, last_error.code, following.spec.id
                )
        assert last_error is not None
        raise last_error

    async def _call(self, quote: Quote, deadline: float | None, stream: _Delivery | None) -> ProviderResult:
        provider = self._providers.get(quote.spec.id)
        if provider is None:
            raise InternalError(f"no provider is wired for model {quote.spec.id}")
        loop = asyncio.get_running_loop()
        model_deadline = loop.time() + quote.spec.timeout_seconds
        effective = model_deadline if deadline is None else min(deadline, model_deadline)
        started, outcome = loop.time(), "ok"
        try:
            async with asyncio.timeout_at(effective):
                result = await provider.generate(quote.request, deadline=effective, progress=stream)
        except TimeoutError as exc:
            outcome = "timeout"
            raise DeadlineExceededError(
                f"The model '{quote.spec.id}' did not finish before the request's deadline.",
                code="timeout",
            ) from exc
        except ApiError as exc:
            outcome = exc.code
            raise
        except asyncio.CancelledError:
            outcome = "cancelled"
            raise
        finally:
            self._metrics.upstream_seconds.labels(quote.spec.provider, quote.spec.id, outcome).observe(
                loop.time() - started
            )
        if not result.images:
            raise UpstreamError(f"The model '{quote.spec.id}' returned no images.", retryable=False)
        return result

    async def relink(self, url: str) -> str:
        """A stored answer's image link made again from now (an idempotent replay): the
        same image, a fresh expiry; a link that names none of our images is kept."""
        image_id = url.partition("?")[0].rpartition("/")[2]
        return await self._url(image_id) if valid_image_id(image_id) else url

    async def _deliver(self, images: list[GeneratedImage], response_format: str, kept: bool) -> list[DeliveredImage]:
        if response_format == "b64_json":
            return [DeliveredImage(url=None, data=image.data, revised_prompt=image.revised_prompt) for image in images]
        ids = [new_image_id(image.format, kept=kept) for image in images]
        pairs = list(zip(ids, images, strict=True))
        # Every put finishes (or fails) before the answer: none is left running behind it.
        outcomes = await asyncio.gather(
            *(self._store.put(image_id, image.data) for image_id, image in pairs), return_exceptions=True
        )
        for outcome in outcomes:
            if isinstance(outcome, BaseException):
                raise outcome
        return [
            DeliveredImage(url=await self._url(image_id), data=None, revised_prompt=image.revised_prompt)
            for image_id, image in pairs
        ]

    async def _url(self, image_id: str) -> str:
        if self._presign is not None:
            presigned = await self._presign(image_id)
            if presigned is not None:
                return presigned
        return self._signer.url(image_id)


def _uncancel() -> None:
    """Takes back the current task's cancellation: the request it was meant to stop is
    already complete, and what is left of it (settling, storing the answer) is short."""
    task = asyncio.current_task()
    assert task is not None
    task.uncancel()


def _cost(quote: Quote, served: Quote, images: int, partials: int, usage: TokenUsage | None) -> int:
    """What the delivered images (and an edit's inputs) cost at the serving model's
    prices, never more than the primary model's reservation (a fallback may price
    differently)."""
    return min(served.cost_micros(images, partials, usage), quote.amount_micros)
