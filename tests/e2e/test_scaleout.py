"""Three stateless replicas behind one Envoy, sharing PostgreSQL and an S3 server (moto),
under real faults (issue 12, part 3).

One topology serves the module, in this order: a URL made by one replica is served by
the others; 200 concurrent requests on a balance for 25 images; a rolling restart under
steady load; ``kill -9`` of a replica under steady load (restarted afterwards). Three
replicas migrating an empty database at once have their own database. Load comes from
the OpenAI fake with a fixed upstream delay (cheap for the machine, long enough to be in
flight when a replica goes away); every loop is bounded in time and count.
"""

from __future__ import annotations

import asyncio
import io
import json
import secrets
import signal
import time
from collections import Counter
from collections.abc import AsyncIterator
from dataclasses import dataclass
from pathlib import Path
from urllib.parse import parse_qs, urlsplit

import grpc
import httpx
import pytest
from imagegw.v1 import images_pb2, images_pb2_grpc, models_pb2, models_pb2_grpc
from PIL import Image
from sqlalchemy import text
from sqlalchemy.ext.asyncio import create_async_engine

from server.dev import start_server, stop_process, wait_for_grpc
from tests.e2e.test_money import assert_exactly_funded_images_succeed
from tests.fakes.openai_fake import DEFAULT_KEY, start_openai_fake
from tests.fakes.postgres import create_database
from tests.fakes.s3 import S3Server
from tests.stack import ProcessStack, base_env, free_port, process_stack, status_of

pytestmark = [pytest.mark.e2e, pytest.mark.postgres]

REPLICAS = 3
UNIT_MICROS = 11_000  # gpt-image-1, low quality, 1024x1024 (server/catalog.toml)
LOAD_CLIENTS = 12
UPSTREAM_SECONDS = 0.5


@dataclass
class Fleet:
    stack: ProcessStack
    s3: S3Server
    bucket: str


@pytest.fixture(scope="module")
async def fleet(tmp_path_factory: pytest.TempPathFactory, postgres_url: str, s3_server: S3Server) -> AsyncIterator[Fleet]:
    database_url = await create_database(postgres_url)
    bucket = s3_server.create_bucket()
    async with start_openai_fake() as fake, process_stack(
        tmp_path_factory.mktemp("fleet"),
        servers=REPLICAS,
        extra_env=s3_server.env,
        database_url=database_url,
        image_store_url=f"s3://{bucket}/images",
        openai_api_key=DEFAULT_KEY,
        openai_base_url=fake.base_url,
        # Longer than Envoy's 1 s health-check interval: Envoy stops routing to a draining
        # replica while it still accepts.
        shutdown_drain_seconds=2,
        shutdown_grace_seconds=20,
        # A killed replica's reservations are released soon after their 10 s deadline.
        reservation_grace_seconds=1,
        sweep_interval_seconds=1,
        rate_limit_rpm=0,
        rate_limit_ipm=0,
        render_workers=1,
    ) as stack:
        yield Fleet(stack, s3_server, bucket)


# -- helpers ----------------------------------------------------------------------------


@dataclass(frozen=True)
class Outcome:
    request_id: str
    status: int  # 0: no HTTP answer at all
    should_retry: str | None
    error_code: str | None


async def steady_load(stack: ProcessStack, key: str, stop: asyncio.Event, max_seconds: float = 90) -> list[Outcome]:
    """LOAD_CLIENTS closed loops of one-image ``url`` generations until ``stop`` (or
    ``max_seconds``); each request has its own x-request-id and a 10 s deadline."""
    run = secrets.token_hex(4)
    deadline = time.monotonic() + max_seconds
    body = {"model": "gpt-image-1", "prompt": f"[[fake:slow={UPSTREAM_SECONDS}]] steady boats", "quality": "low",
            "size": "1024x1024", "response_format": "url"}
    limits = httpx.Limits(max_connections=LOAD_CLIENTS, max_keepalive_connections=LOAD_CLIENTS)
    async with httpx.AsyncClient(timeout=30, limits=limits) as client:

        async def loop(index: int) -> list[Outcome]:
            outcomes: list[Outcome] = []
            while not stop.is_set() and time.monotonic() < deadline and len(outcomes) < 1000:
                request_id = f"load-{run}-{index}-{len(outcomes)}"
                headers = {"Authorization": f"Bearer {key}", "x-request-id": request_id, "grpc-timeout": "10S"}
                try:
                    response = await client.post(f"{stack.api_base}/images/generations", json=body, headers=headers)
                except httpx.HTTPError:
                    outcomes.append(Outcome(request_id, 0, None, None))
                    continue
                code = None if response.status_code == 200 else response.json()["error"]["code"]
                outcomes.append(Outcome(request_id, response.status_code, response.headers.get("x-should-retry"), code))
            return outcomes

        results = await asyncio.gather(*(loop(i) for i in range(LOAD_CLIENTS)))
    return [outcome for outcomes in results for outcome in outcomes]


