"""Every provider, every outcome, end to end: client -> Envoy -> imagegw serve -> adapter -> fake.

One process stack for the module with every provider enabled against its fake, configured
as an operator would (``IMAGEGW_<NAME>_API_KEY`` / ``_BASE_URL``, an operator's catalog
file): OpenAI, Google, Stability and BFL, OpenAI-compatible hosts (xAI, Together, a plain
relay), fallbacks and per-model timeouts on copies of the shipped rows. Each ``Row``
(``tests.e2e.matrix``) is one provider x outcome: success, partial, refused before any
call, moderation, our credentials refused, rate limited, transient and persistent
failures, malformed answers, deadlines, plus each provider's own cases; every one checks
the status, the exact body and headers, the images, what the fake received and the money
to the micro-dollar. Edits and variations are rows too (``operation``, ``files``): each
provider's edit endpoint gets exactly the fields and files its API takes, and the money
includes the inputs (OpenAI's and Gemini's from the input image tokens they report). The
official SDK's ``images.edit``, streamed or not, with one file or several, runs last, against
the same stack. A new provider or operation joins by adding its fake to ``env`` and its rows
to ``ROWS``.
"""

from __future__ import annotations

import base64
import io
from collections.abc import AsyncIterator, Callable
from typing import Any

import httpx
import openai
import pytest
from PIL import Image

from server.catalog import load_catalog
from server.providers import PROVIDERS
from server.providers.local import revised_prompt
from tests.e2e.matrix import (
    CREDENTIALS_MESSAGE,
    FUNDED,
    MALFORMED,
    MODERATED,
    ZERO_USAGE,
    Env,
    Err,
    MatrixRun,
    Reply,
    Row,
    Upload,
    catalog_with,
    clone_row,
    expect_money,
    generate,
    list_models,
    mask_png,
    png,
    unique,
    usage,
    usd,
)
from tests.e2e.test_streaming import sse
from tests.fakes.bfl_fake import BflFake
from tests.fakes.google_fake import GoogleFake
from tests.fakes.openai_fake import OpenAIFake
from tests.fakes.server import RecordedRequest
from tests.fakes.stability_fake import StabilityFake
from tests.openai_schema import validator
from tests.stack import process_stack

pytestmark = [pytest.mark.e2e, pytest.mark.timeout(120)]

# -- the operator's catalog: the shipped one plus variants and OpenAI-compatible hosts -----------------

# Variants of shipped rows with fallbacks and short timeouts, so the shipped rows keep none.
VARIANTS = [
    ("gpt-image-1", "fallback-gpt-image-1", {"fallbacks": ["local-1"]}),  # 42_000 -> 1_000
    ("gpt-image-1.5", "fallback-gpt-image-1.5", {"fallbacks": ["imagen-3"]}),  # 34_000 -> 30_000, another provider
    ("imagen-3", "fallback-imagen-3", {"fallbacks": ["gpt-image-1"]}),  # 30_000 -> 42_000: capped at 30_000
    ("dall-e-2", "fallback-dall-e-2", {"fallbacks": ["acme-image", "imagen-4"]}),  # acme is not enabled: skipped
    ("gpt-image-2", "timeout-gpt-image-2", {"timeout_seconds": 1.5, "fallbacks": ["local-1"]}),
    ("dall-e-3", "timeout-dall-e-3", {"timeout_seconds": 1.5}),
]
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


def bearer(fake: OpenAIFake) -> Callable[[RecordedRequest], bool]:
    return lambda r: r.headers.get("authorization") == f"Bearer {fake.api_key}"


@pytest.fixture(scope="module")
async def env(tmp_path_factory: pytest.TempPathFactory) -> AsyncIterator[Env]:
    root = tmp_path_factory.mktemp("provider-matrix")
    async with (
        OpenAIFake.running() as openai_fake,
        GoogleFake.running() as google_fake,
        StabilityFake.running() as stability_fake,
        BflFake.running(pending=1) as bfl_fake,
        OpenAIFake.running(dialect="xai", api_key="xai-test-key") as xai_fake,
        OpenAIFake.running(dialect="together", api_key="together-test-key") as together_fake,
    ):
        fakes = {"openai": openai_fake, "google": google_fake, "stability": stability_fake, "bfl": bfl_fake,
                 "xai": xai_fake, "together": together_fake, "relay": openai_fake}
        variants = "".join(clone_row(model, variant, **keys) for model, variant, keys in VARIANTS)
        relay = clone_row("dall-e-2", "relay-dall-e-2", provider="relay", base_url=openai_fake.base_url,
                          api_key_env="IMAGEGW_TEST_RELAY_KEY")
        compatible = COMPATIBLE_ROWS.format(xai=xai_fake.base_url, together=together_fake.base_url)
        catalog = catalog_with(root / "catalog.toml", {}, variants + relay + compatible)
        settings: dict[str, Any] = {}
        for name in PROVIDERS:  # every built-in provider, as its registry entry names the variables
            settings[f"{name}_api_key"] = fakes[name].api_key
            settings[f"{name}_base_url"] = fakes[name].base_url
        async with process_stack(
            root / "var",
            catalog_file=catalog,
            test_xai_key=xai_fake.api_key,
            test_together_key=together_fake.api_key,
            test_relay_key=openai_fake.api_key,
            **settings,
        ) as stack:
            # What every request of a row must carry: our key, where the provider takes it.
            credentials: dict[str, Callable[[RecordedRequest], bool]] = {
                "openai": bearer(openai_fake),
                "relay": bearer(openai_fake),
                "xai": bearer(xai_fake),
                "together": bearer(together_fake),
                # In the header, never in the URL (where logs and proxies would keep it).
                "google": lambda r: r.headers.get("x-goog-api-key") == google_fake.api_key and "key" not in r.query,
                # Multipart fields only (no dummy file), asking for the raw image bytes.
                "stability": lambda r: (
                    r.headers.get("authorization") == f"Bearer {stability_fake.api_key}"
                    and r.content_type == "multipart/form-data"
                    and r.headers.get("accept") == "image/*"
                    and (r.path.endswith("/edit/inpaint") or all(part.filename is None for part in r.multipart() or []))
                ),
                "bfl": lambda r: r.headers.get("x-key") == bfl_fake.api_key,
            }
            yield Env(stack, fakes, credentials)


@pytest.fixture(scope="module")
async def matrix(env: Env, request: pytest.FixtureRequest) -> AsyncIterator[MatrixRun]:
    """The selected rows, started together when the first of them runs."""
    selected = {
        item.callspec.params["row"].id
        for item in request.session.items
        if hasattr(item, "callspec") and "row" in item.callspec.params
    }
    run = MatrixRun(env, [row for row in ROWS if row.id in selected])
    yield run
    await run.close()


# -- the rows ---------------------------------------------------------------------------------------

BOTH_FORMATS = ("url", "b64_json")
# The caller's wait, bounded to say what happened, with room for a loaded machine:
# a 2 s deadline against an upstream 8 s away ends at the deadline (the server answers at
# 1.85 s, a little before the caller's), never when the upstream would have;
AT_THE_DEADLINE = (1.5, 5.0)
# a wait the upstream asked for that does not fit is not waited for: the answer comes at
# once, never at the caller's deadline (5 s and more in those rows).
AT_ONCE = (0.0, 3.0)
TIMEOUT = Err("timeout", pattern=True, message=(
    # Two timers end such a request at the same instant, the generation's (naming the model)
    # and the HTTP call's own; either may fire first, and both messages are true.
    r"The model '[a-z0-9.-]+' did not finish before the request's deadline\.|"
    r"The upstream provider did not answer before the request's deadline\."
))
TRUNCATED = MALFORMED.replace(".", r"\.") + r"a truncated answer \(connection closed early after \d+ bytes\) from 127\.0\.0\.1\."


def failing(status: str, *, retry: bool = True) -> Err:
    return Err("upstream_error", f"The upstream provider is failing ({status}); gave up after 3 attempts.", retry)


def rate_limited(tail: str, retry_after: str | None = None) -> Err:
    return Err("upstream_error", f"The upstream provider is rate limiting the gateway (HTTP 429); {tail}.", True, retry_after)


def malformed(detail: str) -> Err:
    return Err("upstream_error", MALFORMED + detail)


CREDENTIALS = Err("upstream_error", CREDENTIALS_MESSAGE)
MODERATION = Err("content_policy_violation", MODERATED)


def refused(provider: str, model: str, body: dict[str, Any], param: str, code: str) -> Row:
    """A parameter the model cannot take: 400 naming it, nothing sent upstream, nothing reserved."""
    return Row(provider, "refused", model, body=body, label=param, status=400, calls=0, error=Err(code, param=param))


def at(path: str) -> Callable[[Env, Row, str, Reply], Any]:
    """A row check: every request of the row went to ``path``."""

    async def check(env: Env, row: Row, prompt: str, reply: Reply) -> None:
        assert {r.path for r in env.fakes[row.provider].sent(prompt)} == {path}

    return check


def not_sent_to(provider: str) -> Callable[[Env, Row, str, Reply], Any]:
    """A row check: ``provider``'s fake never saw the prompt (no fallback happened)."""

    async def check(env: Env, row: Row, prompt: str, reply: Reply) -> None:
        assert env.fakes[provider].sent(prompt) == []

    return check


# OpenAI ------------------------------------------------------------------------------------------

OPENAI_PRICES = {"gpt-image-2": 42_000, "gpt-image-1.5": 34_000, "gpt-image-1": 42_000, "dall-e-3": 40_000,
                 "dall-e-2": 20_000}
GPT_IMAGE = ("gpt-image-2", "gpt-image-1.5", "gpt-image-1")
GPT_ANSWER = {"size": "1024x1024", "quality": "medium", "output_format": "png", "background": "opaque"}
MEDIUM_1024_TOKENS = 1056  # the fake's gpt-image-1 output tokens for medium 1024x1024 (providers.md §1.4)
RENDITION = "A detailed rendition of: {prompt}"  # the fakes' dall-e-3 and grok revised_prompt


def gpt_usage(images: int = 1, per_image: int = MEDIUM_1024_TOKENS) -> Callable[[str], dict[str, Any]]:
    # The fake counts one input token per word of the prompt.
    return lambda prompt: usage(input_text=len(prompt.split()), output_image=per_image * images)


def gpt_body(model: str, **fields: Any) -> Callable[[str], list[dict[str, Any]]]:
    """What goes upstream for a GPT image model: concrete size and quality, never response_format."""
    base = {"n": 1, "size": "1024x1024", "quality": "medium", "output_format": "png"}
    return lambda prompt: [{"model": model, "prompt": prompt, **base, **fields}]


