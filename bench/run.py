"""pg-sidecar vs PgBouncer vs direct PostgreSQL: the one-command benchmark (see bench/README.md).

Starts a benchmark-tuned PostgreSQL 15, PgBouncer (transaction mode) and the sidecar with the
same pool size, runs the same pgbench workloads against each target interleaved round by
round, then measures idle-client memory, a connection storm and pooler CPU per transaction.
Prints a table and the target checks, writes bench/results/<stamp>.json, latest.json and
latest.png.

    python bench/run.py                  # full run: clear and --tls passes (~50 min)
    python bench/run.py --rounds 2 --seconds 6   # the same, shorter (~30 min)
    python bench/run.py --quick          # smoke run, clear only (~7 min)
    python bench/run.py --only simple,idle --clients 1,50 --seconds 5
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import os
import platform
import resource
import shutil
import statistics
import subprocess
import sys
import tempfile
import time
from collections.abc import Coroutine
from datetime import UTC, datetime
from pathlib import Path
from typing import Any, NamedTuple

BENCH_DIR = Path(__file__).resolve().parent
REPO_ROOT = BENCH_DIR.parent
VENV_PYTHON = REPO_ROOT / ".venv" / "bin" / "python"


def _use_project_venv() -> None:
    """Re-exec under the project's .venv (made by scripts/bootstrap) when it exists."""
    if not VENV_PYTHON.exists() or os.environ.get("SIDECAR_BENCH_REEXEC"):
        return
    if Path(sys.prefix).resolve() == (REPO_ROOT / ".venv").resolve():
        return
    os.environ["SIDECAR_BENCH_REEXEC"] = "1"
    os.execv(VENV_PYTHON, [str(VENV_PYTHON), __file__, *sys.argv[1:]])


if __name__ == "__main__":
    _use_project_venv()
# The sidecar package (for the load client's message builders) even when not pip-installed.
sys.path.insert(1, str(REPO_ROOT))

import loadclient  # noqa: E402
import report  # noqa: E402
from procs import (  # noqa: E402
    DBNAME,
    HOST,
    PASSWORD,
    PGBOUNCER,
    USER,
    BenchError,
    Floor,
    ForeignLoad,
    OsUser,
    PgBouncer,
    Pooler,
    Postgres,
    Sidecar,
    memory_kib,
    pooler_cpu,
    pooler_cpu_split,
    python_for_sidecar,
    run,
)
from workloads import WORKLOADS, Run, initialise, run_pgbench  # noqa: E402

EXTRAS = ("idle", "storm", "floor", "startup")
FD_LIMIT = 65536
#: Passes of the full run: how the poolers (and direct clients) reach PostgreSQL.
PASSES = {"clear": "disable", "tls": "require"}
#: Workloads the floor (bench/floor.py) runs as a target: a 1:1 forwarder shows the floor
#: under the poolers' -S figures; TPC-B's time is PostgreSQL's own.
FLOOR_WORKLOADS = ("simple", "extended")
#: Sidecar starts per variant for the start-up figure.
STARTUP_ROUNDS = 5


class Target(NamedTuple):
    """Where pgbench connects for one of A, B, C."""

    name: str
    port: int
    pooler: Pooler | None  # None: PostgreSQL itself
    sslmode: str  # the client's


def log(text: str) -> None:
    print(text, flush=True)


# --- prerequisites -------------------------------------------------------------------------


def ensure_pgbouncer() -> None:
    """apt-get install pgbouncer when it is missing, without letting it start its service."""
    if Path(PGBOUNCER).exists():
        return
    if os.geteuid() == 0:
        sudo: list[str] = []
    elif shutil.which("sudo"):
        sudo = ["sudo"]
    else:
        raise BenchError(f"{PGBOUNCER} is missing and we are not root: run scripts/bootstrap")
    log("installing pgbouncer with apt-get")
    policy = Path("/usr/sbin/policy-rc.d")
    added_policy = not policy.exists()
    if added_policy:
        # Debian's switch that keeps the package from starting a pgbouncer on 6432.
        run([*sudo, "sh", "-c", f"printf '#!/bin/sh\\nexit 101\\n' > {policy}; chmod 755 {policy}"])
    try:
        env = {**os.environ, "DEBIAN_FRONTEND": "noninteractive"}
        run([*sudo, "apt-get", "update", "-q"], env=env)
        run(
            [
                *sudo, "apt-get", "install", "-y", "-q", "--no-install-recommends",
                "-o", "Dpkg::Options::=--force-confdef", "-o", "Dpkg::Options::=--force-confold",
                "pgbouncer",
            ],
            env=env,
        )  # fmt: skip
    finally:
        if added_policy:
            run([*sudo, "rm", "-f", str(policy)])
    if Path("/run/postgresql/pgbouncer.pid").exists():
        subprocess.run([*sudo, "service", "pgbouncer", "stop"], check=False, capture_output=True)


