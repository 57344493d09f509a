"""OpenAI's REST answers, written by the server: the JSON body and the Server-Sent Events.

The REST surface (``GenerateImagesHttp``, ``EditImagesHttp``, ...) answers with
``google.api.HttpBody`` messages whose bytes are exactly what OpenAI sends; Envoy passes
them on untouched, which costs it a third of transcoding a typed ``bytes`` answer
(bench/README.md, "Answer path"). The server's side of that bargain is to build each
answer with as few whole-size copies as possible: a 1.5 MB image becomes one base64
buffer, and the message is framed here, serialized, in one join of small pieces around
it (``frame``), which gRPC sends as is (these RPCs are registered without a serializer).
Every extra copy of a 2 MB buffer is a fresh mapping and ~500 page faults with this
process's malloc settings (server/allocator.py): the first version of this module made
seven and cost the gateway more than Envoy's transcoding saved.

The JSON has the key order and spelling Envoy's transcoder printed before (proto field
order, optional fields only when set, every usage counter), so clients see no change.
Events follow OpenAI's stream: an ``event:`` line and a ``data:`` line, then a blank
line; a failure after the first event is a last ``error`` event (the openai SDKs raise
``APIError`` on it; a bare end of stream would look like success to them).
"""

from __future__ import annotations

import json
from collections.abc import Sequence

import pybase64
from imagegw.v1 import images_pb2

from server.errors import ApiError

__all__ = [
    "JSON",
    "KEEPALIVE",
    "SSE",
    "error_event",
    "event_json",
    "frame",
    "images_response",
    "images_response_json",
    "keepalive",
    "sse_event",
]

JSON = "application/json"
SSE = "text/event-stream"
# An SSE comment: clients ignore it, and every proxy on the way sees traffic.
KEEPALIVE = b": keepalive\n\n"


def _string(value: str) -> bytes:
    return json.dumps(value, ensure_ascii=False).encode()


def _varint(value: int) -> bytes:
    out = bytearray()
    while value > 0x7F:
        out.append((value & 0x7F) | 0x80)
        value >>= 7
    out.append(value)
    return bytes(out)


def frame(content_type: str, pieces: Sequence[bytes]) -> bytes:
    """A serialized ``google.api.HttpBody`` (field 1 ``content_type``, field 2 ``data``)
    whose data is ``pieces`` joined: the one copy of the answer that goes to gRPC."""
    kind = content_type.encode()
    size = sum(len(piece) for piece in pieces)
    return b"".join((b"\x0a", _varint(len(kind)), kind, b"\x12", _varint(size), *pieces))


def _usage(usage: images_pb2.Usage, *, chat_counters: bool) -> bytes:
    inputs, outputs = usage.input_tokens_details, usage.output_tokens_details
    details = (
        b'"input_tokens_details":{"text_tokens":%d,"image_tokens":%d},'
        b'"output_tokens_details":{"image_tokens":%d,"text_tokens":%d}'
        % (inputs.text_tokens, inputs.image_tokens, outputs.image_tokens, outputs.text_tokens)
    )
    if chat_counters:
        head = b'"prompt_tokens":%d,"completion_tokens":%d,"total_tokens":%d,"input_tokens":%d,"output_tokens":%d,' % (
            usage.prompt_tokens,
            usage.completion_tokens,
            usage.total_tokens,
            usage.input_tokens,
            usage.output_tokens,
        )
    else:
        head = b'"total_tokens":%d,"input_tokens":%d,"output_tokens":%d,' % (
            usage.total_tokens,
            usage.input_tokens,
            usage.output_tokens,
        )
    return b"{" + head + details + b"}"


def _images_response_pieces(
    response: images_pb2.GenerateImagesResponse, images: Sequence[bytes | None] | None = None
) -> list[bytes]:
    pieces = [b'{"created":%d,"data":[' % response.created]
    for index, image in enumerate(response.data):
        pieces.append(b",{" if index else b"{")
        separator = b""
        if image.HasField("url"):
            pieces += [b'"url":', _string(image.url)]
            separator = b","
        data = images[index] if images is not None else (image.b64_json if image.HasField("b64_json") else None)
        if data is not None:
            # The large piece: one base64 buffer, never copied again before the frame.
            pieces += [separator, b'"b64_json":"', pybase64.b64encode(data), b'"']
            separator = b","
        if image.HasField("revised_prompt"):
            pieces += [separator, b'"revised_prompt":', _string(image.revised_prompt)]
        pieces.append(b"}")
    pieces.append(b"]")
    for name in ("background", "output_format", "size", "quality"):
        if response.HasField(name):
            pieces.append(b',"%s":' % name.encode() + _string(getattr(response, name)))
    pieces.append(b',"usage":' + _usage(response.usage, chat_counters=True) + b"}")
    return pieces


def images_response(
    response: images_pb2.GenerateImagesResponse, images: Sequence[bytes | None] | None = None
) -> bytes:
    """OpenAI's ImagesResponse for ``response``, as a serialized HttpBody (``frame``).
    ``images``: each image's bytes, for a message built without them (the server's own
    answers: copying 1.5 MB into the message and out again cost more than the rest of
    the rendering); None takes them from the message (replays)."""
    return frame(JSON, _images_response_pieces(response, images))


def images_response_json(response: images_pb2.GenerateImagesResponse) -> bytes:
    """OpenAI's ImagesResponse for ``response``: the JSON alone."""
    return b"".join(_images_response_pieces(response))


def _event_pieces(event: images_pb2.ImageGenerationEvent, prefix: str) -> list[bytes]:
    kind = event.type.rpartition(".")[2]
    pieces = [
        b'{"type":' + _string(f"{prefix}.{kind}") + b',"b64_json":"',
        pybase64.b64encode(event.b64_json),
        b'","created_at":%d,"size":' % event.created_at
        + _string(event.size)
        + b',"quality":'
        + _string(event.quality)
        + b',"background":'
        + _string(event.background)
        + b',"output_format":'
        + _string(event.output_format),
    ]
    if event.HasField("partial_image_index"):
        pieces.append(b',"partial_image_index":%d}' % event.partial_image_index)
    else:
        pieces.append(b',"usage":' + _usage(event.usage, chat_counters=False) + b"}")
    return pieces


def event_json(event: images_pb2.ImageGenerationEvent, *, prefix: str = "image_generation") -> bytes:
    """The ``data:`` JSON of one stream event (``prefix`` is ``image_edit`` for edits)."""
    return b"".join(_event_pieces(event, prefix))


def sse_event(event: images_pb2.ImageGenerationEvent, *, prefix: str = "image_generation") -> bytes:
    """One event as OpenAI sends it (``event: <type>``, ``data: <json>``, a blank line), as a
    serialized HttpBody (``frame``)."""
    kind = event.type.rpartition(".")[2]
    head = b"event: %s.%s\ndata: " % (prefix.encode(), kind.encode())
    return frame(SSE, [head, *_event_pieces(event, prefix), b"\n\n"])


def keepalive() -> bytes:
    """An SSE comment, as a serialized HttpBody: clients ignore it, proxies see traffic."""
    return frame(SSE, [KEEPALIVE])


def error_event(error: ApiError) -> bytes:
    """The last event of a stream that failed after its first event, as a serialized HttpBody."""
    body = {"type": "error", **error.openai_body()}
    return frame(SSE, [b"event: error\ndata: ", json.dumps(body, separators=(",", ":")).encode(), b"\n\n"])
