"""Real clients through the proxy see what they would see from PostgreSQL itself.

Clients: psql, psycopg 3 (sync, async, simple and extended protocol, pipelines, COPY) and
asyncpg. Covers client authentication, connection limits, cancellation, notices and
ParameterStatus passthrough, errors inside transactions, and the unix socket.
"""

from __future__ import annotations

import asyncio
import os
import subprocess
import time
from typing import Any

import asyncpg
import psycopg
import psycopg.errors
import pytest
from pgfixtures import APP_PASSWORD, PostgresServer, ProxyFactory, ProxyProcess, poll_until
from psycopg import AsyncClientCursor, AsyncCursor


def client_env(**extra: str) -> dict[str, str]:
    """The environment for client programs, without the caller's libpq settings."""
    env = {k: v for k, v in os.environ.items() if not k.startswith("PG")}
    env.update(extra)
    return env


def active_sleeps(pg: PostgresServer) -> list[int]:
    """pids of app's backends currently running `pg_sleep(30)`."""
    return [
        pid
        for pid, state, query, _ in pg.backends()
        if state == "active" and "pg_sleep(30)" in query
    ]


# --- clients ------------------------------------------------------------------------------


def test_psql(pg: PostgresServer, proxy: ProxyProcess) -> None:
    out = subprocess.run(
        [
            str(pg.bin_dir / "psql"), "-X", "-A", "-t", "-v", "ON_ERROR_STOP=1", proxy.url(),
            "-c", "select 1", "-c", "select current_user || '@' || current_database()",
        ],
        env=client_env(PGSSLMODE="disable"),
        stdin=subprocess.DEVNULL,
        capture_output=True,
        text=True,
        timeout=30,
        check=False,
    )  # fmt: skip
    assert out.returncode == 0, out.stderr
    assert out.stdout.split() == ["1", "app@appdb"]


def test_psycopg_sync(proxy: ProxyProcess) -> None:
    with psycopg.connect(proxy.dsn(), prepare_threshold=None) as conn:
        assert conn.execute("select %s::int * 2", (21,)).fetchone() == (42,)
        assert conn.execute("select current_user, current_database()").fetchone() == (
            "app",
            "appdb",
        )
        conn.commit()
        # results much larger than any socket buffer
        (big,) = conn.execute("select repeat('x', 1000000)").fetchone() or ("",)
        assert big == "x" * 1_000_000
        rows = conn.execute("select g, md5(g::text) from generate_series(1, 50000) g").fetchall()
        assert len(rows) == 50000
        assert rows[-1] == (50000, "1017bfd4673955ffee4641ad3d481b1c")
        # a server-side cursor lives inside one transaction
        with conn.cursor(name="walk") as cur:
            cur.execute("select g from generate_series(1, 1000) g")
            assert [r[0] for r in cur.fetchmany(10)] == list(range(1, 11))
            assert len(cur.fetchall()) == 990
        conn.commit()


async def test_psycopg_async(proxy: ProxyProcess) -> None:
    async with await psycopg.AsyncConnection.connect(
        proxy.dsn(), autocommit=True, prepare_threshold=None
    ) as conn:
        for i in range(20):
            cur = await conn.execute("select %s::int * 2, %s::text", (i, f"v{i}"))
            assert await cur.fetchone() == (i * 2, f"v{i}")
        async with conn.transaction():
            cur = await conn.execute("select txid_current()")
            first = await cur.fetchone()
            cur = await conn.execute("select txid_current()")
            assert await cur.fetchone() == first


async def test_asyncpg(proxy: ProxyProcess) -> None:
    conn = await asyncpg.connect(**proxy.asyncpg_params())
    try:
        assert await conn.fetchval("select $1::int * 2", 21) == 42
        row = await conn.fetchrow(
            "select $1::text, $2::numeric, $3::bytea, $4::int[]", "é", 1.5, b"\x00\xff", [1, 2]
        )
        assert tuple(row) == ("é", 1.5, b"\x00\xff", [1, 2])
        rows = await conn.fetch("select g from generate_series(1, 20000) g")
        assert [r[0] for r in rows] == list(range(1, 20001))
        async with conn.transaction():
            first = await conn.fetchval("select txid_current()")
            assert await conn.fetchval("select txid_current()") == first
        # simple query protocol (no arguments) with several statements
        await conn.execute("select 1; select 2")
    finally:
        await conn.close()


def test_unix_socket(proxy: ProxyProcess) -> None:
    dsn = psycopg.conninfo.make_conninfo(
        "",
        host=str(proxy.socket_dir),
        port=proxy.port,
        user="app",
        password=APP_PASSWORD,
        dbname="appdb",
        connect_timeout=10,
    )
    with psycopg.connect(dsn, autocommit=True) as conn:
        assert conn.execute("select current_user").fetchone() == ("app",)


# --- client authentication and admission -------------------------------------------------


async def test_wrong_password(proxy: ProxyProcess) -> None:
    with pytest.raises(asyncpg.PostgresError) as excinfo:
        await asyncpg.connect(**proxy.asyncpg_params(password="not-the-password"))
    assert excinfo.value.sqlstate == "28P01"
    with pytest.raises(psycopg.OperationalError):
        psycopg.connect(proxy.dsn(password="not-the-password")).close()


