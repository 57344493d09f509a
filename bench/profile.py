"""py-spy on the imagegw server during one step, summarised as text (and a flame graph).

py-spy samples every thread of the server 100 times a second (``--native`` adds the C
frames of extensions such as Pillow, zlib, grpc and the interpreter; ``--threads`` tags
each stack with its thread, so the event loop thread and the ``to_thread`` workers can
be told apart). Only threads that are running are sampled (idle ones are left out), so
the percentages below are shares of the server's CPU samples, not of wall time.

The raw file is Brendan Gregg's collapsed-stack format (``frame;frame;... count``): open
it in https://www.speedscope.app or flamegraph.pl; ``profile.svg`` is a small flame graph
drawn here without extra tools.
"""

from __future__ import annotations

import html
import re
import shutil
import subprocess
import sys
from collections import defaultdict
from pathlib import Path
from typing import Any

from bench.procs import with_parent_death

__all__ = ["CATEGORIES", "finish", "flamegraph", "py_spy", "start", "summarise"]

_LINE = re.compile(r":\d+\)$")


def py_spy() -> str | None:
    beside = Path(sys.executable).with_name("py-spy")
    return str(beside) if beside.exists() else shutil.which("py-spy")


def start(
    pid: int,
    out: Path,
    *,
    duration_s: float,
    native: bool = False,
    extra: tuple[str, ...] = (),
) -> subprocess.Popen[bytes]:
    binary = py_spy()
    assert binary is not None
    argv = [
        binary,
        "record",
        "--pid",
        str(pid),
        "--duration",
        str(max(1, int(duration_s))),
        "--rate",
        "100",
        "--format",
        "raw",
        "--threads",
        "-o",
        str(out),
    ]
    if native:
        argv.append("--native")
    argv += extra
    log = out.with_suffix(".log").open("wb")
    try:
        return subprocess.Popen(with_parent_death(argv), stdout=log, stderr=subprocess.STDOUT)
    finally:
        log.close()


def finish(process: subprocess.Popen[bytes], timeout: float = 60) -> None:
    try:
        process.wait(timeout)
    except subprocess.TimeoutExpired:
        process.kill()
        process.wait()


def _stacks(raw: Path) -> list[tuple[int, str, list[str], int]]:
    """(OS thread id, thread name, frames root-first with line numbers, samples) per line."""
    result = []
    for line in raw.read_text(errors="replace").splitlines():
        stack, _, count = line.rpartition(" ")
        if not stack or not count.isdigit():
            continue
        frames = stack.split(";")
        tid, thread = 0, "?"
        match = re.match(r"^thread \((\d+)\): (.*)$", frames[0]) if frames else None
        if match:
            tid, thread = int(match.group(1)), match.group(2)
            frames = frames[1:]
        result.append((tid, thread, frames, int(count)))
    return result


# Leaf frames of a thread that is waiting, not working. py-spy asks the OS whether a thread
# runs just before it pauses the process, which misses threads that wake up often (the
# aiosqlite and to_thread workers under load), so waits are also recognised here.
_IDLE_LEAVES = (
    re.compile(r"^(EpollSelector|_PollLikeSelector|PollSelector|SelectSelector)\.select \("),
    re.compile(r"^_worker \(concurrent/futures/thread\.py"),  # work_queue.get()
    re.compile(r"^_connection_worker_thread \(aiosqlite/core\.py:59\)"),  # tx.get()
    # The SQLite writer waiting for work: as a leaf, _run is blocked in its queue's get().
    re.compile(r"^SqliteWriter\._run \(server/ledger/sqlite_writer\.py"),
    re.compile(r"^(Condition\.wait|Event\.wait|Thread\.join|_wait_for_tstate_lock|sleep) \("),
    re.compile(r"^BaseServer\.serve_forever \("),
    re.compile(r"^Thread\.run \(threading\.py"),  # a thread whose target is C (grpc's poller)
)


