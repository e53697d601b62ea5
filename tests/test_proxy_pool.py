"""Pooling: many clients over few server connections, and nothing leaks between clients.

Server connections are observed from PostgreSQL's side (pg_stat_activity) through the
superuser helpers of the `pg` fixture.
"""

from __future__ import annotations

import asyncio
import subprocess
import sys
import threading
import time
from typing import Any

import asyncpg
import psycopg
import pytest
from pgfixtures import PostgresServer, ProxyFactory, killable, poll_until

from sidecar.dataplane.pool import sync_sql

POOL_SIZE = 5
CLIENTS = 200


async def test_many_clients_few_servers(pg: PostgresServer, proxy_factory: ProxyFactory) -> None:
    # backends of earlier tests' proxies may still be exiting; they are not ours to count
    await asyncio.to_thread(pg.wait_backends, 0)
    proxy = proxy_factory(
        SIDECAR_DEFAULT_POOL_SIZE=str(POOL_SIZE), SIDECAR_MAX_CLIENT_CONN=str(CLIENTS * 2)
    )
    peak = 0
    done = asyncio.Event()

    async def watch() -> None:
        nonlocal peak
        while not done.is_set():
            peak = max(peak, await asyncio.to_thread(pg.count_backends))
            await asyncio.sleep(0.005)

    async def client(i: int) -> None:
        conn = await asyncpg.connect(**proxy.asyncpg_params(timeout=60))
        try:
            for j in range(5):
                n = i * 100 + j
                assert await conn.fetchval("select $1::int * 2", n) == n * 2
            async with conn.transaction():
                assert await conn.fetchval("select $1::int + 1", i) == i + 1
                xid = await conn.fetchval("select txid_current()")
                await conn.execute("select pg_sleep(0.002)")
                # every statement of a transaction runs on the same server connection
                assert await conn.fetchval("select txid_current()") == xid
            rows = await conn.fetch("select g, $1::text from generate_series(1, 50) g", str(i))
            assert [tuple(r) for r in rows] == [(g, str(i)) for g in range(1, 51)]
        finally:
            await conn.close()

    watcher = asyncio.create_task(watch())
    try:
        results = await asyncio.gather(*(client(i) for i in range(CLIENTS)), return_exceptions=True)
    finally:
        done.set()
        await watcher
    errors = [r for r in results if isinstance(r, BaseException)]
    assert not errors, f"{len(errors)} of {CLIENTS} clients failed; first: {errors[0]!r}"
    assert 1 <= peak <= POOL_SIZE, f"saw {peak} server connections for a pool of {POOL_SIZE}"


_KILLED_CLIENT = """
import sys, psycopg
conn = psycopg.connect(sys.argv[1], prepare_threshold=None)
conn.execute(f"insert into {sys.argv[2]} values (1, 'uncommitted')")
print(conn.execute("select pg_backend_pid()").fetchone()[0], flush=True)
sys.stdin.read()
"""


def test_client_killed_mid_transaction(pg: PostgresServer, proxy_factory: ProxyFactory) -> None:
    proxy = proxy_factory(SIDECAR_DEFAULT_POOL_SIZE="1")
    table = pg.create_table()
    child = subprocess.Popen(
        [sys.executable, "-c", _KILLED_CLIENT, proxy.dsn(), table],
        stdin=subprocess.PIPE,
        stdout=subprocess.PIPE,
        text=True,
    )
    with killable(child):
        assert child.stdout is not None
        pid = int(child.stdout.readline())
        states = {p: state for p, state, _, _ in pg.backends()}
        assert states.get(pid) == "idle in transaction"
        child.kill()
        child.wait()

    with psycopg.connect(proxy.dsn(), autocommit=True) as conn:
        row = conn.execute(
            "select txid_current_if_assigned(), now() = statement_timestamp(),"
            f" (select count(*) from {table})"
        ).fetchone()
    # not inside the dead client's transaction, and its insert is gone
    assert row == (None, True, 0)
    poll_until(
        lambda: all(state != "idle in transaction" for _, state, _, _ in pg.backends()),
        what="no backend left idle in transaction",
    )
    assert pg.query(f"select count(*) from {table}") == [(0,)]


