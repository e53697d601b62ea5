"""The connection budget with real sidecar processes standing in for dynos, on real PostgreSQL.

Every sidecar here is a `python -m sidecar` process with SIDECAR_INSTANCE_BUDGET and a short
SIDECAR_BUDGET_INTERVAL; each gets its own clients (asyncpg, short transactions) from this
process. What the instance says (pg_stat_activity, counted as the superuser) is the truth the
assertions use; each sidecar's SHOW INSTANCES says what it believes.
"""

from __future__ import annotations

import asyncio
import contextlib
import time
from collections.abc import AsyncIterator, Callable
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Any

import asyncpg
import psycopg
from pgfixtures import PostgresServer, ProxyFactory, ProxyProcess

if TYPE_CHECKING:
    from followers import ReplicaCluster

pytest_plugins = ["followers"]

BUDGET = 30
INTERVAL = 0.5
CLIENTS = 20
#: One interval's slack: one probe per busy sidecar over the budget (the rule's fixed point),
#: plus what the pull towards the common level adds in one interval, and a backend that is
#: still exiting after its server was retired. Three sidecars: 3 + 2.
SLACK = 5


def budget_env(**extra: str | int) -> dict[str, str | int]:
    env: dict[str, str | int] = {
        "SIDECAR_INSTANCE_BUDGET": BUDGET,
        "SIDECAR_BUDGET_INTERVAL": INTERVAL,
        "SIDECAR_DEFAULT_POOL_SIZE": CLIENTS,
        "SIDECAR_QUERY_WAIT_TIMEOUT": 60,
    }
    env.update(extra)
    return env


def instance_row(proxy: ProxyProcess, addr: str = "127.0.0.1") -> dict[str, Any]:
    return next(r for r in proxy.show("INSTANCES") if r["addr"] == addr)


@dataclass
class Load:
    """CLIENTS clients per sidecar, each running short transactions until stopped."""

    proxy: ProxyProcess
    clients: int = CLIENTS
    served: int = 0
    errors: list[str] = field(default_factory=list)
    tasks: list[asyncio.Task[None]] = field(default_factory=list)
    stopping: bool = False

    async def _client(self) -> None:
        conn = await asyncpg.connect(**self.proxy.asyncpg_params())
        try:
            while not self.stopping:
                try:
                    await conn.execute("SELECT pg_sleep(0.005)")
                except asyncpg.PostgresError as exc:
                    self.errors.append(f"{exc.sqlstate}: {exc}")
                    await asyncio.sleep(0.05)
                else:
                    self.served += 1
        finally:
            with contextlib.suppress(Exception):
                await asyncio.wait_for(conn.close(), 5)

    def start(self) -> None:
        self.tasks = [asyncio.create_task(self._client()) for _ in range(self.clients)]

    async def stop(self) -> None:
        self.stopping = True
        await asyncio.gather(*self.tasks, return_exceptions=True)


@contextlib.asynccontextmanager
async def loads(
    *proxies: ProxyProcess, clients: list[int] | None = None
) -> AsyncIterator[list[Load]]:
    running = [
        Load(p, c) for p, c in zip(proxies, clients or [CLIENTS] * len(proxies), strict=True)
    ]
    for load in running:
        load.start()
    try:
        yield running
    finally:
        for load in running:
            await load.stop()


async def eventually(
    check: Callable[[], Any], *, timeout: float, what: str, every: float = 0.1
) -> Any:
    """Poll `check` (run in a thread) until it returns something true; its last value."""
    deadline = time.monotonic() + timeout
    value = None
    while time.monotonic() < deadline:
        value = await asyncio.to_thread(check)
        if value:
            return value
        await asyncio.sleep(every)
    raise AssertionError(f"not within {timeout}s: {what}; last: {value!r}")


def servers_of(proxies: list[ProxyProcess]) -> list[int]:
    return [int(instance_row(p)["servers"]) for p in proxies]


async def sample(
    pg: PostgresServer, proxies: list[ProxyProcess], seconds: float
) -> tuple[list[int], list[float]]:
    """Instance totals and each sidecar's mean server count over `seconds`."""
    totals: list[int] = []
    shares: list[list[int]] = []
    end = time.monotonic() + seconds
    while time.monotonic() < end:
        totals.append(await asyncio.to_thread(pg.count_backends))
        shares.append(await asyncio.to_thread(servers_of, proxies))
        await asyncio.sleep(0.05)
    means = [sum(s[i] for s in shares) / len(shares) for i in range(len(proxies))]
    return totals, means


def fair(shares: list[float]) -> bool:
    """Every sidecar within ±2 of the mean share."""
    mean = sum(shares) / len(shares)
    return all(abs(s - mean) <= 2 for s in shares)


def converged(pg: PostgresServer, proxies: list[ProxyProcess]) -> list[int] | None:
    shares = servers_of(proxies)
    ok = min(shares) >= 5 and fair([float(s) for s in shares])
    ok = ok and pg.count_backends() <= BUDGET + SLACK
    return shares if ok else None


