"""`make demo`: a leader, two followers behind a round-robin DNS name, and the sidecar between.

Starts, on loopback only and with the test suite's own fixtures (tests/pgfixtures.py,
tests/followers.py, tests/dnsserver.py):

- a PostgreSQL 15 leader on 127.0.0.1 (TLS, SCRAM; role `app`, database `appdb`);
- streaming followers on 127.0.0.2:5432, 127.0.0.3:5432 (and 127.0.0.4 with --followers 3);
- a DNS emulator answering `followers.test` like a Heroku Postgres follower pool endpoint: one
  follower address per answer, round-robin, TTL 5 s;

then runs `bin/start-sidecar .venv/bin/python scripts/demo_workload.py` with DATABASE_URL (the
leader) and FOLLOWER_URL (the DNS name) pooled, streams the sidecar's `at=stats` and
`at=instance` lines, and every few seconds prints how many connections each PostgreSQL instance
itself sees from the sidecar. Everything is stopped on the way out, Ctrl-C included.

With --hold (`make demo ARGS=--hold`) everything keeps running after the workload, and a
ready-to-paste admin console command (with the demo's throwaway password) is printed, until
Ctrl-C or SIGTERM.

Exit status: 0 when the workload ran without errors and every follower got server connections
(with --hold: and the hold was ended by Ctrl-C or SIGTERM); 130 after Ctrl-C during the
workload; 1 (or the app's status) otherwise.
"""

from __future__ import annotations

import argparse
import contextlib
import os
import re
import shlex
import shutil
import signal
import socket
import subprocess
import sys
import threading
import time
from collections.abc import Callable, Iterator
from pathlib import Path

REPO_ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(REPO_ROOT / "tests"))

from demo_workload import HOLDING_LINE, TABLE  # noqa: E402
from dnsserver import DNSServer  # noqa: E402
from followers import FOLLOWER_ADDRS, FOLLOWER_PORT, FOLLOWERS_NAME, ReplicaCluster  # noqa: E402
from pgfixtures import (  # noqa: E402
    PostgresServer,
    free_port,
    libpq_dsn,
    pg_bin_dir,
    short_tempdir,
)

#: Sidecar events shown without --verbose (warnings and errors are always shown).
SHOWN_EVENTS = frozenset(
    {
        "launch",
        "listening",
        "app_started",
        "instance_added",
        "instance_up",
        "instance_unhealthy",
        "stats",
        "instance",
        "signal",
        "shutdown",
        "stopped",
        "app_exit",
        "exit",
    }
)
#: In the reason of a server_close: the pool evening out its servers over the instances.
REBALANCING = 'reason="rebalancing away'
#: Fields worth the eye in the stats and instance lines.
KEY_FIELDS = re.compile(
    r"\b(pool|instance|state|sample#servers|sample#cap|sample#clients\.active"
    r"|sample#clients\.waiting|sample#servers\.active|sample#servers\.idle|sample#servers\.max"
    r"|sample#xacts_per_s|count#errors)=(\S+)"
)
EVENT = re.compile(r"\bat=(\S+)")
FIELD = re.compile(r"(\S+?)=(\S+)")
LEVEL = re.compile(r"\blevel=(warning|error|critical)\b")
SHUTDOWN_TIMEOUT = 10  # seconds the sidecar may drain after a signal


