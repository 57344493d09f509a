"""Black Forest Labs' FLUX API end to end: client -> Envoy -> imagegw serve -> BflImageProvider -> fake BFL.

One process stack for the module (``IMAGEGW_BFL_API_KEY``, ``IMAGEGW_BFL_BASE_URL``) against
``tests.fakes.bfl_fake``: submit on the global host, poll the ``polling_url`` on the
regional host (another port) with ``x-key``, download ``result.sample`` (a signed link,
no key) at once and re-host it. One task per image (``n`` fans out). The fake renders
at 1/16 of the requested width and height (1024x1024 -> 64x64) and answers ``Pending``
once before ``Ready``.
"""

from __future__ import annotations

import asyncio
from collections.abc import AsyncIterator
from dataclasses import dataclass
from typing import Any

import pytest

from tests.e2e.provider_support import (
    CREDENTIALS_MESSAGE,
    FUNDED,
    ZERO_USAGE,
    LogWatch,
    expect_error,
    expect_money,
    expect_refunded,
    expect_timeout,
    fetch_images,
    generate,
    list_models,
    unique,
    wait_for_disconnect,
)
from tests.fakes.bfl_fake import BflFake, start_bfl_fake
from tests.fakes.server import RecordedRequest
from tests.stack import ProcessStack, process_stack

pytestmark = [pytest.mark.e2e, pytest.mark.timeout(60)]

PRICE = 40_000  # flux-pro-1.1, any size
MODEL = "flux-pro-1.1"
MALFORMED = "The upstream provider returned a malformed answer: "
MODERATED = "The upstream provider's safety system rejected the request."


@dataclass
class Env:
    stack: ProcessStack
    fake: BflFake

    def submits(self, prompt: str) -> list[RecordedRequest]:
        return [r for r in self.fake.submits if r.json().get("prompt") == prompt]

    def polls(self, prompt: str) -> list[RecordedRequest]:
        ids = {task.id for task in self.fake.tasks.values() if task.prompt == prompt}
        return [r for r in self.fake.polls if r.query.get("id") in ids]


@pytest.fixture(scope="module")
async def env(tmp_path_factory: pytest.TempPathFactory) -> AsyncIterator[Env]:
    async with start_bfl_fake(pending=1) as fake:
        var_dir = tmp_path_factory.mktemp("bfl-e2e") / "var"
        async with process_stack(var_dir, bfl_api_key=fake.api_key, bfl_base_url=fake.base_url) as stack:
            yield Env(stack, fake)


def submit_body(prompt: str, width: int = 1024, height: int = 1024, fmt: str = "png") -> dict[str, Any]:
    return {"prompt": prompt, "width": width, "height": height, "output_format": fmt, "safety_tolerance": 2,
            "prompt_upsampling": False}


# -- catalog and happy paths --------------------------------------------------------------------


async def test_models_lists_flux_and_local_1_only(env: Env) -> None:
    account_id, key = await env.stack.admin.funded_key(FUNDED)
    assert await list_models(env.stack, key) == ["flux-pro-1.1", "local-1"]
    reply = await generate(env.stack, key, {"model": "gpt-image-1", "prompt": "a fox"})
    assert reply.status == 400
    assert reply.json()["error"]["code"] == "model_not_available"
    await expect_money(env.stack, account_id, spent=0, usage_rows=[])


@pytest.mark.parametrize("response_format", ["url", "b64_json"])
async def test_flux_submits_polls_downloads_and_charges_the_catalog_price(env: Env, response_format: str) -> None:
    account_id, key = await env.stack.admin.funded_key(FUNDED)
    prompt = unique("a misty forest at dawn")
    downloads = len(env.fake.downloads)
    reply = await generate(env.stack, key, {"model": MODEL, "prompt": prompt, "response_format": response_format})

    assert reply.status == 200, reply.response.text
    assert reply.headers["x-imagegw-model"] == MODEL
    assert reply.headers["x-imagegw-cost-usd"] == "0.040000"
    assert await fetch_images(env.stack, reply, response_format) == [("PNG", 64, 64)]
    body = reply.json()
    assert set(body) == {"created", "data", "usage"} and body["usage"] == ZERO_USAGE
    # BFL echoes the prompt it used; unchanged, so there is no revised_prompt.
    assert [set(item) for item in body["data"]] == [{response_format}]
    [submit] = env.submits(prompt)
    assert submit.path == f"/v1/{MODEL}" and submit.headers["x-key"] == env.fake.api_key
    assert submit.json() == submit_body(prompt)
    polls = env.polls(prompt)
    assert len(polls) == 2  # Pending, then Ready
    assert all(p.headers["x-key"] == env.fake.api_key for p in polls)
    assert all(p in env.fake.regional.requests for p in polls)  # the polling_url's host, not the global one
    [download] = env.fake.downloads[downloads:]
    assert "x-key" not in download.headers  # a signed link gets no credentials
    assert env.fake.regional.base_url not in reply.response.text  # never the provider's 10-minute link
    await expect_money(env.stack, account_id, spent=PRICE, usage_rows=[("succeeded", "", 1, 1, PRICE)])


