"""Uploaded images: the body of ``POST /v1/images/edits`` and ``/v1/images/variations``,
read as it streams in, checked, and kept out of memory when large.

Envoy forwards an upload as it arrives, in messages of at most 1 MiB, without holding it
(facts §14e, shape (c)), so every limit is enforced here, as soon as it is crossed:

* ``multipart/form-data`` (what the openai SDKs send: text fields first, then ``image``
  or ``image[]`` files, then ``mask``) is parsed incrementally by python-multipart; each
  file goes to a ``SpooledTemporaryFile`` (memory up to ``spool_bytes``, then disk), so
  sixteen 50 MB images cost the server disk, not RAM. Parsing and the writes run in a
  worker thread, never on the event loop. An upload that ends without its closing
  boundary (a client or proxy that gave up midway) is refused: the stream itself ends
  normally in that case, only the missing boundary tells.
* ``application/json`` (``images: [{"image_url": ...}]``, ``mask: {"image_url": ...}``) is
  read whole up to ``max_json_bytes``; ``data:`` URLs are decoded, ``https`` URLs fetched
  (``server.fetching``), ``file_id`` refused (there is no Files API here).

Over a limit: ``PayloadTooLargeError`` (413) at once, naming the limit. Anything else wrong
(a part that is not an image, a field of the wrong type, an unknown field) is a 400 naming
the ``param``, before anything is reserved.
"""

from __future__ import annotations

import asyncio
import io
import json
import re
import tempfile
from collections.abc import AsyncIterator, Mapping
from dataclasses import dataclass, field
from typing import Any, BinaryIO

import pybase64
from PIL import Image, UnidentifiedImageError
from python_multipart.exceptions import MultipartParseError
from python_multipart.multipart import MultipartParser, parse_options_header

from server.errors import InvalidRequestError, PayloadTooLargeError
from server.providers.base import InputImage

__all__ = [
    "TEXT_FIELD_BYTES",
    "Upload",
    "UploadLimits",
    "UploadedFile",
    "decode_data_url",
    "in_memory",
    "inspect_image",
    "read_upload",
    "typed_field",
]

# A text field (the prompt is the longest: 32,000 characters, up to 4 bytes each).
TEXT_FIELD_BYTES = 256 * 1024
# RFC 2046 section 5.1.1: a boundary is 1 to 70 characters (python-multipart refuses
# more than 256 with an exception of its own).
MAX_BOUNDARY = 70
INTEGER_RE = re.compile(r"-?(0|[1-9][0-9]*)")
_PIL_FORMATS = {"PNG": "png", "JPEG": "jpeg", "WEBP": "webp", "MPO": "jpeg"}
DATA_URL_RE = re.compile(r"^data:(?P<type>[\w.+-]+/[\w.+-]+)?(?P<params>(;[\w.+-]+=[\w.+-]+)*)(?P<b64>;base64)?,", re.I)


@dataclass(frozen=True, slots=True)
class UploadLimits:
    """What one upload may contain (settings: the README's limits table)."""

    max_file_bytes: int
    max_files: int
    max_total_bytes: int
    max_json_bytes: int
    spool_bytes: int


@dataclass
class UploadedFile:
    """One file part, as received (not yet checked to be an image)."""

    field: str
    filename: str
    content_type: str
    file: BinaryIO
    size: int = 0


@dataclass
class Upload:
    """A parsed request body: text fields, file parts, or a JSON object."""

    fields: dict[str, str] = field(default_factory=dict)
    files: list[UploadedFile] = field(default_factory=list)
    json: dict[str, Any] | None = None
    # The images a JSON body's URLs were fetched into (server.fetching), freed with it.
    fetched: list[BinaryIO] = field(default_factory=list)
    fetched_bytes: int = 0

    def close(self) -> None:
        """Frees the temporary files."""
        for part in self.files:
            part.file.close()
        for source in self.fetched:
            source.close()


def _too_large(what: str, limit: int) -> PayloadTooLargeError:
    return PayloadTooLargeError(f"{what} is larger than the server's limit of {limit} bytes.", code="request_too_large")