def dalle_body(model: str, **fields: Any) -> Callable[[str], list[dict[str, Any]]]:
    base = {"n": 1, "size": "1024x1024", "quality": "standard", "response_format": "b64_json"}
    return lambda prompt: [{"model": model, "prompt": prompt, **base, **fields}]


def openai_success(model: str, response_format: str) -> Row:
    gpt = model in GPT_IMAGE
    return Row(
        "openai", "success", model, body={"response_format": response_format}, label=response_format,
        images=[("PNG", 1024, 1024)], cost=OPENAI_PRICES[model],
        answer=GPT_ANSWER if gpt else {}, usage=gpt_usage() if gpt else ZERO_USAGE,
        revised=RENDITION if model == "dall-e-3" else None,
        sent=gpt_body(model) if gpt else dalle_body(model),
    )


async def rehosted(env: Env, row: Row, prompt: str, reply: Reply) -> None:
    """Each of the provider's links was downloaded once, without our key, and never passed on."""
    fake = env.fakes[row.provider]
    assert isinstance(fake, OpenAIFake)
    downloads = fake.blobs.fetches(prompt)
    assert len(downloads) == row.n
    assert all("authorization" not in download.headers for download in downloads)
    assert fake.server.base_url not in reply.response.text


OPENAI_ROWS = [
    *(openai_success(model, rf) for model in OPENAI_PRICES for rf in BOTH_FORMATS),
    Row("openai", "success", "gpt-image-1", label="every-option", body={
        "n": 3, "size": "1536x1024", "quality": "high", "output_format": "webp", "output_compression": 80,
        "background": "opaque", "moderation": "low", "user": "user-42", "response_format": "b64_json"},
        images=[("WEBP", 1536, 1024)] * 3, cost=750_000, usage=gpt_usage(3, 6208),
        answer={"size": "1536x1024", "quality": "high", "output_format": "webp", "background": "opaque"},
        sent=gpt_body("gpt-image-1", n=3, size="1536x1024", quality="high", output_format="webp",
                      output_compression=80, background="opaque", moderation="low", user="user-42")),
    Row("openai", "success", "gpt-image-1.5", label="auto", body={"size": "auto", "quality": "auto"},
        images=[("PNG", 1024, 1024)], cost=34_000, answer=GPT_ANSWER, usage=gpt_usage(),
        sent=gpt_body("gpt-image-1.5")),  # `auto` is sent as the concrete values it was priced at
    Row("openai", "success", "dall-e-2", label="n-in-one-call", body={"n": 2, "size": "256x256"},
        images=[("PNG", 256, 256)] * 2, cost=32_000, sent=dalle_body("dall-e-2", n=2, size="256x256")),
    Row("openai", "success", "dall-e-3", label="style-hd", body={
        "size": "1792x1024", "quality": "hd", "style": "natural", "response_format": "b64_json"},
        images=[("PNG", 1792, 1024)], cost=120_000, revised=RENDITION,
        sent=dalle_body("dall-e-3", size="1792x1024", quality="hd", style="natural")),
    Row("openai", "success", "dall-e-3", "url", label="rehosted", images=[("PNG", 1024, 1024)], cost=40_000,
        revised=RENDITION, extra=rehosted),
    Row("openai", "success", "dall-e-2", "url", label="rehosted", body={"n": 2, "size": "512x512"},
        images=[("PNG", 512, 512)] * 2, cost=36_000, extra=rehosted),
    Row("openai", "success", "gpt-image-1", "data-url", body={"response_format": "b64_json"},
        images=[("PNG", 1024, 1024)], cost=42_000, answer=GPT_ANSWER, usage=gpt_usage()),
    Row("openai", "success", "gpt-image-1", "drip=0.05", images=[("PNG", 1024, 1024)], cost=42_000,
        answer=GPT_ANSWER, usage=gpt_usage()),  # a body dripped in slowly is read whole
    # The bytes say JPEG whatever the answer claims: the image is stored and served as what it is.
    Row("openai", "success", "gpt-image-1", "wrong-format", images=[("JPEG", 8, 8)], cost=42_000,
        answer=GPT_ANSWER, usage=gpt_usage()),
    refused("openai", "gpt-image-1", {"style": "vivid"}, "style", "unsupported_parameter"),
    refused("openai", "gpt-image-2", {"background": "transparent"}, "background", "invalid_value"),
    refused("openai", "gpt-image-1", {"quality": "hd"}, "quality", "invalid_value"),
    refused("openai", "gpt-image-1", {"size": "256x256"}, "size", "invalid_size"),
    refused("openai", "gpt-image-1", {"n": 11}, "n", "integer_above_max_value"),
    # A stream sends images as events (b64_json): a stream of URLs is refused.
    refused("openai", "gpt-image-1", {"stream": True, "response_format": "url"}, "response_format", "invalid_value"),
    refused("openai", "dall-e-3", {"n": 2}, "n", "integer_above_max_value"),
    refused("openai", "dall-e-3", {"output_format": "jpeg"}, "output_format", "invalid_value"),
    refused("openai", "dall-e-3", {"moderation": "low"}, "moderation", "unsupported_parameter"),
    refused("openai", "dall-e-2", {"style": "natural"}, "style", "unsupported_parameter"),
    refused("openai", "dall-e-2", {"quality": "hd"}, "quality", "invalid_value"),
    refused("openai", "dall-e-2", {"prompt": "x" * 1001}, "prompt", "string_above_max_length"),
    *(Row("openai", "moderation", model, scenario, status=400, error=MODERATION)
      for model, scenario in [("gpt-image-1", "moderated"), ("gpt-image-2", "moderated-output"),
                              ("dall-e-3", "content-policy"), ("dall-e-2", "moderated")]),
    Row("openai", "partial", "gpt-image-1", "partial", body={"n": 3, "response_format": "b64_json"},
        images=[("PNG", 1024, 1024)] * 2, cost=84_000, answer=GPT_ANSWER, usage=gpt_usage(2)),
    Row("openai", "partial", "dall-e-2", "partial", body={"n": 4, "response_format": "b64_json"},
        images=[("PNG", 1024, 1024)] * 3, cost=60_000),
    # Retried once, honouring the hint (the caller waits at least that long), counted in the metric.
    *(Row("openai", "transient", "gpt-image-1", scenario, images=[("PNG", 1024, 1024)], cost=42_000, calls=2,
          answer=GPT_ANSWER, usage=gpt_usage(), seconds=(wait, 30), retries=1)
      for scenario, wait in [("429-s=0.6x1", 0.6), ("429-ms=400x1", 0.4), ("503x1", 0.0), ("html-502x1", 0.0)]),
    Row("openai", "transient", "gpt-image-1", "503x2", images=[("PNG", 1024, 1024)], cost=42_000, calls=3,
        answer=GPT_ANSWER, usage=gpt_usage()),
    *(Row("openai", "upstream-error", "gpt-image-1", scenario, status=502, calls=3, error=failing(status))
      for scenario, status in [("500", "HTTP 500"), ("503", "HTTP 503"), ("html-502", "HTTP 502"),
                               ("html-504", "HTTP 504"), ("reset", "connection closed early on images/generations")]),
    # A wait longer than we make is not slept: at once, retryable, with the wait for the caller.
    Row("openai", "rate-limited", "gpt-image-1", "429-huge", status=502, seconds=(0, 5),
        error=rate_limited("retry after 600 s", retry_after="600")),
    # A wait (retry-after 20 s) that does not fit the caller's deadline: at once, retryable.
    Row("openai", "rate-limited", "gpt-image-1", "429-s=20", deadline="10S", status=502, seconds=AT_ONCE,
        error=rate_limited("retry after 20 s", retry_after="20")),
    Row("openai", "rate-limited", "gpt-image-1", "429-none", status=502, calls=3,
        error=rate_limited("gave up after 3 attempts")),
    Row("openai", "upstream-error", "gpt-image-1", "500-no-retry", status=502, error=Err(
        "upstream_error", "The upstream provider failed (HTTP 500) and asked not to be retried.")),
    # Our key or account refused: a generic 502 for the caller, a loud line for the operator.
    *(Row("openai", "credentials", "gpt-image-1", scenario, status=502, error=CREDENTIALS, log=[line])
      for scenario, line in [
          ("revoked-key", "openai rejected the gateway's credentials (HTTP 401, code invalid_api_key); "
                          "check IMAGEGW_OPENAI_API_KEY"),
          ("region", "openai rejected the gateway's credentials (HTTP 403, code unsupported_country_region_territory); "
                     "check IMAGEGW_OPENAI_API_KEY"),
          ("quota", "openai refused the gateway's account: credit or quota exhausted (HTTP 429, code "
                    "insufficient_quota); top up the account behind IMAGEGW_OPENAI_API_KEY"),
          ("billing", "openai refused the gateway's account: credit or quota exhausted (HTTP 400, code "
                      "billing_hard_limit_reached); top up the account behind IMAGEGW_OPENAI_API_KEY"),
      ]),
    Row("openai", "upstream-error", "dall-e-3", "model-gone", status=502,
        error=Err("upstream_error", "The upstream provider does not serve this model."),
        log=["openai does not serve the requested model (HTTP 404): The model `dall-e-3` has been deprecated."]),
    Row("openai", "upstream-error", "gpt-image-1", "invalid", status=502, error=Err(
        "upstream_error", "The upstream provider rejected the request (HTTP 400): Invalid value for 'size'.")),
    # Never retried: the upstream may have billed us already.
    *(Row("openai", "malformed", model, scenario, body={"response_format": "b64_json"}, status=502, error=error)
      for model, scenario, error in [
          ("gpt-image-1", "html-200", malformed("invalid JSON from 127.0.0.1 (HTTP 200).")),
          ("gpt-image-1", "invalid-json", malformed("invalid JSON from 127.0.0.1 (HTTP 200).")),
          ("gpt-image-1", "missing-image", malformed("a data entry without b64_json or url.")),
          ("gpt-image-1", "empty-data", malformed("an answer with no images.")),
          ("gpt-image-1", "bad-base64", malformed("image data that is not valid base64.")),
          ("gpt-image-1", "garbage-image", malformed("bytes that are not a PNG, JPEG or WebP image.")),
          ("gpt-image-1", "fake-png", malformed("a png image that does not decode.")),
          ("gpt-image-1", "truncated", Err("upstream_error", TRUNCATED, pattern=True)),
          ("dall-e-3", "expired-url", malformed("the image URL answered HTTP 403.")),
      ]),
    Row("openai", "deadline", "gpt-image-1", "slow=8", deadline="2S", status=504, error=TIMEOUT,
        seconds=AT_THE_DEADLINE, disconnects=1),
]

