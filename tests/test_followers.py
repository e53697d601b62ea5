"""Follower pools end to end: the real proxy over real streaming replicas behind a real DNS name.

Like a Heroku Postgres Advanced follower pool: the pool's URL names `followers.test:5432`, a
DNSServer on loopback answers it with ONE follower address per query (rotate mode, TTL 1 s) or
all of them ("all" mode), and the proxy finds the instances itself (SIDECAR_DNS_NAMESERVERS).
Load comes from asyncpg and psycopg clients running short read queries in a loop; what each
instance serves is counted from PostgreSQL's side (pg_stat_activity on every follower), never
taken from the proxy's word for it. Every wait polls; the only fixed pauses let time pass on
purpose (DNS answers, stats periods, an instance staying down).

The followers listen on 127.0.0.2-4:5432 (and one test's relay on 127.0.0.5:5432), so two
sessions cannot run these tests at once on one host; `unshare -n` (a private loopback) lets
them.
"""

from __future__ import annotations

import asyncio
import contextlib
import random
import re
import threading
import time
from collections import Counter
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Any, TypeVar

import asyncpg
import psycopg
import pytest
from dnsserver import DNSServer
from pgfixtures import SUPERUSER, ProxyFactory, ProxyProcess
from psycopg.conninfo import make_conninfo

if TYPE_CHECKING:
    # Imported for real by pytest_plugins only: an earlier import would skip assert rewriting.
    from followers import Follower, ReplicaCluster

pytest_plugins = ["followers"]

F1, F2, F3 = "127.0.0.2", "127.0.0.3", "127.0.0.4"
POOL_SIZE = 20
#: SQLSTATE classes a client may see when an instance dies under it: 08 connection exception,
#: 57 operator intervention (57P01 admin shutdown and friends).
DEATH_CLASSES = ("08", "57")
#: What a read on a follower returns: the value sent, the instance's address, in recovery.
QUERY = "select $1::int, host(inet_server_addr()), pg_is_in_recovery() from pg_sleep($2)"

T = TypeVar("T")


# -- observing the instances -----------------------------------------------------------------


class Backends:
    """Counts the proxy's server connections on each follower, from PostgreSQL's side.

    One superuser connection per follower over its unix socket, kept open (a poll costs no
    fork) and reopened after the follower restarts; a superuser takes a reserved slot, so
    counting never competes with the app for a full instance's last slots.
    """

    SQL = (
        "SELECT count(*) FROM pg_stat_activity"
        " WHERE backend_type = 'client backend' AND usename = 'app' AND datname = 'appdb'"
    )

    def __init__(self, cluster: ReplicaCluster) -> None:
        self.cluster = cluster
        self._conns: dict[str, psycopg.Connection[Any]] = {}
        self._lock = threading.Lock()

    def count(self, addr: str) -> int | None:
        """`app` backends on the follower at `addr`; None while it is down."""
        follower = next(f for f in self.cluster.followers if f.addr == addr)
        with self._lock:
            conn = self._conns.get(addr)
            try:
                if conn is None or conn.closed:
                    conn = psycopg.connect(
                        make_conninfo(
                            "",
                            host=str(follower.socket_dir),
                            port=follower.port,
                            user=SUPERUSER,
                            dbname="postgres",
                            connect_timeout=3,
                        ),
                        autocommit=True,
                    )
                    self._conns[addr] = conn
                row = conn.execute(self.SQL).fetchone()
            except psycopg.Error:
                self._conns.pop(addr, None)
                if conn is not None:
                    conn.close()
                return None
            return int(row[0]) if row else None

    def counts(self, addrs: list[str] | None = None) -> dict[str, int | None]:
        return {a: self.count(a) for a in (addrs or self.cluster.addrs)}

    def close(self) -> None:
        with self._lock:
            for conn in self._conns.values():
                conn.close()
            self._conns.clear()


class Watch:
    """Samples Backends.counts() in a thread until stopped; keeps every sample."""

    def __init__(self, backends: Backends, addrs: list[str], interval: float = 0.02) -> None:
        self.backends = backends
        self.addrs = addrs
        self.interval = interval
        self.samples: list[tuple[float, dict[str, int | None]]] = []
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._run, daemon=True)

    def _run(self) -> None:
        while not self._stop.is_set():
            self.samples.append((time.monotonic(), self.backends.counts(self.addrs)))
            self._stop.wait(self.interval)

    def __enter__(self) -> Watch:
        self._thread.start()
        return self

    def __exit__(self, *exc: object) -> None:
        self._stop.set()
        self._thread.join(10)

    def peak(self, addr: str) -> int:
        return max((s[addr] or 0 for _, s in self.samples), default=0)


