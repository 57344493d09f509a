"""The model catalog: which models exist, what each accepts, and what each image costs.

The catalog is data (``server/catalog.toml``, or the operator's ``IMAGEGW_CATALOG_FILE``),
validated whole at start-up: a model without a price for every size and quality it
offers, an unknown provider or a default outside its own lists stops the server with a
message naming the model. At request time ``ModelCatalog.resolve`` turns the caller's
raw parameters into a concrete ``ImageRequest`` (``auto`` resolved, so pricing and
generation agree) or raises an OpenAI-shaped 400 naming the offending ``param``.
"""

from __future__ import annotations

import re
import tomllib
from collections.abc import Iterable, Mapping
from dataclasses import dataclass
from pathlib import Path
from typing import Literal

from pydantic import BaseModel, ConfigDict, Field, ValidationError, model_validator

from server.config import ConfigError
from server.errors import (
    InvalidRequestError,
    ModelNotAvailableError,
    ModelNotFoundError,
    ModelNotSupportedError,
)
from server.providers.base import ImageRequest, InputImage, Operation, TokenUsage

__all__ = ["CatalogError", "ModelCatalog", "ModelSpec", "RawImageRequest", "Quote", "load_catalog"]

DEFAULT_CATALOG = Path(__file__).with_name("catalog.toml")
SIZE_RE = re.compile(r"^(\d{2,5})x(\d{2,5})$")
RESPONSE_FORMATS = ("url", "b64_json")
# Upper bound of an encoded image's size, per pixel: raw 8-bit RGB. PNG, JPEG and WebP of a
# generated picture stay well below it, so an answer estimated with it always fits.
MAX_BYTES_PER_PIXEL = 3
OUTPUT_FORMATS = ("png", "jpeg", "webp")
# DALL·E 2's limit for an edit's image and mask.
SQUARE_PNG_MAX_BYTES = 4 * 1024 * 1024
WILDCARD = "*"


class CatalogError(ConfigError):
    """The catalog file is invalid; the message names the model and the problem."""


