"""Client libraries' own view of a session, against PostgreSQL directly and through the proxy
(transaction mode) side by side: ParameterStatus spellings, NotificationResponse process ids,
and other edge behaviour. Where the two differ on purpose (transaction pooling), the test says
so and README.md lists the difference.
"""

from __future__ import annotations

import asyncio
import json
import threading
from typing import Any

import asyncpg
import psycopg
import pytest
from nodeclient import run_node
from pgfixtures import APP_PASSWORD, PostgresServer, ProxyFactory, ProxyProcess
from psycopg import pq

REPORTED = ("client_encoding", "DateStyle", "TimeZone", "IntervalStyle", "application_name")


def direct_asyncpg(pg: PostgresServer, **kwargs: Any) -> dict[str, Any]:
    params: dict[str, Any] = {
        "host": pg.host,
        "port": pg.port,
        "user": "app",
        "password": APP_PASSWORD,
        "database": "appdb",
        "ssl": False,
        "timeout": 10,
    }
    params.update(kwargs)
    return params


def pooled_asyncpg(proxy: ProxyProcess, **kwargs: Any) -> dict[str, Any]:
    params = proxy.asyncpg_params(**kwargs)
    if "statement_cache_size" not in kwargs:
        del params["statement_cache_size"]
    return params


def reported(conn: psycopg.Connection[Any]) -> dict[str, str | None]:
    return {name: conn.info.parameter_status(name) for name in REPORTED}


# --- ParameterStatus ----------------------------------------------------------------------------

SETTINGS = {
    "client_encoding": "utf8",
    "options": "-c DateStyle=iso,\\ dmy -c TimeZone=utc -c IntervalStyle=SQL_STANDARD",
    "application_name": "caf\u00e9 " + "x" * 70,
}


def test_parameter_status_is_spelled_as_postgresql_spells_it(
    pg: PostgresServer, proxy_factory: ProxyFactory
) -> None:
    with psycopg.connect(pg.dsn(**SETTINGS)) as conn:
        direct = reported(conn)
    assert direct["client_encoding"] == "UTF8" and direct["DateStyle"] == "ISO, DMY"
    # No budget count (#17) on the one server: these logins need it idle to learn spellings.
    proxy = proxy_factory(SIDECAR_DEFAULT_POOL_SIZE="1", SIDECAR_INSTANCE_BUDGET="0")
    for _ in range(2):  # learned on a server, then known
        with psycopg.connect(proxy.dsn(**SETTINGS)) as conn:
            assert reported(conn) == direct
            row = conn.execute("select current_setting('DateStyle')").fetchone()
            assert row == ("ISO, DMY",)


def test_parameter_status_spelling_when_no_server_is_idle(
    pg: PostgresServer, proxy_factory: ProxyFactory
) -> None:
    """The only server is busy at login: the client hears the server's spelling before the
    answer to its first query."""
    settings = {"client_encoding": "utf-8", "options": "-c DateStyle=sql,\\ mdy"}
    with psycopg.connect(pg.dsn(**settings)) as conn:
        direct = reported(conn)
    proxy = proxy_factory(SIDECAR_DEFAULT_POOL_SIZE="1")
    with psycopg.connect(proxy.dsn()) as holder:
        holder.execute("select 1")  # holds the one server in a transaction
        with psycopg.connect(proxy.dsn(**settings), autocommit=True) as conn:
            holder.rollback()
            conn.execute("select 1")
            assert reported(conn) == direct


def test_invalid_startup_setting_fails_the_login_as_postgresql_does(
    pg: PostgresServer, proxy_factory: ProxyFactory
) -> None:
    options = {"options": "-c DateStyle=nonsense"}
    with pytest.raises(psycopg.OperationalError) as direct:
        psycopg.connect(pg.dsn(**options))
    # No budget count (#17) on the one server: these logins need it idle to learn spellings.
    proxy = proxy_factory(SIDECAR_INSTANCE_BUDGET="0")
    psycopg.connect(proxy.dsn()).close()  # the pool knows its servers' parameters
    with pytest.raises(psycopg.OperationalError) as pooled:
        psycopg.connect(proxy.dsn(**options))
    expected = 'invalid value for parameter "DateStyle": "nonsense"'
    assert expected in str(direct.value) and expected in str(pooled.value)


