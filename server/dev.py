"""``imagegw dev``: the whole stack on one machine, for people and for tests.

Starts the gRPC server and Envoy as child processes, waits until both are ready, makes
sure a development account and API key exist (kept in ``var/dev-key.json``), prints how
to call the gateway, and on Ctrl-C or SIGTERM stops both cleanly (the server drains
in-flight requests first). The process helpers are shared with the end-to-end tests.
"""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import time
from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import Any

import grpc
import httpx
from grpc_health.v1 import health_pb2, health_pb2_grpc
from imagegw.v1 import admin_pb2, admin_pb2_grpc, models_pb2, models_pb2_grpc

from server.config import Settings
from server.envoy import envoy_binary, write_envoy_config
from server.signals import StopSignals

__all__ = [
    "ensure_dev_key",
    "run_dev",
    "start_envoy",
    "start_server",
    "stop_process",
    "wait_for_envoy",
    "wait_for_grpc",
]


def start_server(env: Mapping[str, str], *, log_path: Path | None = None) -> subprocess.Popen[bytes]:
    """Starts ``imagegw serve`` with ``env`` (IMAGEGW_* settings) as a child process."""
    out = log_path.open("ab") if log_path else None
    return subprocess.Popen(
        [sys.executable, "-m", "server.cli", "serve"],
        env={**os.environ, **env},
        stdout=out,
        stderr=subprocess.STDOUT if out else None,
        # Own process group: a terminal's Ctrl-C reaches only `imagegw dev`, which then
        # stops the children in the right order.
        start_new_session=True,
    )


def start_envoy(
    settings: Settings,
    config_path: Path,
    *,
    upstreams: Sequence[tuple[str, int]] | None = None,
    log_path: Path | None = None,
) -> subprocess.Popen[bytes]:
    """Renders the Envoy config and starts Envoy. Hot restart is off so that several
    Envoys (tests, a developer's own) can run on one host."""
    write_envoy_config(settings, config_path, upstreams)
    out = log_path.open("ab") if log_path else None
    return subprocess.Popen(
        [
            envoy_binary(settings), "-c", str(config_path), "--disable-hot-restart", "--log-level", "warn",
            # Access log lines reach the log within a second instead of ten.
            "--file-flush-interval-msec", "1000",
        ],
        stdout=out,
        stderr=subprocess.STDOUT if out else None,
        # Own process group: a terminal's Ctrl-C reaches only `imagegw dev`, which then
        # stops the children in the right order.
        start_new_session=True,
    )


def wait_for_grpc(target: str, process: subprocess.Popen[bytes], timeout: float = 60) -> None:
    """Waits until the server at ``target`` reports SERVING."""
    deadline = time.monotonic() + timeout
    with grpc.insecure_channel(target) as channel:
        stub = health_pb2_grpc.HealthStub(channel)
        while time.monotonic() < deadline:
            if process.poll() is not None:
                raise RuntimeError(f"the gRPC server exited with status {process.returncode}")
            try:
                reply = stub.Check(health_pb2.HealthCheckRequest(service=""), timeout=1)
                if reply.status == health_pb2.HealthCheckResponse.SERVING:
                    return
            except grpc.RpcError:
                pass
            time.sleep(0.1)
    raise TimeoutError(f"the gRPC server at {target} did not become ready in {timeout:.0f} s")


def wait_for_envoy(settings: Settings, process: subprocess.Popen[bytes], timeout: float = 60) -> None:
    """Waits until Envoy is LIVE and has a healthy upstream (a models call passes)."""
    deadline = time.monotonic() + timeout
    ready_url = f"http://127.0.0.1:{settings.envoy_admin_port}/ready"
    with httpx.Client(timeout=2) as client:
        while time.monotonic() < deadline:
            if process.poll() is not None:
                raise RuntimeError(f"envoy exited with status {process.returncode}")
            try:
                if client.get(ready_url).text.strip() == "LIVE":
                    # 401 means the request crossed Envoy and reached a healthy server.
                    probe = client.get(f"http://{settings.http_host}:{settings.http_port}/v1/models")
                    if probe.status_code == 401:
                        return
            except httpx.HTTPError:
                pass
            time.sleep(0.1)
    raise TimeoutError(f"envoy did not become ready in {timeout:.0f} s")


