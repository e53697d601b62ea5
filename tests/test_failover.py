"""Roles end to end: failover that follows DNS, demotion, a wrong-role pool, lag-aware followers.

Real servers only: the session's streaming followers (tests/followers.py, 127.0.0.2-3:5432)
are promoted with pg_promote() to make primaries, so two primaries can sit behind one DNS name
(tests/dnsserver.py) at once -- a split brain. A writer loop goes through the real proxy with
asyncpg on ONE client connection and records where each row landed (inet_server_addr()); what
landed where is read back from each server itself. Promoted followers are removed after the
test (the `followers` fixture rebuilds fresh ones for the next).

The followers listen on 127.0.0.2-4:5432: run under `unshare -n` (a private loopback) when
another session might be using them.
"""

from __future__ import annotations

import asyncio
import threading
import time
from collections.abc import Iterator
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Any

import asyncpg
import psycopg
import pytest
from dnsserver import DNSServer
from pgfixtures import ProxyFactory, ProxyProcess
from psycopg.rows import dict_row

if TYPE_CHECKING:
    from followers import Follower, ReplicaCluster

pytest_plugins = ["followers"]

LEADER_NAME = "leader.test"
#: DNS TTL in these tests: short, so the suite stays fast. The window the proxy promises is
#: TTL + 2 s (docs/follower-pools.md); SLACK is for a loaded test machine.
TTL = 1
WINDOW = TTL + 2.0
SLACK = 3.0


@dataclass
class Write:
    n: int
    started: float
    ended: float
    addr: str | None = None
    error: str | None = None


@dataclass
class Writer:
    """INSERTs in a loop through the proxy on one connection (reconnecting only after an
    error that closed it); every attempt recorded."""

    proxy: ProxyProcess
    table: str
    writes: list[Write] = field(default_factory=list)
    connects: int = 0
    _stop: asyncio.Event = field(default_factory=asyncio.Event)
    _task: asyncio.Task[None] | None = None

    async def __aenter__(self) -> Writer:
        self._task = asyncio.create_task(self._run())
        return self

    async def __aexit__(self, *exc: object) -> None:
        self._stop.set()
        assert self._task is not None
        await self._task

    async def _run(self) -> None:
        conn: asyncpg.Connection | None = None
        n = 0
        sql = f"INSERT INTO {self.table} (id) VALUES ($1) RETURNING host(inet_server_addr())"
        try:
            while not self._stop.is_set():
                n += 1
                started = time.monotonic()
                try:
                    if conn is None or conn.is_closed():
                        conn = await asyncpg.connect(**self.proxy.asyncpg_params())
                        self.connects += 1
                    addr = await conn.fetchval(sql, n, timeout=15)
                    self.writes.append(Write(n, started, time.monotonic(), addr=addr))
                except (asyncpg.PostgresError, asyncpg.InterfaceError, OSError, TimeoutError) as e:
                    state = getattr(e, "sqlstate", None) or type(e).__name__
                    self.writes.append(Write(n, started, time.monotonic(), error=state))
                    if conn is not None and not conn.is_closed():
                        conn.terminate()
                    conn = None
                    await asyncio.sleep(0.05)
                await asyncio.sleep(0.01)
        finally:
            if conn is not None:
                conn.terminate()

    def on(self, addr: str) -> list[Write]:
        return [w for w in self.writes if w.addr == addr]

    async def until(self, what: str, check: Any, timeout: float = 20.0) -> None:
        deadline = time.monotonic() + timeout
        while not check():
            if time.monotonic() > deadline:
                raise AssertionError(f"timed out waiting for {what}: {self.writes[-5:]}")
            await asyncio.sleep(0.05)


def promote(follower: Follower) -> None:
    follower.query("SELECT pg_promote(true, 60)")
    assert not follower.in_recovery()