async def host_flags(stack: ProcessStack, target: str) -> str:
    return (await stack.envoy_host_stats())[target]["health_flags"]


async def wait_for_host(stack: ProcessStack, target: str, *, healthy: bool, timeout: float = 30) -> float:
    """Seconds until Envoy's health checks see ``target`` healthy (or failed)."""
    started = time.monotonic()
    while time.monotonic() - started < timeout:
        flags = await host_flags(stack, target)
        if (flags == "healthy") == healthy:
            return time.monotonic() - started
        await asyncio.sleep(0.02)
    raise AssertionError(f"Envoy never saw {target} {'healthy' if healthy else 'failed'}: {flags}")


async def envoy_upstreams(stack: ProcessStack, request_ids: set[str]) -> dict[str, str]:
    """request id -> the server Envoy last sent it to, from Envoy's access log."""
    await asyncio.sleep(1.5)  # Envoy flushes its access log every second
    upstreams = {}
    for line in stack.envoy_log().splitlines():
        if line.startswith("{"):
            entry = json.loads(line)
            if entry["request_id"] in request_ids:
                upstreams[entry["request_id"]] = entry["upstream"]
    return upstreams


def bucket_keys(fleet: Fleet) -> set[str]:
    client = fleet.s3.client()
    keys: set[str] = set()
    for page in client.get_paginator("list_objects_v2").paginate(Bucket=fleet.bucket, Prefix="images/"):
        keys.update(item["Key"] for item in page.get("Contents", []))
    return keys


# -- the scenarios ----------------------------------------------------------------------


async def test_a_url_made_by_one_replica_is_served_by_every_other(fleet: Fleet) -> None:
    stack = fleet.stack
    _, key = await stack.admin.funded_key("1.00")
    async with grpc.aio.insecure_channel(stack.grpc_targets[0]) as first:
        reply = await images_pb2_grpc.ImageServiceStub(first).GenerateImages(
            images_pb2.GenerateImagesRequest(prompt="a lighthouse", size="256x256", response_format="url"),
            metadata=(("authorization", f"Bearer {key}"),),
        )
    url = reply.data[0].url
    parts = urlsplit(url)
    image_id = parts.path.rsplit("/", 1)[1]
    query = {name: values[0] for name, values in parse_qs(parts.query).items()}
    assert f"images/{image_id}" in bucket_keys(fleet)  # in the shared store, not on a disk
    request = images_pb2.GetImageFileRequest(image_id=image_id, expires=int(query["expires"]), signature=query["signature"])
    served = []
    for target in stack.grpc_targets[1:]:
        async with grpc.aio.insecure_channel(target) as other:
            served.append(await images_pb2_grpc.ImageServiceStub(other).GetImageFile(request))
    assert all(body.content_type == "image/png" and body.data == served[0].data for body in served)
    assert Image.open(io.BytesIO(served[0].data)).size == (256, 256)
    async with httpx.AsyncClient() as client:
        public = await client.get(url)  # through Envoy, whichever replica it picks
    assert (public.status_code, public.headers["content-type"], public.content) == (200, "image/png", served[0].data)


async def test_200_concurrent_requests_spend_a_balance_for_25_images_exactly(fleet: Fleet) -> None:
    stack = fleet.stack
    before_keys = bucket_keys(fleet)
    before = {target: int(stats["rq_total"]) for target, stats in (await stack.envoy_host_stats()).items()}
    await assert_exactly_funded_images_succeed(stack, response_format="url")
    assert len(bucket_keys(fleet) - before_keys) == 25  # one stored image per success
    after = {target: int(stats["rq_total"]) for target, stats in (await stack.envoy_host_stats()).items()}
    assert all(after[target] > before[target] for target in stack.grpc_targets), (before, after)


async def test_a_rolling_restart_under_steady_load_fails_no_request(fleet: Fleet) -> None:
    stack = fleet.stack
    account_id, key = await stack.admin.funded_key("50.00")
    stop = asyncio.Event()
    load = asyncio.create_task(steady_load(stack, key, stop))
    await asyncio.sleep(1)
    for index, target in enumerate(stack.grpc_targets):
        old = stack.servers[index]
        old.send_signal(signal.SIGTERM)
        assert await asyncio.to_thread(old.wait, 60) == 0
        new = stack.start_replica(index)
        await asyncio.to_thread(wait_for_grpc, target, new)
        await wait_for_host(stack, target, healthy=True)
        await asyncio.sleep(0.5)
    stop.set()
    outcomes = await load
    statuses = Counter(outcome.status for outcome in outcomes)
    print(f"\nrolling restart: {len(outcomes)} requests during the restart of {REPLICAS} replicas: {dict(statuses)}")
    assert statuses == Counter({200: len(outcomes)}) and len(outcomes) >= 50, statuses
    account = await stack.admin.settled(account_id)
    spent = len(outcomes) * UNIT_MICROS
    assert (account.reserved_usd, account.spent_usd) == ("0.000000", f"{spent / 1e6:.6f}")
    assert (await stack.admin.reconcile()).ok


