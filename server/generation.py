"""The generation use case: from a caller's raw request to delivered, paid-for images.

    resolve (catalog: model, parameters, price; 400s)
      -> reserve n x unit price (ledger, committed; 402 when short)
      -> call the provider within the deadline (fallback models on transient failure)
      -> deliver (store the images and sign URLs, or return the bytes)
      -> settle: capture the delivered images, release the rest (shielded from
         cancellation; a crash leaves a reservation the sweeper releases)

No database transaction spans the provider call, and every exit path settles the
reservation: success captures what was delivered, any error or cancellation (the client
went away, the deadline ran out) releases everything.
"""

from __future__ import annotations

import asyncio
import logging
import time
from collections.abc import Callable, Mapping
from dataclasses import dataclass, replace

from server.catalog import ModelCatalog, Quote, RawImageRequest
from server.errors import ApiError, DeadlineExceededError, InternalError, UpstreamError
from server.ledger import Ledger, Principal
from server.metrics import Metrics
from server.providers.base import (
    GeneratedImage,
    ImageProvider,
    ProviderResult,
    TokenUsage,
)
from server.storage import ImageStore, UrlSigner, new_image_id

__all__ = ["DeliveredImage", "Generation", "GenerationResult"]

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
    ) -> None:
        self._catalog = catalog
        self._providers = providers  # by model id
        self._ledger = ledger
        self._store = store
        self._signer = signer
        self._metrics = metrics
        # Time after a request's deadline for its settlement to land before the sweeper
        # may treat its reservation as orphaned.
        self._reservation_grace = reservation_grace_seconds
        self._clock = clock
        # Settlements outlive cancelled requests (they are shielded); shutdown waits for
        # them so that no money is left reserved by a clean stop.
        self._settling: set[asyncio.Task[None]] = set()

    async def generate(
        self, principal: Principal, raw: RawImageRequest, *, request_id: str, deadline: float | None
    ) -> GenerationResult:
        """Generates, delivers and charges; raises an ``ApiError`` for every refusal.

        ``deadline`` is the caller's absolute loop time (from the gRPC deadline), or None.
        """
        quote = self._catalog.resolve(raw)
        # Past the caller's deadline this request cannot be running any more, so if the
        # process dies, the sweeper may release the reservation soon after it.
        ttl = None if deadline is None else deadline - asyncio.get_running_loop().time() + self._reservation_grace
        reservation = await self._ledger.reserve(
            principal.account_id,
            quote.amount_micros,
            request_id=request_id,
            model=quote.spec.id,
            images=quote.request.n,
            ttl_seconds=ttl,
        )
        self._metrics.reservations_open.inc()
        captured = 0
        delivered = 0
        error_code = ""
        try:
            served, result = await self._call_with_fallbacks(quote, deadline)
            images = result.images[: quote.request.n]
            # A fallback model may price differently; never capture more than was reserved.
            captured = min(served.unit_price_micros * len(images), quote.amount_micros)
            payload = await self._deliver(images, quote.response_format)
            delivered = len(payload)
            self._metrics.images.labels(served.spec.id, served.spec.provider).inc(delivered)
            return GenerationResult(
                created=int(self._clock()),
                images=payload,
                usage=result.usage,
                cost_micros=captured,
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
            if not delivered:
                captured = 0
            # Shielded: a second cancellation must not stop the money from settling. If the
            # process dies here, the reservation expires and the sweeper releases it.
            settle = asyncio.create_task(self._settle(quote, reservation.reservation_id, captured, delivered, error_code))
            self._settling.add(settle)
            settle.add_done_callback(self._settling.discard)
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
                status="succeeded" if delivered else "failed",
                error_code=error_code,
            )
        finally:
            self._metrics.reservations_open.dec()
        self._metrics.captured_micros.labels(quote.spec.id).inc(captured)
        self._metrics.released_micros.labels(quote.spec.id).inc(quote.amount_micros - captured)

    async def _call_with_fallbacks(self, quote: Quote, deadline: float | None) -> tuple[Quote, ProviderResult]:
        """Calls the model, then its fallbacks (same deadline and reservation) while the
        failure is transient. Content-policy refusals and bad requests never fall back."""
        candidates = [quote]
        for fallback_id in quote.spec.fallbacks:
            try:
                candidates.append(self._catalog.resolve(replace(_raw_of(quote), model=fallback_id)))
            except ApiError:
                continue  # the fallback cannot take these parameters or is not enabled
        last_error: UpstreamError | DeadlineExceededError | None = None
        loop = asyncio.get_running_loop()
        for candidate in candidates:
            try:
                return candidate, await self._call(candidate, deadline)
            except UpstreamError as exc:
                if not exc.should_retry:
                    raise
                last_error = exc
            except DeadlineExceededError as exc:
                # The model's own timeout is a transient failure of that model; the caller's
                # deadline running out is final.
                if deadline is not None and loop.time() >= deadline:
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

    async def _call(self, quote: Quote, deadline: float | None) -> ProviderResult:
        provider = self._providers.get(quote.spec.id)
        if provider is None:
            raise InternalError(f"no provider is wired for model {quote.spec.id}")
        loop = asyncio.get_running_loop()
        model_deadline = loop.time() + quote.spec.timeout_seconds
        effective = model_deadline if deadline is None else min(deadline, model_deadline)
        started, outcome = loop.time(), "ok"
        try:
            async with asyncio.timeout_at(effective):
                result = await provider.generate(quote.request, deadline=effective)
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

    async def _deliver(self, images: list[GeneratedImage], response_format: str) -> list[DeliveredImage]:
        if response_format == "b64_json":
            return [DeliveredImage(url=None, data=image.data, revised_prompt=image.revised_prompt) for image in images]
        ids = [new_image_id(image.format) for image in images]
        pairs = list(zip(ids, images, strict=True))
        await asyncio.gather(*(self._store.put(image_id, image.data) for image_id, image in pairs))
        return [
            DeliveredImage(url=self._signer.url(image_id), data=None, revised_prompt=image.revised_prompt)
            for image_id, image in pairs
        ]


def _raw_of(quote: Quote) -> RawImageRequest:
    """The caller's parameters again, to re-resolve them for a fallback model."""
    request = quote.request
    return RawImageRequest(
        prompt=request.prompt,
        n=request.n,
        quality="auto" if request.quality_is_auto else request.quality,
        response_format=quote.response_format,
        size="auto" if request.size_is_auto else request.size,
        style=request.style,
        user=request.user,
        background=request.background,
        moderation=request.moderation,
        output_format=request.output_format,
        output_compression=request.output_compression if request.output_compression != 100 else None,
    )
