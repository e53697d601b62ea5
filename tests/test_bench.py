"""The bench's own parts that its figures rest on: bench/floor.py (the 1:1 forwarder target)
forwards to a real PostgreSQL in clear and over TLS, and the start-up figure's reading of
`python -X importtime` output."""

from __future__ import annotations

import subprocess
import sys
from collections.abc import Iterator
from pathlib import Path

import psycopg
import pytest
from pgfixtures import HOST, REPO_ROOT, PostgresServer, free_port, libpq_dsn, poll_until

sys.path.insert(0, str(REPO_ROOT / "bench"))

import run as bench_run


def _accepts(port: int) -> bool:
    import socket

    try:
        with socket.create_connection((HOST, port), 0.5):
            return True
    except OSError:
        return False


@pytest.fixture(params=[False, True], ids=["clear", "tls"])
def floor(request: pytest.FixtureRequest, pg: PostgresServer) -> Iterator[tuple[int, bool]]:
    tls: bool = request.param
    port = free_port()
    argv = [sys.executable, str(REPO_ROOT / "bench" / "floor.py"), str(port), str(pg.port)]
    proc = subprocess.Popen([*argv, *(["--tls"] if tls else [])], stdin=subprocess.DEVNULL)
    try:
        poll_until(lambda: _accepts(port), timeout=30, what="floor.py to listen")
        yield port, tls
    finally:
        proc.terminate()
        proc.wait(10)


def test_floor_forwards_a_scram_login_and_queries(floor: tuple[int, bool]) -> None:
    """A libpq client in clear logs in (SCRAM) through the floor and queries; with --tls the
    floor's leg to PostgreSQL is TLS, and the channel binding PostgreSQL offers there is
    hidden from the client, which would otherwise refuse to log in."""
    port, tls = floor
    dsn = libpq_dsn(HOST, port, "app", None, "appdb", "disable", {})
    with psycopg.connect(dsn) as conn:
        row = conn.execute("SELECT ssl FROM pg_stat_ssl WHERE pid = pg_backend_pid()").fetchone()
        assert row == (tls,)
        assert conn.execute("SELECT sum(x) FROM generate_series(1, 100) x").fetchone() == (5050,)


def test_importtime_names_the_largest_imports(tmp_path: Path) -> None:
    """Real `-X importtime` output: top-level imports and those directly below them, the
    largest first, in ms."""
    proc = subprocess.run(
        [sys.executable, "-X", "importtime", "-c", "import json, email.message"],
        capture_output=True,
        text=True,
        check=True,
    )
    found = bench_run.parse_importtime(proc.stderr, top=50)
    by_name = {x["module"]: x for x in found}
    assert by_name["json"]["nested"] == 0
    assert by_name["email.message"]["nested"] == 0
    assert by_name["json.decoder"]["nested"] == 1
    assert all(x["nested"] <= 1 for x in found)
    assert [x["ms"] for x in found] == sorted((x["ms"] for x in found), reverse=True)
