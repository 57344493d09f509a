"""The composition root: the only place that builds and wires components.

``build_app`` turns ``Settings`` into an ``App`` (database, ledger, catalog, providers,
image store, generation use case, background sweeper), registering every resource on
an ``AsyncExitStack`` so that shutdown closes them in reverse order. ``build_server``
puts the servicers, interceptor, health and reflection on a ``grpc.aio`` server without
binding a port, so tests can bind ``127.0.0.1:0``. ``serve`` runs it until SIGTERM or
SIGINT and shuts down gracefully.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import signal
import time
from collections.abc import Mapping
from concurrent.futures import ThreadPoolExecutor
from contextlib import AsyncExitStack
from dataclasses import dataclass
from pathlib import Path

import grpc
import httpx
from grpc_health.v1 import health, health_pb2, health_pb2_grpc
from grpc_reflection.v1alpha import reflection
from imagegw.v1 import (
    admin_pb2,
    admin_pb2_grpc,
    images_pb2,
    models_pb2,
    models_pb2_grpc,
)

from server.admission import Admissions
from server.api.admin import AdminServicer
from server.api.images import ImageServicer, add_to_server
from server.api.interceptors import MethodPolicy, ServerInterceptor, check_policies
from server.api.models import ModelServicer
from server.catalog import CatalogError, ModelCatalog, ModelSpec, load_catalog
from server.config import Settings
from server.editing import InputRequests
from server.fetching import ImageFetcher
from server.generation import Generation
from server.idempotency import IdempotencyStore
from server.ledger import Database, Ledger, migrate
from server.metrics import Metrics
from server.providers import build_provider, enabled_providers, provider_key_setting
from server.providers.base import ImageProvider
from server.providers.gate import AnswerGate
from server.providers.http import create_http_client
from server.providers.local import LocalRenderer
from server.ratelimit import Limits, RateLimiter
from server.storage import (
    FilesystemImageStore,
    ImageStore,
    MeteredImageStore,
    S3ImageStore,
    UrlSigner,
    parse_s3_url,
)
from server.uploads import UploadLimits

__all__ = ["App", "build_app", "build_server", "serve", "SERVICE_NAMES"]

log = logging.getLogger("imagegw")

SERVICE_NAMES = (
    images_pb2.DESCRIPTOR.services_by_name["ImageService"].full_name,
    models_pb2.DESCRIPTOR.services_by_name["ModelService"].full_name,
    admin_pb2.DESCRIPTOR.services_by_name["AdminService"].full_name,
)
_IMAGE_SERVICE, _MODEL_SERVICE, _ADMIN_SERVICE = SERVICE_NAMES

_HEALTH = health_pb2.DESCRIPTOR.services_by_name["Health"]
_REFLECTION = reflection.SERVICE_NAME

# Who may call what; build_server refuses to start with a registered RPC missing here.
# Image files are public: the signed URL is the credential, so that browsers and <img>
# tags can fetch them like OpenAI's links. Health and reflection are for load balancers
# and operators' tools.
METHOD_POLICIES = {
    f"/{_IMAGE_SERVICE}/GenerateImages": MethodPolicy.API_KEY,
    f"/{_IMAGE_SERVICE}/StreamGenerateImages": MethodPolicy.API_KEY,
    f"/{_IMAGE_SERVICE}/GenerateImagesHttp": MethodPolicy.API_KEY,
    f"/{_IMAGE_SERVICE}/EditImages": MethodPolicy.API_KEY,
    f"/{_IMAGE_SERVICE}/StreamEditImages": MethodPolicy.API_KEY,
    f"/{_IMAGE_SERVICE}/EditImagesHttp": MethodPolicy.API_KEY,
    f"/{_IMAGE_SERVICE}/CreateImageVariation": MethodPolicy.API_KEY,
    f"/{_IMAGE_SERVICE}/CreateImageVariationHttp": MethodPolicy.API_KEY,
    f"/{_IMAGE_SERVICE}/GetImageFile": MethodPolicy.PUBLIC,
    f"/{_MODEL_SERVICE}/ListModels": MethodPolicy.API_KEY,
    f"/{_MODEL_SERVICE}/GetModel": MethodPolicy.API_KEY,
    **{
        f"/{_ADMIN_SERVICE}/{method.name}": MethodPolicy.ADMIN
        for method in admin_pb2.DESCRIPTOR.services_by_name["AdminService"].methods
    },
    **{f"/{_HEALTH.full_name}/{method.name}": MethodPolicy.PUBLIC for method in _HEALTH.methods},
    f"/{_REFLECTION}/ServerReflectionInfo": MethodPolicy.PUBLIC,
}


@dataclass(frozen=True)
class App:
    """Every long-lived component of one server process."""

    settings: Settings
    catalog: ModelCatalog
    ledger: Ledger
    store: ImageStore
    signer: UrlSigner
    providers: Mapping[str, ImageProvider]
    generation: Generation
    metrics: Metrics
    health: health.aio.HealthServicer
    limiter: RateLimiter
    admissions: Admissions
    gate: AnswerGate
    idempotency: IdempotencyStore
    inputs: InputRequests
    upload_limits: UploadLimits


async def build_app(
    settings: Settings,
    stack: AsyncExitStack,
    *,
    providers: Mapping[str, ImageProvider] | None = None,
) -> App:
    """Builds every component from ``settings``; ``providers`` (by model id) override the
    configured adapters, which is how tests put a fake in front of a model."""
    settings.var_dir.mkdir(parents=True, exist_ok=True)
    tuning = settings.tuning
    metrics = Metrics()
    db = Database(settings.resolved_database_url, tuning=tuning, metrics=metrics)
    stack.push_async_callback(db.close)
    await migrate(db.engine)
    ledger = Ledger(
        db,
        key_hash_secret=settings.secret("key_hash_secret").encode(),
        reservation_ttl_seconds=settings.reservation_ttl_seconds,
        sweep_batch=tuning.sweep_batch,
    )
    specs = load_catalog(settings.catalog_file)
    _check_timeouts(specs, settings)
    catalog = ModelCatalog(
        specs,
        enabled_providers=enabled_providers(settings, specs),
        default_model=settings.default_model,
        max_response_bytes=settings.max_response_bytes,
    )
    _log_models(catalog)
    wired = dict(providers or {})
    if settings.metrics_port:
        metrics_server = metrics.serve(settings.metrics_host, settings.metrics_port)
        stack.callback(metrics_server.shutdown)  # type: ignore[attr-defined]
    gate = AnswerGate(settings.max_large_upstream_answers)
    metrics.large_answers.labels("decoding").set_function(lambda: gate.active)
    metrics.large_answers.labels("waiting").set_function(lambda: gate.waiting)
    built = await _build_providers(settings, catalog, stack, metrics, gate)
    wired.update({model: provider for model, provider in built.items() if model not in wired})
    store = _build_store(settings, metrics)
    stack.push_async_callback(store.aclose)
    signer = UrlSigner(
        settings.secret("url_signing_secret").encode(),
        base_url=settings.base_url,
        ttl_seconds=settings.url_ttl_seconds,
    )
    generation = Generation(
        catalog=catalog,
        providers=wired,
        ledger=ledger,
        store=store,
        signer=signer,
        metrics=metrics,
        reservation_grace_seconds=settings.reservation_grace_seconds,
        presign=(lambda image_id: store.presigned_url(image_id, settings.url_ttl_seconds))
        if settings.url_mode == "presigned"
        else None,
    )
    limiter = RateLimiter(
        db, defaults=Limits(requests_per_minute=settings.rate_limit_rpm, images_per_minute=settings.rate_limit_ipm)
    )
    idempotency = IdempotencyStore(
        db,
        ttl_seconds=settings.idempotency_ttl_seconds,
        max_lease_seconds=settings.reservation_ttl_seconds,
        lease_grace_seconds=settings.reservation_grace_seconds,
        max_wait_seconds=settings.request_timeout_seconds,
        sweep_batch=tuning.sweep_batch,
    )
    # Image URLs of JSON edits: their own client (no pooling needs, no provider's headers).
    fetch_client = httpx.AsyncClient(follow_redirects=False, timeout=settings.image_url_timeout_seconds)
    stack.push_async_callback(fetch_client.aclose)
    upload_limits = UploadLimits(
        max_file_bytes=settings.upload_max_file_bytes,
        max_files=settings.upload_max_images,
        max_total_bytes=settings.upload_max_bytes,
        max_json_bytes=settings.upload_max_json_bytes,
        spool_bytes=settings.upload_spool_bytes,
    )
    inputs = InputRequests(
        ImageFetcher(
            fetch_client,
            allowlist=settings.image_url_allowlist.split(","),
            max_bytes=settings.upload_max_file_bytes,
            max_total_bytes=settings.upload_max_bytes,
            timeout=settings.image_url_timeout_seconds,
            spool_bytes=settings.upload_spool_bytes,
        ),
        max_images=settings.upload_max_images,
        max_pixels=settings.upload_max_pixels,
    )
    sweeper = asyncio.create_task(_sweep_forever(settings, ledger, store, idempotency), name="imagegw-sweeper")
    stack.push_async_callback(_cancel, sweeper)
    return App(
        settings=settings,
        catalog=catalog,
        ledger=ledger,
        store=store,
        signer=signer,
        providers=wired,
        generation=generation,
        metrics=metrics,
        health=health.aio.HealthServicer(),
        limiter=limiter,
        admissions=Admissions(db, ledger, limiter),
        gate=gate,
        idempotency=idempotency,
        inputs=inputs,
        upload_limits=upload_limits,
    )


def _build_store(settings: Settings, metrics: Metrics) -> ImageStore:
    """The folder under var/ by default; an S3-compatible bucket for several replicas."""
    url = settings.image_store_url
    if url.startswith("s3://"):
        bucket, prefix = parse_s3_url(url)
        secret = settings.aws_secret_access_key
        inner: ImageStore = S3ImageStore(
            bucket,
            prefix,
            endpoint=settings.aws_endpoint_url,
            region=settings.aws_region,
            access_key_id=settings.aws_access_key_id,
            secret_access_key=secret.get_secret_value() if secret else None,
        )
    elif url and not url.startswith("file://"):
        raise ValueError(f"IMAGEGW_IMAGE_STORE_URL {url!r}: use s3://bucket/prefix, file:///path, or leave it unset")
    else:
        if settings.url_mode == "presigned":
            raise ValueError("IMAGEGW_URL_MODE=presigned needs an S3 image store (IMAGEGW_IMAGE_STORE_URL=s3://...)")
        folder = Path(url.removeprefix("file://")) if url else settings.resolved_image_dir
        inner = FilesystemImageStore(folder)
        url = str(folder)
    log.info("image store: %s (URLs: %s)", url, settings.url_mode)
    return MeteredImageStore(inner, metrics)


def _check_timeouts(specs: list[ModelSpec], settings: Settings) -> None:
    """A model's timeout must fit inside the request timeout (Envoy's route timeout and the
    gRPC deadline it sends), or Envoy would cut generations the model is still allowed."""
    too_slow = [spec.id for spec in specs if spec.is_image and spec.timeout_seconds > settings.request_timeout_seconds]
    if too_slow:
        raise CatalogError(
            f"models {', '.join(too_slow)} have timeout_seconds above IMAGEGW_REQUEST_TIMEOUT_SECONDS "
            f"({settings.request_timeout_seconds:g} s); raise the request timeout or lower the models' timeouts"
        )


async def _build_providers(
    settings: Settings, catalog: ModelCatalog, stack: AsyncExitStack, metrics: Metrics, gate: AnswerGate
) -> dict[str, ImageProvider]:
    """One adapter per provider (one pooled HTTP client each), mapped by model id."""
    by_model: dict[str, ImageProvider] = {}
    shared: dict[str, ImageProvider] = {}
    for spec in catalog.enabled_models():
        if not spec.is_image:
            continue
        key = _provider_key(spec)
        if key not in shared:
            shared[key] = await _new_provider(spec, settings, stack, metrics, gate)
        by_model[spec.id] = shared[key]
    return by_model


def _provider_key(spec: ModelSpec) -> str:
    # Operator-defined OpenAI-compatible hosts each get their own client and key.
    return f"{spec.provider}|{spec.base_url or ''}|{spec.api_key_env or ''}"


async def _new_provider(
    spec: ModelSpec, settings: Settings, stack: AsyncExitStack, metrics: Metrics, gate: AnswerGate
) -> ImageProvider:
    if spec.provider == "local":
        executor = ThreadPoolExecutor(max_workers=settings.render_workers, thread_name_prefix="imagegw-render")
        stack.callback(executor.shutdown, wait=False, cancel_futures=True)
        provider: ImageProvider = LocalRenderer(executor)
    else:
        http = create_http_client(max_connections=settings.tuning.upstream_max_connections)
        stack.push_async_callback(http.aclose)
        provider = build_provider(
            spec.provider,
            settings=settings,
            http=http,
            spec=spec,
            on_retry=metrics.upstream_retries.labels(spec.provider).inc,
            gate=gate,
        )
    stack.push_async_callback(provider.aclose)
    return provider


def _log_models(catalog: ModelCatalog) -> None:
    enabled = [spec.id for spec in catalog.enabled_models()]
    log.info("models enabled: %s", ", ".join(enabled) or "none")
    disabled = catalog.disabled_models()
    if disabled:
        hints = sorted({f"{spec.provider} ({provider_key_setting(spec.provider, spec)})" for spec in disabled})
        log.info(
            "models not enabled: %s; set the provider key to enable them: %s",
            ", ".join(spec.id for spec in disabled),
            ", ".join(hints),
        )


async def _sweep_forever(settings: Settings, ledger: Ledger, store: ImageStore, idempotency: IdempotencyStore) -> None:
    """Deletes expired images and idempotency keys, and releases reservations left behind by
    crashed requests."""
    while True:
        try:
            released = await ledger.release_expired()
            # Images of keyed requests stay as long as a replay may ask for them.
            now = time.time()
            removed = await store.delete_older_than(
                now - settings.url_ttl_seconds,
                kept_cutoff=now - max(settings.url_ttl_seconds, settings.idempotency_ttl_seconds),
            )
            keys = await idempotency.delete_expired()
            if keys:
                log.info("sweep: deleted %d expired idempotency keys", keys)
            if released or removed:
                log.info("sweep: released %d expired reservations, deleted %d expired images", released, removed)
        except asyncio.CancelledError:
            raise
        except Exception:
            log.exception("sweep failed; retrying at the next interval")
        await asyncio.sleep(settings.sweep_interval_seconds)


async def _cancel(task: asyncio.Task[None]) -> None:
    task.cancel()
    with contextlib.suppress(asyncio.CancelledError):
        await task


def build_interceptor(app: App) -> ServerInterceptor:
    """The interceptor every RPC passes through (auth, errors, logs, in-flight tracking)."""
    return ServerInterceptor(
        ledger=app.ledger,
        admin_token=app.settings.secret("admin_token"),
        policies=METHOD_POLICIES,
        metrics=app.metrics,
        key_cache_seconds=app.settings.api_key_cache_seconds,
    )


def build_server(app: App, interceptor: ServerInterceptor | None = None) -> grpc.aio.Server:
    """A server with every service, health and reflection registered; no port bound.
    Raises ValueError when one of their RPCs has no entry in ``METHOD_POLICIES``."""
    check_policies(_registered_methods(), METHOD_POLICIES)
    settings = app.settings
    server = grpc.aio.server(
        interceptors=[interceptor or build_interceptor(app)],
        options=[
            # Sized from the settings that also size Envoy (server/envoy.py), so that what
            # Envoy lets through is never refused here with grpc-core's own error.
            ("grpc.max_send_message_length", settings.max_response_bytes),
            # Typed gRPC edits carry their images in one message; REST bodies arrive in
            # messages of at most 1 MiB (Envoy streams them) or below max_request_bytes.
            ("grpc.max_receive_message_length", max(settings.max_request_bytes + 64 * 1024, settings.max_grpc_message_bytes)),
            # Equal soft and hard limits: above the soft one grpc-core refuses at random.
            ("grpc.max_metadata_size", settings.max_metadata_bytes),
            ("grpc.absolute_max_metadata_size", settings.max_metadata_bytes),
            # A second server on a taken port must fail, not silently share it.
            ("grpc.so_reuseport", 0),
            # Uploads stream in from Envoy: read ahead at most 1 MiB per call instead of
            # letting flow control grow each call's window (BDP probing reached several
            # MiB a call, held in memory while the handler spools the file to disk).
            ("grpc.http2.bdp_probe", 0),
            ("grpc.http2.lookahead_bytes", 1024 * 1024),
        ],
    )
    add_to_server(
        ImageServicer(
            generation=app.generation,
            store=app.store,
            signer=app.signer,
            admissions=app.admissions,
            idempotency=app.idempotency,
            inputs=app.inputs,
            limits=app.upload_limits,
            keepalive_seconds=settings.stream_keepalive_seconds,
            gate=app.gate,
        ),
        server,
    )
    models_pb2_grpc.add_ModelServiceServicer_to_server(ModelServicer(app.catalog), server)
    admin_pb2_grpc.add_AdminServiceServicer_to_server(AdminServicer(app.ledger, app.limiter), server)
    health_pb2_grpc.add_HealthServicer_to_server(app.health, server)
    reflection.enable_server_reflection(
        (*SERVICE_NAMES, health_pb2.DESCRIPTOR.services_by_name["Health"].full_name, reflection.SERVICE_NAME),
        server,
    )
    return server


def _registered_methods() -> list[str]:
    """Every RPC build_server serves, from the services' descriptors."""
    services = [
        images_pb2.DESCRIPTOR.services_by_name["ImageService"],
        models_pb2.DESCRIPTOR.services_by_name["ModelService"],
        admin_pb2.DESCRIPTOR.services_by_name["AdminService"],
        _HEALTH,
    ]
    methods = [f"/{service.full_name}/{method.name}" for service in services for method in service.methods]
    return [*methods, f"/{_REFLECTION}/ServerReflectionInfo"]


