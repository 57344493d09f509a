"""Issue 10 part 7: what a 1.5 MB ``b64_json`` answer costs the gateway, by answer path.

Three ways for the REST answer to leave the server, each measured with the 1.5 MB image
and a 0 s upstream at concurrency 16 and 64 (wrk closed loop, CPU from /proc, peak RSS
from VmHWM, exactly like the main rows):

    (a) typed response, ``bytes b64_json``: Envoy's transcoder base64-encodes the image.
        Real imagegw: its typed unary ``GenerateImages`` (what gRPC callers get), reached
        through an Envoy rendered by imagegw's own renderer plus ``auto_mapping: true``,
        so ``POST /imagegw.v1.ImageService/GenerateImages`` with the JSON body maps to it
        (the RPC has no HTTP annotation). Only this bench-rendered config has it.
    (b) typed response, ``string b64_json`` carrying the upstream's base64 text. Not a
        shape of the product: measured on the echo server only.
    (c) ``stream google.api.HttpBody`` whose bytes the server writes as OpenAI's JSON:
        the product's ``POST /v1/images/generations`` (``GenerateImagesHttp``), and the
        same with ``stream: true`` (``partial_images`` 0 and 2).

The echo server (``bench/answer_echo.py``) answers one prebuilt answer in all three
shapes from a bench-only proto (``bench/answer_echo.proto``, compiled here into
``var/bench/answer_paths/``, never into gen/), behind an Envoy whose config is imagegw's
rendered one with only the descriptor, the service, the routes and the upstream
swapped: same Lua, buffer, transcoder settings, access log and cluster options. Its rows
compare Envoy's work per shape with nothing else changing.

Before measuring, every design must return exactly the fake's PNG (decoded, sha256
compared), gRPC ``GenerateImages`` must return it as raw bytes, and the JSON bodies are
compared byte for byte (``created`` aside, which is the second of the generation).
Then the latency of a streamed answer's first event at concurrency 1 (0 s and 1 s
upstream). The bench's fake upstream does not stream: imagegw asks it for OpenAI's stream,
gets a plain JSON answer, reads it as one (as it does for any such host) and sends one
completed event per image whatever ``partial_images`` says. That event is what is measured.
"""

from __future__ import annotations

import base64
import hashlib
import json
import os
import re
import statistics
import subprocess
import sys
import sysconfig
import time
from collections.abc import Callable
from contextlib import ExitStack
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

import grpc
import httpx
import yaml

from bench.images import image_bytes
from bench.procs import MemoryWatch, cpu_seconds, free_port, machine_cpu, quiesce, spawn, wait_for_port
from bench.upstream import prompt_token
from bench.wrk import run_wrk, write_script

__all__ = ["CONCURRENCIES", "DESIGNS", "render", "run_section"]

ROOT = Path(__file__).resolve().parent.parent
ECHO_SERVICE = "imagegw_bench.v1.AnswerEcho"
CONCURRENCIES = (16, 64)
_GENERATE_ROUTE = "/imagegw.v1.ImageService/GenerateImages"
_COMPLETED = "image_generation.completed"


@dataclass(frozen=True)
class Design:
    key: str
    label: str
    server: str  # "imagegw" or "echo"
    path: str
    stream: bool = False
    partial_images: int | None = None


# In the order they run (alternated at each concurrency) and are printed.
DESIGNS = (
    Design("a", "(a) typed `bytes`, Envoy encodes", "imagegw", _GENERATE_ROUTE),
    Design("c", "(c) HttpBody, server writes the JSON", "imagegw", "/v1/images/generations"),
    Design("c-stream-0", "(c) streamed, `partial_images: 0`", "imagegw", "/v1/images/generations", True, 0),
    Design("c-stream-2", "(c) streamed, `partial_images: 2`", "imagegw", "/v1/images/generations", True, 2),
    Design("echo-a", "(a) typed `bytes`, Envoy encodes", "echo", "/bench/bytes"),
    Design("echo-b", "(b) typed `string` (base64 text)", "echo", "/bench/string"),
    Design("echo-c", "(c) HttpBody, server writes the JSON", "echo", "/bench/httpbody"),
)


