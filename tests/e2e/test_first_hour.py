"""A new user's first hour: `imagegw dev` (what `make run` runs) starts, its banner's
commands and the README's "Calling it" commands run as pasted (curl, the Python SDK,
grpcurl list/describe/call), as do its streaming, edit and idempotent-retry examples, the
banner's examples use a model the running catalog serves, and a configuration error prints
its message alone and exits non-zero."""

from __future__ import annotations

import asyncio
import contextlib
import json
import os
import queue
import re
import subprocess
import threading
import time
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

import pytest

from server.catalog import load_catalog
from server.dev import stop_process
from tests.fakes.openai_fake import DEFAULT_KEY, start_openai_fake
from tests.stack import DESCRIPTOR, ROOT, free_port

pytestmark = pytest.mark.e2e

README = ROOT / "README.md"
BANNER_END = "Ctrl-C stops both processes."


@dataclass
class Dev:
    """`imagegw dev` running in ``cwd``, laid out like a checkout after `make install`."""

    process: subprocess.Popen[str]
    cwd: Path
    banner: str
    http_port: int
    grpc_port: int


def dev_env(**settings: str) -> dict[str, str]:
    env = {key: value for key, value in os.environ.items() if not key.startswith("IMAGEGW_")}
    env.update(
        IMAGEGW_HTTP_PORT=str(free_port()),
        IMAGEGW_GRPC_PORT=str(free_port()),
        IMAGEGW_ENVOY_ADMIN_PORT=str(free_port()),
        IMAGEGW_METRICS_PORT=str(free_port()),
        # The checkout's descriptor (built by `make descriptor`); everything else is the
        # embedded default, state in ./var.
        IMAGEGW_DESCRIPTOR_FILE=str(DESCRIPTOR),
        IMAGEGW_SHUTDOWN_DRAIN_SECONDS="0",
    )
    env.update({f"IMAGEGW_{key.upper()}": value for key, value in settings.items()})
    return env


def start_dev(cwd: Path, **settings: str) -> Dev:
    cwd.mkdir(parents=True, exist_ok=True)
    (cwd / ".venv").symlink_to(ROOT / ".venv")
    env = dev_env(**settings)
    process = subprocess.Popen(
        [str(cwd / ".venv" / "bin" / "imagegw"), "dev"], cwd=cwd, env=env, text=True,
        stdout=subprocess.PIPE, stderr=(cwd / "dev.log").open("w"),
    )
    assert process.stdout is not None
    lines: queue.Queue[str] = queue.Queue()
    # Envoy's access log shares this stdout: keep reading it, or a full pipe stalls Envoy.
    threading.Thread(target=lambda: [lines.put(line) for line in process.stdout], daemon=True).start()  # type: ignore[union-attr]
    seen = ""
    deadline = time.monotonic() + 90
    while BANNER_END not in seen:
        assert process.poll() is None, (cwd / "dev.log").read_text()
        assert time.monotonic() < deadline, "no banner in 90 s:\n" + seen
        with contextlib.suppress(queue.Empty):
            seen += lines.get(timeout=1)
    banner = seen[seen.index("imagegw is running.") :]
    return Dev(process, cwd, banner, int(env["IMAGEGW_HTTP_PORT"]), int(env["IMAGEGW_GRPC_PORT"]))


@pytest.fixture
def dev(tmp_path: Path) -> Iterator[Dev]:
    running = start_dev(tmp_path / "checkout")
    try:
        yield running
    finally:
        assert stop_process(running.process, timeout=60) == 0


def shell_commands(block: str) -> list[str]:
    """The commands of a shell block, continuation lines joined, blank lines dropped."""
    return [command for command in re.sub(r"\\\n\s*", "", block).splitlines() if command.strip()]


def run_shell(commands: list[str], cwd: Path) -> list[str]:
    """Runs the commands in one bash session (variables carry over), stopping at the first
    failure; returns each command's output."""
    marker = "=====imagegw-test-marker====="
    script = "set -euo pipefail\n" + "".join(f"echo {marker}\n{command}\n" for command in commands)
    result = subprocess.run(["bash", "-c", script], cwd=cwd, capture_output=True, text=True, timeout=300)
    assert result.returncode == 0, result.stdout[-2000:] + result.stderr[-2000:]
    return result.stdout.split(marker + "\n")[1:]


def readme_section(title: str) -> list[tuple[str, str]]:
    """The fenced code blocks of one README section: (language, text)."""
    text = README.read_text()
    section = text[text.index(f"## {title}\n") :]
    section = section[: section.index("\n## ", 4)]
    return re.findall(r"```(\w*)\n(.*?)```", section, flags=re.S)