async def eventually(
    check: Callable[[], T | None], timeout: float, what: str, interval: float = 0.1
) -> T:
    """Run the blocking `check` in a thread until it returns something truthy."""
    deadline = time.monotonic() + timeout
    last: T | None = None
    while True:
        last = await asyncio.to_thread(check)
        if last:
            return last
        if time.monotonic() > deadline:
            raise AssertionError(f"timed out after {timeout}s waiting for {what}")
        await asyncio.sleep(interval)


def spread_is(backends: Backends, want: dict[str, int], slack: int = 1) -> Callable[[], Any]:
    """A check: each address serves its wanted count of backends, give or take `slack`."""

    def check() -> dict[str, int | None] | None:
        counts = backends.counts(list(want))
        ok = all(c is not None and abs(c - want[a]) <= slack for a, c in counts.items())
        return counts if ok else None

    return check


# -- the proxy's log ---------------------------------------------------------------------------

_PAIR = re.compile(r'(\S+?)=("(?:[^"\\]|\\.)*"|\S*)')


def logfmt(line: str) -> dict[str, str]:
    return {k: v.strip('"') for k, v in _PAIR.findall(line)}


def events(proxy: ProxyProcess, at: str, **match: str) -> list[dict[str, str]]:
    """Complete log lines `sidecar at=<at>` whose fields include `match`, parsed."""
    text = proxy.log_text()
    out = []
    for line in text[: text.rfind("\n") + 1].splitlines():
        if line.startswith(f"sidecar at={at} "):
            fields = logfmt(line)
            if all(fields.get(k) == v for k, v in match.items()):
                out.append(fields)
    return out


def log_lines(proxy: ProxyProcess) -> list[str]:
    text = proxy.log_text()
    return text[: text.rfind("\n") + 1].splitlines()


# -- load ----------------------------------------------------------------------------------------


class AsyncpgClient:
    """asyncpg as apps use it: prepared statements cached per connection (the proxy keeps
    them working across server connections in transaction mode)."""

    SQL = QUERY

    def __init__(self, conn: asyncpg.Connection) -> None:
        self.conn = conn
        self.pid = conn.get_server_pid()

    @classmethod
    async def connect(cls, proxy: ProxyProcess) -> AsyncpgClient:
        return cls(await asyncpg.connect(**proxy.asyncpg_params(statement_cache_size=100)))

    async def query(self, n: int, sleep: float) -> tuple[Any, ...] | None:
        row = await self.conn.fetchrow(self.SQL, n, sleep)
        return None if row is None else tuple(row)

    async def close(self, broken: bool) -> None:
        if broken:
            self.conn.terminate()
        else:
            await self.conn.close(timeout=5)


class PsycopgClient:
    """psycopg 3 (libpq), autocommit, server-side prepared after a few runs (its default)."""

    SQL = QUERY.replace("$1", "%s").replace("$2", "%s")

    def __init__(self, conn: psycopg.AsyncConnection[Any]) -> None:
        self.conn = conn
        self.pid = conn.info.backend_pid

    @classmethod
    async def connect(cls, proxy: ProxyProcess) -> PsycopgClient:
        return cls(await psycopg.AsyncConnection.connect(proxy.dsn(), autocommit=True))

    async def query(self, n: int, sleep: float) -> tuple[Any, ...] | None:
        cur = await self.conn.execute(self.SQL, (n, sleep))
        return await cur.fetchone()

    async def close(self, broken: bool) -> None:
        with contextlib.suppress(psycopg.Error, TimeoutError):
            async with asyncio.timeout(5):
                await self.conn.close()


@dataclass
class Failure:
    """One error a client saw."""

    at: float  #: time.monotonic()
    exc: BaseException
    driver: str
    #: The client's BackendKeyData pid: the proxy's own, shown as client_pid= in its log.
    client_pid: int | None

    @property
    def sqlstate(self) -> str | None:
        if isinstance(self.exc, asyncpg.PostgresError | psycopg.Error):
            return self.exc.sqlstate or None
        return None

    def __str__(self) -> str:
        exc = self.exc
        return (
            f"{self.driver} client_pid={self.client_pid}:"
            f" {type(exc).__name__}({self.sqlstate}): {exc}"
        )


