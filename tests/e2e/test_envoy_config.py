"""The rendered Envoy config is valid for the real binary, follows the settings, and renders
the same from a plain (non-editable) install as from the checkout."""

from __future__ import annotations

import os
import subprocess
import sys
import sysconfig
import venv
from pathlib import Path
from typing import Any

import pytest
import yaml

from server.envoy import edge_file, envoy_binary, render_envoy_config, write_envoy_config
from tests.stack import DESCRIPTOR, ROOT, base_env, settings_from

pytestmark = pytest.mark.e2e


def named(entries: list[dict[str, Any]], name: str) -> dict[str, Any]:
    return next(entry for entry in entries if entry.get("name") == name)


def validate(binary: str, path: Path) -> None:
    result = subprocess.run(
        [binary, "--mode", "validate", "-c", str(path), "--disable-hot-restart"],
        capture_output=True, text=True, timeout=60,
    )
    assert result.returncode == 0, result.stdout + result.stderr
    assert f"configuration '{path}' OK" in result.stdout + result.stderr
    # No deprecated or work-in-progress options: they may change under us.
    assert "Deprecated field" not in result.stdout + result.stderr
    assert "work-in-progress" not in result.stdout + result.stderr


def test_envoy_validates_the_rendered_config(tmp_path: Path) -> None:
    settings = settings_from(base_env(tmp_path, max_request_bytes=1048576, request_timeout_seconds=900))
    path = write_envoy_config(settings, tmp_path / "envoy.yaml", upstreams=[("127.0.0.1", 50051), ("127.0.0.1", 50052)])
    validate(envoy_binary(settings), path)


def test_the_packaged_config_runs_as_is_from_the_repository_root(tmp_path: Path) -> None:
    """server/edge/envoy.yaml names its Lua file and descriptor relative to the checkout."""
    if not DESCRIPTOR.exists():
        pytest.fail("build/imagegw.pb is missing: run `make descriptor`", pytrace=False)
    settings = settings_from(base_env(tmp_path))
    result = subprocess.run(
        [envoy_binary(settings), "--mode", "validate", "-c", "server/edge/envoy.yaml", "--disable-hot-restart"],
        capture_output=True, text=True, timeout=60, cwd=ROOT,
    )
    assert result.returncode == 0, result.stdout + result.stderr