# Google ------------------------------------------------------------------------------------------

GOOGLE_PRICES = {"imagen-3": 30_000, "imagen-4": 40_000, "gemini-2.5-flash-image": 39_000}
GOOGLE_UPSTREAM = {"imagen-3": "imagen-3.0-generate-002", "imagen-4": "imagen-4.0-generate-001",
                   "gemini-2.5-flash-image": "gemini-2.5-flash-image"}
GEMINI = "gemini-2.5-flash-image"


def imagen_body(n: int = 1, ratio: str = "1:1", output: dict[str, Any] | None = None) -> Callable[[str], list[Any]]:
    parameters = {"sampleCount": n, "aspectRatio": ratio, "includeRaiReason": True,
                  "outputOptions": output or {"mimeType": "image/png"}}
    return lambda prompt: [{"instances": [{"prompt": prompt}], "parameters": parameters}]


def gemini_body(ratio: str = "1:1", calls: int = 1) -> Callable[[str], list[Any]]:
    return lambda prompt: [{"contents": [{"role": "user", "parts": [{"text": prompt}]}],
                            "generationConfig": {"responseModalities": ["IMAGE"], "imageConfig": {"aspectRatio": ratio}}}] * calls


def gemini_usage(images: int = 1, calls: int = 1) -> dict[str, Any]:
    return usage(input_text=12 * calls, output_image=1290 * images)  # the fake's usageMetadata per call


def google_success(model: str, response_format: str) -> Row:
    imagen = model != GEMINI
    method = "predict" if imagen else "generateContent"
    return Row(
        "google", "success", model, body={"response_format": response_format}, label=response_format,
        images=[("PNG", 1024, 1024)], cost=GOOGLE_PRICES[model], usage=ZERO_USAGE if imagen else gemini_usage(),
        sent=imagen_body() if imagen else gemini_body(), extra=at(f"/v1beta/models/{GOOGLE_UPSTREAM[model]}:{method}"),
    )


GOOGLE_ROWS = [
    *(google_success(model, rf) for model in GOOGLE_PRICES for rf in BOTH_FORMATS),
    # n is Imagen's sampleCount: one call; 1792x1024 is nearest 16:9, which Imagen renders at 1408x768.
    Row("google", "success", "imagen-4", label="n-in-one-call", body={
        "n": 3, "size": "1792x1024", "output_format": "jpeg", "output_compression": 70, "response_format": "b64_json"},
        images=[("JPEG", 1408, 768)] * 3, cost=120_000,
        sent=imagen_body(3, "16:9", {"mimeType": "image/jpeg", "compressionQuality": 70})),
    Row("google", "success", "imagen-3", label="n-in-one-call", body={
        "n": 3, "size": "1536x1024", "output_format": "jpeg", "output_compression": 70, "response_format": "b64_json"},
        images=[("JPEG", 1280, 896)] * 3, cost=90_000,
        sent=imagen_body(3, "4:3", {"mimeType": "image/jpeg", "compressionQuality": 70})),
    # Gemini makes one image per call: n fans out.
    Row("google", "success", GEMINI, label="fan-out", body={"n": 3, "size": "1536x1024"}, calls=3,
        images=[("PNG", 1248, 832)] * 3, cost=117_000, usage=gemini_usage(3, 3), sent=gemini_body("3:2", 3)),
    Row("google", "success", "imagen-3", "enhanced", body={"n": 2}, images=[("PNG", 1024, 1024)] * 2, cost=60_000,
        revised="An enhanced, detailed version of: {prompt}"),
    # Parts that are not the image are skipped and never charged (two-images: one asked, one given).
    Row("google", "success", "imagen-3", "safety-attributes", images=[("PNG", 1024, 1024)], cost=30_000),
    *(Row("google", "success", GEMINI, scenario, images=[("PNG", 1024, 1024)], cost=39_000, usage=tokens)
      for scenario, tokens in [("thought", gemini_usage()), ("with-text", gemini_usage()),
                               ("two-images", usage(input_text=12, output_image=2 * 1290))]),
    refused("google", "imagen-3", {"style": "vivid"}, "style", "unsupported_parameter"),
    refused("google", "imagen-4", {"n": 5}, "n", "integer_above_max_value"),
    refused("google", "imagen-3", {"output_format": "webp"}, "output_format", "invalid_value"),
    refused("google", "imagen-3", {"quality": "hd"}, "quality", "invalid_value"),
    refused("google", "imagen-4", {"background": "opaque"}, "background", "unsupported_parameter"),
    refused("google", "imagen-3", {"prompt": "x" * 1901}, "prompt", "string_above_max_length"),
    refused("google", GEMINI, {"output_format": "jpeg"}, "output_format", "invalid_value"),
    refused("google", GEMINI, {"size": "256x256"}, "size", "invalid_size"),
    refused("google", GEMINI, {"moderation": "low"}, "moderation", "unsupported_parameter"),
    refused("google", GEMINI, {"output_compression": 50}, "output_compression", "unsupported_parameter"),
    *(Row("google", "moderation", model, scenario, body={"n": n}, status=400, error=MODERATION,
          calls=n if model == GEMINI else 1)
      for model, scenario, n in [
          ("imagen-3", "prompt-blocked", 1),  # 400 INVALID_ARGUMENT on :predict
          ("imagen-4", "all-filtered", 2),  # 200 with only a raiFilteredReason entry
          ("imagen-3", "all-filtered-empty", 1),  # 200 with {}
          (GEMINI, "blocked", 1),  # 200 with promptFeedback.blockReason
          (GEMINI, "image-safety", 2),  # 200, finishReason IMAGE_SAFETY, on every fanned-out call
          (GEMINI, "image-prohibited", 1),
      ]),
    Row("google", "partial", "imagen-3", "partial", body={"n": 3, "response_format": "b64_json"},
        images=[("PNG", 1024, 1024)] * 2, cost=60_000),
    Row("google", "partial", GEMINI, "image-safetyx1", body={"n": 3}, calls=3, images=[("PNG", 1024, 1024)] * 2,
        cost=78_000, usage=gemini_usage(2, 2)),
    # RetryInfo.retryDelay, read from the body, is honoured.
    *(Row("google", "transient", model, scenario, images=[("PNG", 1024, 1024)], cost=GOOGLE_PRICES[model], calls=2,
          usage=gemini_usage() if model == GEMINI else ZERO_USAGE, seconds=(wait, 30))
      for model, scenario, wait in [("imagen-3", "429=0.6x1", 0.6), (GEMINI, "429=0.5x1", 0.5),
                                    ("imagen-4", "503x1", 0.0), (GEMINI, "list-errorx1", 0.0)]),
    Row("google", "rate-limited", "imagen-4", "429=26", deadline="5S", status=502, seconds=AT_ONCE,
        error=rate_limited("retry after 26 s", retry_after="26")),
    *(Row("google", "upstream-error", model, scenario, status=502, calls=3, error=failing(status))
      for model, scenario, status in [("imagen-3", "500", "HTTP 500"), (GEMINI, "503", "HTTP 503"),
                                      ("imagen-4", "list-error", "HTTP 503"), (GEMINI, "html-502", "HTTP 502"),
                                      ("imagen-4", "html-504", "HTTP 504")]),
    *(Row("google", "credentials", model, scenario, status=502, error=CREDENTIALS, log=[line])
      for model, scenario, line in [
          ("imagen-3", "revoked-key", "google rejected the gateway's credentials (HTTP 400, code API_KEY_INVALID); "
                                      "check IMAGEGW_GOOGLE_API_KEY"),
          (GEMINI, "revoked-key", "google rejected the gateway's credentials (HTTP 400, code API_KEY_INVALID); "
                                  "check IMAGEGW_GOOGLE_API_KEY"),
          (GEMINI, "permission", "google rejected the gateway's credentials (HTTP 403, code SERVICE_DISABLED); "
                                 "check IMAGEGW_GOOGLE_API_KEY"),
          ("imagen-4", "429-daily", "google refused the gateway's account: credit or quota exhausted (HTTP 429, code "
                                    "QUOTA_PER_DAY); top up the account behind IMAGEGW_GOOGLE_API_KEY"),
      ]),
    Row("google", "upstream-error", "imagen-4", "model-gone", status=502,
        error=Err("upstream_error", "The upstream provider does not serve this model."),
        log=["google does not serve the requested model (HTTP 404): models/imagen-4.0-generate-001 is not found for "
             "API version v1beta, or is not supported for predict."]),
    *(Row("google", "malformed", model, scenario, body={"response_format": "b64_json"}, status=502, error=error)
      for model, scenario, error in [
          ("imagen-3", "html-200", malformed("invalid JSON from 127.0.0.1 (HTTP 200).")),
          (GEMINI, "invalid-json", malformed("invalid JSON from 127.0.0.1 (HTTP 200).")),
          ("imagen-3", "missing-image", malformed("a prediction without bytesBase64Encoded.")),
          ("imagen-4", "bad-base64", malformed("image data that is not valid base64.")),
          (GEMINI, "bad-base64", malformed("image data that is not valid base64.")),
          ("imagen-3", "garbage-image", malformed("bytes that are not a PNG, JPEG or WebP image.")),
          (GEMINI, "fake-png", malformed("a png image that does not decode.")),
          ("imagen-4", "truncated", Err("upstream_error", TRUNCATED, pattern=True)),
          ("imagen-3", "invalid-json", malformed("invalid JSON from 127.0.0.1 (HTTP 200).")),
          ("imagen-3", "bad-base64", malformed("image data that is not valid base64.")),
          ("imagen-3", "truncated", Err("upstream_error", TRUNCATED, pattern=True)),
          ("imagen-3", "fake-png", malformed("a png image that does not decode.")),
          (GEMINI, "html-200", malformed("invalid JSON from 127.0.0.1 (HTTP 200).")),
          (GEMINI, "truncated", Err("upstream_error", TRUNCATED, pattern=True)),
          (GEMINI, "garbage-image", malformed("bytes that are not a PNG, JPEG or WebP image.")),
          # The model chose not to draw: never a success, never retried.
          (GEMINI, "missing-image", Err("upstream_error", "The upstream model answered without an image (finishReason STOP).")),
          (GEMINI, "text-only", Err("upstream_error", "The upstream model answered without an image (finishReason STOP).")),
          (GEMINI, "no-image", Err("upstream_error", "The upstream model answered without an image (finishReason NO_IMAGE).")),
          (GEMINI, "image-other", Err("upstream_error",
                                      "The upstream model answered without an image (finishReason IMAGE_OTHER).")),
      ]),
    *(Row("google", "deadline", model, "slow=8", deadline="2S", status=504, error=TIMEOUT, seconds=AT_THE_DEADLINE,
          disconnects=1) for model in ("imagen-3", GEMINI)),
    # Every call of a fan-out is closed.
    Row("google", "deadline", GEMINI, "slow=8", body={"n": 2}, label="fan-out", deadline="2S", status=504,
        error=TIMEOUT, calls=2, seconds=AT_THE_DEADLINE, disconnects=2),
]