def stop_process(process: subprocess.Popen[bytes], timeout: float = 45) -> int:
    """SIGTERM, then SIGKILL if it does not exit within ``timeout``."""
    if process.poll() is None:
        process.send_signal(signal.SIGTERM)
        try:
            process.wait(timeout)
        except subprocess.TimeoutExpired:
            process.kill()
            process.wait()
    return process.returncode


def ensure_dev_key(settings: Settings) -> dict[str, Any]:
    """The development account's key from var/dev-key.json, made on first start (or again
    when the kept key no longer works, e.g. it was revoked)."""
    path = settings.var_dir / "dev-key.json"
    with grpc.insecure_channel(settings.grpc_target) as channel:
        if path.exists():
            kept: dict[str, Any] = json.loads(path.read_text())
            try:
                models_pb2_grpc.ModelServiceStub(channel).ListModels(
                    models_pb2.ListModelsRequest(), metadata=(("authorization", f"Bearer {kept['api_key']}"),), timeout=10
                )
                return kept
            except grpc.RpcError as exc:
                if exc.code() != grpc.StatusCode.UNAUTHENTICATED:
                    raise
        admin = admin_pb2_grpc.AdminServiceStub(channel)
        auth = (("authorization", f"Bearer {settings.secret('admin_token')}"),)
        name = "dev"
        try:
            account = admin.CreateAccount(
                admin_pb2.CreateAccountRequest(name=name, balance_usd=settings.dev_account_balance_usd),
                metadata=auth,
                timeout=10,
            ).account
        except grpc.RpcError as exc:
            if exc.code() != grpc.StatusCode.INVALID_ARGUMENT:
                raise
            # The account exists but its key was lost or revoked: look it up via the kept file.
            account_id = json.loads(path.read_text())["account_id"] if path.exists() else None
            if account_id is None:
                raise
            account = admin.GetAccount(
                admin_pb2.GetAccountRequest(account_id=account_id), metadata=auth, timeout=10
            ).account
        key = admin.CreateApiKey(
            admin_pb2.CreateApiKeyRequest(account_id=account.account_id, name="dev"), metadata=auth, timeout=10
        )
    record = {"account_id": account.account_id, "key_id": key.api_key.key_id, "api_key": key.key_string}
    path.write_text(json.dumps(record, indent=2))
    path.chmod(0o600)
    return record


def _banner(settings: Settings, key: Mapping[str, Any]) -> str:
    base = f"{settings.base_url}/v1"
    return f"""
imagegw is running.
  REST (OpenAI-compatible): {base}
  gRPC:                     {settings.grpc_target}  (reflection on; try: grpcurl -plaintext {settings.grpc_target} list)
  development API key:      {key['api_key']}   (account {key['account_id']}, kept in {settings.var_dir / 'dev-key.json'})

Try it:
  curl -sS -X POST {base}/images/generations \\
    -H "Content-Type: application/json" -H "Authorization: Bearer {key['api_key']}" \\
    -d '{{"model": "local-1", "prompt": "A watercolor painting of a mountain lake", "n": 1, "size": "1024x1024"}}'

  python -c 'from openai import OpenAI; c = OpenAI(api_key="{key['api_key']}", base_url="{base}"); print(c.images.generate(model="local-1", prompt="a lighthouse at dusk", size="512x512").data[0].url)'

Ctrl-C stops both processes.
"""


def run_dev(settings: Settings) -> int:
    """Runs the stack until Ctrl-C / SIGTERM; returns the exit status."""
    settings.var_dir.mkdir(parents=True, exist_ok=True)
    if not settings.descriptor_file.exists():
        print(f"{settings.descriptor_file} is missing; run `make descriptor` first", file=sys.stderr)
        return 2
    stop = StopSignals()
    server = start_server({})
    envoy: subprocess.Popen[bytes] | None = None
    try:
        for target in settings.grpc_targets:
            wait_for_grpc(target, server)
        envoy = start_envoy(settings, settings.envoy_config_out or settings.var_dir / "envoy.yaml")
        wait_for_envoy(settings, envoy)
        print(_banner(settings, ensure_dev_key(settings)), flush=True)
        while not stop.requested and server.poll() is None and envoy.poll() is None:
            time.sleep(0.2)
        return 0 if stop.requested else 1
    finally:
        # Server first: it drains while Envoy still carries the in-flight responses.
        stop_process(server, timeout=settings.shutdown_grace_seconds + settings.shutdown_drain_seconds + 10)
        if envoy is not None:
            stop_process(envoy)