class Console:
    """Thread-safe output: narrated steps, sidecar lines, the instances' own view."""

    def __init__(self, color: bool) -> None:
        self.color = color
        # Reentrant: the SIGINT handler writes too, maybe while the main thread is writing.
        self.lock = threading.RLock()

    def _paint(self, code: str, text: str) -> str:
        return f"\033[{code}m{text}\033[0m" if self.color else text

    def write(self, text: str) -> None:
        with self.lock:
            sys.stdout.write(text + "\n")
            sys.stdout.flush()

    def step(self, text: str) -> None:
        self.write(self._paint("1", f"==> {text}"))

    def note(self, text: str) -> None:
        self.write(f"    {text}")

    def warn(self, text: str) -> None:
        self.write(self._paint("1;31", f"!!! {text}"))

    def seen(self, text: str) -> None:
        self.write(self._paint("35", f"    [pg_stat_activity] {text}"))

    def sidecar(self, line: str, verbose: bool) -> None:
        match = EVENT.search(line) if line.startswith("sidecar ") else None
        event = match.group(1) if match else None
        if event is None:  # the app's own output (or a traceback)
            self.write(self._paint("33", line))
        elif event in ("stats", "instance"):
            if self.color:
                code = "1;36" if event == "stats" else "1;32"
                line = KEY_FIELDS.sub(lambda m: self._paint(code, m.group(0)), line)
            self.write(("" if event == "stats" else "  ") + line)
        elif LEVEL.search(line):
            self.write(self._paint("31", line))
        elif verbose or event in SHOWN_EVENTS or REBALANCING in line:
            self.write(self._paint("2", line))


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(
        prog="scripts/demo", description=__doc__.splitlines()[0] if __doc__ else None
    )
    parser.add_argument("--seconds", type=float, default=15.0, help="workload duration (15)")
    parser.add_argument(
        "--followers", type=int, choices=(2, 3), default=2, help="how many followers (2)"
    )
    parser.add_argument("--verbose", "-v", action="store_true", help="show every sidecar log line")
    parser.add_argument(
        "--hold",
        action="store_true",
        help="keep everything running after the workload and print an admin console command;"
        " Ctrl-C or SIGTERM stops it",
    )
    parser.add_argument(
        "--failover",
        action="store_true",
        help="instead: a leader failover announced by DNS, followed by the sidecar",
    )
    parser.add_argument(
        "--budget",
        action="store_true",
        help="instead: the connection budget -- one sidecar uses the whole budget, a second"
        " one joins, and the soft caps move (leader only, no followers)",
    )
    parser.add_argument(
        "--color",
        choices=("auto", "always", "never"),
        default="auto",
        help="highlight the stats lines (auto: when writing to a terminal without NO_COLOR)",
    )
    return parser.parse_args(argv)


def masked(url: str) -> str:
    """The URL for the screen: the password replaced (the demo never prints a secret)."""
    return re.sub(r"(//[^:/@]+:)[^@]*@", r"\1****@", url)


def watch_instances(
    console: Console,
    stop: threading.Event,
    period: float,
    sources: list[tuple[str, Callable[[], int]]],
    peak: dict[str, int],
) -> None:
    """Every `period`: the `app` backends each instance sees (all from the sidecar).

    The first look comes half a period in, so these lines fall between the stats lines (which
    come every `period` too) instead of on top of them.
    """
    delay = period / 2
    while not stop.wait(delay):
        delay = period
        parts = []
        for name, count in sources:
            try:
                n = count()
            except Exception as e:  # a follower stopping under us is only worth a mention
                parts.append(f"{name}: ? ({type(e).__name__})")
                continue
            peak[name] = max(peak.get(name, 0), n)
            parts.append(f"{name}: {n} connections")
        console.seen(", ".join(parts))