@dataclass
class Target:
    """One design's endpoint and the processes that serve it."""

    design: Design
    url: str
    body: str
    headers: dict[str, str]
    envoy_pid: int
    admin_port: int
    server_pids: list[int]


@dataclass
class Row:
    design: str
    concurrency: int
    window_s: float = 0.0
    warmup_used_s: float = 0.0
    completed: int = 0
    envoy_cpu_s: float = 0.0
    server_cpu_s: float = 0.0
    # Minor page faults of the server over the window: large buffers that get a fresh
    # mapping (server/allocator.py) are paid for in faults, page by page.
    server_minflt: int = 0
    envoy_peak_kib: int = 0
    server_peak_kib: int = 0
    requests: int = 0
    errors: int = 0
    p50_s: float = 0.0
    p99_s: float = 0.0
    machine_busy: float = 0.0
    error: str | None = None

    @property
    def rps(self) -> float:
        return self.completed / self.window_s if self.window_s > 0 else 0.0

    def ms_per_answer(self, cpu_s: float) -> float | None:
        return 1000 * cpu_s / self.completed if self.completed else None

    def to_json(self) -> dict[str, Any]:
        data = asdict(self)
        data["rps"] = self.rps
        data["envoy_cpu_ms"] = self.ms_per_answer(self.envoy_cpu_s)
        data["server_cpu_ms"] = self.ms_per_answer(self.server_cpu_s)
        data["gateway_cpu_ms"] = self.ms_per_answer(self.envoy_cpu_s + self.server_cpu_s)
        data["server_minflt_per_answer"] = self.server_minflt / self.completed if self.completed else None
        return data


@dataclass
class _Processes:
    everyone: list[int] = field(default_factory=list)
    targets: list[Target] = field(default_factory=list)


# -- set-up -----------------------------------------------------------------------------


def compile_echo_proto(out: Path) -> tuple[Path, Path]:
    """Compiles bench/answer_echo.proto into ``out``: (Python module dir, descriptor set)."""
    gen, descriptor = out / "gen", out / "answer_echo.pb"
    gen.mkdir(parents=True, exist_ok=True)
    subprocess.run(
        [
            sys.executable,
            "-m",
            "grpc_tools.protoc",
            "-I",
            str(ROOT / "bench"),
            "-I",
            str(ROOT / "proto"),
            "-I",
            sysconfig.get_paths()["purelib"],
            f"--python_out={gen}",
            "--include_imports",
            f"--descriptor_set_out={descriptor}",
            "answer_echo.proto",
        ],
        check=True,
        cwd=ROOT,
    )
    return gen, descriptor


def _hcm(config: dict[str, Any]) -> dict[str, Any]:
    hcm: dict[str, Any] = config["static_resources"]["listeners"][0]["filter_chains"][0]["filters"][0]["typed_config"]
    return hcm


def _transcoder(config: dict[str, Any]) -> dict[str, Any]:
    for http_filter in _hcm(config)["http_filters"]:
        if http_filter["name"] == "envoy.filters.http.grpc_json_transcoder":
            typed: dict[str, Any] = http_filter["typed_config"]
            return typed
    raise RuntimeError("imagegw's Envoy config has no transcoder")


# The edge's Lua answers 404 for a path outside its ENDPOINTS table; the bench's own paths
# are added to that table (with the generation's JSON checks), in the bench's configs only.
_GENERATIONS_ENDPOINT = '{path = "^/v1/images/generations$", methods = {"POST"}, json = GENERATION_FIELDS},'


def _allow_paths(config: dict[str, Any], *patterns: str) -> None:
    for http_filter in _hcm(config)["http_filters"]:
        if http_filter["name"] == "envoy.filters.http.lua":
            source = http_filter["typed_config"]["default_source_code"]
            if _GENERATIONS_ENDPOINT not in source["inline_string"]:
                raise RuntimeError("the edge's Lua has no generations endpoint to add the bench's paths beside")
            extra = "".join(
                f'\n  {{path = "{pattern}", methods = {{"POST"}}, json = GENERATION_FIELDS}},' for pattern in patterns
            )
            source["inline_string"] = source["inline_string"].replace(
                _GENERATIONS_ENDPOINT, _GENERATIONS_ENDPOINT + extra
            )
            return
    raise RuntimeError("imagegw's Envoy config has no Lua filter")