class _MultipartReader:
    """python-multipart callbacks that build an ``Upload`` and enforce the limits."""

    def __init__(self, limits: UploadLimits, boundary: bytes) -> None:
        self.limits = limits
        self.upload = Upload()
        self.ended = False
        self._total = 0
        self._headers: dict[str, str] = {}
        self._header_field = b""
        self._header_value = b""
        self._file: UploadedFile | None = None
        self._text: bytearray | None = None
        self._name = ""
        self.parser = MultipartParser(
            boundary,
            callbacks={
                "on_part_begin": self._part_begin,
                "on_header_field": self._header_field_data,
                "on_header_value": self._header_value_data,
                "on_header_end": self._header_end,
                "on_headers_finished": self._headers_finished,
                "on_part_data": self._part_data,
                "on_part_end": self._part_end,
                "on_end": self._end,
            },
        )

    def write(self, chunk: bytes) -> None:
        self._total += len(chunk)
        if self._total > self.limits.max_total_bytes:
            raise _too_large("The request body", self.limits.max_total_bytes)
        try:
            self.parser.write(chunk)
        except MultipartParseError as exc:
            # The parser's own text is about its internals ("Expected boundary character 79,
            # got 66 at index 4"); the client is told what a valid body looks like.
            raise InvalidRequestError(
                "The multipart body could not be parsed: it must be multipart/form-data whose parts each start "
                "with '--' and the Content-Type's boundary, with CRLF line endings.",
                param=None,
            ) from exc

    def _part_begin(self) -> None:
        self._headers, self._file, self._text = {}, None, None

    def _header_field_data(self, data: bytes, start: int, end: int) -> None:
        self._header_field += data[start:end]

    def _header_value_data(self, data: bytes, start: int, end: int) -> None:
        self._header_value += data[start:end]

    def _header_end(self) -> None:
        # Latin-1 keeps every byte: parse_options_header encodes the value back to Latin-1
        # (a U+FFFD from a UTF-8 "replace" made it raise), and the name and filename are
        # decoded as UTF-8 from its bytes.
        self._headers[self._header_field.decode("latin-1").lower()] = self._header_value.decode("latin-1")
        self._header_field, self._header_value = b"", b""

    def _headers_finished(self) -> None:
        disposition, options = parse_options_header(self._headers.get("content-disposition", ""))
        name = options.get(b"name", b"").decode("utf-8", "replace")
        if disposition != b"form-data" or not name:
            raise InvalidRequestError("Every multipart part needs a Content-Disposition: form-data with a name.")
        self._name = name
        filename = options.get(b"filename")
        if filename is None:
            self._text = bytearray()
            return
        if len(self.upload.files) >= self.limits.max_files + 1:  # the images and a mask
            raise InvalidRequestError(
                f"Too many files: at most {self.limits.max_files} images and a mask.", param=name, code="too_many_images"
            )
        spool = tempfile.SpooledTemporaryFile(max_size=self.limits.spool_bytes)  # noqa: SIM115 - closed by Upload.close
        self._file = UploadedFile(
            field=name,
            filename=filename.decode("utf-8", "replace"),
            content_type=self._headers.get("content-type", ""),
            file=spool,  # type: ignore[arg-type]
        )
        self.upload.files.append(self._file)

    def _part_data(self, data: bytes, start: int, end: int) -> None:
        if self._file is not None:
            self._file.size += end - start
            if self._file.size > self.limits.max_file_bytes:
                raise _too_large(f"The file '{self._file.filename}' ({self._name})", self.limits.max_file_bytes)
            self._file.file.write(data[start:end])
        elif self._text is not None:
            self._text += data[start:end]
            if len(self._text) > TEXT_FIELD_BYTES:
                raise _too_large(f"The field '{self._name}'", TEXT_FIELD_BYTES)

    def _part_end(self) -> None:
        if self._text is not None:
            if self._name in self.upload.fields:
                raise InvalidRequestError(f"The field '{self._name}' was sent twice.", param=self._name)
            try:
                self.upload.fields[self._name] = self._text.decode("utf-8")
            except UnicodeDecodeError as exc:
                raise InvalidRequestError(f"The field '{self._name}' is not UTF-8 text.", param=self._name) from exc

    def _end(self) -> None:
        self.ended = True


async def read_upload(content_type: str, first: bytes, rest: AsyncIterator[bytes], limits: UploadLimits) -> Upload:
    """Reads a streamed body: ``first`` is the first message's data, ``rest`` the others.

    Raises a 400 for a body that is not multipart/form-data or JSON, that ends before its
    closing boundary, or that does not parse; a 413 as soon as a limit is crossed.
    """
    kind, options = parse_options_header(content_type)
    if kind == b"application/json":
        return Upload(json=await _read_json(first, rest, limits))
    if kind != b"multipart/form-data":
        raise InvalidRequestError(
            "This endpoint takes multipart/form-data (files) or application/json (image URLs); "
            f"the request's Content-Type was '{content_type or 'none'}'.",
            code="unsupported_content_type",
        )
    boundary = options.get(b"boundary")
    if not boundary:
        raise InvalidRequestError("The multipart/form-data Content-Type has no boundary.")
    if len(boundary) > MAX_BOUNDARY:
        raise InvalidRequestError(
            f"The multipart/form-data boundary is {len(boundary)} characters long; at most {MAX_BOUNDARY} are allowed."
        )
    reader = _MultipartReader(limits, boundary)
    try:
        # Parsing is Python-level work and large files go to disk: off the event loop.
        if first:
            await asyncio.to_thread(reader.write, first)
        async for chunk in rest:
            await asyncio.to_thread(reader.write, chunk)
        if not reader.ended:
            raise InvalidRequestError(
                "The upload ended before its closing multipart boundary: it was cut off. Send it again.",
                code="incomplete_upload",
            )
    except BaseException:
        reader.upload.close()
        raise
    return reader.upload


JSON_PARSE_ERROR = (
    "We could not parse the JSON body of your request. (HINT: This likely means you aren't using your HTTP "
    "library correctly. The API expects a JSON payload, but what was sent was not valid JSON.)"
)
_JSON_KINDS = {
    list: "an array", str: "a string", int: "a number", float: "a number", bool: "a boolean", type(None): "null",
}