# Stability ---------------------------------------------------------------------------------------

STABILITY_PRICES = {"stable-image-ultra": 80_000, "stable-image-core": 30_000, "sd3.5-large": 65_000}
STABILITY_ENDPOINTS = {"stable-image-ultra": "ultra", "stable-image-core": "core", "sd3.5-large": "sd3"}


def stability_fields(calls: int = 1, **fields: str) -> Callable[[str], list[dict[str, str]]]:
    base = {"aspect_ratio": "1:1", "output_format": "png"}
    return lambda prompt: [{"prompt": prompt, **base, **fields}] * calls


def stability_success(model: str, response_format: str) -> Row:
    # The fake renders each aspect ratio at 1/16 of Stability's pixel size (1:1 -> 64x64).
    return Row(
        "stability", "success", model, body={"response_format": response_format}, label=response_format,
        images=[("PNG", 64, 64)], cost=STABILITY_PRICES[model],
        sent=stability_fields(**({"model": "sd3.5-large"} if model == "sd3.5-large" else {})),
        extra=at(f"/v2beta/stable-image/generate/{STABILITY_ENDPOINTS[model]}"),
    )


STABILITY_ROWS = [
    *(stability_success(model, rf) for model in STABILITY_PRICES for rf in BOTH_FORMATS),
    # One call per image; 1792x1024 -> 16:9, which the fake renders at 1344x768 / 16.
    Row("stability", "success", "stable-image-core", label="fan-out", body={
        "n": 3, "size": "1792x1024", "output_format": "webp", "response_format": "b64_json"}, calls=3,
        images=[("WEBP", 84, 48)] * 3, cost=90_000, sent=stability_fields(3, aspect_ratio="16:9", output_format="webp")),
    Row("stability", "success", "sd3.5-large", label="3:2-jpeg", body={"size": "1536x1024", "output_format": "jpeg"},
        images=[("JPEG", 76, 52)], cost=65_000,
        sent=stability_fields(aspect_ratio="3:2", output_format="jpeg", model="sd3.5-large")),
    # JPEG bytes labelled image/png: the gateway stores and serves what the bytes are.
    Row("stability", "success", "stable-image-ultra", "wrong-content-type", images=[("JPEG", 8, 8)], cost=80_000),
    refused("stability", "sd3.5-large", {"output_format": "webp"}, "output_format", "invalid_value"),
    refused("stability", "stable-image-ultra", {"n": 5}, "n", "integer_above_max_value"),
    refused("stability", "stable-image-core", {"style": "vivid"}, "style", "unsupported_parameter"),
    refused("stability", "stable-image-core", {"quality": "hd"}, "quality", "invalid_value"),
    refused("stability", "stable-image-core", {"background": "opaque"}, "background", "unsupported_parameter"),
    refused("stability", "stable-image-ultra", {"size": "512x512"}, "size", "invalid_size"),
    refused("stability", "stable-image-ultra", {"output_format": "jpeg", "output_compression": 50}, "output_compression",
            "unsupported_parameter"),
    refused("stability", "sd3.5-large", {"prompt": "x" * 10001}, "prompt", "string_above_max_length"),
    # moderated: 403 content_moderation; filtered: 200 with finish-reason CONTENT_FILTERED (a blurred image).
    *(Row("stability", "moderation", "stable-image-core", scenario, body={"n": n}, label=f"n{n}", status=400,
          error=MODERATION, calls=n) for scenario in ("moderated", "filtered") for n in (1, 2)),
    *(Row("stability", "partial", "sd3.5-large", f"{scenario}x1", body={"n": 3}, calls=3,
          images=[("PNG", 64, 64)] * 2, cost=130_000) for scenario in ("filtered", "moderated")),
    *(Row("stability", "transient", "stable-image-ultra", scenario, images=[("PNG", 64, 64)], cost=80_000, calls=2)
      for scenario in ("500x1", "html-502x1", "resetx1")),
    # No Retry-After: Stability times a key out for 60 s, longer than this caller waits.
    Row("stability", "rate-limited", "stable-image-core", "429", deadline="10S", status=502, seconds=AT_ONCE,
        error=rate_limited("retry after 60 s", retry_after="60")),
    *(Row("stability", "upstream-error", "stable-image-core", scenario, body={"n": 2}, status=502, calls=2 * 3,
          error=failing(status)) for scenario, status in [("500", "HTTP 500"), ("html-504", "HTTP 504")]),
    Row("stability", "credentials", "stable-image-ultra", "revoked-key", status=502, error=CREDENTIALS,
        log=["stability rejected the gateway's credentials (HTTP 401, code unauthorized); check IMAGEGW_STABILITY_API_KEY"]),
    Row("stability", "credentials", "stable-image-ultra", "payment", status=502, error=CREDENTIALS,
        log=["stability refused the gateway's account: credit or quota exhausted (HTTP 402, code payment_required); "
             "top up the account behind IMAGEGW_STABILITY_API_KEY"]),
    Row("stability", "upstream-error", "stable-image-core", "unprocessable", status=502, error=Err(
        "upstream_error",
        "The upstream provider rejected the request (HTTP 422): English is the only supported language for this service.")),
    *(Row("stability", "malformed", "stable-image-core", scenario, body={"response_format": "b64_json"}, status=502,
          error=error)
      for scenario, error in [
          ("garbage-image", malformed("bytes that are not a PNG, JPEG or WebP image.")),
          ("fake-png", malformed("a png image that does not decode.")),
          ("html-200", malformed("an answer of content type text/html.")),
          ("invalid-json", malformed("invalid JSON from 127.0.0.1 (HTTP 200).")),
          ("truncated", Err("upstream_error", TRUNCATED, pattern=True)),
      ]),
    # Both fanned-out calls are closed.
    Row("stability", "deadline", "stable-image-core", "slow=8", body={"n": 2}, deadline="2S", status=504,
        error=TIMEOUT, calls=2, seconds=AT_THE_DEADLINE, disconnects=2),
]

# Black Forest Labs --------------------------------------------------------------------------------

FLUX = "flux-pro-1.1"


def bfl_body(width: int = 1024, height: int = 1024, fmt: str = "png", calls: int = 1) -> Callable[[str], list[Any]]:
    return lambda prompt: [{"prompt": prompt, "width": width, "height": height, "output_format": fmt,
                            "safety_tolerance": 2, "prompt_upsampling": False}] * calls


async def submitted_polled_downloaded(env: Env, row: Row, prompt: str, reply: Reply) -> None:
    """Submit on the global host; poll the polling_url's regional host (another port) with
    the key, Pending then Ready; download result.sample, a signed link, once and without it."""
    fake = env.fakes["bfl"]
    assert isinstance(fake, BflFake)
    assert [r.path for r in fake.sent(prompt)] == [f"/v1/{FLUX}"]
    polls = fake.polls_of(prompt)
    assert len(polls) == 2
    assert all(p in fake.regional.requests and p.headers["x-key"] == fake.api_key for p in polls)
    [download] = fake.blobs.fetches(prompt)
    assert "x-key" not in download.headers
    assert fake.regional.base_url not in reply.response.text  # never the provider's 10-minute link


def bfl_polls(check: Callable[[BflFake, list[RecordedRequest], Reply], bool]) -> Callable[[Env, Row, str, Reply], Any]:
    async def run(env: Env, row: Row, prompt: str, reply: Reply) -> None:
        fake = env.fakes["bfl"]
        assert isinstance(fake, BflFake)
        polls = fake.polls_of(prompt)
        assert check(fake, polls, reply), [(p.target, p.received_at) for p in polls]

    return run


