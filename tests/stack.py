"""Real stacks for tests: an in-process grpc.aio server, or server processes behind Envoy.

Nothing here is a mock. ``InProcessStack`` is the production composition root
(``build_app`` + ``build_server``) on ``127.0.0.1:0``, optionally with the real Envoy in
front (so a test can put a scripted provider behind the REST surface); ``ProcessStack`` runs
``imagegw serve`` processes and the real Envoy binary, exactly like ``imagegw dev``.
Both listen on loopback only.
"""

from __future__ import annotations

import asyncio
import contextlib
import json
import os
import secrets
import socket
import subprocess
import sys
from collections.abc import AsyncIterator, Iterable, Iterator, Mapping
from contextlib import AsyncExitStack
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import grpc
import httpx
from imagegw.v1 import admin_pb2, admin_pb2_grpc, images_pb2_grpc, models_pb2_grpc

from server.api.interceptors import ServerInterceptor
from server.app import App, build_app, build_interceptor, build_server, set_serving
from server.config import Settings
from server.dev import start_envoy, start_server, stop_process, wait_for_envoy, wait_for_grpc
from server.providers.base import ImageProvider

ROOT = Path(__file__).resolve().parent.parent
DESCRIPTOR = ROOT / "build" / "imagegw.pb"


def metric_sample(metrics: str, name: str, **labels: str) -> float:
    """The sum of the samples of ``name`` whose labels include ``labels``, in Prometheus text
    format (0 when there are none): one sample when every label is given."""
    total = 0.0
    for line in metrics.splitlines():
        if not line.startswith((name + "{", name + " ")):
            continue
        head, _, value = line.rpartition(" ")
        if all(f'{k}="{v}"' in head for k, v in labels.items()):
            total += float(value)
    return total


def free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        port: int = sock.getsockname()[1]
        return port


def free_ports(count: int, avoid: Iterable[int] = ()) -> int:
    """The first of ``count`` consecutive free ports (workers listen on port + i), none of
    them in ``avoid`` (ports already handed out, free until their process binds them)."""
    avoided = set(avoid)
    for _ in range(200):
        first = free_port()
        if avoided.intersection(range(first, first + count)):
            continue
        try:
            with contextlib.ExitStack() as held:
                for port in range(first, first + count):
                    sock = held.enter_context(socket.socket())
                    sock.bind(("127.0.0.1", port))
        except OSError:
            continue
        return first
    raise RuntimeError(f"no {count} consecutive free ports")


def base_env(var_dir: Path, **overrides: Any) -> dict[str, str]:
    """IMAGEGW_* variables for a fresh, isolated stack under ``var_dir``."""
    env = {
        "IMAGEGW_VAR_DIR": str(var_dir),
        "IMAGEGW_GRPC_PORT": str(free_port()),
        "IMAGEGW_HTTP_PORT": str(free_port()),
        "IMAGEGW_ENVOY_ADMIN_PORT": str(free_port()),
        "IMAGEGW_METRICS_PORT": str(free_port()),
        "IMAGEGW_ADMIN_TOKEN": "admin-" + secrets.token_urlsafe(16),
        "IMAGEGW_URL_SIGNING_SECRET": secrets.token_urlsafe(32),
        "IMAGEGW_KEY_HASH_SECRET": secrets.token_urlsafe(32),
        "IMAGEGW_DESCRIPTOR_FILE": str(DESCRIPTOR),
        "IMAGEGW_SHUTDOWN_DRAIN_SECONDS": "0",
        "IMAGEGW_LOG_LEVEL": "INFO",
    }
    env.update({f"IMAGEGW_{key.upper()}": str(value) for key, value in overrides.items()})
    return env


@contextlib.contextmanager
def settings_env(env: Mapping[str, str]) -> Iterator[Settings]:
    """Settings read from ``env`` exactly as a process would read them."""
    saved = {key: os.environ.get(key) for key in env}
    os.environ.update(env)
    try:
        yield Settings()
    finally:
        for key, value in saved.items():
            if value is None:
                os.environ.pop(key, None)
            else:
                os.environ[key] = value


def settings_from(env: Mapping[str, str]) -> Settings:
    with settings_env(env) as settings:
        return settings


def status_of(record: admin_pb2.UsageRecord) -> str:
    """A usage record's status enum as the word it stands for (STATUS_FAILED: "failed")."""
    return admin_pb2.UsageRecord.Status.Name(record.status).removeprefix("STATUS_").lower()