async def _read_json(first: bytes, rest: AsyncIterator[bytes], limits: UploadLimits) -> dict[str, Any]:
    body = bytearray(first)
    async for chunk in rest:
        body += chunk
        if len(body) > limits.max_json_bytes:
            raise _too_large("The JSON body", limits.max_json_bytes)
    if len(body) > limits.max_json_bytes:
        raise _too_large("The JSON body", limits.max_json_bytes)
    # The same words and codes as the edge's check of generation bodies
    # (server/edge/openai_compat.lua), which refuses a byte-order mark as JSON does (RFC 8259).
    if body.startswith(b"\xef\xbb\xbf"):
        raise InvalidRequestError(JSON_PARSE_ERROR, code="invalid_json")
    try:
        parsed = await asyncio.to_thread(json.loads, bytes(body)) if len(body) > 256 * 1024 else json.loads(body)
    except (ValueError, UnicodeDecodeError) as exc:
        raise InvalidRequestError(JSON_PARSE_ERROR, code="invalid_json") from exc
    except RecursionError as exc:
        # json's C scanner stops at the interpreter's recursion limit (about 1000 levels).
        raise InvalidRequestError("The JSON body is nested too deeply to be read.") from exc
    if not isinstance(parsed, dict):
        raise InvalidRequestError(
            f"Invalid type for the request body: expected an object, but got {_JSON_KINDS[type(parsed)]} instead.",
            code="invalid_type",
        )
    return parsed


def decode_data_url(url: str, param: str) -> bytes:
    """The bytes of a ``data:`` URL (base64, as browsers and the SDKs write them)."""
    match = DATA_URL_RE.match(url)
    if match is None or not match.group("b64"):
        raise InvalidRequestError(f"Invalid '{param}': a data URL must be base64 (data:image/png;base64,...).", param=param)
    try:
        return pybase64.b64decode(url[match.end() :], validate=True)
    except ValueError as exc:
        raise InvalidRequestError(f"Invalid '{param}': the data URL is not valid base64.", param=param) from exc


def _inspect(source: BinaryIO) -> tuple[str, int, int, bool]:
    # Runs in a worker thread: header and structure only (no full pixel decode), as for
    # upstream answers; a PNG's chunk checksums are all verified.
    source.seek(0)
    with Image.open(source) as image:
        fmt = _PIL_FORMATS.get(image.format or "")
        if fmt is None:
            raise ValueError(f"unsupported format {image.format}")
        width, height = image.size
        has_alpha = image.mode in ("RGBA", "LA", "PA") or (image.mode == "P" and "transparency" in image.info)
        if fmt == "png":
            image.verify()
    return fmt, width, height, has_alpha


async def inspect_image(
    source: BinaryIO, *, size: int, param: str, max_pixels: int, filename: str = ""
) -> InputImage:
    """An ``InputImage`` for ``source`` when it is a whole PNG, JPEG or WebP image of at
    most ``max_pixels``; a 400 naming ``param`` otherwise."""
    too_many = InvalidRequestError(
        f"Invalid '{param}': {filename or 'the image'} has more than {max_pixels} pixels, the server's limit.",
        param=param,
        code="invalid_image",
    )
    try:
        fmt, width, height, has_alpha = await asyncio.to_thread(_inspect, source)
    except Image.DecompressionBombError as exc:  # Pillow's own limit, far above ours
        raise too_many from exc
    except (OSError, ValueError, SyntaxError, UnidentifiedImageError) as exc:
        raise InvalidRequestError(
            f"Invalid '{param}': {filename or 'the file'} is not a PNG, JPEG or WebP image, or it is corrupt.",
            param=param,
            code="invalid_image",
        ) from exc
    if width * height > max_pixels:
        # Only the header was read: the pixels are never decoded.
        raise too_many
    return InputImage(source, size=size, format=fmt, width=width, height=height, has_alpha=has_alpha, filename=filename)


def in_memory(data: bytes) -> BinaryIO:
    """A readable, seekable source for bytes that are already in memory (gRPC, data URLs)."""
    return io.BytesIO(data)


def typed_field(fields: Mapping[str, str], name: str, kind: type) -> Any:
    """A multipart text field as the type OpenAI's JSON would carry (None when absent)."""
    value = fields.get(name)
    if value is None:
        return None
    if kind is str:
        return value
    if kind is bool:
        lowered = value.strip().lower()
        if lowered in ("true", "1"):
            return True
        if lowered in ("false", "0"):
            return False
        raise InvalidRequestError(
            f"Invalid type for '{name}': expected a boolean, but got a string instead.", param=name, code="invalid_type"
        )
    try:
        # JSON's integers only: int() alone also takes "1_0" (10) and non-ASCII digits.
        if INTEGER_RE.fullmatch(value.strip()):
            return int(value.strip())
    except ValueError:  # more digits than int() converts
        pass
    raise InvalidRequestError(
        f"Invalid type for '{name}': expected an integer, but got a string instead.", param=name, code="invalid_type"
    )

