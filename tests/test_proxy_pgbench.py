"""pgbench through the proxy: select-only and TPC-B with 50 clients, no failed transactions."""

from __future__ import annotations

import os
import re
import shutil
import subprocess
from pathlib import Path

import pytest
from pgfixtures import APP_PASSWORD, PostgresServer, ProxyFactory


def pgbench_binary(pg: PostgresServer) -> str:
    local = pg.bin_dir / "pgbench"
    found = str(local) if local.exists() else shutil.which("pgbench")
    assert found, "pgbench not found"
    return found


def run_pgbench(pg: PostgresServer, port: int, sslmode: str, *args: str) -> str:
    env = {k: v for k, v in os.environ.items() if not k.startswith("PG")}
    env.update(PGPASSWORD=APP_PASSWORD, PGSSLMODE=sslmode)
    cmd = [pgbench_binary(pg), "-h", "127.0.0.1", "-p", str(port), "-U", "app", *args, "appdb"]
    proc = subprocess.run(
        cmd,
        env=env,
        stdin=subprocess.DEVNULL,
        capture_output=True,
        text=True,
        timeout=90,
        check=False,
    )
    output = proc.stdout + proc.stderr
    assert proc.returncode == 0, f"{' '.join(cmd)} exited {proc.returncode}:\n{output}"
    return output


@pytest.fixture(scope="module")
def pgbench_tables(pg: PostgresServer) -> Path:
    """pgbench tables at scale 1 in appdb, created directly on the server as `app`."""
    run_pgbench(pg, pg.port, "require", "-i", "-s", "1", "-q")
    return pg.bin_dir


@pytest.mark.usefixtures("pgbench_tables")
@pytest.mark.parametrize(
    "args",
    [["-S"], ["-S", "-M", "extended"], []],
    ids=["select-only", "select-only-extended", "tpcb"],
)
def test_pgbench(pg: PostgresServer, proxy_factory: ProxyFactory, args: list[str]) -> None:
    proxy = proxy_factory(SIDECAR_MAX_CLIENT_CONN="200")
    output = run_pgbench(pg, proxy.port, "disable", *args, "-c", "50", "-j", "2", "-T", "5")
    assert re.search(r"^number of failed transactions: 0\b", output, re.M), output
    processed = re.search(r"^number of transactions actually processed: (\d+)", output, re.M)
    assert processed and int(processed.group(1)) > 0, output