async def test_unknown_database(proxy: ProxyProcess) -> None:
    with pytest.raises(asyncpg.PostgresError) as excinfo:
        await asyncpg.connect(**proxy.asyncpg_params(dbname="nosuchdb"))
    assert excinfo.value.sqlstate == "3D000"


def test_client_auth_is_scram_by_default(proxy: ProxyProcess) -> None:
    with psycopg.connect(proxy.dsn(require_auth="scram-sha-256")) as conn:
        assert conn.execute("select 1").fetchone() == (1,)
    with pytest.raises(psycopg.OperationalError):
        psycopg.connect(proxy.dsn(require_auth="md5")).close()


async def test_client_auth_md5(proxy_factory: ProxyFactory) -> None:
    proxy = proxy_factory(SIDECAR_AUTH_TYPE="md5")
    with psycopg.connect(proxy.dsn(require_auth="md5")) as conn:
        assert conn.execute("select current_user").fetchone() == ("app",)
    with pytest.raises(psycopg.OperationalError):
        psycopg.connect(proxy.dsn(require_auth="scram-sha-256")).close()
    with pytest.raises(asyncpg.PostgresError) as excinfo:
        await asyncpg.connect(**proxy.asyncpg_params(password="not-the-password"))
    assert excinfo.value.sqlstate == "28P01"


async def test_max_client_conn(proxy_factory: ProxyFactory) -> None:
    proxy = proxy_factory(SIDECAR_MAX_CLIENT_CONN="3")
    conns = [await asyncpg.connect(**proxy.asyncpg_params()) for _ in range(3)]
    try:
        with pytest.raises(asyncpg.PostgresError) as excinfo:
            extra = await asyncpg.connect(**proxy.asyncpg_params())
            await extra.close()
        assert excinfo.value.sqlstate == "53300"
        for conn in conns:
            assert await conn.fetchval("select 1") == 1
        await conns.pop().close()

        # the freed slot is usable once the proxy has seen the close
        async def connect_again() -> asyncpg.Connection:
            deadline = time.monotonic() + 5
            while True:
                try:
                    return await asyncpg.connect(**proxy.asyncpg_params())
                except asyncpg.TooManyConnectionsError:
                    if time.monotonic() > deadline:
                        raise
                    await asyncio.sleep(0.05)

        conns.append(await connect_again())
        assert await conns[-1].fetchval("select 2") == 2
    finally:
        for conn in conns:
            await conn.close()


# --- cancellation --------------------------------------------------------------------------


async def test_cancel_reaches_the_right_query(
    pg: PostgresServer, proxy_factory: ProxyFactory
) -> None:
    proxy = proxy_factory(SIDECAR_DEFAULT_POOL_SIZE="2")
    victim = await psycopg.AsyncConnection.connect(proxy.dsn(), autocommit=True)
    bystander = await psycopg.AsyncConnection.connect(proxy.dsn(), autocommit=True)
    tasks = [
        asyncio.create_task(victim.execute("select pg_sleep(30)")),
        asyncio.create_task(bystander.execute("select pg_sleep(30)")),
    ]
    try:
        await asyncio.to_thread(
            poll_until, lambda: len(active_sleeps(pg)) == 2, what="both queries running"
        )
        started = time.monotonic()
        await victim.cancel_safe(timeout=5)
        with pytest.raises(psycopg.errors.QueryCanceled) as excinfo:
            await asyncio.wait_for(tasks[0], 5)
        assert excinfo.value.sqlstate == "57014"
        assert time.monotonic() - started < 5
        # the other client's query was not the one cancelled
        assert not tasks[1].done()
        assert len(active_sleeps(pg)) == 1

        await bystander.cancel_safe(timeout=5)
        with pytest.raises(psycopg.errors.QueryCanceled):
            await asyncio.wait_for(tasks[1], 5)
        for conn in (victim, bystander):
            cur = await conn.execute("select 7")
            assert await cur.fetchone() == (7,)
    finally:
        # never leave a 30 s sleep behind when a cancel got lost
        pg.query(
            "select pg_cancel_backend(pid) from pg_stat_activity"
            " where usename = 'app' and query like 'select pg_sleep(30)%'",
            dbname="postgres",
        )
        await asyncio.gather(*tasks, return_exceptions=True)
        await victim.close()
        await bystander.close()


async def test_asyncpg_timeout_cancels_the_query(pg: PostgresServer, proxy: ProxyProcess) -> None:
    conn = await asyncpg.connect(**proxy.asyncpg_params())
    try:
        with pytest.raises(TimeoutError):
            await conn.fetchval("select pg_sleep(30)", timeout=0.5)
        started = time.monotonic()
        assert await conn.fetchval("select 42", timeout=5) == 42
        assert time.monotonic() - started < 5
        await asyncio.to_thread(
            poll_until, lambda: not active_sleeps(pg), timeout=5, what="the query to be cancelled"
        )
    finally:
        pg.query(
            "select pg_cancel_backend(pid) from pg_stat_activity"
            " where usename = 'app' and query like 'select pg_sleep(30)%'",
            dbname="postgres",
        )
        await conn.close()


