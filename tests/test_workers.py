"""SIDECAR_WORKERS: several proxy processes behind one address, with every total still holding.

The real proxy (`python -m sidecar`, and once `bin/start-sidecar`) with two workers against the
real PostgreSQL and its followers, real asyncpg and psycopg clients. Which worker serves a
client is read from the client's own BackendKeyData pid (`pid % workers`, the proxy's routing
rule for cancels), and checked against the workers' log lines (`worker=i`). Server connections
are counted from PostgreSQL's side.
"""

from __future__ import annotations

import asyncio
import os
import signal
import subprocess
import sys
import time
from collections import Counter
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path
from typing import TYPE_CHECKING, Any

import asyncpg
import psycopg
import pytest
from pgfixtures import (
    REPO_ROOT,
    PostgresServer,
    ProxyFactory,
    ProxyProcess,
    free_port,
    poll_until,
)
from psycopg.conninfo import make_conninfo
from test_faults import assert_no_tracebacks
from test_followers import Backends, events, hold_capped_load, start_proxy

from sidecar.config import MAX_WORKERS, ConfigError, PoolConfig, Settings, load_settings, parse_url
from sidecar.dataplane.clienttls import load_client_tls
from sidecar.shell.workers import (
    Worker,
    _exited,
    config_blob,
    read_config,
    share,
    share_pool,
    share_settings,
    usable_cpus,
    worker_count,
)

if TYPE_CHECKING:
    from dnsserver import DNSServer
    from followers import ReplicaCluster

pytest_plugins = ["followers"]

F1, F2 = "127.0.0.2", "127.0.0.3"


# -- helpers -----------------------------------------------------------------------------------


def children_of(pid: int) -> list[int]:
    """Live processes whose parent is `pid` (from /proc)."""
    found = []
    for entry in os.listdir("/proc"):
        if not entry.isdigit():
            continue
        try:
            stat = Path(f"/proc/{entry}/stat").read_text()
        except OSError:
            continue
        fields = stat.rpartition(")")[2].split()
        if int(fields[1]) == pid and fields[0] != "Z":
            found.append(int(entry))
    return found


def alive(pid: int) -> bool:
    try:
        state = Path(f"/proc/{pid}/stat").read_text().rpartition(")")[2].split()[0]
    except OSError:
        return False
    return state != "Z"


def start(
    proxy_factory: ProxyFactory,
    *databases: str,
    workers: int | str = 2,
    count: int | None = None,
    **env: Any,
) -> ProxyProcess:
    """A proxy with SIDECAR_WORKERS=`workers`, returned once all `count` of them listen."""
    proxy = proxy_factory(*databases, SIDECAR_WORKERS=workers, **env)
    wait_listening(proxy, int(workers) if count is None else count)
    return proxy


def wait_listening(proxy: ProxyProcess, workers: int) -> None:
    def ready() -> bool:
        seen = {e.get("worker") for e in events(proxy, "listening")}
        return all(str(i) in seen for i in range(workers))

    poll_until(ready, timeout=15, what=f"{workers} workers listening")


def worker_of(conn: psycopg.Connection[Any] | asyncpg.Connection) -> int:
    """Which of 2 workers serves this client: its BackendKeyData pid says."""
    pid = conn.info.backend_pid if isinstance(conn, psycopg.Connection) else conn.get_server_pid()
    return pid % 2


def connections_on_both(proxy: ProxyProcess, each: int, **kw: Any) -> list[psycopg.Connection[Any]]:
    """psycopg connections, at least `each` on each of 2 workers (extra ones closed)."""
    by_worker: dict[int, list[psycopg.Connection[Any]]] = {0: [], 1: []}
    for _ in range(200):
        if all(len(c) >= each for c in by_worker.values()):
            break
        conn = psycopg.connect(proxy.dsn(), **kw)
        target = by_worker[worker_of(conn)]
        if len(target) < each:
            target.append(conn)
        else:
            conn.close()
    assert all(len(c) == each for c in by_worker.values()), "the kernel used one worker only"
    return by_worker[0] + by_worker[1]


# -- configuration -----------------------------------------------------------------------------


