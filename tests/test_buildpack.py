"""The buildpack: detect/release, compile's Python checks, and compile-then-run of a slug.

The slug test builds into a BUILD_DIR laid out as heroku/python leaves it (a Python at
.heroku/python), moves the result elsewhere as Heroku does (built in /tmp/build_*, run from
/app), and starts the slug's bin/start-sidecar there with HOME at the slug root, `psql` as the
app and a real PostgreSQL upstream.
"""

from __future__ import annotations

import os
import shutil
import subprocess
import sys
from pathlib import Path

import pytest
import yaml
from pgfixtures import REPO_ROOT, PostgresServer, free_port, short_tempdir
from test_launcher import password_leaks, sidecar_lines

# What Heroku runs: bin/ at the root of the buildpack (this repository), which hands over to
# buildpack/bin/.
BUILDPACK = REPO_ROOT / "bin"


def _clean_env(**extra: str) -> dict[str, str]:
    env = {
        k: v
        for k, v in os.environ.items()
        if not k.startswith(("SIDECAR_", "PGBOUNCER_", "DATABASE_URL", "VIRTUAL_ENV"))
        and k != "DYNO"
    }
    env.update(extra)
    return env


def _compile(
    build: Path, cache: Path, env_dir: Path, **env: str
) -> subprocess.CompletedProcess[str]:
    return subprocess.run(
        [str(BUILDPACK / "compile"), str(build), str(cache), str(env_dir)],
        env=_clean_env(**env),
        stdin=subprocess.DEVNULL,
        capture_output=True,
        text=True,
        timeout=400,  # compiling the hot path: a minute or two on a loaded 2-core machine
        check=False,
    )


def _heroku_python(build: Path) -> None:
    """What heroku/python leaves: a Python >= 3.11 with pip (and its headers) at .heroku/python."""
    subprocess.run(
        [sys.executable, "-m", "venv", str(build / ".heroku" / "python")],
        check=True,
        timeout=60,
        env=_clean_env(),
    )


@pytest.fixture
def dirs(tmp_path: Path) -> tuple[Path, Path, Path]:
    build, cache, env_dir = tmp_path / "build", tmp_path / "cache", tmp_path / "env"
    for d in (build, cache, env_dir):
        d.mkdir()
    (env_dir / "DATABASE_URL").write_text("postgres://u:p@h/d")  # config vars, as Heroku does
    return build, cache, env_dir


def test_detect_always_applies(tmp_path: Path) -> None:
    out = subprocess.run(
        [str(BUILDPACK / "detect"), str(tmp_path)], capture_output=True, text=True, check=False
    )
    assert (out.returncode, out.stdout.strip()) == (0, "pg-sidecar")


def test_release_is_yaml_without_process_types(tmp_path: Path) -> None:
    out = subprocess.run(
        [str(BUILDPACK / "release"), str(tmp_path)], capture_output=True, text=True, check=True
    )
    assert yaml.safe_load(out.stdout) == {}


def test_compile_without_python_says_what_to_add(dirs: tuple[Path, Path, Path]) -> None:
    build, cache, env_dir = dirs
    res = _compile(build, cache, env_dir)
    assert res.returncode == 1
    assert res.stdout.startswith("-----> pg-sidecar")
    problems = [line for line in res.stderr.splitlines() if line.strip()]
    assert all(line.startswith(" !     ") for line in problems), res.stderr
    assert "heroku buildpacks:add --index 1 heroku/python" in res.stderr
    assert ".python-version" in res.stderr
    assert not (build / ".sidecar").exists()


def test_compile_with_an_old_python_names_the_version(dirs: tuple[Path, Path, Path]) -> None:
    build, cache, env_dir = dirs
    fake = build / ".heroku" / "python" / "bin" / "python3"
    fake.parent.mkdir(parents=True)
    # answers compile's two questions as a Python 3.10 would
    fake.write_text('#!/bin/sh\ncase "$*" in *print*) echo 3.10.14 ;; *) exit 1 ;; esac\n')
    fake.chmod(0o755)
    res = _compile(build, cache, env_dir)
    assert res.returncode == 1
    assert "needs Python 3.11 or newer; the slug's .heroku/python/bin/python3 is 3.10.14" in (
        res.stderr
    )