@pytest.fixture
def cluster(followers: ReplicaCluster) -> Iterator[ReplicaCluster]:
    """The followers, and afterwards: replay resumed, promoted ones replaced by fresh ones."""
    yield followers
    for f in list(followers.followers):
        try:
            if not f.in_recovery():
                followers.remove_follower(f)
            elif f.query("SELECT pg_is_wal_replay_paused()")[0][0]:
                f.query("SELECT pg_wal_replay_resume()")
        except psycopg.Error:
            followers.remove_follower(f)


def leader_proxy(
    proxy_factory: ProxyFactory, cluster: ReplicaCluster, dns: DNSServer, **env: str | int
) -> ProxyProcess:
    """The proxy with pool `appdb` on leader.test:5432 (TLS required, not verified: the test
    certificate does not name leader.test)."""
    url = cluster.url().replace(cluster.name, LEADER_NAME)
    settings: dict[str, str | int] = {
        "SIDECAR_DNS_NAMESERVERS": dns.nameserver,
        "SIDECAR_DNS_MIN_INTERVAL": "0.2",
        "SIDECAR_SERVER_TLS_SSLMODE": "require",
        "SIDECAR_DEFAULT_POOL_SIZE": 5,
        "SIDECAR_LAG_CHECK_INTERVAL": "0.5",
    }
    settings.update(env)
    return proxy_factory(f"appdb={url}", **settings)


def rows_on(follower: Follower, table: str) -> set[int]:
    return {int(r[0]) for r in follower.query(f"SELECT id FROM {table}")}


def window_of(writer: Writer, ready: float, old: str, new: str) -> float:
    """Seconds from `ready` to the start of the last write that did not land on `new`."""
    late = [w.started for w in writer.writes if w.started >= ready and w.addr != new]
    return max(late, default=ready) - ready


def log_events(proxy: ProxyProcess, at: str) -> list[str]:
    return [line for line in proxy.log_text().splitlines() if line.startswith(f"sidecar at={at} ")]


async def run_failover(
    cluster: ReplicaCluster, proxy_factory: ProxyFactory, *, demote: bool
) -> tuple[Writer, float, ProxyProcess, Follower, Follower, str]:
    table = cluster.leader.create_table("id int PRIMARY KEY")
    cluster.wait_replayed()
    a, b = cluster.followers[0], cluster.followers[1]
    promote(a)
    with DNSServer({LEADER_NAME: [a.addr]}, mode="all", ttl=TTL) as dns:
        proxy = leader_proxy(proxy_factory, cluster, dns)
        async with Writer(proxy, table) as writer:
            await writer.until("writes on A", lambda: len(writer.on(a.addr)) >= 20)
            if demote:
                a.query("ALTER SYSTEM SET default_transaction_read_only = on")
                a.query("SELECT pg_reload_conf()")
            promote(b)
            dns.set_records(LEADER_NAME, [b.addr])
            ready = time.monotonic()
            await writer.until(
                "writes on B", lambda: len([w for w in writer.on(b.addr) if w.started > ready]) > 0
            )
            # Keep writing past the window, to see nothing lands on A any more.
            settle = ready + WINDOW + SLACK + 1.0
            await writer.until("the window to pass", lambda: time.monotonic() > settle)
    return writer, ready, proxy, a, b, table


async def test_switchover_split_brain_writes_follow_dns(
    cluster: ReplicaCluster, proxy_factory: ProxyFactory
) -> None:
    """Two writable primaries; DNS moves from A to B: after the window no row lands on A."""
    writer, ready, proxy, a, b, table = await run_failover(cluster, proxy_factory, demote=False)
    window = window_of(writer, ready, a.addr, b.addr)
    print(f"split brain: window {window:.2f}s (TTL {TTL}s), {len(writer.writes)} writes")
    assert window <= WINDOW + SLACK, window
    # What the servers themselves hold: rows on A are only writes started before the end of
    # the window, and every write the proxy acknowledged is on the server it named.
    on_a, on_b = rows_on(a, table), rows_on(b, table)
    started = {w.n: w.started for w in writer.writes}
    assert on_a and on_b and not on_a & on_b
    assert all(started[n] <= ready + window for n in on_a)
    assert {w.n for w in writer.on(a.addr)} <= on_a
    assert {w.n for w in writer.on(b.addr)} <= on_b
    # The old leader stayed writable: in-flight transactions finished, none failed; the
    # client never reconnected (the pool did).
    assert [w for w in writer.writes if w.error] == []
    assert writer.connects == 1
    drained = log_events(proxy, "instance_draining") + log_events(proxy, "instance_forgotten")
    assert any(f"instance={a.addr}" in line for line in drained), proxy.log_text()[-3000:]


