"""pytest plugin: real streaming replicas of the `pg` leader, like a Heroku follower pool.

Followers listen on 127.0.0.2, 127.0.0.3 (and 127.0.0.4 when a test adds a third), all on port
5432 — one address per instance, the same port, as behind a follower pool endpoint — each with
its own data directory, unix socket directory and replication slot, all made with
`pg_basebackup -R` from the session's leader. Their TLS certificate comes from the leader's test
CA and names every follower address and `followers.test`, so even verify-full works.

Fixtures:
- `leader_and_followers` (session): a ReplicaCluster with two running followers.
- `followers` (function): the same cluster, with both followers running and caught up again
  (and any extra follower a previous test added removed).

Loopback only: nothing here listens on or connects to any other address.
"""

from __future__ import annotations

import contextlib
import shutil
import socket
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import psycopg
import pytest
from pgfixtures import (
    SUPERUSER,
    BackendCounts,
    PostgresServer,
    TcpAddress,
    chown_to_server,
    poll_until,
    postgres_url,
    run_as_server,
    short_tempdir,
)
from psycopg.conninfo import make_conninfo

#: Addresses followers listen on, in the order they are created.
FOLLOWER_ADDRS = ("127.0.0.2", "127.0.0.3", "127.0.0.4")
FOLLOWER_PORT = 5432
#: The pool endpoint name a DNSServer answers with the followers' addresses.
FOLLOWERS_NAME = "followers.test"
#: How many followers the session fixture starts.
DEFAULT_FOLLOWERS = 2
#: The pg_hba.conf line the leader needs for pg_basebackup and streaming over its unix socket.
LEADER_HBA_REPLICATION = "local     replication  all  trust"


def _listening(addr: str, port: int) -> bool:
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as s:
        s.settimeout(1.0)
        return s.connect_ex((addr, port)) == 0


