"""The rendered Envoy config is valid for the real binary and follows the settings."""

from __future__ import annotations

import subprocess
from pathlib import Path

import pytest

from server.envoy import envoy_binary, render_envoy_config, write_envoy_config
from tests.stack import base_env, settings_from

pytestmark = pytest.mark.e2e


def test_envoy_validates_the_rendered_config(tmp_path: Path) -> None:
    settings = settings_from(base_env(tmp_path, max_request_bytes=1048576, request_timeout_seconds=900))
    path = write_envoy_config(settings, tmp_path / "envoy.yaml", upstreams=[("127.0.0.1", 50051), ("127.0.0.1", 50052)])
    result = subprocess.run(
        [envoy_binary(settings), "--mode", "validate", "-c", str(path), "--disable-hot-restart"],
        capture_output=True,
        text=True,
        timeout=60,
    )
    assert result.returncode == 0, result.stdout + result.stderr
    assert f"configuration '{path}' OK" in result.stdout + result.stderr


def test_limits_timeouts_and_ports_come_from_settings(tmp_path: Path) -> None:
    settings = settings_from(base_env(tmp_path, max_request_bytes=1048576, request_timeout_seconds=900))
    config = render_envoy_config(settings)
    assert config["admin"]["address"]["socket_address"] == {"address": "127.0.0.1", "port_value": settings.envoy_admin_port}
    listener = config["static_resources"]["listeners"][0]
    assert listener["address"]["socket_address"]["port_value"] == settings.http_port
    hcm = listener["filter_chains"][0]["filters"][0]["typed_config"]
    filters = {f["name"]: f["typed_config"] for f in hcm["http_filters"]}
    assert filters["envoy.filters.http.buffer"]["max_request_bytes"] == 1048576
    transcoder = filters["envoy.filters.http.grpc_json_transcoder"]
    assert transcoder["max_request_body_size"] == 1048576
    assert transcoder["max_response_body_size"] == settings.max_response_bytes
    assert transcoder["services"] == ["imagegw.v1.ImageService", "imagegw.v1.ModelService"]
    routes = {r["match"]["prefix"]: r["route"] for r in hcm["route_config"]["virtual_hosts"][0]["routes"]}
    for rpc in ("GenerateImages", "EditImages", "CreateImageVariation"):
        route = routes[f"/imagegw.v1.ImageService/{rpc}"]
        assert route["timeout"] == "900s"
        assert route["max_stream_duration"] == {"max_stream_duration": "900s", "grpc_timeout_header_max": "900s"}
    assert routes["/v1/images/edits"]["timeout"] == routes["/v1/images/variations"]["timeout"] == "900s"
    thresholds = config["static_resources"]["clusters"][0]["circuit_breakers"]["thresholds"][0]
    assert min(thresholds["max_requests"], thresholds["max_pending_requests"]) >= 4096
