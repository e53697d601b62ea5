"""pgbench runs: the workloads, one timed run against one target, and its exact latency figures.

Latencies come from pgbench's per-transaction log (`-l`), one line per transaction, so the
average and p99 are computed over every transaction of the run rather than estimated.
"""

from __future__ import annotations

import math
import os
import re
import subprocess
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any

from procs import DBNAME, HOST, PASSWORD, USER

#: name -> (label, pgbench arguments). Order is the order of the table and chart.
WORKLOADS: dict[str, tuple[str, list[str]]] = {
    "simple": ("-S simple", ["-S", "-M", "simple"]),
    "extended": ("-S extended", ["-S", "-M", "extended"]),
    "prepared": ("-S prepared", ["-S", "-M", "prepared"]),
    "tpcb": ("TPC-B", ["-M", "simple"]),
}


@dataclass
class Run:
    """One pgbench run against one target."""

    tps: float | None = None
    transactions: int = 0
    failed: int = 0
    avg_ms: float | None = None
    p99_ms: float | None = None
    connect_ms: float | None = None
    #: The pooler's user+system CPU seconds during the run (None for direct).
    pooler_cpu_s: float | None = None
    #: Share of the machine's CPU that something other than the benchmark used, in percent.
    foreign_cpu_pct: float | None = None
    error: str | None = None

    def as_dict(self) -> dict[str, Any]:
        return asdict(self)


def pgbench_env(sslmode: str) -> dict[str, str]:
    # A PGHOST or PGOPTIONS from the caller's shell must not change what is measured.
    env = {k: v for k, v in os.environ.items() if not k.startswith("PG")}
    env.update(PGPASSWORD=PASSWORD, PGSSLMODE=sslmode, PGCONNECT_TIMEOUT="30")
    return env


def initialise(pgbench: Path, port: int, scale: int, sslmode: str) -> None:
    """`pgbench -i -s scale` once, directly on the server."""
    cmd = [str(pgbench), "-i", "-q", "-s", str(scale), "-h", HOST, "-p", str(port), "-U", USER]
    proc = subprocess.run(
        [*cmd, DBNAME],
        env=pgbench_env(sslmode),
        stdin=subprocess.DEVNULL,
        capture_output=True,
        text=True,
        check=False,
    )
    if proc.returncode != 0:
        raise RuntimeError(f"pgbench -i failed:\n{proc.stdout}{proc.stderr}")


def run_pgbench(
    pgbench: Path,
    port: int,
    workload: str,
    clients: int,
    seconds: int,
    sslmode: str,
    log_dir: Path,
) -> Run:
    """One timed run; failures come back as Run.error, never as an exception."""
    for old in log_dir.glob("tx.*"):
        old.unlink()
    threads = min(clients, 4)
    cmd = [
        str(pgbench), "-n", *WORKLOADS[workload][1],
        "-c", str(clients), "-j", str(threads), "-T", str(seconds),
        "-l", f"--log-prefix={log_dir / 'tx'}",
        "-h", HOST, "-p", str(port), "-U", USER, DBNAME,
    ]  # fmt: skip
    try:
        proc = subprocess.run(
            cmd,
            env=pgbench_env(sslmode),
            stdin=subprocess.DEVNULL,
            capture_output=True,
            text=True,
            timeout=seconds + 120,
            check=False,
        )
    except subprocess.TimeoutExpired:
        return Run(error="pgbench did not finish in time")
    out = proc.stdout + proc.stderr
    result = Run()
    if m := re.search(r"^number of transactions actually processed: (\d+)", out, re.M):
        result.transactions = int(m.group(1))
    if m := re.search(r"^number of failed transactions: (\d+)", out, re.M):
        result.failed = int(m.group(1))
    if m := re.search(r"^initial connection time = ([\d.]+) ms", out, re.M):
        result.connect_ms = float(m.group(1))
    tps = re.search(r"^tps = ([\d.]+)", out, re.M)
    if proc.returncode != 0 or tps is None or result.failed or "aborted" in out:
        result.error = _first_error(out) or f"pgbench exited {proc.returncode}"
        return result
    result.tps = float(tps.group(1))
    latencies, failed = read_latency_logs(log_dir)
    for path in log_dir.glob("tx.*"):
        path.unlink()
    if latencies:
        result.avg_ms = sum(latencies) / len(latencies) / 1000
        result.p99_ms = percentile(latencies, 99) / 1000
    result.failed += failed
    return result


def _first_error(output: str) -> str | None:
    for line in output.splitlines():
        if "error" in line.lower() or "fatal" in line.lower() or "aborted" in line:
            return line.strip()[:300]
    return None


def read_latency_logs(log_dir: Path) -> tuple[list[int], int]:
    """Latencies in µs of every logged transaction (one file per pgbench thread), and failures.

    Line format: client_id transaction_no time script_no time_epoch time_us [...]; `time` is
    the latency in µs, or "failed"/"skipped" for transactions that have none.
    """
    latencies: list[int] = []
    failed = 0
    for path in sorted(log_dir.glob("tx.*")):
        with path.open() as f:
            for line in f:
                field = line.split(" ", 3)[2]
                if field.isdigit():
                    latencies.append(int(field))
                else:
                    failed += 1
    return latencies, failed


def percentile(values: list[int], pct: float) -> int:
    """Nearest-rank percentile (exact: one of the values); sorts `values` in place."""
    values.sort()
    rank = max(1, math.ceil(pct / 100 * len(values)))
    return values[rank - 1]
