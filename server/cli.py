"""The ``imagegw`` command.

    imagegw serve                  run the gRPC server (what a container runs)
    imagegw dev                    run the server and Envoy together on embedded defaults
    imagegw migrate                apply database migrations and exit
    imagegw envoy-config           print the Envoy config rendered for these settings
    imagegw accounts create|credit|show|limits ...   operator commands over AdminService
    imagegw keys create|revoke ...
    imagegw usage --account ID     every page of an account's usage
    imagegw reconcile

Settings come from ``IMAGEGW_*`` variables (server/config.py). Operator commands talk
to a running server over gRPC with the admin token (``IMAGEGW_ADMIN_TOKEN``, or the one
generated under ``var/`` on this machine). Every command that changes something sends a
request id (a new UUID unless ``--request-id`` gives one) and prints it: run the command
again with ``--request-id`` when its outcome is unknown (a timeout), and the change is
made at most once (AIP-155).
"""

from __future__ import annotations

import argparse
import asyncio
import json
import os
import sys
import uuid
from collections.abc import Awaitable, Callable, Sequence
from typing import Any

import grpc
from google.protobuf import json_format
from google.protobuf.message import Message
from imagegw.v1 import admin_pb2, admin_pb2_grpc
from pydantic import ValidationError

from server.config import ConfigError, Settings, describe_settings_error
from server.logs import configure_logging

__all__ = ["main"]

Metadata = tuple[tuple[str, str], ...]


def _admin_call(
    settings: Settings, target: str | None, calls: Callable[[admin_pb2_grpc.AdminServiceStub, Metadata], Awaitable[Any]]
) -> Any:
    async def run() -> Any:
        async with grpc.aio.insecure_channel(target or settings.grpc_target) as channel:
            return await calls(admin_pb2_grpc.AdminServiceStub(channel), (
                ("authorization", f"Bearer {settings.secret('admin_token')}"),
            ))

    return asyncio.run(run())


def _to_dict(message: Message) -> dict[str, Any]:
    return json_format.MessageToDict(
        message, preserving_proto_field_name=True, always_print_fields_with_no_presence=True
    )


def _print(result: dict[str, Any], as_json: bool) -> None:
    if as_json:
        print(json.dumps(result, indent=2))
        return
    for key, value in _flatten(result):
        print(f"{key}: {value}")


def _flatten(value: Any, prefix: str = "") -> list[tuple[str, Any]]:
    if isinstance(value, dict):
        return [pair for key, item in value.items() for pair in _flatten(item, f"{prefix}.{key}" if prefix else key)]
    if isinstance(value, list) and value and isinstance(value[0], dict):
        return [pair for i, item in enumerate(value) for pair in _flatten(item, f"{prefix}[{i}]")]
    return [(prefix, value)]


def _error_payload(exc: grpc.aio.AioRpcError, timeout: float) -> dict[str, Any]:
    for key, value in exc.trailing_metadata() or ():
        if key == "x-openai-error" and isinstance(value, str):
            body: dict[str, Any] = json.loads(value)["error"]
            return body
    if exc.code() == grpc.StatusCode.DEADLINE_EXCEEDED:
        return {
            "message": f"No answer within {timeout:g} s: the change may or may not have been made.",
            "type": "server_error",
            "param": None,
            "code": "timeout",
        }
    return {"message": exc.details() or exc.code().name, "type": "server_error", "param": None, "code": None}


def _outcome_unknown(error: dict[str, Any]) -> bool:
    """Whether a failed change may still have been made: no answer (a timeout, a dropped
    connection) or a server error, as opposed to the server's refusal of the request."""
    return error["type"] == "server_error"


def _int32(text: str) -> int:
    # The server checks the range it accepts; this only keeps the value in the proto's int32.
    try:
        value = int(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"not a whole number: {text!r}") from None
    if not -(2**31) <= value < 2**31:
        raise argparse.ArgumentTypeError(f"out of range: {text}")
    return value