@dataclass
class Load:
    """`clients` connections through the proxy (asyncpg and psycopg in turn), each running
    QUERY in a loop until the block ends.

    A client that gets an error records it and reconnects; a query or connect that takes
    longer than `hang_after` is recorded as a hang (TimeoutError). Every answer is checked.
    """

    proxy: ProxyProcess
    clients: int
    sleep: float = 0.02
    hang_after: float = 15.0
    ok: int = 0
    served: Counter[str] = field(default_factory=Counter)
    #: (time.monotonic(), addr) of every answered query.
    answers: list[tuple[float, str]] = field(default_factory=list)
    errors: list[Failure] = field(default_factory=list)
    wrong: list[str] = field(default_factory=list)
    _stopping: bool = False
    _tasks: list[asyncio.Task[None]] = field(default_factory=list)

    async def __aenter__(self) -> Load:
        self._tasks = [asyncio.create_task(self._client(i)) for i in range(self.clients)]
        return self

    async def __aexit__(self, *exc: object) -> None:
        self._stopping = True
        await asyncio.gather(*self._tasks)

    async def _client(self, i: int) -> None:
        rng = random.Random(i)
        kind = (AsyncpgClient, PsycopgClient)[i % 2]
        client: AsyncpgClient | PsycopgClient | None = None
        while not self._stopping:
            n = rng.randrange(1_000_000)
            try:
                async with asyncio.timeout(self.hang_after):
                    if client is None:
                        client = await kind.connect(self.proxy)
                    row = await client.query(n, self.sleep)
            except (Exception, TimeoutError) as exc:
                pid = client.pid if client else None
                self.errors.append(Failure(time.monotonic(), exc, kind.__name__, pid))
                if client is not None:
                    await client.close(broken=True)
                    client = None
                await asyncio.sleep(0.05)
                continue
            if row is None or row[0] != n or row[2] is not True:
                self.wrong.append(f"sent {n}, got {row!r}")
                continue
            self.ok += 1
            self.served[row[1]] += 1
            self.answers.append((time.monotonic(), row[1]))
        if client is not None:
            await client.close(broken=False)

    def served_since(self, t: float) -> Counter[str]:
        return Counter(addr for when, addr in self.answers if when >= t)

    def check_clean(self) -> None:
        assert not self.wrong, self.wrong[:5]
        assert not self.errors, [str(f) for f in self.errors[:5]]


#: asyncpg prepares in two round trips: Parse/Describe/Flush, then Bind/Execute/Sync. A
#: server that dies between the two reaches asyncpg while it expects no message, and asyncpg
#: reports that on its next call as this InternalClientError (no SQLSTATE) -- connected to
#: PostgreSQL directly too. Accepted only where the proxy's log shows it closed that client
#: because the server died under it: anything else is the proxy's doing.
ASYNCPG_BETWEEN_DESCRIBE_AND_BIND = "another operation (2) is in progress"


def closed_by_server_loss(proxy: ProxyProcess, client_pid: int | None) -> bool:
    """The proxy's log shows it closed this client because its server went away."""
    lines = log_lines(proxy)
    login = next((i for i, line in enumerate(lines) if f" client_pid={client_pid}" in line), None)
    if login is None:
        return False
    addr = logfmt(lines[login])["addr"]
    for line in lines[login + 1 :]:
        if line.startswith("sidecar at=disconnect ") and f" addr={addr} " in line:
            return logfmt(line)["reason"].startswith("server closed:")
    return False


def assert_sqlstates(
    failures: list[Failure], classes: tuple[str, ...], proxy: ProxyProcess
) -> None:
    """Every failure is a PostgreSQL error whose SQLSTATE is of one of `classes`."""
    bad = []
    for f in failures:
        if (f.sqlstate or "")[:2] in classes:
            continue
        if (
            isinstance(f.exc, asyncpg.InternalClientError)
            and ASYNCPG_BETWEEN_DESCRIBE_AND_BIND in str(f.exc)
            and closed_by_server_loss(proxy, f.client_pid)
        ):
            continue
        bad.append(str(f))
    assert not bad, "failures without an expected SQLSTATE:\n" + "\n".join(bad)


# -- fixtures --------------------------------------------------------------------------------


@pytest.fixture
def dns(followers: ReplicaCluster) -> Iterator[DNSServer]:
    """followers.test -> the two followers, one per answer, TTL 1 s."""
    with DNSServer({followers.name: followers.addrs}, mode="rotate", ttl=1) as server:
        yield server


@pytest.fixture
def backends(followers: ReplicaCluster) -> Iterator[Backends]:
    counter = Backends(followers)
    try:
        # An earlier test's proxy may still be closing its server connections.
        deadline = time.monotonic() + 10
        while any(counter.counts().values()) and time.monotonic() < deadline:
            time.sleep(0.05)
        yield counter
    finally:
        counter.close()


