"""`make demo ARGS=--failover`: the sidecar follows a leader failover announced by DNS.

On loopback only, with the test suite's fixtures: a PostgreSQL 15 primary, two streaming
followers on 127.0.0.2:5432 and 127.0.0.3:5432, and a DNS emulator answering `leader.test`
(TTL 5 s, like Heroku). The follower on 127.0.0.2 is promoted first: it is the leader DNS names.
The sidecar pools `leader.test` (target_session_attrs auto: it becomes a leader pool) and a
writer thread inserts rows through it on one connection, noting which server took each row.

Then the failover: the follower on 127.0.0.3 is promoted and DNS moved to it, while the old
leader stays up AND writable (a split brain, the worst case). The sidecar's lines show it
learning the new address, checking its role, and draining the old one; at the end the rows each
server holds are counted from the servers themselves, and the window (from "DNS and the new
primary ready" to the last write the old leader took) is printed.
"""

from __future__ import annotations

import argparse
import contextlib
import os
import random
import subprocess
import sys
import threading
import time
from collections import Counter
from typing import TYPE_CHECKING

import psycopg
from dnsserver import DNSServer
from followers import FOLLOWER_ADDRS, ReplicaCluster
from pgfixtures import PASSWORDS, PostgresServer, free_port, short_tempdir

if TYPE_CHECKING:
    from demo import Console

LEADER_NAME = "leader.test"
TTL = 5
TABLE = "failover_writes"
#: Sidecar events worth showing in this demo.
EVENTS = (
    "listening",
    "pool",
    "instance_added",
    "instance_wrong_role",
    "instance_role_ok",
    "instance_draining",
    "instance_forgotten",
    "instance_up",
    "server_close",
    "instance",
)


class Writes:
    """One client connection through the sidecar, inserting rows as fast as it can."""

    def __init__(self, dsn: str) -> None:
        self.dsn = dsn
        self.log: list[tuple[float, int, str | None, str | None]] = []  # (start, n, addr, err)
        self.connects = 0
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._run, name="writer", daemon=True)

    def start(self) -> None:
        self._thread.start()

    def stop(self) -> None:
        self._stop.set()
        self._thread.join(20)

    def _run(self) -> None:
        conn: psycopg.Connection[tuple[str]] | None = None
        n = 0
        while not self._stop.is_set():
            n += 1
            started = time.monotonic()
            try:
                if conn is None or conn.closed:
                    conn = psycopg.connect(self.dsn, autocommit=True)
                    self.connects += 1
                row = conn.execute(
                    f"INSERT INTO {TABLE} (id) VALUES (%s) RETURNING host(inet_server_addr())",
                    (n,),
                ).fetchone()
                self.log.append((started, n, row[0] if row else None, None))
            except psycopg.Error as e:
                self.log.append((started, n, None, e.sqlstate or type(e).__name__))
                if conn is not None:
                    conn.close()
                conn = None
                self._stop.wait(0.1)
            self._stop.wait(0.02)
        if conn is not None:
            conn.close()

    def since(self, t: float) -> Counter[str]:
        return Counter((addr or f"error {err}") for s, _n, addr, err in self.log if s >= t)