@dataclass
class Admin:
    """Operator calls over the real AdminService."""

    channel: grpc.aio.Channel
    token: str

    @property
    def stub(self) -> admin_pb2_grpc.AdminServiceStub:
        return admin_pb2_grpc.AdminServiceStub(self.channel)

    @property
    def auth(self) -> tuple[tuple[str, str]]:
        return (("authorization", f"Bearer {self.token}"),)

    async def account(self, balance_usd: str, name: str | None = None) -> str:
        created = await self.stub.CreateAccount(
            admin_pb2.CreateAccountRequest(name=name or f"acct-{secrets.token_hex(6)}", balance_usd=balance_usd),
            metadata=self.auth,
        )
        return created.account.account_id

    async def key(self, account_id: str) -> str:
        created = await self.stub.CreateApiKey(admin_pb2.CreateApiKeyRequest(account_id=account_id), metadata=self.auth)
        return created.key_string

    async def funded_key(self, balance_usd: str = "100.00") -> tuple[str, str]:
        """A new account with ``balance_usd`` and a key for it: (account_id, api_key)."""
        account_id = await self.account(balance_usd)
        return account_id, await self.key(account_id)

    async def get(self, account_id: str) -> admin_pb2.Account:
        reply = await self.stub.GetAccount(admin_pb2.GetAccountRequest(account_id=account_id), metadata=self.auth)
        return reply.account

    async def settled(self, account_id: str, timeout: float = 10) -> admin_pb2.Account:
        """The account once nothing is reserved any more (or as it is after ``timeout``):
        a cancelled or failed request settles just after its answer went out."""
        deadline = asyncio.get_running_loop().time() + timeout
        while True:
            account = await self.get(account_id)
            if account.reserved_usd == "0.000000" or asyncio.get_running_loop().time() >= deadline:
                return account
            await asyncio.sleep(0.05)

    async def limits(self, account_id: str) -> admin_pb2.RateLimits:
        reply = await self.stub.GetRateLimits(admin_pb2.GetRateLimitsRequest(account_id=account_id), metadata=self.auth)
        return reply.rate_limits

    async def set_limits(self, account_id: str, **limits: int) -> admin_pb2.RateLimits:
        reply = await self.stub.SetRateLimits(
            admin_pb2.SetRateLimitsRequest(account_id=account_id, **limits), metadata=self.auth
        )
        return reply.rate_limits

    async def reconcile(self) -> admin_pb2.ReconcileResponse:
        return await self.stub.Reconcile(admin_pb2.ReconcileRequest(), metadata=self.auth)

    async def usage(self, account_id: str) -> list[admin_pb2.UsageRecord]:
        """Every usage record of the account, newest first (all pages)."""
        request = admin_pb2.ListUsageRequest(account_id=account_id, page_size=1000)
        records: list[admin_pb2.UsageRecord] = []
        while True:
            reply = await self.stub.ListUsage(request, metadata=self.auth)
            records += reply.usage_records
            if not reply.next_page_token:
                return records
            request.page_token = reply.next_page_token


def cli_env(stack: ProcessStack, token: str | None = None) -> dict[str, str]:
    """The environment an operator's ``imagegw`` command has on the stack's machine."""
    return {
        **os.environ,
        "IMAGEGW_GRPC_PORT": str(stack.settings.grpc_port),
        "IMAGEGW_VAR_DIR": stack.env["IMAGEGW_VAR_DIR"],
        "IMAGEGW_ADMIN_TOKEN": token or stack.env["IMAGEGW_ADMIN_TOKEN"],
    }


def run_cli(stack: ProcessStack, *args: str, token: str | None = None, timeout: float = 60) -> tuple[int, Any]:
    """Runs ``imagegw ARGS --json`` against the stack's server as an operator would:
    (exit status, its JSON: stdout on success, stderr on failure)."""
    result = subprocess.run(
        [sys.executable, "-m", "server.cli", *args, "--json"], env=cli_env(stack, token), capture_output=True,
        text=True, timeout=timeout,
    )
    return result.returncode, json.loads(result.stdout if result.returncode == 0 else result.stderr)


async def cli(stack: ProcessStack, *args: str, token: str | None = None) -> tuple[int, Any]:
    """:func:`run_cli` on a thread, for async tests."""
    return await asyncio.to_thread(run_cli, stack, *args, token=token)


