"""The processes under test: a benchmark-tuned PostgreSQL, PgBouncer and the sidecar.

Everything listens on 127.0.0.1 (plus unix sockets in private directories). As root, the
PostgreSQL server and PgBouncer run as the `postgres` system user because both refuse to
run as root; the sidecar runs as whoever runs the benchmark. This module also reads the
per-process figures the benchmark reports (RSS and CPU time from /proc).
"""

from __future__ import annotations

import contextlib
import os
import pwd
import re
import shlex
import shutil
import signal
import socket
import subprocess
import sys
import time
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any
from urllib.parse import quote

HOST = "127.0.0.1"
USER = "app"
PASSWORD = "bench-pw"
DBNAME = "appdb"
REPO_ROOT = Path(__file__).resolve().parent.parent
PGBOUNCER = "/usr/sbin/pgbouncer"
CLK_TCK = os.sysconf("SC_CLK_TCK")


class BenchError(Exception):
    """Something the benchmark needs did not start or work; the text says what."""


def free_port() -> int:
    """A TCP port nobody listens on right now (the kernel's choice)."""
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as s:
        s.bind((HOST, 0))
        return int(s.getsockname()[1])


def pg_bin_dir() -> Path:
    """PostgreSQL 15's binaries (PG_BIN_DIR overrides), as the tests find them."""
    override = os.environ.get("PG_BIN_DIR")
    if override:
        return Path(override)
    default = Path("/usr/lib/postgresql/15/bin")
    if (default / "initdb").exists():
        return default
    pg_config = shutil.which("pg_config")
    if pg_config:
        out = subprocess.run([pg_config, "--bindir"], capture_output=True, text=True, check=True)
        return Path(out.stdout.strip())
    return default


def run(cmd: list[str | Path], **kwargs: Any) -> subprocess.CompletedProcess[str]:
    """Run a command to completion; raise with its output if it fails."""
    proc = subprocess.run(
        [str(c) for c in cmd],
        stdin=subprocess.DEVNULL,
        capture_output=True,
        text=True,
        check=False,
        **kwargs,
    )
    if proc.returncode != 0:
        raise BenchError(
            f"{shlex.join(str(c) for c in cmd)} exited {proc.returncode}\n"
            f"{proc.stdout}{proc.stderr}"
        )
    return proc


def wait_until(check: Callable[[], bool], timeout: float, what: str, poll: float = 0.02) -> None:
    """Poll `check` every `poll` s until it is true; raise BenchError after `timeout` s."""
    deadline = time.monotonic() + timeout
    while not check():
        if time.monotonic() > deadline:
            raise BenchError(f"timed out after {timeout:.0f}s waiting for {what}")
        time.sleep(poll)


def accepts(port: int) -> bool:
    with contextlib.suppress(OSError), socket.create_connection((HOST, port), 0.5):
        return True
    return False


@dataclass(frozen=True)
class OsUser:
    """Who runs PostgreSQL and PgBouncer: `postgres` when we are root, else ourselves."""

    uid: int
    gid: int

    @classmethod
    def for_servers(cls) -> OsUser | None:
        if os.geteuid() != 0:
            return None
        entry = pwd.getpwnam("postgres")
        return cls(entry.pw_uid, entry.pw_gid)

    def chown_tree(self, path: Path) -> None:
        os.chown(path, self.uid, self.gid)
        for root, dirs, files in os.walk(path):
            for name in dirs + files:
                os.chown(os.path.join(root, name), self.uid, self.gid)


def _as(user: OsUser | None, cwd: Path) -> dict[str, Any]:
    """subprocess arguments running a command as `user` with a minimal environment."""
    env = {"PATH": os.environ.get("PATH", "/usr/bin:/bin"), "LC_ALL": "C", "LANG": "C"}
    kwargs: dict[str, Any] = {"env": env, "cwd": cwd}
    if user is not None:
        kwargs.update(user=user.uid, group=user.gid, extra_groups=[])
    return kwargs


