"""obstore against aiobotocore as the S3 client of the image store (issue 12, part 1).

    .venv/bin/python -m bench.store_clients [--count 40] [--concurrency 8]

Starts moto's S3 server on 127.0.0.1 (tests/fakes/s3.py), then measures each client in a
fresh child process of its own, so neither's imports, threads or caches touch the other's
figures. In each child: the import (wall and CPU), one client, a warm-up of 3 puts and
gets, then ``count`` puts of the bench's 1.5 MB PNG (bench/images.py) and ``count`` gets
of them, first one at a time, then ``concurrency`` at once; every get is checked byte for
byte. CPU is the child's whole process (every thread: obstore's Rust runtime, aiohttp's
loop) from ``time.process_time()``; moto runs in its own process and is not counted, so
wall time mostly measures moto. Dependencies: every distribution each client pulls in
(its requirement closure, without extras) and their installed size, read from the
installed metadata. Prints a markdown table; the figures of one run are in bench/README.md.
"""

from __future__ import annotations

import argparse
import asyncio
import json
import re
import subprocess
import sys
import time
from importlib import metadata
from pathlib import Path
from typing import Any

CLIENTS = ("obstore", "aiobotocore")
BUCKET = "bench"


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m bench.store_clients", description=__doc__.split("\n")[0])
    parser.add_argument("--count", type=int, default=40)
    parser.add_argument("--concurrency", type=int, default=8)
    parser.add_argument("--child", choices=CLIENTS, help=argparse.SUPPRESS)
    parser.add_argument("--endpoint", help=argparse.SUPPRESS)
    args = parser.parse_args(argv)
    if args.child:
        print(json.dumps(asyncio.run(_measure(args.child, args.endpoint, args.count, args.concurrency))))
        return 0
    from tests.fakes.s3 import running_s3

    results = {}
    with running_s3() as s3:
        s3.create_bucket(BUCKET)
        for client in CLIENTS:
            child = subprocess.run(
                [sys.executable, "-m", "bench.store_clients", "--child", client, "--endpoint", s3.endpoint,
                 "--count", str(args.count), "--concurrency", str(args.concurrency)],
                env={"PATH": "/usr/bin:/bin", **s3.env}, capture_output=True, text=True, timeout=600, check=False,
                cwd=Path(__file__).resolve().parent.parent,
            )
            if child.returncode:
                raise SystemExit(f"{client} failed:\n{child.stderr[-3000:]}")
            results[client] = json.loads(child.stdout.splitlines()[-1]) | _dependencies(client)
    print(_table(results, args.count, args.concurrency))
    return 0


async def _measure(client: str, endpoint: str, count: int, concurrency: int) -> dict[str, Any]:
    from bench.images import image_bytes

    data = image_bytes("large")
    wall, cpu = time.perf_counter(), time.process_time()
    put, get, close = await (_obstore if client == "obstore" else _aiobotocore)(endpoint)
    figures: dict[str, Any] = {"import_ms": (time.perf_counter() - wall) * 1e3, "import_cpu_ms": (time.process_time() - cpu) * 1e3}
    for i in range(3):
        await put(f"warm-{i}", data)
        assert await get(f"warm-{i}") == data

    async def timed(name: str, work: Any, keys: list[str], width: int) -> None:
        gate = asyncio.Semaphore(width)

        async def one(key: str) -> None:
            async with gate:
                await work(key)

        wall, cpu = time.perf_counter(), time.process_time()
        await asyncio.gather(*(one(key) for key in keys))
        figures[f"{name}_cpu_ms"] = (time.process_time() - cpu) * 1e3 / len(keys)
        figures[f"{name}_wall_ms"] = (time.perf_counter() - wall) * 1e3 / len(keys)

    async def check(key: str) -> None:
        if await get(key) != data:
            raise AssertionError(f"{client}: {key} came back different")

    for width in (1, concurrency):
        keys = [f"img-{width}-{i}.png" for i in range(count)]
        await timed(f"put_c{width}", lambda key: put(key, data), keys, width)
        await timed(f"get_c{width}", check, keys, width)
    await close()
    status = Path("/proc/self/status").read_text()  # noqa: ASYNC240 - after the measurement
    figures["rss_mib"] = int(re.search(r"VmRSS:\s+(\d+)", status).group(1)) / 1024  # type: ignore[union-attr]
    figures["version"] = metadata.version(client)
    return figures