async def test_asyncpg_settings(pg: PostgresServer, proxy_factory: ProxyFactory) -> None:
    server_settings = {"DateStyle": "postgres, ymd", "TimeZone": "utc", "application_name": "a"}
    proxy = proxy_factory()

    async def settings(params: dict[str, Any]) -> dict[str, str]:
        conn = await asyncpg.connect(**params, server_settings=server_settings)
        try:
            got = conn.get_settings()
            return {name: getattr(got, name) for name in REPORTED}
        finally:
            await conn.close()

    assert await settings(pooled_asyncpg(proxy)) == await settings(direct_asyncpg(pg))


# --- NotificationResponse -----------------------------------------------------------------------


async def asyncpg_notifications(params: dict[str, Any], other: dict[str, Any]) -> list[bool]:
    """[own notification's pid is the connection's, another's is not]"""
    conn = await asyncpg.connect(**params)
    sender = await asyncpg.connect(**other)
    got: asyncio.Queue[int] = asyncio.Queue()
    try:
        await conn.add_listener("chan", lambda _c, pid, _ch, _payload: got.put_nowait(pid))
        await conn.execute("NOTIFY chan, 'mine'")
        mine = await asyncio.wait_for(got.get(), 10)
        await sender.execute("NOTIFY chan, 'theirs'")
        theirs = await asyncio.wait_for(got.get(), 10)
        return [mine == conn.get_server_pid(), theirs != conn.get_server_pid()]
    finally:
        await conn.close()
        await sender.close()


async def test_asyncpg_notification_pid(pg: PostgresServer, proxy_factory: ProxyFactory) -> None:
    proxy = proxy_factory(SIDECAR_DEFAULT_POOL_SIZE="2")
    direct = await asyncpg_notifications(direct_asyncpg(pg), direct_asyncpg(pg))
    pooled = await asyncpg_notifications(pooled_asyncpg(proxy), pooled_asyncpg(proxy))
    assert pooled == direct == [True, True]


def psycopg_notifications(dsn: str) -> list[bool]:
    with (
        psycopg.connect(dsn, autocommit=True) as conn,
        psycopg.connect(dsn, autocommit=True) as sender,
    ):
        conn.execute("LISTEN chan")
        conn.execute("NOTIFY chan, 'mine'")
        sender.execute("NOTIFY chan, 'theirs'")
        got = {n.payload: n.pid for n in conn.notifies(timeout=10, stop_after=2)}
        own = conn.info.backend_pid
        return [got["mine"] == own, got["theirs"] != own]


def test_psycopg_notify_pid(pg: PostgresServer, proxy_factory: ProxyFactory) -> None:
    proxy = proxy_factory(SIDECAR_DEFAULT_POOL_SIZE="2")
    assert psycopg_notifications(proxy.dsn()) == psycopg_notifications(pg.dsn()) == [True, True]


# --- a tour of behaviours, psycopg and asyncpg --------------------------------------------------


def diag(exc: psycopg.Error) -> dict[str, Any]:
    """Every field of an error as psycopg shows it."""
    fields = (
        "severity",
        "severity_nonlocalized",
        "sqlstate",
        "message_primary",
        "message_detail",
        "message_hint",
        "statement_position",
        "internal_position",
        "internal_query",
        "context",
        "schema_name",
        "table_name",
        "column_name",
        "datatype_name",
        "constraint_name",
        "source_file",
        "source_function",
    )
    return {"class": type(exc).__name__, **{f: getattr(exc.diag, f) for f in fields}}