# --- /proc figures ---------------------------------------------------------------------------


def cpu_seconds(pid: int) -> float:
    """User + system CPU time the process has used so far."""
    text = Path(f"/proc/{pid}/stat").read_text()
    # The command name may contain spaces and parentheses: fields start after the last ")".
    fields = text[text.rindex(")") + 2 :].split()
    return (int(fields[11]) + int(fields[12])) / CLK_TCK


def _proc_times() -> dict[int, tuple[int, float, float]]:
    """pid -> (ppid, user and system CPU seconds of the process and of its reaped children)
    for every process."""
    out: dict[int, tuple[int, float, float]] = {}
    for entry in os.scandir("/proc"):
        if not entry.name.isdigit():
            continue
        try:
            text = Path(entry.path, "stat").read_text()
        except OSError:
            continue  # gone while we looked
        fields = text[text.rindex(")") + 2 :].split()
        # utime stime cutime cstime: a child's time moves into its parent's c* fields when it
        # is reaped, so a pgbench or backend that exits mid-run is still counted.
        user = int(fields[11]) + int(fields[13])
        system = int(fields[12]) + int(fields[14])
        out[int(entry.name)] = (int(fields[1]), user / CLK_TCK, system / CLK_TCK)
    return out


def tree_cpu_split(roots: set[int]) -> tuple[float, float]:
    """User and system CPU seconds used so far by the processes `roots` and all their
    descendants."""
    procs = _proc_times()
    children: dict[int, list[int]] = {}
    for pid, (ppid, _, _) in procs.items():
        children.setdefault(ppid, []).append(pid)
    user = system = 0.0
    todo = [r for r in roots if r in procs]
    while todo:
        pid = todo.pop()
        user += procs[pid][1]
        system += procs[pid][2]
        todo.extend(children.get(pid, ()))
    return user, system


def tree_cpu(roots: set[int]) -> float:
    """CPU seconds used so far by the processes `roots` and all their descendants."""
    return sum(tree_cpu_split(roots))


def machine_cpu() -> float:
    """CPU seconds the machine has spent running processes (user, nice, system) plus steal.

    Interrupt time is left out: loopback networking runs there and is not charged to any
    process, so counting it would call our own traffic someone else's load.
    """
    fields = Path("/proc/stat").read_text().splitlines()[0].split()[1:]
    user, nice, system, steal = int(fields[0]), int(fields[1]), int(fields[2]), int(fields[7])
    return (user + nice + system + steal) / CLK_TCK


class ForeignLoad:
    """How much of the machine something other than the benchmark used over an interval."""

    def __init__(self, roots: set[int]) -> None:
        self.roots = roots
        self._start = (time.monotonic(), machine_cpu(), tree_cpu(roots))

    def percent(self) -> float:
        """Foreign CPU time as a share of all CPUs' capacity since creation, in percent."""
        wall0, machine0, ours0 = self._start
        wall = time.monotonic() - wall0
        foreign = (machine_cpu() - machine0) - (tree_cpu(self.roots) - ours0)
        capacity = wall * (os.cpu_count() or 1)
        return max(0.0, 100 * foreign / capacity) if capacity > 0 else 0.0


def pooler_cpu(pid: int) -> float:
    """CPU seconds of a pooler process and its children (SIDECAR_WORKERS > 1)."""
    return tree_cpu({pid})


def pooler_cpu_split(pid: int) -> tuple[float, float]:
    """User and system CPU seconds of a pooler process and its children."""
    return tree_cpu_split({pid})