def _parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="imagegw", description="OpenAI-compatible image generation gateway")
    sub = parser.add_subparsers(dest="command", required=True)
    sub.add_parser("serve", help="run the gRPC server")
    sub.add_parser("dev", help="run the gRPC server and Envoy together")
    sub.add_parser("migrate", help="apply database migrations")
    sub.add_parser("envoy-config", help="print the rendered Envoy config")

    def admin(p: argparse.ArgumentParser, *, changes: bool = False) -> argparse.ArgumentParser:
        p.add_argument("--json", action="store_true", help="print JSON")
        p.add_argument("--target", help="gRPC address of the server (default: IMAGEGW_GRPC_HOST:PORT)")
        p.add_argument("--timeout", type=float, default=30, help="seconds to wait for the answer (default 30)")
        if changes:
            p.add_argument(
                "--request-id",
                help="the change's request id (default: a new UUID, printed); give the printed one to retry "
                "a call whose outcome is unknown: the change is made at most once",
            )
        return p

    accounts = sub.add_parser("accounts", help="manage accounts").add_subparsers(dest="action", required=True)
    create = admin(accounts.add_parser("create", help="create an account"), changes=True)
    create.add_argument("--name", required=True)
    create.add_argument("--balance", default="0", help="opening balance in USD, e.g. 5.00")
    credit = admin(accounts.add_parser("credit", help="add money to an account"), changes=True)
    credit.add_argument("--account", required=True)
    credit.add_argument("--amount", required=True, help="USD, e.g. 2.50")
    show = admin(accounts.add_parser("show", help="show an account"))
    show.add_argument("--account", required=True)
    limits = admin(
        accounts.add_parser(
            "limits",
            help="show the rate limits of each of an account's API keys, or set them with --rpm/--ipm/--defaults "
            "(0 = unlimited)",
        ),
        changes=True,
    )
    limits.add_argument("--account", required=True)
    limits.add_argument("--rpm", type=_int32, help="requests per minute per key; 0 = unlimited")
    limits.add_argument("--ipm", type=_int32, help="images per minute per key; 0 = unlimited")
    limits.add_argument(
        "--defaults", action="store_true", help="go back to the server defaults for whatever --rpm/--ipm do not set"
    )

    keys = sub.add_parser("keys", help="manage API keys").add_subparsers(dest="action", required=True)
    key_create = admin(keys.add_parser("create", help="issue an API key (shown once)"), changes=True)
    key_create.add_argument("--account", required=True)
    key_create.add_argument("--name", default="")
    revoke = admin(keys.add_parser("revoke", help="revoke an API key"), changes=True)
    revoke.add_argument("--key-id", required=True)

    usage = admin(sub.add_parser("usage", help="list an account's usage (every page)"))
    usage.add_argument("--account", required=True)
    usage.add_argument("--page-size", type=_int32, default=1000, help="records per call (1-1000)")
    admin(sub.add_parser("reconcile", help="check every balance against the ledger"))
    return parser


def _admin_request(args: argparse.Namespace, request_id: str) -> tuple[str, Message]:
    """The RPC and request of an operator command; ``request_id`` goes on every change."""
    match (args.command, getattr(args, "action", None)):
        case ("accounts", "create"):
            return "CreateAccount", admin_pb2.CreateAccountRequest(
                name=args.name, balance_usd=args.balance, request_id=request_id
            )
        case ("accounts", "credit"):
            return "CreditAccount", admin_pb2.CreditAccountRequest(
                account_id=args.account, amount_usd=args.amount, request_id=request_id
            )
        case ("accounts", "show"):
            return "GetAccount", admin_pb2.GetAccountRequest(account_id=args.account)
        case ("accounts", "limits") if args.rpm is None and args.ipm is None and not args.defaults:
            return "GetRateLimits", admin_pb2.GetRateLimitsRequest(account_id=args.account)
        case ("accounts", "limits"):
            return "SetRateLimits", admin_pb2.SetRateLimitsRequest(
                account_id=args.account,
                requests_per_minute=args.rpm,
                images_per_minute=args.ipm,
                use_defaults=args.defaults,
                request_id=request_id,
            )
        case ("keys", "create"):
            return "CreateApiKey", admin_pb2.CreateApiKeyRequest(
                account_id=args.account, name=args.name, request_id=request_id
            )
        case ("keys", "revoke"):
            return "RevokeApiKey", admin_pb2.RevokeApiKeyRequest(key_id=args.key_id, request_id=request_id)
        case ("usage", _):
            return "ListUsage", admin_pb2.ListUsageRequest(account_id=args.account, page_size=args.page_size)
        case ("reconcile", _):
            return "Reconcile", admin_pb2.ReconcileRequest()
    raise SystemExit(f"unknown command {args.command}")