def start_proxy(
    proxy_factory: ProxyFactory, cluster: ReplicaCluster, dns: DNSServer, **env: str | int
) -> ProxyProcess:
    """The real proxy with one pool `appdb` on the follower pool endpoint, TLS verify-full."""
    settings: dict[str, str | int] = {
        "SIDECAR_DNS_NAMESERVERS": dns.nameserver,
        "SIDECAR_DNS_MIN_INTERVAL": "0.2",
        "SIDECAR_DEFAULT_POOL_SIZE": POOL_SIZE,
        "SIDECAR_MAX_CLIENT_CONN": 500,
        "SIDECAR_SERVER_TLS_SSLMODE": "verify-full",
        "SIDECAR_SERVER_TLS_CA_FILE": str(cluster.leader.ca_file),
    }
    settings.update(env)
    return proxy_factory(f"appdb={cluster.url()}", **settings)


def follower_at(cluster: ReplicaCluster, addr: str) -> Follower:
    return next(f for f in cluster.followers if f.addr == addr)


# -- spreading ----------------------------------------------------------------------------------


async def test_busy_pool_spreads_evenly_over_two_instances(
    followers: ReplicaCluster, dns: DNSServer, backends: Backends, proxy_factory: ProxyFactory
) -> None:
    proxy = start_proxy(proxy_factory, followers, dns)
    async with Load(proxy, clients=60) as load:
        # The first answer names one follower, so the pool fills there first; the second
        # follower shows up one TTL later and the pool moves half its connections over.
        counts = await eventually(
            spread_is(backends, {F1: 10, F2: 10}), timeout=15, what="10 ± 1 on each follower"
        )
        assert sum(c or 0 for c in counts.values()) <= POOL_SIZE
        # and it stays that way: no flapping between instances
        await asyncio.sleep(1.0)
        assert await asyncio.to_thread(spread_is(backends, {F1: 10, F2: 10})), counts
    load.check_clean()
    assert load.served[F1] and load.served[F2]


async def test_cap_per_instance_is_never_exceeded(
    followers: ReplicaCluster, dns: DNSServer, backends: Backends, proxy_factory: ProxyFactory
) -> None:
    cap = 6
    proxy = start_proxy(proxy_factory, followers, dns, SIDECAR_MAX_PER_INSTANCE=cap)
    # 40 clients over 12 server connections: they waited, and every query was answered
    load = await hold_capped_load(
        proxy, backends, cap, settle_s=15, run_s=3.0, min_answers=100, min_samples=50
    )
    assert load.ok > 200


async def hold_capped_load(
    proxy: ProxyProcess,
    backends: Backends,
    cap: int,
    *,
    settle_s: float,
    run_s: float,
    min_answers: int,
    min_samples: int,
) -> Load:
    """40 clients through a pool capped at `cap` per follower: the spread reaches the cap on
    both, serving goes on (more than `min_answers` in `run_s`), no instance's peak ever passes
    the cap, and the load ends clean. Returns the finished load."""
    with Watch(backends, [F1, F2]) as watch:
        async with Load(proxy, clients=40) as load:
            await eventually(
                spread_is(backends, {F1: cap, F2: cap}, slack=0),
                timeout=settle_s,
                what=f"{cap} on each follower",
            )
            started = load.ok
            await asyncio.sleep(run_s)
            assert load.ok - started > min_answers, "the capped pool stopped serving"
    assert len(watch.samples) > min_samples
    peaks = {a: watch.peak(a) for a in (F1, F2)}
    assert peaks == {F1: cap, F2: cap}, f"per-instance peaks {peaks}, cap {cap}"
    load.check_clean()
    return load


async def test_dns_all_mode_spreads_the_first_burst(
    followers: ReplicaCluster, backends: Backends, proxy_factory: ProxyFactory
) -> None:
    with DNSServer({followers.name: followers.addrs}, mode="all", ttl=5) as dns:
        proxy = start_proxy(proxy_factory, followers, dns)
        with Watch(backends, [F1, F2]) as watch:
            # one burst: POOL_SIZE clients, each holding a server for a second
            async with Load(proxy, clients=POOL_SIZE, sleep=1.0) as load:
                await eventually(
                    lambda: load.ok >= POOL_SIZE, timeout=15, what="the first burst answered"
                )
        load.check_clean()
    connects = Counter(e["server"] for e in events(proxy, "server_connect"))
    assert connects == {f"{F1}:5432": 10, f"{F2}:5432": 10}, connects
    # nothing had to move: the spread was right from the first connection
    assert not [e for e in events(proxy, "server_close") if "rebalancing" in e["reason"]]
    assert watch.peak(F1) == 10 and watch.peak(F2) == 10


# -- instances failing --------------------------------------------------------------------------