BFL_ROWS = [
    *(Row("bfl", "success", FLUX, body={"response_format": rf}, label=rf, images=[("PNG", 64, 64)], cost=40_000,
          sent=bfl_body(), extra=submitted_polled_downloaded) for rf in BOTH_FORMATS),
    # One task per image; 1536x1024 -> 1440x960 (multiples of 32, at most 1440), rendered at 1/16.
    Row("bfl", "success", FLUX, label="fan-out", body={
        "n": 3, "size": "1536x1024", "output_format": "jpeg", "response_format": "b64_json"}, calls=3,
        images=[("JPEG", 90, 60)] * 3, cost=120_000, sent=bfl_body(1440, 960, "jpeg", 3)),
    Row("bfl", "success", FLUX, label="webp", body={"size": "1536x1024", "output_format": "webp"},
        images=[("WEBP", 90, 60)], cost=40_000, sent=bfl_body(1440, 960, "webp")),
    # The regional gateway fails two polls: retried as polls (502, 503, Pending, Ready), never resubmitted.
    Row("bfl", "transient", FLUX, "poll-5xx=2", images=[("PNG", 64, 64)], cost=40_000,
        extra=bfl_polls(lambda fake, polls, reply: len(polls) == 4)),
    # An older answer with only an id: the global host is polled.
    Row("bfl", "transient", FLUX, "no-polling-url", images=[("PNG", 64, 64)], cost=40_000,
        extra=bfl_polls(lambda fake, polls, reply: [p in fake.server.requests for p in polls] == [True])),
    *(Row("bfl", "transient", FLUX, scenario, images=[("PNG", 64, 64)], cost=40_000, calls=calls)
      for scenario, calls in [("429x1", 2), ("503x1", 2), ("pending=3", 1)]),
    refused("bfl", FLUX, {"style": "vivid"}, "style", "unsupported_parameter"),
    refused("bfl", FLUX, {"n": 5}, "n", "integer_above_max_value"),
    refused("bfl", FLUX, {"quality": "hd"}, "quality", "invalid_value"),
    refused("bfl", FLUX, {"background": "opaque"}, "background", "unsupported_parameter"),
    refused("bfl", FLUX, {"size": "256x256"}, "size", "invalid_size"),
    refused("bfl", FLUX, {"output_format": "jpeg", "output_compression": 50}, "output_compression", "unsupported_parameter"),
    refused("bfl", FLUX, {"prompt": "x" * 10001}, "prompt", "string_above_max_length"),
    *(Row("bfl", "moderation", FLUX, scenario, body={"n": n}, label=f"n{n}", status=400, error=MODERATION, calls=n)
      for scenario, n in [("request-moderated", 1), ("request-moderated", 2), ("content-moderated", 1),
                          ("content-moderated", 2)]),
    Row("bfl", "partial", FLUX, "content-moderatedx1", body={"n": 3}, calls=3, images=[("PNG", 64, 64)] * 2,
        cost=80_000),
    *(Row("bfl", "upstream-error", FLUX, scenario, status=502, calls=calls, error=error)
      for scenario, calls, error in [
          ("500", 3, failing("HTTP 500")),
          ("503", 3, failing("HTTP 503")),
          ("429", 3, rate_limited("gave up after 3 attempts")),  # BFL names no wait
          # A failed task is retryable for the caller, but never resubmitted here: that would pay twice.
          ("error", 1, Err("upstream_error", "The upstream task failed (status 'Error').", True)),
          ("task-not-found", 1, Err("upstream_error", "The upstream task failed (status 'Task not found').", True)),
      ]),
    *(Row("bfl", "credentials", FLUX, scenario, status=502, error=CREDENTIALS, log=[line])
      for scenario, line in [
          ("revoked-key", "bfl rejected the gateway's credentials (HTTP 403, code None); check IMAGEGW_BFL_API_KEY"),
          ("forbidden", "bfl rejected the gateway's credentials (HTTP 403, code None); check IMAGEGW_BFL_API_KEY"),
          ("payment", "bfl refused the gateway's account: credit or quota exhausted (HTTP 402, code None); "
                      "top up the account behind IMAGEGW_BFL_API_KEY"),
      ]),
    *(Row("bfl", "malformed", FLUX, scenario, body={"response_format": "b64_json"}, status=502, error=error, extra=extra)
      for scenario, error, extra in [
          ("expired-sample", malformed("the image URL answered HTTP 403."), None),
          ("garbage-sample", malformed("bytes that are not a PNG, JPEG or WebP image."), None),
          ("poll-invalid-json", malformed("invalid JSON from 127.0.0.1 (HTTP 200)."), None),
          ("unknown-status", malformed("an unknown task status 'Sleeping'."), None),
          # The key never goes outside the provider's domain: not polled at all.
          ("foreign-polling-url", malformed("a polling_url outside the provider's domain (collector.example.net)."),
           bfl_polls(lambda fake, polls, reply: polls == [])),
          ("html-200", malformed("invalid JSON from 127.0.0.1 (HTTP 200)."), None),
          ("invalid-json", malformed("invalid JSON from 127.0.0.1 (HTTP 200)."), None),
          ("truncated", Err("upstream_error", TRUNCATED, pattern=True), None),
      ]),
    Row("bfl", "deadline", FLUX, "slow=8", deadline="2S", status=504, error=TIMEOUT, seconds=AT_THE_DEADLINE, disconnects=1),
    # Still pending at the deadline: 504, and polling stopped with the answer (the poll loop
    # runs inside the request, which answers only once the loop has ended).
    Row("bfl", "deadline", FLUX, "pending=1000", deadline="2S", status=504, error=TIMEOUT, seconds=AT_THE_DEADLINE,
        extra=bfl_polls(lambda fake, polls, reply: len(polls) >= 2
                        and max(p.received_at for p in polls) < reply.finished_at)),
]

# Fallbacks and per-model timeouts (the catalog's VARIANTS) ------------------------------------------


def local_revised(prompt: str) -> str:
    return revised_prompt(prompt, style=None, quality="medium")  # local-1's default quality


def also_sent(provider: str, calls: int, check: Callable[[Any], bool] = lambda payload: True) -> Callable[..., Any]:
    """A row check: the fallback's fake got ``calls`` requests for the prompt, each passing ``check``."""

    async def run(env: Env, row: Row, prompt: str, reply: Reply) -> None:
        fake = env.fakes[provider]
        payloads = [fake.payload(r) for r in fake.sent(prompt)]
        assert len(payloads) == calls and all(check(p) for p in payloads), payloads

    return run


FALLBACK_ROWS = [
    # 429 with retry-after 600: not waited for, retryable: local-1 serves, at its price.
    Row("openai", "fallback", "fallback-gpt-image-1", "429-huge", body={"response_format": "b64_json"},
        images=[("PNG", 1024, 1024)], cost=1_000, served_by="local-1", revised=local_revised),
    # Another provider within the same reservation: 2 x imagen-3's 30_000, less than the 68_000 reserved.
    Row("openai", "fallback", "fallback-gpt-image-1.5", "429-huge", body={"n": 2}, images=[("PNG", 1024, 1024)] * 2,
        cost=60_000, served_by="imagen-3", extra=also_sent("google", 1, lambda p: p["parameters"]["sampleCount"] == 2)),
    # gpt-image-1 costs 42_000; 30_000 was reserved for imagen-3: that is the most charged.
    # `auto` quality and size are resolved for the fallback.
    Row("google", "fallback", "fallback-imagen-3", "list-error", calls=3, images=[("PNG", 1024, 1024)], cost=30_000,
        served_by="gpt-image-1", answer=GPT_ANSWER, usage=gpt_usage(),
        extra=also_sent("openai", 1, lambda p: (p["quality"], p["size"]) == ("medium", "1024x1024"))),
    # acme-image is not enabled: skipped; imagen-4's 40_000 is capped at dall-e-2's 20_000.
    Row("openai", "fallback", "fallback-dall-e-2", "429-huge", images=[("PNG", 1024, 1024)], cost=20_000,
        served_by="imagen-4", extra=also_sent("google", 1)),
    # Never a fallback: a content-policy refusal, our own misconfiguration.
    Row("openai", "moderation", "fallback-gpt-image-1.5", "moderated", status=400, error=MODERATION,
        extra=not_sent_to("google")),
    Row("openai", "credentials", "fallback-gpt-image-1.5", "quota", status=502, error=CREDENTIALS,
        extra=not_sent_to("google"),
        log=["openai refused the gateway's account: credit or quota exhausted (HTTP 429, code insufficient_quota); "
             "top up the account behind IMAGEGW_OPENAI_API_KEY"]),
    # Every candidate fails: the last transient error.
    Row("openai", "upstream-error", "fallback-gpt-image-1.5", "html-502", status=502, calls=3,
        error=failing("HTTP 502"), extra=also_sent("google", 3)),
    # A model's own timeout_seconds (1.5) ends its call, long before the upstream's 8 s; the
    # caller's deadline still allows local-1.
    Row("openai", "fallback", "timeout-gpt-image-2", "slow=8", body={"response_format": "b64_json"},
        images=[("PNG", 1024, 1024)], cost=1_000, served_by="local-1", revised=local_revised, seconds=(1.4, 6),
        disconnects=1),
    # Without a caller deadline, the model's own timeout gives the 504.
    Row("openai", "deadline", "timeout-dall-e-3", "slow=8", status=504, error=TIMEOUT, seconds=(1.4, 6),
        disconnects=1),
]

# OpenAI-compatible hosts ------------------------------------------------------------------------------

COMPATIBLE = [
    # xAI takes an aspect ratio, never a size, and answers JPEG.
    *(Row("xai", "success", "grok-image", body={"n": 2, "size": "1536x1024", "response_format": rf}, label=rf,
          images=[("JPEG", 144, 96)] * 2, cost=140_000, revised=RENDITION,
          sent=lambda prompt: [{"model": "grok-2-image", "prompt": prompt, "n": 2, "aspect_ratio": "3:2",
                                "response_format": "b64_json"}]) for rf in BOTH_FORMATS),
    # A model without png answers a request that names no output_format.
    Row("xai", "success", "grok-image-jpeg", images=[("JPEG", 96, 96)], cost=70_000, revised=RENDITION),
    # xAI's moderation is a 200 with nothing usable in it: all of it, or one of three flagged.
    Row("xai", "moderation", "grok-image", "blocked", status=400, error=MODERATION),
    Row("xai", "partial", "grok-image", "flagged", body={"n": 3}, images=[("JPEG", 96, 96)] * 2, cost=140_000,
        revised=RENDITION),
    Row("xai", "credentials", "grok-image", "revoked-key", status=502, error=CREDENTIALS,
        log=["xai rejected the gateway's credentials (HTTP 401, code invalid_api_key); check IMAGEGW_TEST_XAI_KEY"]),
    Row("xai", "rate-limited", "grok-image", "429-huge", status=502,
        error=rate_limited("retry after 600 s", retry_after="600")),
    Row("xai", "malformed", "grok-image", "invalid-json", status=502,
        error=malformed("invalid JSON from 127.0.0.1 (HTTP 200).")),
    Row("xai", "deadline", "grok-image", "slow=8", deadline="2S", status=504, error=TIMEOUT, seconds=AT_THE_DEADLINE,
        disconnects=1),
    # Together takes width and height and answers base64 with response_format "base64".
    Row("together", "success", "flux-schnell", body={"size": "1024x1536", "output_format": "jpeg"},
        images=[("JPEG", 1024, 1536)], cost=3_000,
        sent=lambda prompt: [{"model": "black-forest-labs/FLUX.1-schnell", "prompt": prompt, "n": 1, "width": 1024,
                              "height": 1536, "response_format": "base64", "output_format": "jpeg"}]),
    Row("together", "moderation", "flux-schnell", "content-policy", status=400, error=MODERATION),
    Row("together", "credentials", "flux-schnell", "spend-limit", status=502, error=CREDENTIALS,
        log=["together refused the gateway's account: credit or quota exhausted (HTTP 402, code payment_required); "
             "top up the account behind IMAGEGW_TEST_TOGETHER_KEY"]),
    Row("together", "rate-limited", "flux-schnell", "429-huge", status=502,
        error=rate_limited("retry after 600 s", retry_after="600")),
    Row("together", "malformed", "flux-schnell", "invalid-json", status=502,
        error=malformed("invalid JSON from 127.0.0.1 (HTTP 200).")),
    Row("together", "deadline", "flux-schnell", "slow=8", deadline="2S", status=504, error=TIMEOUT, seconds=AT_THE_DEADLINE,
        disconnects=1),
    # Any other name: plain OpenAI-compatible, DALL·E-style for a dall-e model.
    Row("relay", "success", "relay-dall-e-2", body={"size": "256x256"}, images=[("PNG", 256, 256)], cost=16_000,
        sent=dalle_body("dall-e-2", size="256x256")),
]

# Edits and variations --------------------------------------------------------------------------------
# Small inputs keep the matrix fast; every adapter forwards them exactly (or, Stability's mask,
# converted), and every fake checks them as its API does.