def bench_requirements() -> list[str]:
    """The `bench` extra of pyproject.toml (matplotlib)."""
    import tomllib

    with (REPO_ROOT / "pyproject.toml").open("rb") as f:
        extras = tomllib.load(f).get("project", {}).get("optional-dependencies", {})
    return list(extras.get("bench", ["matplotlib"]))


def ensure_matplotlib() -> bool:
    try:
        import matplotlib  # noqa: F401
    except ImportError:
        pass
    else:
        return True
    requirements = bench_requirements()
    log(f"installing {' '.join(requirements)} into {sys.prefix} with pip")
    proc = subprocess.run(
        [
            sys.executable,
            "-m",
            "pip",
            "install",
            "-q",
            "--disable-pip-version-check",
            *requirements,
        ],
        check=False,
    )
    if proc.returncode != 0:
        log("WARNING: could not install matplotlib; the PNG chart will be skipped")
        return False
    return True


def raise_fd_limit() -> int:
    """10,000 idle clients need 10,000+ descriptors here and in the poolers (they inherit it)."""
    soft, hard = resource.getrlimit(resource.RLIMIT_NOFILE)
    want = max(soft, FD_LIMIT)
    with contextlib.suppress(ValueError, OSError):
        resource.setrlimit(resource.RLIMIT_NOFILE, (want, max(hard, want)))
        return want
    with contextlib.suppress(ValueError, OSError):
        resource.setrlimit(resource.RLIMIT_NOFILE, (hard, hard))
    return resource.getrlimit(resource.RLIMIT_NOFILE)[0]


# --- measuring -----------------------------------------------------------------------------


def run_async(coro: Coroutine[Any, Any, Any]) -> Any:
    try:
        import uvloop
    except ImportError:
        return asyncio.run(coro)
    return uvloop.run(coro)


def settle(pooler: Pooler | None) -> None:
    """Let the last run's disconnects finish: wait until the pooler is idle (at most 3 s)."""
    time.sleep(0.1)
    if pooler is None or not pooler.alive():
        return
    deadline = time.monotonic() + 3
    while time.monotonic() < deadline:
        before = pooler_cpu(pooler.pid)
        time.sleep(0.1)
        if pooler_cpu(pooler.pid) - before < 0.01:
            return


def settle_direct(pg: Postgres, most: int) -> None:
    """After a direct run, wait (at most 5 s) until its backends have exited."""
    deadline = time.monotonic() + 5
    sql = f"SELECT count(*) FROM pg_stat_activity WHERE usename = '{USER}'"
    while int(pg.psql(sql) or 0) > most and time.monotonic() < deadline:
        time.sleep(0.05)