def test_shares_differ_by_at_most_one_and_sum_to_the_total() -> None:
    for total in range(0, 130):
        for count in range(1, MAX_WORKERS + 1):
            parts = [share(total, i, count) for i in range(count)]
            assert sum(parts) == total
            assert max(parts) - min(parts) <= 1
    assert [share(7, i, 3) for i in range(3)] == [3, 2, 2]


def test_each_worker_gets_its_share_of_every_total_per_pool() -> None:
    settings = Settings(
        default_pool_size=20,
        min_pool_size=3,
        reserve_pool_size=1,
        max_client_conn=1000,
        max_per_instance=7,
        query_wait_timeout=9.0,
    )
    parts = [share_settings(settings, i, 3) for i in range(3)]
    assert [p.default_pool_size for p in parts] == [7, 7, 6]
    assert [p.min_pool_size for p in parts] == [1, 1, 1]
    assert [p.reserve_pool_size for p in parts] == [1, 0, 0]
    assert [p.max_client_conn for p in parts] == [334, 333, 333]
    assert [p.max_per_instance for p in parts] == [3, 2, 2]
    assert {p.query_wait_timeout for p in parts} == {9.0}  # not a total: unchanged
    # a pool's own sidecar.yml totals are split too
    pool = PoolConfig(
        "f",
        parse_url("postgres://u:p@h/d"),
        overrides={"default_pool_size": 5, "max_per_instance": 4, "pool_mode": "session"},
    )
    split = [share_pool(pool, i, 3).settings(share_settings(settings, i, 3)) for i in range(3)]
    assert [s.default_pool_size for s in split] == [2, 2, 1]
    assert [s.max_per_instance for s in split] == [2, 1, 1]
    assert {s.pool_mode for s in split} == {"session"}


def _pools(**overrides: object) -> list[PoolConfig]:
    return [
        PoolConfig("database", parse_url("postgres://u:p@h/d")),
        PoolConfig("follower", parse_url("postgres://u:p@f/d"), overrides=dict(overrides)),
    ]


def test_a_share_of_zero_refuses_to_start_naming_the_setting() -> None:
    with pytest.raises(ConfigError, match=r"SIDECAR_WORKERS=4 needs SIDECAR_DEFAULT_POOL_SIZE"):
        worker_count(Settings(workers="4", default_pool_size=3), _pools())
    with pytest.raises(ConfigError, match=r"max_per_instance of pool follower \(sidecar.yml\)"):
        worker_count(Settings(workers="4"), _pools(max_per_instance=2))
    with pytest.raises(ConfigError, match=r"SIDECAR_MAX_PER_INSTANCE \(pool database\)"):
        worker_count(Settings(workers="4", max_per_instance=3), _pools())
    with pytest.raises(ConfigError, match=r"SIDECAR_MAX_CLIENT_CONN"):
        worker_count(Settings(workers="2", max_client_conn=1), _pools())
    # min_pool_size and reserve_pool_size may well be 0 on some workers; no cap is no cap
    assert worker_count(Settings(workers="4", min_pool_size=1, reserve_pool_size=1), _pools()) == (
        4,
        None,
    )


def test_auto_is_the_cpus_we_may_use_lowered_to_fit() -> None:
    settings, _ = load_settings({"SIDECAR_WORKERS": "auto"})
    cpus, source = usable_cpus()
    assert worker_count(settings, _pools()) == (cpus, f"auto: {cpus} {source}")
    assert worker_count(settings, _pools(), cpus=8) == (8, "auto: 8 CPUs")
    big = Settings(workers="auto", default_pool_size=100)
    assert worker_count(big, _pools(), cpus=200) == (MAX_WORKERS, "auto: 200 CPUs")
    count, why = worker_count(settings, _pools(default_pool_size=3), cpus=8)
    assert count == 3
    assert why == "auto: 8 CPUs, but default_pool_size of pool follower (sidecar.yml) is 3"


def _cgroups(root: Path, proc: str, files: dict[str, str]) -> str:
    """A /proc/self/cgroup and cgroup files under `root`, as a container would see them."""
    (root / "proc/self").mkdir(parents=True)
    (root / "proc/self/cgroup").write_text(proc)
    for name, text in files.items():
        path = root / "sys/fs/cgroup" / name
        path.parent.mkdir(parents=True, exist_ok=True)
        path.write_text(text)
    return str(root)