RED = png(64, 64)
WIDE = png(96, 64, (40, 160, 40))
JPEG = Image.new("RGB", (64, 64), (40, 40, 200))
JPEG_BYTES = io.BytesIO()
JPEG.save(JPEG_BYTES, format="JPEG")
BLUE_JPEG = JPEG_BYTES.getvalue()
MASK = mask_png(64, 64)
WIDE_MASK = mask_png(96, 64)
CUTOUT = mask_png(64, 64)  # a square RGBA PNG: DALL·E 2 edits where it is transparent
# The OpenAI fake's input image tokens (tests/fakes/openai_fake.py): 64x64 at low and high
# fidelity, 96x64 at high.
LOW_64, HIGH_64, HIGH_96 = 255, 4415, 6495
GEMINI_IMAGE_TOKENS = 258  # each input up to 384 pixels a side
KONTEXT = "flux-kontext-pro"
INPAINT = "stable-image-inpaint"


def image(data: bytes, field: str = "image", name: str = "a.png", content_type: str = "image/png") -> Upload:
    return Upload(field, name, content_type, data)


def mask(data: bytes = MASK) -> Upload:
    return Upload("mask", "mask.png", "image/png", data)


def b64(data: bytes) -> str:
    return base64.b64encode(data).decode()


def sent_file(field: str, name: str, data: bytes, content_type: str = "image/png") -> tuple[str, str, str, bytes]:
    return (field, name, content_type, data)


def edit_usage(image_tokens: int, images: int = 1, per_image: int = MEDIUM_1024_TOKENS) -> Callable[[str], dict[str, Any]]:
    return lambda prompt: usage(input_text=len(prompt.split()), input_image=image_tokens, output_image=per_image * images)


def gpt_edit_body(model: str, files: list[Any], **fields: str) -> Callable[[str], list[dict[str, Any]]]:
    """What goes upstream for a GPT image edit: the generation's fields as form text, every
    image as image[] under a neutral name, the mask as mask."""
    base = {"n": "1", "size": "1024x1024", "quality": "medium", "output_format": "png"}
    return lambda prompt: [{"model": model, "prompt": prompt, **base, **fields, "files": files}]


def dalle_edit_body(model: str = "dall-e-2", **fields: str) -> Callable[[str], list[dict[str, Any]]]:
    base = {"n": "1", "size": "256x256", "quality": "standard", "response_format": "b64_json"}
    return lambda prompt: [{"model": model, "prompt": prompt, **base, **fields,
                            "files": [sent_file("image", "image-1.png", CUTOUT)]}]


def variation_body(model: str = "dall-e-2", **fields: str) -> Callable[[str], list[dict[str, Any]]]:
    base = {"n": "1", "size": "1024x1024", "response_format": "b64_json"}
    return lambda user: [{"model": model, "user": user, **base, **fields, "files": [sent_file("image", "image-1.png", RED)]}]


def refused_edit(provider: str, model: str, files: list[Upload], body: dict[str, Any], param: str, code: str,
                 label: str = "", operation: str = "edit") -> Row:
    """An edit the model cannot take: 400 naming the param, nothing sent, nothing reserved."""
    return Row(provider, "refused", model, operation=operation, files=files, body=body, label=label or param,
               status=400, calls=0, error=Err(code, param=param))


GPT_EDIT_FILES = [sent_file("image[]", "image-1.png", RED), sent_file("mask", "mask.png", MASK)]
OPENAI_EDIT_ROWS = [
    # One file sent as `image` reaches OpenAI as image[]; the input's 255 tokens at $10/M: 2_550.
    *(Row("openai", "success", "gpt-image-1", operation="edit", files=[image(RED), mask()], label=rf,
          body={"response_format": rf}, images=[("PNG", 1024, 1024)], cost=42_000 + 2_550, answer=GPT_ANSWER,
          usage=edit_usage(LOW_64), sent=gpt_edit_body("gpt-image-1", GPT_EDIT_FILES)) for rf in BOTH_FORMATS),
    # Several files (PNG, PNG, JPEG) at high fidelity: reserved 3 x 75_000, charged by usage.
    Row("openai", "success", "gpt-image-1", operation="edit", label="several-high", body={
        "input_fidelity": "high", "response_format": "b64_json"},
        files=[image(RED, "image[]"), image(WIDE, "image[]", "b.png"), image(BLUE_JPEG, "image[]", "c.jpg", "image/jpeg")],
        images=[("PNG", 1024, 1024)], cost=42_000 + (HIGH_64 + HIGH_96 + HIGH_64) * 10, answer=GPT_ANSWER,
        usage=edit_usage(HIGH_64 + HIGH_96 + HIGH_64),
        sent=gpt_edit_body("gpt-image-1", [sent_file("image[]", "image-1.png", RED), sent_file("image[]", "image-2.png", WIDE),
                                           sent_file("image[]", "image-3.jpeg", BLUE_JPEG, "image/jpeg")],
                           input_fidelity="high")),
    # A retried edit sends every file again, whole (they are streamed from the upload each time).
    Row("openai", "transient", "gpt-image-1", "503x1", operation="edit", files=[image(RED), mask()], calls=2,
        images=[("PNG", 1024, 1024)], cost=42_000 + 2_550, answer=GPT_ANSWER, usage=edit_usage(LOW_64),
        sent=lambda prompt: gpt_edit_body("gpt-image-1", GPT_EDIT_FILES)(prompt) * 2),
    # gpt-image-1.5's $8/M, two low-quality landscape outputs.
    Row("openai", "success", "gpt-image-1.5", operation="edit", label="n2-high", files=[image(RED)], body={
        "n": 2, "size": "1536x1024", "quality": "low", "input_fidelity": "high", "response_format": "b64_json"},
        images=[("PNG", 1536, 1024)] * 2, cost=2 * 13_000 + HIGH_64 * 8,
        answer={"size": "1536x1024", "quality": "low", "output_format": "png", "background": "opaque"},
        usage=edit_usage(HIGH_64, 2, 400),
        sent=gpt_edit_body("gpt-image-1.5", [sent_file("image[]", "image-1.png", RED)], n="2", size="1536x1024",
                           quality="low", input_fidelity="high")),
    # gpt-image-2 always reads inputs at high fidelity.
    Row("openai", "success", "gpt-image-2", operation="edit", files=[image(WIDE)], images=[("PNG", 1024, 1024)],
        cost=42_000 + HIGH_96 * 10, answer=GPT_ANSWER, usage=edit_usage(HIGH_96),
        sent=gpt_edit_body("gpt-image-2", [sent_file("image[]", "image-1.png", WIDE)])),
    # DALL·E 2: one square PNG as `image`, edited where it is transparent; priced as a generation.
    Row("openai", "success", "dall-e-2", operation="edit", files=[image(CUTOUT)], body={"size": "256x256"},
        images=[("PNG", 256, 256)], cost=16_000, sent=dalle_edit_body()),
    Row("relay", "success", "relay-dall-e-2", operation="edit", files=[image(CUTOUT)], body={"size": "256x256"},
        images=[("PNG", 256, 256)], cost=16_000, sent=dalle_edit_body()),
    *(Row(provider, "success", model, operation="variation", files=[image(RED)], body={"n": 2, "size": "512x512"},
          images=[("PNG", 512, 512)] * 2, cost=36_000, sent=variation_body(n="2", size="512x512"))
      for provider, model in [("openai", "dall-e-2"), ("relay", "relay-dall-e-2")]),
    refused_edit("openai", "gpt-image-2", [image(RED)], {"input_fidelity": "high"}, "input_fidelity",
                 "unsupported_parameter"),
    refused_edit("openai", "gpt-image-1", [image(RED)] * 17, {}, "image", "too_many_images"),
    refused_edit("openai", "gpt-image-1", [image(RED), mask(WIDE_MASK)], {}, "mask", "invalid_mask"),
    refused_edit("openai", "gpt-image-1", [image(RED)], {"input_fidelity": "max"}, "input_fidelity", "invalid_value"),
    refused_edit("openai", "dall-e-2", [image(CUTOUT), image(CUTOUT)], {}, "image", "too_many_images"),
    refused_edit("openai", "dall-e-2", [image(png(96, 64, (0, 0, 0, 0), "RGBA"))], {}, "image", "invalid_image",
                 label="not-square"),
    refused_edit("openai", "dall-e-2", [image(RED)], {}, "image", "invalid_image", label="no-alpha-no-mask"),
    refused_edit("openai", "dall-e-3", [image(RED)], {}, "model", "model_not_supported"),
    refused_edit("openai", "gpt-image-1", [image(RED)], {}, "model", "model_not_supported", operation="variation"),
    Row("openai", "moderation", "gpt-image-1", "moderated", operation="edit", files=[image(RED)], status=400,
        error=MODERATION),
    Row("openai", "moderation", "dall-e-2", "moderated", operation="variation", files=[image(RED)], status=400,
        error=MODERATION),
    Row("openai", "credentials", "gpt-image-1", "revoked-key", operation="edit", files=[image(RED)], status=502,
        error=CREDENTIALS, log=["openai rejected the gateway's credentials (HTTP 401, code invalid_api_key); "
                                "check IMAGEGW_OPENAI_API_KEY"]),
    Row("openai", "rate-limited", "gpt-image-1", "429-huge", operation="edit", files=[image(RED)], status=502,
        seconds=(0, 5), error=rate_limited("retry after 600 s", retry_after="600")),
    Row("openai", "rate-limited", "dall-e-2", "429-none", operation="variation", files=[image(RED)], status=502,
        calls=3, error=rate_limited("gave up after 3 attempts")),
    Row("openai", "malformed", "gpt-image-1", "invalid-json", operation="edit", files=[image(RED)], status=502,
        error=malformed("invalid JSON from 127.0.0.1 (HTTP 200).")),
    Row("openai", "malformed", "dall-e-2", "missing-image", operation="variation", files=[image(RED)], status=502,
        error=malformed("a data entry without b64_json or url.")),
    Row("openai", "deadline", "gpt-image-1", "slow=8", operation="edit", files=[image(RED)], deadline="2S",
        status=504, error=TIMEOUT, seconds=AT_THE_DEADLINE, disconnects=1),
]


def gemini_edit_body(*inputs: bytes, calls: int = 1, ratio: str | None = None) -> Callable[[str], list[Any]]:
    """The prompt's text part, then each input as inlineData; no aspect ratio for size auto."""
    config: dict[str, Any] = {"responseModalities": ["IMAGE"]}
    if ratio is not None:
        config["imageConfig"] = {"aspectRatio": ratio}
    parts = [{"inlineData": {"mimeType": "image/png", "data": b64(data)}} for data in inputs]
    return lambda prompt: [{"contents": [{"role": "user", "parts": [{"text": prompt}, *parts]}],
                            "generationConfig": config}] * calls


