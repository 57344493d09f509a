"""A throwaway PostgreSQL cluster for tests: real server, temporary directory, random port.

Usage (any test package; the pytest fixtures live in ``tests/service/conftest.py``)::

    from tests.fakes.postgres import create_database, running_postgres

    with running_postgres() as pg:          # initdb + pg_ctl start; stop + delete on exit
        url = pg.url                        # postgresql+asyncpg://postgres:...@127.0.0.1:<port>/imagegw_test
        other = pg.create_database()        # a fresh, empty database (sync, for subprocess tests)
        # in async code: other = await create_database(url)

What it does, and why:

* finds the server binaries (``initdb``, ``pg_ctl``, ``postgres``) under
  ``/usr/lib/postgresql/<version>/bin`` (Debian/Ubuntu), newest version first, else on
  ``PATH``; ``PG_BINDIR`` overrides. Missing binaries raise
  :class:`PostgresUnavailableError` with install instructions: the fixture turns that
  into a test *failure*, never a skip, so CI cannot pass without having tested PostgreSQL;
* PostgreSQL refuses to run as root: when the tests run as root, ``initdb`` and
  ``pg_ctl`` run as the ``postgres`` system user (``runuser``, else ``su``) in a
  temporary directory handed to that user;
* listens on 127.0.0.1 only, on a free port, with its Unix socket inside the temporary
  directory (never ``/var/run/postgresql``, so it cannot collide with a system cluster);
  password (SCRAM) authentication with a random password, so other local users cannot
  walk in;
* ``fsync``, ``synchronous_commit`` and ``full_page_writes`` are off: the data is thrown
  away, durability only costs time.
"""

from __future__ import annotations

import contextlib
import os
import pwd
import re
import secrets
import shlex
import shutil
import socket
import subprocess
import tempfile
from collections.abc import Iterator, Sequence
from dataclasses import dataclass
from pathlib import Path
from urllib.parse import quote

__all__ = [
    "PostgresServer",
    "PostgresUnavailableError",
    "create_database",
    "find_postgres_bindir",
    "running_postgres",
]

SUPERUSER = "postgres"
DEFAULT_DATABASE = "imagegw_test"
# Not IMAGEGW_*: tests/conftest.py clears those for the session before any fixture runs.
BINDIR_ENV = "PG_BINDIR"
_REQUIRED_BINARIES = ("initdb", "pg_ctl", "postgres")
_DATABASE_NAME = re.compile(r"[a-z_][a-z0-9_]{0,62}")
_START_ATTEMPTS = 3  # a free port can be taken between probing and binding it


class PostgresUnavailableError(RuntimeError):
    """The PostgreSQL server binaries are missing or the cluster would not start."""


@dataclass(frozen=True, slots=True)
class PostgresServer:
    """A running throwaway cluster (see :func:`running_postgres`)."""

    host: str
    port: int
    user: str
    password: str
    database: str
    bindir: Path
    base_dir: Path

    @property
    def url(self) -> str:
        """SQLAlchemy asyncpg URL of the database created at start."""
        return self.url_for(self.database)

    def url_for(self, database: str) -> str:
        """SQLAlchemy asyncpg URL of another database on this cluster."""
        return (
            f"postgresql+asyncpg://{quote(self.user, safe='')}:{quote(self.password, safe='')}"
            f"@{self.host}:{self.port}/{database}"
        )

    def create_database(self, name: str | None = None) -> str:
        """Creates an empty database (``createdb``; blocking) and returns its URL."""
        name = _database_name(name)
        env = {**_clean_env(), "PGPASSWORD": self.password}
        _run(
            [str(self.bindir / "createdb"), "-h", self.host, "-p", str(self.port), "-U", self.user, name],
            env=env,
            what="createdb",
        )
        return self.url_for(name)


async def create_database(url: str, name: str | None = None) -> str:
    """Creates an empty database on the cluster ``url`` points at; returns the new URL.

    Async (asyncpg), for fixtures running on the event loop; ``url`` is any database URL
    of the cluster whose user may create databases (the harness's superuser).
    """
    import asyncpg  # imported here: the harness module itself needs no driver
    from sqlalchemy.engine import make_url

    name = _database_name(name)
    parsed = make_url(url)
    connection = await asyncpg.connect(
        host=parsed.host,
        port=parsed.port,
        user=parsed.username,
        password=parsed.password,
        database=parsed.database,
    )
    try:
        # Identifiers cannot be bound parameters; the name was checked against _DATABASE_NAME.
        await connection.execute(f'CREATE DATABASE "{name}"')
    finally:
        await connection.close()
    return parsed.set(database=name).render_as_string(hide_password=False)


def find_postgres_bindir() -> Path:
    """The directory holding ``initdb``, ``pg_ctl`` and ``postgres``.

    Raises:
        PostgresUnavailableError: none found.
    """
    candidates: list[Path] = []
    override = os.environ.get(BINDIR_ENV)
    if override:
        candidates.append(Path(override))
    else:

        def version(path: Path) -> tuple[int, ...]:
            return tuple(int(part) for part in re.findall(r"\d+", path.parent.name))

        candidates.extend(
            sorted((p / "bin" for p in Path("/usr/lib/postgresql").glob("*")), key=version, reverse=True)
        )
        if on_path := shutil.which("pg_ctl"):
            candidates.append(Path(on_path).resolve().parent)
    for bindir in candidates:
        if all((bindir / name).is_file() for name in _REQUIRED_BINARIES):
            return bindir
    where = f"in {override}" if override else "under /usr/lib/postgresql/*/bin or on PATH"
    raise PostgresUnavailableError(
        f"PostgreSQL server binaries (initdb, pg_ctl, postgres) were not found ({where}). "
        "The ledger tests need a real PostgreSQL: install it (Debian/Ubuntu: "
        "`apt-get install -y postgresql`; .ci/run does this) or point "
        f"{BINDIR_ENV} at its bin directory."
    )


