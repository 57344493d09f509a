"""ImageService: thin translation between protobuf and the generation use case.

GenerateImages: Idempotency-Key metadata (server.idempotency) -> rate limit of the key
(server.ratelimit; before anything is reserved) -> generation, at most once per
idempotency key (server.generation) -> response headers as initial metadata.
"""

from __future__ import annotations

import asyncio

import grpc
from google.api import httpbody_pb2
from imagegw.v1 import images_pb2, images_pb2_grpc

from server.api.interceptors import current_call
from server.catalog import RawImageRequest
from server.errors import InternalError, NotFoundError
from server.generation import Generation, GenerationResult
from server.idempotency import (
    REPLAY_HEADER,
    Headers,
    IdempotencyStore,
    fingerprint,
    parse_key,
)
from server.ledger import format_usd
from server.ratelimit import RateLimiter, requested_images
from server.storage import ImageStore, UrlSigner, valid_image_id

__all__ = ["ImageServicer"]

# Part of every idempotency fingerprint, so a key reused on another method never matches.
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


class ImageServicer(images_pb2_grpc.ImageServiceServicer):
    """Generates images and serves stored image files."""

    def __init__(
        self,
        *,
        generation: Generation,
        store: ImageStore,
        signer: UrlSigner,
        limiter: RateLimiter,
        idempotency: IdempotencyStore,
    ) -> None:
        self._generation = generation
        self._store = store
        self._signer = signer
        self._limiter = limiter
        self._idempotency = idempotency

    async def GenerateImages(  # noqa: N802 - gRPC method name
        self, request: images_pb2.GenerateImagesRequest, context: grpc.aio.ServicerContext
    ) -> images_pb2.GenerateImagesResponse:
        call = current_call()
        principal = call.principal
        if principal is None:  # the interceptor's policy guarantees one
            raise InternalError("GenerateImages ran without a principal")
        idempotency_key = parse_key(context.invocation_metadata())
        raw = RawImageRequest(
            prompt=request.prompt,
            **{name: getattr(request, name) for name in _OPTIONAL_FIELDS if request.HasField(name)},  # type: ignore[arg-type]
        )
        call.log_fields["model"] = raw.model or "default"
        remaining = context.time_remaining()
        # Finish a little before the caller's deadline, so that the caller gets our 504
        # (with its OpenAI body) rather than a transport timeout.
        deadline = None if remaining is None else asyncio.get_running_loop().time() + remaining * 0.95 - 0.05
        # Before anything is reserved: a limited request costs nothing.
        quota = await self._limiter.acquire(principal, images=requested_images(raw.n))

        async def generate() -> tuple[images_pb2.GenerateImagesResponse, Headers]:
            result = await self._generation.generate(principal, raw, request_id=call.request_id, deadline=deadline)
            call.log_fields.update(
                model=result.model, provider=result.provider, images=len(result.images), cost_micros=result.cost_micros
            )
            headers = (("x-imagegw-cost-usd", format_usd(result.cost_micros)), ("x-imagegw-model", result.model))
            return _response(result), headers

        answer = await self._idempotency.run(
            principal.account_id,
            idempotency_key,
            fingerprint(_GENERATE_IMAGES, request) if idempotency_key is not None else "",
            request_id=call.request_id,
            deadline=deadline,
            produce=generate,
            parse=images_pb2.GenerateImagesResponse.FromString,
        )
        headers = [("x-request-id", call.request_id), *answer.headers]
        if answer.replayed:  # nothing generated or charged this time
            call.log_fields.update(idempotent_replay=True, images=len(answer.message.data), cost_micros=0)
            headers.append((REPLAY_HEADER, "true"))
        if quota is not None:
            headers += quota.headers()
        # Response headers travel as initial metadata, sent only once the call has
        # succeeded (an error after initial metadata would lose its HTTP status in Envoy).
        await context.send_initial_metadata(tuple(headers))
        return answer.message

    async def GetImageFile(  # noqa: N802 - gRPC method name
        self, request: images_pb2.GetImageFileRequest, context: grpc.aio.ServicerContext
    ) -> httpbody_pb2.HttpBody:
        current_call().log_fields["image_id"] = request.image_id
        if not valid_image_id(request.image_id):
            raise NotFoundError(f"No image with id '{request.image_id}'.", param="image_id")
        remaining = self._signer.verify(request.image_id, request.expires, request.signature)
        image = await self._store.get(request.image_id)
        if image is None:
            raise NotFoundError(f"No image with id '{request.image_id}'.", param="image_id")
        # The bytes never change for an id; caching is safe until the link expires.
        await context.send_initial_metadata((("cache-control", f"private, max-age={remaining}, immutable"),))
        return httpbody_pb2.HttpBody(content_type=image.content_type, data=image.data)


def _response(result: GenerationResult) -> images_pb2.GenerateImagesResponse:
    usage = result.usage
    response = images_pb2.GenerateImagesResponse(
        created=result.created,
        data=[
            images_pb2.Image(url=image.url, b64_json=image.data, revised_prompt=image.revised_prompt)
            for image in result.images
        ],
        background=result.background,
        output_format=result.output_format,
        size=result.size,
        quality=result.quality,
        usage=images_pb2.Usage(
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
        ),
    )
    return response