class Bench:
    """One benchmark session: the processes, the options and what has been measured.

    PostgreSQL runs for the whole session; the poolers run for one pass (start_pass), with
    the pass's sslmode towards the server.
    """

    def __init__(self, args: argparse.Namespace, base: Path) -> None:
        self.args = args
        self.base = base
        self.os_user = OsUser.for_servers()
        self.pg = Postgres(base / "pg", self.os_user)
        self.pgbench = self.pg.bin_dir / "pgbench"
        self.log_dir = base / "pgbench-logs"
        self.log_dir.mkdir()
        self.baseline_tree = REPO_ROOT
        if args.baseline:
            self.baseline_tree = export_tree(
                args.baseline, args.baseline_commit, base / "baseline-src"
            )
        self._make_poolers(args.passes[0], PASSES[args.passes[0]])

    def _make_poolers(self, pass_name: str, sslmode: str) -> None:
        a, base, python = self.args, self.base / pass_name, python_for_sidecar()
        self.pass_name = pass_name
        self.sslmode = sslmode
        self.pgbouncer = PgBouncer(base / "pgbouncer", self.os_user)
        # The checkout's compiled build, and the same checkout forced pure: each must say
        # so in its at=listening line, or the run stops (a stale .so would run pure).
        self.sidecar = Sidecar(base / "sidecar", python, a.workers, expect_build="compiled")
        self.pure: Sidecar | None = None
        if a.pure:
            self.pure = Sidecar(
                base / "sidecar-pure",
                python,
                a.workers,
                name="sidecar-pure",
                pure=True,
                expect_build="python",
            )
        self.floor = Floor(base / "floor", python)
        #: The sidecar at another commit (--baseline), run beside this one.
        self.baseline: Sidecar | None = None
        if a.baseline:
            self.baseline = Sidecar(
                base / "baseline", python, a.workers, root=self.baseline_tree, name="baseline"
            )

    def targets(self, workload: str = "simple") -> list[Target]:
        """direct, pgbouncer, sidecar, sidecar-pure, floor, ..., in this order in every round.

        Clients reach the poolers in clear; direct clients use the sslmode the poolers use
        towards the server, so each path has one TLS leg. The floor (a 1:1 forwarder, the
        same TLS leg as the poolers) runs the -S workloads. With --client-tls, two more
        targets: the same two poolers with clients at sslmode=require (pgbench's PGSSLMODE),
        interleaved with the rest in every round, so the cost of client TLS comes from one run.
        """
        targets = [
            Target("direct", self.pg.port, None, self.sslmode),
            Target("pgbouncer", self.pgbouncer.port, self.pgbouncer, "disable"),
            Target("sidecar", self.sidecar.port, self.sidecar, "disable"),
        ]
        if self.pure is not None:
            targets.append(Target("sidecar-pure", self.pure.port, self.pure, "disable"))
        if self.args.floor_target and workload in FLOOR_WORKLOADS:
            targets.append(Target("floor", self.floor.port, self.floor, "disable"))
        if self.baseline is not None:
            targets.append(Target("baseline", self.baseline.port, self.baseline, "disable"))
        if self.args.client_tls:
            targets += [
                Target("pgbouncer+tls", self.pgbouncer.port, self.pgbouncer, "require"),
                Target("sidecar+tls", self.sidecar.port, self.sidecar, "require"),
            ]
        return targets

    def unsupported(self, workload: str, target: Target) -> str | None:
        """Why `target` cannot run `workload` at all, if it cannot."""
        pgbouncer = self.pgbouncer
        if (
            workload == "prepared"
            and target.pooler is pgbouncer
            and not pgbouncer.supports_prepared
        ):
            # 1.18 fails as soon as two clients share a server ("prepared statement P_0
            # already exists"); with one client it works only by luck of server reuse.
            v = ".".join(map(str, pgbouncer.version))
            return f"PgBouncer {v} has no prepared statement support in transaction mode"
        return None

    def start(self) -> None:
        """PostgreSQL, for the whole session (the poolers: start_pass)."""
        a = self.args
        max_clients = max(a.clients, default=1)
        log(f"starting PostgreSQL in {self.pg.base}")
        # direct and floor open one backend per client; each pooler its pool.
        self.pg.start(max_connections=max(600, max_clients + 5 * a.pool_size + 50))
        log(f"pgbench -i -s {a.scale}")
        initialise(self.pgbench, self.pg.port, a.scale, "disable")
        with contextlib.suppress(BenchError):
            # Everything in shared_buffers from the start, so round 1 is not the cold one.
            self.pg.psql("CREATE EXTENSION IF NOT EXISTS pg_prewarm", DBNAME)
            self.pg.psql(
                "SELECT pg_prewarm(c.oid) FROM pg_class c"
                " WHERE c.relname LIKE 'pgbench%' AND c.relkind IN ('r', 'i')",
                DBNAME,
            )

    def start_pass(self, pass_name: str, sslmode: str) -> None:
        """The poolers (and the floor) of one pass, towards PostgreSQL at `sslmode`."""
        a = self.args
        self._make_poolers(pass_name, sslmode)
        max_conn = max(20000, a.idle_clients + 1000)
        self.pgbouncer.start(self.pg, a.pool_size, max_conn, self.sslmode, a.client_tls)
        for sidecar in (self.sidecar, self.pure, self.baseline):
            if sidecar is not None:
                sidecar.start(self.pg, a.pool_size, max_conn, self.sslmode)
        self.floor.start(self.pg, self.sslmode)
        log(
            f"pass {pass_name}: pooler->server sslmode={self.sslmode}; pgbouncer"
            f" {'.'.join(map(str, self.pgbouncer.version))} on :{self.pgbouncer.port},"
            f" sidecar (build={self.sidecar.build}) on :{self.sidecar.port}"
            + (
                f", sidecar-pure (build={self.pure.build}) on :{self.pure.port}"
                if self.pure is not None
                else ""
            )
            + f", floor on :{self.floor.port}, PostgreSQL on :{self.pg.port}"
            + (
                f"; baseline sidecar ({a.baseline}, build={self.baseline.build})"
                f" on :{self.baseline.port}"
                if self.baseline is not None
                else ""
            )
        )

    def poolers(self) -> list[Pooler]:
        out: list[Pooler | None] = [
            self.sidecar, self.pure, self.pgbouncer, self.floor, self.baseline
        ]  # fmt: skip
        return [p for p in out if p is not None]

    def stop_pass(self) -> None:
        for pooler in self.poolers():
            pooler.stop()

    def foreign_load(self) -> ForeignLoad:
        """Start watching what else uses the CPUs.

        Ours is this process's tree (pgbench, both poolers) and the postmaster's (backends).
        """
        return ForeignLoad({os.getpid(), self.pg.pid})

    def stop(self) -> None:
        self.stop_pass()
        self.pg.stop()

    def one_run(self, workload: str, clients: int, target: Target, secs: int) -> Run:
        pooler = target.pooler
        if pooler is not None and not pooler.alive():
            assert pooler.proc is not None
            return Run(error=f"{pooler.name} process is gone (exit {pooler.proc.returncode})")
        before = pooler_cpu(pooler.pid) if pooler else 0.0
        foreign = self.foreign_load()
        result = run_pgbench(
            self.pgbench, target.port, workload, clients, secs, target.sslmode, self.log_dir
        )
        result.foreign_cpu_pct = round(foreign.percent(), 1)
        if pooler is not None and pooler.alive():
            result.pooler_cpu_s = round(pooler_cpu(pooler.pid) - before, 3)
        if pooler is None:
            # Only the poolers' own server connections may stay.
            settle_direct(self.pg, 2 * self.args.pool_size)
        else:
            settle(pooler)
        return result

    def warm_up(self) -> None:
        clients = min(50, max(self.args.clients, default=1))
        secs = 1 if self.args.quick else 2
        if self.sslmode != "disable":
            # 50 poolers' TLS handshakes to PostgreSQL first: a 1 s run may end before its
            # first transaction on a busy machine.
            secs = 3
        if self.args.client_tls:
            # 50 TLS handshakes and SCRAM logins at once take pgbench itself over a second
            # on a small machine: too little of a 2 s run would be left for a tps figure.
            secs = 4
        log(f"warm-up: -S simple, {clients} clients, {secs} s per target (not recorded)")
        for target in self.targets("simple"):
            result = self.one_run("simple", clients, target, secs)
            if result.error:
                raise BenchError(f"warm-up against {target.name} failed: {result.error}")

    def matrix(self) -> list[dict[str, Any]]:
        a = self.args
        cells: list[dict[str, Any]] = []
        total = sum(len(self.targets(w)) for w in a.workloads) * len(a.clients) * a.rounds
        done = 0
        started = time.monotonic()
        for workload in a.workloads:
            for clients in a.clients:
                runs: dict[str, list[Run]] = {t.name: [] for t in self.targets(workload)}
                for rnd in range(1, a.rounds + 1):
                    for target in self.targets(workload):
                        done += 1
                        why_not = self.unsupported(workload, target)
                        if why_not:
                            result = Run(error=why_not)
                        else:
                            result = self.one_run(workload, clients, target, a.seconds)
                        runs[target.name].append(result)
                        elapsed = time.monotonic() - started
                        eta = elapsed / done * (total - done)
                        line = _run_line(workload, clients, rnd, target.name, result)
                        log(
                            f"[{self.pass_name} {done:>3}/{total}] {line}"
                            f"  (pass eta {eta / 60:.1f} min)"
                        )
                cells.append(report.cell_result(workload, clients, runs))
        return cells

    def idle(self) -> dict[str, Any]:
        out: dict[str, Any] = {}
        for pooler in (self.sidecar, self.pgbouncer):
            out[pooler.name] = run_async(self._idle(pooler))
            r = out[pooler.name]
            log(
                f"idle clients  {pooler.name}: {r['clients_ok']:,} logged in,"
                f" RSS {r['rss_mib']} MiB"
            )
            settle(pooler)
        return out

    async def _idle(self, pooler: Pooler) -> dict[str, Any]:
        wanted = self.args.idle_clients
        before = memory_kib(pooler.pid)
        foreign = self.foreign_load()
        conns, outcome = await loadclient.open_idle(
            HOST, pooler.port, USER, PASSWORD, DBNAME, wanted
        )
        # Give the pooler a moment to finish whatever the logins left it doing.
        await asyncio.sleep(0.5)
        mem = memory_kib(pooler.pid)
        await loadclient.close_all(conns)
        per_client = (mem["VmRSS"] - before["VmRSS"]) / len(conns) if conns else None
        return {
            "wanted": wanted,
            "clients_ok": outcome.ok,
            "errors": sum(outcome.errors.values()),
            "error_kinds": dict(outcome.errors.most_common(5)),
            "open_s": round(outcome.seconds, 2),
            "rss_before_mib": round(before["VmRSS"] / report.MIB, 1),
            "rss_mib": round(mem["VmRSS"] / report.MIB, 1),
            "hwm_mib": round(mem["VmHWM"] / report.MIB, 1),
            "kib_per_client": None if per_client is None else round(per_client, 2),
            "foreign_cpu_pct": round(foreign.percent(), 1),
        }

    def storm(self) -> dict[str, Any]:
        count = self.args.storm_clients
        rounds: dict[str, list[loadclient.Outcome]] = {"sidecar": [], "pgbouncer": []}
        foreign: dict[str, list[float]] = {"sidecar": [], "pgbouncer": []}
        for rnd in range(1, self.args.rounds + 1):
            for pooler in (self.sidecar, self.pgbouncer):
                # One login first so the client's salted-password cache is warm.
                run_async(self._one_login(pooler))
                watch = self.foreign_load()
                outcome = run_async(
                    loadclient.storm(HOST, pooler.port, USER, PASSWORD, DBNAME, count)
                )
                foreign[pooler.name].append(round(watch.percent(), 1))
                rounds[pooler.name].append(outcome)
                errors = sum(outcome.errors.values())
                log(
                    f"storm round {rnd} {pooler.name}: {outcome.seconds:.2f} s, {errors} errors"
                    f"{_other_load(foreign[pooler.name][-1])}"
                )
                settle(pooler)
        out: dict[str, Any] = {}
        for name, outcomes in rounds.items():
            kinds: dict[str, int] = {}
            for o in outcomes:
                for kind, n in o.errors.items():
                    kinds[kind] = kinds.get(kind, 0) + n
            out[name] = {
                "clients": count,
                "median_s": round(statistics.median(o.seconds for o in outcomes), 3),
                "max_s": round(max(o.seconds for o in outcomes), 3),
                "rounds_s": [round(o.seconds, 3) for o in outcomes],
                "errors": sum(kinds.values()),
                "error_kinds": kinds,
                "foreign_cpu_pct": foreign[name],
            }
        return out

    def cpu_split(self) -> dict[str, Any]:
        """User and system CPU per 10,000 transactions (-S simple, 50 clients, interleaved
        rounds) of PgBouncer, the sidecar and bench/floor.py, the floor for any pooler written
        in Python: which part of the gap is the kernel, Python itself, or the sidecar's work."""
        a = self.args
        poolers: list[Pooler] = [self.pgbouncer, self.sidecar]
        if self.pure is not None:
            poolers.append(self.pure)
        poolers.append(self.floor)
        runs: dict[str, list[tuple[float, float]]] = {p.name: [] for p in poolers}
        foreign: dict[str, list[float]] = {p.name: [] for p in poolers}
        for rnd in range(1, a.rounds + 1):
            for pooler in poolers:
                user0, system0 = pooler_cpu_split(pooler.pid)
                watch = self.foreign_load()
                r = run_pgbench(
                    self.pgbench, pooler.port, "simple", 50, a.seconds, "disable", self.log_dir
                )
                user1, system1 = pooler_cpu_split(pooler.pid)
                if r.error or not r.transactions:
                    raise BenchError(f"cpu split through {pooler.name}: {r.error}")
                per = 10_000 / r.transactions
                user, system = (user1 - user0) * per, (system1 - system0) * per
                runs[pooler.name].append((user, system))
                foreign[pooler.name].append(round(watch.percent(), 1))
                log(
                    f"cpu split round {rnd} {pooler.name}: user {user:.3f} s + system"
                    f" {system:.3f} s per 10,000 transactions"
                    f"{_other_load(foreign[pooler.name][-1])}"
                )
                settle(pooler)
        return {
            name: {
                "user_s": round(statistics.median(u for u, _ in values), 3),
                "system_s": round(statistics.median(s for _, s in values), 3),
                "foreign_cpu_pct": foreign[name],
            }
            for name, values in runs.items()
        }

    def startup(self) -> dict[str, Any]:
        """Seconds from spawning `python -m sidecar` to its port accepting, per variant,
        interleaved over STARTUP_ROUNDS rounds: the compiled and the pure build with the
        defaults (SIDECAR_CLIENT_TLS=allow: a certificate is made at start) and the compiled
        build with client TLS off. Then one start per build under `-X importtime`: the
        imports that take the most of it."""
        python = python_for_sidecar()
        variants: dict[str, dict[str, Any]] = {
            "compiled": {"pure": False, "env": {}},
            "pure": {"pure": True, "env": {}},
            "compiled, client TLS off": {"pure": False, "env": {"SIDECAR_CLIENT_TLS": "off"}},
        }
        times: dict[str, list[float]] = {name: [] for name in variants}
        foreign: list[float] = []
        n = 0
        for rnd in range(1, STARTUP_ROUNDS + 1):
            for name, v in variants.items():
                n += 1
                sidecar = Sidecar(
                    self.base / "startup" / str(n),
                    python,
                    name="startup",
                    pure=v["pure"],
                    expect_build="python" if v["pure"] else "compiled",
                    env=v["env"],
                )
                watch = self.foreign_load()
                try:
                    sidecar.start(self.pg, self.args.pool_size, 100, self.sslmode)
                finally:
                    sidecar.stop()
                foreign.append(round(watch.percent(), 1))
                assert sidecar.ready_s is not None
                times[name].append(sidecar.ready_s)
            log(
                f"start-up round {rnd}: "
                + ", ".join(f"{name} {t[-1] * 1000:.0f} ms" for name, t in times.items())
                + _other_load(foreign[-1])
            )
        out: dict[str, Any] = {
            name: {
                "median_ms": round(statistics.median(t) * 1000, 1),
                "max_ms": round(max(t) * 1000, 1),
                "rounds_ms": [round(x * 1000, 1) for x in t],
            }
            for name, t in times.items()
        }
        if self.pgbouncer.ready_s is not None:
            out["pgbouncer"] = {"once_ms": round(self.pgbouncer.ready_s * 1000, 1)}
        out["foreign_cpu_pct"] = foreign
        out["importtime"] = {
            build: self._importtime(python, pure)
            for build, pure in (("compiled", False), ("pure", True))
        }
        return out

    def _importtime(self, python: str, pure: bool) -> list[dict[str, Any]]:
        """The imports of one start (to accepting), under -X importtime: the top-level ones
        (nested 0: including those a function makes at run time, as cryptography's) and
        those sidecar.__main__ makes directly (nested 1), the largest first, in ms."""
        sidecar = Sidecar(
            self.base / "startup" / ("importtime-pure" if pure else "importtime"),
            python,
            name="startup",
            pure=pure,
            python_flags=("-X", "importtime"),
        )
        try:
            sidecar.start(self.pg, self.args.pool_size, 100, self.sslmode)
        finally:
            sidecar.stop()
        return parse_importtime(sidecar.log_tail(10_000_000))

    async def _one_login(self, pooler: Pooler) -> None:
        conn = await loadclient.Conn.login(HOST, pooler.port, USER, PASSWORD, DBNAME)
        conn.close()