async def settled(pg: PostgresServer, proxies: list[ProxyProcess], timeout: float = 30) -> None:
    """Until the shares have been fair, and the total within budget + slack, for two intervals
    in a row (one fair instant during the start proves nothing)."""
    deadline = time.monotonic() + timeout
    since: float | None = None
    last = None
    while time.monotonic() < deadline:
        last = await asyncio.to_thread(converged, pg, proxies)
        now = time.monotonic()
        if not last:
            since = None
        elif since is None:
            since = now
        elif now - since >= 2 * INTERVAL:
            return
        await asyncio.sleep(0.05)
    raise AssertionError(f"shares not settled within {timeout}s; last: {last!r}")


# -- three sidecars, one instance ---------------------------------------------------------------


async def test_three_sidecars_share_the_budget_and_make_room(
    pg: PostgresServer, proxy_factory: ProxyFactory
) -> None:
    proxies = [proxy_factory(**budget_env()) for _ in range(3)]
    async with loads(*proxies) as running:
        await settled(pg, proxies)
        totals, means = await sample(pg, proxies, 8 * INTERVAL)
        print("instance totals, 3 sidecars:", totals, "mean shares:", means)
        assert max(totals) <= BUDGET + SLACK, totals
        assert sum(totals) / len(totals) <= BUDGET + 4, totals  # the probes, one each, + 1
        assert fair(means), means
        served = [load.served for load in running]
        await asyncio.sleep(2 * INTERVAL)
        # nobody starves: every sidecar keeps serving its clients
        assert all(load.served > s for load, s in zip(running, served, strict=True))
        row = instance_row(proxies[0])
        assert row["budget"] == BUDGET
        assert 1 <= row["soft_cap"] <= CLIENTS
        assert BUDGET - 5 <= row["instance_total"] <= BUDGET + 2 * SLACK

        # One dyno stops: the others take up its share within three intervals (plus the
        # time it takes to notice: one interval, and its servers' exits).
        await running[2].stop()
        proxies[2].stop()
        started = time.monotonic()
        await eventually(
            lambda: all(s >= BUDGET // 2 - 2 for s in servers_of(proxies[:2])),
            timeout=30,
            what="the two left take up about half the budget each",
        )
        took = time.monotonic() - started
        print(f"freed budget taken up in {took:.2f} s ({took / INTERVAL:.1f} intervals)")
        assert took <= 4 * INTERVAL + 1.0, took

        # A new dyno starts: the others make room within three intervals.
        newcomer = proxy_factory(**budget_env())
        extra = Load(newcomer)
        extra.start()
        try:
            started = time.monotonic()
            await eventually(
                lambda: servers_of([newcomer])[0] >= BUDGET // 3 - 3,
                timeout=30,
                what="the newcomer gets about a third",
            )
            took = time.monotonic() - started
            print(f"room for the newcomer in {took:.2f} s ({took / INTERVAL:.1f} intervals)")
            assert took <= 4 * INTERVAL + 1.0, took
            three = [*proxies[:2], newcomer]
            await settled(pg, three)
            totals, means = await sample(pg, three, 6 * INTERVAL)
            print("instance totals, after the newcomer:", totals, "mean shares:", means)
            assert max(totals) <= BUDGET + SLACK, totals
            assert sum(totals) / len(totals) <= BUDGET + 4, totals
            assert fair(means), means
        finally:
            await extra.stop()
        assert extra.served > 0
    for load in [*running, extra]:
        assert not load.errors, load.errors[:5]


# -- outside demand ---------------------------------------------------------------------------


async def test_outside_demand_shrinks_the_sidecars_and_is_warned_about(
    pg: PostgresServer, proxy_factory: ProxyFactory
) -> None:
    proxies = [proxy_factory(**budget_env(SIDECAR_STATS_PERIOD=1)) for _ in range(3)]
    async with loads(*proxies) as running:
        await settled(pg, proxies)
        # Someone opens 20 connections straight to the database as the app's user.
        direct = await asyncio.to_thread(
            lambda: [psycopg.connect(pg.dsn(), autocommit=True) for _ in range(20)]
        )
        try:
            shares = await eventually(
                lambda: (s := servers_of(proxies)) and max(s) <= 8 and s,
                timeout=15,
                what="every sidecar down to its part of what is left",
            )
            assert min(shares) >= 1
            await eventually(
                lambda: all("at=instance_over_budget" in p.log_text() for p in proxies),
                timeout=15,
                what="the over-budget warning",
            )
            served = [load.served for load in running]
            await asyncio.sleep(2 * INTERVAL)
            assert all(load.served > s for load, s in zip(running, served, strict=True))
        finally:
            for conn in direct:
                conn.close()
        # They leave: the sidecars take the budget back.
        await eventually(
            lambda: sum(servers_of(proxies)) >= BUDGET - 3,
            timeout=15,
            what="the sidecars grow back",
        )
    for load in running:
        assert not load.errors, load.errors[:5]
    text = proxies[0].log_text()
    warning = next(line for line in text.splitlines() if "at=instance_over_budget" in line)
    for figure in ("instance_total=", f"budget={BUDGET}", "servers=", "soft_cap="):
        assert figure in warning, warning
    # The stats lines carry the figures per instance.
    line = next(
        line
        for line in reversed(text.splitlines())
        if "at=instance " in line and "sample#budget=" in line
    )
    assert f"sample#budget={BUDGET}" in line
    assert "sample#soft_cap=" in line and "sample#instance_total=" in line


async def test_budget_off_keeps_the_fixed_caps(
    pg: PostgresServer, proxy_factory: ProxyFactory
) -> None:
    proxy = proxy_factory(**budget_env(SIDECAR_INSTANCE_BUDGET=0))
    async with loads(proxy) as running:
        await eventually(
            lambda: servers_of([proxy]) == [CLIENTS], timeout=15, what="the whole pool"
        )
    row = instance_row(proxy)
    assert row["budget"] is None and row["soft_cap"] is None and row["instance_total"] is None
    assert running[0].served > 0


# -- workers ----------------------------------------------------------------------------------


async def test_workers_are_agents_of_the_dyno(
    pg: PostgresServer, proxy_factory: ProxyFactory
) -> None:
    # One dyno with two workers and one with one: three agents, one budget.
    proxies = [
        proxy_factory(**budget_env(SIDECAR_WORKERS=2, SIDECAR_DEFAULT_POOL_SIZE=2 * CLIENTS)),
        proxy_factory(**budget_env()),
    ]
    async with loads(*proxies, clients=[2 * CLIENTS, CLIENTS]) as running:
        await eventually(
            lambda: pg.count_backends() >= BUDGET - 3, timeout=20, what="the budget in use"
        )
        await asyncio.sleep(6 * INTERVAL)
        totals = []
        for _ in range(20):
            totals.append(await asyncio.to_thread(pg.count_backends))
            await asyncio.sleep(0.1)
        print("instance totals, 2 + 1 workers:", totals)
        assert max(totals) <= BUDGET + SLACK, totals
        assert sum(totals) / len(totals) <= BUDGET + 4, totals
    for load in running:
        assert load.served > 0
        assert not load.errors, load.errors[:5]


# -- a follower pool: one budget per instance ---------------------------------------------------


@contextlib.contextmanager
def max_connections(follower: Any, value: int) -> Any:
    """Restart `follower` with another max_connections (a hot standby may have more than its
    leader), and put it back afterwards."""
    conf = follower.data_dir / "postgresql.conf"
    original = conf.read_text()
    conf.write_text(original + f"\nmax_connections = {value}\n")
    follower.stop("fast")
    follower.start()
    try:
        yield
    finally:
        conf.write_text(original)
        follower.stop("fast")
        follower.start()


async def test_each_follower_has_its_own_budget(
    followers: ReplicaCluster, proxy_factory: ProxyFactory
) -> None:
    from dnsserver import DNSServer

    f1, f2 = followers.followers[:2]
    # 5 % of (max_connections - 3 reserved): 14 on a 300-connection instance, 24 on 500.
    with max_connections(f2, 500), DNSServer({followers.name: followers.addrs}, mode="all") as dns:
        followers.wait_replayed()
        env = budget_env(
            SIDECAR_INSTANCE_BUDGET="5%",
            SIDECAR_DEFAULT_POOL_SIZE=40,
            SIDECAR_DNS_NAMESERVERS=dns.nameserver,
            SIDECAR_SERVER_TLS_SSLMODE="verify-full",
            SIDECAR_SERVER_TLS_CA_FILE=str(followers.leader.ca_file),
        )
        proxies = [proxy_factory(f"appdb={followers.url()}", **env) for _ in range(2)]
        running = [Load(p, clients=40) for p in proxies]
        for load in running:
            load.start()
        try:
            await eventually(
                lambda: all(
                    instance_row(p, f.addr)["budget"] == b
                    for p in proxies
                    for f, b in ((f1, 14), (f2, 24))
                ),
                timeout=20,
                what="both instances counted",
            )
            await eventually(
                lambda: f1.count_backends() >= 12 and f2.count_backends() >= 20,
                timeout=20,
                what="both budgets in use",
            )
            await asyncio.sleep(6 * INTERVAL)
            counts: list[tuple[int, int]] = []
            for _ in range(15):
                counts.append(
                    await asyncio.to_thread(lambda: (f1.count_backends(), f2.count_backends()))
                )
                await asyncio.sleep(0.1)
            assert max(c[0] for c in counts) <= 14 + SLACK, counts
            assert max(c[1] for c in counts) <= 24 + SLACK, counts
            served = [load.served for load in running]
            await asyncio.sleep(2 * INTERVAL)
            assert all(load.served > s for load, s in zip(running, served, strict=True))
        finally:
            for load in running:
                await load.stop()
    for load in running:
        assert not load.errors, load.errors[:5]
