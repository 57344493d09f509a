"""Catalog loading (start-up validation) and per-model request resolution."""

from __future__ import annotations

import io
from pathlib import Path

import pytest
from PIL import Image

from server.catalog import CatalogError, ModelCatalog, RawImageRequest, load_catalog
from server.errors import InvalidRequestError, ModelNotAvailableError, ModelNotSupportedError
from server.providers.base import InputImage, TokenUsage
from server.uploads import in_memory

ROW = """
[[models]]
id = "m"
provider = "local"
sizes = ["512x512", "1024x1024", "auto"]
default_size = "512x512"
max_n = 4
qualities = ["auto", "standard", "hd"]
default_quality = "standard"
prices = { "standard" = { "*" = 1000, "1024x1024" = 3000 }, "hd" = { "*" = 5000 } }
"""


def catalog_from(tmp_path: Path, text: str, enabled: set[str] | None = None) -> ModelCatalog:
    path = tmp_path / "catalog.toml"
    path.write_text(text)
    return ModelCatalog(load_catalog(path), enabled_providers=enabled or {"local"}, default_model="m")


def test_shipped_catalog_loads() -> None:
    specs = load_catalog()
    assert "local-1" in {s.id for s in specs}


def test_auto_resolves_before_pricing(tmp_path: Path) -> None:
    catalog = catalog_from(tmp_path, ROW)
    quote = catalog.resolve(RawImageRequest(prompt="p", n=3))
    assert (quote.request.size, quote.request.quality, quote.request.size_is_auto) == ("512x512", "standard", True)
    assert (quote.unit_price_micros, quote.amount_micros, quote.response_format) == (1000, 3000, "url")
    big = catalog.resolve(RawImageRequest(prompt="p", size="1024x1024", quality="hd", n=2))
    assert (big.unit_price_micros, big.amount_micros) == (5000, 10000)
    mid = catalog.resolve(RawImageRequest(prompt="p", size="1024x1024"))
    assert mid.unit_price_micros == 3000


@pytest.mark.parametrize(
    ("change", "message"),
    [
        ('prices = { "standard" = { "512x512" = 1000 } }', "no price"),
        ('default_size = "2048x2048"', "default_size"),
        ('default_quality = "auto"', "default_quality"),
        ('sizes = ["big"]', "WIDTHxHEIGHT"),
        ('colour = "blue"', "colour"),
        ('output_formats = ["gif"]', "gif"),
    ],
)
def test_invalid_rows_stop_start_up_naming_the_model(tmp_path: Path, change: str, message: str) -> None:
    key = change.split(" =")[0]
    lines = [line for line in ROW.splitlines() if not line.startswith(f"{key} =")]
    with pytest.raises(CatalogError) as caught:
        catalog_from(tmp_path, "\n".join(lines) + "\n" + change + "\n")
    assert "'m'" in str(caught.value) and message in str(caught.value)


def test_duplicate_ids_and_bad_fallbacks_are_refused(tmp_path: Path) -> None:
    with pytest.raises(CatalogError, match="listed twice"):
        catalog_from(tmp_path, ROW + ROW)
    with pytest.raises(CatalogError, match="fallback 'ghost'"):
        catalog_from(tmp_path, ROW + 'fallbacks = ["ghost"]\n')


def test_disabled_provider_gives_model_not_available(tmp_path: Path) -> None:
    catalog = catalog_from(tmp_path, ROW.replace('provider = "local"', 'provider = "openai"'))
    with pytest.raises(ModelNotAvailableError) as caught:
        catalog.resolve(RawImageRequest(prompt="p"))
    assert (caught.value.param, caught.value.code) == ("model", "model_not_available")
    assert catalog.enabled_models() == []


@pytest.mark.parametrize(
    ("raw", "param", "code"),
    [
        (RawImageRequest(prompt="p", style="vivid"), "style", "unsupported_parameter"),
        (RawImageRequest(prompt="p", background="opaque"), "background", "unsupported_parameter"),
        (RawImageRequest(prompt="p", output_compression=50), "output_compression", "unsupported_parameter"),
        (RawImageRequest(prompt="p", n=5), "n", "integer_above_max_value"),
        (RawImageRequest(prompt="p", partial_images=4), "partial_images", "integer_above_max_value"),
        (RawImageRequest(prompt="p", partial_images=-1), "partial_images", "integer_below_min_value"),
        # Streamed images travel in their events as base64; a link cannot be streamed.
        (RawImageRequest(prompt="p", stream=True, response_format="url"), "response_format", "invalid_value"),
    ],
)
def test_parameters_the_model_cannot_take_are_400(tmp_path: Path, raw: RawImageRequest, param: str, code: str) -> None:
    catalog = catalog_from(tmp_path, ROW)
    with pytest.raises(InvalidRequestError) as caught:
        catalog.resolve(raw)
    assert (caught.value.param, caught.value.code) == (param, code)