def test_the_banner_commands_run_as_pasted(dev: Dev) -> None:
    banner = dev.banner
    assert f"http://127.0.0.1:{dev.http_port}/v1" in banner
    start = banner.index("  curl ")
    curl = banner[start : banner.index("\n\n", start)].strip()
    python = next(line.strip() for line in banner.splitlines() if " -c 'from openai import OpenAI" in line)
    grpcurl = re.search(r"try: (.*? list)\)", banner)
    assert grpcurl is not None, banner
    curl_out, python_out, grpcurl_out = run_shell([curl, python, grpcurl.group(1)], dev.cwd)
    answer = json.loads(curl_out)
    assert len(answer["data"]) == 1 and answer["data"][0]["url"].startswith(f"http://127.0.0.1:{dev.http_port}/v1/images/files/")
    assert python_out.startswith(f"http://127.0.0.1:{dev.http_port}/v1/images/files/")
    assert "imagegw.v1.ImageService" in grpcurl_out.split()
    # The examples name the model this catalog serves by default.
    assert '"model": "local-1"' in curl and 'model="local-1"' in python


def here(dev: Dev, text: str) -> str:
    """The README's text with its default ports replaced by this stack's free ports."""
    ports = {"127.0.0.1:8080": f"127.0.0.1:{dev.http_port}", "127.0.0.1:50051": f"127.0.0.1:{dev.grpc_port}"}
    for default, actual in ports.items():
        text = text.replace(default, actual)
    return text


def run_python(dev: Dev, code: str) -> str:
    """Runs a README Python block with the checkout's venv, as the README says; its stdout."""
    result = subprocess.run([".venv/bin/python", "-c", here(dev, code)], cwd=dev.cwd, capture_output=True, text=True, timeout=120)
    assert result.returncode == 0, result.stderr
    return result.stdout


def test_the_readme_calling_it_commands_run_as_pasted(dev: Dev) -> None:
    blocks = readme_section("Calling it")
    assert [language for language, _ in blocks] == ["", "json", "python", ""]
    shell = shell_commands(here(dev, blocks[0][1])) + shell_commands(here(dev, blocks[3][1]))
    assert [command.split()[0] for command in shell] == ["KEY=$(python3", "curl", *[".venv/bin/grpcurl"] * 3]
    _, curl_out, listed, described, called = run_shell(shell, dev.cwd)
    assert json.loads(curl_out)["data"][0]["revised_prompt"].startswith("A watercolor painting of a mountain lake")
    assert {"imagegw.v1.ImageService", "imagegw.v1.ModelService", "grpc.health.v1.Health"} <= set(listed.split())
    assert "rpc GenerateImages ( .imagegw.v1.GenerateImagesRequest )" in described
    images = json.loads(called)["data"]
    assert len(images) == 1 and images[0]["b64_json"].startswith("iVBORw0KGgo")  # a PNG
    assert re.fullmatch(r"2 images of \d+ base64 characters\n", run_python(dev, blocks[2][1]))


def test_the_readme_streaming_edit_and_retry_examples_run_as_pasted(dev: Dev) -> None:
    """"Streaming", "Edits" and "Idempotent retries": the Python and curl blocks, with the
    four pictures the edit examples call the caller's own."""
    from PIL import Image

    Image.new("RGB", (512, 512), (200, 120, 60)).save(dev.cwd / "room.png")
    Image.new("RGB", (128, 128), (30, 200, 60)).save(dev.cwd / "lamp.png")
    mask = Image.new("RGBA", (512, 512), (0, 0, 0, 255))
    mask.paste((0, 0, 0, 0), (100, 100, 300, 300))  # transparent: where to edit
    mask.save(dev.cwd / "mask.png")
    Image.new("RGB", (256, 256), (20, 20, 240)).save(dev.cwd / "logo.png")
    blocks = readme_section("API surface")
    assert [language for language, _ in blocks] == ["python", "", "python", ""]
    streaming, _, edits, edit_curls = (text for _, text in blocks)
    events = run_python(dev, streaming).splitlines()
    assert [line.split()[0] for line in events] == ["image_generation.partial_image"] * 2 + ["image_generation.completed"]
    # The edit block's `client` is the streaming block's.
    client = streaming[: streaming.index("stream = ")]
    shown = run_python(dev, client + edits + "print(len(result.data), [e.type for e in stream], len(variation.data))\n")
    assert shown == "1 ['image_edit.partial_image', 'image_edit.partial_image', 'image_edit.completed'] 2\n"
    key = shell_commands(readme_section("Calling it")[0][1])[0]
    assert key.startswith("KEY=")
    _, multipart, json_edit = run_shell([key, *shell_commands(here(dev, edit_curls))], dev.cwd)
    for answer in (multipart, json_edit):
        [image] = json.loads(answer)["data"]
        assert image["url"].startswith(f"http://127.0.0.1:{dev.http_port}/v1/images/files/")
    [retry, _] = readme_section("Idempotent retries")[:2]
    _, first, again = run_shell([key, *shell_commands(here(dev, retry[1])) * 2], dev.cwd)
    assert first == again and json.loads(first)["data"][0]["b64_json"].startswith("iVBORw0KGgo")


