"""The `imagegw` operator CLI against running servers: the workflow, bad input, request ids
that make a retried credit safe (SQLite and PostgreSQL replicas), and paging."""

from __future__ import annotations

import asyncio
import json
import re
import secrets
import sqlite3
import subprocess
import sys
from pathlib import Path

import httpx
import pytest
from sqlalchemy import text

from server.ledger import create_engine
from tests.stack import ProcessStack, cli, cli_env, free_port, process_stack

pytestmark = pytest.mark.e2e

UUID4 = re.compile(r"[0-9a-f]{8}-[0-9a-f]{4}-4[0-9a-f]{3}-[89ab][0-9a-f]{3}-[0-9a-f]{12}")


async def generate(stack: ProcessStack, key: str, request_id: str, n: int = 1) -> httpx.Response:
    async with httpx.AsyncClient(timeout=60) as client:
        return await client.post(
            f"{stack.api_base}/images/generations",
            json={"prompt": "a kite", "size": "256x256", "n": n},
            headers={"Authorization": f"Bearer {key}", "x-request-id": request_id},
        )


async def test_operator_workflow(gateway: ProcessStack) -> None:
    name = f"acme-{secrets.token_hex(4)}"
    code, created = await cli(gateway, "accounts", "create", "--name", name, "--balance", "5.00")
    assert code == 0 and UUID4.fullmatch(created["request_id"])
    account = created["account"]
    assert {k: account[k] for k in ("name", "balance_usd", "reserved_usd", "spent_usd", "credited_usd")} == {
        "name": name, "balance_usd": "5.000000", "reserved_usd": "0.000000", "spent_usd": "0.000000",
        "credited_usd": "5.000000",
    }
    assert re.fullmatch(r"\d{4}-\d\d-\d\dT\d\d:\d\d:\d\dZ", account["create_time"])  # RFC 3339
    account_id = account["account_id"]
    code, key = await cli(gateway, "keys", "create", "--account", account_id)
    assert code == 0 and key["key_string"].startswith("sk-igw-") and key["api_key"]["account_id"] == account_id
    assert UUID4.fullmatch(key["request_id"]) and key["request_id"] != created["request_id"]
    assert (await generate(gateway, key["key_string"], f"cli-{name}", n=3)).status_code == 200
    code, credited = await cli(gateway, "accounts", "credit", "--account", account_id, "--amount", "2.50")
    assert code == 0 and credited["account"]["balance_usd"] == "7.497000"
    code, shown = await cli(gateway, "accounts", "show", "--account", account_id)
    assert "request_id" not in shown  # a read changes nothing: no request id
    assert (shown["account"]["balance_usd"], shown["account"]["spent_usd"]) == ("7.497000", "0.003000")
    code, usage = await cli(gateway, "usage", "--account", account_id)
    assert code == 0
    [row] = usage["usage_records"]
    assert (row["request_id"], row["model"], row["images_requested"], row["images_delivered"], row["cost_usd"],
            row["status"]) == (f"cli-{name}", "local-1", 3, 3, "0.003000", "STATUS_SUCCEEDED")
    code, revoked = await cli(gateway, "keys", "revoke", "--key-id", key["api_key"]["key_id"])
    assert code == 0 and revoked["api_key"]["revoke_time"] >= revoked["api_key"]["create_time"]
    refused = await generate(gateway, key["key_string"], f"cli-{name}-2")
    assert (refused.status_code, refused.json()["error"]["code"]) == (401, "invalid_api_key")
    code, report = await cli(gateway, "reconcile")
    assert code == 0 and report["ok"] is True and report["mismatches"] == []


