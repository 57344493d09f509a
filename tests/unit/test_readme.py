"""The README's map stays true to the code: its configuration table has a row for every
setting of server/config.py (and no other), with the setting's default, and its Layout
names every module of server/ (and no module that is not there)."""

from __future__ import annotations

import re
from pathlib import Path

from server.config import Settings
from server.providers import PROVIDERS

ROOT = Path(__file__).resolve().parents[2]
README = (ROOT / "README.md").read_text()
# Nested or read under the vendors' own names: their rows are checked elsewhere
# (tests/unit/test_tuning.py, tests/providers/test_registry.py) or name AWS_* variables.
NOT_IMAGEGW_ROWS = {"tuning", "providers"}


def section(title: str) -> str:
    start = README.index(f"\n## {title}\n")
    return README[start : README.index("\n## ", start + 1)]


def table_rows() -> dict[str, str]:
    """Each IMAGEGW_* variable of the configuration table and its default cell."""
    rows: dict[str, str] = {}
    for line in section("Configuration").splitlines():
        cells = [cell.strip() for cell in line.strip("|").split("|")]
        if len(cells) != 3 or not cells[0].startswith("`IMAGEGW_"):
            continue
        names = re.findall(r"`(IMAGEGW_[A-Z0-9_]+|_[A-Z0-9_]+)`", cells[0])
        # "`IMAGEGW_UPLOAD_MAX_FILE_BYTES`, `_MAX_IMAGES`, ...": the suffixes share the prefix.
        prefix = "_".join(names[0].split("_")[:2])
        names = [prefix + name if name.startswith("_") else name for name in names]
        defaults = cells[1].split(" / ")
        for i, name in enumerate(names):
            if name.startswith("IMAGEGW_TUNING__"):
                continue
            rows[name] = defaults[i] if len(defaults) == len(names) else cells[1]
    return rows


def test_the_settings_table_has_a_row_for_every_setting_and_only_those() -> None:
    settings = {
        f"IMAGEGW_{name.upper()}"
        for name, field in Settings.model_fields.items()
        if field.validation_alias is None and name not in NOT_IMAGEGW_ROWS
    }
    for entry in PROVIDERS.values():
        settings |= {entry.base_url_variable, *(v for v in entry.key_variables if v.startswith("IMAGEGW_"))}
    assert set(table_rows()) == settings


def test_the_settings_table_gives_each_literal_default() -> None:
    checked = 0
    for variable, cell in table_rows().items():
        field = Settings.model_fields.get(variable.removeprefix("IMAGEGW_").lower())
        literal = re.fullmatch(r"`([^`]*)`", cell)
        if field is None or literal is None or field.default in (None, ""):
            continue  # a provider's, or a default described in words (derived at start)
        default = field.default
        shown = str(int(default)) if isinstance(default, float) and default.is_integer() else str(default)
        assert literal.group(1) == shown, variable
        checked += 1
    assert checked >= 30


def layout_entries() -> dict[str, str]:
    """The Layout block's server/ part: each first-column name (``app.py``, ``ledger/``,
    ``dev.py, cli.py``) with the text of its entry."""
    block = README[README.index("\nLayout:\n") :]
    block = block[block.index("```\n") + 4 :]
    block = block[: block.index("```")]
    server = block[block.index("\nserver/\n") + len("\nserver/\n") : block.index("\ndeploy/")]
    entries: dict[str, str] = {}
    for line in server.splitlines():
        first = re.match(r"  (\S.*?)\s{2,}(.*)", line)
        if first and not line.startswith("   "):
            name, text = first.groups()
            entries[name] = text
        else:
            entries[name] += " " + line.strip()
    return entries


def test_the_layout_names_every_server_module_and_only_existing_ones() -> None:
    server = ROOT / "server"
    entries = layout_entries()
    top = {name for key in entries for name in key.split(", ") if name.endswith(".py")}
    assert top == {path.name for path in server.glob("*.py")} - {"__init__.py"}
    packages = {key.rstrip("/") for key in entries if key.endswith("/")}
    assert packages == {path.name for path in server.iterdir() if path.is_dir() and not path.name.startswith("__")}
    for package in packages:
        named = set(re.findall(r"\b([a-z0-9_]+\.py)\b", entries[f"{package}/"]))
        modules = {path.name for path in (server / package).glob("*.py")} - {"__init__.py"}
        if package == "providers":
            # "one module per upstream wire format": the adapters are PROVIDERS' entries.
            named |= {entry.adapter.split(":")[0].rsplit(".", 1)[1] + ".py" for entry in PROVIDERS.values()}
        assert named - {"app.py", "cli.py", "dev.py"} == modules, package