async def test_n_fans_out_one_task_per_image(env: Env) -> None:
    account_id, key = await env.stack.admin.funded_key(FUNDED)
    prompt = unique("three foxes")
    reply = await generate(env.stack, key, {"model": MODEL, "prompt": prompt, "n": 3, "size": "1536x1024",
                                            "output_format": "jpeg", "response_format": "b64_json"})
    # 1536x1024 -> 1440x960 (multiples of 32, at most 1440), rendered by the fake at 1/16.
    assert await fetch_images(env.stack, reply, "b64_json") == [("JPEG", 90, 60)] * 3
    assert [r.json() for r in env.submits(prompt)] == [submit_body(prompt, 1440, 960, "jpeg")] * 3
    await expect_money(env.stack, account_id, spent=3 * PRICE, usage_rows=[("succeeded", "", 3, 3, 3 * PRICE)])


@pytest.mark.parametrize(("scenario", "submits"), [("poll-5xx=2", 1), ("no-polling-url", 1), ("429x1", 2),
                                                   ("503x1", 2), ("pending=3", 1)])
async def test_transient_states_are_ridden_out_and_charged_once(env: Env, scenario: str, submits: int) -> None:
    # poll-5xx: the regional gateway fails polls (retried as polls, never a second submit);
    # no-polling-url: an older answer with only an id (poll the global host); 429/503 at submit.
    account_id, key = await env.stack.admin.funded_key(FUNDED)
    prompt = unique(f"a fox [[fake:{scenario}]]")
    reply = await generate(env.stack, key, {"model": MODEL, "prompt": prompt})
    assert await fetch_images(env.stack, reply, "url") == [("PNG", 64, 64)]
    assert len(env.submits(prompt)) == submits
    await expect_money(env.stack, account_id, spent=PRICE, usage_rows=[("succeeded", "", 1, 1, PRICE)])


# -- refused before any upstream call ----------------------------------------------------------


@pytest.mark.parametrize(
    ("body", "param", "code"),
    [
        ({"style": "vivid"}, "style", "unsupported_parameter"),
        ({"n": 5}, "n", "integer_above_max_value"),
        ({"quality": "hd"}, "quality", "invalid_value"),
        ({"background": "opaque"}, "background", "unsupported_parameter"),
        ({"size": "256x256"}, "size", "invalid_size"),
        ({"output_format": "jpeg", "output_compression": 50}, "output_compression", "unsupported_parameter"),
        ({"prompt": "x" * 10001}, "prompt", "string_above_max_length"),
    ],
)
async def test_parameters_the_model_cannot_take_are_400_before_any_upstream_call(
    env: Env, body: dict[str, Any], param: str, code: str
) -> None:
    account_id, key = await env.stack.admin.funded_key(FUNDED)
    before = len(env.fake.server.requests) + len(env.fake.regional.requests)
    reply = await generate(env.stack, key, {"model": MODEL, "prompt": "a cat", **body})
    assert reply.status == 400, reply.response.text
    error = reply.json()["error"]
    assert (error["type"], error["param"], error["code"]) == ("invalid_request_error", param, code)
    assert len(env.fake.server.requests) + len(env.fake.regional.requests) == before
    await expect_money(env.stack, account_id, spent=0, usage_rows=[])


# -- moderation ---------------------------------------------------------------------------------


@pytest.mark.parametrize(("scenario", "n"), [("request-moderated", 1), ("content-moderated", 1), ("content-moderated", 2)])
async def test_moderation_is_400_content_policy_violation_and_free(env: Env, scenario: str, n: int) -> None:
    account_id, key = await env.stack.admin.funded_key(FUNDED)
    prompt = unique(f"something [[fake:{scenario}]]")
    reply = await generate(env.stack, key, {"model": MODEL, "prompt": prompt, "n": n})
    expect_error(reply, 400, code="content_policy_violation", should_retry=False, message=MODERATED)
    assert len(env.submits(prompt)) == n
    await expect_refunded(env.stack, account_id, code="content_policy_violation", images=n)


async def test_moderated_tasks_of_a_fan_out_are_not_returned_nor_charged(env: Env) -> None:
    account_id, key = await env.stack.admin.funded_key(FUNDED)
    prompt = unique("a crowd [[fake:content-moderatedx1]]")
    reply = await generate(env.stack, key, {"model": MODEL, "prompt": prompt, "n": 3})
    assert await fetch_images(env.stack, reply, "url") == [("PNG", 64, 64)] * 2
    assert reply.headers["x-imagegw-cost-usd"] == "0.080000"
    assert len(env.submits(prompt)) == 3
    await expect_money(env.stack, account_id, spent=2 * PRICE, usage_rows=[("succeeded", "", 3, 2, 2 * PRICE)])