def bytes_envoy_config(settings: Any) -> dict[str, Any]:
    """imagegw's rendered Envoy config (for ``settings``' ports) with auto_mapping on:
    ``POST /imagegw.v1.ImageService/GenerateImages`` with a JSON body then reaches the
    typed unary RPC, which has no HTTP annotation (facts §13). Bench only."""
    from server.envoy import render_envoy_config

    config = render_envoy_config(settings)
    _transcoder(config)["auto_mapping"] = True
    _allow_paths(config, "^/imagegw%.v1%.ImageService/GenerateImages$")
    return config


def echo_envoy_config(settings: Any, *, descriptor: Path, echo_port: int) -> dict[str, Any]:
    """imagegw's rendered Envoy config pointed at the echo server: its descriptor and
    service, one route (the generation route's timeouts), its health check name."""
    from server.envoy import render_envoy_config

    config = render_envoy_config(settings, upstreams=[("127.0.0.1", echo_port)])
    transcoder = _transcoder(config)
    transcoder["proto_descriptor"] = str(descriptor)
    transcoder["services"] = [ECHO_SERVICE]
    routes = _hcm(config)["route_config"]["virtual_hosts"][0]["routes"]
    generate = next(route for route in routes if route["match"]["prefix"] == _GENERATE_ROUTE)
    generate["match"] = {"prefix": f"/{ECHO_SERVICE}/"}
    routes[:] = [generate]
    for cluster in config["static_resources"]["clusters"]:
        for check in cluster.get("health_checks", []):
            check["grpc_health_check"]["service_name"] = ECHO_SERVICE
    _allow_paths(config, "^/bench/bytes$", "^/bench/string$", "^/bench/httpbody$")
    return config


def _start_envoy(
    config: dict[str, Any], path: Path, log: Path, settings: Any, cleanup: ExitStack
) -> subprocess.Popen[bytes]:
    from server.dev import stop_process
    from server.envoy import envoy_binary

    path.write_text(yaml.safe_dump(config, sort_keys=False))
    process = spawn([envoy_binary(settings), "-c", str(path), "--disable-hot-restart", "--log-level", "warn"], log=log)
    cleanup.callback(stop_process, process, 10)
    return process


def _wait_ok(
    url: str, body: str, headers: dict[str, str], process: subprocess.Popen[bytes], timeout: float = 30
) -> None:
    """Until a request through a new Envoy succeeds (it is live and its upstream healthy)."""
    deadline = time.monotonic() + timeout
    with httpx.Client(timeout=10) as client:
        while time.monotonic() < deadline:
            if process.poll() is not None:
                raise RuntimeError(f"envoy exited with status {process.returncode}")
            try:
                if client.post(url, content=body, headers=headers).status_code == 200:
                    return
            except httpx.HTTPError:
                pass
            time.sleep(0.1)
    raise TimeoutError(f"{url} did not answer 200 within {timeout:.0f} s")


def request_body(design: Design, delay_s: float) -> str:
    body: dict[str, Any] = {
        "model": "gpt-image-1",
        "prompt": f"A lighthouse on a cliff at dusk, oil painting {prompt_token('large', delay_s)}",
        "n": 1,
        "size": "1024x1024",
        "response_format": "b64_json",
    }
    if design.stream:
        body |= {"stream": True, "partial_images": design.partial_images}
    return json.dumps(body, separators=(",", ":"))


def grpc_answer(settings: Any, api_key: str) -> Any:
    """gRPC ``GenerateImages`` straight to the server: it must return the fake's PNG as raw
    bytes. Its answer is what the echo server serves."""
    from imagegw.v1 import images_pb2, images_pb2_grpc

    request = images_pb2.GenerateImagesRequest(
        prompt=f"A lighthouse on a cliff at dusk, oil painting {prompt_token('large', 0)}",
        model="gpt-image-1",
        n=1,
        size="1024x1024",
        response_format="b64_json",
    )
    with grpc.insecure_channel(settings.grpc_target, options=[("grpc.max_receive_message_length", -1)]) as channel:
        answer = images_pb2_grpc.ImageServiceStub(channel).GenerateImages(
            request, metadata=(("authorization", f"Bearer {api_key}"),), timeout=30
        )
    if len(answer.data) != 1 or answer.data[0].b64_json != image_bytes("large"):
        raise RuntimeError("gRPC GenerateImages did not return the fake's PNG as raw bytes")
    return answer


