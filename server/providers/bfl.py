"""Black Forest Labs' FLUX API: submit, then poll (``reference/providers.md`` §4).

``POST {base}/v1/{model}`` with ``x-key`` answers ``{id, polling_url}``. The global host
routes tasks to regional clusters, so the ``polling_url`` may be on another host (or
port) and is always followed, with ``x-key`` again, but only within the provider's domain
(``_trusted``: the base host itself or a sibling under the same parent domain), so a
malformed answer cannot send our key elsewhere. Poll states (``STATES``): ``Pending``
(keep polling, 0.5 s rising to 2 s), ``Ready`` (download ``result.sample`` at once: the
signed URL expires after about 10 minutes), ``Request Moderated`` / ``Content Moderated``
(the caller's ``content_policy_violation``), ``Error`` and ``Task not found``.
A 5xx or 429 on a poll is retried as a poll and never resubmits (that would pay twice).

Size: width/height, multiples of 32 within 256..1440 (``server.providers.sizing``).
One image per task, so ``n`` fans out with bounded concurrency. HTTP errors map by
status in ``ERRORS`` (BFL's bodies carry only FastAPI ``detail`` text).

FLUX.1 Kontext (``flux-kontext-*``, BFL's API reference "Edit or create an image with
FLUX.1 Kontext [pro]", ``POST /v1/flux-kontext-pro``, and its schema as relayed by
docs.comfy.org's "FLUX.1 Kontext" router page): ``prompt``, ``aspect_ratio`` (any ratio
from 21:9 to 9:21; there is no width/height), ``output_format``, ``safety_tolerance``,
``prompt_upsampling``, and for an edit the first image as ``input_image`` (base64) and the
others as ``input_image_2`` .. ``input_image_4`` (BFL's experimental multi-reference). An
edit with ``size: auto`` sends no ratio: Kontext keeps its input's. No mask (the catalog
refuses one). Then polling exactly as for generations; a task moderated while polling
(``Request Moderated`` / ``Content Moderated``) is the caller's content-policy refusal.
Kontext bills per output image, input images included. The body, with the base64 inputs,
is encoded once off the loop and sent by every task of the fan-out.
"""

from __future__ import annotations

import asyncio
from collections.abc import Mapping

import httpx

from server.errors import ContentPolicyError, InvalidRequestError, ModelNotSupportedError, UpstreamError
from server.providers.base import GeneratedImage, ImageRequest, Progress, ProviderResult
from server.providers.http import (
    ErrorBody,
    ErrorTable,
    Failure,
    Informational,
    Kind,
    UpstreamHttp,
    UpstreamModel,
    UpstreamResponse,
    fan_out,
    input_base64,
    json_content,
    lookup_kind,
    malformed,
)
from server.providers.sizing import bfl_dimensions, exact_aspect_ratio

__all__ = ["ERRORS", "STATES", "BflImageProvider"]

OUTPUT_FORMATS = ("jpeg", "png", "webp")

# The one table: (HTTP status, -) -> kind; BFL has no structured error codes.
ERRORS: ErrorTable = {
    (400, None): Kind.REJECTED,
    (401, None): Kind.CREDENTIALS,
    (402, None): Kind.ACCOUNT,  # insufficient credits
    (403, None): Kind.CREDENTIALS,  # the key is invalid or lacks permission
    (404, None): Kind.MODEL_UNAVAILABLE,
    (422, None): Kind.REJECTED,  # FastAPI validation (width not a multiple of 32, ...)
    (429, None): Kind.RATE_LIMITED,  # more than 24 active tasks
}

KONTEXT = "flux-kontext"
MAX_KONTEXT_IMAGES = 4  # input_image, input_image_2 .. input_image_4

# Poll `status` -> what to do. Anything else is a malformed answer.
STATES: Mapping[str, str] = {
    "Pending": "poll",
    "Ready": "download",
    "Request Moderated": "moderated",  # the prompt was flagged before generation
    "Content Moderated": "moderated",  # the image was flagged after generation
    "Error": "failed",  # generation failed upstream; nothing was charged
    "Task not found": "failed",  # unknown or expired id (or the wrong regional host)
}


class _Problem(UpstreamModel):
    msg: Informational[str] = None


class _ErrorBody(ErrorBody):
    # FastAPI: a message, or a validation error's list of problems.
    detail: Informational[str | list[Informational[_Problem]]] = None


class Submitted(UpstreamModel):
    """The submit answer: the task and where to poll it."""

    id: Informational[str] = None
    polling_url: str | None = None


class _Result(UpstreamModel):
    sample: Informational[str] = None  # a signed link, valid about 10 minutes
    prompt: Informational[str] = None  # the prompt used (it differs when upsampled)


class TaskState(UpstreamModel):
    """One poll answer."""

    status: Informational[str] = None
    result: Informational[_Result] = None


def classify(response: UpstreamResponse) -> Failure:
    """Maps a non-2xx BFL answer through ``ERRORS``."""
    body = response.parse_or_none(_ErrorBody)
    detail = body.detail if body is not None else None
    if isinstance(detail, list):
        detail = "; ".join(str(p.msg) for p in detail if p is not None)
    return Failure(lookup_kind(ERRORS, response.status, []), detail=detail or "", status=response.status)


