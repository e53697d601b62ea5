"""The documentation against the code: README.md stays a short front door that links every page
in docs/, docs/configuration.md's table lists exactly the settings the code reads (with the
right defaults, PgBouncer twins, sidecar.yml keys and RELOAD flags), and every relative link
in README.md and docs/ points at a file and a heading that exist.

Plain file reads; no server needed.
"""

from __future__ import annotations

import dataclasses
import re
from pathlib import Path

import pytest

from sidecar.config import PGBOUNCER_FALLBACKS, PGBOUNCER_RENAMED, Settings
from sidecar.control.tables import RELOADABLE
from sidecar.yamlconfig import POOL_KEYS

ROOT = Path(__file__).resolve().parent.parent
README = ROOT / "README.md"
DOCS = ROOT / "docs"
CONFIGURATION = DOCS / "configuration.md"
README_MAX_LINES = 250

#: Where the code reads environment variables that are not Settings fields: the launcher's
#: shell wrapper and every Python module of the package.
ENV_SOURCES = [
    ROOT / "bin" / "start-sidecar",
    ROOT / "setup.py",  # build-time variables
    *sorted((ROOT / "sidecar").rglob("*.py")),
]
#: A quoted name in Python ("SIDECAR_CONFIG") or an expansion in shell (${SIDECAR_PYTHON...}).
ENV_NAME = re.compile(r"""["']((?:SIDECAR|PGBOUNCER)_[A-Z0-9_]+)["']|\$\{?(SIDECAR_[A-Z0-9_]+)""")
CHECK = "✓"


def pages() -> list[Path]:
    return sorted(DOCS.glob("*.md"))


def test_readme_is_a_short_front_door() -> None:
    lines = README.read_text().splitlines()
    assert len(lines) <= README_MAX_LINES, f"README.md has {len(lines)} lines"


def test_readme_links_every_docs_page() -> None:
    assert pages(), "docs/ has no pages"
    readme = README.read_text()
    missing = [p.name for p in pages() if f"](docs/{p.name})" not in readme]
    assert not missing, f"README.md does not link {missing}"


# -- docs/configuration.md against the code ------------------------------------------------------


def settings_table() -> dict[str, dict[str, str]]:
    """The rows of configuration.md's settings table: variable -> {column: cell}."""
    rows: dict[str, dict[str, str]] = {}
    header: list[str] | None = None
    for line in CONFIGURATION.read_text().splitlines():
        if not line.startswith("|"):
            if header is not None and rows:
                break  # the end of the first table with a `variable` column
            header = None
            continue
        cells = [c.strip() for c in line.strip().strip("|").split("|")]
        if header is None:
            if cells and cells[0] == "variable":
                header = cells
            continue
        if set(cells[0]) <= {"-", " "}:
            continue
        name = cells[0].strip("`")
        assert name not in rows, f"{name} has two rows"
        rows[name] = dict(zip(header, cells, strict=True))
    return rows


#: PgBouncer names that differ from ours (PGBOUNCER_CLIENT_TLS_SSLMODE -> SIDECAR_CLIENT_TLS):
#: a twin all the same, named in its row's meaning.
RENAMED_TWINS = {pg: f"SIDECAR_{field.upper()}" for field, (pg, _) in PGBOUNCER_RENAMED.items()}


def known_variables() -> set[str]:
    """Every environment variable the sidecar reads: one per Settings field, their PGBOUNCER_*
    twins are columns of the same rows, and what the code reads by name outside Settings."""
    names = {f"SIDECAR_{f.name.upper()}" for f in dataclasses.fields(Settings)}
    for source in ENV_SOURCES:
        for quoted, expanded in ENV_NAME.findall(source.read_text()):
            name = quoted or expanded
            if name in RENAMED_TWINS:
                name = RENAMED_TWINS[name]
            elif name.startswith("PGBOUNCER_"):
                # A twin: documented in its SIDECAR_* row's "PgBouncer twin" column.
                name = "SIDECAR_" + name.removeprefix("PGBOUNCER_")
            names.add(name)
    return names


def test_configuration_table_lists_every_setting_the_code_reads() -> None:
    table = settings_table()
    known = known_variables()
    assert "SIDECAR_PYTHON" in known and "SIDECAR_CONFIG" in known  # the scan finds them
    missing = sorted(known - table.keys())
    assert not missing, f"docs/configuration.md has no row for {missing}"
    unknown = sorted(table.keys() - known)
    assert not unknown, f"docs/configuration.md documents settings the code lacks: {unknown}"


def _flag(row: dict[str, str], column: str) -> bool:
    cell = row[column]
    assert cell in ("", CHECK), f"{column} cell {cell!r}"
    return cell == CHECK


@pytest.mark.parametrize("field", dataclasses.fields(Settings), ids=lambda f: f.name)
def test_configuration_row_matches_the_code(field: dataclasses.Field[object]) -> None:
    row = settings_table()[f"SIDECAR_{field.name.upper()}"]
    twin = field.name in PGBOUNCER_FALLBACKS or field.name in PGBOUNCER_RENAMED
    assert _flag(row, "PgBouncer twin") == twin
    if field.name in PGBOUNCER_RENAMED:
        assert f"`{PGBOUNCER_RENAMED[field.name][0]}`" in row["meaning"], "twin's name"
    assert _flag(row, "sidecar.yml") == (field.name in POOL_KEYS)
    assert _flag(row, "RELOAD") == (field.name in RELOADABLE)
    assert row["meaning"], "no meaning"
    default = row["default"]
    if re.fullmatch(r"`[^`]*`", default):  # a literal value; prose ("the system's") is not checked
        value = field.default
        if isinstance(value, bool):
            expected = "1" if value else "0"
        elif isinstance(value, float):
            expected = f"{value:g}"
        else:
            expected = str(value)
        assert default.strip("`") == expected, f"documented default {default}, code {value!r}"


# -- links ----------------------------------------------------------------------------------------

LINK = re.compile(r"\]\(([^)\s]+)\)")
HEADING = re.compile(r"^(#{1,6}) +(.+?)\s*$")


def slug(heading: str) -> str:
    """GitHub's anchor for a heading: lower case, punctuation dropped, spaces to hyphens."""
    text = heading.strip().lower()
    text = re.sub(r"[^\w\- ]", "", text)
    return text.replace(" ", "-")


def anchors(path: Path) -> set[str]:
    found: set[str] = set()
    seen: dict[str, int] = {}
    in_code = False
    for line in path.read_text().splitlines():
        if line.lstrip().startswith("```"):
            in_code = not in_code
            continue
        match = None if in_code else HEADING.match(line)
        if match is None:
            continue
        base = slug(match.group(2))
        n = seen.get(base, 0)
        seen[base] = n + 1
        found.add(base if n == 0 else f"{base}-{n}")
    return found


@pytest.mark.parametrize(
    "doc", [README, *pages()], ids=lambda p: str(p.relative_to(ROOT)) if p.exists() else str(p)
)
def test_relative_links_resolve(doc: Path) -> None:
    broken = []
    for target in LINK.findall(doc.read_text()):
        if re.match(r"[a-z]+:", target):
            continue  # https:, mailto:
        file_part, _, anchor = target.partition("#")
        dest = (doc.parent / file_part).resolve() if file_part else doc
        # A missing file, or (only then read) a heading the anchor names that it does not have.
        if not dest.exists() or (anchor and dest.suffix == ".md" and anchor not in anchors(dest)):
            broken.append(target)
    assert not broken, f"{doc.name}: broken links {broken}"