def memory_kib(pid: int) -> dict[str, int]:
    """VmRSS and VmHWM (peak RSS) in KiB of the process and its children (each worker of
    SIDECAR_WORKERS > 1 is one), summed."""
    procs = _proc_times()
    pids, todo = [], [pid]
    while todo:
        p = todo.pop()
        pids.append(p)
        todo.extend(c for c, (ppid, _, _) in procs.items() if ppid == p)
    out = {"VmRSS": 0, "VmHWM": 0}
    for p in pids:
        try:
            lines = Path(f"/proc/{p}/status").read_text().splitlines()
        except OSError:
            continue  # gone while we looked
        for line in lines:
            name, _, value = line.partition(":")
            if name in out:
                out[name] += int(value.split()[0])
    return out


# --- PostgreSQL ------------------------------------------------------------------------------


class Postgres:
    """A private cluster tuned for benchmarking (no fsync), with role `app` owning `appdb`."""

    def __init__(self, base: Path, user: OsUser | None) -> None:
        self.base = base
        self.user = user
        self.bin_dir = pg_bin_dir()
        self.data_dir = base / "data"
        self.socket_dir = base
        self.log_file = base / "postgres.log"
        self.port = free_port()

    def start(self, max_connections: int) -> None:
        if not (self.bin_dir / "initdb").exists():
            raise BenchError(
                f"PostgreSQL binaries not found in {self.bin_dir}: run scripts/bootstrap"
            )
        self.base.mkdir(parents=True, exist_ok=True)
        # TLS is always available on the server; --tls decides whether connections use it.
        run(
            [
                "openssl", "req", "-x509", "-newkey", "ec",
                "-pkeyopt", "ec_paramgen_curve:prime256v1", "-nodes",
                "-keyout", self.base / "server.key", "-out", self.base / "server.crt",
                "-days", "2", "-subj", "/CN=localhost",
            ]
        )  # fmt: skip
        (self.base / "server.key").chmod(0o600)
        if self.user is not None:
            self.user.chown_tree(self.base)
        run(
            [
                self.bin_dir / "initdb", "-D", self.data_dir, "-U", "postgres",
                "--auth=trust", "--encoding=UTF8", "--locale=C", "--no-sync",
            ],
            **_as(self.user, self.base),
        )  # fmt: skip
        for name in ("server.crt", "server.key"):
            shutil.move(self.base / name, self.data_dir / name)
        settings = {
            "listen_addresses": HOST,
            "port": str(self.port),
            "unix_socket_directories": str(self.socket_dir),
            "max_connections": str(max_connections),
            "shared_buffers": "256MB",
            "fsync": "off",
            "synchronous_commit": "off",
            "full_page_writes": "off",
            # No checkpoint in the middle of a 10 s run.
            "max_wal_size": "8GB",
            "checkpoint_timeout": "30min",
            "password_encryption": "scram-sha-256",
            "ssl": "on",
            "ssl_cert_file": "server.crt",
            "ssl_key_file": "server.key",
            "log_min_messages": "warning",
            "logging_collector": "off",
        }
        with (self.data_dir / "postgresql.conf").open("a") as conf:
            conf.write("\n# pg-sidecar benchmark settings\n")
            conf.writelines(f"{name} = '{value}'\n" for name, value in settings.items())
        (self.data_dir / "pg_hba.conf").write_text(
            "local all all trust\nhost all all 127.0.0.1/32 scram-sha-256\n"
        )
        self._pg_ctl("start", "-w", "-t", "60", "-l", self.log_file)
        self.psql(f"CREATE ROLE {USER} LOGIN PASSWORD '{PASSWORD}'")
        self.psql(f"CREATE DATABASE {DBNAME} OWNER {USER}")

    def stop(self) -> None:
        with contextlib.suppress(BenchError):
            self._pg_ctl("stop", "-m", "immediate")

    @property
    def pid(self) -> int:
        """The postmaster's pid (the root of every backend)."""
        return int((self.data_dir / "postmaster.pid").read_text().split()[0])

    def _pg_ctl(self, action: str, *args: str | Path) -> None:
        run(
            [self.bin_dir / "pg_ctl", action, "-D", self.data_dir, *args],
            **_as(self.user, self.base),
        )

    def psql(self, sql: str, dbname: str = "postgres") -> str:
        """Run SQL as the superuser over the unix socket; return unaligned, tuples-only output."""
        out = run(
            [
                self.bin_dir / "psql", "-X", "-q", "-A", "-t", "-v", "ON_ERROR_STOP=1",
                "-h", self.socket_dir, "-p", str(self.port), "-U", "postgres",
                "-d", dbname, "-c", sql,
            ]
        )  # fmt: skip
        return out.stdout.strip()

    def version(self) -> str:
        return self.psql("SHOW server_version")

    def scram_verifier(self) -> str:
        """`app`'s SCRAM verifier as stored in pg_authid (what PgBouncer's auth_file takes)."""
        return self.psql(f"SELECT rolpassword FROM pg_authid WHERE rolname = '{USER}'")

    def url(self, sslmode: str) -> str:
        return (
            f"postgres://{USER}:{quote(PASSWORD, safe='')}@{HOST}:{self.port}/{DBNAME}"
            f"?sslmode={sslmode}"
        )