def run(console: Console, args: argparse.Namespace) -> int:
    started = time.monotonic()
    a_addr, b_addr = FOLLOWER_ADDRS[0], FOLLOWER_ADDRS[1]
    with contextlib.ExitStack() as stack:
        console.step("a PostgreSQL 15 primary and two streaming followers")
        leader = PostgresServer.start()
        stack.callback(leader.stop)
        cluster = ReplicaCluster.start(leader, count=2)
        stack.callback(cluster.close)
        leader.query(f"CREATE TABLE {TABLE} (id int PRIMARY KEY, at timestamptz DEFAULT now())")
        leader.query(f"ALTER TABLE {TABLE} OWNER TO app")
        cluster.wait_replayed()
        a, b = cluster.followers
        console.step(f"promoting {a_addr}: the leader `{LEADER_NAME}` names (TTL {TTL} s)")
        a.query("SELECT pg_promote(true, 60)")
        dns = DNSServer({LEADER_NAME: [a_addr]}, mode="all", ttl=TTL).start()
        stack.callback(dns.stop)

        port = free_port()
        socket_dir = short_tempdir("demo")
        url = cluster.url().replace(cluster.name, LEADER_NAME)
        env = {k: v for k, v in os.environ.items() if not k.startswith(("SIDECAR_", "PGBOUNCER_"))}
        env.update(
            SIDECAR_PORT=str(port),
            SIDECAR_SOCKET_DIR=str(socket_dir),
            SIDECAR_DNS_NAMESERVERS=dns.nameserver,
            SIDECAR_SERVER_TLS_SSLMODE="require",
            SIDECAR_STATS_PERIOD="5",
            SIDECAR_DEFAULT_POOL_SIZE="4",
            SIDECAR_LOG_CONNECTIONS="0",
            SIDECAR_LOG_DISCONNECTIONS="0",
            PYTHONUNBUFFERED="1",
        )
        console.step(
            f".venv/bin/python -m sidecar appdb=postgres://app:****@{LEADER_NAME}:5432/appdb"
        )
        proc = subprocess.Popen(
            [sys.executable, "-m", "sidecar", f"appdb={url}"],
            env=env,
            stdout=subprocess.PIPE,
            stderr=subprocess.STDOUT,
            text=True,
            bufsize=1,
        )

        def stop_sidecar() -> None:
            if proc.poll() is None:
                proc.terminate()
                proc.wait(15)

        stack.callback(stop_sidecar)

        def pump() -> None:
            assert proc.stdout is not None
            for line in proc.stdout:
                line = line.rstrip("\n")
                event = line.split(" ", 2)[1][3:] if line.startswith("sidecar at=") else ""
                if event in EVENTS or args.verbose or "level=" in line:
                    console.sidecar(line, True)

        reader = threading.Thread(target=pump, name="sidecar-output", daemon=True)
        reader.start()
        dsn = (
            f"host=127.0.0.1 port={port} user=app dbname=appdb sslmode=disable"
            f" password={PASSWORDS['app']}"
        )
        deadline = time.monotonic() + 15
        while True:
            with contextlib.suppress(psycopg.Error):
                psycopg.connect(dsn).close()
                break
            if time.monotonic() > deadline:
                console.warn("the sidecar did not come up")
                return 1
            time.sleep(0.1)

        writes = Writes(dsn)
        writes.start()
        stack.callback(writes.stop)
        console.step("a writer inserts rows through the sidecar on one connection")

        def report(label: str, since: float) -> None:
            counts = sorted(writes.since(since).items())
            console.note(f"writes {label}: " + ", ".join(f"{k} {v}" for k, v in counts))

        mark = time.monotonic()
        # A random moment within the sidecar's DNS refresh cycle, so runs show the spread of
        # the window rather than one phase of it.
        before = 3 + random.uniform(0, TTL)
        time.sleep(before)
        report(f"in the last {before:.1f} s", mark)

        console.step(
            f"failover: promoting {b_addr}, DNS {LEADER_NAME} -> {b_addr};"
            f" {a_addr} stays up AND writable (split brain)"
        )
        b.query("SELECT pg_promote(true, 60)")
        dns.set_records(LEADER_NAME, [b_addr])
        ready = time.monotonic()
        for second in range(1, TTL + 6):
            time.sleep(1)
            report(f"  t+{second}s", ready + second - 1)
        writes.stop()

        on_a = {int(r[0]) for r in a.query(f"SELECT id FROM {TABLE}")}
        on_b = {int(r[0]) for r in b.query(f"SELECT id FROM {TABLE}")}
        start_of = {n: s for s, n, _addr, _err in writes.log}
        late = [start_of[n] - ready for n in on_a if start_of.get(n, 0) >= ready]
        window = max(late, default=0.0)
        errors = [err for _s, _n, _addr, err in writes.log if err]
        console.step("what the servers hold")
        console.note(f"{a_addr} (old leader): {len(on_a)} rows; {b_addr} (new leader): {len(on_b)}")
        console.note(
            f"window: the old leader took its last write {window:.2f} s after DNS and the new"
            f" primary were ready (TTL {TTL} s; the promise is TTL + 2 s)"
        )
        console.note(
            f"client errors: {len(errors)} {sorted(set(errors))}; client connections opened:"
            f" {writes.connects}"
        )
        stop_sidecar()
        reader.join(5)
        code = 0 if window <= TTL + 2 and not errors else 1
    console.step(f"{'done' if code == 0 else 'failed'} in {time.monotonic() - started:.0f}s")
    return code


__all__ = ["run"]