def test_server_terminated_mid_transaction(pg: PostgresServer, proxy_factory: ProxyFactory) -> None:
    proxy = proxy_factory(SIDECAR_DEFAULT_POOL_SIZE="1")
    conn = psycopg.connect(proxy.dsn())
    try:
        (pid,) = conn.execute("select pg_backend_pid()").fetchone() or (None,)
        assert pg.query("select pg_terminate_backend(%s)", pid) == [(True,)]
        poll_until(lambda: pid not in [p for p, *_ in pg.backends()], what="the backend to exit")
        with pytest.raises(psycopg.Error) as excinfo:
            conn.execute("select 1")
        sqlstate = excinfo.value.sqlstate
        assert sqlstate is not None and sqlstate[:2] in ("08", "57"), repr(excinfo.value)
    finally:
        conn.close()

    # the pool replaced the dead server connection
    with psycopg.connect(proxy.dsn(), autocommit=True) as conn:
        row = conn.execute("select pg_backend_pid(), 1").fetchone()
    assert row is not None and row[0] != pid and row[1] == 1


async def test_startup_parameters_follow_the_client(
    pg: PostgresServer, proxy_factory: ProxyFactory
) -> None:
    proxy = proxy_factory(SIDECAR_DEFAULT_POOL_SIZE="2")
    defaults = {
        name: pg.query(f"show {name}")[0][0]
        for name in ("TimeZone", "application_name", "DateStyle", "IntervalStyle")
    }
    variants = [
        {"TimeZone": "UTC", "application_name": "zulu"},
        {"TimeZone": "Europe/Paris", "DateStyle": "ISO, DMY"},
        {"TimeZone": "Asia/Tokyo", "application_name": "tokyo", "IntervalStyle": "iso_8601"},
        {"application_name": "plain"},
        {"TimeZone": "America/New_York", "DateStyle": "ISO, YMD", "application_name": "ny"},
        {},
    ]
    servers: set[int] = set()

    async def client(i: int) -> None:
        settings = dict(variants[i % len(variants)])
        if "application_name" in settings:
            settings["application_name"] += f"-{i}"
        expected = tuple(settings.get(name, default) for name, default in defaults.items())
        conn = await asyncpg.connect(**proxy.asyncpg_params(server_settings=settings))
        try:
            for j in range(10):
                query = (
                    "select current_setting('TimeZone'), current_setting('application_name'),"
                    " current_setting('DateStyle'), current_setting('IntervalStyle'),"
                    " pg_backend_pid()"
                )
                if j % 3 == 2:
                    async with conn.transaction():
                        row = await conn.fetchrow(query)
                else:
                    row = await conn.fetchrow(query)
                assert row is not None
                assert tuple(row)[:4] == expected, f"client {i} ({settings}) query {j}"
                servers.add(row[4])
                await asyncio.sleep(0)
        finally:
            await conn.close()

    await asyncio.gather(*(client(i) for i in range(18)))
    assert 1 <= len(servers) <= 2


async def test_startup_options_follow_the_client(
    pg: PostgresServer, proxy_factory: ProxyFactory
) -> None:
    """libpq's `options=-c name=value` and application_name, as psycopg sends them."""
    proxy = proxy_factory(SIDECAR_DEFAULT_POOL_SIZE="2")
    zones = ["UTC", "Europe/Paris", "Asia/Tokyo", "America/New_York"]

    async def client(i: int) -> None:
        zone = zones[i % len(zones)]
        timeout = f"{1001 + i}ms"
        dsn = proxy.dsn(
            options=f"-c TimeZone={zone} -c statement_timeout={timeout}",
            application_name=f"psycopg-{i}",
        )
        # prepare_threshold=None: psycopg's named prepared statements are per server session
        async with await psycopg.AsyncConnection.connect(
            dsn, autocommit=True, prepare_threshold=None
        ) as conn:
            for _ in range(8):
                cur = await conn.execute(
                    "select current_setting('TimeZone'), current_setting('statement_timeout'),"
                    " current_setting('application_name')"
                )
                assert await cur.fetchone() == (zone, timeout, f"psycopg-{i}"), f"client {i}"
                await asyncio.sleep(0)

    await asyncio.gather(*(client(i) for i in range(12)))