def start(stack: Any, out: Path, cleanup: ExitStack) -> tuple[_Processes, Any]:
    """The processes the section adds to the running stack, and the gRPC answer."""
    from server.dev import stop_process

    settings = stack.settings
    answer = grpc_answer(settings, stack.api_key)
    gen, descriptor = compile_echo_proto(out)
    answer_file = out / "answer.pb"
    answer_file.write_bytes(answer.SerializeToString())
    auth = {"Content-Type": "application/json", "Authorization": f"Bearer {stack.api_key}"}

    bytes_settings = settings.model_copy(update={"http_port": free_port(), "envoy_admin_port": free_port()})
    bytes_envoy = _start_envoy(
        bytes_envoy_config(bytes_settings),
        stack.logs.parent / "bytes-envoy.yaml",
        stack.logs / "bytes-envoy.log",
        settings,
        cleanup,
    )
    echo_port = free_port()
    echo = spawn(
        [
            sys.executable,
            "-m",
            "bench.answer_echo",
            "--port",
            str(echo_port),
            "--gen",
            str(gen),
            "--answer",
            str(answer_file),
        ],
        log=stack.logs / "answer-echo.log",
        env={**os.environ, "PYTHONPATH": str(ROOT)},
    )
    cleanup.callback(stop_process, echo, 10)
    wait_for_port(echo_port, echo)
    echo_settings = settings.model_copy(update={"http_port": free_port(), "envoy_admin_port": free_port()})
    echo_envoy = _start_envoy(
        echo_envoy_config(echo_settings, descriptor=descriptor, echo_port=echo_port),
        stack.logs.parent / "echo-envoy.yaml",
        stack.logs / "echo-envoy.log",
        settings,
        cleanup,
    )
    where = {
        "a": (bytes_settings.http_port, bytes_settings.envoy_admin_port, bytes_envoy.pid, stack.server_pids),
        "c": (stack.gateway_port, stack.gateway_admin_port, stack.gateway_envoy.pid, stack.server_pids),
        "echo": (echo_settings.http_port, echo_settings.envoy_admin_port, echo_envoy.pid, [echo.pid]),
    }
    processes = _Processes(everyone=[*stack.all_pids(), bytes_envoy.pid, echo.pid, echo_envoy.pid])
    for design in DESIGNS:
        port, admin, envoy_pid, servers = where[
            "echo" if design.server == "echo" else "a" if design.key == "a" else "c"
        ]
        target = Target(
            design=design,
            url=f"http://127.0.0.1:{port}{design.path}",
            body=request_body(design, 0.0),
            headers=auth,
            envoy_pid=envoy_pid,
            admin_port=admin,
            server_pids=list(servers),
        )
        processes.targets.append(target)
    for target, process in ((processes.targets[0], bytes_envoy), (processes.targets[-1], echo_envoy)):
        _wait_ok(target.url, target.body, target.headers, process)
    return processes, answer


# -- checks -----------------------------------------------------------------------------


def sse_events(body: bytes) -> list[tuple[str | None, dict[str, Any]]]:
    """(``event:`` name, parsed ``data:``) of each event; comments skipped."""
    events = []
    for block in body.split(b"\n\n"):
        name, data = None, None
        for line in block.split(b"\n"):
            if line.startswith(b"event: "):
                name = line.removeprefix(b"event: ").decode()
            elif line.startswith(b"data: "):
                data = json.loads(line.removeprefix(b"data: "))
        if data is not None:
            events.append((name, data))
    return events


def _without_created(body: bytes) -> bytes:
    return re.sub(rb'^\{"created":\d+,', b'{"created":0,', body, count=1)