async def test_the_banner_example_uses_a_model_the_running_catalog_serves(tmp_path: Path) -> None:
    """A catalog without local-1 (only an OpenAI model, pointed at the fake OpenAI): the
    banner's commands use that model, and work."""
    catalog = (ROOT / "server" / "catalog.toml").read_text()
    row = re.search(r'\[\[models\]\]\nid = "gpt-image-1"\n.*?\n\n', catalog, flags=re.S)
    assert row is not None
    (tmp_path / "catalog.toml").write_text(row.group(0))
    async with start_openai_fake() as fake:
        running = start_dev(
            tmp_path / "checkout", catalog_file=str(tmp_path / "catalog.toml"), openai_api_key=DEFAULT_KEY,
            openai_base_url=fake.base_url,
        )
        try:
            start = running.banner.index("  curl ")
            curl = running.banner[start : running.banner.index("\n\n", start)].strip()
            assert '"model": "gpt-image-1"' in curl
            # In a thread: the fake OpenAI answers on this event loop.
            (answer,) = await asyncio.to_thread(run_shell, [curl], running.cwd)
        finally:
            assert stop_process(running.process, timeout=60) == 0
    assert len(json.loads(answer)["data"]) == 1
    assert len(fake.generation_requests) == 1


def bad_catalog(tmp_path: Path) -> Path:
    path = tmp_path / "bad-catalog.toml"
    path.write_text((ROOT / "server" / "catalog.toml").read_text().replace('default_size = "1024x1024"', 'default_size = "999x999"', 1))
    return path


BAD_CATALOG_MESSAGE = "model 'local-1': model: Value error, default_size '999x999' must be one of the concrete sizes"


@pytest.mark.parametrize(
    ("settings", "message"),
    [
        ({"workers": "0"}, "imagegw: invalid setting IMAGEGW_WORKERS='0': Input should be greater than or equal to 1"),
        ({"max_request_bytes": "lots"}, "imagegw: invalid setting IMAGEGW_MAX_REQUEST_BYTES='lots': Input should be a valid integer, unable to parse string as an integer"),
        ({"catalog_file": "/nonexistent/catalog.toml"}, "imagegw: cannot read catalog /nonexistent/catalog.toml: [Errno 2] No such file or directory: '/nonexistent/catalog.toml'"),
        ({"catalog_file": "BAD"}, BAD_CATALOG_MESSAGE),
        ({"request_timeout_seconds": "100"}, "imagegw: models {slow} have timeout_seconds above IMAGEGW_REQUEST_TIMEOUT_SECONDS (100 s); raise the request timeout or lower the models' timeouts"),
    ],
)
def test_a_configuration_error_prints_its_message_alone_and_exits_non_zero(
    tmp_path: Path, settings: dict[str, str], message: str
) -> None:
    if settings.get("catalog_file") == "BAD":
        settings = {"catalog_file": str(bad_catalog(tmp_path))}
    env = dev_env(var_dir=str(tmp_path / "var"), **settings)
    result = subprocess.run(
        [str(ROOT / ".venv" / "bin" / "imagegw"), "serve"], env=env, cwd=tmp_path, capture_output=True, text=True, timeout=60
    )
    assert result.returncode == 2
    errors = [line for line in result.stderr.splitlines() if not line.startswith("{")]  # JSON lines are logs
    slow = [spec.id for spec in load_catalog() if spec.is_image and spec.timeout_seconds > 100]
    message = message.replace("{slow}", ", ".join(slow))
    if message == BAD_CATALOG_MESSAGE:
        assert errors == [f"imagegw: catalog {settings['catalog_file']}, {message}"]
    else:
        assert errors == [message]
    assert "Traceback" not in result.stderr


def test_imagegw_dev_reports_a_configuration_error_without_a_traceback(tmp_path: Path) -> None:
    path = bad_catalog(tmp_path)
    env = dev_env(var_dir=str(tmp_path / "var"), catalog_file=str(path))
    result = subprocess.run(
        [str(ROOT / ".venv" / "bin" / "imagegw"), "dev"], env=env, cwd=tmp_path, capture_output=True, text=True, timeout=120
    )
    assert result.returncode == 1
    errors = [line for line in result.stderr.splitlines() if not line.startswith("{")]
    assert errors == [f"imagegw: catalog {path}, {BAD_CATALOG_MESSAGE}", "imagegw dev: the gRPC server exited with status 2"]
    assert "Traceback" not in result.stderr