async def test_kill_9_under_load_fails_only_what_was_in_flight_on_it(fleet: Fleet) -> None:
    stack = fleet.stack
    account_id, key = await stack.admin.funded_key("50.00")
    victim = 2
    victim_target = stack.grpc_targets[victim]
    stop = asyncio.Event()
    load = asyncio.create_task(steady_load(stack, key, stop))
    await asyncio.sleep(2)
    stack.servers[victim].kill()
    ejected_after = await wait_for_host(stack, victim_target, healthy=False, timeout=10)
    await asyncio.sleep(2)  # the survivors carry the load alone
    stop.set()
    outcomes = await load
    await asyncio.to_thread(stack.servers[victim].wait, 10)

    failed = [outcome for outcome in outcomes if outcome.status != 200]
    upstreams = await envoy_upstreams(stack, {outcome.request_id for outcome in outcomes})
    print(
        f"\nkill -9: {len(outcomes)} requests, {len(failed)} failed, Envoy marked the replica failed "
        f"{ejected_after * 1000:.0f} ms after the kill"
    )
    assert failed, "nothing was in flight on the killed replica: the test did not test"
    # Only requests that were on the killed replica failed, each retryable for the caller.
    assert {upstreams.get(outcome.request_id) for outcome in failed} == {victim_target}
    assert {(outcome.status, outcome.should_retry, outcome.error_code) for outcome in failed} == {
        (503, "true", "service_unavailable")
    }
    assert len(failed) <= LOAD_CLIENTS
    # Their reservations expire after their 10 s deadline; a survivor's sweeper releases them.
    account = await stack.admin.settled(account_id, timeout=40)
    succeeded = len(outcomes) - len(failed)
    assert (account.reserved_usd, account.spent_usd) == ("0.000000", f"{succeeded * UNIT_MICROS / 1e6:.6f}")
    assert account.balance_usd == f"{(50_000_000 - succeeded * UNIT_MICROS) / 1e6:.6f}"
    # A failed request killed after its reservation has a released usage row; one killed
    # earlier (authenticating, counting its rate limit) never reserved anything.
    usage = {u.request_id: (status_of(u), u.error_code, u.cost_usd) for u in await stack.admin.usage(account_id)}
    assert {usage[o.request_id] for o in outcomes if o.status == 200} == {("succeeded", "", "0.011000")}
    assert {usage.get(o.request_id) for o in failed} <= {("failed", "reservation_expired", "0.000000"), None}
    assert len(usage) <= len(outcomes)
    assert (await stack.admin.reconcile()).ok

    restarted = stack.start_replica(victim)
    await asyncio.to_thread(wait_for_grpc, victim_target, restarted)
    await wait_for_host(stack, victim_target, healthy=True)


async def test_three_replicas_starting_at_once_migrate_an_empty_database_once(
    tmp_path: Path, postgres_url: str
) -> None:
    database_url = await create_database(postgres_url)
    env = base_env(tmp_path / "var", database_url=database_url)
    logs, servers, targets = [], [], []
    try:
        for index in range(REPLICAS):
            port = free_port()
            log = tmp_path / f"server-{index}.log"
            logs.append(log)
            targets.append(f"127.0.0.1:{port}")
            own = {"IMAGEGW_GRPC_PORT": str(port), "IMAGEGW_METRICS_PORT": str(free_port())}
            servers.append(start_server({**env, **own}, log_path=log))
        await asyncio.gather(*(asyncio.to_thread(wait_for_grpc, t, s) for t, s in zip(targets, servers, strict=True)))
        engine = create_async_engine(database_url)
        try:
            async with engine.connect() as conn:
                versions = (await conn.execute(text("SELECT version_num FROM alembic_version"))).scalars().all()
        finally:
            await engine.dispose()
        assert len(versions) == 1
        ran = [log.read_text().count("Running upgrade") for log in logs]
        assert sorted(ran) == [0, 0, ran[0] + ran[1] + ran[2]] and sum(ran) >= 2, ran  # one replica ran every step
        # And every replica serves: a key made through one works on all.
        async with grpc.aio.insecure_channel(targets[0]) as channel:
            from tests.stack import Admin

            _, key = await Admin(channel, env["IMAGEGW_ADMIN_TOKEN"]).funded_key("1.00")
        for target in targets:
            async with grpc.aio.insecure_channel(target) as channel:
                models = await models_pb2_grpc.ModelServiceStub(channel).ListModels(
                    models_pb2.ListModelsRequest(), metadata=(("authorization", f"Bearer {key}"),)
                )
            assert "local-1" in [model.id for model in models.data]
    finally:
        for server in servers:
            stop_process(server, timeout=20)