def run_sidecar(
    console: Console,
    args: argparse.Namespace,
    env: dict[str, str],
    argv: list[str],
    servers: dict[tuple[str, str], int],
    hold_hints: list[str],
) -> int:
    """Run bin/start-sidecar; stream its output; return its exit status.

    `servers` gets, per (pool, instance) of the `at=instance` lines, the most server
    connections a line reported. `hold_hints` are printed when the app says it holds (--hold).

    Ctrl-C at the terminal reaches the sidecar and the app as well (one process group): the
    sidecar drains, the app finishes its transactions, and we keep reading until both are
    gone. If the sidecar still runs 2 s later, the signal was ours alone: it gets SIGTERM. A
    second Ctrl-C kills it. (A handler rather than KeyboardInterrupt, which could cut a line
    of the output in half.) With --hold, SIGTERM to us stops it the same way, at once, and the
    signal that ends a hold is no interruption: the status is then the sidecar's (the app's).
    """
    proc = _start_sidecar(argv, env)
    assert proc.stdout is not None
    interrupts = 0
    held = False

    def terminate_if_running() -> None:
        if proc.poll() is None:
            proc.send_signal(signal.SIGTERM)

    def on_sigint(signum: int, frame: object) -> None:
        nonlocal interrupts
        interrupts += 1
        if interrupts == 1:
            if held:
                console.step("stopping: the sidecar drains, then everything stops")
            else:
                console.step("interrupted: the sidecar drains, the app finishes its transactions")
            # SIGTERM reached us alone; a terminal's Ctrl-C reached the sidecar and the app too.
            delay = 0.0 if signum == signal.SIGTERM else 2.0
            timer = threading.Timer(delay, terminate_if_running)
            timer.daemon = True
            timer.start()
        elif proc.poll() is None:
            console.warn("interrupted again: killing bin/start-sidecar")
            proc.kill()

    previous = signal.signal(signal.SIGINT, on_sigint)
    previous_term = signal.signal(signal.SIGTERM, on_sigint) if args.hold else None
    try:
        for line in proc.stdout:
            line = line.rstrip("\n")
            console.sidecar(line, args.verbose)
            if args.hold and line == HOLDING_LINE and not interrupts:
                held = True
                console.step("holding: everything keeps running until Ctrl-C (or SIGTERM)")
                for hint in hold_hints:
                    console.note(hint)
            if line.startswith("sidecar at=instance "):
                fields = dict(FIELD.findall(line))
                key = (fields.get("pool", "?"), fields.get("instance", "?"))
                with contextlib.suppress(ValueError):
                    servers[key] = max(servers.get(key, 0), int(fields["sample#servers"]))
        # Its output ended: the sidecar and the app have exited or are about to.
        code = proc.wait(timeout=SHUTDOWN_TIMEOUT + 5)
        if interrupts and not held:
            return 130
        return 128 - code if code < 0 else code  # killed by a signal: as a shell reports it
    except subprocess.TimeoutExpired:
        return 1  # killed below
    finally:
        signal.signal(signal.SIGINT, previous)
        if previous_term is not None:
            signal.signal(signal.SIGTERM, previous_term)
        if proc.poll() is None:
            console.warn("bin/start-sidecar did not stop; killing it")
            proc.kill()
            proc.wait()
        proc.stdout.close()


@contextlib.contextmanager
def sigint_held() -> Iterator[None]:
    """Hold ^C back from us while a fixture starts its processes; it lands when the block ends.

    The fixtures clean up after themselves when one of their commands fails (a ^C at the
    terminal kills initdb, pg_ctl or pg_basebackup too), but a KeyboardInterrupt in their own
    Python code, between starting a server and handing it to us, could leave it running. So
    SIGINT stays pending until the fixture has returned (or failed and cleaned up) and its stop
    is registered.
    """
    previous = signal.pthread_sigmask(signal.SIG_BLOCK, {signal.SIGINT})
    try:
        yield
    finally:
        signal.pthread_sigmask(signal.SIG_SETMASK, previous)


@contextlib.contextmanager
def stopping(console: Console, what: str, stop: Callable[[], None]) -> Iterator[None]:
    """Run `stop` when the block ends, however it ends; a second Ctrl-C cannot cut it short."""
    try:
        yield
    finally:
        previous = signal.signal(signal.SIGINT, signal.SIG_IGN)
        try:
            console.note(f"stopping {what}")
            stop()
        except Exception as e:
            console.warn(f"stopping {what} failed: {type(e).__name__}: {e}")
        finally:
            signal.signal(signal.SIGINT, previous)


