"""Settings, read once from ``IMAGEGW_*`` environment variables at start-up.

Every value has an embedded default so that ``make run`` works on a fresh machine: state
lives under ``var/`` (SQLite database, image folder, generated secrets). ``server.cli``
builds one ``Settings`` and passes it down; the only module-level value is
``DEFAULT_TUNING``, the immutable defaults of :class:`Tuning`, which components use when
built without settings (tools, tests).
"""

from __future__ import annotations

import functools
import os
import secrets
import tempfile
from pathlib import Path
from typing import Any, Final, Literal

from pydantic import AliasChoices, BaseModel, ConfigDict, Field, SecretStr, ValidationError, field_validator
from pydantic.fields import FieldInfo
from pydantic_settings import BaseSettings, PydanticBaseSettingsSource, SettingsConfigDict

from server.providers import PROVIDERS, ProviderEntry

__all__ = ["ConfigError", "DEFAULT_TUNING", "KIB", "MIB", "ProviderSettings", "Settings", "Tuning", "describe_settings_error"]

KIB = 1024
MIB = 1024 * 1024
# What grpc-core counts per metadata entry on top of its name and value (HPACK's figure).
METADATA_ENTRY_OVERHEAD = 32
# Headers Envoy adds to every upstream request at most (pseudo-headers, x-forwarded-proto,
# x-request-id, x-envoy-original-method, te, content-type, grpc-timeout, ...).
ENVOY_ADDED_HEADERS = 16
ENVOY_ADDED_BYTES = 1 * KIB


class ConfigError(Exception):
    """A setting, the catalog or a file they name is wrong. The message says which one,
    what is wrong and how to fix it; the command prints it alone and exits non-zero."""


class ProviderSettings(BaseModel):
    """One registry provider's key (None: not set, the provider is disabled) and base URL."""

    model_config = ConfigDict(frozen=True)

    api_key: SecretStr | None = None
    base_url: str


@functools.cache
def _variables_of(entry: ProviderEntry) -> type[BaseSettings]:
    # A settings class per entry, so that pydantic-settings itself reads its variables
    # (case-insensitively, the first set alias winning) exactly as it reads every other setting.
    class Variables(BaseSettings):
        api_key: SecretStr | None = Field(default=None, validation_alias=AliasChoices(*entry.key_variables))
        base_url: str = Field(default=entry.default_base_url, validation_alias=entry.base_url_variable)

    return Variables


class ProviderVariables(PydanticBaseSettingsSource):
    """The settings source of ``Settings.providers``: every registry entry's variables."""

    def get_field_value(self, field: FieldInfo, field_name: str) -> tuple[Any, str, bool]:
        return None, field_name, False  # unused: __call__ reads the whole field at once

    def __call__(self) -> dict[str, Any]:
        return {"providers": {name: dict(_variables_of(entry)()) for name, entry in PROVIDERS.items()}}


class Tuning(BaseModel):
    """Sizes of pools and batches, in one place (``IMAGEGW_TUNING__<FIELD>``, for example
    ``IMAGEGW_TUNING__FAN_OUT_WIDTH=8``). The defaults are the values measured in
    ``bench/README.md``; change one against a benchmark, not by feel."""

    model_config = ConfigDict(frozen=True, extra="forbid")

    # PostgreSQL connections each server process keeps, and how many more it may open
    # under load (server.ledger.db). Every replica and worker has its own pool.
    database_pool_size: int = Field(default=10, ge=1, le=1000)
    database_max_overflow: int = Field(default=20, ge=0, le=1000)
    # SQLite: reader threads (each with its connection), and how many queued write
    # transactions the writer thread commits together at most (group commit).
    sqlite_readers: int = Field(default=4, ge=1, le=64)
    sqlite_writer_batch: int = Field(default=64, ge=1, le=10_000)
    # Each provider's HTTP client: connections at most (one aiohttp pool).
    upstream_max_connections: int = Field(default=512, ge=1, le=100_000)
    # Upstream calls one request makes at once where a provider makes one image per call
    # (Gemini, Stability, BFL fan out n).
    fan_out_width: int = Field(default=4, ge=1, le=10)
    # Rows per sweeper transaction: expired reservations released, idempotency keys deleted.
    sweep_batch: int = Field(default=500, ge=1, le=100_000)