def verify(targets: list[Target]) -> dict[str, Any]:
    """One request per design: 200 and exactly the fake's PNG; the JSON bodies compared."""
    want = hashlib.sha256(image_bytes("large")).hexdigest()
    bodies: dict[str, bytes] = {}
    with httpx.Client(timeout=60) as client:
        for target in targets:
            answer = client.post(target.url, content=target.body, headers=target.headers)
            key = target.design.key
            if answer.status_code != 200:
                raise RuntimeError(f"answer path {key}: HTTP {answer.status_code}: {answer.text[:300]}")
            if target.design.stream:
                events = sse_events(answer.content)
                if [(name, data["type"]) for name, data in events] != [(_COMPLETED, _COMPLETED)]:
                    raise RuntimeError(f"answer path {key}: events {[(n, d.get('type')) for n, d in events]}")
                encoded = events[0][1]["b64_json"]
            else:
                bodies[key] = _without_created(answer.content)
                encoded = answer.json()["data"][0]["b64_json"]
            if hashlib.sha256(base64.b64decode(encoded, validate=True)).hexdigest() != want:
                raise RuntimeError(f"answer path {key}: the image differs from the fake's")
    distinct = {body for body in bodies.values()}
    return {
        "image_sha256": want,
        "image_bytes": len(image_bytes("large")),
        "json_bytes": {key: len(body) for key, body in bodies.items()},
        "json_identical": len(distinct) == 1,
        "json_sha256": {key: hashlib.sha256(body).hexdigest() for key, body in bodies.items()},
    }


# -- measurement ------------------------------------------------------------------------


def minor_faults(pids: list[int]) -> int:
    """Minor page faults of ``pids`` so far (all threads), from /proc/<pid>/stat."""
    total = 0
    for pid in pids:
        with open(f"/proc/{pid}/stat") as handle:
            total += int(handle.read().rsplit(")", 1)[1].split()[7])  # minflt (field 10)
    return total


def _count_2xx(client: httpx.Client, admin_port: int) -> int:
    name = "http.public.downstream_rq_2xx"
    text = client.get(f"http://127.0.0.1:{admin_port}/stats", params={"filter": f"^{name}$"}).text
    for line in text.splitlines():
        key, _, value = line.partition(": ")
        if key == name:
            return int(value)
    return 0


@dataclass
class _Edge:
    at: float
    completed: int
    envoy_cpu: float
    server_cpu: float
    server_minflt: int
    machine: tuple[float, float]


def measure(
    target: Target,
    concurrency: int,
    *,
    wrk: str,
    scripts: Path,
    everyone: list[int],
    warmup_s: float,
    max_warmup_s: float,
    measure_s: float,
) -> Row:
    """One wrk run: a warm-up until one answer per connection came back (at least
    ``warmup_s``, at most ``max_warmup_s``), then a window of ``measure_s`` at whose edges
    the Envoy's 2xx counter and the CPU time of the Envoy and the server are read. CPU per
    answer = CPU over the window / answers completed in it (0 s upstream: a steady flow)."""
    row = Row(target.design.key, concurrency)
    script = write_script(scripts / f"answer-{target.design.key}.lua", body=target.body, headers=target.headers)
    quiesce(everyone)
    memory = MemoryWatch([target.envoy_pid, *target.server_pids])
    edges: list[_Edge] = []
    client = httpx.Client(timeout=10)
    first_count: list[int] = []
    last_poll = [0.0]

    def edge() -> _Edge:
        before = time.monotonic()
        completed = _count_2xx(client, target.admin_port)
        return _Edge(
            at=(before + time.monotonic()) / 2,
            completed=completed,
            envoy_cpu=cpu_seconds([target.envoy_pid]),
            server_cpu=cpu_seconds(target.server_pids),
            server_minflt=minor_faults(target.server_pids),
            machine=machine_cpu(),
        )

    def on_tick(elapsed: float) -> bool:
        if not first_count:
            first_count.append(_count_2xx(client, target.admin_port))
        if not edges:
            if elapsed < warmup_s or elapsed - last_poll[0] < 0.25:
                return False
            last_poll[0] = elapsed
            if _count_2xx(client, target.admin_port) - first_count[0] < concurrency and elapsed < max_warmup_s:
                return False
            row.warmup_used_s = elapsed
            edges.append(edge())
            return False
        if len(edges) == 1 and edges[0].at + measure_s <= time.monotonic():
            edges.append(edge())
            memory.__exit__(None, None, None)
            return True
        return False

    memory.__enter__()
    try:
        result = run_wrk(
            wrk,
            target.url,
            script,
            connections=concurrency,
            duration_s=max(warmup_s, max_warmup_s) + measure_s + 5,
            on_tick=on_tick,
        )
    finally:
        memory.__exit__(None, None, None)
        client.close()
    if len(edges) != 2:
        raise RuntimeError("wrk ended before the measured window closed")
    first, last = edges
    row.window_s = last.at - first.at
    row.completed = last.completed - first.completed
    row.envoy_cpu_s = last.envoy_cpu - first.envoy_cpu
    row.server_cpu_s = last.server_cpu - first.server_cpu
    row.server_minflt = last.server_minflt - first.server_minflt
    total = last.machine[1] - first.machine[1]
    row.machine_busy = (last.machine[0] - first.machine[0]) / total if total else 0.0
    row.envoy_peak_kib = memory.peak_kib(target.envoy_pid)
    row.server_peak_kib = sum(memory.peak_kib(pid) for pid in target.server_pids)
    row.requests, row.errors = result.requests, result.errors
    row.p50_s, row.p99_s = result.p50_s, result.p99_s
    return row