@dataclass
class InProcessStack:
    """The production server in this process, reached over a real gRPC channel (and
    through the real Envoy when started with ``envoy=True``)."""

    app: App
    channel: grpc.aio.Channel
    admin: Admin
    envoy: subprocess.Popen[bytes] | None = None
    logs: Path | None = None
    interceptor: ServerInterceptor | None = None

    @property
    def api_base(self) -> str:
        """Envoy's REST base URL (``envoy=True`` only)."""
        assert self.envoy is not None, "started without envoy=True"
        return f"http://127.0.0.1:{self.app.settings.http_port}/v1"

    def envoy_log(self) -> str:
        assert self.logs is not None
        return (self.logs / "envoy.log").read_text(errors="replace")

    @property
    def images(self) -> images_pb2_grpc.ImageServiceStub:
        return images_pb2_grpc.ImageServiceStub(self.channel)

    @property
    def models(self) -> models_pb2_grpc.ModelServiceStub:
        return models_pb2_grpc.ModelServiceStub(self.channel)


@contextlib.asynccontextmanager
async def in_process_stack(
    var_dir: Path,
    *,
    providers: Mapping[str, ImageProvider] | None = None,
    envoy: bool = False,
    extra_env: Mapping[str, str] | None = None,
    **overrides: Any,
) -> AsyncIterator[InProcessStack]:
    """``envoy``: the real Envoy in front as well; ``extra_env``: variables other than
    IMAGEGW_* (the AWS ones of an S3 store)."""
    env = {**base_env(var_dir, **overrides), **(extra_env or {})}
    settings = settings_from(env)
    async with AsyncExitStack() as stack:
        app = await build_app(settings, stack, providers=providers)
        interceptor = build_interceptor(app)
        server = build_server(app, interceptor)
        port = server.add_insecure_port("127.0.0.1:0")
        await server.start()
        await set_serving(app)
        stack.push_async_callback(server.stop, None)
        channel = grpc.aio.insecure_channel(f"127.0.0.1:{port}")
        stack.push_async_callback(channel.close)
        proxy, logs = None, None
        if envoy:
            logs = var_dir / "logs"
            logs.mkdir(parents=True, exist_ok=True)
            proxy = start_envoy(settings, var_dir / "envoy.yaml", upstreams=[("127.0.0.1", port)], log_path=logs / "envoy.log")
            stack.callback(stop_process, proxy, timeout=10)
            # In a thread: the server answering Envoy's health checks runs on this loop.
            await asyncio.to_thread(wait_for_envoy, settings, proxy)
        yield InProcessStack(
            app=app, channel=channel, admin=Admin(channel, env["IMAGEGW_ADMIN_TOKEN"]), envoy=proxy, logs=logs,
            interceptor=interceptor,
        )


@dataclass
class ProcessStack:
    """``imagegw serve`` processes behind the real Envoy."""

    settings: Settings
    env: dict[str, str]
    servers: list[subprocess.Popen[bytes]]
    envoy: subprocess.Popen[bytes]
    channel: grpc.aio.Channel
    grpc_targets: list[str]
    metrics_ports: list[int]
    logs: Path
    admin: Admin = field(init=False)

    def __post_init__(self) -> None:
        self.admin = Admin(self.channel, self.env["IMAGEGW_ADMIN_TOKEN"])

    @property
    def base_url(self) -> str:
        return f"http://127.0.0.1:{self.settings.http_port}"

    @property
    def api_base(self) -> str:
        return f"{self.base_url}/v1"

    @property
    def images(self) -> images_pb2_grpc.ImageServiceStub:
        return images_pb2_grpc.ImageServiceStub(self.channel)

    async def metrics(self, index: int = 0) -> str:
        """The /metrics page (Prometheus text format) of a server, or of a worker group."""
        async with httpx.AsyncClient() as client:
            response = await client.get(f"http://127.0.0.1:{self.metrics_ports[index]}/metrics")
        response.raise_for_status()
        return response.text

    async def envoy_host_stats(self) -> dict[str, dict[str, str]]:
        """Envoy's per-upstream-host stats (``/clusters``): {"127.0.0.1:port": {"rq_total": "12", ...}}."""
        async with httpx.AsyncClient(timeout=5) as client:
            text = (await client.get(f"http://127.0.0.1:{self.settings.envoy_admin_port}/clusters")).text
        hosts: dict[str, dict[str, str]] = {}
        for line in text.splitlines():
            parts = line.split("::")
            if len(parts) == 4 and parts[0] == "imagegw" and ":" in parts[1]:
                hosts.setdefault(parts[1], {})[parts[2]] = parts[3]
        return hosts

    def start_replica(self, index: int) -> subprocess.Popen[bytes]:
        """Starts replica ``index`` again on its own ports (after it stopped or was killed),
        replacing its process in ``servers``; does not wait for it."""
        port = self.grpc_targets[index].rpartition(":")[2]
        own = {"IMAGEGW_GRPC_PORT": port, "IMAGEGW_METRICS_PORT": str(self.metrics_ports[index])}
        restarts = len(list(self.logs.glob(f"server-{index}*.log")))
        self.servers[index] = start_server({**self.env, **own}, log_path=self.logs / f"server-{index}.{restarts}.log")
        return self.servers[index]

    def server_log(self, index: int = 0) -> str:
        return (self.logs / f"server-{index}.log").read_text(errors="replace")

    def envoy_log(self) -> str:
        return (self.logs / "envoy.log").read_text(errors="replace")

    async def envoy_access_log(self, request_ids: Iterable[str], timeout: float = 10) -> dict[str, dict[str, Any]]:
        """Envoy's access-log line of each request id, once every one has been written
        (Envoy flushes its log every second)."""
        wanted = set(request_ids)
        deadline = asyncio.get_running_loop().time() + timeout
        while True:
            lines = [json.loads(line) for line in self.envoy_log().splitlines() if line.startswith("{")]
            found = {line["request_id"]: line for line in lines if line.get("request_id") in wanted}
            if len(found) == len(wanted) or asyncio.get_running_loop().time() > deadline:
                return found
            await asyncio.sleep(0.2)