def _idle(leaf: str) -> bool:
    return any(pattern.match(leaf) for pattern in _IDLE_LEAVES)


# Buckets that answer "what dominates", matched on the stack, first match wins.
CATEGORIES: list[tuple[str, tuple[str, ...]]] = [
    (
        "image check of the upstream image (`_decode_check`: chunk CRCs, no pixel decode)",
        ("_decode_check (",),
    ),
    (
        "base64 decode of the upstream answer (`decode_base64`)",
        ("decode_base64 (", "b64decode ("),
    ),
    (
        "JSON parse of the upstream answer (`UpstreamResponse.json`)",
        ("UpstreamResponse.json (",),
    ),
    (
        "database: the writer and readers, plain SQL or SQLAlchemy (admission, settle, keys)",
        ("sqlalchemy/", "aiosqlite/", "sqlite3", "ledger/plain.py", "ledger/sqlite_writer.py"),
    ),
    ("image store write (url)", ("FilesystemImageStore", "storage/filesystem.py")),
    ("upstream HTTP (aiohttp; httpx for multipart)", ("aiohttp/", "yarl/", "multidict/", "httpx/", "httpcore/", "anyio/", "h11/")),
    ("logging", ("logging/__init__.py", "structlog/")),
    ("metrics (prometheus_client)", ("prometheus_client/",)),
    ("gRPC (grpc.aio server, cygrpc)", ("grpc/", "cygrpc", "_cython")),
    ("protobuf answer (`_response`)", ("_response (server/api/images.py",)),
    # Last: every stack of the loop thread passes through asyncio (uvloop's too), so this is
    # the rest of the loop's work: grpc's and aiohttp's callbacks in C, and our own code.
    ("event loop: callbacks in C and the rest of the server's code", ("asyncio/", "uvloop/")),
]


def _category(frames: list[str]) -> str:
    joined = ";".join(frames)
    for name, needles in CATEGORIES:
        if any(needle in joined for needle in needles):
            return name
    return "other"


def _thread_group(name: str) -> str:
    if name == "MainThread":
        return "MainThread (the asyncio event loop)"
    if "_connection_worker_thread" in name:
        return "aiosqlite connection threads (SQLite calls)"
    if re.fullmatch(r"asyncio_\d+", name):
        return "asyncio.to_thread workers (base64/JSON/Pillow offload)"
    if "_poll_wrapper" in name:
        return "grpc poller thread"
    if "serve_forever" in name:
        return "Prometheus /metrics server thread"
    if name == "bench-lock-stats":
        return "the bench's write-lock stats thread (bench/instrument.py)"
    return re.sub(r"^Thread-\d+ ", "", re.sub(r"_\d+$", "_*", name))