def parse_importtime(text: str, top: int = 10) -> list[dict[str, Any]]:
    """`-X importtime` lines -> the `top` largest imports of nesting 0 and 1 (cumulative)."""
    found: list[dict[str, Any]] = []
    for line in text.splitlines():
        if not line.startswith("import time:") or "self [us]" in line:
            continue
        _, cumulative, name = line[len("import time:") :].split("|", 2)
        nested = (len(name) - len(name.lstrip(" ")) - 1) // 2
        if nested <= 1:
            found.append(
                {"module": name.strip(), "nested": nested, "ms": round(int(cumulative) / 1000, 1)}
            )
    found.sort(key=lambda x: -float(x["ms"]))
    return found[:top]


def _run_line(workload: str, clients: int, rnd: int, name: str, r: Run) -> str:
    what = f"{WORKLOADS[workload][0]:<11} {clients:>3} cl  round {rnd}  {name:<13}"
    if r.error:
        return f"{what}  n/a: {r.error}"
    cpu = f"  pooler cpu {r.pooler_cpu_s:.2f} s" if r.pooler_cpu_s is not None else ""
    return (
        f"{what} {r.tps:>9,.0f} tps  avg {r.avg_ms:.3f} ms  p99 {r.p99_ms:.3f} ms{cpu}"
        f"{_other_load(r.foreign_cpu_pct)}"
    )