async def _obstore(endpoint: str) -> Any:
    import obstore
    from obstore.store import S3Store

    store = S3Store(BUCKET, client_options={"allow_http": True})  # the rest from AWS_* variables

    async def put(key: str, data: bytes) -> None:
        await obstore.put_async(store, key, data)

    async def get(key: str) -> bytes:
        return (await (await obstore.get_async(store, key)).bytes_async()).to_bytes()

    async def close() -> None:
        return None

    return put, get, close


async def _aiobotocore(endpoint: str) -> Any:
    from aiobotocore.session import get_session

    context = get_session().create_client("s3")  # endpoint, region and keys from AWS_* variables
    client = await context.__aenter__()

    async def put(key: str, data: bytes) -> None:
        await client.put_object(Bucket=BUCKET, Key=key, Body=data, ContentType="image/png")

    async def get(key: str) -> bytes:
        answer = await client.get_object(Bucket=BUCKET, Key=key)
        async with answer["Body"] as body:
            return bytes(await body.read())

    async def close() -> None:
        await context.__aexit__(None, None, None)

    return put, get, close


def _dependencies(name: str) -> dict[str, Any]:
    """The distributions ``name`` pulls in (itself included) and their installed bytes."""
    seen: dict[str, metadata.Distribution] = {}
    todo = [name]
    while todo:
        current = re.split(r"[ ;<>=!~\[(]", todo.pop(), maxsplit=1)[0].lower().replace("_", "-")
        if current in seen:
            continue
        try:
            dist = metadata.distribution(current)
        except metadata.PackageNotFoundError:
            continue  # an optional or platform-specific requirement that is not installed
        seen[current] = dist
        todo += [req for req in dist.requires or [] if "extra ==" not in req and "python_version <" not in req]
    size = sum(
        (file.size or 0) for dist in seen.values() for file in (dist.files or []) if file.size is not None
    )
    return {"dists": sorted(seen), "installed_mib": size / 2**20}


def _table(results: dict[str, dict[str, Any]], count: int, concurrency: int) -> str:
    rows = [
        "| client | put CPU ms (c=1) | get CPU ms (c=1) | put CPU ms "
        f"(c={concurrency}) | get CPU ms (c={concurrency}) | put wall ms (c=1) | get wall ms (c=1) | import ms (CPU) "
        "| RSS after MiB | distributions pulled in | installed MiB |",
        "|---|--:|--:|--:|--:|--:|--:|--:|--:|---|--:|",
    ]
    for client, r in results.items():
        rows.append(
            f"| {client} {r['version']} | {r['put_c1_cpu_ms']:.2f} | {r['get_c1_cpu_ms']:.2f} "
            f"| {r[f'put_c{concurrency}_cpu_ms']:.2f} | {r[f'get_c{concurrency}_cpu_ms']:.2f} "
            f"| {r['put_c1_wall_ms']:.1f} | {r['get_c1_wall_ms']:.1f} | {r['import_ms']:.0f} ({r['import_cpu_ms']:.0f}) "
            f"| {r['rss_mib']:.0f} | {len(r['dists'])}: {', '.join(r['dists'])} | {r['installed_mib']:.1f} |"
        )
    return f"{count} puts and gets of a 1,481,124-byte PNG against moto's S3 server, per operation:\n\n" + "\n".join(rows)


if __name__ == "__main__":
    sys.exit(main())