async def test_demoted_leader_no_write_error_after_the_window(
    cluster: ReplicaCluster, proxy_factory: ProxyFactory
) -> None:
    """A turns read-only (ALTER SYSTEM + reload), B is promoted, DNS moves: errors only
    before the window ends, and none is a stream of 25006."""
    writer, ready, proxy, a, b, _table = await run_failover(cluster, proxy_factory, demote=True)
    window = window_of(writer, ready, a.addr, b.addr)
    errors = [w.error for w in writer.writes if w.error]
    print(f"demotion: window {window:.2f}s (TTL {TTL}s), errors {errors}")
    assert window <= WINDOW + SLACK, window
    late_errors = [w for w in writer.writes if w.error and w.started > ready + window]
    assert late_errors == []
    # At most the transaction that met the reload fails with 25006: A is then WRONG_ROLE.
    assert len([w for w in writer.writes if w.error == "25006"]) <= 1
    assert any(f"instance={a.addr}" in line for line in log_events(proxy, "instance_wrong_role"))


async def test_pool_on_a_standby_with_read_write_target_gets_a_clear_error(
    cluster: ReplicaCluster, proxy_factory: ProxyFactory
) -> None:
    standby = cluster.followers[0]
    url = standby.url(target_session_attrs="read-write")
    proxy = proxy_factory(f"appdb={url}", SIDECAR_SERVER_TLS_SSLMODE="require")
    started = time.monotonic()
    with pytest.raises(asyncpg.PostgresError) as caught:
        await asyncpg.connect(**proxy.asyncpg_params(timeout=30))
    assert caught.value.sqlstate == "08001"
    message = str(caught.value)
    assert "target_session_attrs=read-write" in message and "standby" in message, message
    assert time.monotonic() - started < 15
    assert any(
        f"instance={standby.addr}" in line for line in log_events(proxy, "instance_wrong_role")
    )
    with psycopg.connect(proxy.dsn(dbname="sidecar"), autocommit=True, row_factory=dict_row) as c:
        rows = c.execute("SHOW INSTANCES").fetchall()
    assert [(r["addr"], r["state"], r["role"]) for r in rows] == [
        (standby.addr, "wrong_role", "standby")
    ]
    # The same pool with the target in SIDECAR_TARGET_SESSION_ATTRS, and a standby target: fine.
    ok = proxy_factory(
        f"appdb={standby.url()}",
        SIDECAR_SERVER_TLS_SSLMODE="require",
        SIDECAR_TARGET_SESSION_ATTRS="standby",
    )
    conn = await asyncpg.connect(**ok.asyncpg_params())
    try:
        assert await conn.fetchval("SELECT pg_is_in_recovery()") is True
    finally:
        await conn.close()


class LeaderWrites:
    """Commits on the leader every 50 ms in a thread: WAL for the followers to replay.
    Directly, or through a proxy pool on the leader once `via` is set."""

    def __init__(self, cluster: ReplicaCluster) -> None:
        self.leader = cluster.leader
        self.table = cluster.leader.create_table("id serial PRIMARY KEY, at timestamptz")
        self.via: str | None = None
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._run, daemon=True)

    def _run(self) -> None:
        sql = f"INSERT INTO {self.table} (at) VALUES (now())"
        conn: psycopg.Connection[Any] | None = None
        try:
            while not self._stop.wait(0.05):
                if self.via is None:
                    self.leader.query(sql)
                    continue
                if conn is None:
                    conn = psycopg.connect(self.via, autocommit=True)
                conn.execute(sql)
        finally:
            if conn is not None:
                conn.close()

    def __enter__(self) -> LeaderWrites:
        self._thread.start()
        return self

    def __exit__(self, *exc: object) -> None:
        self._stop.set()
        self._thread.join(10)