# -- upstream failures ------------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("scenario", "message", "submits"),
    [
        ("500", "The upstream provider is failing (HTTP 500); gave up after 3 attempts.", 3),
        ("503", "The upstream provider is failing (HTTP 503); gave up after 3 attempts.", 3),
        ("error", "The upstream task failed (status 'Error').", 1),
        ("task-not-found", "The upstream task failed (status 'Task not found').", 1),
    ],
)
async def test_a_failing_upstream_is_502_retryable_and_refunded(env: Env, scenario: str, message: str, submits: int) -> None:
    account_id, key = await env.stack.admin.funded_key(FUNDED)
    prompt = unique(f"a harbour [[fake:{scenario}]]")
    reply = await generate(env.stack, key, {"model": MODEL, "prompt": prompt})
    expect_error(reply, 502, code="upstream_error", should_retry=True, message=message)
    assert len(env.submits(prompt)) == submits
    await expect_refunded(env.stack, account_id, code="upstream_error")


@pytest.mark.parametrize(
    ("scenario", "log_line"),
    [
        ("wrong-key", "bfl rejected the gateway's credentials (HTTP 403, code None); check IMAGEGW_BFL_API_KEY"),
        ("forbidden", "bfl rejected the gateway's credentials (HTTP 403, code None); check IMAGEGW_BFL_API_KEY"),
        ("payment", ("bfl refused the gateway's account: credit or quota exhausted (HTTP 402, code None); "
                    "top up the account behind IMAGEGW_BFL_API_KEY")),
    ],
)
async def test_our_credentials_refused_is_502_with_a_loud_log_line(env: Env, scenario: str, log_line: str) -> None:
    account_id, key = await env.stack.admin.funded_key(FUNDED)
    prompt = unique(f"a harbour [[fake:{scenario}]]")
    logs = LogWatch(env.stack)
    real_key = env.fake.api_key
    if scenario == "wrong-key":
        env.fake.api_key = "bfl-revoked"
    try:
        reply = await generate(env.stack, key, {"model": MODEL, "prompt": prompt})
    finally:
        env.fake.api_key = real_key
    expect_error(reply, 502, code="upstream_error", should_retry=False, message=CREDENTIALS_MESSAGE)
    assert len(env.submits(prompt)) == 1
    assert logs.errors() == [log_line]
    assert real_key not in logs.text() and real_key not in reply.response.text
    await expect_refunded(env.stack, account_id, code="upstream_error")


@pytest.mark.parametrize(
    ("scenario", "detail"),
    [
        ("expired-sample", "the image URL answered HTTP 403."),
        ("garbage-sample", "bytes that are not a PNG, JPEG or WebP image."),
        ("poll-invalid-json", "invalid JSON from 127.0.0.1 (HTTP 200)."),
        ("unknown-status", "an unknown task status 'Sleeping'."),
        ("foreign-polling-url", "a polling_url outside the provider's domain (collector.example.net)."),
        ("html-200", "invalid JSON from 127.0.0.1 (HTTP 200)."),
        ("invalid-json", "invalid JSON from 127.0.0.1 (HTTP 200)."),
    ],
)
async def test_a_malformed_answer_is_502_and_refunded(env: Env, scenario: str, detail: str) -> None:
    account_id, key = await env.stack.admin.funded_key(FUNDED)
    prompt = unique(f"a harbour [[fake:{scenario}]]")
    reply = await generate(env.stack, key, {"model": MODEL, "prompt": prompt, "response_format": "b64_json"})
    expect_error(reply, 502, code="upstream_error", should_retry=False, message=MALFORMED + detail)
    assert len(env.submits(prompt)) == 1  # never resubmitted: that would pay twice
    await expect_refunded(env.stack, account_id, code="upstream_error")


# -- deadlines ----------------------------------------------------------------------------------


async def test_a_slow_submit_past_the_callers_deadline_is_504_refunded_and_disconnected(env: Env) -> None:
    account_id, key = await env.stack.admin.funded_key(FUNDED)
    prompt = unique("a harbour [[fake:slow=8]]")
    reply = await generate(env.stack, key, {"model": MODEL, "prompt": prompt}, **{"grpc-timeout": "2S"})
    expect_timeout(reply, "flux-pro-1.1")
    assert reply.seconds < 3
    await wait_for_disconnect(lambda: env.fake.server.disconnects, lambda r: r.json()["prompt"] == prompt)
    await expect_refunded(env.stack, account_id, code="timeout")


async def test_a_task_still_pending_at_the_deadline_is_504_and_polling_stops(env: Env) -> None:
    account_id, key = await env.stack.admin.funded_key(FUNDED)
    prompt = unique("a harbour [[fake:pending=1000]]")
    reply = await generate(env.stack, key, {"model": MODEL, "prompt": prompt}, **{"grpc-timeout": "2S"})
    expect_timeout(reply, "flux-pro-1.1")
    polled = len(env.polls(prompt))
    assert polled >= 2
    await asyncio.sleep(2.5)  # longer than the adapter's largest poll interval
    assert len(env.polls(prompt)) == polled
    await expect_refunded(env.stack, account_id, code="timeout")