def psycopg_tour(dsn: str, table: str) -> dict[str, Any]:
    out: dict[str, Any] = {}
    notices: list[tuple[str | None, str | None, str | None]] = []
    with psycopg.connect(dsn, autocommit=True) as conn:
        conn.add_notice_handler(
            lambda d: notices.append((d.severity, d.sqlstate, d.message_primary))
        )
        conn.execute("DO $$ BEGIN RAISE NOTICE 'hello %', 42 USING HINT = 'a hint'; END $$")
        conn.execute(f"DROP TABLE IF EXISTS {table}_none")
        out["notices"] = notices
        # errors, with every field
        for sql in (
            "select 1/0",
            f"insert into {table} values (1, 'a'), (1, 'b')",
            "select no_such_column from pg_class",
            "selec 1",
        ):
            try:
                conn.execute(sql)
            except psycopg.Error as exc:
                out[sql] = diag(exc)
        # multiple result sets from one simple query
        cur = conn.cursor()
        cur.execute("select 1; select 'two', 2")
        sets = [cur.fetchall()]
        while cur.nextset():
            sets.append(cur.fetchall())
        out["result sets"] = sets
        # COPY both ways
        with cur.copy(f"COPY {table} FROM STDIN") as copy:
            for i in range(10, 13):
                copy.write_row((i, f"v{i}"))
        with cur.copy(f"COPY (select * from {table} order by id) TO STDOUT") as copy:
            out["copy out"] = [bytes(row) for row in copy]
        # pipeline mode
        with conn.pipeline():
            c1 = conn.execute("select %s::int * 2", (21,))
            c2 = conn.execute(f"select count(*) from {table}")
        out["pipeline"] = [c1.fetchall(), c2.fetchall()]
        # a WITH HOLD cursor outlives its transaction (through the proxy: pinned)
        with conn.transaction():
            conn.execute("DECLARE held CURSOR WITH HOLD FOR select generate_series(1, 5)")
        out["with hold"] = conn.execute("FETCH 2 FROM held").fetchall()
        conn.execute("CLOSE held")
        # cancel a running query; the connection goes on
        conn.execute("select 1")
        timer = threading.Timer(0.5, conn.cancel)
        timer.start()
        try:
            conn.execute("select pg_sleep(5)")
        except psycopg.errors.QueryCanceled as exc:
            out["cancel"] = diag(exc)
        finally:
            timer.cancel()
        out["after cancel"] = conn.execute("select 1").fetchall()
    with psycopg.connect(dsn) as conn:
        # SET LOCAL lasts for its transaction only
        conn.execute("SET LOCAL statement_timeout = '1234ms'")
        out["set local"] = conn.execute("show statement_timeout").fetchall()
        conn.commit()
        out["after set local"] = conn.execute("show statement_timeout").fetchall()
        conn.commit()
        # large objects inside a transaction
        oid = conn.execute("select lo_from_bytea(0, 'large')").fetchone()
        assert oid is not None
        fd = conn.execute("select lo_open(%s, 393216)", (oid[0],)).fetchone()
        assert fd is not None
        out["lo"] = conn.execute("select loread(%s, 3)", (fd[0],)).fetchall()
        conn.execute("select lo_unlink(%s)", (oid[0],))
        conn.commit()
        # server-side (named) cursors
        with conn.cursor(name="walk") as named:
            named.itersize = 2
            named.execute("select generate_series(1, 5)")
            out["named cursor"] = [row for row in named]
        conn.commit()
        # an error aborts the transaction until ROLLBACK
        conn.execute("select 1")
        with pytest.raises(psycopg.errors.DivisionByZero):
            conn.execute("select 1/0")
        try:
            conn.execute("select 1")
        except psycopg.Error as exc:
            out["in failed transaction"] = diag(exc)
        conn.rollback()
    return out


def test_psycopg_tour(pg: PostgresServer, proxy_factory: ProxyFactory) -> None:
    proxy = proxy_factory(SIDECAR_DEFAULT_POOL_SIZE="2")
    table = pg.create_table()
    direct = psycopg_tour(pg.dsn(), table)
    pg.query(f"truncate {table}")
    pooled = psycopg_tour(proxy.dsn(), table)
    for key in direct:
        assert (key, pooled.get(key)) == (key, direct[key])
    assert pooled.keys() == direct.keys()