def test_limits_timeouts_and_ports_come_from_settings(tmp_path: Path) -> None:
    settings = settings_from(
        base_env(
            tmp_path, max_request_bytes=1048576, request_timeout_seconds=900, max_request_header_kib=32,
            max_request_headers=150, envoy_max_heap_bytes=1073741824,
        )
    )
    config = render_envoy_config(settings)
    assert config["admin"]["address"]["socket_address"] == {"address": "127.0.0.1", "port_value": settings.envoy_admin_port}
    heap = named(config["overload_manager"]["resource_monitors"], "envoy.resource_monitors.fixed_heap")
    assert heap["typed_config"]["max_heap_size_bytes"] == 1073741824
    listener = named(config["static_resources"]["listeners"], "public")
    assert listener["address"]["socket_address"]["port_value"] == settings.http_port
    hcm = named(listener["filter_chains"][0]["filters"], "envoy.filters.network.http_connection_manager")["typed_config"]
    assert (hcm["max_request_headers_kb"], hcm["common_http_protocol_options"]["max_headers_count"]) == (32, 150)
    messages = {
        mapper["filter"]["status_code_filter"]["comparison"]["value"]["default_value"]: mapper["body_format_override"]["json_format"]["error"]["message"]
        for mapper in hcm["local_reply_config"]["mappers"]
        if "status_code_filter" in mapper["filter"] and "json_format" in mapper["body_format_override"]
    }
    assert messages[431] == (
        "Request headers too large: this server accepts at most 32 KiB of request headers, the URL included, "
        "in at most 150 header fields."
    )
    assert messages[413] == "Request body too large: this server accepts at most 1048576 bytes."
    filters = {f["name"]: f["typed_config"] for f in hcm["http_filters"]}
    assert list(filters) == [
        "envoy.filters.http.buffer", "envoy.filters.http.lua", "envoy.filters.http.grpc_json_transcoder",
        "envoy.filters.http.router",
    ]
    assert filters["envoy.filters.http.buffer"]["max_request_bytes"] == 1048576
    # The Lua source is inlined: the rendered file needs nothing from the source tree.
    assert filters["envoy.filters.http.lua"]["default_source_code"] == {"inline_string": edge_file("openai_compat.lua")}
    transcoder = filters["envoy.filters.http.grpc_json_transcoder"]
    assert transcoder["max_request_body_size"] == 1048576
    assert transcoder["max_response_body_size"] == settings.max_response_bytes
    assert transcoder["services"] == ["imagegw.v1.ImageService", "imagegw.v1.ModelService"]
    routes = {route["name"]: route for route in named(hcm["route_config"]["virtual_hosts"], "imagegw")["routes"]}
    for name, prefix in (
        ("generate", "/imagegw.v1.ImageService/GenerateImages"),
        ("edit", "/imagegw.v1.ImageService/EditImages"),
        ("variation", "/imagegw.v1.ImageService/CreateImageVariation"),
    ):
        assert routes[name]["match"]["prefix"] == prefix
        assert (routes[name]["route"]["timeout"], routes[name]["route"]["idle_timeout"]) == ("900s", "900s")
        assert routes[name]["route"]["max_stream_duration"] == {"max_stream_duration": "900s", "grpc_timeout_header_max": "900s"}
    for name in ("edits-upload", "variations-upload"):
        assert (routes[name]["route"]["timeout"], routes[name]["route"]["idle_timeout"]) == ("900s", "900s")
    # The HCM's own idle timeout is shorter: only those routes may be silent long. The whole
    # request, an upload included, must arrive within the request timeout.
    assert (hcm["stream_idle_timeout"], hcm["request_timeout"]) == ("60s", "900s")
    thresholds = named(config["static_resources"]["clusters"], "imagegw")["circuit_breakers"]["thresholds"][0]
    assert min(thresholds["max_requests"], thresholds["max_pending_requests"]) >= 4096


def test_a_plain_install_renders_the_config_without_the_checkout(tmp_path: Path) -> None:
    """A non-editable install in a fresh venv: `imagegw envoy-config` renders the same config
    from the package data, run from a directory that holds no source tree."""
    wheels = tmp_path / "wheels"
    subprocess.run(
        [sys.executable, "-m", "pip", "wheel", "--no-deps", "--quiet", "--wheel-dir", str(wheels), str(ROOT)],
        check=True, timeout=300, capture_output=True,
    )
    target = tmp_path / "venv"
    venv.EnvBuilder(with_pip=False).create(target)
    python = target / "bin" / "python"
    (wheel,) = wheels.glob("imagegw-*.whl")
    subprocess.run(
        [sys.executable, "-m", "pip", "--python", str(python), "install", "--no-deps", "--quiet", str(wheel)],
        check=True, timeout=300, capture_output=True,
    )
    # Its dependencies come from the test venv's site-packages (a path, so its editable
    # install of imagegw is not picked up); imagegw itself only from the fresh install.
    site = Path(sysconfig.get_paths(vars={"base": str(target), "platbase": str(target)})["purelib"])
    (site / "dependencies.pth").write_text(sysconfig.get_paths()["purelib"] + "\n")
    elsewhere = tmp_path / "elsewhere"
    elsewhere.mkdir()
    env = {**base_env(tmp_path / "var"), "PATH": os.environ["PATH"]}
    where = subprocess.run(
        [python, "-c", "import server, sys; print(server.__file__)"], cwd=elsewhere, env=env,
        capture_output=True, text=True, check=True,
    )
    assert where.stdout.strip().startswith(str(site)), where.stdout
    rendered = subprocess.run(
        [target / "bin" / "imagegw", "envoy-config"], cwd=elsewhere, env=env, capture_output=True, text=True, timeout=60
    )
    assert rendered.returncode == 0, rendered.stderr
    with_install = yaml.safe_load(rendered.stdout)
    with_checkout = render_envoy_config(settings_from(env))
    assert with_install == with_checkout
    path = tmp_path / "installed-envoy.yaml"
    path.write_text(rendered.stdout)
    validate(envoy_binary(settings_from(env)), path)