# --- protocol details ----------------------------------------------------------------------


def test_copy_in_and_out(pg: PostgresServer, proxy: ProxyProcess) -> None:
    table = pg.create_table()
    rows = [(i, f"row {i} " + "y" * (i % 200)) for i in range(20000)]
    with psycopg.connect(proxy.dsn(), autocommit=True) as conn:
        with conn.cursor() as cur:
            with cur.copy(f"copy {table} (id, val) from stdin") as copy:
                for row in rows:
                    copy.write_row(row)
            assert cur.rowcount == len(rows)
        query = f"copy (select id, val from {table} order by id) to stdout"
        with conn.cursor() as cur, cur.copy(query) as copy:
            copy.set_types(["int4", "text"])
            out = list(copy.rows())
        assert out == rows
        # a COPY that fails half-way leaves the connection usable
        with (
            pytest.raises(psycopg.errors.InvalidTextRepresentation),
            conn.cursor() as cur,
            cur.copy(f"copy {table} (id, val) from stdin") as copy,
        ):
            copy.write(b"100000\tok\nnot-a-number\tbad\n")
        assert conn.execute(f"select count(*) from {table}").fetchone() == (len(rows),)
    assert pg.query(f"select count(*), sum(id) from {table}") == [
        (len(rows), sum(r[0] for r in rows))
    ]


def test_pipeline(proxy: ProxyProcess) -> None:
    with psycopg.connect(proxy.dsn(), autocommit=True) as conn:
        with conn.pipeline():
            curs = [conn.execute("select %s::int + 1", (i,)) for i in range(10)]
            curs.append(conn.execute("select current_user"))
        assert [c.fetchone() for c in curs] == [(i + 1,) for i in range(10)] + [("app",)]

        with pytest.raises(psycopg.errors.DivisionByZero), conn.pipeline():
            ok = conn.execute("select 1")
            conn.execute("select 1/0")
            conn.execute("select 3")
        assert ok.fetchall() == [(1,)]
        assert conn.execute("select 4").fetchone() == (4,)

        conn.autocommit = False
        with conn.pipeline():
            conn.execute("select 1")
            cur = conn.execute("select txid_current()")
            again = conn.execute("select txid_current()")
        assert cur.fetchone() == again.fetchone()
        conn.rollback()


@pytest.mark.parametrize(
    "cursor_factory", [AsyncCursor, AsyncClientCursor], ids=["extended", "simple"]
)
async def test_error_inside_transaction(proxy_factory: ProxyFactory, cursor_factory: Any) -> None:
    proxy = proxy_factory(SIDECAR_DEFAULT_POOL_SIZE="1")
    a = await psycopg.AsyncConnection.connect(proxy.dsn(), cursor_factory=cursor_factory)
    try:
        await a.execute("select 1")
        with pytest.raises(psycopg.errors.DivisionByZero):
            await a.execute("select 1/0")
        with pytest.raises(psycopg.errors.InFailedSqlTransaction) as excinfo:
            await a.execute("select 1")
        assert excinfo.value.sqlstate == "25P02"

        async def other_client() -> Any:
            async with await psycopg.AsyncConnection.connect(proxy.dsn(), autocommit=True) as b:
                cur = await b.execute(
                    "select txid_current_if_assigned(), now() = statement_timestamp()"
                )
                return await cur.fetchone()

        waiting = asyncio.create_task(other_client())
        # Give the other client time to queue: with the only server held by a failed
        # transaction it must wait, not get that server and not get a second one.
        await asyncio.sleep(0.5)
        if waiting.done():
            pytest.fail(f"the second client did not wait: {waiting.result()!r}")
        await a.rollback()
        assert await asyncio.wait_for(waiting, 10) == (None, True)
        cur = await a.execute("select 2")
        assert await cur.fetchone() == (2,)
        await a.commit()
    finally:
        await a.close()


def test_notice_passthrough(proxy: ProxyProcess) -> None:
    notices: list[tuple[str | None, str | None]] = []
    with psycopg.connect(proxy.dsn(), autocommit=True) as conn:
        conn.add_notice_handler(
            lambda d: notices.append((d.severity_nonlocalized, d.message_primary))
        )
        conn.execute("DO $$ BEGIN RAISE NOTICE 'hello'; END $$")
        conn.execute("DO $$ BEGIN RAISE WARNING 'careful'; END $$")
        assert conn.execute("select 1").fetchone() == (1,)
    assert notices == [("NOTICE", "hello"), ("WARNING", "careful")]


def test_parameter_status_passthrough(proxy: ProxyProcess) -> None:
    with psycopg.connect(proxy.dsn(application_name="first"), autocommit=True) as conn:
        assert conn.info.parameter_status("application_name") == "first"
        assert conn.info.parameter_status("server_version") is not None
        assert conn.info.parameter_status("client_encoding") == "UTF8"
        conn.execute("set application_name = 'renamed'")
        assert conn.info.parameter_status("application_name") == "renamed"
        for _ in range(3):
            assert conn.execute("show application_name").fetchone() == ("renamed",)