@pytest.mark.timeout(500)
def test_compile_then_run_the_slug(
    dirs: tuple[Path, Path, Path], pg: PostgresServer, tmp_path: Path
) -> None:
    build, cache, env_dir = dirs
    _heroku_python(build)
    (build / "Procfile").write_text("web: bin/start-sidecar python -m http.server $PORT\n")

    res = _compile(build, cache, env_dir)
    assert res.returncode == 0, res.stdout + res.stderr
    topics = [line for line in res.stdout.splitlines() if line.startswith("-----> ")]
    assert topics[0] == "-----> pg-sidecar: PostgreSQL connection pooling inside the dyno"
    assert topics[-1] == "-----> pg-sidecar installed"
    assert all(line.startswith(("-----> ", "       ")) for line in res.stdout.splitlines())
    assert (build / ".sidecar" / "lib" / "sidecar" / "shell" / "launcher.py").is_file()
    assert os.readlink(build / ".sidecar" / "python") == "../.heroku/python/bin/python3"
    assert (build / ".profile.d" / "pg-sidecar.sh").is_file()
    # the hot path compiled with the slug's Python, only the extensions kept
    assert "       Build: compiled hot path (build=compiled)" in res.stdout, res.stdout
    lib = build / ".sidecar" / "lib" / "sidecar"
    assert list(lib.glob("protocol/frontend.*.so"))
    assert not list(lib.glob("**/*.c"))
    assert "Reused the compiled hot path" not in res.stdout
    assert "Cython (build=compiled)" in res.stdout

    # the next deploy with the same sources and Python reuses the build from the cache
    again = tmp_path / "again"
    again.mkdir()
    _heroku_python(again)
    res = _compile(again, cache, env_dir)
    assert res.returncode == 0, res.stdout + res.stderr
    assert "       Reused the compiled hot path from the build cache" in res.stdout, res.stdout
    assert "Cython (build=compiled)" not in res.stdout  # setup.py did not run
    assert "       Build: compiled hot path (build=compiled)" in res.stdout, res.stdout
    assert sorted(p.relative_to(again) for p in again.glob(".sidecar/lib/sidecar/**/*.so")) == (
        sorted(p.relative_to(build) for p in build.glob(".sidecar/lib/sidecar/**/*.so"))
    )

    # Heroku runs the slug from another place than it was built in
    app = tmp_path / "app"
    shutil.move(build, app)
    # a `sidecar` of the app's own, on PYTHONPATH and in the working directory: the slug's
    # start-sidecar must run its own copy regardless
    (app / "sidecar").mkdir()
    (app / "sidecar" / "__init__.py").write_text("raise SystemExit('the app sidecar ran')\n")

    socket_dir = short_tempdir("sb")
    try:
        env = _clean_env(
            HOME=str(app),
            PYTHONPATH=str(app),
            DATABASE_URL=pg.url(),
            SIDECAR_PORT=str(free_port()),
            SIDECAR_SOCKET_DIR=str(socket_dir),
            SIDECAR_STATS_PERIOD="0",
        )
        run = subprocess.run(
            ["bin/start-sidecar", "sh", "-c", 'psql "$DATABASE_URL" -Atc "select current_user"'],
            cwd=app,
            env=env,
            stdin=subprocess.DEVNULL,
            capture_output=True,
            text=True,
            timeout=30,
            check=False,
        )
    finally:
        shutil.rmtree(socket_dir, ignore_errors=True)
    out = run.stdout + run.stderr
    assert run.returncode == 0, out
    assert "app" in [line.strip() for line in run.stdout.splitlines()]
    assert len(sidecar_lines(out, "launch")) == 1
    assert sidecar_lines(out)[-1] == "sidecar at=exit code=0"
    assert "build=compiled" in sidecar_lines(out, "listening")[0]
    assert not password_leaks(out)


@pytest.mark.timeout(500)
def test_compile_falls_back_to_pure_python(dirs: tuple[Path, Path, Path]) -> None:
    """A build image whose C compiler fails: the slug gets the pure package, and says so."""
    build, cache, env_dir = dirs
    _heroku_python(build)
    res = _compile(build, cache, env_dir, CC="false")
    assert res.returncode == 0, res.stdout + res.stderr
    assert all(line.startswith(("-----> ", "       ")) for line in res.stdout.splitlines())
    assert "compiling failed (CompileError" in res.stdout, res.stdout
    assert "Build: compiling failed or skipped (see above); pure Python (build=python)" in (
        res.stdout
    )
    lib = build / ".sidecar" / "lib" / "sidecar"
    assert (lib / "protocol" / "frontend.py").is_file()
    assert not list(lib.glob("**/*.so"))
    topics = [line for line in res.stdout.splitlines() if line.startswith("-----> ")]
    assert topics[-1] == "-----> pg-sidecar installed"