def _input(width: int = 64, height: int = 64) -> InputImage:
    out = io.BytesIO()
    Image.new("RGB", (width, height)).save(out, format="PNG")
    data = out.getvalue()
    return InputImage(in_memory(data), size=len(data), format="png", width=width, height=height, has_alpha=False)


EDITS = ROW + 'edits = true\nedit_max_images = 3\ninput_image_prices = { "*" = 500 }\n'


def test_a_fan_out_upstreams_inputs_are_priced_per_output_image(tmp_path: Path) -> None:
    catalog = catalog_from(tmp_path, EDITS + "inputs_per_output = true\ninput_token_price = 300000\n")
    quote = catalog.resolve(RawImageRequest(prompt="p", n=3, operation="edit", images=(_input(), _input())))
    # Each of the 3 calls reads both inputs: 3 x 2 x 500 reserved with the 3 images.
    assert (quote.inputs_micros, quote.amount_micros) == (3_000, 3 * 1_000 + 3_000)
    # Two delivered: their share of the inputs; with usage, what the upstream counted (2 calls x 2 x 258 tokens).
    assert quote.cost_micros(2, 0) == 2 * 1_000 + 2_000
    assert quote.cost_micros(2, 0, TokenUsage(input_image_tokens=1_032)) == 2 * 1_000 + 310
    assert quote.cost_micros(0, 0) == 0


def test_inputs_once_per_request_otherwise(tmp_path: Path) -> None:
    quote = catalog_from(tmp_path, EDITS).resolve(RawImageRequest(prompt="p", n=3, operation="edit", images=(_input(),)))
    assert (quote.amount_micros, quote.cost_micros(1, 0)) == (3 * 1_000 + 500, 1_000 + 500)


def test_an_edit_only_model_keeps_its_inputs_size_and_does_not_generate(tmp_path: Path) -> None:
    row = EDITS.replace('sizes = ["512x512", "1024x1024", "auto"]', 'sizes = ["auto"]') + "generations = false\n"
    catalog = catalog_from(tmp_path, row)
    quote = catalog.resolve(RawImageRequest(prompt="p", operation="edit", images=(_input(),)))
    assert (quote.request.size, quote.request.size_is_auto, quote.unit_price_micros) == ("512x512", True, 1_000)
    with pytest.raises(ModelNotSupportedError):
        catalog.resolve(RawImageRequest(prompt="p"))
    with pytest.raises(InvalidRequestError) as caught:
        catalog.resolve(RawImageRequest(prompt="p", operation="edit", images=(_input(),), size="512x512"))
    assert (caught.value.param, caught.value.code) == ("size", "invalid_size")
    with pytest.raises(CatalogError, match="generations = false needs edits"):
        catalog_from(tmp_path, ROW + "generations = false\n")


def test_an_editing_model_prices_inputs_sent_without_a_fidelity(tmp_path: Path) -> None:
    row = ROW + 'edits = true\ninput_fidelities = ["low", "high"]\ninput_image_prices = { "low" = 1, "high" = 2 }\n'
    with pytest.raises(CatalogError, match="fidelity '\\*'"):
        catalog_from(tmp_path, row)


@pytest.mark.parametrize(
    ("image", "mask", "param"),
    [
        (_input(96, 64), None, "image"),  # not square
        (_input(), None, "image"),  # no alpha and no mask: nothing to edit
    ],
)
def test_square_png_models_take_one_square_png_with_transparency_or_a_mask(
    tmp_path: Path, image: InputImage, mask: InputImage | None, param: str
) -> None:
    catalog = catalog_from(tmp_path, EDITS + 'edit_input = "square-png"\n')
    with pytest.raises(InvalidRequestError) as caught:
        catalog.resolve(RawImageRequest(prompt="p", operation="edit", images=(image,), mask=mask))
    assert (caught.value.param, caught.value.code) == (param, "invalid_image")