def _run_admin(settings: Settings, args: argparse.Namespace) -> int:
    """One operator command over AdminService; prints its answer (and the request id of a change)."""
    request_id = getattr(args, "request_id", None) or str(uuid.uuid4())
    method, request = _admin_request(args, request_id)
    changes = request.DESCRIPTOR.fields_by_name.get("request_id") is not None
    # The request id also names the call in the server's logs (x-request-id).
    log_id = (("x-request-id", request_id),) if changes else ()

    async def call(stub: admin_pb2_grpc.AdminServiceStub, auth: Metadata) -> dict[str, Any]:
        rpc = getattr(stub, method)
        if method != "ListUsage":
            return _to_dict(await rpc(request, metadata=auth + log_id, timeout=args.timeout))
        # Every page, in order: the server's order is stable, so nothing is skipped or repeated.
        records: list[dict[str, Any]] = []
        assert isinstance(request, admin_pb2.ListUsageRequest)
        while True:
            page = await rpc(request, metadata=auth, timeout=args.timeout)
            records += _to_dict(page)["usage_records"]
            if not page.next_page_token:
                return {"usage_records": records}
            request.page_token = page.next_page_token

    shown = {"request_id": request_id} if changes else {}
    try:
        result = _admin_call(settings, args.target, call)
    except grpc.aio.AioRpcError as exc:
        error = _error_payload(exc, args.timeout)
        if args.json:
            print(json.dumps({"error": error, **shown}, indent=2), file=sys.stderr)
        else:
            print(f"error: {error['message']}", file=sys.stderr)
            if changes:
                # A refusal (bad input, a reused id) changed nothing and would be refused
                # again: the retry advice is only for an outcome the operator cannot know.
                hint = f" (retry with --request-id {request_id}: at most once)" if _outcome_unknown(error) else ""
                print(f"request_id: {request_id}{hint}", file=sys.stderr)
        return 1
    _print({**shown, **result}, args.json)
    return 0


def main(argv: Sequence[str] | None = None) -> int:
    args = _parser().parse_args(argv)
    try:
        settings = Settings()
    except ValidationError as exc:
        return _configuration_failed(describe_settings_error(exc))
    configure_logging(settings.log_level)
    try:
        status = _run(args, settings)
        sys.stdout.flush()
    except ConfigError as exc:
        return _configuration_failed(str(exc))
    except BrokenPipeError:
        # The reader went away (`imagegw usage --json | head`): stop quietly, as other
        # commands do; stdout goes to /dev/null so that the flush at exit cannot fail again.
        os.dup2(os.open(os.devnull, os.O_WRONLY), sys.stdout.fileno())
        return 1
    return status


def _configuration_failed(message: str) -> int:
    """A configuration error is the operator's to fix: the message alone, no traceback."""
    for line in message.splitlines():
        print(f"imagegw: {line}", file=sys.stderr)
    return 2


def _run(args: argparse.Namespace, settings: Settings) -> int:
    if args.command == "serve":
        if settings.workers > 1:
            from server.workers import run_workers

            return run_workers(settings)
        import uvloop

        from server.allocator import tune_malloc
        from server.app import serve

        tune_malloc()  # before any thread starts
        # libuv's event loop: the same asyncio API (grpc.aio, aiohttp and every test run
        # on it, the in-process tests on asyncio's own loop) at less CPU per callback.
        uvloop.run(serve(settings))
        return 0
    if args.command == "dev":
        from server.dev import run_dev

        return run_dev(settings)
    if args.command == "migrate":
        from server.ledger import create_engine, migrate

        async def run_migrations() -> None:
            engine = create_engine(settings.resolved_database_url)
            try:
                await migrate(engine)
            finally:
                await engine.dispose()

        settings.var_dir.mkdir(parents=True, exist_ok=True)
        asyncio.run(run_migrations())
        print("database is up to date")
        return 0
    if args.command == "envoy-config":
        import yaml

        from server.envoy import render_envoy_config

        print(yaml.safe_dump(render_envoy_config(settings), sort_keys=False))
        return 0
    return _run_admin(settings, args)


if __name__ == "__main__":  # pragma: no cover
    raise SystemExit(main())