@contextlib.contextmanager
def running_postgres(*, database: str = DEFAULT_DATABASE, bindir: Path | None = None) -> Iterator[PostgresServer]:
    """Starts a throwaway cluster with one database; stops and deletes it on exit.

    Raises:
        PostgresUnavailableError: binaries missing, no ``postgres`` user to run as when
            root, or the server would not start (the message includes its log).
    """
    bindir = bindir or find_postgres_bindir()
    owner = _owner()
    base = Path(tempfile.mkdtemp(prefix="imagegw-pg-"))
    data, sockets, log = base / "data", base / "run", base / "postgres.log"
    password = secrets.token_urlsafe(24)
    started = False
    try:
        sockets.mkdir()
        pwfile = base / "pwfile"
        pwfile.write_text(password + "\n")
        if owner is not None:
            for path in (base, sockets, pwfile):
                os.chown(path, owner.pw_uid, owner.pw_gid)
        _run(
            _as(owner, [
                str(bindir / "initdb"),
                "--pgdata", str(data),
                "--username", SUPERUSER,
                "--pwfile", str(pwfile),
                "--auth", "scram-sha-256",
                "--encoding", "UTF8",
                "--locale", "C",
                "--no-sync",
            ]),
            cwd=base,
            what="initdb",
        )
        pwfile.unlink()
        # Appending keeps the file's owner (the postgres user) when we are root.
        with (data / "postgresql.conf").open("a") as conf:
            conf.write(
                "\n# imagegw test harness\n"
                "listen_addresses = '127.0.0.1'\n"
                f"unix_socket_directories = '{sockets}'\n"
                "fsync = off\n"
                "synchronous_commit = off\n"
                "full_page_writes = off\n"
                # Room for several engines (10 + 20 each) and server processes at once.
                "max_connections = 300\n"
            )
        port = 0
        for attempt in range(1, _START_ATTEMPTS + 1):
            port = _free_port()
            try:
                _run(
                    _as(owner, [
                        str(bindir / "pg_ctl"), "start", "--pgdata", str(data), "--log", str(log),
                        "--wait", "--timeout", "60", "--options", f"-p {port}",
                    ]),
                    cwd=base,
                    what="pg_ctl start",
                )
                started = True
                break
            except PostgresUnavailableError:
                if attempt == _START_ATTEMPTS:
                    raise PostgresUnavailableError(
                        f"PostgreSQL did not start; server log ({log}):\n{_tail(log)}"
                    ) from None
        server = PostgresServer("127.0.0.1", port, SUPERUSER, password, database, bindir, base)
        server.create_database(database)
        yield server
    finally:
        if started:
            # immediate: nothing here is worth a clean shutdown checkpoint.
            with contextlib.suppress(PostgresUnavailableError):
                _run(
                    _as(owner, [
                        str(bindir / "pg_ctl"), "stop", "--pgdata", str(data), "--mode", "immediate", "--wait",
                    ]),
                    cwd=base,
                    what="pg_ctl stop",
                )
        shutil.rmtree(base, ignore_errors=True)


def _owner() -> pwd.struct_passwd | None:
    """The user to run the server as: None (ourselves) unless we are root."""
    if os.geteuid() != 0:
        return None
    try:
        return pwd.getpwnam("postgres")
    except KeyError:
        raise PostgresUnavailableError(
            "Running as root, but there is no 'postgres' system user to run PostgreSQL as "
            "(it refuses to run as root); the Debian package creates it, or run the tests as a normal user."
        ) from None


def _as(owner: pwd.struct_passwd | None, argv: Sequence[str]) -> list[str]:
    if owner is None:
        return list(argv)
    if shutil.which("runuser"):
        return ["runuser", "-u", owner.pw_name, "--", *argv]
    return ["su", "-s", "/bin/sh", owner.pw_name, "-c", shlex.join(argv)]


def _clean_env() -> dict[str, str]:
    # PG* variables of the developer's shell (PGDATA, PGHOST, PGPORT...) must not leak in.
    env = {key: value for key, value in os.environ.items() if not key.startswith("PG")}
    env["LC_ALL"] = "C"
    return env


def _run(argv: Sequence[str], *, what: str, cwd: Path | None = None, env: dict[str, str] | None = None) -> None:
    # cwd: the postgres user may not be allowed into the caller's working directory.
    result = subprocess.run(
        list(argv),
        cwd=cwd or tempfile.gettempdir(),
        env=env or _clean_env(),
        stdin=subprocess.DEVNULL,
        capture_output=True,
        text=True,
        timeout=120,
        check=False,
    )
    if result.returncode != 0:
        raise PostgresUnavailableError(
            f"{what} failed (exit {result.returncode}):\n{result.stdout[-2000:]}{result.stderr[-2000:]}"
        )


def _free_port() -> int:
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as sock:
        sock.bind(("127.0.0.1", 0))
        return int(sock.getsockname()[1])


def _database_name(name: str | None) -> str:
    name = name or f"t_{secrets.token_hex(6)}"
    if not _DATABASE_NAME.fullmatch(name):
        raise ValueError(f"database name {name!r} must match {_DATABASE_NAME.pattern}")
    return name


def _tail(path: Path, lines: int = 40) -> str:
    try:
        return "\n".join(path.read_text(errors="replace").splitlines()[-lines:])
    except OSError as exc:
        return f"(no log: {exc})"