def test_auto_counts_a_cgroup_cpu_quota(tmp_path: Path) -> None:
    # A container's affinity mask names every CPU of the host; its quota is what it gets.
    affinity = len(os.sched_getaffinity(0))
    v2 = _cgroups(
        tmp_path / "v2",
        "0::/dyno/web.1\n",
        {
            "cpu.max": "max 100000\n",
            "dyno/cpu.max": "100000 100000\n",
            "dyno/web.1/cpu.max": "max 100000\n",
        },
    )
    # The parent's limit (1 CPU) applies to the child that has none of its own.
    expected = (1, "CPUs (cgroup quota)") if affinity > 1 else (1, "CPUs")
    assert usable_cpus(v2) == expected
    v1 = _cgroups(
        tmp_path / "v1",
        "5:memory:/x\n4:cpu,cpuacct:/x\n",
        {
            "cpu,cpuacct/x/cpu.cfs_quota_us": "150000\n",  # 1.5 CPUs: one worker
            "cpu,cpuacct/x/cpu.cfs_period_us": "100000\n",
            "cpu,cpuacct/cpu.cfs_quota_us": "-1\n",
            "cpu,cpuacct/cpu.cfs_period_us": "100000\n",
        },
    )
    assert usable_cpus(v1)[0] == 1
    unlimited = _cgroups(tmp_path / "none", "0::/\n", {"cpu.max": "max 100000\n"})
    assert usable_cpus(unlimited) == (affinity, "CPUs")
    # Unreadable or nonsense files are no quota, never an error.
    assert usable_cpus(str(tmp_path / "missing")) == (affinity, "CPUs")
    junk = _cgroups(tmp_path / "junk", "0::/\n", {"cpu.max": "lots\n"})
    assert usable_cpus(junk) == (affinity, "CPUs")
    # This machine's own cgroups: never more than the affinity mask.
    assert 1 <= usable_cpus()[0] <= affinity
    # A quota above the CPUs there are changes nothing.
    big = _cgroups(tmp_path / "big", "0::/\n", {"cpu.max": f"{(affinity + 2) * 100000} 100000\n"})
    assert usable_cpus(big) == (affinity, "CPUs")


@pytest.mark.parametrize("value", ["0", "65", "-1", "two", "1.5", "", "2 workers"])
def test_invalid_values_are_a_config_error(value: str) -> None:
    with pytest.raises(
        ConfigError, match=r"^SIDECAR_WORKERS must be auto or a number from 1 to 64"
    ):
        load_settings({"SIDECAR_WORKERS": value})


@pytest.mark.parametrize("value", ["1", " 3 ", "64", "AUTO"])
def test_valid_values(value: str) -> None:
    settings, _ = load_settings({"SIDECAR_WORKERS": value})
    assert settings.workers == value.strip()


def test_pids_name_their_worker() -> None:
    for count in (2, 3, 7, 64):
        for index in range(count):
            w = Worker(index, count, "")
            for _ in range(200):
                pid = w.new_pid()
                assert 0 < pid < 2**31
                assert pid % count == index == w.owner(pid)


@pytest.mark.parametrize("pidfd", [True, False])
async def test_a_child_exit_is_noticed_without_blocking_the_loop(
    pidfd: bool, monkeypatch: pytest.MonkeyPatch
) -> None:
    if not pidfd:  # a kernel before 5.3

        def no_pidfd(pid: int, flags: int = 0) -> int:
            raise OSError(38, "Function not implemented")

        monkeypatch.setattr(os, "pidfd_open", no_pidfd)
    proc = subprocess.Popen([sys.executable, "-c", "import time; time.sleep(0.3); exit(3)"])
    ticks = 0

    async def tick() -> None:
        nonlocal ticks
        while True:
            await asyncio.sleep(0.01)
            ticks += 1

    ticker = asyncio.create_task(tick())
    try:
        assert await asyncio.wait_for(_exited(proc), 10) == 3
    finally:
        ticker.cancel()
    assert ticks >= 10


