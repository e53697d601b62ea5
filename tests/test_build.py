"""Which build runs: the compiled hot path (setup.py, Cython) or the pure-Python package.

CI compiles (scripts/bootstrap) and runs the suite on the compiled build, then the protocol
and transaction-mode tests again with SIDECAR_PURE_PYTHON=1: these tests make sure neither
run is silently the other.
"""

from __future__ import annotations

import importlib.machinery
import os
import shutil
import subprocess
import sys
from pathlib import Path

from pgfixtures import REPO_ROOT

import sidecar

_EXTENSION = tuple(importlib.machinery.EXTENSION_SUFFIXES)
# The modules setup.py compiles.
HOT = [
    "sidecar.protocol.frontend",
    "sidecar.protocol.backend",
    "sidecar.protocol.statements",
    "sidecar.protocol.messages",
    "sidecar.dataplane.client",
    "sidecar.dataplane.server",
    "sidecar.dataplane.pool",
    "sidecar.dataplane.counters",
]


def _files(env: dict[str, str], path: Path = REPO_ROOT) -> list[str]:
    code = (
        "import importlib, sidecar; print(sidecar.build()); "
        f"print(*[importlib.import_module(m).__file__ for m in {HOT!r}], sep='\\n')"
    )
    res = subprocess.run(
        [sys.executable, "-c", code],
        env={**env, "PYTHONPATH": str(path)},
        cwd=path,
        capture_output=True,
        text=True,
        timeout=60,
        check=True,
    )
    return res.stdout.split()


def test_setup_compiles_what_the_test_names() -> None:
    setup = (REPO_ROOT / "setup.py").read_text()
    for module in HOT:
        assert f'"{module.replace(".", "/")}.py"' in setup


def test_compiled_build_is_in_use() -> None:
    """The suite runs on what it claims: compiled unless SIDECAR_PURE_PYTHON is set."""
    from sidecar.protocol import frontend

    if sidecar.pure_forced():
        assert sidecar.build() == "python"
        assert frontend.__file__ is not None and frontend.__file__.endswith(".py")
        return
    assert sidecar.build() == "compiled", (
        "the hot path is not compiled here: `pip install -e .` (scripts/bootstrap) builds "
        f"it; stale sources: {sidecar.STALE}"
    )
    assert frontend.__file__ is not None and frontend.__file__.endswith(_EXTENSION)


def test_pure_variable_forces_every_module_pure() -> None:
    env = {k: v for k, v in os.environ.items() if k != sidecar.PURE_ENV}
    build, *files = _files({**env, sidecar.PURE_ENV: "1"})
    assert build == "python"
    assert all(f.endswith(".py") for f in files), files
    if list((REPO_ROOT / "sidecar" / "protocol").glob("frontend.*.so")) and not sidecar.STALE:
        # "0" is unset
        for value in ("", "0"):
            build, *files = _files({**env, sidecar.PURE_ENV: value})
            assert build == "compiled"
            assert all(f.endswith(_EXTENSION) for f in files), files


def test_a_source_newer_than_its_extension_runs_pure(tmp_path: Path) -> None:
    """An edit (or a checkout) after the last build: the old compiled code must not run."""
    if not list((REPO_ROOT / "sidecar" / "protocol").glob("frontend.*.so")):
        return  # nothing compiled to go stale (the pure-only test run)
    shutil.copytree(REPO_ROOT / "sidecar", tmp_path / "sidecar", copy_function=shutil.copy2)
    env = {k: v for k, v in os.environ.items() if k != sidecar.PURE_ENV}
    build, *files = _files(env, tmp_path)
    assert build == "compiled"
    source = tmp_path / "sidecar" / "protocol" / "backend.py"
    built = max(p.stat().st_mtime for p in source.parent.glob("backend.*.so"))
    os.utime(source, (built + 10, built + 10))
    build, *files = _files(env, tmp_path)
    assert build == "python"
    assert all(f.endswith(".py") for f in files), files