def demo(console: Console, args: argparse.Namespace) -> int:
    started = time.monotonic()
    addrs = list(FOLLOWER_ADDRS[: args.followers])
    taken = [a for a in addrs if _listening(a, FOLLOWER_PORT)]
    if taken:
        console.warn(
            f"{', '.join(f'{a}:{FOLLOWER_PORT}' for a in taken)} already in use (a test run with"
            " followers, or another demo?); the followers need it. Try again once it is free."
        )
        return 1
    with contextlib.ExitStack() as stack:
        console.step("starting a PostgreSQL 15 leader (initdb, TLS with a throwaway CA, SCRAM)")
        with sigint_held():
            leader = PostgresServer.start()
            stack.enter_context(stopping(console, "the leader", leader.stop))
        console.note(f"leader on {leader.host}:{leader.port}, role app, database appdb")

        console.step(
            f"{args.followers} streaming followers (pg_basebackup -R) on "
            + ", ".join(f"{a}:{FOLLOWER_PORT}" for a in addrs)
        )
        with sigint_held():
            cluster = ReplicaCluster.start(leader, count=args.followers)
            stack.enter_context(stopping(console, "the followers", cluster.close))
        leader.query(
            f"CREATE TABLE {TABLE} (id bigserial PRIMARY KEY, worker int, payload text,"
            " at timestamptz DEFAULT now())"
        )
        leader.query(f"ALTER TABLE {TABLE} OWNER TO app")
        cluster.wait_replayed()
        console.note(f"streaming and caught up; table {TABLE} created on the leader")

        with sigint_held():
            dns = DNSServer({FOLLOWERS_NAME: cluster.addrs}, mode="rotate", ttl=5).start()
            stack.enter_context(stopping(console, "the DNS emulator", dns.stop))
        console.step(
            f"DNS emulator on {dns.nameserver}: {FOLLOWERS_NAME} -> one of"
            f" {', '.join(cluster.addrs)} per answer, round-robin, TTL 5"
        )

        socket_dir = short_tempdir("demo")
        stack.callback(shutil.rmtree, socket_dir, True)
        port = free_port()
        leader_url = leader.url()
        follower_url = cluster.url()
        settings = {
            "SIDECAR_URLS": "DATABASE_URL FOLLOWER_URL",
            "SIDECAR_DNS_NAMESERVERS": dns.nameserver,
            "SIDECAR_PORT": str(port),
            "SIDECAR_SOCKET_DIR": str(socket_dir),
            "SIDECAR_STATS_PERIOD": "3",
            "SIDECAR_DEFAULT_POOL_SIZE": "10",
            "SIDECAR_MAX_PER_INSTANCE": "6",
            "SIDECAR_LOG_CONNECTIONS": "0",
            "SIDECAR_LOG_DISCONNECTIONS": "0",
            "SIDECAR_SHUTDOWN_TIMEOUT": str(SHUTDOWN_TIMEOUT),
        }
        # The developer's own SIDECAR_*/PGBOUNCER_* settings would change what the demo shows.
        env = {k: v for k, v in os.environ.items() if not k.startswith(("SIDECAR_", "PGBOUNCER_"))}
        env.update(settings, DATABASE_URL=leader_url, FOLLOWER_URL=follower_url)
        env["PYTHONUNBUFFERED"] = "1"
        env.pop("DYNO", None)

        app = [".venv/bin/python", "scripts/demo_workload.py", "--seconds", f"{args.seconds:g}"]
        if args.hold:
            app.append("--hold")
        argv = ["bin/start-sidecar", *app]
        console.step(shlex.join(argv))
        console.note(f"DATABASE_URL={masked(leader_url)}")
        console.note(f"FOLLOWER_URL={masked(follower_url)}")
        for name, value in settings.items():
            console.note(f"{name}={value}")
        console.note(
            "10 server connections per pool, at most 6 per instance: the follower pool needs"
            " both followers, the leader pool stops at 6"
        )

        sources: list[tuple[str, Callable[[], int]]] = [
            (f"leader {leader.host}", leader.count_backends)
        ]
        sources += [(f.addr, f.count_backends) for f in cluster.followers]
        peak: dict[str, int] = {}
        stop_watch = threading.Event()
        watcher = threading.Thread(
            target=watch_instances,
            args=(console, stop_watch, 3.0, sources, peak),
            name="watch-instances",
            daemon=True,
        )
        watcher.start()
        stack.callback(watcher.join)
        stack.callback(stop_watch.set)

        psql = "psql" if shutil.which("psql") else str(pg_bin_dir() / "psql")
        hold_hints = [
            "the admin console (a throwaway password, for this demo only), in another terminal:",
            "  "
            + shlex.join([psql, leader.url(host="127.0.0.1", port=port, dbname="sidecar")])
            + " -c 'SHOW POOLS' -c 'SHOW INSTANCES'",
            "queries through the pool: the same URL with database `database` (the leader) or"
            " `follower` (the followers)",
        ]
        servers: dict[tuple[str, str], int] = {}
        code = run_sidecar(console, args, env, argv, servers, hold_hints)
        stop_watch.set()
        watcher.join()

        console.step(f"bin/start-sidecar exited with {code}")
        for pool in ("database", "follower"):
            console.note(
                f"most server connections per instance, pool {pool} (at=instance lines): "
                + ", ".join(f"{i} {n}" for (p, i), n in sorted(servers.items()) if p == pool)
            )
        if peak:
            console.note(
                "most connections each instance itself saw (pg_stat_activity): "
                + ", ".join(f"{name} {n}" for name, n in peak.items())
            )
        idle = [
            f.addr
            for f in cluster.followers
            if not servers.get(("follower", f.addr)) and not peak.get(f.addr)
        ]
        if code == 0 and idle:
            console.warn(f"no server connection ever reached {', '.join(idle)}")
            code = 1
        console.step("stopping everything")
        listening = [(leader.host, leader.port)] + [(a, FOLLOWER_PORT) for a in cluster.addrs]
    left = [f"{host}:{port}" for host, port in listening if _listening(host, port)]
    if left:
        console.warn(f"still listening after the stop: {', '.join(left)}")
        return code or 1
    took = f"{time.monotonic() - started:.0f}s"
    if code == 0:
        console.step(f"done in {took}, nothing left running")
    elif code == 130:
        console.step(f"interrupted after {took}, nothing left running")
    else:
        console.step(f"failed (exit {code}) after {took}, nothing left running")
    return code