def test_the_configuration_reaches_a_child_intact() -> None:
    settings = Settings(
        workers="3", default_pool_size=9, query_wait_timeout=1.5, log_connections=False
    )
    pools = [
        PoolConfig(
            "database",
            parse_url("postgres://u:p%40ss@h:5433/d?sslmode=verify-full&application_name=x"),
        ),
        PoolConfig("f", parse_url("postgres://u:p@f/d"), overrides={"max_per_instance": 3}),
    ]
    assert read_config(config_blob(settings, pools)) == (settings, pools, None)
    # The app-facing certificate travels with it: every worker serves the one worker 0 made.
    tls = load_client_tls(settings)
    assert tls is not None
    _, _, copy = read_config(config_blob(settings, pools, tls))
    assert copy is not None
    assert (copy.cert_pem, copy.key_pem, copy.source) == (tls.cert_pem, tls.key_pem, "generated")


def test_a_config_error_stops_the_start(pg: PostgresServer) -> None:
    env = {k: v for k, v in os.environ.items() if not k.startswith(("SIDECAR_", "PGBOUNCER_"))}
    env.update(SIDECAR_WORKERS="3", SIDECAR_DEFAULT_POOL_SIZE="2", SIDECAR_PORT="1")
    out = subprocess.run(
        [sys.executable, "-m", "sidecar", f"appdb={pg.url()}"],
        env=env,
        cwd=REPO_ROOT,
        capture_output=True,
        text=True,
        timeout=20,
        check=False,
    )
    assert out.returncode == 2
    assert (
        'at=config_error level=error error="SIDECAR_WORKERS=3 needs SIDECAR_DEFAULT_POOL_SIZE'
        in out.stdout
    )


def test_one_worker_is_one_process(pg: PostgresServer, proxy_factory: ProxyFactory) -> None:
    proxy = proxy_factory(SIDECAR_WORKERS="1")
    with psycopg.connect(proxy.dsn()) as conn:
        assert conn.execute("select 1").fetchone() == (1,)
    # The only child it ever has: the short-lived Python that makes the TLS certificate
    # after the proxy listens (clienttls.generate_client_tls).
    poll_until(lambda: "at=client_tls " in proxy.log_text(), timeout=20, what="the certificate")
    poll_until(lambda: children_of(proxy.proc.pid) == [], timeout=10, what="the child to exit")
    # no control socket or directory next to the proxy's socket, no worker= in the log
    assert os.listdir(proxy.socket_dir) == [f".s.PGSQL.{proxy.port}"]
    assert "worker=" not in proxy.log_text()
    assert "workers=" not in proxy.log_text()


# -- load ----------------------------------------------------------------------------------------


async def test_two_workers_serve_clients_within_the_pool_size(
    pg: PostgresServer, proxy_factory: ProxyFactory
) -> None:
    await asyncio.to_thread(pg.wait_backends, 0)
    size = 5
    proxy = start(proxy_factory, SIDECAR_DEFAULT_POOL_SIZE=size, SIDECAR_MAX_CLIENT_CONN=400)
    assert len(children_of(proxy.proc.pid)) == 1
    peak = 0
    done = asyncio.Event()
    served: Counter[int] = Counter()

    async def watch() -> None:
        nonlocal peak
        while not done.is_set():
            peak = max(peak, await asyncio.to_thread(pg.count_backends))
            await asyncio.sleep(0.005)

    async def asyncpg_client(i: int) -> None:
        conn = await asyncpg.connect(**proxy.asyncpg_params(timeout=30))
        try:
            for j in range(10):
                async with conn.transaction():
                    n = i * 100 + j
                    assert await conn.fetchval("select $1::int from pg_sleep(0.005)", n) == n
            served[worker_of(conn)] += 1
        finally:
            await conn.close()

    async def psycopg_client(i: int) -> None:
        conn = await psycopg.AsyncConnection.connect(proxy.dsn(), autocommit=True)
        try:
            for j in range(10):
                n = i * 100 + j
                cur = await conn.execute("select %s::int from pg_sleep(0.005)", (n,))
                assert await cur.fetchone() == (n,)
            served[conn.info.backend_pid % 2] += 1
        finally:
            await conn.close()

    watcher = asyncio.create_task(watch())
    try:
        results = await asyncio.gather(
            *((asyncpg_client, psycopg_client)[i % 2](i) for i in range(40)),
            return_exceptions=True,
        )
    finally:
        done.set()
        await watcher
    errors = [r for r in results if isinstance(r, BaseException)]
    assert not errors, f"{len(errors)} of 40 clients failed; first: {errors[0]!r}"
    assert served[0] and served[1] and sum(served.values()) == 40, served
    logins = Counter(e.get("worker") for e in events(proxy, "login"))
    assert logins == {"0": served[0], "1": served[1]}, logins
    assert 1 <= peak <= size, f"saw {peak} server connections for a pool of {size}"
    # each worker reports its own pool share
    # (the startup lines: a pool's role, once known, is an at=pool line too)
    sizes = {e["worker"]: e["size"] for e in events(proxy, "pool") if "size" in e}
    assert sizes == {"0": "3", "1": "2"}
    assert_no_tracebacks(proxy)