# --- poolers ---------------------------------------------------------------------------------


class Pooler:
    """A long-running pooler process with its output in a log file."""

    name = ""

    def __init__(self, base: Path) -> None:
        self.base = base
        self.port = free_port()
        self.log_file = base / f"{self.name}.log"
        self.proc: subprocess.Popen[bytes] | None = None
        self.argv: list[str] = []
        self._spawned_at = 0.0
        #: Seconds from spawning the process to its port accepting (set by wait_ready).
        self.ready_s: float | None = None

    @property
    def pid(self) -> int:
        assert self.proc is not None
        return self.proc.pid

    def _spawn(self, argv: list[str], **kwargs: Any) -> None:
        self.argv = argv
        with self.log_file.open("ab") as log:
            self._spawned_at = time.monotonic()
            self.proc = subprocess.Popen(
                argv, stdin=subprocess.DEVNULL, stdout=log, stderr=subprocess.STDOUT, **kwargs
            )

    def wait_ready(self, timeout: float = 20.0) -> None:
        """Poll (every 2 ms: a refused connect costs microseconds) until the port accepts;
        `ready_s` is then the time from spawning the process to its first accepted connect."""

        def ready() -> bool:
            assert self.proc is not None
            if self.proc.poll() is not None:
                raise BenchError(
                    f"{self.name} exited with {self.proc.returncode}: {shlex.join(self.argv)}\n"
                    f"{self.log_tail()}"
                )
            return accepts(self.port)

        wait_until(ready, timeout, f"{self.name} to accept on {HOST}:{self.port}", poll=0.002)
        self.ready_s = time.monotonic() - self._spawned_at

    def alive(self) -> bool:
        return self.proc is not None and self.proc.poll() is None

    def log_tail(self, chars: int = 4000) -> str:
        try:
            return self.log_file.read_text(errors="replace")[-chars:]
        except FileNotFoundError:
            return ""

    def stop(self, timeout: float = 10.0) -> None:
        if self.proc is None or self.proc.poll() is not None:
            return
        # SIGINT is PgBouncer's "safe shutdown"; the sidecar drains on SIGINT or SIGTERM.
        self.proc.send_signal(signal.SIGINT)
        try:
            self.proc.wait(timeout)
        except subprocess.TimeoutExpired:
            self.proc.kill()
            self.proc.wait()


def pgbouncer_version(binary: str = PGBOUNCER) -> tuple[int, ...]:
    out = run([binary, "--version"]).stdout
    match = re.search(r"PgBouncer (\d+)\.(\d+)(?:\.(\d+))?", out)
    if not match:
        raise BenchError(f"cannot tell the PgBouncer version from {out!r}")
    return tuple(int(g or 0) for g in match.groups())