@dataclass
class Readers:
    """Reads through the proxy on a few connections; (start time, address) of each."""

    proxy: ProxyProcess
    clients: int = 4
    reads: list[tuple[float, str]] = field(default_factory=list)
    _stop: asyncio.Event = field(default_factory=asyncio.Event)
    _tasks: list[asyncio.Task[None]] = field(default_factory=list)

    async def __aenter__(self) -> Readers:
        self._tasks = [asyncio.create_task(self._run()) for _ in range(self.clients)]
        return self

    async def __aexit__(self, *exc: object) -> None:
        self._stop.set()
        await asyncio.gather(*self._tasks)

    async def _run(self) -> None:
        conn = await asyncpg.connect(**self.proxy.asyncpg_params())
        try:
            while not self._stop.is_set():
                started = time.monotonic()
                addr = await conn.fetchval("SELECT host(inet_server_addr())", timeout=15)
                self.reads.append((started, addr))
                await asyncio.sleep(0.02)
        finally:
            await conn.close()

    def since(self, t: float) -> set[str]:
        return {addr for started, addr in self.reads if started >= t}


def instance_states(proxy: ProxyProcess) -> dict[str, dict[str, Any]]:
    with psycopg.connect(proxy.dsn(dbname="sidecar"), autocommit=True, row_factory=dict_row) as c:
        return {r["addr"]: r for r in c.execute("SHOW INSTANCES").fetchall()}


async def wait_state(proxy: ProxyProcess, addr: str, state: str, timeout: float) -> float:
    deadline = time.monotonic() + timeout
    while True:
        row = (await asyncio.to_thread(instance_states, proxy)).get(addr)
        if row is not None and row["state"] == state:
            return time.monotonic()
        if time.monotonic() > deadline:
            raise AssertionError(f"{addr} not {state} within {timeout}s: {row}")
        await asyncio.sleep(0.1)


@pytest.mark.parametrize("lag_from", ["replay_timestamp", "leader_lsn"])
async def test_paused_replay_takes_a_follower_out_until_it_catches_up(
    cluster: ReplicaCluster, proxy_factory: ProxyFactory, lag_from: str
) -> None:
    """Lag by the last replayed commit's age; or, when the proxy also pools the leader (the
    same cluster), by the leader's own WAL position."""
    f1, f2 = cluster.followers[0], cluster.followers[1]
    max_lag, interval = 2.0, 0.5
    pools = [f"appdb={cluster.url()}"]
    if lag_from == "leader_lsn":
        pools.append(f"leader={cluster.leader.url()}")
    with (
        DNSServer({cluster.name: cluster.addrs}, mode="all", ttl=TTL) as dns,
        LeaderWrites(cluster) as writes,
    ):
        proxy = proxy_factory(
            *pools,
            SIDECAR_DNS_NAMESERVERS=dns.nameserver,
            SIDECAR_SERVER_TLS_SSLMODE="require",
            SIDECAR_MAX_REPLICA_LAG=str(max_lag),
            SIDECAR_LAG_CHECK_INTERVAL=str(interval),
            SIDECAR_STATS_PERIOD=1,
        )
        if lag_from == "leader_lsn":
            writes.via = proxy.dsn(dbname="leader")
        async with Readers(proxy) as readers:
            start = time.monotonic()
            while readers.since(start) != {f1.addr, f2.addr}:
                assert time.monotonic() < start + 20, readers.since(start)
                await asyncio.sleep(0.1)
            f1.query("SELECT pg_wal_replay_pause()")
            paused = time.monotonic()
            lagging = await wait_state(proxy, f1.addr, "lagging", max_lag + 15)
            # Lag passes the limit about max_lag after the pause; one check interval later
            # (plus a janitor tick, and slack for a loaded machine) it is out.
            assert lagging - paused <= max_lag + interval + 0.5 + SLACK
            await asyncio.sleep(1.0)
            assert readers.since(lagging + 0.1) == {f2.addr}
            row = instance_states(proxy)[f1.addr]
            assert row["lag_s"] > max_lag and row["role"] == "standby"
            f1.query("SELECT pg_wal_replay_resume()")
            back = await wait_state(proxy, f1.addr, "up", 15)
            start = time.monotonic()
            while f1.addr not in readers.since(back):
                assert time.monotonic() < start + 15, "reads never came back to f1"
                await asyncio.sleep(0.1)
    lines = [
        line
        for line in log_events(proxy, "instance")
        if f"instance={f1.addr}" in line and "sample#lag_s=" in line
    ]
    assert lines, proxy.log_text()[-3000:]
    lagging = [line for line in log_events(proxy, "instance_lagging") if f"={f1.addr} " in line]
    assert lagging and all(f"lag_from={lag_from}" in line for line in lagging), lagging
    assert any(f"instance={f1.addr}" in line for line in log_events(proxy, "instance_caught_up"))