def _timed(client: httpx.Client, url: str, body: str, headers: dict[str, str]) -> tuple[float, float | None]:
    """(seconds to the whole answer, seconds to the end of the first SSE event or None)."""
    started = time.perf_counter()
    first: float | None = None
    tail = b""
    with client.stream("POST", url, content=body, headers=headers) as answer:
        if answer.status_code != 200:
            raise RuntimeError(f"{url}: HTTP {answer.status_code}")
        for chunk in answer.iter_raw():
            if first is None:
                tail = tail[-1:] + chunk
                if b"\n\n" in tail:
                    first = time.perf_counter() - started
    return time.perf_counter() - started, first


def first_event_latency(stack: Any, targets: list[Target], *, counts: dict[float, int]) -> list[dict[str, Any]]:
    """Concurrency 1, one keep-alive connection each: the fake directly (the floor), the
    product's JSON answer, and the streamed answers (time to their first event)."""
    fake = Target(
        design=Design("fake", "fake upstream, directly", "fake", "/v1/images/generations"),
        url=f"http://127.0.0.1:{stack.upstream_port}/v1/images/generations",
        body="",
        headers={"Content-Type": "application/json", "Authorization": "Bearer sk-bench-upstream"},
        envoy_pid=0,
        admin_port=0,
        server_pids=[],
    )
    chosen = [fake, *(t for t in targets if t.design.key in ("c", "c-stream-0", "c-stream-2"))]
    results = []
    for delay, count in counts.items():
        for target in chosen:
            body = request_body(target.design, delay)
            with httpx.Client(timeout=60) as client:
                _timed(client, target.url, body, target.headers)  # the connection and a first answer
                times = [_timed(client, target.url, body, target.headers) for _ in range(count)]
            whole = [t[0] for t in times]
            firsts = [t[1] for t in times if t[1] is not None]
            results.append(
                {
                    "design": target.design.key,
                    "delay_s": delay,
                    "n": count,
                    "whole_p50_s": statistics.median(whole),
                    "whole_max_s": max(whole),
                    "first_event_p50_s": statistics.median(firsts) if firsts else None,
                    "first_event_max_s": max(firsts) if firsts else None,
                }
            )
    return results


