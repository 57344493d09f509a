"""The load generator: ``wrk`` (C, epoll) in closed loop, one static POST per row.

Each connection has exactly one request outstanding and sends the next as soon as the
answer is complete (closed loop, no think time). The request is fixed for a row, so wrk
builds it once; a Lua ``done()`` hook prints wrk's own counters and latency percentiles
as one JSON line (no text parsing, no unit guessing). No ``response()`` hook: it would
make wrk copy every 2 MB body into Lua.
"""

from __future__ import annotations

import json
import math
import os
import shutil
import signal
import subprocess
import time
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

from bench.procs import with_parent_death

__all__ = ["WrkResult", "find_wrk", "run_wrk", "write_script"]

_DONE = r"""
done = function(summary, latency, requests)
  local e = summary.errors
  io.write(string.format(
    'BENCHJSON {"requests":%d,"duration_us":%d,"bytes":%d,"connect":%d,"read":%d,"write":%d,' ..
    '"status":%d,"timeout":%d,"mean_us":%.1f,"p50_us":%d,"p90_us":%d,"p99_us":%d,"max_us":%d}\n',
    summary.requests, summary.duration, summary.bytes, e.connect, e.read, e.write, e.status, e.timeout,
    latency.mean, latency:percentile(50), latency:percentile(90), latency:percentile(99), latency.max))
end
"""


def _lua_string(value: str) -> str:
    return "'" + value.replace("\\", "\\\\").replace("'", "\\'") + "'"


def write_script(path: Path, *, body: str, headers: dict[str, str]) -> Path:
    lines = ['wrk.method = "POST"', f"wrk.body = {_lua_string(body)}"]
    lines += [f"wrk.headers[{_lua_string(k)}] = {_lua_string(v)}" for k, v in headers.items()]
    path.write_text("\n".join(lines) + "\n" + _DONE)
    return path


def find_wrk() -> str | None:
    return shutil.which("wrk")


@dataclass(frozen=True)
class WrkResult:
    requests: int
    duration_s: float
    bytes: int
    errors_connect: int
    errors_read: int
    errors_write: int
    errors_status: int  # non-2xx/3xx answers
    errors_timeout: int
    mean_s: float
    p50_s: float
    p90_s: float
    p99_s: float
    max_s: float
    cpu_s: float  # wrk's own user + system time

    @property
    def errors(self) -> int:
        return self.errors_connect + self.errors_read + self.errors_write + self.errors_status + self.errors_timeout

    @property
    def raw_rps(self) -> float:
        """Completed answers / run time, as wrk prints it (counts the empty first second
        of a 1 s upstream against the row; kept for reference)."""
        return self.requests / self.duration_s if self.duration_s else 0.0


def run_wrk(
    wrk: str,
    url: str,
    script: Path,
    *,
    connections: int,
    duration_s: float,
    timeout_s: float = 60.0,
    threads: int | None = None,
    on_tick: Callable[[float], bool] | None = None,
) -> WrkResult:
    """Runs wrk once and returns its counters; raises if it fails or prints no summary.

    ``on_tick(seconds since wrk started)`` is called about every 20 ms while wrk runs
    (the bench reads throughput counters at the window's edges from it); when it returns
    True, wrk gets SIGINT, which makes it stop and print its summary at once."""
    threads = max(1, min(threads or (os.cpu_count() or 2), connections))
    argv = [
        wrk,
        f"-t{threads}",
        f"-c{connections}",
        f"-d{math.ceil(duration_s)}s",
        f"--timeout={timeout_s:g}s",
        "-s",
        str(script),
        url,
    ]
    process = subprocess.Popen(
        with_parent_death(argv),
        stdout=subprocess.PIPE,
        stderr=subprocess.STDOUT,
        start_new_session=True,
    )
    started = time.monotonic()
    interrupted = False
    limit = started + duration_s + timeout_s + 30
    try:
        assert process.stdout is not None
        out = b""
        # wait4 gives wrk's own CPU time; poll so that a hung wrk cannot hang the bench.
        while True:
            pid, status, usage = os.wait4(process.pid, os.WNOHANG)
            if pid:
                process.returncode = os.waitstatus_to_exitcode(status)
                break
            if time.monotonic() > limit:
                raise TimeoutError(f"wrk did not finish: {' '.join(argv)}")
            if on_tick is not None and not interrupted and on_tick(time.monotonic() - started):
                process.send_signal(signal.SIGINT)
                interrupted = True
            time.sleep(0.02)
        out = process.stdout.read()
    finally:
        if process.returncode is None:
            process.kill()
            process.wait()
        if process.stdout is not None:
            process.stdout.close()
    text = out.decode(errors="replace")
    line = next((l for l in text.splitlines() if l.startswith("BENCHJSON ")), None)
    if process.returncode != 0 or line is None:
        raise RuntimeError(f"wrk failed (exit {process.returncode}): {' '.join(argv)}\n{text[-2000:]}")
    data = json.loads(line.removeprefix("BENCHJSON "))
    return WrkResult(
        requests=data["requests"],
        duration_s=data["duration_us"] / 1e6,
        bytes=data["bytes"],
        errors_connect=data["connect"],
        errors_read=data["read"],
        errors_write=data["write"],
        errors_status=data["status"],
        errors_timeout=data["timeout"],
        mean_s=data["mean_us"] / 1e6,
        p50_s=data["p50_us"] / 1e6,
        p90_s=data["p90_us"] / 1e6,
        p99_s=data["p99_us"] / 1e6,
        max_s=data["max_us"] / 1e6,
        cpu_s=(usage.ru_utime + usage.ru_stime),
    )