async def set_serving(app: App) -> None:
    """Marks the server and each of its services SERVING."""
    for name in ("", *SERVICE_NAMES):
        await app.health.set(name, health_pb2.HealthCheckResponse.SERVING)


async def serve(settings: Settings, *, ready: asyncio.Event | None = None) -> None:
    """Runs the gRPC server until SIGTERM/SIGINT, then drains and stops gracefully:
    health goes NOT_SERVING (Envoy stops routing new requests here), in-flight requests
    get ``shutdown_grace_seconds`` to finish, those still running then end with a
    retryable 503 and a full release, and only after every settlement (and the
    idempotency bookkeeping of requests that went away) has landed is the database closed."""
    stop = asyncio.Event()
    loop = asyncio.get_running_loop()
    for sig in (signal.SIGTERM, signal.SIGINT):
        loop.add_signal_handler(sig, stop.set)
    async with AsyncExitStack() as stack:
        app = await build_app(settings, stack)
        interceptor = build_interceptor(app)
        server = build_server(app, interceptor)
        server.add_insecure_port(settings.grpc_target)
        await server.start()
        await set_serving(app)
        log.info("gRPC server listening on %s", settings.grpc_target)
        if ready is not None:
            ready.set()
        await stop.wait()
        log.info("shutting down: draining in-flight requests for up to %.0f s", settings.shutdown_grace_seconds)
        # NOT_SERVING first and keep accepting for a moment: Envoy's health checks need
        # that long to stop routing here, so no request arrives at a closed door.
        await app.health.enter_graceful_shutdown()
        await asyncio.sleep(settings.shutdown_drain_seconds)
        # Refuse new calls from here on, while the running ones get the grace period.
        stopping = asyncio.create_task(server.stop(settings.shutdown_grace_seconds + 10))
        try:
            await asyncio.wait_for(interceptor.wait_idle(), settings.shutdown_grace_seconds)
        except TimeoutError:
            aborted = interceptor.abort_in_flight()
            log.warning("grace period over: ended %d in-flight requests with a retryable 503", aborted)
        await stopping
        await app.generation.wait_settled()
        await app.idempotency.wait_settled()
        log.info("server stopped")