def run_section(
    stack: Any,
    wrk: str,
    *,
    out: Path,
    warmup_s: float,
    max_warmup_s: float,
    measure_s: float,
    quick: bool = False,
    progress: Callable[[str], None] | None = None,
) -> dict[str, Any]:
    """Starts the section's processes beside ``stack`` (bench.run's), checks every design,
    measures each at ``CONCURRENCIES`` and the first-event latency, and stops them."""
    say = progress or (lambda text: print(text, file=sys.stderr, flush=True))
    out.mkdir(parents=True, exist_ok=True)
    rows: list[Row] = []
    with ExitStack() as cleanup:
        processes, _ = start(stack, out, cleanup)
        checks = verify(processes.targets)
        say(f"  answer paths: every design returned the fake's PNG; JSON bodies identical: {checks['json_identical']}")
        for concurrency in CONCURRENCIES:
            for target in processes.targets:
                try:
                    row = measure(
                        target,
                        concurrency,
                        wrk=wrk,
                        scripts=stack.scripts,
                        everyone=processes.everyone,
                        warmup_s=warmup_s,
                        max_warmup_s=max_warmup_s,
                        measure_s=measure_s,
                    )
                except RuntimeError as exc:
                    row = Row(target.design.key, concurrency, error=str(exc)[:300])
                rows.append(row)
                say(_progress_line(target.design, row))
        quiesce(processes.everyone)
        latency = first_event_latency(
            stack, processes.targets, counts={0.0: 5 if quick else 20, 1.0: 2 if quick else 5}
        )
    return {"checks": checks, "rows": [row.to_json() for row in rows], "latency": latency}


def _progress_line(design: Design, row: Row) -> str:
    if row.error:
        return f"  answer path {design.key} c={row.concurrency}: {row.error}"
    data = row.to_json()
    return (
        f"  answer path {design.server:<7} {design.label:<40} c={row.concurrency:<3} {row.rps:6.1f} answers/s "
        f"Envoy {data['envoy_cpu_ms'] or 0:6.2f} + server {data['server_cpu_ms'] or 0:6.2f} ms/answer "
        f"err {row.errors}"
    )


# -- report -----------------------------------------------------------------------------


def _num(value: float | None, digits: int = 1) -> str:
    return "—" if value is None else f"{value:.{digits}f}"


