"""Settings.secret: generated secrets appear whole, once, however many processes start together."""

from __future__ import annotations

import multiprocessing
import stat
import threading
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path
from typing import Any

import pytest

from server.config import ConfigError, Settings

RACERS = 8


def race(var_dir: Path, barrier: Any) -> str:
    settings = Settings(var_dir=var_dir)
    barrier.wait()
    return settings.secret("admin_token")


def race_in_process(var_dir: str, barrier: Any, results: Any) -> None:
    results.put(race(Path(var_dir), barrier))


def test_threads_racing_all_get_the_one_whole_secret(tmp_path: Path) -> None:
    for round_ in range(40):
        var_dir = tmp_path / f"round-{round_}"
        barrier = threading.Barrier(RACERS)
        with ThreadPoolExecutor(RACERS) as pool:
            values = list(pool.map(lambda _: race(var_dir, barrier), range(RACERS)))
        assert len(set(values)) == 1 and len(values[0]) == 43, values  # token_urlsafe(32)
        secrets_dir = var_dir / "secrets"
        assert [p.name for p in secrets_dir.iterdir()] == ["admin_token"]  # no temporary file left
        assert stat.S_IMODE((secrets_dir / "admin_token").stat().st_mode) == 0o600
        assert stat.S_IMODE(secrets_dir.stat().st_mode) == 0o700


def test_processes_racing_all_get_the_one_whole_secret(tmp_path: Path) -> None:
    context = multiprocessing.get_context("spawn")
    for round_ in range(2):
        var_dir = tmp_path / f"round-{round_}"
        barrier, results = context.Barrier(4), context.Queue()
        processes = [context.Process(target=race_in_process, args=(str(var_dir), barrier, results)) for _ in range(4)]
        for process in processes:
            process.start()
        values = [results.get(timeout=60) for _ in processes]
        for process in processes:
            process.join(30)
        assert len(set(values)) == 1 and len(values[0]) == 43, values
        assert (var_dir / "secrets" / "admin_token").read_text() == values[0]


def test_a_configured_secret_wins_and_an_empty_file_is_refused(tmp_path: Path) -> None:
    assert Settings(var_dir=tmp_path, admin_token="given").secret("admin_token") == "given"
    assert not (tmp_path / "secrets").exists()
    (tmp_path / "secrets").mkdir()
    (tmp_path / "secrets" / "admin_token").write_text("")
    # A configuration error: the command prints it alone and exits 2 (server.cli).
    with pytest.raises(ConfigError, match="is empty"):
        Settings(var_dir=tmp_path).secret("admin_token")