#: The --budget demo: the budget all sidecars share, and the clients each one serves.
DEMO_BUDGET = 20
DEMO_CLIENTS = 15


def budget_demo(console: Console, args: argparse.Namespace) -> int:
    """Two `python -m sidecar` processes standing in for two dynos, one leader, one budget.

    Sidecar A starts alone with more clients than the budget and takes all of it; half-way
    through, sidecar B starts with as many clients; each second a line shows each one's soft
    cap and servers (its SHOW INSTANCES) and what the instance itself counts.
    """
    import psycopg  # a test dependency, like the fixtures

    started = time.monotonic()
    with contextlib.ExitStack() as stack:
        console.step("starting a PostgreSQL 15 leader (initdb, TLS with a throwaway CA, SCRAM)")
        with sigint_held():
            leader = PostgresServer.start()
            stack.enter_context(stopping(console, "the leader", leader.stop))
        stop = threading.Event()
        errors: list[str] = []
        served: dict[str, int] = {}
        sidecars: dict[str, int] = {}

        def start(name: str) -> None:
            port = free_port()
            socket_dir = short_tempdir("demo")
            stack.callback(shutil.rmtree, socket_dir, True)
            settings = {
                "SIDECAR_INSTANCE_BUDGET": str(DEMO_BUDGET),
                "SIDECAR_BUDGET_INTERVAL": "0.5",
                "SIDECAR_DEFAULT_POOL_SIZE": str(DEMO_CLIENTS),
                "SIDECAR_PORT": str(port),
                "SIDECAR_SOCKET_DIR": str(socket_dir),
                "SIDECAR_STATS_PERIOD": "0",
                "SIDECAR_LOG_CONNECTIONS": "0",
                "SIDECAR_LOG_DISCONNECTIONS": "0",
                "SIDECAR_SHUTDOWN_TIMEOUT": str(SHUTDOWN_TIMEOUT),
            }
            env = {
                k: v for k, v in os.environ.items() if not k.startswith(("SIDECAR_", "PGBOUNCER_"))
            }
            env.update(settings, PYTHONUNBUFFERED="1")
            argv = [sys.executable, "-m", "sidecar", f"appdb={leader.url()}"]
            proc = _start_sidecar(argv, env)
            stack.callback(_stop_process, proc)

            def relay() -> None:
                assert proc.stdout is not None
                for line in proc.stdout:
                    if "at=soft_cap" in line or LEVEL.search(line) or args.verbose:
                        console.write(f"    {name}: " + line.rstrip("\n"))

            threading.Thread(target=relay, daemon=True).start()
            deadline = time.monotonic() + 10
            while not _listening("127.0.0.1", port):
                if proc.poll() is not None or time.monotonic() > deadline:
                    raise RuntimeError(f"sidecar {name} did not start")
                time.sleep(0.05)
            sidecars[name] = port
            served[name] = 0
            dsn = _demo_dsn(port, "appdb")

            def client() -> None:
                try:
                    with psycopg.connect(dsn, autocommit=True) as conn:
                        while not stop.is_set():
                            conn.execute("SELECT pg_sleep(0.01)")
                            served[name] += 1
                except Exception as e:  # the demo reports, it does not hide
                    errors.append(f"{name}: {type(e).__name__}: {e}")

            for _ in range(DEMO_CLIENTS):
                thread = threading.Thread(target=client, daemon=True)
                thread.start()
                stack.callback(thread.join, 5)
            console.step(
                f"sidecar {name} on 127.0.0.1:{port}: SIDECAR_INSTANCE_BUDGET={DEMO_BUDGET},"
                f" SIDECAR_BUDGET_INTERVAL=0.5, {DEMO_CLIENTS} clients running short transactions"
            )

        def view(port: int) -> str:
            with psycopg.connect(_demo_dsn(port, "sidecar"), autocommit=True) as conn:
                cur = conn.execute("SHOW INSTANCES", prepare=False)
                names = [d.name for d in cur.description or []]
                row = dict(zip(names, cur.fetchone() or (), strict=False))
            return f"soft_cap {row.get('soft_cap')!s:>4} servers {row.get('servers')!s:>3}"

        stack.callback(stop.set)
        start("A")
        seconds = max(args.seconds, 20.0)
        joined = False
        begin = time.monotonic()
        while (elapsed := time.monotonic() - begin) < seconds:
            if not joined and elapsed >= seconds / 2:
                start("B")
                joined = True
            time.sleep(1.0)
            parts = [f"{name}: {view(port)}" for name, port in sidecars.items()]
            console.seen(
                f"t={elapsed:4.0f}s  "
                + " | ".join(parts)
                + f" | instance: {leader.count_backends()} backends of app, budget {DEMO_BUDGET}"
            )
        stop.set()
    for error in errors[:5]:
        console.warn(error)
    console.step(
        f"done in {time.monotonic() - started:.0f}s: "
        + ", ".join(f"{name} served {n} transactions" for name, n in served.items())
    )
    return 1 if errors or not all(served.values()) else 0


