"""The edit and variation use cases: from what the caller sent to a checked request.

An edit (``POST /v1/images/edits``, gRPC ``EditImages``) or a variation
(``/v1/images/variations``, ``CreateImageVariation``) is a generation with input images:
once its images are read and checked, it goes through the generation use case exactly
like a generation (validation against the model's catalog row, reservation of its
outputs and inputs, the provider, delivery, settlement). What is particular to it lives
here: the three ways its images arrive (multipart files, JSON ``image_url`` references,
gRPC bytes), their fields typed as OpenAI's JSON would carry them, and the checks that
every image is a whole PNG, JPEG or WebP, all before anything is reserved.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from typing import Any, BinaryIO

from server.catalog import RawImageRequest
from server.errors import InvalidRequestError
from server.fetching import ImageFetcher
from server.providers.base import InputImage, Operation
from server.uploads import Upload, decode_data_url, in_memory, inspect_image, typed_field

__all__ = ["EDIT_FIELDS", "VARIATION_FIELDS", "InputRequests"]

# The text fields of each request and the JSON type OpenAI gives them.
EDIT_FIELDS: Mapping[str, type] = {
    "prompt": str,
    "model": str,
    "n": int,
    "quality": str,
    "response_format": str,
    "size": str,
    "user": str,
    "background": str,
    "output_format": str,
    "output_compression": int,
    "input_fidelity": str,
    "stream": bool,
    "partial_images": int,
}
VARIATION_FIELDS: Mapping[str, type] = {"model": str, "n": int, "response_format": str, "size": str, "user": str}
_TYPE_NAMES = {str: "a string", int: "an integer", bool: "a boolean"}


class InputRequests:
    """Builds edit and variation requests from uploads, JSON bodies and gRPC messages."""

    def __init__(self, fetcher: ImageFetcher, *, max_images: int, max_pixels: int) -> None:
        self._fetcher = fetcher
        self._max_images = max_images
        self._max_pixels = max_pixels

    async def _inspect(self, source: BinaryIO, size: int, param: str, filename: str = "") -> InputImage:
        return await inspect_image(source, size=size, param=param, filename=filename, max_pixels=self._max_pixels)

    async def from_upload(self, upload: Upload, operation: Operation) -> RawImageRequest:
        """A multipart or JSON body as the request it describes (its images checked)."""
        if upload.json is not None:
            if operation == "variation":
                raise InvalidRequestError(
                    "Variations take multipart/form-data with one PNG file in 'image'.", code="unsupported_content_type"
                )
            return await self._from_json(upload.json, upload)
        allowed = EDIT_FIELDS if operation == "edit" else VARIATION_FIELDS
        for name in upload.fields:
            if name not in allowed:
                raise _unknown(name)
        fields = {name: typed_field(upload.fields, name, kind) for name, kind in allowed.items()}
        images: list[InputImage] = []
        mask: InputImage | None = None
        for index, part in enumerate(upload.files):
            if part.field in ("image", "image[]"):
                images.append(await self._inspect(part.file, part.size, "image", part.filename))
            elif part.field == "mask" and operation == "edit":
                if mask is not None:
                    raise InvalidRequestError("Send at most one 'mask'.", param="mask")
                mask = await self._inspect(part.file, part.size, "mask", part.filename)
            else:
                raise _unknown(part.field or f"part {index}")
        return _raw(operation, fields, images, mask)

    async def from_message(
        self,
        operation: Operation,
        fields: Mapping[str, Any],
        images: Sequence[tuple[bytes, str]],
        mask: tuple[bytes, str] | None,
    ) -> RawImageRequest:
        """A gRPC request: its set fields and its images as (bytes, filename)."""
        checked = [
            await self._inspect(in_memory(data), len(data), "image", filename) for data, filename in images
        ]
        checked_mask = None
        if mask is not None:
            checked_mask = await self._inspect(in_memory(mask[0]), len(mask[0]), "mask", mask[1])
        return _raw(operation, dict(fields), checked, checked_mask)

    async def _from_json(self, body: Mapping[str, Any], upload: Upload) -> RawImageRequest:
        fields: dict[str, Any] = {}
        for name, value in body.items():
            if name in ("images", "mask"):
                continue
            kind = EDIT_FIELDS.get(name)
            if kind is None:
                raise _unknown(name)
            if value is None:
                continue  # OpenAI's nullable fields: null is absent
            if not isinstance(value, kind) or (kind is int and isinstance(value, bool)):
                raise InvalidRequestError(
                    f"Invalid type for '{name}': expected {_TYPE_NAMES[kind]}, but got {_json_type(value)} instead.",
                    param=name,
                    code="invalid_type",
                )
            fields[name] = value
        references = body.get("images")
        if not isinstance(references, list) or not references:
            raise InvalidRequestError(
                "Missing required parameter: 'images' (a list of {\"image_url\": ...}).",
                param="images",
                code="missing_required_parameter",
            )
        # Counted before any is fetched or decoded, as a multipart upload's files are counted
        # as they arrive: each URL is a fetch of up to the file limit.
        if len(references) > self._max_images:
            raise InvalidRequestError(
                f"Invalid 'images': at most {self._max_images} images are allowed, but {len(references)} were given.",
                param="images",
                code="too_many_images",
            )
        images = [await self._reference(item, f"images[{index}]", upload) for index, item in enumerate(references)]
        mask = None
        if body.get("mask") is not None:
            mask = await self._reference(body["mask"], "mask", upload)
        return _raw("edit", fields, images, mask)

    async def _reference(self, item: object, param: str, upload: Upload) -> InputImage:
        """One ``{"image_url": ...}`` (``data:`` or ``https``) as a checked image."""
        if not isinstance(item, dict):
            raise InvalidRequestError(f"Invalid '{param}': expected an object with 'image_url'.", param=param)
        if "file_id" in item:
            raise InvalidRequestError(
                f"Invalid '{param}': file ids are not supported by this server (it has no Files API); "
                "send the image as a data: URL, an https URL, or a multipart upload.",
                param=param,
                code="unsupported_parameter",
            )
        url = item.get("image_url")
        if set(item) != {"image_url"} or not isinstance(url, str) or not url:
            raise InvalidRequestError(f"Invalid '{param}': expected exactly one 'image_url' string.", param=param)
        if url.startswith("data:"):
            data = decode_data_url(url, param)
            return await self._inspect(in_memory(data), len(data), param)
        source, size = await self._fetcher.fetch(url, param=param, fetched_before=upload.fetched_bytes)
        upload.fetched.append(source)
        upload.fetched_bytes += size
        return await self._inspect(source, size, param)


def _raw(operation: Operation, fields: Mapping[str, Any], images: list[InputImage], mask: InputImage | None) -> RawImageRequest:
    values = {name: value for name, value in fields.items() if value is not None}
    return RawImageRequest(
        prompt=values.pop("prompt", ""),
        operation=operation,
        images=tuple(images),
        mask=mask,
        **values,
    )


def _unknown(name: str) -> InvalidRequestError:
    return InvalidRequestError(f"Unknown parameter: '{name}'.", param=name, code="unknown_parameter")


def _json_type(value: object) -> str:
    if isinstance(value, bool):
        return "a boolean"
    if isinstance(value, int):
        return "an integer"
    if isinstance(value, float):
        return "a decimal number"
    if isinstance(value, str):
        return "a string"
    if isinstance(value, list):
        return "an array"
    return "an object" if isinstance(value, dict) else "null"