def render(summary: dict[str, Any], *, machine: dict[str, Any] | None = None) -> str:
    """The report's "Answer path" section (markdown) from ``run_section``'s summary;
    with ``machine`` (a run of this section alone) a title and the machine first."""
    designs = {design.key: design for design in DESIGNS}
    checks = summary["checks"]
    lines = []
    if machine is not None:
        lines += [
            "# imagegw benchmark: answer paths only",
            "",
            f"Machine: {machine['nproc']} CPUs ({machine['cpu_model']}), {machine['memory']}, Linux {machine['kernel']}, "
            f"Python {machine['python']}, Envoy {machine['envoy']}, {machine['wrk']}.",
            "",
        ]
    lines += [
        "## Answer path (issue 10 part 7): gateway CPU per 1.5 MB `b64_json` answer, upstream 0 s",
        "",
        (
            "wrk closed loop against each design in turn (alternated), one 1.5 MB image per answer. CPU = utime+stime "
            "of the design's Envoy and server over the window / 2xx answers its Envoy completed in the window; peak RSS "
            "= VmHWM over the run. imagegw rows: the real server and the fake upstream; (a) reaches the typed unary "
            "`GenerateImages` through a bench-only Envoy with `auto_mapping: true`, (c) is the product's "
            "`POST /v1/images/generations`. Echo rows: one prebuilt answer served in each shape by "
            "`bench/answer_echo.py` behind an Envoy with the product's rendered settings: the Envoy-only comparison. "
            "The fake upstream answers `stream: true` with plain JSON, so a streamed answer is one "
            "`image_generation.completed` event whatever `partial_images` says."
        ),
        "",
        (
            f"Checked before measuring: every design returned the fake's {checks['image_bytes']:,}-byte PNG "
            f"(sha256 `{checks['image_sha256'][:16]}…`), gRPC `GenerateImages` returned it as raw bytes, and the "
            + (
                f"JSON bodies of every non-streamed design are byte-identical ({next(iter(checks['json_bytes'].values())):,} B, "
                "`created` aside)."
                if checks["json_identical"]
                else f"JSON bodies DIFFER: sizes {checks['json_bytes']}."
            )
        ),
        "",
        (
            "| server | design | c | answers/s | Envoy CPU ms/answer | server CPU ms/answer | gateway CPU ms/answer | "
            "server minor faults/answer | Envoy peak RSS MiB | server peak RSS MiB | p50 ms | errors | machine CPU busy |"
        ),
        "|---|---|--:|--:|--:|--:|--:|--:|--:|--:|--:|--:|--:|",
    ]
    rows = sorted(
        summary["rows"],
        key=lambda r: (designs[r["design"]].server != "imagegw", r["concurrency"], list(designs).index(r["design"])),
    )
    for row in rows:
        design = designs[row["design"]]
        if row.get("error"):
            lines.append(
                f"| {design.server} | {design.label} | {row['concurrency']} | failed: {row['error'][:80]} ||||||||||"
            )
            continue
        lines.append(
            f"| {design.server} | {design.label} | {row['concurrency']} | {row['rps']:.1f} | {_num(row['envoy_cpu_ms'], 2)} | "
            f"{_num(row['server_cpu_ms'], 2)} | **{_num(row['gateway_cpu_ms'], 2)}** | "
            f"{_num(row.get('server_minflt_per_answer'), 0)} | {row['envoy_peak_kib'] / 1024:.0f} | "
            f"{row['server_peak_kib'] / 1024:.0f} | {row['p50_s'] * 1000:.0f} | {row['errors']} | "
            f"{100 * row['machine_busy']:.0f}% |"
        )
    lines += ["", *_verdict(summary["rows"])]
    lines += [
        "",
        "First event at concurrency 1 (one keep-alive connection, "
        "time from sending the request to the end of the first SSE event, and to the end of the answer):",
        "",
        "| upstream delay | request | n | first event p50 ms | first event max ms | whole answer p50 ms | whole answer max ms |",
        "|--:|---|--:|--:|--:|--:|--:|",
    ]
    label = {"fake": "fake upstream directly (the floor)", "c": "imagegw, not streamed"}
    for item in summary["latency"]:
        name = label.get(item["design"]) or f"imagegw, {designs[item['design']].label.removeprefix('(c) ')}"
        first = item["first_event_p50_s"]
        first_max = item["first_event_max_s"]
        lines.append(
            f"| {item['delay_s']:g} s | {name} | {item['n']} | {'—' if first is None else f'{first * 1000:.1f}'} | "
            f"{'—' if first_max is None else f'{first_max * 1000:.1f}'} | {item['whole_p50_s'] * 1000:.1f} | "
            f"{item['whole_max_s'] * 1000:.1f} |"
        )
    return "\n".join(lines) + "\n"


def _verdict(rows: list[dict[str, Any]]) -> list[str]:
    """The lowest gateway CPU per answer among the designs that keep both contracts."""
    by = {(r["design"], r["concurrency"]): r for r in rows if not r.get("error") and r["gateway_cpu_ms"]}
    out = []
    for concurrency in CONCURRENCIES:
        a, c = by.get(("a", concurrency)), by.get(("c", concurrency))
        ea, eb, ec = (by.get((key, concurrency)) for key in ("echo-a", "echo-b", "echo-c"))
        if a and c:
            best = "(c) HttpBody" if c["gateway_cpu_ms"] <= a["gateway_cpu_ms"] else "(a) typed `bytes`"
            out.append(
                f"- c={concurrency}, imagegw: (a) {a['gateway_cpu_ms']:.1f} ms (Envoy {a['envoy_cpu_ms']:.1f}) against "
                f"(c) {c['gateway_cpu_ms']:.1f} ms (Envoy {c['envoy_cpu_ms']:.1f}) per answer: lowest is **{best}**."
            )
        if ea and eb and ec:
            out.append(
                f"- c={concurrency}, Envoy alone (echo): (a) {ea['envoy_cpu_ms']:.1f}, (b) {eb['envoy_cpu_ms']:.1f}, "
                f"(c) {ec['envoy_cpu_ms']:.1f} ms per answer: (a) is {ea['envoy_cpu_ms'] / ec['envoy_cpu_ms']:.1f}× and "
                f"(b) {eb['envoy_cpu_ms'] / ec['envoy_cpu_ms']:.1f}× (c)."
            )
    return out