async def test_leader_made_read_only_in_place_is_left_and_comes_back(
    cluster: ReplicaCluster, proxy_factory: ProxyFactory
) -> None:
    """No DNS: the pool's only instance turns read-only (ALTER SYSTEM + reload). What its
    server reports ends its use at once: one 25006 at most, then a clear 08001; when it is
    writable again, a re-check login brings it back."""
    table = cluster.leader.create_table("id int PRIMARY KEY")
    cluster.wait_replayed()
    a = cluster.followers[0]
    promote(a)
    proxy = proxy_factory(f"appdb={a.url()}", SIDECAR_SERVER_TLS_SSLMODE="require")
    conn = await asyncpg.connect(**proxy.asyncpg_params())
    sql = f"INSERT INTO {table} (id) VALUES ($1)"
    await conn.execute(sql, 1)
    a.query("ALTER SYSTEM SET default_transaction_read_only = on")
    a.query("SELECT pg_reload_conf()")
    errors: list[str] = []
    n = 1
    deadline = time.monotonic() + 20
    while not any(e.startswith("08") for e in errors):
        assert time.monotonic() < deadline, errors
        n += 1
        try:
            if conn.is_closed():
                conn = await asyncpg.connect(**proxy.asyncpg_params())
            await conn.execute(sql, n, timeout=15)
        except asyncpg.PostgresError as e:
            errors.append(f"{e.sqlstate} {e}")
    assert len([e for e in errors if e.startswith("25006")]) <= 1, errors
    assert "target_session_attrs=read-write" in errors[-1], errors
    assert "read-only-primary" in errors[-1], errors
    wrong = [line for line in log_events(proxy, "instance_wrong_role") if f"={a.addr} " in line]
    assert wrong, proxy.log_text()[-3000:]
    print(f"in place: errors {errors}; {wrong[0]}")
    a.query("ALTER SYSTEM RESET default_transaction_read_only")
    a.query("SELECT pg_reload_conf()")
    deadline = time.monotonic() + 20
    while True:
        n += 1
        try:
            if conn.is_closed():
                conn = await asyncpg.connect(**proxy.asyncpg_params())
            await conn.execute(sql, n, timeout=15)
            break
        except asyncpg.PostgresError as e:
            assert e.sqlstate.startswith("08"), e
            assert time.monotonic() < deadline, "never writable again"
    await conn.close()
    assert any(f"={a.addr} " in line for line in log_events(proxy, "instance_role_ok"))