def summarise(raw: Path, cpu_by_tid: dict[int, float], pid: int, top: int = 15) -> dict[str, Any]:
    """Where the server's CPU time went, in CPU seconds and % of the server's CPU.

    Each thread's CPU time is exact (``cpu_by_tid``, from /proc/<pid>/task/*/stat over the
    profiled window); py-spy's samples only split a thread's time among its stacks, after
    dropping samples whose leaf is a wait (``_IDLE_LEAVES``). CPU of threads py-spy never
    saw in Python code (grpc's C core threads) is reported as such."""
    stacks = _stacks(raw)
    active: dict[int, list[tuple[list[str], int]]] = defaultdict(list)
    names: dict[int, str] = {}
    idle_samples = total_samples = 0
    for tid, thread, frames, count in stacks:
        names[tid] = thread
        total_samples += count
        if not frames or _idle(frames[-1]):
            idle_samples += count
            continue
        active[tid].append(([_LINE.sub(")", f) for f in frames], count))
    by_thread: defaultdict[str, float] = defaultdict(float)
    by_category: defaultdict[str, float] = defaultdict(float)
    self_time: defaultdict[str, float] = defaultdict(float)
    inclusive: defaultdict[str, float] = defaultdict(float)
    for tid, seconds in cpu_by_tid.items():
        name = "MainThread" if tid == pid else names.get(tid)
        group = _thread_group(name) if name else "threads without Python frames (grpc core, ...)"
        by_thread[group] += seconds
        samples = active.get(tid, [])
        weight_total = sum(count for _, count in samples)
        if not weight_total:
            by_category[f"{group}: no working Python stack sampled"] += seconds
            continue
        for frames, count in samples:
            share = seconds * count / weight_total
            by_category[_category(frames)] += share
            self_time[frames[-1]] += share
            for frame in set(frames):
                inclusive[frame] += share
    total = sum(cpu_by_tid.values())
    if total <= 0:
        return {"samples": total_samples, "cpu_s": 0.0}

    def shares(counter: dict[str, float], n: int | None = None) -> list[tuple[str, float, float]]:
        ranked = sorted(counter.items(), key=lambda item: item[1], reverse=True)
        return [(name, value, 100.0 * value / total) for name, value in ranked[:n]]

    skip = (
        "threading.py",
        "<frozen runpy>",
        "server/cli.py",
        "asyncio/runners.py",
        "asyncio/base_events.py",
        "bench/instrument.py",
    )
    return {
        "samples": total_samples,
        "idle_samples": idle_samples,
        "cpu_s": total,
        "threads": shares(by_thread),
        "categories": shares(by_category),
        "self": shares(self_time, top),
        "inclusive": shares({k: v for k, v in inclusive.items() if not any(x in k for x in skip)}, top),
    }


def flamegraph(raw: Path, out: Path, width: int = 1600) -> None:
    """A plain SVG flame graph (hover a box for its name and share)."""
    tree: dict[str, Any] = {"n": 0, "c": defaultdict(lambda: None)}

    def child(node: dict[str, Any], name: str) -> dict[str, Any]:
        found = node["c"][name]
        if found is None:
            found = {"n": 0, "c": defaultdict(lambda: None)}
            node["c"][name] = found
        return found

    for _tid, thread, frames, count in _stacks(raw):
        frames = [_LINE.sub(")", f) for f in frames]
        node = tree
        node["n"] += count
        for name in [f"thread {thread}", *frames]:
            node = child(node, name)
            node["n"] += count
    total = tree["n"] or 1
    row = 16
    boxes: list[str] = []
    depth_max = 0

    def walk(node: dict[str, Any], x: float, depth: int) -> None:
        nonlocal depth_max
        depth_max = max(depth_max, depth)
        for name, sub in sorted(((k, v) for k, v in node["c"].items() if v), key=lambda kv: kv[0]):
            w = width * sub["n"] / total
            if w >= 0.5:
                share = 100.0 * sub["n"] / total
                label = html.escape(name)
                hue = 20 + (hash(name) % 40)
                text = html.escape(name[: int(w / 7)]) if w > 30 else ""
                boxes.append(
                    f'<g><title>{label} ({share:.1f}%)</title><rect x="{x:.1f}" y="{{y{depth}}}" width="{w:.1f}" '
                    f'height="{row - 1}" fill="hsl({hue},80%,60%)"/><text x="{x + 3:.1f}" y="{{t{depth}}}">{text}</text></g>'
                )
                walk(sub, x, depth + 1)
            x += w

    walk(tree, 0.0, 0)
    height = (depth_max + 2) * row
    # Root at the bottom, like flamegraph.pl.
    body = "\n".join(boxes)
    for depth in range(depth_max + 1, -1, -1):
        y = height - (depth + 1) * row
        body = body.replace(f"{{y{depth}}}", str(y)).replace(f"{{t{depth}}}", str(y + row - 4))
    out.write_text(
        f'<svg xmlns="http://www.w3.org/2000/svg" width="{width}" height="{height}" font-family="monospace" '
        f'font-size="11"><rect width="100%" height="100%" fill="#fff"/>{body}</svg>\n'
    )