class Follower(BackendCounts, TcpAddress):
    """One hot standby of the leader on addr:5432 (url() and dsn(): TcpAddress, with TLS)."""

    sslmode = "require"

    def __init__(self, leader: PostgresServer, addr: str, base: Path) -> None:
        self.leader = leader
        self.addr = addr
        self.host = addr
        self.port = FOLLOWER_PORT
        self.base = base
        self.socket_dir = base
        self.data_dir = base / "data"
        self.log_file = base / "postgres.log"
        #: Replication slot on the leader and cluster_name (its application_name there).
        self.name = "follower_" + addr.replace(".", "_")

    # lifecycle

    @classmethod
    def create(cls, leader: PostgresServer, addr: str, cert: Path, key: Path) -> Follower:
        """pg_basebackup the leader into a new directory, configure, start, wait until live."""
        if _listening(addr, FOLLOWER_PORT):
            raise RuntimeError(
                f"something already listens on {addr}:{FOLLOWER_PORT}; the follower fixtures"
                " need that address (another test session running?)"
            )
        base = short_tempdir("fo")
        chown_to_server(base)
        follower = cls(leader, addr, base)
        try:
            follower._basebackup()
            follower._configure(cert, key)
            follower.start()
            follower.wait_streaming()
        except BaseException:
            if follower.log_file.exists():
                print(follower.log_file.read_text(errors="replace")[-5000:])
            follower.destroy()
            raise
        return follower

    def _basebackup(self) -> None:
        run_as_server(
            [
                self.leader.bin_dir / "pg_basebackup",
                "-D", self.data_dir,
                "-h", self.leader.socket_dir, "-p", str(self.leader.port), "-U", SUPERUSER,
                "-X", "stream", "-R", "-C", "-S", self.name,
                "--checkpoint=fast", "--no-sync",
            ],
            self.base,
        )  # fmt: skip

    def _configure(self, cert: Path, key: Path) -> None:
        for src, name in ((cert, "follower.crt"), (key, "follower.key")):
            dest = self.data_dir / name
            shutil.copyfile(src, dest)
            dest.chmod(0o600)
            chown_to_server(dest)
        settings = {
            "listen_addresses": self.addr,
            "port": str(self.port),
            "unix_socket_directories": str(self.socket_dir),
            "hot_standby": "on",
            "ssl_cert_file": "follower.crt",
            "ssl_key_file": "follower.key",
            "cluster_name": self.name,
        }
        # Appended last, so these win over the leader's copied values.
        with (self.data_dir / "postgresql.conf").open("a") as conf:
            conf.write("\n# follower settings\n")
            for name, value in settings.items():
                conf.write(f"{name} = '{value}'\n")
        hba = self.data_dir / "pg_hba.conf"
        hba.write_text(hba.read_text().replace("127.0.0.1/32", "127.0.0.0/8"))

    def start(self, timeout: float = 60.0) -> None:
        """Start the server and wait until it accepts connections (consistent, hot standby)."""
        run_as_server(
            [
                self.leader.bin_dir / "pg_ctl", "start", "-D", self.data_dir, "-w",
                "-t", str(int(timeout)), "-l", self.log_file,
            ],
            self.base,
        )  # fmt: skip

    def stop(self, mode: str = "immediate") -> None:
        """pg_ctl stop -m `mode` (immediate: like a crashed or removed instance)."""
        if self.running:
            run_as_server(
                [self.leader.bin_dir / "pg_ctl", "stop", "-D", self.data_dir, "-m", mode, "-w"],
                self.base,
            )

    @property
    def running(self) -> bool:
        return (self.data_dir / "postmaster.pid").exists() and _listening(self.addr, self.port)

    def destroy(self) -> None:
        """Stop it, drop its slot on the leader and delete its files."""
        with contextlib.suppress(Exception):
            self.stop()
        with contextlib.suppress(Exception):
            self.leader.query(
                "SELECT pg_drop_replication_slot(slot_name) FROM pg_replication_slots"
                " WHERE slot_name = %s",
                self.name,
                dbname="postgres",
            )
        shutil.rmtree(self.base, ignore_errors=True)

    # queries

    def query(self, sql_text: str, *params: Any, dbname: str = "appdb") -> list[tuple[Any, ...]]:
        """Run one statement as the superuser over its unix socket; return its rows."""
        conninfo = make_conninfo(
            "",
            host=str(self.socket_dir),
            port=self.port,
            user=SUPERUSER,
            dbname=dbname,
            connect_timeout=10,
        )
        with psycopg.connect(conninfo, autocommit=True) as conn:
            cur = conn.execute(sql_text, params or None, prepare=False)
            return cur.fetchall() if cur.description is not None else []

    def in_recovery(self) -> bool:
        return bool(self.query("SELECT pg_is_in_recovery()")[0][0])

    def wait_streaming(self, timeout: float = 30.0) -> None:
        """Until the leader shows this follower streaming and the follower is in recovery."""
        poll_until(
            lambda: self.leader.query(
                "SELECT 1 FROM pg_stat_replication"
                " WHERE application_name = %s AND state = 'streaming'",
                self.name,
                dbname="postgres",
            ),
            timeout=timeout,
            what=f"{self.addr} streaming from the leader",
        )
        assert self.in_recovery()

    def __repr__(self) -> str:
        return f"<Follower {self.addr}:{self.port} {self.base}>"


