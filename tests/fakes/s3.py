"""A real S3 API for tests: moto's standalone server on 127.0.0.1, a random port.

Usage (the pytest fixtures live in ``tests/conftest.py``)::

    from tests.fakes.s3 import running_s3

    with running_s3() as s3:               # python -m moto.server; stopped on exit
        s3.create_bucket("images")         # a fresh bucket
        env = s3.env                       # AWS_ENDPOINT_URL, AWS_REGION, AWS_ACCESS_KEY_ID, ...

Why moto's *server* and not its in-process mocks: the store under test must talk to an S3
endpoint over real HTTP exactly as it talks to AWS, MinIO or R2 (signing, status codes,
error XML, presigned URLs), and the replicas under test are separate processes. moto keeps
everything in memory and does not check signatures: it is an S3 API, not S3's security.
``python -m tests.fakes.s3`` runs one by hand and prints its environment.
"""

from __future__ import annotations

import contextlib
import os
import secrets
import socket
import subprocess
import sys
import tempfile
import time
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import httpx

__all__ = ["S3Server", "running_s3"]

REGION = "us-east-1"
_START_ATTEMPTS = 3  # a free port can be taken between probing and binding it


@dataclass(frozen=True, slots=True)
class S3Server:
    """A running moto server (see :func:`running_s3`)."""

    endpoint: str
    access_key: str
    secret_key: str
    region: str
    log: Path

    @property
    def env(self) -> dict[str, str]:
        """The standard AWS variables an S3 client (and ``imagegw serve``) reads."""
        return {
            "AWS_ENDPOINT_URL": self.endpoint,
            "AWS_REGION": self.region,
            "AWS_ACCESS_KEY_ID": self.access_key,
            "AWS_SECRET_ACCESS_KEY": self.secret_key,
        }

    def client(self) -> Any:
        """A boto3 S3 client (blocking; moto's own dependency) for test set-up and checks."""
        import boto3

        return boto3.client(
            "s3",
            endpoint_url=self.endpoint,
            region_name=self.region,
            aws_access_key_id=self.access_key,
            aws_secret_access_key=self.secret_key,
        )

    def create_bucket(self, name: str | None = None) -> str:
        """Creates an empty bucket and returns its name."""
        name = name or f"t-{secrets.token_hex(6)}"
        self.client().create_bucket(Bucket=name)
        return name


@contextlib.contextmanager
def running_s3() -> Iterator[S3Server]:
    """Starts ``python -m moto.server`` on 127.0.0.1; stops it on exit.

    Raises:
        RuntimeError: it did not answer within 30 s (the message includes its log).
    """
    log = Path(tempfile.mkstemp(prefix="imagegw-moto-", suffix=".log")[1])
    process: subprocess.Popen[bytes] | None = None
    try:
        for attempt in range(1, _START_ATTEMPTS + 1):
            port = _free_port()
            with log.open("ab") as out:
                process = subprocess.Popen(
                    [sys.executable, "-m", "moto.server", "-H", "127.0.0.1", "-p", str(port)],
                    stdout=out,
                    stderr=subprocess.STDOUT,
                    stdin=subprocess.DEVNULL,
                    # Not the developer's AWS profile or region: moto answers for anything.
                    env={key: value for key, value in os.environ.items() if not key.startswith("AWS_")},
                    start_new_session=True,
                )
            endpoint = f"http://127.0.0.1:{port}"
            if _wait_up(endpoint, process, timeout=30):
                break
            _stop(process)
            if attempt == _START_ATTEMPTS:
                raise RuntimeError(f"moto's S3 server did not start; its log ({log}):\n{log.read_text()[-3000:]}")
        yield S3Server(
            endpoint=endpoint,
            access_key="AKIA" + secrets.token_hex(8).upper(),
            secret_key=secrets.token_urlsafe(30),
            region=REGION,
            log=log,
        )
    finally:
        if process is not None:
            _stop(process)
        log.unlink(missing_ok=True)


def _wait_up(endpoint: str, process: subprocess.Popen[bytes], timeout: float) -> bool:
    deadline = time.monotonic() + timeout
    with httpx.Client(timeout=2) as client:
        while time.monotonic() < deadline:
            if process.poll() is not None:
                return False
            with contextlib.suppress(httpx.HTTPError):
                # moto's dashboard: any answer means the server is up.
                if client.get(f"{endpoint}/moto-api/").status_code < 500:
                    return True
            time.sleep(0.1)
    return False


def _stop(process: subprocess.Popen[bytes]) -> None:
    if process.poll() is None:
        process.terminate()
        try:
            process.wait(10)
        except subprocess.TimeoutExpired:
            process.kill()
            process.wait()


def _free_port() -> int:
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as sock:
        sock.bind(("127.0.0.1", 0))
        return int(sock.getsockname()[1])


if __name__ == "__main__":
    with running_s3() as server:
        print("\n".join(f"export {key}={value}" for key, value in server.env.items()), flush=True)
        with contextlib.suppress(KeyboardInterrupt):
            while True:
                time.sleep(3600)