def _other_load(pct: float | None) -> str:
    """A warning for progress lines when something else used the machine noticeably."""
    return f"  [other load {pct:.0f}%]" if pct is not None and pct > 5 else ""


def resolve_commit(ref: str) -> str:
    """The full hash of git commit `ref` of this repository."""
    proc = subprocess.run(
        ["git", "-C", str(REPO_ROOT), "rev-parse", "--verify", "--quiet", f"{ref}^{{commit}}"],
        capture_output=True,
        text=True,
    )
    if proc.returncode != 0:
        raise BenchError(f"--baseline {ref}: not a commit of the repository in {REPO_ROOT}")
    return proc.stdout.strip()


def export_tree(ref: str, commit: str, dest: Path) -> Path:
    """The files of `commit` of this repository, in `dest` (git archive: no checkout)."""
    dest.mkdir(parents=True)
    archive = subprocess.Popen(
        ["git", "-C", str(REPO_ROOT), "archive", "--format=tar", commit], stdout=subprocess.PIPE
    )
    assert archive.stdout is not None
    untar = subprocess.run(["tar", "-x", "-C", str(dest)], stdin=archive.stdout)
    archive.stdout.close()  # ours: git sees a broken pipe if tar stopped early
    if archive.wait() != 0 or untar.returncode != 0:
        raise BenchError(f"--baseline {ref}: could not export commit {commit} into {dest}")
    build_in_place(dest)
    return dest


