"""Across providers, end to end through Envoy: fallbacks, per-model timeouts, OpenAI-compatible hosts.

One process stack with OpenAI, Google, xAI and Together enabled against their fakes, and
an operator's catalog file (a copy of ``server/catalog.toml``) that adds fallbacks, a short
per-model timeout and two OpenAI-compatible hosts. Fallbacks run within the same deadline
and the same reservation: the fallback's price is charged, never more than was reserved,
and ``x-imagegw-model`` names the model that served. Content-policy refusals and our own
misconfiguration never fall back. The per-provider suites are tests/e2e/test_provider_*_e2e.py.
"""

from __future__ import annotations

import json
from collections.abc import AsyncIterator
from dataclasses import dataclass

import pytest

from tests.e2e.provider_support import (
    CREDENTIALS_MESSAGE,
    FUNDED,
    LogWatch,
    catalog_with,
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
from tests.fakes.google_fake import GoogleFake, start_google_fake
from tests.fakes.openai_fake import OpenAIFake, start_openai_fake
from tests.fakes.server import RecordedRequest
from tests.stack import ProcessStack, process_stack

pytestmark = [pytest.mark.e2e, pytest.mark.timeout(60)]

MODERATED = "The upstream provider's safety system rejected the request."
# The operator's catalog: who falls back to whom (prices per image at the default size and quality).
FALLBACKS = {
    "gpt-image-1": ["local-1"],  # 42_000 -> 1_000
    "gpt-image-1.5": ["imagen-3"],  # 34_000 -> 30_000, another provider
    "imagen-3": ["gpt-image-1"],  # 30_000 -> 42_000: capped at the 30_000 reserved
    "dall-e-2": ["flux-pro-1.1", "imagen-4"],  # BFL is not enabled here: skipped
}
COMPATIBLE_ROWS = """
[[models]]
id = "grok-image"
provider = "xai"
upstream_model = "grok-2-image"
owned_by = "xai"
base_url = "{xai}"
api_key_env = "IMAGEGW_TEST_XAI_KEY"
sizes = ["1024x1024", "1536x1024", "auto"]
default_size = "1024x1024"
max_n = 4
qualities = ["auto", "standard"]
default_quality = "standard"
output_formats = ["png", "jpeg"]
prompt_max_chars = 8000
timeout_seconds = 60
prices = {{ "*" = {{ "*" = 70000 }} }}

[[models]]
id = "flux-schnell"
provider = "together"
upstream_model = "black-forest-labs/FLUX.1-schnell"
owned_by = "together"
base_url = "{together}"
api_key_env = "IMAGEGW_TEST_TOGETHER_KEY"
sizes = ["1024x1024", "1536x1024", "1024x1536", "auto"]
default_size = "1024x1024"
max_n = 4
qualities = ["auto", "standard"]
default_quality = "standard"
output_formats = ["png", "jpeg"]
prompt_max_chars = 4000
timeout_seconds = 60
prices = {{ "*" = {{ "*" = 3000 }} }}

# xAI answers JPEG only, so an operator lists only jpeg.
[[models]]
id = "grok-image-jpeg"
provider = "xai"
upstream_model = "grok-2-image"
owned_by = "xai"
base_url = "{xai}"
api_key_env = "IMAGEGW_TEST_XAI_KEY"
sizes = ["1024x1024", "auto"]
default_size = "1024x1024"
max_n = 4
qualities = ["auto", "standard"]
default_quality = "standard"
output_formats = ["jpeg"]
prices = {{ "*" = {{ "*" = 70000 }} }}

# A host whose key variable is not set: disabled.
[[models]]
id = "acme-image"
provider = "acme"
upstream_model = "acme-1"
base_url = "{xai}"
api_key_env = "IMAGEGW_TEST_ACME_KEY"
sizes = ["1024x1024", "auto"]
default_size = "1024x1024"
prices = {{ "*" = {{ "*" = 1000 }} }}
"""


@dataclass
class Env:
    stack: ProcessStack
    openai: OpenAIFake
    google: GoogleFake
    xai: OpenAIFake
    together: OpenAIFake

    def openai_sent(self, prompt: str, fake: OpenAIFake | None = None) -> list[RecordedRequest]:
        return [r for r in (fake or self.openai).generation_requests if r.json().get("prompt") == prompt]

    def google_sent(self, prompt: str) -> list[RecordedRequest]:
        return [r for r in self.google.requests if r.json().get("instances", [{}])[0].get("prompt") == prompt]


@pytest.fixture(scope="module")
async def env(tmp_path_factory: pytest.TempPathFactory) -> AsyncIterator[Env]:
    root = tmp_path_factory.mktemp("providers-e2e")
    async with (
        start_openai_fake() as openai_fake,
        start_google_fake() as google_fake,
        start_openai_fake(dialect="xai", api_key="xai-test-key") as xai_fake,
        start_openai_fake(dialect="together", api_key="together-test-key") as together_fake,
    ):
        changes = {model: {"fallbacks": targets} for model, targets in FALLBACKS.items()}
        changes["dall-e-3"] = {"timeout_seconds": 1.5}
        changes["gpt-image-2"] = {"timeout_seconds": 1.5, "fallbacks": ["local-1"]}
        catalog = catalog_with(
            root / "catalog.toml", changes, COMPATIBLE_ROWS.format(xai=xai_fake.base_url, together=together_fake.base_url)
        )
        async with process_stack(
            root / "var",
            catalog_file=catalog,
            openai_api_key=openai_fake.api_key,
            openai_base_url=openai_fake.base_url,
            google_api_key=google_fake.api_key,
            google_base_url=google_fake.base_url,
            test_xai_key=xai_fake.api_key,
            test_together_key=together_fake.api_key,
        ) as stack:
            yield Env(stack, openai_fake, google_fake, xai_fake, together_fake)


async def test_models_lists_every_enabled_model_of_the_operators_catalog(env: Env) -> None:
    account_id, key = await env.stack.admin.funded_key(FUNDED)
    assert await list_models(env.stack, key) == [
        "dall-e-2", "dall-e-3", "flux-schnell", "gemini-2.5-flash-image", "gpt-4o-mini", "gpt-image-1",
        "gpt-image-1.5", "gpt-image-2", "grok-image", "grok-image-jpeg", "imagen-3", "imagen-4", "local-1",
    ]
    reply = await generate(env.stack, key, {"model": "acme-image", "prompt": "a fox"})
    assert reply.status == 400
    assert reply.json()["error"] == {
        "message": "The model 'acme-image' is not enabled on this server (its provider 'acme' is not configured).",
        "type": "invalid_request_error", "param": "model", "code": "model_not_available"}
    await expect_money(env.stack, account_id, spent=0, usage_rows=[])


# -- fallbacks ------------------------------------------------------------------------------------


async def test_a_rate_limited_primary_is_served_by_its_fallback_at_the_fallbacks_price(env: Env) -> None:
    account_id, key = await env.stack.admin.funded_key(FUNDED)
    prompt = unique("a harbour [[fake:429-huge]]")  # retry-after 600: not waited for, retryable
    reply = await generate(env.stack, key, {"model": "gpt-image-1", "prompt": prompt, "response_format": "b64_json"})
    assert reply.status == 200, reply.response.text
    assert reply.headers["x-imagegw-model"] == "local-1"
    assert reply.headers["x-imagegw-cost-usd"] == "0.001000"
    assert await fetch_images(env.stack, reply, "b64_json") == [("PNG", 1024, 1024)]
    assert len(env.openai_sent(prompt)) == 1
    await expect_money(env.stack, account_id, spent=1_000, usage_rows=[("succeeded", "", 1, 1, 1_000)])
    assert [u.model for u in await env.stack.admin.usage(account_id)] == ["gpt-image-1"]  # the model requested


async def test_a_fallback_on_another_provider_serves_within_the_same_reservation(env: Env) -> None:
    account_id, key = await env.stack.admin.funded_key(FUNDED)
    prompt = unique("two harbours [[fake:429-huge]]")  # the Google fake has no such scenario: it answers
    reply = await generate(env.stack, key, {"model": "gpt-image-1.5", "prompt": prompt, "n": 2})
    assert reply.status == 200, reply.response.text
    assert reply.headers["x-imagegw-model"] == "imagen-3"
    assert reply.headers["x-imagegw-cost-usd"] == "0.060000"  # 2 x imagen-3's 30_000, less than the 68_000 reserved
    assert await fetch_images(env.stack, reply, "url") == [("PNG", 1024, 1024)] * 2
    assert len(env.openai_sent(prompt)) == 1
    [sent] = env.google_sent(prompt)
    assert sent.json()["parameters"]["sampleCount"] == 2
    await expect_money(env.stack, account_id, spent=60_000, usage_rows=[("succeeded", "", 2, 2, 60_000)])


async def test_a_pricier_fallback_is_charged_at_most_the_reservation(env: Env) -> None:
    account_id, key = await env.stack.admin.funded_key(FUNDED)
    prompt = unique("a harbour [[fake:list-error]]")  # Google's 503 in a list body, three times; OpenAI answers
    reply = await generate(env.stack, key, {"model": "imagen-3", "prompt": prompt})
    assert reply.status == 200, reply.response.text
    assert reply.headers["x-imagegw-model"] == "gpt-image-1"
    assert reply.headers["x-imagegw-cost-usd"] == "0.030000"  # gpt-image-1 costs 42_000; 30_000 was reserved
    assert await fetch_images(env.stack, reply, "url") == [("PNG", 1024, 1024)]
    assert len(env.google_sent(prompt)) == 3
    [sent] = env.openai_sent(prompt)
    assert (sent.json()["quality"], sent.json()["size"]) == ("medium", "1024x1024")  # `auto` resolved for the fallback
    await expect_money(env.stack, account_id, spent=30_000, usage_rows=[("succeeded", "", 1, 1, 30_000)])


async def test_a_fallback_that_is_not_enabled_is_skipped(env: Env) -> None:
    account_id, key = await env.stack.admin.funded_key(FUNDED)
    prompt = unique("a harbour [[fake:429-huge]]")
    reply = await generate(env.stack, key, {"model": "dall-e-2", "prompt": prompt})
    assert reply.status == 200, reply.response.text
    assert reply.headers["x-imagegw-model"] == "imagen-4"
    assert reply.headers["x-imagegw-cost-usd"] == "0.020000"  # imagen-4's 40_000 capped at dall-e-2's 20_000
    await expect_money(env.stack, account_id, spent=20_000, usage_rows=[("succeeded", "", 1, 1, 20_000)])


async def test_a_content_policy_refusal_never_falls_back(env: Env) -> None:
    account_id, key = await env.stack.admin.funded_key(FUNDED)
    prompt = unique("something [[fake:moderated]]")
    reply = await generate(env.stack, key, {"model": "gpt-image-1.5", "prompt": prompt})
    expect_error(reply, 400, code="content_policy_violation", should_retry=False, message=MODERATED)
    assert len(env.openai_sent(prompt)) == 1
    assert env.google_sent(prompt) == []
    await expect_refunded(env.stack, account_id, code="content_policy_violation")


async def test_our_misconfiguration_never_falls_back(env: Env) -> None:
    account_id, key = await env.stack.admin.funded_key(FUNDED)
    prompt = unique("a harbour [[fake:quota]]")
    logs = LogWatch(env.stack)
    reply = await generate(env.stack, key, {"model": "gpt-image-1.5", "prompt": prompt})
    expect_error(reply, 502, code="upstream_error", should_retry=False, message=CREDENTIALS_MESSAGE)
    assert env.google_sent(prompt) == []
    assert len(logs.errors()) == 1
    await expect_refunded(env.stack, account_id, code="upstream_error")


async def test_when_every_candidate_fails_the_last_transient_error_is_returned(env: Env) -> None:
    account_id, key = await env.stack.admin.funded_key(FUNDED)
    prompt = unique("a harbour [[fake:html-502]]")  # both fakes answer a Cloudflare 502 page
    reply = await generate(env.stack, key, {"model": "gpt-image-1.5", "prompt": prompt})
    expect_error(reply, 502, code="upstream_error", should_retry=True,
                 message="The upstream provider is failing (HTTP 502); gave up after 3 attempts.")
    assert (len(env.openai_sent(prompt)), len(env.google_sent(prompt))) == (3, 3)
    await expect_refunded(env.stack, account_id, code="upstream_error")


# -- per-model timeout ---------------------------------------------------------------------------


async def test_a_models_own_timeout_falls_back_while_the_callers_deadline_allows(env: Env) -> None:
    account_id, key = await env.stack.admin.funded_key(FUNDED)
    prompt = unique("a harbour [[fake:slow=8]]")
    reply = await generate(env.stack, key, {"model": "gpt-image-2", "prompt": prompt, "response_format": "b64_json"})
    assert reply.status == 200, reply.response.text
    assert reply.headers["x-imagegw-model"] == "local-1"
    assert reply.headers["x-imagegw-cost-usd"] == "0.001000"
    assert 1.4 < reply.seconds < 4  # gpt-image-2's timeout_seconds = 1.5, then local-1
    await wait_for_disconnect(lambda: env.openai.server.disconnects, lambda r: r.json()["prompt"] == prompt)
    await expect_money(env.stack, account_id, spent=1_000, usage_rows=[("succeeded", "", 1, 1, 1_000)])


async def test_a_models_own_timeout_ends_a_slow_upstream_without_a_caller_deadline(env: Env) -> None:
    account_id, key = await env.stack.admin.funded_key(FUNDED)
    prompt = unique("a harbour [[fake:slow=8]]")
    reply = await generate(env.stack, key, {"model": "dall-e-3", "prompt": prompt})  # no grpc-timeout
    expect_timeout(reply, "dall-e-3")
    assert 1.4 < reply.seconds < 3  # the catalog's timeout_seconds = 1.5
    await wait_for_disconnect(lambda: env.openai.server.disconnects, lambda r: r.json()["prompt"] == prompt)
    await expect_refunded(env.stack, account_id, code="timeout")


# -- OpenAI-compatible hosts ------------------------------------------------------------------------


@pytest.mark.parametrize("response_format", ["url", "b64_json"])
async def test_xai_gets_an_aspect_ratio_never_a_size(env: Env, response_format: str) -> None:
    account_id, key = await env.stack.admin.funded_key(FUNDED)
    prompt = unique("a comet over a lake")
    reply = await generate(env.stack, key, {"model": "grok-image", "prompt": prompt, "n": 2, "size": "1536x1024",
                                            "response_format": response_format})
    assert reply.status == 200, reply.response.text
    assert reply.headers["x-imagegw-model"] == "grok-image"
    assert await fetch_images(env.stack, reply, response_format) == [("JPEG", 144, 96)] * 2  # xAI answers JPEG
    assert [item["revised_prompt"] for item in reply.json()["data"]] == [f"A detailed rendition of: {prompt}"] * 2
    [sent] = env.openai_sent(prompt, env.xai)
    assert sent.headers["authorization"] == "Bearer xai-test-key"
    assert sent.json() == {"model": "grok-2-image", "prompt": prompt, "n": 2, "aspect_ratio": "3:2",
                           "response_format": "b64_json"}
    await expect_money(env.stack, account_id, spent=140_000, usage_rows=[("succeeded", "", 2, 2, 140_000)])


async def test_xai_moderation_is_a_200_with_nothing_usable(env: Env) -> None:
    account_id, key = await env.stack.admin.funded_key(FUNDED)
    blocked = await generate(env.stack, key, {"model": "grok-image", "prompt": unique("x [[fake:blocked]]")})
    expect_error(blocked, 400, code="content_policy_violation", should_retry=False, message=MODERATED)
    flagged = await generate(env.stack, key, {"model": "grok-image", "prompt": unique("x [[fake:flagged]]"), "n": 3})
    assert await fetch_images(env.stack, flagged, "url") == [("JPEG", 96, 96)] * 2  # one of three flagged
    assert flagged.headers["x-imagegw-cost-usd"] == "0.140000"
    await expect_money(env.stack, account_id, spent=140_000, usage_rows=[
        ("succeeded", "", 3, 2, 140_000), ("failed", "content_policy_violation", 1, 0, 0)])


async def test_together_gets_width_height_and_base64(env: Env) -> None:
    account_id, key = await env.stack.admin.funded_key(FUNDED)
    prompt = unique("a red kite")
    reply = await generate(env.stack, key, {"model": "flux-schnell", "prompt": prompt, "size": "1024x1536",
                                            "output_format": "jpeg"})
    assert await fetch_images(env.stack, reply, "url") == [("JPEG", 1024, 1536)]
    [sent] = env.openai_sent(prompt, env.together)
    assert sent.headers["authorization"] == "Bearer together-test-key"
    assert sent.json() == {"model": "black-forest-labs/FLUX.1-schnell", "prompt": prompt, "n": 1, "width": 1024,
                           "height": 1536, "response_format": "base64", "output_format": "jpeg"}
    await expect_money(env.stack, account_id, spent=3_000, usage_rows=[("succeeded", "", 1, 1, 3_000)])


async def test_together_spend_limit_is_our_misconfiguration(env: Env) -> None:
    account_id, key = await env.stack.admin.funded_key(FUNDED)
    logs = LogWatch(env.stack)
    reply = await generate(env.stack, key, {"model": "flux-schnell", "prompt": unique("x [[fake:spend-limit]]")})
    expect_error(reply, 502, code="upstream_error", should_retry=False, message=CREDENTIALS_MESSAGE)
    assert logs.errors() == [
        ("together refused the gateway's account: credit or quota exhausted (HTTP 402, code payment_required); "
        "top up the account behind IMAGEGW_TEST_TOGETHER_KEY")
    ]
    await expect_refunded(env.stack, account_id, code="upstream_error")


# -- regressions: output format defaults and the start-up hint ----------------------------------


async def test_a_model_without_png_answers_a_request_that_names_no_output_format(env: Env) -> None:
    account_id, key = await env.stack.admin.funded_key(FUNDED)
    reply = await generate(env.stack, key, {"model": "grok-image-jpeg", "prompt": unique("a comet")})
    assert reply.status == 200, reply.response.text
    assert await fetch_images(env.stack, reply, "url") == [("JPEG", 96, 96)]
    await expect_money(env.stack, account_id, spent=70_000, usage_rows=[("succeeded", "", 1, 1, 70_000)])


async def test_the_start_up_log_names_the_setting_that_enables_each_disabled_model(env: Env) -> None:
    [line] = [line for line in env.stack.server_log().splitlines() if "models not enabled" in line]
    message = json.loads(line)["message"]
    assert message == (
        "models not enabled: acme-image, flux-pro-1.1, sd3.5-large, stable-image-core, stable-image-ultra; set the "
        "provider key to enable them: acme (IMAGEGW_TEST_ACME_KEY), bfl (IMAGEGW_BFL_API_KEY), "
        "stability (IMAGEGW_STABILITY_API_KEY)"
    )