async def asyncpg_tour(params: dict[str, Any], table: str) -> dict[str, Any]:
    out: dict[str, Any] = {}
    logs: list[tuple[str, str]] = []
    conn = await asyncpg.connect(**params)
    try:
        conn.add_log_listener(lambda _c, msg: logs.append((msg.sqlstate, msg.message)))
        await conn.execute("DO $$ BEGIN RAISE WARNING 'careful %', 1; END $$")
        for sql in ("select 1/0", f"insert into {table} values (1, 'a'), (1, 'b')", "selec 1"):
            try:
                await conn.execute(sql)
            except asyncpg.PostgresError as exc:
                out[sql] = (type(exc).__name__, exc.as_dict())
        # prepared statements, executemany, COPY
        stmt = await conn.prepare(f"select val from {table} where id = $1")
        await conn.executemany(f"insert into {table} values ($1, $2)", [(1, "a"), (2, "b")])
        out["prepared"] = await stmt.fetchval(2)
        await conn.copy_records_to_table(table, records=[(3, "c"), (4, "d")])
        out["copy"] = await conn.fetch(f"select * from {table} order by id")
        out["copy out"] = await conn.copy_from_query(f"select * from {table}", output=_Sink(out))
        # a cursor inside a transaction, fetched in pieces
        async with conn.transaction():
            cur = await conn.cursor(f"select id from {table} order by id")
            out["cursor"] = [await cur.fetch(2), await cur.fetch(2)]
        # a timeout cancels the query; the connection goes on
        with pytest.raises(asyncio.TimeoutError):
            await conn.execute("select pg_sleep(5)", timeout=0.5)
        out["after timeout"] = await conn.fetchval("select 41 + 1")
        # a savepoint rolls back alone
        async with conn.transaction():
            with pytest.raises(asyncpg.UniqueViolationError):
                async with conn.transaction():
                    await conn.execute(f"insert into {table} values (1, 'dup')")
            out["after savepoint"] = await conn.fetchval(f"select count(*) from {table}")
        out["logs"] = logs
    finally:
        await conn.close()
    # a pool of asyncpg connections resets each one on release (RESET ALL, UNLISTEN *, ...)
    async with asyncpg.create_pool(**params, min_size=2, max_size=2) as pool:
        for _ in range(4):
            async with pool.acquire() as pooled:
                out.setdefault("pool", []).append(
                    await pooled.fetchval("select current_setting('application_name')")
                )
                await pooled.execute("SET application_name = 'changed'")
    return out


class _Sink:
    """copy_from_query output: counts the bytes."""

    def __init__(self, out: dict[str, Any]) -> None:
        self.out = out
        self.out["copied bytes"] = 0

    async def __call__(self, data: bytes) -> None:
        self.out["copied bytes"] += len(data)


async def test_asyncpg_tour(pg: PostgresServer, proxy_factory: ProxyFactory) -> None:
    proxy = proxy_factory(SIDECAR_DEFAULT_POOL_SIZE="2")
    table = pg.create_table()
    direct = await asyncpg_tour(direct_asyncpg(pg), table)
    pg.query(f"truncate {table}")
    pooled = await asyncpg_tour(pooled_asyncpg(proxy), table)
    for key in direct:
        assert (key, pooled.get(key)) == (key, direct[key])
    assert pooled.keys() == direct.keys()


NODE_NOTIFY = """
const { Client } = require('pg');
(async () => {
  const client = new Client(JSON.parse(process.env.PG_CONFIG));
  await client.connect();
  const got = new Promise((resolve) => client.on('notification', resolve));
  await client.query('LISTEN chan');
  await client.query("NOTIFY chan, 'mine'");
  const msg = await got;
  await client.end();
  console.log(JSON.stringify([msg.payload, msg.processId === client.processID]));
})().catch((e) => { console.error(e); process.exit(1); });
"""


def test_node_postgres_notification_process_id(
    pg: PostgresServer, proxy_factory: ProxyFactory
) -> None:
    proxy = proxy_factory()

    def run(host: str, port: int) -> Any:
        config = {"host": host, "port": port, "user": "app", "database": "appdb"}
        return run_node(NODE_NOTIFY, PG_CONFIG=json.dumps({**config, "password": APP_PASSWORD}))

    assert run(proxy.host, proxy.port) == run(pg.host, pg.port) == ["mine", True]


def libpq_duplicate_prepare(dsn: str) -> list[Any]:
    """A second Parse of a statement name in use: 42P05, the first statement kept."""
    with psycopg.connect(dsn, autocommit=True) as conn:
        pgconn = conn.pgconn
        out: list[Any] = [pq.ExecStatus(pgconn.prepare(b"dup", b"select 1").status).name]
        res = pgconn.prepare(b"dup", b"select 2")
        out += [pq.ExecStatus(res.status).name, res.error_field(pq.DiagnosticField.SQLSTATE)]
        out.append(res.error_field(pq.DiagnosticField.MESSAGE_PRIMARY))
        res = pgconn.exec_prepared(b"dup", [])
        out.append(res.get_value(0, 0))
        return out


def test_duplicate_prepare(pg: PostgresServer, proxy_factory: ProxyFactory) -> None:
    proxy = proxy_factory(SIDECAR_DEFAULT_POOL_SIZE="2")
    direct = libpq_duplicate_prepare(pg.dsn())
    assert direct[2:] == [b"42P05", b'prepared statement "dup" already exists', b"1"]
    assert libpq_duplicate_prepare(proxy.dsn()) == direct