def build_in_place(tree: Path) -> None:
    """Compile the exported tree's hot path as this checkout's is (setup.py, with the .venv's
    Cython from the dev extra), so the baseline runs the same build as `sidecar`: a compiled
    HEAD against a pure baseline would measure the build, not the change. A commit from before
    setup.py, or one that does not compile, runs pure (the pass's first line says which)."""
    if not (tree / "setup.py").exists():
        return
    log(f"compiling the baseline's hot path in {tree}")
    proc = subprocess.run(
        [sys.executable, "setup.py", "-q", "build_ext", "--inplace"],
        cwd=tree,
        capture_output=True,
        text=True,
        check=False,
    )
    if proc.returncode != 0 or "build=compiled" not in proc.stderr:
        log(f"WARNING: the baseline did not compile; it runs pure:\n{proc.stderr[-2000:]}")


def git_describe() -> dict[str, Any]:
    def git(*args: str) -> str:
        proc = subprocess.run(
            ["git", "-C", str(REPO_ROOT), *args], capture_output=True, text=True, check=False
        )
        return proc.stdout.strip()

    return {"commit": git("rev-parse", "HEAD"), "dirty": bool(git("status", "--porcelain"))}


def loadavg() -> str:
    """1, 5 and 15 minute load averages: something else busy on the machine shows here."""
    return " ".join(Path("/proc/loadavg").read_text().split()[:3])


def machine_note(cpus: int | None) -> str:
    return (
        f"Machine: {cpus} CPUs shared by pgbench, the pooler and PostgreSQL (and its backends)."
        " A pooler's own CPU use is taken from what pgbench and PostgreSQL get, so on a small"
        " machine ratios compare the poolers' efficiency under the same contention; direct tps"
        " is not an upper bound for the poolers (direct has no pooler but 500 backends)."
    )