class ReplicaCluster:
    """The session's leader and its followers."""

    name = FOLLOWERS_NAME
    port = FOLLOWER_PORT

    def __init__(self, leader: PostgresServer, base: Path) -> None:
        self.leader = leader
        self.base = base
        self.followers: list[Follower] = []
        san = ",".join(
            ["DNS:localhost", f"DNS:{FOLLOWERS_NAME}", "IP:127.0.0.1"]
            + [f"IP:{a}" for a in FOLLOWER_ADDRS]
        )
        self.cert, self.key = leader.ca.issue(base, "follower", san)
        self._marker = 0

    @classmethod
    def start(cls, leader: PostgresServer, count: int = DEFAULT_FOLLOWERS) -> ReplicaCluster:
        prepare_leader(leader)
        cluster = cls(leader, short_tempdir("fc"))
        try:
            for _ in range(count):
                cluster.add_follower()
            cluster.wait_replayed()
        except BaseException:
            cluster.close()
            raise
        return cluster

    @property
    def addrs(self) -> list[str]:
        return [f.addr for f in self.followers]

    def add_follower(self) -> Follower:
        """Start the next follower (127.0.0.2, then .3, then .4)."""
        used = set(self.addrs)
        free = [a for a in FOLLOWER_ADDRS if a not in used]
        if not free:
            raise RuntimeError(f"at most {len(FOLLOWER_ADDRS)} followers")
        follower = Follower.create(self.leader, free[0], self.cert, self.key)
        self.followers.append(follower)
        # In address order, whatever was removed before (tests expect .2 before .3).
        self.followers.sort(key=lambda f: FOLLOWER_ADDRS.index(f.addr))
        return follower

    def remove_follower(self, follower: Follower) -> None:
        """Stop and delete a follower (an instance removed from the pool)."""
        self.followers.remove(follower)
        follower.destroy()

    def wait_replayed(self, timeout: float = 30.0) -> None:
        """Write a row on the leader; wait until every running follower shows it."""
        self._marker += 1
        marker = self._marker
        self.leader.query("INSERT INTO replica_check (n) VALUES (%s)", marker)
        for follower in self.followers:
            if follower.running:
                poll_until(
                    lambda f=follower: f.query(  # type: ignore[misc]
                        "SELECT 1 FROM replica_check WHERE n = %s", marker
                    ),
                    timeout=timeout,
                    what=f"row {marker} replayed on {follower.addr}",
                )

    def url(
        self, user: str = "app", password: str | None = None, dbname: str = "appdb", **query: str
    ) -> str:
        """postgres:// URL of the pool endpoint `followers.test:5432` (resolve it yourself)."""
        return postgres_url(FOLLOWERS_NAME, FOLLOWER_PORT, user, password, dbname, query)

    def restore(self, count: int = DEFAULT_FOLLOWERS) -> None:
        """Back to `count` running, caught-up followers, whatever a test did to them."""
        for follower in self.followers[count:]:
            self.remove_follower(follower)
        while len(self.followers) < count:
            self.add_follower()
        for follower in self.followers:
            if not follower.running:
                follower.start()
        self.wait_replayed()

    def close(self) -> None:
        for follower in list(self.followers):
            self.remove_follower(follower)
        shutil.rmtree(self.base, ignore_errors=True)


def prepare_leader(leader: PostgresServer) -> None:
    """Check the leader can feed replicas; make it so if it only lacks the pg_hba line.

    pg_hba.conf must allow `replication` connections (the `all` database does not match them).
    Until pgfixtures writes LEADER_HBA_REPLICATION itself, it is appended here and reloaded.
    """
    wal_level = leader.query("SHOW wal_level", dbname="postgres")[0][0]
    senders = int(leader.query("SHOW max_wal_senders", dbname="postgres")[0][0])
    if wal_level not in ("replica", "logical") or senders < 2 * len(FOLLOWER_ADDRS):
        raise RuntimeError(
            f"the leader has wal_level={wal_level} max_wal_senders={senders}; followers need"
            f" wal_level=replica and max_wal_senders >= {2 * len(FOLLOWER_ADDRS)}"
        )
    rules = leader.query(
        "SELECT count(*) FROM pg_hba_file_rules"
        " WHERE type = 'local' AND 'replication' = ANY(database) AND error IS NULL",
        dbname="postgres",
    )
    if not rules[0][0]:
        hba = leader.data_dir / "pg_hba.conf"
        with hba.open("a") as f:
            f.write(LEADER_HBA_REPLICATION + "\n")
        leader.query("SELECT pg_reload_conf()", dbname="postgres")
        replication = make_conninfo(
            "",
            host=str(leader.socket_dir),
            port=leader.port,
            user=SUPERUSER,
            replication="true",
            connect_timeout=5,
        )

        def can_replicate() -> bool:
            try:
                psycopg.connect(replication).close()
            except psycopg.OperationalError:
                return False
            return True

        poll_until(can_replicate, timeout=10, what="the leader to allow replication")
    leader.query("CREATE TABLE IF NOT EXISTS replica_check (n int PRIMARY KEY)")


@pytest.fixture(scope="session")
def leader_and_followers(pg: PostgresServer) -> Iterator[ReplicaCluster]:
    """The `pg` leader with two streaming followers on 127.0.0.2:5432 and 127.0.0.3:5432."""
    cluster = ReplicaCluster.start(pg)
    try:
        yield cluster
    finally:
        cluster.close()


@pytest.fixture
def followers(leader_and_followers: ReplicaCluster) -> ReplicaCluster:
    """The cluster with exactly two followers, both running and caught up."""
    leader_and_followers.restore()
    return leader_and_followers
