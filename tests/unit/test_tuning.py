"""The Tuning settings group: read from IMAGEGW_TUNING__*, today's values by default, checked,
and documented in the README's configuration table."""

from __future__ import annotations

import os
import re
from collections.abc import Iterator
from pathlib import Path

import pytest
from pydantic import ValidationError

from server.config import DEFAULT_TUNING, Settings, Tuning

README = Path(__file__).resolve().parents[2] / "README.md"


@pytest.fixture
def environ() -> Iterator[dict[str, str]]:
    """os.environ, with every IMAGEGW_TUNING__* variable a test sets removed afterwards."""
    yield os.environ  # type: ignore[misc]
    for name in [n for n in os.environ if n.startswith("IMAGEGW_TUNING__")]:
        del os.environ[name]


def test_defaults_are_the_measured_values() -> None:
    assert Settings().tuning == DEFAULT_TUNING == Tuning(
        database_pool_size=10,
        database_max_overflow=20,
        sqlite_readers=4,
        sqlite_writer_batch=64,
        upstream_max_connections=512,
        fan_out_width=4,
        sweep_batch=500,
    )


def test_each_field_is_read_from_its_variable(environ: dict[str, str]) -> None:
    environ.update({"IMAGEGW_TUNING__FAN_OUT_WIDTH": "8", "IMAGEGW_TUNING__SWEEP_BATCH": "50"})
    tuning = Settings().tuning
    assert (tuning.fan_out_width, tuning.sweep_batch, tuning.sqlite_writer_batch) == (8, 50, 64)


@pytest.mark.parametrize(
    ("name", "value"),
    [("FAN_OUT_WIDTH", "0"), ("FAN_OUT_WIDTH", "11"), ("SWEEP_BATCH", "many"), ("POOL_SIZ", "3")],
)
def test_bad_values_and_unknown_names_stop_the_start(environ: dict[str, str], name: str, value: str) -> None:
    environ[f"IMAGEGW_TUNING__{name}"] = value
    with pytest.raises(ValidationError):
        Settings()


def test_the_readme_documents_every_field_with_its_default() -> None:
    text = README.read_text()
    for name, field in Tuning.model_fields.items():
        row = re.search(rf"^\| `IMAGEGW_TUNING__{name.upper()}` \| `([^`]*)` \|", text, re.M)
        assert row is not None, f"README has no row for IMAGEGW_TUNING__{name.upper()}"
        assert row.group(1) == str(field.default)