class ModelSpec(BaseModel):
    """One catalog row. Unknown keys are errors, so typos fail at start-up."""

    model_config = ConfigDict(extra="forbid", frozen=True)

    id: str = Field(min_length=1)
    type: Literal["image", "chat"] = "image"
    provider: str = Field(min_length=1)
    upstream_model: str = ""
    owned_by: str = ""
    created: int = 1767225600
    # Operator-defined OpenAI-compatible hosts name their endpoint and key variable.
    base_url: str | None = None
    api_key_env: str | None = None

    sizes: list[str] = Field(default_factory=list)
    default_size: str = ""
    max_n: int = Field(default=1, ge=1, le=10)
    qualities: list[str] = Field(default_factory=lambda: ["standard"])
    default_quality: str = "standard"
    styles: list[str] = Field(default_factory=list)
    default_style: str | None = None
    output_formats: list[str] = Field(default_factory=lambda: ["png"])
    backgrounds: list[str] = Field(default_factory=list)
    moderations: list[str] = Field(default_factory=list)
    output_compression: bool = False
    # Whether the model makes partial images while it works (local-1, and OpenAI's GPT
    # image models whose stream is relayed). Every model streams (`stream: true`); one
    # without this sends each image's completed event only, whatever `partial_images` says.
    streaming: bool = False
    # Micro-dollars per partial image delivered (OpenAI bills each partial image as 100
    # extra output tokens); reserved up front for every partial the request may get.
    partial_image_price: int = Field(default=0, ge=0)
    prompt_max_chars: int = Field(default=4000, ge=1)
    # Micro-dollars per image, by quality then size; "*" matches any.
    prices: dict[str, dict[str, int]] = Field(default_factory=dict)
    timeout_seconds: float = Field(default=120, gt=0)
    fallbacks: list[str] = Field(default_factory=list)

    # Edits (`POST /v1/images/edits`): whether the model edits, how many input images it
    # takes, whether a mask is refused, optional or required, and the fidelities it takes.
    edits: bool = False
    edit_max_images: int = Field(default=1, ge=1, le=16)
    edit_mask: Literal["none", "optional", "required"] = "optional"
    input_fidelities: list[str] = Field(default_factory=list)
    # Micro-dollars per input image, by input_fidelity ("*" matches any): reserved for
    # every input image, and charged when the edit delivers (unless usage says less).
    input_image_prices: dict[str, int] = Field(default_factory=dict)
    # Micro-dollars per million input image tokens, for upstreams that report them
    # (OpenAI): the input part of the charge follows that usage, never above the reserve.
    input_token_price: int = Field(default=0, ge=0)
    # What an edit's images must be: "any" PNG, JPEG or WebP, or (DALL·E 2) one square PNG
    # under 4 MiB, with an alpha channel when no mask is given (its transparency is the mask).
    edit_input: Literal["any", "square-png"] = "any"
    # Whether the upstream makes one image per call and reads (and bills) the inputs on every
    # call (Gemini's fan-out): the inputs are then priced per output image.
    inputs_per_output: bool = False
    # Variations (`POST /v1/images/variations`): one square PNG in, `n` variations out.
    variations: bool = False
    # Whether `/v1/images/generations` serves the model; false for an edit-only service
    # (Stability's inpainting), which then needs `edits`.
    generations: bool = True

    @model_validator(mode="after")
    def _check(self) -> ModelSpec:
        if self.type != "image":
            return self
        if not self.sizes:
            raise ValueError("an image model needs at least one size")
        for size in self.sizes:
            if size != "auto" and not SIZE_RE.match(size):
                raise ValueError(f"size {size!r} is not WIDTHxHEIGHT or auto")
        concrete_sizes = [s for s in self.sizes if s != "auto"]
        if not concrete_sizes and not SIZE_RE.match(self.default_size):
            # Only `auto` (an edit that keeps its input's size): the default is what it is
            # priced and estimated at.
            raise ValueError("needs a concrete size or a default_size WIDTHxHEIGHT")
        if "auto" in self.sizes and concrete_sizes and self.default_size not in concrete_sizes:
            raise ValueError(f"default_size {self.default_size!r} must be one of the concrete sizes")
        if self.default_quality == "auto" or self.default_quality not in self.qualities:
            # `auto` must resolve to a concrete quality before pricing (never an unpriced request).
            raise ValueError(f"default_quality {self.default_quality!r} must be a concrete entry of qualities")
        if self.default_style is not None and self.default_style not in self.styles:
            raise ValueError(f"default_style {self.default_style!r} is not in styles")
        for fmt in self.output_formats:
            if fmt not in OUTPUT_FORMATS:
                raise ValueError(f"output format {fmt!r} is not one of {OUTPUT_FORMATS}")
        for quality in self.billable_qualities:
            for size in concrete_sizes or [self.default_size]:
                if self.unit_price(quality, size) is None:
                    raise ValueError(f"no price for quality {quality!r} at size {size!r}")
        if self.edits:
            # None: the caller sent no input_fidelity (the "*" price).
            for fidelity in [*self.input_fidelities, None]:
                if self.input_image_price(fidelity) is None:
                    raise ValueError(f"an editing model needs input_image_prices for fidelity {fidelity or '*'!r}")
        if not self.generations and not self.edits:
            raise ValueError("a model that does not generate must edit (generations = false needs edits = true)")
        return self

    def input_image_price(self, fidelity: str | None) -> int | None:
        """Micro-dollars for one input image of an edit, or None when unpriced."""
        prices = self.input_image_prices
        return prices.get(fidelity or WILDCARD, prices.get(WILDCARD))

    def supports(self, operation: Operation) -> bool:
        return (operation == "generate" and self.generations) or (operation == "edit" and self.edits) or (
            operation == "variation" and self.variations
        )

    @property
    def is_image(self) -> bool:
        return self.type == "image"

    @property
    def billable_qualities(self) -> list[str]:
        """The qualities a request can end up with (``auto`` resolves to the default)."""
        resolved = {self.default_quality if q == "auto" else q for q in self.qualities}
        return sorted(resolved)

    def unit_price(self, quality: str, size: str) -> int | None:
        """Micro-dollars for one image, or None when the table has no matching row."""
        by_size = self.prices.get(quality, self.prices.get(WILDCARD))
        if by_size is None:
            return None
        return by_size.get(size, by_size.get(WILDCARD))