async def test_the_per_instance_cap_holds_across_workers(
    followers: ReplicaCluster, dns: DNSServer, backends: Backends, proxy_factory: ProxyFactory
) -> None:
    cap = 3
    proxy = start_proxy(
        proxy_factory,
        followers,
        dns,
        SIDECAR_WORKERS=2,
        SIDECAR_MAX_PER_INSTANCE=cap,
        SIDECAR_STATS_PERIOD=1,
    )
    await asyncio.to_thread(wait_listening, proxy, 2)
    # worker 0 may hold 2 per instance, worker 1 one: together the cap, on each
    await hold_capped_load(
        proxy, backends, cap, settle_s=20, run_s=1.5, min_answers=50, min_samples=30
    )
    # stats lines per worker, to be summed: each with its share of the pool and of the cap
    maxes = {e["worker"]: e["sample#servers.max"] for e in events(proxy, "stats")}
    assert maxes == {"0": "10", "1": "10"}
    caps = {(e["worker"], e["instance"]): e["sample#cap"] for e in events(proxy, "instance")}
    assert caps == {("0", F1): "2", ("0", F2): "2", ("1", F1): "1", ("1", F2): "1"}


@pytest.fixture
def dns(followers: ReplicaCluster) -> Any:
    from dnsserver import DNSServer

    with DNSServer({followers.name: followers.addrs}, mode="rotate", ttl=1) as server:
        yield server


@pytest.fixture
def backends(followers: ReplicaCluster) -> Any:
    counter = Backends(followers)
    try:
        deadline = time.monotonic() + 10
        while any(counter.counts().values()) and time.monotonic() < deadline:
            time.sleep(0.05)
        yield counter
    finally:
        counter.close()


# -- cancel ---------------------------------------------------------------------------------------


def test_cancels_reach_their_query_whichever_worker_gets_them(
    pg: PostgresServer, proxy_factory: ProxyFactory
) -> None:
    proxy = start(proxy_factory, SIDECAR_DEFAULT_POOL_SIZE=20)
    conns = connections_on_both(proxy, 4, autocommit=True)
    rounds = 4
    try:
        for r in range(rounds):
            sql = f"select pg_sleep(30) -- round {r}"

            def sleep(conn: psycopg.Connection[Any], sql: str = sql) -> tuple[str | None, float]:
                try:
                    conn.execute(sql)
                except psycopg.Error as exc:
                    return exc.sqlstate, time.monotonic()
                return None, time.monotonic()

            with ThreadPoolExecutor(len(conns)) as pool:
                futures = [pool.submit(sleep, c) for c in conns]
                poll_until(
                    lambda sql=sql: (
                        pg.query(
                            "select count(*) from pg_stat_activity"
                            " where query = %s and state = 'active'",
                            sql,
                            dbname="postgres",
                        )[0][0]
                        == len(conns)
                    ),
                    what="every query running",
                )
                sent = time.monotonic()
                for conn in conns:
                    conn.cancel()
                results = [f.result(timeout=10) for f in futures]
            assert [state for state, _ in results] == ["57014"] * len(conns)
            slowest = max(at for _, at in results) - sent
            assert slowest < 3, f"round {r}: the last cancel took {slowest:.2f}s"
        # and each connection is still usable
        for conn in conns:
            assert conn.execute("select 1").fetchone() == (1,)
    finally:
        for conn in conns:
            conn.close()
    total = rounds * len(conns)
    forwarded = len(events(proxy, "cancel_forwarded"))
    # the kernel picks a worker per connection: some cancels landed on their client's worker,
    # some on the other one, which forwarded them
    assert 0 < forwarded < total, f"{forwarded} of {total} cancels forwarded"
    assert not events(proxy, "cancel_ignored")
    assert not events(proxy, "control_send_failed")


