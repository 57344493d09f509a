"""The official openai SDK against the gateway, validated against OpenAI's own schema."""

from __future__ import annotations

import base64
import io
from pathlib import Path
from typing import Any

import httpx
import openai
import pytest
from PIL import Image

from tests.openai_schema import validator
from tests.stack import ProcessStack

pytestmark = pytest.mark.contract


@pytest.fixture(scope="module")
def schemas() -> dict[str, Any]:
    """Validators for ImagesResponse and ErrorResponse from OpenAI's OpenAPI file."""
    return {"ImagesResponse": validator("ImagesResponse"), "ErrorResponse": validator("ErrorResponse")}


def client(stack: ProcessStack, key: str) -> openai.AsyncOpenAI:
    return openai.AsyncOpenAI(api_key=key, base_url=stack.api_base, max_retries=0, timeout=120)


async def test_generate_url_and_fetch(gateway: ProcessStack, schemas: dict[str, Any]) -> None:
    _, key = await gateway.admin.funded_key("1.00")
    async with client(gateway, key) as sdk:
        raw = await sdk.images.with_raw_response.generate(
            model="local-1", prompt="A watercolor painting of a mountain lake", n=1, size="1024x1024"
        )
        result = raw.parse()
    body = raw.http_response.json()
    schemas["ImagesResponse"].validate(body)
    assert isinstance(body["created"], int) and not isinstance(body["created"], bool)
    assert result.created == body["created"]
    assert result.data is not None and len(result.data) == 1
    assert result.data[0].url is not None and result.data[0].b64_json is None
    assert result.usage is not None and result.usage.total_tokens == 0
    assert raw.headers["x-imagegw-cost-usd"] == "0.001000"
    assert result._request_id == raw.headers["x-request-id"]
    async with httpx.AsyncClient() as http:
        fetched = await http.get(result.data[0].url)
    assert Image.open(io.BytesIO(fetched.content)).size == (1024, 1024)


async def test_generate_b64_json_two_images(gateway: ProcessStack, schemas: dict[str, Any]) -> None:
    _, key = await gateway.admin.funded_key("1.00")
    async with client(gateway, key) as sdk:
        raw = await sdk.images.with_raw_response.generate(
            model="local-1", prompt="a lighthouse at dusk", n=2, size="512x512", response_format="b64_json"
        )
        result = raw.parse()
    schemas["ImagesResponse"].validate(raw.http_response.json())
    assert result.data is not None and len(result.data) == 2
    for item in result.data:
        assert item.b64_json is not None
        image = Image.open(io.BytesIO(base64.b64decode(item.b64_json)))
        assert (image.format, image.size) == ("PNG", (512, 512))


async def test_bad_request_raises_bad_request_error(gateway: ProcessStack, schemas: dict[str, Any]) -> None:
    _, key = await gateway.admin.funded_key("1.00")
    async with client(gateway, key) as sdk:
        with pytest.raises(openai.BadRequestError) as caught:
            await sdk.images.generate(model="local-1", prompt="p", size="300x300")  # type: ignore[arg-type]
    error = caught.value
    assert error.status_code == 400
    assert (error.code, error.param, error.type) == ("invalid_size", "size", "invalid_request_error")
    schemas["ErrorResponse"].validate(error.response.json())
    assert error.request_id == error.response.headers["x-request-id"]


async def test_unknown_model_raises_bad_request_error(gateway: ProcessStack) -> None:
    _, key = await gateway.admin.funded_key("1.00")
    async with client(gateway, key) as sdk:
        with pytest.raises(openai.BadRequestError) as caught:
            await sdk.images.generate(model="dall-e-9", prompt="p")
    assert caught.value.code == "model_not_found"


async def test_bad_key_raises_authentication_error(gateway: ProcessStack, schemas: dict[str, Any]) -> None:
    async with client(gateway, "sk-igw-not-a-real-key") as sdk:
        with pytest.raises(openai.AuthenticationError) as caught:
            await sdk.images.generate(model="local-1", prompt="p")
    assert caught.value.status_code == 401
    assert caught.value.code == "invalid_api_key"
    schemas["ErrorResponse"].validate(caught.value.response.json())


async def test_short_balance_raises_402_api_status_error(gateway: ProcessStack, schemas: dict[str, Any]) -> None:
    account_id, key = await gateway.admin.funded_key("0.001500")
    async with client(gateway, key) as sdk:
        with pytest.raises(openai.APIStatusError) as caught:
            await sdk.images.generate(model="local-1", prompt="p", n=2)
    error = caught.value
    assert type(error) is openai.APIStatusError
    assert error.status_code == 402
    assert (error.type, error.code, error.param) == ("insufficient_quota", "insufficient_balance", None)
    assert error.response.headers["x-should-retry"] == "false"
    schemas["ErrorResponse"].validate(error.response.json())
    account = await gateway.admin.get(account_id)
    assert (account.balance_usd, account.spent_usd, account.reserved_usd) == ("0.001500", "0.000000", "0.000000")


async def test_models_list_and_retrieve(gateway: ProcessStack) -> None:
    _, key = await gateway.admin.funded_key("1.00")
    async with client(gateway, key) as sdk:
        models = await sdk.models.list()
        model = await sdk.models.retrieve("local-1")
        with pytest.raises(openai.NotFoundError):
            await sdk.models.retrieve("nope")
    assert [m.id for m in models.data] == ["local-1"]
    assert (model.id, model.object, model.owned_by) == ("local-1", "model", "imagegw")


async def test_tampered_image_url_raises_permission_denied(gateway: ProcessStack, schemas: dict[str, Any]) -> None:
    async with client(gateway, "unused") as sdk:
        with pytest.raises(openai.PermissionDeniedError) as caught:
            await sdk.get(
                "/images/files/img-AAAAAAAAAAAAAAAAAAAAAA.png?expires=4102444800&signature=forged", cast_to=object
            )
    assert caught.value.status_code == 403
    assert caught.value.code == "invalid_signature"
    schemas["ErrorResponse"].validate(caught.value.response.json())


async def test_deadline_raises_internal_server_error_504(tmp_path: Path, schemas: dict[str, Any]) -> None:
    from tests.stack import process_stack

    async with process_stack(tmp_path / "var", render_workers=1) as stack:
        account_id, key = await stack.admin.funded_key("1.00")
        async with client(stack, key) as sdk:
            with pytest.raises(openai.InternalServerError) as caught:
                await sdk.images.generate(
                    model="local-1", prompt="slow", n=10, size="1792x1024", extra_headers={"grpc-timeout": "300m"}
                )
        assert caught.value.status_code == 504
        assert (caught.value.type, caught.value.code) == ("server_error", "timeout")
        schemas["ErrorResponse"].validate(caught.value.response.json())
        account = await stack.admin.settled(account_id)
        assert (account.balance_usd, account.spent_usd) == ("1.000000", "0.000000")