@pytest.mark.parametrize(
    ("args", "code_expected", "param"),
    [
        (("accounts", "credit", "--account", "{account}", "--amount", "-1"), "invalid_value", "amount_usd"),
        (("accounts", "credit", "--account", "{account}", "--amount", "abc"), "invalid_value", "amount_usd"),
        (("accounts", "credit", "--account", "{account}", "--amount", "0"), "invalid_value", "amount_usd"),
        (("accounts", "credit", "--account", "{account}", "--amount", "1.0000001"), "invalid_value", "amount_usd"),
        (("accounts", "credit", "--account", "{account}", "--amount", "1", "--request-id", "a b"), "invalid_value",
         "request_id"),
        (("accounts", "credit", "--account", "{account}", "--amount", "9", "--request-id", "{name}"),
         "request_id_reused", "request_id"),
        (("accounts", "credit", "--account", "acct_doesnotexist", "--amount", "1"), "not_found", "account_id"),
        (("accounts", "credit", "--account", "", "--amount", "1"), "missing_required_parameter", "account_id"),
        (("accounts", "show", "--account", "acct_doesnotexist"), "not_found", "account_id"),
        (("accounts", "create", "--name", "{name}", "--balance", "1"), "account_exists", "name"),
        (("accounts", "create", "--name", "fresh-{name}", "--balance", "-5"), "invalid_value", "balance_usd"),
        (("keys", "create", "--account", "acct_doesnotexist"), "not_found", "account_id"),
        (("keys", "revoke", "--key-id", "key_doesnotexist"), "not_found", "key_id"),
    ],
)
async def test_bad_admin_input_is_refused_and_changes_nothing(
    gateway: ProcessStack, args: tuple[str, ...], code_expected: str, param: str
) -> None:
    name = f"dup-{secrets.token_hex(4)}"
    # Created with request id = its name, so that "{name}" as a request id is a reuse.
    code, created = await cli(gateway, "accounts", "create", "--name", name, "--balance", "1.00", "--request-id", name)
    assert code == 0
    account_id = created["account"]["account_id"]
    code, output = await cli(gateway, *(a.format(account=account_id, name=name) for a in args))
    assert code == 1
    error = output["error"]
    assert (error["code"], error["param"], error["type"]) == (code_expected, param, "invalid_request_error")
    assert error["message"]
    if args[0] != "accounts" or args[1] != "show":
        assert output["request_id"]  # printed, so the operator can retry the same change
    account = await gateway.admin.get(account_id)
    assert (account.balance_usd, account.credited_usd) == ("1.000000", "1.000000")


async def test_wrong_admin_token_is_refused(gateway: ProcessStack) -> None:
    code, output = await cli(gateway, "reconcile", token="not-the-token")
    assert code == 1
    assert output["error"] == {
        "message": "Invalid admin token.", "type": "invalid_request_error", "param": None, "code": "invalid_admin_token"
    }


def run_text(stack: ProcessStack, *args: str) -> subprocess.CompletedProcess[str]:
    """``imagegw ARGS`` without --json: what an operator reads on the terminal."""
    return subprocess.run(
        [sys.executable, "-m", "server.cli", *args], env=cli_env(stack), capture_output=True, text=True, timeout=60
    )


async def test_the_retry_advice_is_printed_only_when_the_outcome_is_unknown(gateway: ProcessStack) -> None:
    """A refused change changed nothing and would be refused again: its request id is
    printed, without the advice to retry with it. A change that got no answer gets the
    advice (the README's "Request ids")."""
    account_id = await gateway.admin.account("1.00")
    refused = await asyncio.to_thread(run_text, gateway, "accounts", "credit", "--account", account_id, "--amount", "-1")
    assert refused.returncode == 1
    assert re.fullmatch(rf"error: The amount '-1' is negative\.\nrequest_id: {UUID4.pattern}\n", refused.stderr), refused.stderr
    unanswered = await asyncio.to_thread(
        run_text, gateway, "accounts", "credit", "--account", account_id, "--amount", "1",
        "--target", f"127.0.0.1:{free_port()}", "--timeout", "5",  # nothing listens there
    )
    assert unanswered.returncode == 1
    advice = re.search(r"^request_id: (\S+) \(retry with --request-id \1: at most once\)$", unanswered.stderr, re.M)
    assert advice is not None and UUID4.fullmatch(advice.group(1)), unanswered.stderr
    assert (await gateway.admin.get(account_id)).balance_usd == "1.000000"


async def test_a_reader_that_goes_away_gets_no_traceback(gateway: ProcessStack) -> None:
    """`imagegw usage --json | head`: the command stops quietly when its reader closes the pipe."""
    account_id, key = await gateway.admin.funded_key("1.00")
    for i in range(3):
        assert (await generate(gateway, key, f"pipe-{secrets.token_hex(3)}-{i}")).status_code == 200

    def closed_reader() -> tuple[int, str]:
        process = subprocess.Popen(
            [sys.executable, "-m", "server.cli", "usage", "--account", account_id, "--json"], env=cli_env(gateway),
            stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True,
        )
        assert process.stdout is not None and process.stderr is not None
        process.stdout.close()  # before the command has written anything
        stderr = process.stderr.read()
        return process.wait(timeout=60), stderr

    status, stderr = await asyncio.to_thread(closed_reader)
    assert (status, stderr) == (1, "")