def _demo_dsn(port: int, dbname: str) -> str:
    return libpq_dsn("127.0.0.1", port, "app", None, dbname, "disable", {})


def _start_sidecar(argv: list[str], env: dict[str, str]) -> subprocess.Popen[str]:
    """The sidecar as a child whose stdout and stderr we read together, line by line."""
    return subprocess.Popen(
        argv,
        cwd=REPO_ROOT,
        env=env,
        stdout=subprocess.PIPE,
        stderr=subprocess.STDOUT,
        text=True,
        errors="replace",
        bufsize=1,
    )


def _stop_process(proc: subprocess.Popen[str]) -> None:
    if proc.poll() is None:
        proc.send_signal(signal.SIGTERM)
        try:
            proc.wait(SHUTDOWN_TIMEOUT + 5)
        except subprocess.TimeoutExpired:
            proc.kill()
            proc.wait()


def _listening(host: str, port: int) -> bool:
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as s:
        s.settimeout(1.0)
        return s.connect_ex((host, port)) == 0


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    color = args.color == "always" or (
        args.color == "auto" and sys.stdout.isatty() and not os.environ.get("NO_COLOR")
    )
    console = Console(color)
    try:
        if args.failover:
            import demo_failover

            return demo_failover.run(console, args)
        if args.budget:
            return budget_demo(console, args)
        return demo(console, args)
    except KeyboardInterrupt:
        console.warn("interrupted; everything started was stopped")
        return 130


if __name__ == "__main__":
    sys.exit(main())