async def test_stopped_instance_fails_only_its_transactions_and_comes_back(
    followers: ReplicaCluster, dns: DNSServer, backends: Backends, proxy_factory: ProxyFactory
) -> None:
    victim = follower_at(followers, F1)
    proxy = start_proxy(proxy_factory, followers, dns)
    async with Load(proxy, clients=60) as load:
        await eventually(spread_is(backends, {F1: 10, F2: 10}), timeout=15, what="10/10")
        before = await asyncio.to_thread(backends.count, F1)
        assert before is not None
        load.check_clean()
        stopping = time.monotonic()
        await asyncio.to_thread(victim.stop, "immediate")
        stopped = time.monotonic()
        # while it is down, the other follower answers everything
        await asyncio.sleep(3.0)
        during = load.served_since(stopped + 0.5)
        assert during[F2] > 100 and not during[F1], during
        assert (await asyncio.to_thread(backends.count, F2)) == POOL_SIZE
        restarted = time.monotonic()
        await asyncio.to_thread(victim.start)
        await eventually(
            spread_is(backends, {F1: 10, F2: 10}),
            timeout=15,
            what="the restarted follower to take half the pool again",
        )
        # Its new backends are counted as soon as they exist, a moment before they have
        # answered a query: wait for one answer rather than assert it at once.
        await eventually(
            lambda: load.served_since(restarted)[F1] > 0,
            timeout=5,
            what="a query answered by the restarted follower",
        )
    assert not load.wrong, load.wrong[:5]
    failures = load.errors
    # only transactions in flight on the stopped instance failed, all with a clean SQLSTATE
    assert all(stopping <= f.at <= stopped + 1.0 for f in load.errors), load.errors
    assert len(failures) <= before, f"{len(failures)} failures, {before} servers on {F1}"
    assert_sqlstates(failures, DEATH_CLASSES, proxy)


@contextlib.contextmanager
def few_slots(follower: Follower, slots: int = 16) -> Iterator[None]:
    """Restart `follower` so that only `slots` non-superuser connections fit (the rest of
    max_connections reserved for superusers); undo it (with a restart) when the block ends."""
    reserved = int(follower.query("SHOW max_connections")[0][0]) - slots
    follower.query(f"ALTER SYSTEM SET superuser_reserved_connections = {reserved}")
    try:
        follower.stop("fast")
        follower.start()
        yield
    finally:
        follower.query("ALTER SYSTEM RESET superuser_reserved_connections")
        follower.stop("fast")
        follower.start()


def fill_slots(follower: Follower) -> list[psycopg.Connection[Any]]:
    """Take every free non-superuser slot with direct connections (another dyno's), so the
    next connection gets 53300 too_many_connections."""
    conns: list[psycopg.Connection[Any]] = []
    conninfo = make_conninfo(
        "", host=str(follower.socket_dir), port=follower.port, user="md5user", dbname="appdb"
    )
    while len(conns) < 50:
        try:
            conns.append(psycopg.connect(conninfo))
        except psycopg.OperationalError as exc:
            if "remaining connection slots are reserved" in str(exc):
                return conns
            raise
    raise AssertionError("the follower kept accepting connections")


async def test_instance_answering_too_many_connections_is_quarantined(
    followers: ReplicaCluster, dns: DNSServer, backends: Backends, proxy_factory: ProxyFactory
) -> None:
    full = follower_at(followers, F1)  # the first address DNS gives out
    with few_slots(full):
        await asyncio.to_thread(backends.count, F1)  # the watcher's slot, before filling
        fillers = await asyncio.to_thread(fill_slots, full)
        try:
            proxy = start_proxy(proxy_factory, followers, dns, SIDECAR_STATS_PERIOD=1)
            with Watch(backends, [F1, F2]) as watch:
                async with Load(proxy, clients=60) as load:
                    await eventually(
                        spread_is(backends, {F1: 0, F2: POOL_SIZE}, slack=0),
                        timeout=15,
                        what="the whole pool on the other follower",
                    )
                    await eventually(
                        lambda: events(proxy, "instance", instance=F1, state="quarantined"),
                        timeout=10,
                        what="a stats line showing the full follower quarantined",
                    )
                    refused = events(proxy, "server_connect_failed", instance=F1)
                    assert refused and {e["sqlstate"] for e in refused} == {"53300"}, refused
                    assert refused[0]["instance_state"] == "quarantined"
                    load.check_clean()
                    # the other dynos leave: the follower has room again and gets its share
                    for conn in fillers:
                        await asyncio.to_thread(conn.close)
                    fillers = []
                    await eventually(
                        spread_is(backends, {F1: 10, F2: 10}),
                        timeout=15,
                        what="the follower back in use with half the pool",
                    )
            load.check_clean()
            assert watch.peak(F2) <= POOL_SIZE
        finally:
            for conn in fillers:
                conn.close()