class PgBouncer(Pooler):
    """PgBouncer in transaction mode; app's SCRAM verifier in its auth_file."""

    name = "pgbouncer"

    def __init__(self, base: Path, user: OsUser | None) -> None:
        super().__init__(base)
        self.user = user
        self.version = pgbouncer_version()

    @property
    def supports_prepared(self) -> bool:
        """Protocol-level prepared statements in transaction mode came with 1.21."""
        return self.version >= (1, 21)

    def start(
        self,
        pg: Postgres,
        pool_size: int,
        max_clients: int,
        sslmode: str,
        client_tls: bool = False,
    ) -> None:
        self.base.mkdir(parents=True, exist_ok=True)
        # The verifier, not the password: PgBouncer then authenticates clients and servers
        # (SCRAM pass-through) without a PBKDF2 per login, like the sidecar's cached secret.
        (self.base / "userlist.txt").write_text(f'"{USER}" "{pg.scram_verifier()}"\n')
        settings = {
            "listen_addr": HOST,
            "listen_port": self.port,
            "unix_socket_dir": self.base,
            # The sidecar listens with a backlog of 4096; the default 128 would make a
            # connection storm measure SYN retries instead of the pooler.
            "listen_backlog": 4096,
            "auth_type": "scram-sha-256",
            "auth_file": self.base / "userlist.txt",
            "pool_mode": "transaction",
            "default_pool_size": pool_size,
            "max_client_conn": max_clients,
            "server_tls_sslmode": sslmode,
            "ignore_startup_parameters": "extra_float_digits,options",
            "log_connections": 0,
            "log_disconnections": 0,
            "log_stats": 0,
        }
        if self.supports_prepared:
            # 1.18 refuses to start with this line ("unknown parameter").
            settings["max_prepared_statements"] = 200
        if client_tls:
            # --client-tls: TLS for clients that ask, plaintext for the others (as the
            # sidecar's default SIDECAR_CLIENT_TLS=allow), so one process serves both
            # columns. An EC P-256 certificate, as the sidecar makes for itself.
            run(
                [
                    "openssl", "req", "-x509", "-newkey", "ec",
                    "-pkeyopt", "ec_paramgen_curve:prime256v1", "-nodes",
                    "-keyout", self.base / "client.key", "-out", self.base / "client.crt",
                    "-days", "2", "-subj", "/CN=localhost",
                ]
            )  # fmt: skip
            (self.base / "client.key").chmod(0o600)
            settings["client_tls_sslmode"] = "prefer"
            settings["client_tls_cert_file"] = self.base / "client.crt"
            settings["client_tls_key_file"] = self.base / "client.key"
        ini = self.base / "pgbouncer.ini"
        ini.write_text(
            f"[databases]\n{DBNAME} = host={HOST} port={pg.port} dbname={DBNAME}\n\n"
            "[pgbouncer]\n" + "".join(f"{k} = {v}\n" for k, v in settings.items())
        )
        if self.user is not None:
            self.user.chown_tree(self.base)
        self._spawn([PGBOUNCER, str(ini)], **_as(self.user, self.base))
        self.wait_ready()