# -- lifecycle -------------------------------------------------------------------------------


async def test_sigterm_drains_every_worker_and_leaves_no_process(
    pg: PostgresServer, proxy_factory: ProxyFactory
) -> None:
    timeout = 3.0
    proxy = start(proxy_factory, SIDECAR_SHUTDOWN_TIMEOUT=timeout)
    table = pg.create_table()
    conns = await asyncio.to_thread(connections_on_both, proxy, 2)
    # an idle client on worker 1 that never leaves: the drain lasts until the timeout
    idle = await asyncio.to_thread(connections_on_both, proxy, 1, autocommit=True)
    idle[0].close()
    lingering = idle[1]
    children = children_of(proxy.proc.pid)
    assert len(children) == 1
    try:
        for i, conn in enumerate(conns):
            conn.execute(f"insert into {table} values (%s, 'in flight')", (i,))
        sent = time.monotonic()
        proxy.proc.send_signal(signal.SIGTERM)
        await asyncio.to_thread(
            poll_until,
            lambda: {e.get("worker") for e in events(proxy, "shutdown")} == {"0", "1"},
            what="both workers shutting down",
        )
        # new clients are refused with 57P01, whichever worker they reach
        for _ in range(6):
            with pytest.raises(asyncpg.PostgresError) as excinfo:
                extra = await asyncpg.connect(**proxy.asyncpg_params())
                await extra.close()
            assert excinfo.value.sqlstate == "57P01"
        # transactions in flight on both workers finish
        for i, conn in enumerate(conns):
            conn.execute(f"insert into {table} values (%s, 'after SIGTERM')", (100 + i,))
            conn.commit()
            conn.close()
        code = await asyncio.to_thread(proxy.proc.wait, timeout + 5)
        elapsed = time.monotonic() - sent
    finally:
        for conn in conns:
            conn.close()
    with pytest.raises(psycopg.OperationalError):
        lingering.execute("select 1")
    lingering.close()
    assert code == 0
    assert timeout - 0.2 <= elapsed < timeout + 2, elapsed
    assert pg.query(f"select count(*) from {table}") == [(2 * len(conns),)]
    assert not [pid for pid in children if alive(pid)]
    assert events(proxy, "worker_stopped", child="1")
    assert not events(proxy, "worker_died")
    assert_no_tracebacks(proxy)


def test_a_killed_worker_is_restarted(pg: PostgresServer, proxy_factory: ProxyFactory) -> None:
    proxy = start(proxy_factory)
    (first,) = events(proxy, "worker_started", child="1")
    bystander, victim = connections_on_both(proxy, 1)
    os.kill(int(first["pid"]), signal.SIGKILL)
    died = poll_until(lambda: events(proxy, "worker_died", child="1"), what="the death logged")
    assert died[0]["reason"] == "killed by SIGKILL"
    assert died[0]["pid"] == first["pid"]
    # meanwhile worker 0 takes every new client
    for _ in range(5):
        with psycopg.connect(proxy.dsn()) as conn:
            assert conn.execute("select 1").fetchone() == (1,)
    with pytest.raises(psycopg.OperationalError):
        victim.execute("select 1")
    victim.close()
    # the clients of worker 0 noticed nothing
    assert bystander.execute("select 4").fetchone() == (4,)
    bystander.close()
    poll_until(
        lambda: len(events(proxy, "listening", worker="1")) == 2, what="worker 1 listening again"
    )
    second = events(proxy, "worker_started", child="1")[-1]
    assert second["pid"] != first["pid"] and alive(int(second["pid"]))
    # the new worker 1 serves clients again, over TCP and the Unix socket alike
    conns = connections_on_both(proxy, 2)
    for conn in conns:
        assert conn.execute("select 2").fetchone() == (2,)
        conn.close()
    unix_dsn = make_conninfo(proxy.dsn(), host=str(proxy.socket_dir))
    over_unix = set()
    for _ in range(40):
        with psycopg.connect(unix_dsn) as conn:
            assert conn.execute("select 3").fetchone() == (3,)
            over_unix.add(worker_of(conn))
    # both accept on the socket worker 0 made, the restarted one too
    assert over_unix == {0, 1}
    assert proxy.stop() == 0
    assert not alive(int(second["pid"]))
    assert_no_tracebacks(proxy)