# -- DNS changes --------------------------------------------------------------------------------


async def test_third_instance_in_dns_gets_its_share_and_is_forgotten_when_gone(
    followers: ReplicaCluster, dns: DNSServer, backends: Backends, proxy_factory: ProxyFactory
) -> None:
    # forget_after above the 3 s it takes DNS to name each of three instances once (TTL 1 s)
    proxy = start_proxy(proxy_factory, followers, dns, SIDECAR_DNS_FORGET_AFTER=4)
    async with Load(proxy, clients=60) as load:
        await eventually(spread_is(backends, {F1: 10, F2: 10}), timeout=15, what="10/10")
        # scale up: a third instance joins the pool, and DNS starts naming it
        third = await asyncio.to_thread(followers.add_follower)
        assert third.addr == F3
        dns.set_records(followers.name, [F1, F2, F3])
        counts = await eventually(
            spread_is(backends, {F1: 7, F2: 7, F3: 6}),
            timeout=15,
            what="a third of the pool on each of three followers",
        )
        assert sum(c or 0 for c in counts.values()) <= POOL_SIZE
        assert len(events(proxy, "instance_added", instance=F3)) == 1
    load.check_clean()
    # scale down between two bursts of traffic: the instance is shut down, and DNS stops
    # naming it; the next burst finds it refusing
    await asyncio.to_thread(third.stop, "immediate")
    dns.set_records(followers.name, [F1, F2])
    async with Load(proxy, clients=60) as load:
        refused = await eventually(
            lambda: events(proxy, "server_connect_failed", instance=F3),
            timeout=10,
            what="a failed connect to the stopped follower",
        )
        assert refused[0]["instance_state"] == "quarantined", refused[0]
        forgotten = await eventually(
            lambda: events(proxy, "instance_forgotten", instance=F3),
            timeout=10,
            what=f"at=instance_forgotten instance={F3}",
        )
        assert len(forgotten) == 1
        mark = len(log_lines(proxy))
        await eventually(spread_is(backends, {F1: 10, F2: 10}), timeout=15, what="10/10 again")
        await asyncio.sleep(2.0)
        after = [line for line in log_lines(proxy)[mark:] if F3 in line]
        assert not after, f"the forgotten instance is still tried: {after[:3]}"
    load.check_clean()


async def test_stale_instance_that_fails_is_forgotten_with_a_log_line(
    followers: ReplicaCluster, dns: DNSServer, backends: Backends, proxy_factory: ProxyFactory
) -> None:
    # A pool of 2: one server connection on each follower, and later exactly one connect
    # attempt at a time.
    proxy = start_proxy(
        proxy_factory, followers, dns, SIDECAR_DNS_FORGET_AFTER=2, SIDECAR_DEFAULT_POOL_SIZE=2
    )
    leaving = follower_at(followers, F2)
    async with Load(proxy, clients=2, sleep=0.05) as light:
        await eventually(spread_is(backends, {F1: 1, F2: 1}, slack=0), timeout=15, what="1/1")
        await eventually(lambda: light.served[F2] > 5, timeout=5, what="F2 used")
        # scale down, DNS first: past forget_after the instance is stale, yet still used
        # (rotation alone must never take a healthy instance out) ...
        dns.set_records(followers.name, [F1])
        await asyncio.sleep(3.0)
        assert light.served_since(time.monotonic() - 1.0)[F2] > 0
    light.check_clean()
    # ... until it goes down while its connection sits idle
    await asyncio.to_thread(leaving.stop, "immediate")
    await eventually(
        lambda: events(proxy, "server_lost", server=f"{F2}:5432"),
        timeout=5,
        what="the idle connection to the stopped follower noticed",
    )
    # the next connection wanted goes to the emptiest instance, the stale one, and fails
    async with Load(proxy, clients=4) as burst:
        refused = await eventually(
            lambda: events(proxy, "server_connect_failed", instance=F2),
            timeout=10,
            what="a connect to the stopped follower",
        )
        await eventually(spread_is(backends, {F1: 2}, slack=0), timeout=10, what="all on F1")
        await asyncio.sleep(1.5)  # a few DNS answers, janitor rounds and stats periods
    burst.check_clean()
    assert len(refused) == 1, refused
    # the failed check took the stale instance out of the set at once ...
    assert refused[0]["instance_state"] == "forgotten", refused[0]
    # ... which must be announced like every other way an instance is forgotten
    assert events(proxy, "instance_forgotten", instance=F2), "no at=instance_forgotten line"