@contextlib.asynccontextmanager
async def process_stack(
    var_dir: Path,
    *,
    servers: int = 1,
    workers: int = 1,
    extra_env: Mapping[str, str] | None = None,
    **overrides: Any,
) -> AsyncIterator[ProcessStack]:
    """Starts ``servers`` server processes (replicas) sharing one database, and Envoy in
    front; or, with ``workers`` > 1, one ``imagegw serve`` running that many workers,
    with Envoy configured from the settings alone, as ``imagegw dev`` does.
    ``extra_env``: variables other than IMAGEGW_* (the AWS ones of an S3 store)."""
    assert servers == 1 or workers == 1, "replicas of a multi-worker server are not needed by any test"
    if workers > 1:
        overrides |= {"workers": workers}
    env = {**base_env(var_dir, **overrides), **(extra_env or {})}
    if workers > 1:
        # After the other ports are picked: a range picked first could be handed out again.
        taken = [int(value) for key, value in env.items() if key.endswith("_PORT")]
        env["IMAGEGW_GRPC_PORT"] = str(free_ports(workers, avoid=taken))
    logs = var_dir / "logs"
    logs.mkdir(parents=True, exist_ok=True)
    settings = settings_from(env)
    ports = [int(target.rpartition(":")[2]) for target in settings.grpc_targets]
    ports += [free_port() for _ in range(servers - 1)]
    # With workers, the supervisor serves the whole group's metrics on the one port.
    metrics_ports = [settings.metrics_port] + [free_port() for _ in range(servers - 1)]
    processes: list[subprocess.Popen[bytes]] = []
    envoy: subprocess.Popen[bytes] | None = None
    try:
        for index, port in enumerate(ports[:servers]):
            own = {"IMAGEGW_GRPC_PORT": str(port), "IMAGEGW_METRICS_PORT": str(metrics_ports[index])}
            processes.append(start_server({**env, **own}, log_path=logs / f"server-{index}.log"))
            # Migrations run on start; let the first server create the schema alone.
            if index == 0:
                wait_for_grpc(f"127.0.0.1:{port}", processes[0])
        for index, port in enumerate(ports):
            wait_for_grpc(f"127.0.0.1:{port}", processes[min(index, len(processes) - 1)])
        envoy = start_envoy(
            settings,
            var_dir / "envoy.yaml",
            upstreams=None if workers > 1 else [("127.0.0.1", port) for port in ports],
            log_path=logs / "envoy.log",
        )
        wait_for_envoy(settings, envoy)
        async with grpc.aio.insecure_channel(settings.grpc_target) as channel:
            yield ProcessStack(
                settings=settings,
                env=env,
                servers=processes,
                envoy=envoy,
                channel=channel,
                grpc_targets=[f"127.0.0.1:{port}" for port in ports],
                metrics_ports=metrics_ports,
                logs=logs,
            )
    finally:
        for process in processes:
            stop_process(process, timeout=20)
        if envoy is not None:
            stop_process(envoy, timeout=10)