class BflImageProvider:
    """FLUX models behind BFL's asynchronous API (see the module docstring)."""

    def __init__(
        self,
        http: UpstreamHttp,
        *,
        api_key: str,
        base_url: str,
        poll_interval: float = 0.5,
        max_poll_interval: float = 2.0,
        safety_tolerance: int = 2,
    ) -> None:
        self.name = http.provider
        self._base = httpx.URL(base_url.rstrip("/") + "/")
        self._headers = {"x-key": api_key, "accept": "application/json"}
        self._poll_interval = poll_interval
        self._max_poll_interval = max_poll_interval
        self._safety_tolerance = safety_tolerance
        self._http = http

    async def submit_body(self, request: ImageRequest) -> dict[str, object]:
        """The submit body for one image of ``request`` (a Kontext edit's images in base64)."""
        if request.output_format not in OUTPUT_FORMATS:  # pragma: no cover - the catalog lists only these
            raise InvalidRequestError(f"Invalid value for 'output_format': {request.output_format!r}.", param="output_format")
        body: dict[str, object] = {"prompt": request.prompt}
        if request.upstream_model.startswith(KONTEXT):
            if len(request.images) > MAX_KONTEXT_IMAGES:  # pragma: no cover - the catalog's edit_max_images
                raise InvalidRequestError(f"Kontext edits at most {MAX_KONTEXT_IMAGES} images.", param="image")
            for index, image in enumerate(request.images, start=1):
                body["input_image" if index == 1 else f"input_image_{index}"] = await input_base64(image)
            if not (request.operation == "edit" and request.size_is_auto):
                body["aspect_ratio"] = exact_aspect_ratio(request.width, request.height)
        elif request.operation != "generate":
            raise ModelNotSupportedError(f"The model '{request.model_id}' cannot edit images.", param="model")
        else:
            body["width"], body["height"] = bfl_dimensions(request.width, request.height)
        return body | {
            "output_format": request.output_format,
            "safety_tolerance": self._safety_tolerance,
            "prompt_upsampling": False,
        }

    def _trusted(self, url: httpx.URL) -> bool:
        """Whether ``url`` may receive our key: the base host, or a sibling under its parent domain."""
        if url.scheme not in ("https", self._base.scheme):
            return False
        base_host, host = self._base.host, url.host
        if host == base_host:
            return True
        labels = base_host.split(".")
        if len(labels) < 3 or base_host.replace(".", "").isdigit():
            return False  # an IP address or a bare domain has no siblings
        parent = ".".join(labels[1:])
        return host == parent or host.endswith("." + parent)

    async def generate(
        self, request: ImageRequest, *, deadline: float, progress: Progress | None = None
    ) -> ProviderResult:
        """``request.n`` tasks of one image each; moderated ones are dropped."""
        body = await json_content(await self.submit_body(request), size=sum(image.size for image in request.images) * 2)
        return await fan_out(
            request.n,
            lambda _index: self._once(request, body, deadline),
            concurrency=self._http.fan_out_width,
            provider=self.name,
            progress=progress,
        )

    async def _once(self, request: ImageRequest, body: bytes, deadline: float) -> ProviderResult:
        submitted = await self._http.send(
            "POST",
            str(self._base.join(f"v1/{request.upstream_model}")),
            deadline=deadline,
            classify=classify,
            headers=self._headers | {"content-type": "application/json"},
            content=body,
            operation="submit",
        )
        task = await submitted.parse(Submitted)
        if not task.id:
            raise malformed("a submit answer without a task id")
        if task.polling_url is None:
            polling_url = self._base.join("v1/get_result").copy_with(params={"id": task.id})
        else:
            try:
                polling_url = httpx.URL(task.polling_url)
            except httpx.InvalidURL as exc:
                raise malformed("a polling_url that is not a URL") from exc
        if not self._trusted(polling_url):
            raise malformed(f"a polling_url outside the provider's domain ({polling_url.host})")
        return await self._poll(str(polling_url), request, deadline)

    async def _poll(self, url: str, request: ImageRequest, deadline: float) -> ProviderResult:
        loop = asyncio.get_running_loop()
        interval = self._poll_interval
        while True:
            response = await self._http.send(
                "GET", url, deadline=deadline, classify=classify, headers=self._headers, operation="poll"
            )
            state = await response.parse(TaskState)
            status = state.status
            if status is None or status not in STATES:
                raise malformed(f"an unknown task status {status!r}")
            action = STATES[status]
            if action == "download":
                return ProviderResult(images=[await self._download(state, request, deadline)])
            if action == "moderated":
                raise ContentPolicyError("The upstream provider's safety system rejected the request.")
            if action == "failed":
                raise UpstreamError(f"The upstream task failed (status {status!r}).", retryable=True)
            # Pending: wait, never past the deadline (the next send would fail at once).
            await asyncio.sleep(max(0.0, min(interval, deadline - loop.time())))
            interval = min(interval * 1.5, self._max_poll_interval)

    async def _download(self, state: TaskState, request: ImageRequest, deadline: float) -> GeneratedImage:
        result = state.result
        if result is None or not result.sample:
            raise malformed("a Ready task without result.sample")
        image = await self._http.download_image(result.sample, deadline=deadline)
        # BFL echoes the prompt it used; it differs only when it was upsampled.
        revised = result.prompt if result.prompt is not None and result.prompt != request.prompt else None
        return GeneratedImage(data=image.data, format=image.format, revised_prompt=revised)

    async def aclose(self) -> None:
        """Nothing to release: the composition root owns and closes the HTTP client."""