async def test_forgotten_instance_that_returns_is_used_again(
    followers: ReplicaCluster, dns: DNSServer, backends: Backends, proxy_factory: ProxyFactory
) -> None:
    # forget_after above the 2 s it takes DNS to name each of two instances once (TTL 1 s)
    proxy = start_proxy(
        proxy_factory, followers, dns, SIDECAR_DNS_FORGET_AFTER=3, SIDECAR_STATS_PERIOD=1
    )
    replaced = follower_at(followers, F2)
    async with Load(proxy, clients=30) as load:
        await eventually(spread_is(backends, {F1: 10, F2: 10}), timeout=15, what="10/10")
    load.check_clean()
    # the instance goes away between two bursts of traffic: down, and out of DNS
    await asyncio.to_thread(replaced.stop, "immediate")
    dns.set_records(followers.name, [F1])
    async with Load(proxy, clients=30) as load:
        await eventually(
            lambda: events(proxy, "instance", instance=F2, state="quarantined"),
            timeout=10,
            what="a stats line with the instance quarantined",
        )
        await eventually(
            lambda: events(proxy, "instance_forgotten", instance=F2),
            timeout=10,
            what="the instance forgotten",
        )
        # an instance comes back at the same address (replaced, or restarted)
        await asyncio.to_thread(replaced.start)
        dns.set_records(followers.name, [F1, F2])
        await eventually(
            lambda: len(events(proxy, "instance_added", instance=F2)) == 2,
            timeout=10,
            what="the address discovered again",
        )
        back = time.monotonic()
        await eventually(spread_is(backends, {F1: 10, F2: 10}), timeout=15, what="10/10 again")
        assert load.served_since(back)[F2] > 0
        # at least one stats period with it back
        mark = len(log_lines(proxy))
        await eventually(
            lambda: [
                line for line in log_lines(proxy)[mark:] if line.startswith("sidecar at=instance ")
            ],
            timeout=5,
            what="an instance line",
        )
    load.check_clean()
    # a count of events in a period is never negative
    counts = [e["count#connect_failures"] for e in events(proxy, "instance", instance=F2)]
    assert any(int(c) > 0 for c in counts), counts
    assert all(int(c) >= 0 for c in counts), counts


# -- what the operator and the app see ----------------------------------------------------


async def test_instance_stats_lines_match_the_instances(
    followers: ReplicaCluster, dns: DNSServer, backends: Backends, proxy_factory: ProxyFactory
) -> None:
    cap = 8
    proxy = start_proxy(
        proxy_factory, followers, dns, SIDECAR_MAX_PER_INSTANCE=cap, SIDECAR_STATS_PERIOD=1
    )
    async with Load(proxy, clients=40) as load:
        await eventually(spread_is(backends, {F1: cap, F2: cap}, slack=0), timeout=15, what="8/8")
        mark = len(log_lines(proxy))

        def two_new_lines() -> dict[str, dict[str, str]] | None:
            lines = [
                logfmt(line)
                for line in log_lines(proxy)[mark:]
                if line.startswith("sidecar at=instance ")
            ]
            latest = {line["instance"]: line for line in lines}
            return latest if set(latest) == {F1, F2} else None

        latest = await eventually(two_new_lines, timeout=5, what="instance lines")
    load.check_clean()
    for addr, line in latest.items():
        assert line["pool"] == "appdb"
        assert line["state"] == "up"
        assert line["sample#servers"] == str(cap), line
        assert line["sample#cap"] == str(cap)
        assert float(line["sample#connect_ms"]) > 0
        assert line["count#connect_failures"] == "0"
        assert "last_error" not in line, addr
        assert line["role"] == "standby"
    text = proxy.log_text()
    assert re.search(
        rf"^sidecar at=instance pool=appdb instance={re.escape(F1)} state=up"
        rf" sample#servers={cap} sample#cap={cap} sample#connect_ms=[0-9.]+"
        r" count#connect_failures=0 role=standby"
        # the connection budget (auto: 90 % of each follower's limit), after the fields above
        r" sample#budget=267 sample#soft_cap=8 sample#instance_total=[0-9]+$",
        text,
        re.MULTILINE,
    ), text[-3000:]


TERMINATE_APP_BACKENDS = (
    "SELECT count(pg_terminate_backend(pid)) FROM pg_stat_activity"
    " WHERE usename = 'app' AND backend_type = 'client backend'"
)
#: Where SlowCloseRelay listens: loopback, not a follower's address.
RELAY = "127.0.0.5"


