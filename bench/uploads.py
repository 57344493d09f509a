"""``python -m bench.uploads``: edits' uploads through Envoy and the server (issue 11).

One ``imagegw serve`` (SQLite, local-1) behind its Envoy, as ``make run`` starts them, and
three measurements, each printed as a row:

* **upload only**: sixteen requests at once, each with sixteen ~4 MB PNGs (1 GiB in all),
  that the server refuses after reading and checking every image (an ``input_fidelity``
  local-1 does not take): the throughput of the upload path itself (Envoy streaming the
  body, the server parsing it and spooling the files, the image checks);
* **edit**: the same uploads edited by local-1 (``size`` 256x256): throughput with the work;
* **last byte to first event**: one streamed edit (``partial_images: 1``) with one and with
  sixteen images, the time from the client's last body byte to the first SSE event.

For each concurrent row: wall time, MB/s of request bodies, gateway CPU (server + Envoy,
from /proc) per upload, and each process's peak RSS above its size before the row (VmHWM
after a reset). Everything listens on 127.0.0.1; the stack stops on exit.
"""

from __future__ import annotations

import argparse
import asyncio
import io
import random
import secrets
import tempfile
import time
from collections.abc import AsyncIterator
from pathlib import Path

import httpx
from PIL import Image

from bench.procs import cpu_seconds, peak_rss_kib, reset_peak_rss, rss_kib
from tests.stack import ProcessStack, process_stack

MIB = 1024 * 1024


def noise_png(index: int, side: int = 1184) -> bytes:
    """About 4 MB of PNG that deflate cannot shrink."""
    rng = random.Random(index)
    image = Image.frombytes("RGB", (side, side), rng.randbytes(side * side * 3))
    out = io.BytesIO()
    image.save(out, format="PNG", compress_level=1)
    return out.getvalue()


def multipart(images: list[bytes], fields: dict[str, str]) -> tuple[bytes, str]:
    boundary = "bench" + secrets.token_hex(8)
    parts = [f'--{boundary}\r\nContent-Disposition: form-data; name="{k}"\r\n\r\n{v}\r\n'.encode() for k, v in fields.items()]
    for index, data in enumerate(images):
        head = f'--{boundary}\r\nContent-Disposition: form-data; name="image[]"; filename="{index}.png"\r\n'
        parts.append(f"{head}Content-Type: image/png\r\n\r\n".encode() + data + b"\r\n")
    parts.append(f"--{boundary}--\r\n".encode())
    return b"".join(parts), f"multipart/form-data; boundary={boundary}"


async def concurrent_row(
    stack: ProcessStack, key: str, name: str, images: list[bytes], fields: dict[str, str], expect: int, concurrency: int
) -> dict[str, object]:
    body, content_type = multipart(images, {"model": "local-1", "prompt": "a harbour", **fields})
    pids = [stack.servers[0].pid, stack.envoy.pid]
    for pid in pids:
        reset_peak_rss(pid)
    base = {pid: rss_kib(pid) for pid in pids}
    cpu_before = cpu_seconds(pids)
    started = time.perf_counter()
    async with httpx.AsyncClient(timeout=600) as http:
        responses = await asyncio.gather(*(
            http.post(f"{stack.api_base}/images/edits", content=body,
                      headers={"authorization": f"Bearer {key}", "content-type": content_type})
            for _ in range(concurrency)
        ))
    wall = time.perf_counter() - started
    cpu = cpu_seconds(pids) - cpu_before
    statuses = sorted({r.status_code for r in responses})
    assert statuses == [expect], (name, statuses, responses[0].text[:300])
    total = len(body) * concurrency
    return {
        "row": name,
        "uploads": concurrency,
        "MB uploaded": round(total / 1e6),
        "wall s": round(wall, 2),
        "MB/s": round(total / 1e6 / wall, 1),
        "gateway CPU ms/upload": round(cpu * 1000 / concurrency, 1),
        "server peak RSS +MiB": round((peak_rss_kib(pids[0]) - base[pids[0]]) / 1024),
        "Envoy peak RSS +MiB": round((peak_rss_kib(pids[1]) - base[pids[1]]) / 1024),
    }


async def first_event_after_last_byte(stack: ProcessStack, key: str, images: list[bytes]) -> float:
    body, content_type = multipart(
        images, {"model": "local-1", "prompt": "a harbour", "size": "256x256", "stream": "true", "partial_images": "1"}
    )
    sent_last = 0.0

    async def chunks() -> AsyncIterator[bytes]:
        nonlocal sent_last
        for start in range(0, len(body), 256 * 1024):
            yield body[start : start + 256 * 1024]
        sent_last = time.perf_counter()

    async with httpx.AsyncClient(timeout=600) as http:
        async with http.stream(
            "POST", f"{stack.api_base}/images/edits", content=chunks(),
            headers={"authorization": f"Bearer {key}", "content-type": content_type},
        ) as response:
            assert response.status_code == 200, await response.aread()
            async for line in response.aiter_lines():
                if line.startswith("data: "):
                    return (time.perf_counter() - sent_last) * 1000
    raise AssertionError("no event")


async def main(concurrency: int, repeats: int) -> None:
    images = [noise_png(i) for i in range(16)]
    with tempfile.TemporaryDirectory() as tmp:
        async with process_stack(Path(tmp) / "var", render_workers=2) as stack:
            _, key = await stack.admin.funded_key("100.00")
            rows = []
            for _ in range(repeats):
                rows.append(await concurrent_row(stack, key, "upload only (refused after the checks)", images,
                                                 {"input_fidelity": "high"}, 400, concurrency))
                rows.append(await concurrent_row(stack, key, "edit (local-1, 256x256)", images,
                                                 {"size": "256x256", "response_format": "b64_json"}, 200, concurrency))
            columns = list(rows[0])
            print("| " + " | ".join(columns) + " |")  # noqa: T201
            print("|" + "---|" * len(columns))  # noqa: T201
            for row in rows:
                print("| " + " | ".join(str(row[c]) for c in columns) + " |")  # noqa: T201
            for count in (1, 16):
                times = sorted([await first_event_after_last_byte(stack, key, images[:count]) for _ in range(5)])
                print(f"last uploaded byte to first event, {count} image(s) of ~4 MB, streamed local-1 edit: "  # noqa: T201
                      f"median {times[2]:.0f} ms (min {times[0]:.0f}, max {times[-1]:.0f}; 5 runs)")


def cli() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--concurrency", type=int, default=16)
    parser.add_argument("--repeats", type=int, default=2)
    args = parser.parse_args()
    asyncio.run(main(args.concurrency, args.repeats))


if __name__ == "__main__":
    cli()