def test_workers_die_with_their_parent(proxy_factory: ProxyFactory) -> None:
    cpus, source = usable_cpus()
    proxy = start(proxy_factory, workers="auto", count=cpus)
    assert events(proxy, "workers", workers=str(cpus), chosen=f"auto: {cpus} {source}")
    children = children_of(proxy.proc.pid)
    assert len(children) == cpus - 1
    proxy.proc.kill()
    proxy.proc.wait()
    # PR_SET_PDEATHSIG: SIGTERM, so they drain (no clients here) and exit
    poll_until(lambda: not any(alive(pid) for pid in children), what="the workers gone")


def test_console_answers_for_its_worker_and_shutdown_stops_all(proxy_factory: ProxyFactory) -> None:
    proxy = start(proxy_factory, SIDECAR_DEFAULT_POOL_SIZE=5)
    by_worker: dict[int, psycopg.Connection[Any]] = {}
    for _ in range(100):
        if len(by_worker) == 2:
            break
        conn = psycopg.connect(proxy.dsn(dbname="sidecar"), autocommit=True)
        w = worker_of(conn)
        if w in by_worker:
            conn.close()
        else:
            by_worker[w] = conn
    assert len(by_worker) == 2
    try:
        for w, conn in by_worker.items():
            assert conn.execute("SHOW WORKERS").fetchall() == [
                (w, 2, conn.execute("SHOW WORKERS").fetchone()[2])
            ]  # type: ignore[index]
            row = conn.execute("SHOW DATABASES").fetchone()
            assert row is not None and row[5] == (3, 2)[w]  # pool_size: this worker's share
            with pytest.raises(psycopg.errors.FeatureNotSupported, match="SIDECAR_WORKERS=2"):
                conn.execute("RELOAD")
        pids = {w: c.execute("SHOW WORKERS").fetchone()[2] for w, c in by_worker.items()}  # type: ignore[index]
        assert pids[0] == proxy.proc.pid and pids[1] != pids[0]
        by_worker[1].execute("SHUTDOWN")
    finally:
        for conn in by_worker.values():
            conn.close()
    # SHUTDOWN on worker 1 stops the whole sidecar
    assert proxy.proc.wait(10) == 0
    assert not alive(pids[1])
    assert events(proxy, "shutdown", worker="0", reason="admin SHUTDOWN on worker 1")


def _ctl_dir(pid: int) -> Path:
    """The workers' control directory, from a child worker's command line."""
    args = Path(f"/proc/{pid}/cmdline").read_bytes().decode().split("\0")
    (found,) = [a.partition("=")[2] for a in args if a.startswith("--ctl-dir=")]
    return Path(found)


def _console_on(proxy: ProxyProcess, worker: int) -> psycopg.Connection[Any]:
    for _ in range(100):
        conn = psycopg.connect(proxy.dsn(dbname="sidecar"), autocommit=True)
        if worker_of(conn) == worker:
            return conn
        conn.close()
    raise AssertionError(f"no console connection reached worker {worker}")