async def test_usage_pages_through_everything(gateway: ProcessStack) -> None:
    account_id, key = await gateway.admin.funded_key("1.00")
    ids = [f"paged-{secrets.token_hex(3)}-{i}" for i in range(7)]
    for request_id in ids:
        assert (await generate(gateway, key, request_id)).status_code == 200
    code, usage = await cli(gateway, "usage", "--account", account_id, "--page-size", "3")
    assert code == 0
    assert [row["request_id"] for row in usage["usage_records"]] == list(reversed(ids))


def credited_lines(stack: ProcessStack, request_id: str) -> list[dict[str, object]]:
    """The server's "account credited" log lines of one request id, from every server log."""
    lines = []
    for log in stack.logs.glob("server-*.log"):
        for line in log.read_text(errors="replace").splitlines():
            if line.startswith("{"):
                entry = json.loads(line)
                if entry.get("message") == "account credited" and entry.get("request_id") == request_id:
                    lines.append(entry)
    return lines


async def test_a_credit_retried_after_a_timeout_is_credited_once(tmp_path: Path) -> None:
    """The client's deadline expires while the server is still committing the credit (its
    SQLite write waits for a lock this test holds); the operator runs the printed command
    again with --request-id: the account is credited once."""
    async with process_stack(tmp_path / "var") as stack:
        code, created = await cli(stack, "accounts", "create", "--name", "retry", "--balance", "1.00")
        account_id = created["account"]["account_id"]
        database = sqlite3.connect(stack.settings.var_dir / "imagegw.db", timeout=30, isolation_level=None)
        database.execute("BEGIN IMMEDIATE")  # the server's writes now wait for us
        try:
            code, timed_out = await cli(
                stack, "accounts", "credit", "--account", account_id, "--amount", "2.50", "--timeout", "1"
            )
            assert code == 1 and timed_out["error"]["code"] == "timeout"
            request_id = timed_out["request_id"]
            retry = asyncio.create_task(
                cli(stack, "accounts", "credit", "--account", account_id, "--amount", "2.50", "--request-id", request_id)
            )
            await asyncio.sleep(1)  # the retry arrives while the first attempt still waits
        finally:
            database.execute("ROLLBACK")
            database.close()
        code, retried = await retry
        assert code == 0 and retried["request_id"] == request_id
        assert (retried["account"]["balance_usd"], retried["account"]["credited_usd"]) == ("3.500000", "3.500000")
        code, again = await cli(
            stack, "accounts", "credit", "--account", account_id, "--amount", "2.50", "--request-id", request_id
        )
        assert (code, again) == (0, retried)
        code, shown = await cli(stack, "accounts", "show", "--account", account_id)
        assert (shown["account"]["balance_usd"], shown["account"]["credited_usd"]) == ("3.500000", "3.500000")
        code, report = await cli(stack, "reconcile")
        assert (code, report["ok"], report["mismatches"]) == (0, True, [])
        [line] = credited_lines(stack, request_id)
        assert (line["account_id"], line["amount_micros"]) == (account_id, 2_500_000)


async def test_a_credit_retried_on_another_replica_after_a_timeout_is_credited_once(replicas: ProcessStack) -> None:
    """The same on two replicas sharing PostgreSQL: the first attempt's UPDATE waits for a
    row lock this test holds until its client gave up; the retry goes to the other replica."""
    account_id = await replicas.admin.account("1.00")
    engine = create_engine(replicas.settings.resolved_database_url)
    try:
        async with engine.connect() as holder:
            await holder.execute(text("SELECT 1 FROM accounts WHERE id = :id FOR UPDATE"), {"id": account_id})
            code, timed_out = await cli(
                replicas, "accounts", "credit", "--account", account_id, "--amount", "2.50", "--timeout", "1",
                "--target", replicas.grpc_targets[0],
            )
            assert code == 1 and timed_out["error"]["code"] == "timeout"
            request_id = timed_out["request_id"]
            retry = asyncio.create_task(
                cli(
                    replicas, "accounts", "credit", "--account", account_id, "--amount", "2.50",
                    "--request-id", request_id, "--target", replicas.grpc_targets[1],
                )
            )
            await asyncio.sleep(1)
            await holder.rollback()
        code, retried = await retry
    finally:
        await engine.dispose()
    assert code == 0 and retried["account"]["balance_usd"] == "3.500000"
    account = await replicas.admin.get(account_id)
    assert (account.balance_usd, account.credited_usd) == ("3.500000", "3.500000")
    assert (await replicas.admin.reconcile()).ok
    assert len(credited_lines(replicas, request_id)) == 1
