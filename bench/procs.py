"""Child processes and what /proc says about them (CPU time, resident memory)."""

from __future__ import annotations

import contextlib
import os
import shutil
import socket
import subprocess
import threading
import time
from collections.abc import Sequence
from dataclasses import dataclass, field
from pathlib import Path

__all__ = [
    "CLOCK_TICKS",
    "MemoryWatch",
    "cpu_seconds",
    "free_port",
    "machine_cpu",
    "peak_rss_kib",
    "quiesce",
    "reset_peak_rss",
    "rss_kib",
    "spawn",
    "thread_cpu_seconds",
    "wait_for_port",
]

CLOCK_TICKS = os.sysconf("SC_CLK_TCK")
_SETPRIV = shutil.which("setpriv")


def with_parent_death(argv: Sequence[str]) -> list[str]:
    """``argv`` behind util-linux ``setpriv --pdeathsig TERM`` when available: the child
    gets SIGTERM if the bench dies, even by SIGKILL (no preexec_fn, which is unsafe once
    threads exist)."""
    return [_SETPRIV, "--pdeathsig", "TERM", "--", *argv] if _SETPRIV else list(argv)


def spawn(argv: Sequence[str], *, log: Path, env: dict[str, str] | None = None) -> subprocess.Popen[bytes]:
    """Starts ``argv`` in its own session (Ctrl-C reaches only the bench), output to ``log``."""
    out = log.open("ab")
    try:
        return subprocess.Popen(
            with_parent_death(argv),
            stdout=out,
            stderr=subprocess.STDOUT,
            env=env,
            start_new_session=True,
        )
    finally:
        out.close()


def free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return int(sock.getsockname()[1])


def wait_for_port(port: int, process: subprocess.Popen[bytes], timeout: float = 30) -> None:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if process.poll() is not None:
            raise RuntimeError(f"{process.args!r} exited with status {process.returncode}")
        with (
            contextlib.suppress(OSError),
            socket.create_connection(("127.0.0.1", port), timeout=0.5),
        ):
            return
        time.sleep(0.05)
    raise TimeoutError(f"nothing listened on 127.0.0.1:{port} within {timeout:.0f} s")


def cpu_seconds(pids: Sequence[int]) -> float:
    """utime + stime of ``pids`` (all their threads), in seconds."""
    total = 0
    for pid in pids:
        with open(f"/proc/{pid}/stat") as handle:
            # The command name may contain spaces; fields resume after its closing ')'.
            fields = handle.read().rsplit(")", 1)[1].split()
        total += int(fields[11]) + int(fields[12])  # utime, stime (fields 14 and 15)
    return total / CLOCK_TICKS


def thread_cpu_seconds(pid: int) -> dict[int, float]:
    """utime + stime of each thread of ``pid``, by OS thread id."""
    result: dict[int, float] = {}
    for task in Path(f"/proc/{pid}/task").iterdir():
        try:
            fields = (task / "stat").read_text().rsplit(")", 1)[1].split()
        except OSError:
            continue  # the thread ended
        result[int(task.name)] = (int(fields[11]) + int(fields[12])) / CLOCK_TICKS
    return result


def quiesce(
    pids: Sequence[int],
    *,
    idle_cpu: float = 0.05,
    window: float = 0.25,
    timeout: float = 15.0,
) -> float:
    """Waits until ``pids`` together use under ``idle_cpu`` of a core over ``window``
    (requests cut short by the previous wrk run are being cancelled and settled);
    returns the seconds waited. Bounded by ``timeout``."""
    started = time.monotonic()
    live = [pid for pid in pids if Path(f"/proc/{pid}").exists()]
    before = cpu_seconds(live)
    while time.monotonic() - started < timeout:
        time.sleep(window)
        now = cpu_seconds(live)
        if (now - before) / window < idle_cpu:
            break
        before = now
    return time.monotonic() - started


def machine_cpu() -> tuple[float, float]:
    """(busy, total) CPU seconds of the whole machine since boot, from /proc/stat."""
    with open("/proc/stat") as handle:
        values = [int(v) for v in handle.readline().split()[1:]]
    idle = values[3] + values[4]  # idle + iowait
    total = sum(values[:8])  # without guest time, already counted in user
    return (total - idle) / CLOCK_TICKS, total / CLOCK_TICKS


def _status_kib(pid: int, name: str) -> int:
    with open(f"/proc/{pid}/status") as handle:
        for line in handle:
            if line.startswith(name + ":"):
                return int(line.split()[1])
    return 0


def rss_kib(pid: int) -> int:
    return _status_kib(pid, "VmRSS")


def peak_rss_kib(pid: int) -> int:
    return _status_kib(pid, "VmHWM")


def reset_peak_rss(pid: int) -> bool:
    """Resets VmHWM to the current RSS (Linux >= 4.0: ``echo 5 > clear_refs``)."""
    try:
        Path(f"/proc/{pid}/clear_refs").write_text("5")
        return True
    except OSError:
        return False


@dataclass
class MemoryWatch:
    """Peak RSS of some processes over a window: VmHWM after a reset, and a 50 ms sampler
    as a cross-check (and the fallback where clear_refs is not allowed). Peaks are read
    when the window closes (the first ``__exit__``; later calls do nothing)."""

    pids: Sequence[int]
    interval: float = 0.05
    sampled: dict[int, int] = field(default_factory=dict)
    reset_ok: dict[int, bool] = field(default_factory=dict)
    peaks: dict[int, int] = field(default_factory=dict)
    _stop: threading.Event = field(default_factory=threading.Event)
    _thread: threading.Thread | None = None

    def __enter__(self) -> MemoryWatch:  # noqa: PYI034 - a plain dataclass, never subclassed
        for pid in self.pids:
            self.reset_ok[pid] = reset_peak_rss(pid)
            self.sampled[pid] = rss_kib(pid)
        self._thread = threading.Thread(target=self._sample, daemon=True, name="bench-rss")
        self._thread.start()
        return self

    def _sample(self) -> None:
        while not self._stop.wait(self.interval):
            for pid in self.pids:
                with contextlib.suppress(OSError):
                    self.sampled[pid] = max(self.sampled[pid], rss_kib(pid))

    def __exit__(self, *exc: object) -> None:
        if self._thread is None:
            return
        self._stop.set()
        self._thread.join()
        self._thread = None
        for pid in self.pids:
            with contextlib.suppress(OSError):
                hwm = peak_rss_kib(pid) if self.reset_ok.get(pid) else 0
                self.peaks[pid] = max(hwm, self.sampled.get(pid, 0))

    def peak_kib(self, pid: int) -> int:
        return self.peaks.get(pid, 0)
