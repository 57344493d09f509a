"""BflImageProvider against the fake BFL API: submit on one host, poll and download on another."""

from __future__ import annotations

import asyncio
import logging

import httpx
import pytest

from server.errors import ContentPolicyError, DeadlineExceededError, UpstreamError
from server.providers.bfl import BflImageProvider
from server.providers.http import CREDENTIALS_MESSAGE
from tests.fakes.bfl_fake import BflFake, start_bfl_fake
from tests.fakes.images import describe
from tests.providers.support import FAST_RETRY

pytestmark = pytest.mark.timeout(15)


def provider_for(fake: BflFake, http: httpx.AsyncClient, **options: object) -> BflImageProvider:
    options.setdefault("retry", FAST_RETRY)
    options.setdefault("api_key", fake.api_key)
    options.setdefault("poll_interval", 0.01)
    options.setdefault("max_poll_interval", 0.02)
    return BflImageProvider(http, base_url=fake.base_url, **options)  # type: ignore[arg-type]


@pytest.mark.parametrize("fmt", ["jpeg", "png", "webp"])
async def test_flux_submits_polls_the_regional_host_and_downloads(fmt, bfl_fake, http, image_request, deadline):
    request = image_request("flux-pro-1.1", size="1536x1024", output_format=fmt)
    result = await provider_for(bfl_fake, http).generate(request, deadline=deadline(5))

    assert [describe(image.data) for image in result.images] == [(fmt, 90, 60)]
    (submit,) = bfl_fake.submits
    assert submit.path == "/v1/flux-pro-1.1" and submit.headers["x-key"] == bfl_fake.api_key
    assert submit.json() == {
        "prompt": "a red fox in snow, watercolor", "width": 1440, "height": 960, "output_format": fmt,
        "safety_tolerance": 2, "prompt_upsampling": False,
    }
    polls = bfl_fake.polls
    assert len(polls) == 2  # one Pending, then Ready
    assert all(p in bfl_fake.regional.requests and p.headers["x-key"] == bfl_fake.api_key for p in polls)
    (download,) = bfl_fake.downloads
    assert "x-key" not in download.headers  # the signed delivery URL needs no key
    assert result.images[0].revised_prompt is None


@pytest.mark.parametrize(("size", "sent"), [("1024x1024", (1024, 1024)), ("1792x1024", (1440, 832)), ("1024x1792", (832, 1440))])
async def test_sizes_become_multiples_of_32_within_limits(size, sent, bfl_fake, http, image_request, deadline):
    await provider_for(bfl_fake, http).generate(image_request("flux-pro-1.1", size=size), deadline=deadline(5))
    body = bfl_fake.submits[-1].json()
    assert (body["width"], body["height"]) == sent


async def test_n_fans_out_one_task_per_image(bfl_fake, http, image_request, deadline):
    result = await provider_for(bfl_fake, http).generate(image_request("flux-pro-1.1", n=3), deadline=deadline(5))
    assert len(result.images) == 3
    assert len(bfl_fake.submits) == 3 and len(bfl_fake.downloads) == 3


@pytest.mark.parametrize("scenario", ["request-moderated", "content-moderated"])
async def test_moderated_tasks_are_content_policy(scenario, bfl_fake, http, image_request, deadline):
    request = image_request("flux-pro-1.1", n=2, prompt=f"x [[fake:{scenario}]]")
    with pytest.raises(ContentPolicyError):
        await provider_for(bfl_fake, http).generate(request, deadline=deadline(5))
    assert bfl_fake.downloads == []


async def test_one_moderated_task_of_several_is_a_partial_result(bfl_fake, http, image_request, deadline):
    bfl_fake.enqueue("ok", "content-moderated")
    result = await provider_for(bfl_fake, http).generate(image_request("flux-pro-1.1", n=2), deadline=deadline(5))
    assert len(result.images) == 1


@pytest.mark.parametrize("scenario", ["error", "task-not-found"])
async def test_failed_tasks_are_retryable_upstream_errors(scenario, bfl_fake, http, image_request, deadline):
    request = image_request("flux-pro-1.1", prompt=f"x [[fake:{scenario}]]")
    with pytest.raises(UpstreamError) as caught:
        await provider_for(bfl_fake, http).generate(request, deadline=deadline(5))
    assert caught.value.should_retry is True
    assert len(bfl_fake.submits) == 1  # never resubmitted: a new task would be billed again


async def test_poll_5xx_is_retried_as_a_poll_never_a_resubmit(bfl_fake, http, image_request, deadline):
    request = image_request("flux-pro-1.1", prompt="x [[fake:poll-5xx=2]]")
    result = await provider_for(bfl_fake, http).generate(request, deadline=deadline(5))
    assert len(result.images) == 1
    assert len(bfl_fake.submits) == 1
    assert len(bfl_fake.polls) == 4  # 502, 503, Pending, Ready


async def test_a_result_url_must_be_downloaded_before_it_expires(bfl_fake, http, image_request, deadline):
    request = image_request("flux-pro-1.1", prompt="x [[fake:expired-sample]]")
    with pytest.raises(UpstreamError) as caught:
        await provider_for(bfl_fake, http).generate(request, deadline=deadline(5))
    assert caught.value.should_retry is False and "HTTP 403" in caught.value.message