def test_pause_resume_reconnect_act_on_every_worker(
    pg: PostgresServer, proxy_factory: ProxyFactory
) -> None:
    proxy = start(proxy_factory, SIDECAR_DEFAULT_POOL_SIZE=4)
    clients = connections_on_both(proxy, 1, autocommit=True)
    console = _console_on(proxy, 1)
    notices: list[str] = []
    console.add_notice_handler(lambda diag: notices.append(diag.message_primary or ""))
    pool = ThreadPoolExecutor(4)
    try:
        for c in clients:
            c.execute("select 1")
        console.execute("PAUSE")
        # Every worker hands out no server now: both clients' queries wait.
        waiting = [pool.submit(c.execute, "select 2") for c in clients]
        time.sleep(1.0)
        assert not any(f.done() for f in waiting)
        console.execute("RESUME")
        assert [f.result(10).fetchone() for f in waiting] == [(2,), (2,)]

        # RECONNECT: every worker's idle servers close; the next queries get new backends.
        old = {
            pid
            for (pid,) in pg.query(
                "select pid from pg_stat_activity where usename = 'app'", dbname="postgres"
            )
        }
        assert len(old) >= 2
        console.execute("RECONNECT")
        for c in clients:
            row = c.execute("select pg_backend_pid()").fetchone()
            assert row is not None and row[0] not in old

        # The console's worker waits for the others' answers: worker 0 stopped, RESUME waits.
        os.kill(proxy.proc.pid, signal.SIGSTOP)
        try:
            resumed = pool.submit(console.execute, "RESUME")
            time.sleep(1.0)
            assert not resumed.done()
        finally:
            os.kill(proxy.proc.pid, signal.SIGCONT)
        resumed.result(10)
        assert notices == []

        # A worker it cannot reach (restarting: no control socket yet) is named in a notice;
        # the command stands on the console's worker.
        (ctl,) = {_ctl_dir(pid) / "worker-0" for pid in children_of(proxy.proc.pid)}
        ctl.rename(ctl.with_name("away"))
        try:
            console.execute("PAUSE")
        finally:
            ctl.with_name("away").rename(ctl)
        assert len(notices) == 1
        assert notices[0].startswith("PAUSE did not complete on worker 0: not reached (")
        assert events(proxy, "admin_command_incomplete", worker="1", command="pause")
        console.execute("RESUME")
        assert len(notices) == 1
    finally:
        pool.shutdown(wait=False, cancel_futures=True)
        console.close()
        for c in clients:
            c.close()
    for verb in ("pause", "resume", "reconnect"):
        assert events(proxy, "admin_command", worker="1", command=verb)
        assert events(
            proxy, "admin_command", worker="0", command=verb, from_console="another worker"
        )
    assert proxy.stop() == 0
    assert_no_tracebacks(proxy)


def test_start_sidecar_with_two_workers(pg: PostgresServer, tmp_path: Path) -> None:
    """bin/start-sidecar: worker 0 in the launcher's process; the app reaches both workers."""
    out = tmp_path / "workers.txt"
    app = (
        "import os, sys, time, psycopg\n"
        "seen, deadline = set(), time.monotonic() + 10\n"
        "while len(seen) < 2 and time.monotonic() < deadline:\n"
        "    with psycopg.connect(os.environ['DATABASE_URL']) as c:\n"
        "        assert c.execute('select 1').fetchone() == (1,)\n"
        "        seen.add(c.info.backend_pid % 2)\n"
        "open(sys.argv[1], 'w').write(' '.join(map(str, sorted(seen))))\n"
    )
    env = {
        k: v
        for k, v in os.environ.items()
        if not k.startswith(("SIDECAR_", "PGBOUNCER_", "DATABASE_URL")) and k != "DYNO"
    }
    socket_dir = tmp_path / "s"
    socket_dir.mkdir()
    env.update(
        SIDECAR_WORKERS="2",
        SIDECAR_PORT=str(free_port()),
        SIDECAR_SOCKET_DIR=str(socket_dir),
        SIDECAR_STATS_PERIOD="0",
        SIDECAR_PYTHON=sys.executable,
        DATABASE_URL=pg.url(),
    )
    proc = subprocess.run(
        [str(REPO_ROOT / "bin" / "start-sidecar"), sys.executable, "-c", app, str(out)],
        env=env,
        capture_output=True,
        text=True,
        timeout=30,
        check=False,
    )
    assert proc.returncode == 0, proc.stdout + proc.stderr
    # the app starts once worker 0 listens; worker 1 joins a moment later
    assert out.read_text() == "0 1"
    lines = proc.stdout.splitlines()
    assert any("at=app_started worker=0" in line for line in lines)
    assert any("at=worker_stopped worker=0 child=1" in line for line in lines), proc.stdout
    assert os.listdir(socket_dir) == []  # the socket and the control directory are gone