async def test_session_mode(pg: PostgresServer, proxy_factory: ProxyFactory) -> None:
    proxy = proxy_factory(SIDECAR_POOL_MODE="session", SIDECAR_DEFAULT_POOL_SIZE="1")

    async def connect() -> Any:
        return await psycopg.AsyncConnection.connect(proxy.dsn(), autocommit=True)

    first = await connect()
    try:
        await first.execute("set statement_timeout = '1234ms'")
        await first.execute("create temp table scratch (x int)")
        await first.execute("prepare twice (int) as select $1 * 2")
        for i in range(3):
            async with first.transaction():
                cur = await first.execute("show statement_timeout")
                assert await cur.fetchone() == ("1234ms",)
                await first.execute("insert into scratch values (%s)", (i,))
            cur = await first.execute("execute twice(21)")
            assert await cur.fetchone() == (42,)
        cur = await first.execute("select count(*) from scratch")
        assert await cur.fetchone() == (3,)
    finally:
        await first.close()

    second = await connect()
    try:
        cur = await second.execute(
            "select current_setting('statement_timeout'), to_regclass('scratch') is null,"
            " (select count(*) from pg_prepared_statements)"
        )
        assert await cur.fetchone() == ("0", True, 0)
    finally:
        await second.close()


def test_link_sync_sql_skips_what_a_session_cannot_set() -> None:
    # Followers on different minor versions report different server_version: a link must
    # not try to SET it (PostgreSQL refuses), only the session's own settings.
    defaults = {"server_version": "15.18", "TimeZone": "UTC", "application_name": ""}
    want = {**defaults, "application_name": "web"}
    have = {**defaults, "server_version": "15.19"}
    sql = sync_sql(want, have, defaults)
    assert sql == "SELECT pg_catalog.set_config('application_name', 'web', false)"
    assert sync_sql(want, dict(want), defaults) is None
    assert sync_sql(defaults, have, defaults) is None


@pytest.mark.parametrize(
    "cursor", [psycopg.Cursor, psycopg.ClientCursor], ids=["extended", "simple"]
)
def test_cancel_of_a_client_waiting_for_a_server(
    proxy_factory: ProxyFactory, cursor: type[psycopg.Cursor[Any]]
) -> None:
    # The only server is held by an open transaction: the second client's query queues. Its
    # cancel must answer it at once (57014), as PostgreSQL would, not run it later.
    proxy = proxy_factory(SIDECAR_DEFAULT_POOL_SIZE="1", SIDECAR_QUERY_WAIT_TIMEOUT="30")
    with (
        psycopg.connect(proxy.dsn()) as holder,
        psycopg.connect(proxy.dsn(), autocommit=True, cursor_factory=cursor) as waiter,
    ):
        holder.execute("select 1")  # BEGIN ...: holds the server until rollback
        timer = threading.Timer(0.5, waiter.cancel)
        timer.start()
        started = time.monotonic()
        with pytest.raises(psycopg.errors.QueryCanceled):
            waiter.execute("select 42")
        assert time.monotonic() - started < 5
        timer.join()
        holder.rollback()
        # the connection is in step: the next query runs, once the server is free
        assert waiter.execute("select 7").fetchone() == (7,)
    assert "at=cancel_waiting" in proxy.log_text()