@dataclass(frozen=True, slots=True)
class RawImageRequest:
    """The caller's parameters as received; ``None`` means the field was absent."""

    prompt: str
    model: str | None = None
    n: int | None = None
    quality: str | None = None
    response_format: str | None = None
    size: str | None = None
    style: str | None = None
    user: str | None = None
    background: str | None = None
    moderation: str | None = None
    output_format: str | None = None
    output_compression: int | None = None
    stream: bool | None = None
    partial_images: int | None = None
    # Edits and variations (see ImageRequest).
    operation: Operation = "generate"
    images: tuple[InputImage, ...] = ()
    mask: InputImage | None = None
    input_fidelity: str | None = None


@dataclass(frozen=True, slots=True)
class Quote:
    """What a validated request will cost at most, and how it must be answered."""

    request: ImageRequest
    spec: ModelSpec
    response_format: str
    unit_price_micros: int
    # Server-Sent Events instead of one answer; partial images are priced per partial.
    stream: bool = False
    partial_price_micros: int = 0
    # The caller's parameters as received: a fallback model re-resolves these, not the
    # primary's resolved values (which would turn its defaults into explicit choices).
    raw: RawImageRequest | None = None
    # An edit's input images: their price together, and the price per million input
    # image tokens for an upstream that reports them (0: charge the whole input price).
    inputs_micros: int = 0
    input_token_price: int = 0
    # The inputs were priced once per output image (a fan-out upstream reads them on
    # every call): each delivered image carries its share.
    inputs_per_output: bool = False

    @property
    def amount_micros(self) -> int:
        """The most this request can cost: every image with every partial it may stream,
        and the inputs."""
        outputs = self.request.n * (self.unit_price_micros + self.request.partial_images * self.partial_price_micros)
        return outputs + self.inputs_micros

    def cost_micros(self, images: int, partials: int, usage: TokenUsage | None = None) -> int:
        """What ``images`` final and ``partials`` partial images delivered cost, with the
        inputs they were made from, never more than was reserved. Nothing delivered,
        nothing charged (inputs included)."""
        cost = images * self.unit_price_micros + partials * self.partial_price_micros
        if images or partials:
            inputs = self.inputs_micros * images // self.request.n if self.inputs_per_output else self.inputs_micros
            if self.input_token_price and usage is not None and usage.input_image_tokens:
                # Round up: a fraction of a micro-dollar is still owed to the upstream.
                inputs = min(inputs, -(-usage.input_image_tokens * self.input_token_price // 1_000_000))
            cost += inputs
        return min(cost, self.amount_micros)


class ModelCatalog:
    """Looks models up and validates requests against them."""

    def __init__(
        self,
        specs: Iterable[ModelSpec],
        *,
        enabled_providers: Iterable[str],
        default_model: str,
        max_response_bytes: int | None = None,
    ) -> None:
        self._specs: dict[str, ModelSpec] = {}
        for spec in specs:
            if spec.id in self._specs:
                raise CatalogError(f"model {spec.id!r} is listed twice")
            self._specs[spec.id] = spec
        self._enabled = frozenset(enabled_providers)
        self.default_model = default_model
        # The largest answer the gateway can carry (gRPC send limit, Envoy buffer).
        self._max_response_bytes = max_response_bytes
        for spec in self._specs.values():
            for fallback in spec.fallbacks:
                target = self._specs.get(fallback)
                if target is None or not target.is_image:
                    raise CatalogError(f"model {spec.id!r}: fallback {fallback!r} is not an image model")

    @property
    def specs(self) -> Mapping[str, ModelSpec]:
        return self._specs

    def is_enabled(self, spec: ModelSpec) -> bool:
        return spec.provider in self._enabled

    def enabled_models(self) -> list[ModelSpec]:
        """Models this server can answer for, sorted by id."""
        return sorted((s for s in self._specs.values() if self.is_enabled(s)), key=lambda s: s.id)

    def disabled_models(self) -> list[ModelSpec]:
        return sorted((s for s in self._specs.values() if not self.is_enabled(s)), key=lambda s: s.id)

    def served_model(self, model_id: str) -> ModelSpec:
        """The enabled model (of any type) with that id. Raises ModelNotFoundError for an id
        the catalog does not know, ModelNotAvailableError for one whose provider is not
        enabled here; the model lookup (404) and a request naming it (400) say the same."""
        spec = self._specs.get(model_id)
        if spec is None:
            raise _model_not_found(model_id)
        if not self.is_enabled(spec):
            raise _model_not_available(spec)
        return spec

    def get_image_model(self, model_id: str) -> ModelSpec:
        """The enabled image model with that id, or the matching 400."""
        spec = self._specs.get(model_id)
        if spec is None:
            raise _model_not_found(model_id)
        if not spec.is_image:
            raise ModelNotSupportedError(
                f"The model '{model_id}' cannot generate images; use an image model such as '{self.default_model}'.",
                param="model",
            )
        if not self.is_enabled(spec):
            raise _model_not_available(spec)
        return spec

    def resolve(self, raw: RawImageRequest) -> Quote:
        """Validates ``raw`` for its model and prices it; raises a 400 naming the param."""
        spec = self.get_image_model(raw.model or self.default_model)
        if not spec.supports(raw.operation):
            what = {"edit": "edit images", "variation": "make image variations"}.get(raw.operation, "generate images")
            raise ModelNotSupportedError(
                f"The model '{spec.id}' cannot {what} on this server; use a model whose catalog entry allows it.",
                param="model",
            )
        inputs_micros = _check_inputs(spec, raw)
        prompt = raw.prompt
        if raw.operation == "variation":
            prompt = prompt or ""  # variations take no prompt
        elif not prompt or not prompt.strip():
            raise InvalidRequestError(
                "Missing required parameter: 'prompt'.", param="prompt", code="missing_required_parameter"
            )
        if prompt and len(prompt) > spec.prompt_max_chars:
            raise InvalidRequestError(
                f"Invalid 'prompt': string too long. Expected a string with maximum length "
                f"{spec.prompt_max_chars} for model '{spec.id}', but got a string with length {len(prompt)} instead.",
                param="prompt",
                code="string_above_max_length",
            )
        n = 1 if raw.n is None else raw.n
        if n < 1:
            raise InvalidRequestError(
                f"Invalid 'n': integer below minimum value. Expected a value >= 1, but got {n} instead.",
                param="n",
                code="integer_below_min_value",
            )
        if n > spec.max_n:
            raise InvalidRequestError(
                f"Invalid 'n': integer above maximum value. Expected a value <= {spec.max_n} "
                f"for model '{spec.id}', but got {n} instead.",
                param="n",
                code="integer_above_max_value",
            )
        width, height, size_is_auto = _resolve_size(spec, raw.size)
        quality = _choose(spec, "quality", raw.quality, spec.qualities, "auto" if "auto" in spec.qualities else spec.default_quality)
        quality_is_auto = quality == "auto"
        if quality_is_auto:
            quality = spec.default_quality
        style = _optional_choice(spec, "style", raw.style, spec.styles) or spec.default_style
        response_format = raw.response_format or "url"
        if response_format not in RESPONSE_FORMATS:
            raise _invalid_value("response_format", response_format, RESPONSE_FORMATS)
        if response_format == "b64_json" and self._max_response_bytes is not None:
            # Base64 grows the bytes by 4/3; refuse up front rather than fail after paying.
            worst = n * width * height * MAX_BYTES_PER_PIXEL * 4 // 3
            if worst > self._max_response_bytes:
                raise InvalidRequestError(
                    f"{n} image(s) of {width}x{height} as b64_json could exceed the server's response limit of "
                    f"{self._max_response_bytes} bytes; ask for fewer images, a smaller size, or "
                    f"response_format 'url'.",
                    param="n",
                    code="response_too_large",
                )
        # PNG is OpenAI's default; a model that cannot make PNG defaults to its first format.
        default_format = "png" if "png" in spec.output_formats else spec.output_formats[0]
        output_format = _choose(spec, "output_format", raw.output_format, spec.output_formats, default_format)
        compression = _resolve_compression(spec, raw.output_compression, output_format)
        background = _optional_choice(spec, "background", raw.background, spec.backgrounds)
        if background == "transparent" and output_format == "jpeg":
            raise InvalidRequestError(
                "Transparent background requires output_format 'png' or 'webp'.", param="background"
            )
        moderation = _optional_choice(spec, "moderation", raw.moderation, spec.moderations)
        stream = bool(raw.stream)
        if stream and raw.response_format == "url":
            raise InvalidRequestError(
                "Streamed images are sent as b64_json in their events; 'response_format' 'url' cannot be "
                "combined with 'stream'.",
                param="response_format",
            )
        if raw.partial_images is not None and not 0 <= raw.partial_images <= 3:
            raise InvalidRequestError(
                f"Invalid 'partial_images': integer out of range. Expected a value from 0 to 3, but got "
                f"{raw.partial_images} instead.",
                param="partial_images",
                code="integer_above_max_value" if raw.partial_images > 3 else "integer_below_min_value",
            )
        # Partial images exist only in a stream, and only from models that make them; as
        # at OpenAI, `partial_images` without `stream` has no effect.
        partial_images = (raw.partial_images or 0) if stream and spec.streaming else 0
        request = ImageRequest(
            model_id=spec.id,
            upstream_model=spec.upstream_model or spec.id,
            prompt=prompt,
            n=n,
            width=width,
            height=height,
            quality=quality,
            output_format=output_format,
            output_compression=compression,
            style=style,
            background=background,
            moderation=moderation,
            user=raw.user,
            size_is_auto=size_is_auto,
            quality_is_auto=quality_is_auto,
            partial_images=partial_images,
            operation=raw.operation,
            images=raw.images,
            mask=raw.mask,
            input_fidelity=raw.input_fidelity,
        )
        price = spec.unit_price(quality, request.size)
        if price is None:  # pragma: no cover - the spec validator guarantees a price
            raise CatalogError(f"model {spec.id!r} has no price for {quality}/{request.size}")
        return Quote(
            request=request,
            spec=spec,
            response_format="b64_json" if stream else response_format,
            unit_price_micros=price,
            stream=stream,
            partial_price_micros=spec.partial_image_price,
            raw=raw,
            inputs_micros=inputs_micros * n if spec.inputs_per_output else inputs_micros,
            input_token_price=spec.input_token_price if raw.operation == "edit" else 0,
            inputs_per_output=spec.inputs_per_output,
        )


def _check_inputs(spec: ModelSpec, raw: RawImageRequest) -> int:
    """Checks an edit's or a variation's images against the model; returns what the
    inputs cost (micro-dollars, reserved with the outputs)."""
    if raw.operation == "generate":
        return 0
    if not raw.images:
        raise InvalidRequestError(
            "Missing required parameter: 'image'.", param="image", code="missing_required_parameter"
        )
    if raw.operation == "variation":
        image = raw.images[0]
        if len(raw.images) > 1 or image.format != "png" or image.width != image.height:
            raise InvalidRequestError(
                "Invalid 'image': a variation takes one square PNG image.", param="image", code="invalid_image"
            )
        return 0
    if len(raw.images) > spec.edit_max_images:
        raise InvalidRequestError(
            f"Invalid 'image': model '{spec.id}' edits at most {spec.edit_max_images} image(s), "
            f"but {len(raw.images)} were given.",
            param="image",
            code="too_many_images",
        )
    if raw.mask is None and spec.edit_mask == "required":
        raise InvalidRequestError(
            f"Missing required parameter: 'mask'. Model '{spec.id}' edits only under a mask.",
            param="mask",
            code="missing_required_parameter",
        )
    if raw.mask is not None:
        if spec.edit_mask == "none":
            raise _unsupported(spec, "mask")
        first = raw.images[0]
        if raw.mask.format != "png" or not raw.mask.has_alpha:
            raise InvalidRequestError(
                "Invalid 'mask': it must be a PNG image with an alpha channel (transparent where to edit).",
                param="mask",
                code="invalid_mask",
            )
        if (raw.mask.width, raw.mask.height) != (first.width, first.height):
            raise InvalidRequestError(
                f"Invalid 'mask': its size ({raw.mask.width}x{raw.mask.height}) must equal the first image's "
                f"({first.width}x{first.height}).",
                param="mask",
                code="invalid_mask",
            )
    if spec.edit_input == "square-png":
        _check_square_png(spec, raw.images[0], raw.mask)
    fidelity = _optional_choice(spec, "input_fidelity", raw.input_fidelity, spec.input_fidelities)
    price = spec.input_image_price(fidelity)
    if price is None:  # pragma: no cover - the spec validator guarantees a price
        raise CatalogError(f"model {spec.id!r} has no input image price for fidelity {fidelity!r}")
    return price * len(raw.images)


def _check_square_png(spec: ModelSpec, image: InputImage, mask: InputImage | None) -> None:
    """DALL·E 2's edit input: one square PNG under 4 MB whose transparency is the mask
    when none is given (OpenAI's ``CreateImageEditRequest``)."""
    if image.format != "png" or image.width != image.height or image.size > SQUARE_PNG_MAX_BYTES:
        raise InvalidRequestError(
            f"Invalid 'image': model '{spec.id}' edits one square PNG image of at most 4 MB.",
            param="image",
            code="invalid_image",
        )
    if mask is None and not image.has_alpha:
        raise InvalidRequestError(
            f"Invalid 'image': without a 'mask', model '{spec.id}' edits where the image is transparent, "
            "but it has no alpha channel.",
            param="image",
            code="invalid_image",
        )
    if mask is not None and mask.size > SQUARE_PNG_MAX_BYTES:
        raise InvalidRequestError(
            f"Invalid 'mask': model '{spec.id}' takes a mask of at most 4 MB.", param="mask", code="invalid_mask"
        )


def _model_not_found(model_id: str) -> ModelNotFoundError:
    return ModelNotFoundError(f"The model '{model_id}' does not exist.", param="model")


def _model_not_available(spec: ModelSpec) -> ModelNotAvailableError:
    return ModelNotAvailableError(
        f"The model '{spec.id}' is not enabled on this server (its provider '{spec.provider}' is not configured).",
        param="model",
    )


def _resolve_size(spec: ModelSpec, size: str | None) -> tuple[int, int, bool]:
    value = size or "auto"
    if value not in spec.sizes:
        allowed = ", ".join(spec.sizes)
        raise InvalidRequestError(
            f"Invalid size '{value}' for model '{spec.id}'. Supported sizes are: {allowed}.",
            param="size",
            code="invalid_size",
        )
    is_auto = value == "auto"
    concrete = spec.default_size if is_auto else value
    match = SIZE_RE.match(concrete)
    assert match is not None  # guaranteed by ModelSpec validation
    return int(match.group(1)), int(match.group(2)), is_auto


def _invalid_value(param: str, value: object, allowed: Iterable[str]) -> InvalidRequestError:
    return InvalidRequestError(
        f"Invalid value for '{param}': '{value}'. Supported values are: {', '.join(repr(a) for a in allowed)}.",
        param=param,
        code="invalid_value",
    )


def _choose(spec: ModelSpec, param: str, value: str | None, allowed: list[str], default: str) -> str:
    chosen = default if value is None else value
    if chosen not in allowed:
        raise _invalid_value(param, chosen, allowed)
    return chosen


def _optional_choice(spec: ModelSpec, param: str, value: str | None, allowed: list[str]) -> str | None:
    if value is None:
        return None
    if not allowed:
        raise _unsupported(spec, param)
    if value not in allowed:
        raise _invalid_value(param, value, allowed)
    return value


def _resolve_compression(spec: ModelSpec, value: int | None, output_format: str) -> int:
    if value is None:
        return 100
    if not spec.output_compression:
        raise _unsupported(spec, "output_compression")
    if not 0 <= value <= 100:
        raise InvalidRequestError(
            f"Invalid 'output_compression': expected a value from 0 to 100, but got {value} instead.",
            param="output_compression",
        )
    if output_format == "png" and value != 100:
        raise InvalidRequestError(
            "Compression less than 100 is not supported for PNG output format; use 'jpeg' or 'webp'.",
            param="output_compression",
        )
    return value


def _unsupported(spec: ModelSpec, param: str) -> InvalidRequestError:
    return InvalidRequestError(
        f"Unsupported parameter: '{param}' is not supported by model '{spec.id}'.",
        param=param,
        code="unsupported_parameter",
    )


def load_catalog(path: Path | None = None) -> list[ModelSpec]:
    """Reads and validates a catalog file; raises CatalogError naming the bad model."""
    source = path or DEFAULT_CATALOG
    try:
        data = tomllib.loads(source.read_text())
    except (OSError, tomllib.TOMLDecodeError) as exc:
        raise CatalogError(f"cannot read catalog {source}: {exc}") from exc
    rows = data.get("models")
    if not isinstance(rows, list) or not rows:
        raise CatalogError(f"catalog {source} has no [[models]] entries")
    specs = []
    for index, row in enumerate(rows):
        name = row.get("id", f"#{index + 1}") if isinstance(row, dict) else f"#{index + 1}"
        try:
            specs.append(ModelSpec.model_validate(row))
        except ValidationError as exc:
            problems = "; ".join(f"{'.'.join(map(str, e['loc'])) or 'model'}: {e['msg']}" for e in exc.errors())
            raise CatalogError(f"catalog {source}, model {name!r}: {problems}") from exc
    return specs
