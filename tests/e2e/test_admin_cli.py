"""The `imagegw` operator CLI against a running server, and bad admin input."""

from __future__ import annotations

import asyncio
import json
import os
import secrets
import subprocess
import sys

import httpx
import pytest

from tests.stack import ProcessStack

pytestmark = pytest.mark.e2e


def cli(stack: ProcessStack, *args: str, token: str | None = None) -> tuple[int, dict[str, object]]:
    env = {
        **os.environ,
        "IMAGEGW_GRPC_PORT": str(stack.settings.grpc_port),
        "IMAGEGW_VAR_DIR": stack.env["IMAGEGW_VAR_DIR"],
        "IMAGEGW_ADMIN_TOKEN": token or stack.env["IMAGEGW_ADMIN_TOKEN"],
    }
    result = subprocess.run(
        [sys.executable, "-m", "server.cli", *args, "--json"], env=env, capture_output=True, text=True, timeout=60
    )
    output = result.stdout if result.returncode == 0 else result.stderr
    return result.returncode, json.loads(output)


async def run(stack: ProcessStack, *args: str, token: str | None = None) -> tuple[int, dict[str, object]]:
    return await asyncio.to_thread(cli, stack, *args, token=token)


async def test_operator_workflow(gateway: ProcessStack) -> None:
    name = f"acme-{secrets.token_hex(4)}"
    code, account = await run(gateway, "accounts", "create", "--name", name, "--balance", "5.00")
    assert code == 0
    assert {k: account[k] for k in ("name", "balance_usd", "reserved_usd", "spent_usd", "credited_usd")} == {
        "name": name, "balance_usd": "5.000000", "reserved_usd": "0.000000", "spent_usd": "0.000000",
        "credited_usd": "5.000000",
    }
    account_id = str(account["account_id"])
    code, key = await run(gateway, "keys", "create", "--account", account_id)
    assert code == 0 and str(key["api_key"]).startswith("sk-igw-") and key["account_id"] == account_id
    async with httpx.AsyncClient(timeout=60) as client:
        ok = await client.post(
            f"{gateway.api_base}/images/generations",
            json={"prompt": "a kite", "size": "256x256", "n": 3},
            headers={"Authorization": f"Bearer {key['api_key']}", "x-request-id": f"cli-{name}"},
        )
    assert ok.status_code == 200
    code, credited = await run(gateway, "accounts", "credit", "--account", account_id, "--amount", "2.50")
    assert code == 0 and credited["balance_usd"] == "7.497000"
    code, shown = await run(gateway, "accounts", "show", "--account", account_id)
    assert (shown["balance_usd"], shown["spent_usd"], shown["credited_usd"]) == ("7.497000", "0.003000", "7.500000")
    code, usage = await run(gateway, "usage", "--account", account_id)
    assert code == 0
    rows = usage["data"]
    assert isinstance(rows, list) and len(rows) == 1
    row = rows[0]
    assert (row["request_id"], row["model"], row["images_requested"], row["images_delivered"], row["cost_usd"],
            row["status"]) == (f"cli-{name}", "local-1", 3, 3, "0.003000", "succeeded")
    code, revoked = await run(gateway, "keys", "revoke", "--key-id", str(key["key_id"]))
    assert code == 0 and int(revoked["revoked"]) > 0
    async with httpx.AsyncClient() as client:
        refused = await client.post(
            f"{gateway.api_base}/images/generations",
            json={"prompt": "a kite"},
            headers={"Authorization": f"Bearer {key['api_key']}"},
        )
    assert refused.status_code == 401
    assert refused.json()["error"]["code"] == "invalid_api_key"
    code, report = await run(gateway, "reconcile")
    assert code == 0 and report["ok"] is True and report["mismatches"] == []


@pytest.mark.parametrize(
    ("args", "code_expected"),
    [
        (("accounts", "credit", "--account", "{account}", "--amount", "-1"), "invalid_value"),
        (("accounts", "credit", "--account", "{account}", "--amount", "abc"), "invalid_value"),
        (("accounts", "credit", "--account", "{account}", "--amount", "0"), "invalid_value"),
        (("accounts", "credit", "--account", "{account}", "--amount", "1.0000001"), "invalid_value"),
        (("accounts", "credit", "--account", "acct_doesnotexist", "--amount", "1"), "not_found"),
        (("accounts", "show", "--account", "acct_doesnotexist"), "not_found"),
        (("accounts", "create", "--name", "{name}", "--balance", "1"), "account_exists"),
        (("accounts", "create", "--name", "fresh-{name}", "--balance", "-5"), "invalid_value"),
        (("keys", "create", "--account", "acct_doesnotexist"), "not_found"),
        (("keys", "revoke", "--key-id", "key_doesnotexist"), "not_found"),
    ],
)
async def test_bad_admin_input_is_refused_and_changes_nothing(
    gateway: ProcessStack, args: tuple[str, ...], code_expected: str
) -> None:
    name = f"dup-{secrets.token_hex(4)}"
    account_id = await gateway.admin.account("1.00", name=name)
    filled = tuple(a.format(account=account_id, name=name) for a in args)
    code, output = await run(gateway, *filled)
    assert code == 1
    error = output["error"]
    assert isinstance(error, dict) and error["code"] == code_expected and error["message"]
    account = await gateway.admin.get(account_id)
    assert (account.balance_usd, account.credited_usd) == ("1.000000", "1.000000")
    if "create" in args and "--name" in args:
        code, _ = await run(gateway, "accounts", "show", "--account", account_id)
        assert code == 0


async def test_wrong_admin_token_is_refused(gateway: ProcessStack) -> None:
    code, output = await run(gateway, "reconcile", token="not-the-token")
    assert code == 1
    assert output["error"] == {
        "message": "Invalid admin token.", "type": "invalid_request_error", "param": None, "code": "invalid_admin_token"
    }