class Sidecar(Pooler):
    """`python -m sidecar appdb=URL` from the repository, with the benchmark's settings."""

    name = "sidecar"

    def __init__(
        self,
        base: Path,
        python: str,
        workers: int = 1,
        *,
        root: Path = REPO_ROOT,
        name: str = "sidecar",
        pure: bool = False,
        expect_build: str | None = None,
        env: dict[str, str] | None = None,
        python_flags: tuple[str, ...] = (),
    ) -> None:
        self.name = name  # before Pooler.__init__, which names the log file after it
        super().__init__(base)
        self.python = python
        self.workers = workers
        #: Where `sidecar` is imported from: this checkout, or another commit's tree
        #: (`bench/run.py --baseline`); `python -m` puts the working directory first.
        self.root = root
        #: SIDECAR_PURE_PYTHON=1: the same checkout with its pure-Python modules.
        self.pure = pure
        #: "compiled" or "python": start() fails unless the at=listening line says so.
        self.expect_build = expect_build
        #: What the at=listening line said (build=...), once started.
        self.build: str | None = None
        #: More settings (the start-up figure's SIDECAR_CLIENT_TLS=off) and interpreter
        #: flags (-X importtime).
        self.extra_env = env or {}
        self.python_flags = python_flags

    def start(self, pg: Postgres, pool_size: int, max_clients: int, sslmode: str) -> None:
        self.base.mkdir(parents=True, exist_ok=True)
        # Inherited pooler settings would make results depend on the caller's shell.
        env = {k: v for k, v in os.environ.items() if not k.startswith(("SIDECAR_", "PGBOUNCER_"))}
        env.update(
            SIDECAR_PORT=str(self.port),
            SIDECAR_SOCKET_DIR=str(self.base),
            SIDECAR_DEFAULT_POOL_SIZE=str(pool_size),
            SIDECAR_MAX_CLIENT_CONN=str(max_clients),
            SIDECAR_STATS_PERIOD="0",
            SIDECAR_LOG_CONNECTIONS="0",
            SIDECAR_LOG_DISCONNECTIONS="0",
            SIDECAR_SERVER_TLS_SSLMODE=sslmode,
            SIDECAR_WORKERS=str(self.workers),
            PYTHONUNBUFFERED="1",
        )
        if self.pure:
            env["SIDECAR_PURE_PYTHON"] = "1"
        env.update(self.extra_env)
        # The sslmode comes from SIDECAR_SERVER_TLS_SSLMODE, not the URL.
        url = pg.url(sslmode).partition("?")[0]
        argv = [self.python, *self.python_flags, "-m", "sidecar", f"{DBNAME}={url}"]
        self._spawn(argv, env=env, cwd=self.root)
        self.wait_ready()
        self.build = self._listening_build()
        if self.expect_build is not None and self.build != self.expect_build:
            hint = (
                " (build the compiled modules: scripts/bootstrap or"
                " .venv/bin/python setup.py build_ext --inplace; at=build_stale in the log"
                " means a .py changed since the last build)"
                if self.expect_build == "compiled"
                else ""
            )
            raise BenchError(
                f"{self.name} runs build={self.build}, expected build={self.expect_build}"
                f"{hint}\n{self.log_tail()}"
            )

    def _listening_build(self, timeout: float = 10.0) -> str:
        """The build= field of the at=listening line (compiled / python), polled for: the
        port may accept a moment before the line is in the log."""
        found: list[str] = []

        def logged() -> bool:
            if m := re.search(r"at=listening\b.*?\bbuild=(\w+)", self.log_tail(100_000)):
                found.append(m.group(1))
            return bool(found)

        wait_until(logged, timeout, f"{self.name}'s at=listening line")
        return found[0]


class Floor(Pooler):
    """bench/floor.py: a 1:1 uvloop forwarder, the floor for a pooler written in Python."""

    name = "floor"

    def __init__(self, base: Path, python: str) -> None:
        super().__init__(base)
        self.python = python

    def start(self, pg: Postgres, sslmode: str = "disable") -> None:
        """sslmode "require": TLS towards PostgreSQL, as the poolers' server_tls_sslmode."""
        self.base.mkdir(parents=True, exist_ok=True)
        script = REPO_ROOT / "bench" / "floor.py"
        argv = [self.python, str(script), str(self.port), str(pg.port)]
        if sslmode != "disable":
            argv.append("--tls")
        self._spawn(argv, cwd=REPO_ROOT)
        self.wait_ready()


def python_for_sidecar() -> str:
    """The project's .venv interpreter when there is one, else the one running us."""
    venv = REPO_ROOT / ".venv" / "bin" / "python"
    return str(venv) if venv.exists() else sys.executable
