"""OpenAI's REST answers, written by the server: the JSON body and the Server-Sent Events.

The REST surface (``GenerateImagesHttp``) answers with ``google.api.HttpBody`` messages
whose bytes are exactly what OpenAI sends; Envoy passes them on untouched. This is the
answer path the benchmark chose (bench/README.md, "Answer path"): a transcoded ``bytes``
field costs Envoy about three times as much CPU per large answer (it base64-encodes on
its side), a ``string`` field about fifteen times. Here base64 is one SIMD call and the
JSON around it is a few small strings.

The JSON has the key order and spelling Envoy's transcoder printed before (proto field
order, optional fields only when set, every usage counter), so clients see no change.
Events follow OpenAI's stream: an ``event:`` line and a ``data:`` line, then a blank
line; a failure after the first event is a last ``error`` event (the openai SDKs raise
``APIError`` on it; a bare end of stream would look like success to them).
"""

from __future__ import annotations

import json

import pybase64
from imagegw.v1 import images_pb2

from server.errors import ApiError

__all__ = [
    "JSON",
    "KEEPALIVE",
    "SSE",
    "error_event",
    "event_json",
    "images_response_json",
    "sse_event",
]

JSON = "application/json"
SSE = "text/event-stream"
# An SSE comment: clients ignore it, and every proxy on the way sees traffic.
KEEPALIVE = b": keepalive\n\n"


def _string(value: str) -> bytes:
    return json.dumps(value, ensure_ascii=False).encode()


def _b64(data: bytes) -> bytes:
    return b'"' + pybase64.b64encode(data) + b'"'


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


def images_response_json(response: images_pb2.GenerateImagesResponse) -> bytes:
    """OpenAI's ImagesResponse for ``response``."""
    parts = [b'{"created":%d,"data":[' % response.created]
    for index, image in enumerate(response.data):
        fields = []
        if image.HasField("url"):
            fields.append(b'"url":' + _string(image.url))
        if image.HasField("b64_json"):
            fields.append(b'"b64_json":' + _b64(image.b64_json))
        if image.HasField("revised_prompt"):
            fields.append(b'"revised_prompt":' + _string(image.revised_prompt))
        parts.append((b"," if index else b"") + b"{" + b",".join(fields) + b"}")
    parts.append(b"]")
    for name in ("background", "output_format", "size", "quality"):
        if response.HasField(name):
            parts.append(b',"%s":' % name.encode() + _string(getattr(response, name)))
    parts.append(b',"usage":' + _usage(response.usage, chat_counters=True) + b"}")
    return b"".join(parts)


def event_json(event: images_pb2.ImageGenerationEvent, *, prefix: str = "image_generation") -> bytes:
    """The ``data:`` JSON of one stream event (``prefix`` is ``image_edit`` for edits)."""
    kind = event.type.rpartition(".")[2]
    parts = [
        b'{"type":' + _string(f"{prefix}.{kind}"),
        b'"b64_json":' + _b64(event.b64_json),
        b'"created_at":%d' % event.created_at,
        b'"size":' + _string(event.size),
        b'"quality":' + _string(event.quality),
        b'"background":' + _string(event.background),
        b'"output_format":' + _string(event.output_format),
    ]
    if event.HasField("partial_image_index"):
        parts.append(b'"partial_image_index":%d' % event.partial_image_index)
    else:
        parts.append(b'"usage":' + _usage(event.usage, chat_counters=False))
    return b",".join(parts) + b"}"


def sse_event(event: images_pb2.ImageGenerationEvent, *, prefix: str = "image_generation") -> bytes:
    """One event as OpenAI sends it: ``event: <type>``, ``data: <json>``, a blank line."""
    kind = event.type.rpartition(".")[2]
    return b"event: %s.%s\ndata: " % (prefix.encode(), kind.encode()) + event_json(event, prefix=prefix) + b"\n\n"


def error_event(error: ApiError) -> bytes:
    """The last event of a stream that failed after its first event."""
    body = {"type": "error", **error.openai_body()}
    return b"event: error\ndata: " + json.dumps(body, separators=(",", ":")).encode() + b"\n\n"
