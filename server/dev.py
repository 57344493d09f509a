"""``imagegw dev``: the whole stack on one machine, for people and for tests.

Starts the gRPC server and Envoy as child processes, waits until both are ready, makes
sure a development account and API key exist (kept in ``var/dev-key.json``), prints how
to call the gateway, and on Ctrl-C or SIGTERM stops both cleanly (the server drains
in-flight requests first). The process helpers are shared with the end-to-end tests.
"""

from __future__ import annotations

import importlib.util
import json
import os
import shlex
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
    "banner",
    "ensure_dev_key",
    "example_model",
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


def example_model(settings: Settings) -> str | None:
    """The model the banner's examples use: the default model if this server serves it,
    else the first image model it serves (None when it serves none)."""
    from server.catalog import load_catalog
    from server.providers import enabled_providers

    specs = load_catalog(settings.catalog_file)
    enabled = enabled_providers(settings, specs)
    served = sorted(spec.id for spec in specs if spec.is_image and spec.provider in enabled)
    if settings.default_model in served:
        return settings.default_model
    return served[0] if served else None


def _command(executable: Path) -> str:
    """How to type ``executable`` here: relative to the current directory when it is
    below it (``.venv/bin/python`` after ``make run``), else its absolute path."""
    absolute = executable.absolute()
    try:
        return shlex.quote(str(absolute.relative_to(Path.cwd())))
    except ValueError:
        return shlex.quote(str(absolute))


def banner(settings: Settings, key: Mapping[str, Any], model: str | None) -> str:
    """What ``imagegw dev`` prints once the stack is up: every command runs as pasted."""
    base = f"{settings.base_url}/v1"
    bin_dir = Path(sys.executable).parent
    grpcurl = _command(bin_dir / "grpcurl") if (bin_dir / "grpcurl").exists() else "grpcurl"
    lines = [
        "",
        "imagegw is running.",
        f"  REST (OpenAI-compatible): {base}",
        f"  gRPC:                     {settings.grpc_target}  (reflection on; try: {grpcurl} -plaintext {settings.grpc_target} list)",
        f"  development API key:      {key['api_key']}   (account {key['account_id']}, kept in {settings.var_dir / 'dev-key.json'})",
        "",
    ]
    if model is None:
        lines += ["No image model is enabled: set a provider's key (see the README) and restart.", ""]
    else:
        body = json.dumps({"model": model, "prompt": "A watercolor painting of a mountain lake"})
        lines += [
            "Try it:",
            f"  curl -sS -X POST {base}/images/generations \\",
            f'    -H "Content-Type: application/json" -H "Authorization: Bearer {key["api_key"]}" \\',
            f"    -d '{body}'",
            "",
        ]
        if importlib.util.find_spec("openai") is not None:
            code = (
                f'from openai import OpenAI; c = OpenAI(api_key="{key["api_key"]}", base_url="{base}"); '
                f'print(c.images.generate(model="{model}", prompt="a lighthouse at dusk").data[0].url)'
            )
            lines += [f"  {_command(Path(sys.executable))} -c '{code}'", ""]
    lines += ["Ctrl-C stops both processes.", ""]
    return "\n".join(lines)


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
        try:
            for target in settings.grpc_targets:
                wait_for_grpc(target, server)
            envoy = start_envoy(settings, settings.envoy_config_out or settings.var_dir / "envoy.yaml")
            wait_for_envoy(settings, envoy)
        except (RuntimeError, TimeoutError) as exc:
            # The child has said why on this terminal already; no traceback of ours on top.
            print(f"imagegw dev: {exc}", file=sys.stderr)
            return 1
        print(banner(settings, ensure_dev_key(settings), example_model(settings)), flush=True)
        while not stop.requested and server.poll() is None and envoy.poll() is None:
            time.sleep(0.2)
        return 0 if stop.requested else 1
    finally:
        # Server first: it drains while Envoy still carries the in-flight responses.
        stop_process(server, timeout=settings.shutdown_grace_seconds + settings.shutdown_drain_seconds + 10)
        if envoy is not None:
            stop_process(envoy)