async def test_a_sample_that_is_no_image_is_malformed(bfl_fake, http, image_request, deadline):
    request = image_request("flux-pro-1.1", prompt="x [[fake:garbage-sample]]")
    with pytest.raises(UpstreamError) as caught:
        await provider_for(bfl_fake, http).generate(request, deadline=deadline(5))
    assert caught.value.should_retry is False


async def test_without_polling_url_the_base_host_is_polled(bfl_fake, http, image_request, deadline):
    request = image_request("flux-pro-1.1", prompt="x [[fake:no-polling-url]]")
    result = await provider_for(bfl_fake, http).generate(request, deadline=deadline(5))
    assert len(result.images) == 1
    assert [p in bfl_fake.server.requests for p in bfl_fake.polls] == [True]


async def test_a_polling_url_outside_the_provider_domain_never_gets_the_key(bfl_fake, http, image_request, deadline):
    request = image_request("flux-pro-1.1", prompt="x [[fake:foreign-polling-url]]")
    with pytest.raises(UpstreamError) as caught:
        await provider_for(bfl_fake, http).generate(request, deadline=deadline(5))
    assert caught.value.should_retry is False and "collector.example.net" in caught.value.message
    assert bfl_fake.polls == []


async def test_sibling_hosts_under_the_provider_domain_are_trusted(http):
    provider = BflImageProvider(http, api_key="k")
    assert provider._trusted(httpx.URL("https://api.us1.bfl.ai/v1/get_result?id=1"))
    assert provider._trusted(httpx.URL("https://api.bfl.ai/v1/get_result?id=1"))
    assert not provider._trusted(httpx.URL("http://api.us1.bfl.ai/v1/get_result?id=1"))
    assert not provider._trusted(httpx.URL("https://bfl.ai.evil.example/v1/get_result?id=1"))


@pytest.mark.parametrize("scenario", ["unknown-status", "poll-invalid-json", "html-200", "invalid-json", "truncated"])
async def test_malformed_answers_are_non_retryable(scenario, bfl_fake, http, image_request, deadline):
    request = image_request("flux-pro-1.1", prompt=f"x [[fake:{scenario}]]")
    with pytest.raises(UpstreamError) as caught:
        await provider_for(bfl_fake, http).generate(request, deadline=deadline(5))
    assert caught.value.should_retry is False
    assert len(bfl_fake.submits) == 1


async def test_out_of_credits_is_not_retried_and_logged(bfl_fake, http, image_request, deadline, caplog):
    bfl_fake.enqueue("payment")
    with caplog.at_level(logging.ERROR), pytest.raises(UpstreamError) as caught:
        await provider_for(bfl_fake, http).generate(image_request("flux-pro-1.1"), deadline=deadline(5))
    assert caught.value.should_retry is False
    assert any("IMAGEGW_BFL_API_KEY" in r.getMessage() for r in caplog.records if r.levelno == logging.ERROR)


async def test_a_wrong_key_is_our_credentials(bfl_fake, http, image_request, deadline, caplog):
    provider = provider_for(bfl_fake, http, api_key="bfl-wrong")
    with caplog.at_level(logging.ERROR), pytest.raises(UpstreamError) as caught:
        await provider.generate(image_request("flux-pro-1.1"), deadline=deadline(5))
    assert caught.value.message == CREDENTIALS_MESSAGE and caught.value.should_retry is False
    assert any(r.levelno == logging.ERROR for r in caplog.records)


@pytest.mark.parametrize("scenario", ["429", "500", "503"])
async def test_submit_failures_are_retried_then_retryable(scenario, bfl_fake, http, image_request, deadline):
    request = image_request("flux-pro-1.1", prompt=f"x [[fake:{scenario}]]")
    with pytest.raises(UpstreamError) as caught:
        await provider_for(bfl_fake, http).generate(request, deadline=deadline(5))
    assert caught.value.should_retry is True
    assert len(bfl_fake.submits) == 3


async def test_a_task_pending_past_the_deadline_gives_deadline_exceeded(http, image_request, deadline):
    async with start_bfl_fake(pending=1000) as fake:
        with pytest.raises(DeadlineExceededError):
            await provider_for(fake, http).generate(image_request("flux-pro-1.1"), deadline=deadline(0.3))
        assert len(fake.submits) == 1


async def test_cancelling_closes_the_upstream_request(bfl_fake, http, image_request, deadline):
    request = image_request("flux-pro-1.1", prompt="x [[fake:slow=5]]")
    task = asyncio.create_task(provider_for(bfl_fake, http).generate(request, deadline=deadline(10)))
    while not bfl_fake.submits:
        await asyncio.sleep(0.01)
    task.cancel()
    with pytest.raises(asyncio.CancelledError):
        await task
    gone = await bfl_fake.server.wait_for_disconnect(timeout=2)
    assert gone.path == "/v1/flux-pro-1.1"