class SlowCloseRelay:
    """A TCP relay RELAY:5432 -> target:5432 that passes bytes on at once, but a close from
    the server side only after `delay` -- as over a real network, where a backend's last
    message and its FIN need not reach the proxy in the same read."""

    def __init__(self, target: str, delay: float) -> None:
        self.target = target
        self.delay = delay
        self._server: asyncio.Server | None = None
        self._links: set[asyncio.Task[None]] = set()

    async def __aenter__(self) -> SlowCloseRelay:
        self._server = await asyncio.start_server(self._link, RELAY, 5432)
        return self

    async def __aexit__(self, *exc: object) -> None:
        assert self._server is not None
        self._server.close()
        for task in list(self._links):
            task.cancel()
        await asyncio.gather(*self._links, return_exceptions=True)
        await self._server.wait_closed()

    async def _link(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        task = asyncio.current_task()
        assert task is not None
        self._links.add(task)
        up_writer: asyncio.StreamWriter | None = None
        try:
            up_reader, up_writer = await asyncio.open_connection(self.target, 5432)
            await asyncio.gather(
                self._pipe(reader, up_writer, 0.0), self._pipe(up_reader, writer, self.delay)
            )
        except OSError:
            pass
        finally:
            self._links.discard(task)
            for w in (writer, up_writer):
                if w is not None:
                    w.close()

    @staticmethod
    async def _pipe(src: asyncio.StreamReader, dst: asyncio.StreamWriter, delay: float) -> None:
        with contextlib.suppress(OSError):
            while data := await src.read(65536):
                dst.write(data)
                await dst.drain()
        await asyncio.sleep(delay)
        dst.close()


async def test_terminated_backends_fail_only_their_own_clients(
    followers: ReplicaCluster, backends: Backends, proxy_factory: ProxyFactory
) -> None:
    # pg_terminate_backend on every app backend of one follower, again and again (an
    # operator, a maintenance job): a client whose transaction ran there gets 57P01, the
    # others must not notice. Half the pool sits idle (min_pool_size), so idle server
    # connections are terminated too; the second follower is reached through a relay that
    # lets each backend's FIN lag its FATAL a little, as a network may.
    f2 = follower_at(followers, F2)
    terminated = 0
    async with SlowCloseRelay(F2, delay=0.2):
        with DNSServer({followers.name: [F1, RELAY]}, mode="rotate", ttl=1) as dns:
            proxy = start_proxy(proxy_factory, followers, dns, SIDECAR_MIN_POOL_SIZE=POOL_SIZE)
            async with Load(proxy, clients=10, sleep=0.002) as load:
                await eventually(spread_is(backends, {F1: 10, F2: 10}), 15, "10/10")
                for _ in range(10):
                    rows = await asyncio.to_thread(
                        f2.query, TERMINATE_APP_BACKENDS, dbname="postgres"
                    )
                    terminated += rows[0][0]
                    await asyncio.sleep(0.3)
                await eventually(
                    lambda: load.served_since(time.monotonic() - 0.5)[F2], 5, "F2 in use"
                )
    assert not load.wrong, load.wrong[:5]
    assert load.errors, "nothing was terminated?"
    assert len(load.errors) <= terminated
    assert_sqlstates(load.errors, DEATH_CLASSES, proxy)


async def test_clients_only_ever_see_sqlstates_and_the_proxy_keeps_serving(
    followers: ReplicaCluster, dns: DNSServer, backends: Backends, proxy_factory: ProxyFactory
) -> None:
    proxy = start_proxy(proxy_factory, followers, dns, SIDECAR_QUERY_WAIT_TIMEOUT=2)
    f1, f2 = follower_at(followers, F1), follower_at(followers, F2)
    async with Load(proxy, clients=30) as load:
        await eventually(spread_is(backends, {F1: 10, F2: 10}), timeout=15, what="10/10")
        # both followers are gone for longer than query_wait_timeout
        await asyncio.to_thread(f1.stop, "immediate")
        await asyncio.to_thread(f2.stop, "immediate")
        await asyncio.sleep(3.0)
        await asyncio.to_thread(f1.start)
        await asyncio.to_thread(f2.start)
        back = time.monotonic()
        await eventually(
            lambda: (lambda s: s[F1] > 0 and s[F2] > 0)(load.served_since(back)),
            timeout=15,
            what="both followers answering again",
        )
    assert not load.wrong, load.wrong[:5]
    failures = load.errors
    assert failures, "the outage went unnoticed?"
    assert_sqlstates(failures, (*DEATH_CLASSES, "53"), proxy)
    # the proxy is still up and serving new clients
    assert proxy.proc.poll() is None
    conn = await asyncpg.connect(**proxy.asyncpg_params())
    try:
        assert await conn.fetchval("select pg_is_in_recovery()") is True
    finally:
        await conn.close()
