"""The answer-path echo server: one prebuilt answer in the three shapes of answer_echo.proto.

    python -m bench.answer_echo --port P --gen DIR --answer FILE

``DIR`` holds the Python module compiled from ``bench/answer_echo.proto`` at bench time
(``bench.answer_paths``); ``FILE`` is a serialised ``imagegw.v1.GenerateImagesResponse``:
the real server's answer to the bench request, so every shape carries the same image,
created time and usage, and Envoy prints the same bytes for each. Every message is built
once at start-up and gRPC serialises it per call: the process does the least any server
could, so what differs between the shapes is Envoy's work. The (c) shape is rendered by
imagegw's own ``server.api.rest``. Same malloc settings as ``imagegw serve``.
"""

from __future__ import annotations

import argparse
import asyncio
import importlib
import signal
import sys
from collections.abc import AsyncIterator
from pathlib import Path
from typing import Any, Literal

import grpc
import pybase64
from google.api import httpbody_pb2
from grpc_health.v1 import health, health_pb2, health_pb2_grpc
from imagegw.v1 import images_pb2

from server.allocator import tune_malloc
from server.api import rest

__all__ = ["SERVICE", "main", "text_answer"]

SERVICE = "imagegw_bench.v1.AnswerEcho"
_FIELDS: tuple[Literal["background", "output_format", "size", "quality"], ...] = (
    "background",
    "output_format",
    "size",
    "quality",
)


def text_answer(answer: images_pb2.GenerateImagesResponse, echo_pb2: Any) -> Any:
    """``answer`` as a ``TextImagesResponse``: each image as its standard base64 text."""
    text = echo_pb2.TextImagesResponse(created=answer.created, usage=answer.usage)
    for name in _FIELDS:
        if answer.HasField(name):
            setattr(text, name, getattr(answer, name))
    for image in answer.data:
        item = text.data.add()
        if image.HasField("url"):
            item.url = image.url
        if image.HasField("b64_json"):
            item.b64_json = pybase64.b64encode(image.b64_json).decode("ascii")
        if image.HasField("revised_prompt"):
            item.revised_prompt = image.revised_prompt
    return text


def _handlers(answer: images_pb2.GenerateImagesResponse, echo_pb2: Any) -> grpc.GenericRpcHandler:
    text = text_answer(answer, echo_pb2)
    body = httpbody_pb2.HttpBody(content_type=rest.JSON, data=rest.images_response_json(answer))

    async def typed(request: images_pb2.GenerateImagesRequest, context: grpc.aio.ServicerContext) -> Any:
        return answer

    async def as_text(request: images_pb2.GenerateImagesRequest, context: grpc.aio.ServicerContext) -> Any:
        return text

    async def http(
        request: images_pb2.GenerateImagesRequest, context: grpc.aio.ServicerContext
    ) -> AsyncIterator[httpbody_pb2.HttpBody]:
        yield body

    parse = images_pb2.GenerateImagesRequest.FromString
    return grpc.method_handlers_generic_handler(
        SERVICE,
        {
            "Bytes": grpc.unary_unary_rpc_method_handler(
                typed,
                request_deserializer=parse,
                response_serializer=images_pb2.GenerateImagesResponse.SerializeToString,
            ),
            "Text": grpc.unary_unary_rpc_method_handler(
                as_text, request_deserializer=parse, response_serializer=echo_pb2.TextImagesResponse.SerializeToString
            ),
            "Http": grpc.unary_stream_rpc_method_handler(
                http, request_deserializer=parse, response_serializer=httpbody_pb2.HttpBody.SerializeToString
            ),
        },
    )


async def serve(port: int, answer: images_pb2.GenerateImagesResponse, echo_pb2: Any) -> None:
    server = grpc.aio.server(
        options=[
            ("grpc.max_send_message_length", 256 * 1024 * 1024),
            ("grpc.max_receive_message_length", 8 * 1024 * 1024),
            ("grpc.so_reuseport", 0),
        ]
    )
    server.add_generic_rpc_handlers((_handlers(answer, echo_pb2),))
    checks = health.aio.HealthServicer()
    health_pb2_grpc.add_HealthServicer_to_server(checks, server)
    server.add_insecure_port(f"127.0.0.1:{port}")
    await server.start()
    for name in ("", SERVICE):
        await checks.set(name, health_pb2.HealthCheckResponse.SERVING)
    stop = asyncio.Event()
    loop = asyncio.get_running_loop()
    for signum in (signal.SIGTERM, signal.SIGINT):
        loop.add_signal_handler(signum, stop.set)
    print(f"answer echo on 127.0.0.1:{port}", flush=True)
    await stop.wait()
    await server.stop(0)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m bench.answer_echo", description=__doc__.splitlines()[0])
    parser.add_argument("--port", type=int, required=True)
    parser.add_argument("--gen", type=Path, required=True, help="where answer_echo_pb2 was compiled")
    parser.add_argument("--answer", type=Path, required=True, help="a serialised imagegw.v1.GenerateImagesResponse")
    args = parser.parse_args(argv)
    tune_malloc()  # before gRPC starts its threads, as `imagegw serve` does
    sys.path.insert(0, str(args.gen))
    echo_pb2 = importlib.import_module("answer_echo_pb2")
    answer = images_pb2.GenerateImagesResponse.FromString(args.answer.read_bytes())
    asyncio.run(serve(args.port, answer, echo_pb2))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
