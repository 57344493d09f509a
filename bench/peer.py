"""The Python peer: LiteLLM's proxy, measured in the same run as imagegw.

LiteLLM is a widely used Python gateway in front of OpenAI-shaped APIs. The bench runs
its proxy as its documentation deploys it without a database: ``litellm --config ...
--num_workers 2`` (uvicorn, one worker process per core of this 2-core machine), with
one model, ``gpt-image-1``, served by the same fake upstream as every other row and the
same OpenAI request. Two settings differ from a bare config, both so that it can answer
that request at all on an offline machine:

* ``drop_params: true``: LiteLLM refuses ``response_format`` for GPT image models (they
  always answer base64) with a 400; with it, LiteLLM drops the field and answers
  ``b64_json``, as imagegw does.
* ``LITELLM_LOCAL_MODEL_COST_MAP=True``: at start-up LiteLLM fetches its price list from
  GitHub (three attempts with back-off when there is no network); this reads the copy
  in its wheel.

It is installed by the bench into its own virtualenv under ``var/`` (never a project
dependency), pinned, once; ``make clean`` removes it with the rest of ``var/``.
"""

from __future__ import annotations

import contextlib
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import httpx

from bench.procs import spawn, wait_for_port

__all__ = ["LITELLM_VERSION", "MASTER_KEY", "PeerProcess", "install_litellm", "start_litellm"]

# 1.108.7 is the version the issue measured before (1.107.0 was withdrawn from PyPI
# after its release was compromised; this one came after it).
LITELLM_VERSION = "1.108.7"
MASTER_KEY = "sk-litellm-bench"
WORKERS = 2
INSTALL_TIMEOUT_S = 900.0
START_TIMEOUT_S = 120.0


def install_litellm(var_dir: Path, log: Path) -> Path:
    """The ``litellm`` executable of a virtualenv with ``litellm[proxy]==LITELLM_VERSION``,
    made on first use (about 750 MB, a minute with a warm pip cache)."""
    venv = var_dir / f"litellm-{LITELLM_VERSION}"
    exe = venv / "bin" / "litellm"
    stamp = venv / ".installed"
    if stamp.exists() and exe.exists():
        return exe
    print(f"bench: installing litellm[proxy]=={LITELLM_VERSION} into {venv} (once)", file=sys.stderr, flush=True)
    log.parent.mkdir(parents=True, exist_ok=True)
    with log.open("ab") as out:
        for argv in (
            [sys.executable, "-m", "venv", "--clear", str(venv)],
            [str(venv / "bin" / "python"), "-m", "pip", "install", "-q", f"litellm[proxy]=={LITELLM_VERSION}"],
        ):
            try:
                subprocess.run(argv, stdout=out, stderr=subprocess.STDOUT, check=True, timeout=INSTALL_TIMEOUT_S)
            except (subprocess.CalledProcessError, subprocess.TimeoutExpired) as exc:
                raise RuntimeError(f"installing LiteLLM failed ({exc}); see {log}") from exc
    stamp.write_text(LITELLM_VERSION + "\n")
    return exe


def write_config(path: Path, *, upstream_base_url: str, upstream_key: str, model: str) -> Path:
    """One model on the fake upstream, a master key, no database, ``drop_params``."""
    path.write_text(
        "model_list:\n"
        f"  - model_name: {model}\n"
        "    litellm_params:\n"
        f"      model: openai/{model}\n"
        f"      api_base: {upstream_base_url}\n"
        f"      api_key: {upstream_key}\n"
        "general_settings:\n"
        f"  master_key: {MASTER_KEY}\n"
        "litellm_settings:\n"
        "  drop_params: true\n"
    )
    return path


class PeerProcess:
    """The running proxy: its main process and the processes it started (uvicorn's
    workers, multiprocessing's resource tracker), whose CPU and memory are summed."""

    def __init__(self, process: subprocess.Popen[bytes], port: int) -> None:
        self.process = process
        self.port = port
        self.pids: list[int] = [process.pid]

    def refresh_pids(self) -> list[int]:
        """The main process and all its descendants, now."""
        found: list[int] = []
        todo = [self.process.pid]
        while todo:
            pid = todo.pop()
            found.append(pid)
            with contextlib.suppress(OSError):
                todo += [int(child) for child in Path(f"/proc/{pid}/task/{pid}/children").read_text().split()]
        self.pids = found
        return found

    def stop(self, timeout: float = 20) -> None:
        """SIGTERM to the main process (uvicorn stops its workers), then SIGKILL to the
        process group it leads (``spawn`` starts it in its own session) if anything stays."""
        if self.process.poll() is None:
            self.process.send_signal(signal.SIGTERM)
            try:
                self.process.wait(timeout)
            except subprocess.TimeoutExpired:
                pass
        with contextlib.suppress(ProcessLookupError, PermissionError):
            os.killpg(self.process.pid, signal.SIGKILL)
        with contextlib.suppress(subprocess.TimeoutExpired):
            self.process.wait(5)


def start_litellm(
    exe: Path, *, work: Path, port: int, upstream_base_url: str, upstream_key: str, model: str, log: Path
) -> PeerProcess:
    """Starts the proxy and waits until every worker answers (bounded)."""
    config = write_config(
        work / "litellm.yaml", upstream_base_url=upstream_base_url, upstream_key=upstream_key, model=model
    )
    # The bench's import path (this checkout) is not LiteLLM's.
    env = {key: value for key, value in os.environ.items() if key != "PYTHONPATH"}
    env["LITELLM_LOCAL_MODEL_COST_MAP"] = "True"
    process = spawn(
        [
            str(exe),
            "--config",
            str(config),
            "--host",
            "127.0.0.1",
            "--port",
            str(port),
            "--num_workers",
            str(WORKERS),
        ],
        log=log,
        env=env,
    )
    peer = PeerProcess(process, port)
    try:
        wait_for_port(port, process, timeout=START_TIMEOUT_S)
        _wait_workers(peer, log)
    except BaseException:
        peer.stop()
        raise
    peer.refresh_pids()
    return peer


def _wait_workers(peer: PeerProcess, log: Path) -> None:
    # The port opens with the first worker; the second may still be importing LiteLLM.
    deadline = time.monotonic() + START_TIMEOUT_S
    with httpx.Client(timeout=5) as client:
        while time.monotonic() < deadline:
            if peer.process.poll() is not None:
                raise RuntimeError(f"LiteLLM exited with status {peer.process.returncode}; see {log}")
            started = log.read_text(errors="replace").count("Application startup complete")
            with contextlib.suppress(httpx.HTTPError):
                alive = client.get(f"http://127.0.0.1:{peer.port}/health/liveliness").status_code == 200
                if alive and started >= WORKERS:
                    return
            time.sleep(0.25)
    raise TimeoutError(f"LiteLLM's {WORKERS} workers did not start within {START_TIMEOUT_S:.0f} s; see {log}")
