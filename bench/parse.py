"""What parsing an upstream answer costs: ``json.loads`` and an isinstance ladder (the
OpenAI adapter's code before it parsed into typed models) against pydantic's
``model_validate_json`` into ``server.providers.openai.ImagesAnswer``.

    .venv/bin/python -m bench.parse

Each answer is a GPT image answer (``data[].b64_json``, ``usage``, size/quality/...) with
incompressible image bytes, so the base64 text is as long as a real one of that size. For
each way and answer size it prints the median time of the parse alone (the image decode
that follows is the same in both), and the peak memory the parse allocates
(``tracemalloc``), which counts every copy of the base64 text. Not part of ``make bench``:
a few seconds, one core.
"""

from __future__ import annotations

import base64
import gc
import json
import os
import statistics
import time
import tracemalloc
from collections.abc import Callable
from typing import Any

from server.providers.openai import ImagesAnswer

# Answers of about 1.5 MB (one 1.1 MB image) and 6 MB (four), as gpt-image-1 sends them.
SIZES = {"1.5 MB, n=1": (1, 1_100_000), "6 MB, n=4": (4, 1_100_000)}


def answer(n: int, image_bytes: int) -> bytes:
    data = [{"b64_json": base64.b64encode(os.urandom(image_bytes)).decode()} for _ in range(n)]
    usage = {"input_tokens": 6, "input_tokens_details": {"image_tokens": 0, "text_tokens": 6},
             "output_tokens": 1056 * n, "output_tokens_details": {"image_tokens": 1056 * n, "text_tokens": 0},
             "total_tokens": 6 + 1056 * n}
    return json.dumps({"created": 1767225600, "data": data, "background": "opaque", "output_format": "png",
                       "quality": "medium", "size": "1024x1024", "usage": usage}).encode()


def _count(value: object) -> int:
    return value if isinstance(value, int) and not isinstance(value, bool) and value >= 0 else 0


def ladder(body: bytes) -> list[str]:
    """The adapter's former parse: json.loads, then checks by isinstance."""
    payload: Any = json.loads(body)
    assert isinstance(payload, dict)
    data = payload.get("data")
    assert isinstance(data, list)
    texts = []
    for item in data:
        assert isinstance(item, dict)
        texts.append(item.pop("b64_json"))
    usage = payload.get("usage")
    if isinstance(usage, dict):
        details = usage.get("output_tokens_details")
        _count(details.get("image_tokens") if isinstance(details, dict) else usage.get("output_tokens"))
    return texts


def typed(body: bytes) -> list[str]:
    """The adapter's parse now: straight into the typed model."""
    parsed = ImagesAnswer.model_validate_json(body)
    if parsed.usage is not None:
        parsed.usage.tokens()
    return [item.b64_json for item in parsed.data if item.b64_json is not None]


def measure(parse: Callable[[bytes], list[str]], body: bytes, rounds: int = 60) -> tuple[float, float]:
    """(median milliseconds, peak MB allocated by one parse)."""
    times = []
    for _ in range(rounds):
        started = time.perf_counter()
        parse(body)
        times.append(time.perf_counter() - started)
    gc.collect()
    tracemalloc.start()
    kept = parse(body)
    _, peak = tracemalloc.get_traced_memory()
    tracemalloc.stop()
    del kept
    return statistics.median(times) * 1000, peak / 1e6


def main() -> None:
    print("| answer | parse | median ms | peak MB allocated |")  # noqa: T201
    print("|---|---|---|---|")  # noqa: T201
    for label, (n, size) in SIZES.items():
        body = answer(n, size)
        assert ladder(body) == typed(body)
        for name, parse in (("json.loads + isinstance", ladder), ("pydantic model_validate_json", typed)):
            ms, peak = measure(parse, body)
            print(f"| {label} ({len(body) / 1e6:.2f} MB) | {name} | {ms:.2f} | {peak:.2f} |")  # noqa: T201


if __name__ == "__main__":
    main()