# --- command line --------------------------------------------------------------------------


def _int_list(text: str) -> list[int]:
    return [int(x) for x in text.split(",") if x.strip()]


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawTextHelpFormatter)
    p.add_argument(
        "--quick", action="store_true", help="smoke run: 3 s, 2 rounds, 1 and 50 clients"
    )
    p.add_argument("--seconds", type=int, help="length of each pgbench run (default 6)")
    p.add_argument("--rounds", type=int, help="interleaved rounds per cell (default 3)")
    p.add_argument("--clients", type=_int_list, help="client counts (default 1,50,500)")
    p.add_argument(
        "--only",
        help=f"comma-separated subset of: {','.join(WORKLOADS)},{','.join(EXTRAS)} (default all)",
    )
    p.add_argument(
        "--passes",
        help="comma-separated passes, each the whole table again with the poolers restarted:\n"
        "clear (sslmode=disable to PostgreSQL), tls (sslmode=require). Default clear,tls\n"
        "(--quick: clear)",
    )
    p.add_argument("--tls", action="store_true", help="the tls pass only (--passes tls)")
    p.add_argument(
        "--no-pure",
        dest="pure",
        action="store_false",
        help="leave out the sidecar-pure target (the checkout with SIDECAR_PURE_PYTHON=1)",
    )
    p.add_argument(
        "--no-floor",
        dest="floor_target",
        action="store_false",
        help="leave out the floor target (bench/floor.py) of the -S workloads",
    )
    p.add_argument(
        "--client-tls",
        action="store_true",
        help="also run both poolers with clients at sslmode=require (targets pgbouncer+tls,\n"
        "sidecar+tls, interleaved): the cost of TLS between app and pooler",
    )
    p.add_argument("--pool-size", type=int, default=20, help="server connections per pooler")
    p.add_argument(
        "--workers", type=int, default=1, help="SIDECAR_WORKERS for the sidecar (default 1)"
    )
    p.add_argument(
        "--baseline",
        metavar="REF",
        help="also run the sidecar of this git commit (e.g. HEAD~1, main) beside this one,\n"
        "interleaved: before/after figures from one run",
    )
    p.add_argument("--scale", type=int, default=10, help="pgbench -i scale (default 10)")
    p.add_argument("--idle-clients", type=int, default=10_000, help="for the idle RSS figure")
    p.add_argument("--storm-clients", type=int, default=1_000, help="for the connection storm")
    p.add_argument("--out", type=Path, default=BENCH_DIR / "results", help="results directory")
    p.add_argument("--keep", action="store_true", help="keep the temp dir (configs, logs)")
    args = p.parse_args(argv)
    args.seconds = args.seconds or (3 if args.quick else 6)
    args.rounds = args.rounds or (2 if args.quick else 3)
    args.clients = args.clients or ([1, 50] if args.quick else [1, 50, 500])
    chosen = [x.strip() for x in (args.only or "").split(",") if x.strip()]
    unknown = set(chosen) - set(WORKLOADS) - set(EXTRAS)
    if unknown:
        p.error(f"--only: unknown {', '.join(sorted(unknown))}")
    args.workloads = [w for w in WORKLOADS if not chosen or w in chosen]
    args.extras = [e for e in EXTRAS if not chosen or e in chosen]
    if args.passes is None:
        args.passes = "tls" if args.tls else "clear" if args.quick else "clear,tls"
    elif args.tls:
        p.error("--tls is --passes tls: give one of them")
    args.passes = [x.strip() for x in args.passes.split(",") if x.strip()]
    if (
        not args.passes
        or set(args.passes) - set(PASSES)
        or len(set(args.passes)) < len(args.passes)
    ):
        p.error(f"--passes: a list of {', '.join(PASSES)}, each at most once")
    if args.rounds < 1 or args.seconds <= 0 or not all(c > 0 for c in args.clients):
        p.error("--rounds, --seconds and --clients must be positive")
    return args


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    ensure_pgbouncer()
    chart = ensure_matplotlib()
    fd_limit = raise_fd_limit()
    need = args.idle_clients + 200
    if "idle" in args.extras and fd_limit < need:
        log(f"WARNING: fd limit {fd_limit} < {need}; idle-client logins beyond it will fail")
    if args.baseline:
        try:
            args.baseline_commit = resolve_commit(args.baseline)
        except BenchError as exc:
            log(f"benchmark failed: {exc}")
            return 1
    base = Path(tempfile.mkdtemp(prefix="scbench", dir="/tmp"))
    base.chmod(0o711)  # the postgres user must reach its own subdirectories
    try:
        bench = Bench(args, base)
    except BenchError as exc:
        log(f"benchmark failed: {exc}")
        shutil.rmtree(base, ignore_errors=True)
        return 1
    stamp = datetime.now(UTC).strftime("%Y%m%dT%H%M%SZ")
    started = time.monotonic()
    cpus = os.cpu_count()
    load_start = loadavg()
    log(machine_note(cpus))
    probe = ForeignLoad({os.getpid()})
    time.sleep(1)
    busy = probe.percent()
    log(
        f"other processes use {busy:.0f}% of the CPUs right now"
        + (": expect disturbed figures" if busy > report.DISTURBED_PCT else "")
    )
    try:
        bench.start()
        meta: dict[str, Any] = {
            "timestamp": stamp,
            "cpus": cpus,
            "kernel": platform.release(),
            "python": platform.python_version(),
            "postgres": bench.pg.version(),
            "pgbouncer": ".".join(map(str, bench.pgbouncer.version)),
            "sidecar_git": git_describe(),
            "seconds": args.seconds,
            "rounds": args.rounds,
            "clients": args.clients,
            "workloads": args.workloads,
            "pool_size": args.pool_size,
            "sidecar_workers": args.workers,
            "baseline": (
                {
                    "ref": args.baseline,
                    "commit": args.baseline_commit,
                }
                if args.baseline
                else None
            ),
            "scale": args.scale,
            "passes": {name: PASSES[name] for name in args.passes},
            "sidecar_pure": args.pure,
            "floor_target": args.floor_target,
            "client_tls": args.client_tls,
            "pgbench_threads": "min(clients, 4)",
            "fd_limit": fd_limit,
            "loadavg_start": load_start,
            "foreign_cpu_pct_at_start": round(busy, 1),
        }
        passes: list[dict[str, Any]] = []
        extras: dict[str, Any] = {}
        for number, pass_name in enumerate(args.passes):
            bench.start_pass(pass_name, PASSES[pass_name])
            cells: list[dict[str, Any]] = []
            if args.workloads:
                bench.warm_up()
                cells = bench.matrix()
            passes.append({"name": pass_name, "server_sslmode": PASSES[pass_name], "cells": cells})
            if number == 0:
                # Memory, logins and start-up do not depend on the server leg's TLS: once.
                if "idle" in args.extras:
                    extras["idle"] = bench.idle()
                if "storm" in args.extras:
                    extras["storm"] = bench.storm()
                if "floor" in args.extras:
                    extras["cpu_split"] = bench.cpu_split()
                if "startup" in args.extras:
                    extras["startup"] = bench.startup()
            bench.stop_pass()
        for pass_result in passes:
            simple50 = report.find_cell(pass_result["cells"], "simple", 50)
            if simple50:
                pass_result["cpu"] = {
                    name: t["cpu_s_per_10k_tx"]
                    for name, t in simple50["targets"].items()
                    if name != "direct"
                }
        checks = report.check_targets(passes, extras)
        meta["duration_s"] = round(time.monotonic() - started, 1)
        meta["loadavg_end"] = loadavg()
        results = {"meta": meta, "passes": passes, "extras": extras, "targets": checks}
        paths = report.write_json(results, args.out, stamp)
        if chart and any(x["cells"] for x in passes):
            pngs = [args.out / f"{stamp}.png", args.out / "latest.png"]
            report.render_chart(passes, meta, pngs)
            paths += pngs
        log("")
        log(
            f"pgbench -T {args.seconds:g}, {args.rounds} interleaved rounds, pool size"
            f" {args.pool_size}, scale {args.scale}, PostgreSQL {meta['postgres']},"
            f" PgBouncer {meta['pgbouncer']}"
            + (f", SIDECAR_WORKERS={args.workers}" if args.workers > 1 else "")
        )
        for pass_result in passes:
            cells = pass_result["cells"]
            if not cells:
                continue
            log(
                f"\n=== pass {pass_result['name']}: poolers and direct clients to PostgreSQL at"
                f" sslmode={pass_result['server_sslmode']} ==="
            )
            log(report.table(cells) + "\n")
            log(report.cpu_latency_table(cells) + "\n")
            if args.baseline:
                log(report.baseline_text(cells, args.baseline) + "\n")
            if args.client_tls:
                log(report.client_tls_text(cells) + "\n")
        if extras:
            log(report.extras_text(extras) + "\n")
        log("Targets (issue #14; the compiled sidecar against PgBouncer, same run):")
        log(report.targets_text(checks) + "\n")
        log(machine_note(cpus))
        all_cells = [c for x in passes for c in x["cells"]]
        if all_cells:
            log(report.foreign_text(all_cells))
        log(f"Wrote {', '.join(str(p) for p in paths)} in {meta['duration_s'] / 60:.1f} min")
        return 0
    except BenchError as exc:
        log(f"benchmark failed: {exc}")
        for pooler in bench.poolers():
            if pooler.proc is not None:
                log(f"--- {pooler.name} log tail ---\n{pooler.log_tail()}")
        return 1
    finally:
        bench.stop()
        if args.keep:
            log(f"kept {base}")
        else:
            shutil.rmtree(base, ignore_errors=True)


if __name__ == "__main__":
    sys.exit(main())