def gemini_edit_usage(inputs: int, calls: int = 1) -> dict[str, Any]:
    return usage(input_text=12 * calls, input_image=GEMINI_IMAGE_TOKENS * inputs * calls, output_image=1290 * calls)


def gemini_inputs(tokens: int) -> int:
    """Input image tokens at $0.30 per million, rounded up to the micro-dollar."""
    return -(-tokens * 300_000 // 1_000_000)


GOOGLE_EDIT_ROWS = [
    # Two inputs on each of two calls (the fan-out reads them twice): 4 x 258 tokens, reserved at
    # 2 x 2 x 1_000. Without a size the output keeps the first input's shape (3:2).
    Row("google", "success", GEMINI, operation="edit", files=[image(WIDE, "image[]"), image(RED, "image[]", "b.png")],
        body={"n": 2}, calls=2, images=[("PNG", 1248, 832)] * 2,
        cost=2 * 39_000 + gemini_inputs(4 * GEMINI_IMAGE_TOKENS), usage=gemini_edit_usage(2, 2),
        sent=gemini_edit_body(WIDE, RED, calls=2), extra=at(f"/v1beta/models/{GEMINI}:generateContent")),
    Row("google", "success", GEMINI, operation="edit", label="portrait", files=[image(RED)],
        body={"size": "1024x1536", "response_format": "b64_json"}, images=[("PNG", 832, 1248)],
        cost=39_000 + gemini_inputs(GEMINI_IMAGE_TOKENS), usage=gemini_edit_usage(1),
        sent=gemini_edit_body(RED, ratio="2:3")),
    # One call of two moderated: its inputs are not charged (a share of the reservation, then usage).
    Row("google", "partial", GEMINI, "image-safetyx1", operation="edit", files=[image(RED)], body={"n": 2}, calls=2,
        images=[("PNG", 1024, 1024)], cost=39_000 + gemini_inputs(GEMINI_IMAGE_TOKENS), usage=gemini_edit_usage(1)),
    refused_edit("google", GEMINI, [image(RED), mask()], {}, "mask", "unsupported_parameter"),
    refused_edit("google", GEMINI, [image(RED, "image[]")] * 4, {}, "image", "too_many_images"),
    refused_edit("google", "imagen-4", [image(RED)], {}, "model", "model_not_supported"),
    Row("google", "moderation", GEMINI, "blocked", operation="edit", files=[image(RED)], status=400, error=MODERATION),
    Row("google", "credentials", GEMINI, "revoked-key", operation="edit", files=[image(RED)], status=502,
        error=CREDENTIALS, log=["google rejected the gateway's credentials (HTTP 400, code API_KEY_INVALID); "
                                "check IMAGEGW_GOOGLE_API_KEY"]),
    Row("google", "rate-limited", GEMINI, "429=26", operation="edit", files=[image(RED)], deadline="5S", status=502,
        seconds=AT_ONCE, error=rate_limited("retry after 26 s", retry_after="26")),
    Row("google", "malformed", GEMINI, "bad-base64", operation="edit", files=[image(RED)], status=502,
        error=malformed("image data that is not valid base64.")),
    Row("google", "deadline", GEMINI, "slow=8", operation="edit", files=[image(RED)], deadline="2S", status=504,
        error=TIMEOUT, seconds=AT_THE_DEADLINE, disconnects=1),
]


def kontext_body(*inputs: bytes, ratio: str | None = None, fmt: str = "png", calls: int = 1) -> Callable[[str], list[Any]]:
    references = {("input_image" if i == 0 else f"input_image_{i + 1}"): b64(data) for i, data in enumerate(inputs)}
    shape = {"aspect_ratio": ratio} if ratio is not None else {}
    return lambda prompt: [{"prompt": prompt, **references, **shape, "output_format": fmt, "safety_tolerance": 2,
                            "prompt_upsampling": False}] * calls


BFL_EDIT_ROWS = [
    # input_image and input_image_2; 1792x1024 is exactly 7:4 (Kontext takes any ratio), about
    # 1 MP: 1344x768, rendered by the fake at 1/16.
    Row("bfl", "success", KONTEXT, operation="edit", files=[image(WIDE, "image[]"), image(RED, "image[]", "b.png")],
        body={"size": "1792x1024"}, images=[("PNG", 84, 48)], cost=40_000, sent=kontext_body(WIDE, RED, ratio="7:4")),
    # Without a size Kontext keeps the input's 3:2 (1248x832); n fans out, one task each.
    Row("bfl", "success", KONTEXT, operation="edit", label="keeps-shape", files=[image(WIDE)],
        body={"n": 2, "output_format": "webp", "response_format": "b64_json"}, calls=2, images=[("WEBP", 78, 52)] * 2,
        cost=80_000, sent=kontext_body(WIDE, fmt="webp", calls=2)),
    # Kontext also generates, from an aspect ratio.
    Row("bfl", "success", KONTEXT, body={"size": "1536x1024"}, images=[("PNG", 78, 52)], cost=40_000,
        sent=kontext_body(ratio="3:2")),
    # Moderated while polling: the task was accepted, then its poll said so.
    *(Row("bfl", "moderation", KONTEXT, scenario, operation="edit", files=[image(RED)], status=400, error=MODERATION,
          extra=bfl_polls(lambda fake, polls, reply: len(polls) == 2))
      for scenario in ("request-moderated", "content-moderated")),
    refused_edit("bfl", KONTEXT, [image(RED), mask()], {}, "mask", "unsupported_parameter"),
    refused_edit("bfl", KONTEXT, [image(RED, "image[]")] * 5, {}, "image", "too_many_images"),
    refused_edit("bfl", FLUX, [image(RED)], {}, "model", "model_not_supported"),
    Row("bfl", "credentials", KONTEXT, "revoked-key", operation="edit", files=[image(RED)], status=502,
        error=CREDENTIALS, log=["bfl rejected the gateway's credentials (HTTP 403, code None); check IMAGEGW_BFL_API_KEY"]),
    Row("bfl", "rate-limited", KONTEXT, "429", operation="edit", files=[image(RED)], status=502, calls=3,
        error=rate_limited("gave up after 3 attempts")),  # BFL names no wait
    Row("bfl", "malformed", KONTEXT, "garbage-sample", operation="edit", files=[image(RED)], status=502,
        error=malformed("bytes that are not a PNG, JPEG or WebP image.")),
    Row("bfl", "deadline", KONTEXT, "pending=1000", operation="edit", files=[image(RED)], deadline="2S", status=504,
        error=TIMEOUT, seconds=AT_THE_DEADLINE),
]


async def inpainted(env: Env, row: Row, prompt: str, reply: Reply) -> None:
    """Each call sent the image as it came and the mask as Stability's: white (repaint) where
    the caller's was transparent, black elsewhere; no size or aspect ratio."""
    fake = env.fakes["stability"]
    for request in fake.sent(prompt):
        assert request.path == "/v2beta/stable-image/edit/inpaint"
        payload = fake.payload(request)
        files = payload.pop("files")
        assert payload == {"prompt": prompt, "output_format": row.body.get("output_format", "png")}
        assert files[0] == sent_file("image", "image.png", WIDE)
        assert files[1][:3] == ("mask", "mask.png", "image/png")
        strength = Image.open(io.BytesIO(files[1][3]))
        assert (strength.format, strength.mode, strength.size) == ("PNG", "L", (96, 64))
        assert strength.crop((0, 0, 96, 32)).getextrema() == (0, 0)
        assert strength.crop((0, 32, 96, 64)).getextrema() == (255, 255)


INPAINT_FILES = [image(WIDE), mask(WIDE_MASK)]
STABILITY_EDIT_ROWS = [
    # The picture keeps the image's size; 3 credits per success.
    Row("stability", "success", INPAINT, operation="edit", files=INPAINT_FILES, body={"output_format": "webp"},
        images=[("WEBP", 96, 64)], cost=30_000, extra=inpainted),
    Row("stability", "success", INPAINT, operation="edit", label="fan-out", files=INPAINT_FILES,
        body={"n": 2, "response_format": "b64_json"}, calls=2, images=[("PNG", 96, 64)] * 2, cost=60_000, extra=inpainted),
    # Without a mask: 400 before any upstream call.
    Row("stability", "refused", INPAINT, operation="edit", files=[image(WIDE)], label="no-mask", status=400, calls=0,
        error=Err("missing_required_parameter", "Missing required parameter: 'mask'. Model 'stable-image-inpaint' "
                  "edits only under a mask.", param="mask")),
    refused_edit("stability", INPAINT, INPAINT_FILES, {"size": "1024x1024"}, "size", "invalid_size"),
    refused_edit("stability", INPAINT, [image(WIDE, "image[]"), image(WIDE, "image[]"), mask(WIDE_MASK)], {}, "image",
                 "too_many_images"),
    refused_edit("stability", "stable-image-core", INPAINT_FILES, {}, "model", "model_not_supported"),
    # An edit-only model does not generate.
    Row("stability", "refused", INPAINT, label="generation", status=400, calls=0, error=Err("model_not_supported",
        "The model 'stable-image-inpaint' cannot generate images on this server; use a model whose catalog entry "
        "allows it.", param="model")),
    *(Row("stability", "moderation", INPAINT, scenario, operation="edit", files=INPAINT_FILES, status=400,
          error=MODERATION) for scenario in ("moderated", "filtered")),
    Row("stability", "credentials", INPAINT, "revoked-key", operation="edit", files=INPAINT_FILES, status=502,
        error=CREDENTIALS, log=["stability rejected the gateway's credentials (HTTP 401, code unauthorized); "
                                "check IMAGEGW_STABILITY_API_KEY"]),
    Row("stability", "rate-limited", INPAINT, "429", operation="edit", files=INPAINT_FILES, deadline="10S",
        status=502, seconds=AT_ONCE, error=rate_limited("retry after 60 s", retry_after="60")),
    Row("stability", "malformed", INPAINT, "garbage-image", operation="edit", files=INPAINT_FILES, status=502,
        error=malformed("bytes that are not a PNG, JPEG or WebP image.")),
    Row("stability", "deadline", INPAINT, "slow=8", operation="edit", files=INPAINT_FILES, deadline="2S", status=504,
        error=TIMEOUT, seconds=AT_THE_DEADLINE, disconnects=1),
]

ROWS = [*OPENAI_ROWS, *GOOGLE_ROWS, *STABILITY_ROWS, *BFL_ROWS, *FALLBACK_ROWS, *COMPATIBLE, *OPENAI_EDIT_ROWS,
        *GOOGLE_EDIT_ROWS, *BFL_EDIT_ROWS, *STABILITY_EDIT_ROWS]
assert len({row.id for row in ROWS}) == len(ROWS), "two rows with one id"
# Rows that run alone come last, so that their tests start once the shared ones are done.
ORDERED = sorted(ROWS, key=lambda row: row.alone)


@pytest.mark.parametrize("row", ORDERED, ids=[row.id for row in ORDERED])
async def test_row(matrix: MatrixRun, row: Row) -> None:
    await matrix.result(row)


# -- the stack as a whole, once the matrix has run ---------------------------------------------------


@pytest.fixture
async def idle(env: Env, matrix: MatrixRun) -> Env:
    """The stack with no matrix row in flight (for tests that read shared state)."""
    await matrix.finished()
    return env


async def test_models_lists_every_enabled_model_of_the_operators_catalog(idle: Env) -> None:
    account_id, key = await idle.stack.admin.funded_key(FUNDED)
    shipped = sorted(spec.id for spec in load_catalog())
    variants = [variant for _, variant, _ in VARIANTS]
    compatible = ["flux-schnell", "grok-image", "grok-image-jpeg", "relay-dall-e-2"]
    assert await list_models(idle.stack, key) == sorted([*shipped, *variants, *compatible])
    reply = await generate(idle.stack, key, {"model": "acme-image", "prompt": "a fox"})
    assert reply.status == 400
    assert reply.json()["error"] == {
        "message": "The model 'acme-image' is not enabled on this server (its provider 'acme' is not configured).",
        "type": "invalid_request_error", "param": "model", "code": "model_not_available"}
    await expect_money(idle.stack, account_id, spent=0, usage_rows=[])


async def test_the_start_up_log_names_the_setting_that_enables_each_disabled_model(idle: Env) -> None:
    [line] = [line for line in idle.stack.server_log().splitlines() if "models not enabled" in line]
    assert '"message":"models not enabled: acme-image; set the provider key to enable them: acme (IMAGEGW_TEST_ACME_KEY)"' in line


async def test_a_fallback_is_recorded_under_the_model_requested(idle: Env) -> None:
    account_id, key = await idle.stack.admin.funded_key(FUNDED)
    reply = await generate(idle.stack, key, {"model": "fallback-gpt-image-1", "prompt": unique("a harbour [[fake:429-huge]]")})
    assert (reply.status, reply.headers["x-imagegw-model"]) == (200, "local-1")
    assert [(u.model, u.cost_usd) for u in await idle.stack.admin.usage(account_id)] == [("fallback-gpt-image-1", "0.001000")]


def sdk(env: Env, key: str) -> openai.AsyncOpenAI:
    return openai.AsyncOpenAI(api_key=key, base_url=env.stack.api_base, max_retries=0, timeout=60)


async def test_sdk_generates_with_gpt_image_usage(idle: Env) -> None:
    account_id, key = await idle.stack.admin.funded_key(FUNDED)
    prompt = unique("a tall portrait of a heron")
    async with sdk(idle, key) as client:
        raw = await client.images.with_raw_response.generate(
            model="gpt-image-1", prompt=prompt, size="1024x1536", quality="low", response_format="b64_json"
        )
    result = raw.parse()
    assert raw.headers["x-imagegw-cost-usd"] == "0.016000"
    assert result.data is not None and len(result.data) == 1 and result.data[0].b64_json
    assert result.usage is not None
    assert (result.usage.input_tokens, result.usage.output_tokens, result.usage.total_tokens) == (
        len(prompt.split()), 408, len(prompt.split()) + 408)
    assert (result.size, result.quality, result.output_format) == ("1024x1536", "low", "png")
    await expect_money(idle.stack, account_id, spent=16_000, usage_rows=[("succeeded", "", 1, 1, 16_000)])


async def test_sdk_sees_moderation_as_bad_request_and_our_credentials_as_a_server_error(idle: Env) -> None:
    account_id, key = await idle.stack.admin.funded_key(FUNDED)
    async with sdk(idle, key) as client:
        with pytest.raises(openai.BadRequestError) as refused_error:
            await client.images.generate(model="gpt-image-1", prompt=unique("x [[fake:moderated]]"))
        with pytest.raises(openai.InternalServerError) as misconfigured:
            await client.images.generate(model="gpt-image-1", prompt=unique("x [[fake:quota]]"))
    assert (refused_error.value.status_code, refused_error.value.code) == (400, "content_policy_violation")
    assert (misconfigured.value.status_code, misconfigured.value.code) == (502, "upstream_error")
    assert misconfigured.value.response.headers["x-should-retry"] == "false"
    # Usage is listed newest first.
    await expect_money(idle.stack, account_id, spent=0, usage_rows=[
        ("failed", "upstream_error", 1, 0, 0), ("failed", "content_policy_violation", 1, 0, 0)])


# -- OpenAI's own edit calls, through the official SDK ------------------------------------------------

EDIT_PARTIAL = validator("ImageEditPartialImageEvent")
EDIT_COMPLETED = validator("ImageEditCompletedEvent")


def edit_requests(env: Env, prompt: str) -> list[Any]:
    fake = env.fakes["openai"]
    return [fake.payload(request) for request in fake.sent(prompt)]


@pytest.mark.parametrize("several", [False, True], ids=["one-file", "several-files"])
async def test_sdk_edits_with_one_or_several_files_and_a_mask(idle: Env, several: bool) -> None:
    account_id, key = await idle.stack.admin.funded_key(FUNDED)
    prompt = unique("put the lamp on the table")
    files = [("room.png", RED), ("lamp.png", WIDE)] if several else ("room.png", RED)
    async with sdk(idle, key) as client:
        raw = await client.images.with_raw_response.edit(
            model="gpt-image-1", image=files, mask=("mask.png", MASK), prompt=prompt, response_format="b64_json"
        )
    result = raw.parse()
    assert result.data is not None and len(result.data) == 1
    picture = Image.open(io.BytesIO(base64.b64decode(result.data[0].b64_json or "", validate=True)))
    assert (picture.format, picture.size) == ("PNG", (1024, 1024))
    tokens = LOW_64 + (85 + 170 if several else 0)  # 96x64 at low fidelity is one tile too
    assert result.usage is not None and result.usage.input_tokens_details.image_tokens == tokens
    sent = [sent_file("image[]", "image-1.png", RED), *([sent_file("image[]", "image-2.png", WIDE)] if several else []),
            sent_file("mask", "mask.png", MASK)]
    assert edit_requests(idle, prompt) == gpt_edit_body("gpt-image-1", sent)(prompt)
    cost = 42_000 + tokens * 10
    assert raw.headers["x-imagegw-cost-usd"] == usd(cost)
    await expect_money(idle.stack, account_id, spent=cost, usage_rows=[("succeeded", "", 1, 1, cost)])


@pytest.mark.parametrize("several", [False, True], ids=["one-file", "several-files"])
async def test_sdk_streams_an_edit_relaying_openais_image_edit_events(idle: Env, several: bool) -> None:
    account_id, key = await idle.stack.admin.funded_key(FUNDED)
    prompt = unique("the room at night")
    files = [("room.png", RED), ("lamp.png", RED)] if several else ("room.png", RED)
    async with sdk(idle, key) as client:
        stream = await client.images.edit(model="gpt-image-1", image=files, prompt=prompt, stream=True, partial_images=2)
        events = [event async for event in stream]
    assert [e.type for e in events] == ["image_edit.partial_image"] * 2 + ["image_edit.completed"]
    for event in events:
        (EDIT_PARTIAL if event.type.endswith("partial_image") else EDIT_COMPLETED).validate(
            event.model_dump(exclude_none=True))
    pictures = [Image.open(io.BytesIO(base64.b64decode(e.b64_json))) for e in events]
    assert {p.size for p in pictures} == {(1024, 1024)} and len({p.tobytes() for p in pictures}) == 3
    tokens = LOW_64 * (2 if several else 1)
    assert events[-1].usage.input_tokens_details.image_tokens == tokens
    # OpenAI was asked for its own stream, as form fields.
    sent = [sent_file("image[]", f"image-{i}.png", RED) for i in range(1, 3 if several else 2)]
    assert edit_requests(idle, prompt) == gpt_edit_body("gpt-image-1", sent, stream="true", partial_images="2")(prompt)
    # The image, two partial images at 100 output tokens ($0.004), and the inputs by usage.
    cost = 42_000 + 2 * 4_000 + tokens * 10
    await expect_money(idle.stack, account_id, spent=cost, usage_rows=[("succeeded", "", 1, 1, cost)])


async def test_a_streamed_edit_is_relayed_event_by_event(idle: Env) -> None:
    _, key = await idle.stack.admin.funded_key(FUNDED)
    fake = idle.fakes["openai"]
    assert isinstance(fake, OpenAIFake)
    fake._released.clear()
    seen: list[str] = []
    async with httpx.AsyncClient(timeout=60) as http:
        async with http.stream(
            "POST", f"{idle.stack.api_base}/images/edits", headers={"authorization": f"Bearer {key}"},
            files=[("model", (None, "gpt-image-1")), ("prompt", (None, unique("a fox [[fake:stream-hold]]"))),
                   ("stream", (None, "true")), ("partial_images", (None, "1")), ("image", ("a.png", RED, "image/png"))],
        ) as response:
            assert response.status_code == 200
            async for name, _ in sse(response):
                if name is None:
                    continue
                seen.append(name)
                # The fake holds its second event until now: a buffer anywhere on the way
                # (the adapter, the server, Envoy) would keep this loop waiting forever.
                fake.release_stream()
    assert seen == ["image_edit.partial_image", "image_edit.completed"]


# -- a built-in provider without its key (the session's gateway enables none) --------------------------


async def test_a_built_in_provider_without_its_key_is_not_served_and_the_log_names_its_variable(gateway: Any) -> None:
    account_id, key = await gateway.admin.funded_key(FUNDED)
    reply = await generate(gateway, key, {"model": "imagen-3", "prompt": "a fox"})
    assert reply.status == 400
    assert reply.json() == {"error": {
        "message": "The model 'imagen-3' is not enabled on this server (its provider 'google' is not configured).",
        "type": "invalid_request_error", "param": "model", "code": "model_not_available",
    }}
    await expect_money(gateway, account_id, spent=0, usage_rows=[])
    [line] = [line for line in gateway.server_log().splitlines() if "models not enabled" in line]
    disabled = sorted(spec.id for spec in load_catalog() if spec.provider != "local")
    hints = ", ".join(f"{name} ({entry.key_setting})" for name, entry in sorted(PROVIDERS.items()))
    assert f'"message":"models not enabled: {", ".join(disabled)}; set the provider key to enable them: {hints}"' in line