DEFAULT_TUNING: Final = Tuning()


class Settings(BaseSettings):
    """All configuration of one imagegw process. See the README's configuration table."""

    # "__" reaches into the one nested group: IMAGEGW_TUNING__SWEEP_BATCH.
    model_config = SettingsConfigDict(env_prefix="IMAGEGW_", env_nested_delimiter="__", extra="ignore")

    # Network. Every listener binds to loopback unless the operator says otherwise.
    grpc_host: str = "127.0.0.1"
    grpc_port: int = 50051
    http_host: str = "127.0.0.1"
    http_port: int = 8080
    envoy_admin_port: int = 9901
    # Prometheus /metrics listener; 0 turns it off.
    metrics_host: str = "127.0.0.1"
    metrics_port: int = 9464
    public_base_url: str = ""
    # Server processes (server.workers): worker i listens on grpc_port + i, Envoy balances
    # across them, and the supervisor serves the group's metrics on metrics_port.
    workers: int = Field(default=1, ge=1, le=64)

    # State.
    var_dir: Path = Path("var")
    database_url: str = ""
    image_dir: Path | None = None

    # Secrets. Unset ones are generated on first start and kept in var/ (mode 0600), so
    # signed URLs and key hashes survive restarts; replicas must share explicit values.
    url_signing_secret: SecretStr | None = None
    key_hash_secret: SecretStr | None = None
    admin_token: SecretStr | None = None

    # Images.
    url_ttl_seconds: int = Field(default=3600, ge=60, le=7 * 24 * 3600)
    sweep_interval_seconds: float = Field(default=300, gt=0)
    catalog_file: Path | None = None
    default_model: str = "local-1"
    render_workers: int = Field(default=2, ge=1, le=64)

    # Limits. Each is one setting that sizes both hops, Envoy and the gRPC server (see
    # server.envoy and server.app), so a request Envoy lets through the server accepts.
    # Request headers, the URL included (Envoy counts the request line's URL with them).
    max_request_header_kib: int = Field(default=16, ge=8, le=96)
    max_request_headers: int = Field(default=100, ge=32, le=1000)
    max_request_bytes: int = Field(default=4 * MIB, ge=64 * 1024)
    max_response_bytes: int = Field(default=256 * MIB, ge=MIB)
    request_timeout_seconds: float = Field(default=600, ge=1)
    # A streamed answer quiet this long gets an SSE comment line, so that no proxy's idle
    # timeout (often 60 s) cuts a generation that is still running.
    stream_keepalive_seconds: float = Field(default=15, gt=0)
    # Uploads (edits, variations), enforced by the server as they stream in: OpenAI's
    # own limits by default (16 images of up to 50 MB). Files above upload_spool_bytes
    # wait on disk, not in memory; so do a JSON edit's fetched images, which count against
    # upload_max_bytes together.
    upload_max_file_bytes: int = Field(default=50 * MIB, ge=MIB)
    upload_max_images: int = Field(default=16, ge=1, le=16)
    upload_max_bytes: int = Field(default=16 * 50 * MIB + MIB, ge=MIB)
    upload_max_json_bytes: int = Field(default=128 * MIB, ge=MIB)
    upload_spool_bytes: int = Field(default=MIB, ge=0)
    # Pixels of one input image or mask: a 20 KB PNG can hold 13000x13000 pixels, which
    # decode to gigabytes. 50 megapixels covers a 48-megapixel phone photo.
    upload_max_pixels: int = Field(default=50_000_000, ge=1_000_000)
    # Typed gRPC edits carry their images in one message, up to this size.
    max_grpc_message_bytes: int = Field(default=64 * MIB, ge=MIB)
    # JSON edits' image URLs: hosts or networks (comma-separated) that may be fetched even
    # though they are private or local, and how long one fetch may take.
    image_url_allowlist: str = ""
    image_url_timeout_seconds: float = Field(default=20, gt=0)
    shutdown_grace_seconds: float = Field(default=30, ge=0)
    shutdown_drain_seconds: float = Field(default=2, ge=0)

    # Money.
    reservation_ttl_seconds: int = Field(default=1800, ge=60)
    # A crashed request's reservation is released this long after its deadline.
    reservation_grace_seconds: float = Field(default=30, ge=0)
    dev_account_balance_usd: str = "100.000000"
    # How long a process believes an API key it read from the database. Paid requests
    # check the key again in their admission transaction, so a revocation stops them at
    # once on every replica; within this bound, other replicas may still answer the key's
    # free calls (model listings). 0 reads the database on every call.
    api_key_cache_seconds: float = Field(default=10, ge=0, le=3600)

    # Rate limits of each API key, per minute (server.ratelimit); 0 means unlimited.
    # Accounts can override them (`imagegw accounts limits`).
    rate_limit_rpm: int = Field(default=600, ge=0, le=1_000_000)
    rate_limit_ipm: int = Field(default=3000, ge=0, le=1_000_000)
    # How long an Idempotency-Key's answer is kept and replayed (server.idempotency).
    idempotency_ttl_seconds: int = Field(default=24 * 3600, ge=60, le=7 * 24 * 3600)

    # Upstream providers: one entry per provider of the registry (server.providers.PROVIDERS),
    # read from its own variables by ProviderVariables below. A provider is enabled when its
    # key is set.
    providers: dict[str, ProviderSettings] = Field(default_factory=dict)
    # Largest upstream answer read into memory (provider JSON with base64 images).
    max_upstream_response_bytes: int = Field(default=128 * MIB, ge=MIB)
    # How many upstream answers above 256 KiB are in memory at once (read, decoded and,
    # for REST, until written); the others wait their turn (server.providers.gate). Peak
    # memory follows this number.
    max_large_upstream_answers: int = Field(default=16, ge=1, le=4096)

    # Pool and batch sizes (the Tuning group above).
    tuning: Tuning = DEFAULT_TUNING

    # Where images live: "" is the folder (image_dir); s3://bucket/prefix an S3-compatible
    # store (server.storage.s3) configured by the standard AWS variables below.
    image_store_url: str = ""
    # "gateway": image URLs are the gateway's signed links (GetImageFile, any replica);
    # "presigned": the store's own presigned URLs, so image bytes bypass the gateway.
    url_mode: Literal["gateway", "presigned"] = "gateway"
    aws_endpoint_url: str | None = Field(
        default=None, validation_alias=AliasChoices("AWS_ENDPOINT_URL_S3", "AWS_ENDPOINT_URL")
    )
    aws_region: str | None = Field(default=None, validation_alias=AliasChoices("AWS_REGION", "AWS_DEFAULT_REGION"))
    aws_access_key_id: str | None = Field(default=None, validation_alias="AWS_ACCESS_KEY_ID")
    aws_secret_access_key: SecretStr | None = Field(default=None, validation_alias="AWS_SECRET_ACCESS_KEY")

    # Processes started by `imagegw dev`.
    envoy_bin: str = ""
    # Envoy's overload manager: near this heap size it stops taking new requests (503).
    envoy_max_heap_bytes: int = Field(default=2048 * MIB, ge=64 * MIB)
    envoy_config_out: Path | None = None
    descriptor_file: Path = Path("build/imagegw.pb")
    log_level: str = "INFO"

    @classmethod
    def settings_customise_sources(
        cls,
        settings_cls: type[BaseSettings],
        init_settings: PydanticBaseSettingsSource,
        env_settings: PydanticBaseSettingsSource,
        dotenv_settings: PydanticBaseSettingsSource,
        file_secret_settings: PydanticBaseSettingsSource,
    ) -> tuple[PydanticBaseSettingsSource, ...]:
        # Constructor arguments still win, merged per provider and field:
        # Settings(providers={"openai": {"api_key": "sk-..."}}) keeps the others from the environment.
        return (init_settings, ProviderVariables(settings_cls), env_settings, dotenv_settings, file_secret_settings)

    @field_validator("public_base_url")
    @classmethod
    def _strip_slash(cls, value: str) -> str:
        return value.rstrip("/")

    @property
    def base_url(self) -> str:
        """Where clients reach Envoy; signed image URLs start with it."""
        return self.public_base_url or f"http://{self.http_host}:{self.http_port}"

    @property
    def max_metadata_bytes(self) -> int:
        """The gRPC server's metadata limit (soft and hard alike): everything Envoy may pass
        on for a request within the header limits. Envoy forwards the client's headers
        (at most ``max_request_header_kib``), repeats the URL as ``x-envoy-original-path``
        (at most as much again), and adds a few of its own; grpc-core charges 32 bytes per
        entry besides."""
        header_bytes = self.max_request_header_kib * KIB
        entries = self.max_request_headers + ENVOY_ADDED_HEADERS
        return 2 * header_bytes + entries * METADATA_ENTRY_OVERHEAD + ENVOY_ADDED_BYTES

    @property
    def grpc_target(self) -> str:
        return f"{self.grpc_host}:{self.grpc_port}"

    @property
    def grpc_targets(self) -> list[str]:
        """Every worker's gRPC address (one unless ``workers`` > 1)."""
        return [f"{self.grpc_host}:{self.grpc_port + i}" for i in range(self.workers)]

    @property
    def resolved_database_url(self) -> str:
        return self.database_url or f"sqlite+aiosqlite:///{(self.var_dir / 'imagegw.db').resolve()}"

    @property
    def resolved_image_dir(self) -> Path:
        return self.image_dir or self.var_dir / "images"

    def secret(self, name: str) -> str:
        """Returns the named secret, generating and persisting it under var/ when unset.

        Created atomically: the value is written whole to a temporary file, which is then
        linked into place. ``link`` fails when the name exists, so of processes starting
        together (workers, replicas on one var/) exactly one creates it and the others
        read it, and no reader ever sees an empty or partial file.

        Raises:
            RuntimeError: the secret's file exists but is empty (left by an older version
                that could crash between creating and writing it); delete it.
        """
        configured: SecretStr | None = getattr(self, name)
        if configured is not None and configured.get_secret_value():
            return configured.get_secret_value()
        path = self.var_dir / "secrets" / name
        try:
            return _read_secret(path)
        except FileNotFoundError:
            pass
        path.parent.mkdir(parents=True, exist_ok=True, mode=0o700)
        value = secrets.token_urlsafe(32)
        fd, temporary = tempfile.mkstemp(dir=path.parent, prefix=f".{name}.")  # mode 0600
        try:
            with os.fdopen(fd, "w") as handle:
                handle.write(value)
                handle.flush()
                os.fsync(handle.fileno())
            try:
                os.link(temporary, path)
            except FileExistsError:
                return _read_secret(path)
        finally:
            os.unlink(temporary)
        return value


def _read_secret(path: Path) -> str:
    value = path.read_text().strip()
    if not value:
        raise ConfigError(f"the secret file {path} is empty; delete it and a new secret is generated")
    return value


def describe_settings_error(error: ValidationError) -> str:
    """One line per invalid setting, named as the operator sets it (``IMAGEGW_...``), with
    the value unless it may be a credential."""
    lines = []
    for problem in error.errors():
        # A nested setting (IMAGEGW_TUNING__...) has a path; an alias is named as it is set.
        path = [str(part) for part in problem["loc"]]
        name = path[0] if path and path[0].isupper() else "IMAGEGW_" + "__".join(path).upper()
        value = problem.get("input")
        secret = any(part in name for part in ("KEY", "SECRET", "TOKEN"))
        shown = f"={value!r}" if isinstance(value, str | int | float) and not secret else ""
        lines.append(f"invalid setting {name}{shown}: {problem['msg']}")
    return "\n".join(lines)
