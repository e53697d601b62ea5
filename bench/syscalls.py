"""Where a pooler's time goes beside PgBouncer's: syscalls per transaction, and a perf profile.

Starts the bench's PostgreSQL, PgBouncer, the sidecar (compiled) and the 1:1 floor forwarder
(bench/floor.py), then, for each, runs `pgbench -S -c CLIENTS -t N` twice: once with
`strace -c -f` attached to the pooler (system calls per transaction, by name), once bare while
`perf record` samples it (the functions its CPU goes to, if perf is installed and allowed).
strace slows the traced process a lot: its counts are the figure, not the run's tps.

    python bench/syscalls.py                  # -S simple, 50 clients
    python bench/syscalls.py --extended --clients 50 --transactions 20000
"""

from __future__ import annotations

import argparse
import re
import shutil
import subprocess
import sys
import tempfile
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))
sys.path.insert(1, str(Path(__file__).resolve().parent.parent))

from procs import (
    DBNAME,
    HOST,
    USER,
    Floor,
    OsUser,
    PgBouncer,
    Pooler,
    Postgres,
    Sidecar,
    python_for_sidecar,
)
from workloads import initialise, pgbench_env

POOL = 20


def pgbench(pg: Postgres, port: int, args: argparse.Namespace) -> None:
    cmd = [
        str(pg.bin_dir / "pgbench"), "-n", "-S", "-M", "extended" if args.extended else "simple",
        "-c", str(args.clients), "-j", str(min(args.clients, 4)),
        "-t", str(args.transactions // args.clients),
        "-h", HOST, "-p", str(port), "-U", USER, DBNAME,
    ]  # fmt: skip
    subprocess.run(cmd, env=pgbench_env("disable"), check=True, capture_output=True)


def strace_counts(pooler: Pooler, pg: Postgres, args: argparse.Namespace) -> dict[str, int]:
    """System calls of the pooler's process tree during one pgbench run, by name."""
    out = Path(tempfile.mktemp(prefix="strace-"))
    tracer = subprocess.Popen(
        ["strace", "-c", "-f", "-o", str(out), "-p", str(pooler.pid)],
        stderr=subprocess.DEVNULL,
    )
    try:
        # strace attaches within a moment; a short run first so the counts start clean.
        subprocess.run(["sleep", "0.5"], check=True)
        pgbench(pg, pooler.port, args)
    finally:
        tracer.terminate()
        tracer.wait()
    counts: dict[str, int] = {}
    for line in out.read_text().splitlines():
        # % time  seconds  usecs/call  calls  [errors]  syscall
        m = re.match(r"\s*[\d.]+\s+[\d.]+\s+\d+\s+(\d+)\s+(?:\d+\s+)?(\w+)$", line)
        if m and m.group(2) != "total":
            counts[m.group(2)] = int(m.group(1))
    out.unlink()
    return counts


def perf_top(pooler: Pooler, pg: Postgres, args: argparse.Namespace, top: int = 25) -> str:
    data = Path(tempfile.mktemp(prefix="perf-"))
    rec = subprocess.Popen(
        ["perf", "record", "-q", "-F", "2000", "-o", str(data), "-p", str(pooler.pid)],
        stdout=subprocess.DEVNULL,
        stderr=subprocess.DEVNULL,
    )
    try:
        pgbench(pg, pooler.port, args)
    finally:
        rec.send_signal(2)
        rec.wait()
    report = subprocess.run(
        ["perf", "report", "-i", str(data), "--stdio", "--no-children", "--sort", "dso,sym"],
        capture_output=True,
        text=True,
        check=False,
    ).stdout
    data.unlink(missing_ok=True)
    lines = [x for x in report.splitlines() if x.strip() and not x.startswith("#")]
    return "\n".join(lines[:top])


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--clients", type=int, default=50)
    ap.add_argument("--transactions", type=int, default=20_000)
    ap.add_argument("--extended", action="store_true")
    ap.add_argument("--no-perf", action="store_true")
    args = ap.parse_args()
    if not shutil.which("strace"):
        sys.exit("strace is missing (apt-get install strace)")
    base = Path(tempfile.mkdtemp(prefix="scsys", dir="/tmp"))
    base.chmod(0o711)  # the postgres user must reach its own subdirectories (as bench/run.py)
    os_user = OsUser.for_servers()
    pg = Postgres(base / "pg", os_user)
    pg.start(200)
    poolers: list[Pooler] = []
    try:
        initialise(pg.bin_dir / "pgbench", pg.port, 1, "disable")
        bouncer = PgBouncer(base / "pgbouncer", os_user)
        bouncer.start(pg, POOL, 1000, "disable")
        sidecar = Sidecar(base / "sidecar", python_for_sidecar(), expect_build="compiled")
        sidecar.start(pg, POOL, 1000, "disable")
        floor = Floor(base / "floor", python_for_sidecar())
        floor.start(pg)
        poolers = [bouncer, sidecar, floor]
        n = args.transactions
        table: dict[str, dict[str, int]] = {}
        for pooler in poolers:
            pgbench(pg, pooler.port, args)  # warm: servers connected, caches filled
            table[pooler.name] = strace_counts(pooler, pg, args)
        names = sorted(
            {k for c in table.values() for k in c}, key=lambda k: -table["sidecar"].get(k, 0)
        )
        print(f"system calls per transaction (-S {'extended' if args.extended else 'simple'},"
              f" {args.clients} clients, {n} transactions)")  # fmt: skip
        print(f"{'syscall':<16}" + "".join(f"{p.name:>12}" for p in poolers))
        for k in names:
            print(f"{k:<16}" + "".join(f"{table[p.name].get(k, 0) / n:>12.2f}" for p in poolers))
        total = {p.name: sum(table[p.name].values()) / n for p in poolers}
        print(f"{'total':<16}" + "".join(f"{total[p.name]:>12.2f}" for p in poolers))
        if not args.no_perf and shutil.which("perf"):
            for pooler in poolers:
                print(f"\nperf: {pooler.name} (self time by shared object and symbol)")
                print(perf_top(pooler, pg, args))
    finally:
        for pooler in poolers:
            pooler.stop()
        pg.stop()
        shutil.rmtree(base, ignore_errors=True)


if __name__ == "__main__":
    main()
