"""Transaction mode without app changes: real clients through the real proxy to real PostgreSQL.

Prepared statements (asyncpg's default statement cache, psycopg with prepare_threshold=0,
pgbench -M prepared), the statement lifecycle (Close, DEALLOCATE, DISCARD ALL, the per-server
LRU), errors inside pipelines, SET tracking, pinning of session state that cannot move, and a
mixed workload. Pools are small so that clients really change server connections; the tests
check that they do by collecting the pg_backend_pid() values one client sees.
"""

from __future__ import annotations

import asyncio
import contextlib
import re
import threading
import time
from collections.abc import AsyncIterator, Awaitable, Callable, Iterator
from dataclasses import dataclass
from typing import Any, TypeVar

import asyncpg
import psycopg
import pytest
from pgfixtures import PostgresServer, ProxyFactory, ProxyProcess, poll_until
from psycopg import pq
from psycopg.pq.abc import PGresult
from psycopg.rows import dict_row
from test_proxy_pgbench import run_pgbench

from sidecar.dataplane.pool import PIN_CHECKS

POOL = 5
CLIENTS = 100
T = TypeVar("T")


# --- helpers ------------------------------------------------------------------------------------


def cached(proxy: ProxyProcess, **kwargs: Any) -> dict[str, Any]:
    """asyncpg.connect() arguments with asyncpg's DEFAULT statement cache (not size 0)."""
    params = proxy.asyncpg_params(**kwargs)
    if "statement_cache_size" not in kwargs:
        del params["statement_cache_size"]
    return params


@contextlib.asynccontextmanager
async def asyncpg_conn(proxy: ProxyProcess, **kwargs: Any) -> AsyncIterator[asyncpg.Connection]:
    """An asyncpg connection through `proxy` with the default statement cache, closed after."""
    conn = await asyncpg.connect(**cached(proxy, **kwargs))
    try:
        yield conn
    finally:
        await conn.close()


def log_events(proxy: ProxyProcess, event: str, client_pid: int | None = None) -> list[str]:
    """The proxy's `at=<event>` log lines, of one client if `client_pid` is given."""
    lines = [ln for ln in proxy.log_text().splitlines() if ln.startswith(f"sidecar at={event} ")]
    if client_pid is not None:
        lines = [ln for ln in lines if f" client_pid={client_pid} " in ln + " "]
    return lines


def pin_reasons(proxy: ProxyProcess, client_pid: int) -> list[str]:
    reasons = []
    for line in log_events(proxy, "pin", client_pid):
        match = re.search(r' reason=("[^"]*"|\S+)', line)
        assert match, line
        reasons.append(match.group(1).strip('"'))
    return reasons


@contextlib.contextmanager
def pin_test(
    proxy_factory: ProxyFactory,
) -> Iterator[tuple[ProxyProcess, psycopg.Connection[tuple[Any, ...]], Busy, int]]:
    """A pinning test's setup: a pool of 2, a client (autocommit) and 3 busy clients competing
    for the servers, so that the client moves unless it is pinned. Yields the proxy, the
    client, the busy clients and the client's pid as the proxy gave it (its at=pin lines)."""
    proxy = proxy_factory(SIDECAR_DEFAULT_POOL_SIZE="2")
    with psycopg.connect(proxy.dsn(), autocommit=True) as conn, Busy(proxy) as busy:
        yield proxy, conn, busy, conn.info.backend_pid


def wait_check_done(pg: PostgresServer, pid: int) -> None:
    """Wait until backend `pid` is idle after the proxy's own look at the session, which
    follows every transaction of a pinned client, so that a NOTIFY sent now reaches the
    listener in its own time (test_notifications_are_not_lost covers the other timings)."""
    check = "SELECT " + PIN_CHECKS[0]

    def done() -> bool:
        return any(
            p == pid and st == "idle" and q.startswith(check) for p, st, q, _ in pg.backends()
        )

    poll_until(done, timeout=5, what=f"the proxy's pin check on backend {pid}")


def wait_unpinned(proxy: ProxyProcess, client_pid: int, times: int = 1) -> None:
    poll_until(
        lambda: len(log_events(proxy, "unpin", client_pid)) >= times,
        timeout=5,
        what=f"at=unpin for client {client_pid}",
    )


def backend_pid(conn: psycopg.Connection[Any]) -> int:
    row = conn.execute("select pg_backend_pid()").fetchone()
    assert row is not None
    return int(row[0])


@contextlib.contextmanager
def holding(proxy: ProxyProcess, pid: int, pool_size: int) -> Iterator[None]:
    """Keep the server connection with backend `pid` in an open transaction of another client,
    so that the next transaction of anybody else must run on a different server connection."""
    holders: list[psycopg.Connection[Any]] = []
    try:
        for _ in range(pool_size):
            conn = psycopg.connect(proxy.dsn())  # not autocommit: the SELECT opens a transaction
            holders.append(conn)
            if backend_pid(conn) == pid:
                break
        else:
            raise AssertionError(f"no holder got the server of backend {pid}")
        for other in holders[:-1]:
            other.rollback()
        yield
    finally:
        for conn in holders:
            conn.close()


class Busy:
    """Clients in threads running short transactions until stopped; records, per transaction,
    when it started and the backend pid it ran on."""

    def __init__(self, proxy: ProxyProcess, clients: int = 3) -> None:
        self.dsn = proxy.dsn()
        self.runs: list[tuple[float, int]] = []
        self.errors: list[BaseException] = []
        self._stop = threading.Event()
        self._threads = [threading.Thread(target=self._run, daemon=True) for _ in range(clients)]

    def __enter__(self) -> Busy:
        for thread in self._threads:
            thread.start()
        poll_until(lambda: len(self.runs) >= len(self._threads), what="busy clients running")
        return self

    def __exit__(self, *exc: object) -> None:
        self._stop.set()
        for thread in self._threads:
            thread.join(10)
        assert not self.errors, f"busy clients failed: {self.errors[0]!r}"

    def _run(self) -> None:
        try:
            with psycopg.connect(self.dsn, autocommit=True) as conn:
                while not self._stop.is_set():
                    started = time.monotonic()
                    with conn.transaction():
                        pid = backend_pid(conn)
                        conn.execute("select pg_sleep(0.002)")
                    self.runs.append((started, pid))
        except BaseException as exc:
            self.errors.append(exc)

    def seen_since(self, mark: float) -> set[int]:
        """Backends of the transactions that started after `mark` (time.monotonic())."""
        return {pid for started, pid in self.runs if started > mark}

    def count_since(self, mark: float) -> int:
        return sum(started > mark for started, _ in self.runs)


class PeakBackends:
    """Watches how many server connections PostgreSQL has for `app` while the block runs."""

    def __init__(self, pg: PostgresServer) -> None:
        self.pg = pg
        self.peak = 0
        self._done = asyncio.Event()
        self._task: asyncio.Task[None] | None = None

    async def __aenter__(self) -> PeakBackends:
        self._task = asyncio.create_task(self._watch())
        return self

    async def __aexit__(self, *exc: object) -> None:
        self._done.set()
        assert self._task is not None
        await self._task

    async def _watch(self) -> None:
        while not self._done.is_set():
            self.peak = max(self.peak, await asyncio.to_thread(self.pg.count_backends))
            await asyncio.sleep(0.005)


def raise_first(results: list[T | BaseException], what: str) -> list[T]:
    """The results of asyncio.gather(..., return_exceptions=True), if none is an exception."""
    errors = [r for r in results if isinstance(r, BaseException)]
    if errors:
        raise AssertionError(f"{len(errors)} of {len(results)} {what} failed") from errors[0]
    return results  # type: ignore[return-value]


async def run_clients(what: str, n: int, client: Callable[[int], Awaitable[T]]) -> list[T]:
    """client(0) ... client(n - 1) at once; their results, or the first failure (and how many
    failed) once all have ended."""
    results = await asyncio.gather(*(client(i) for i in range(n)), return_exceptions=True)
    return raise_first(results, what)


@dataclass
class Churn:
    """A 100-client test over a pool of POOL (the `churn` fixture): its table, its proxy, the
    server lifetime (None, or "1": servers recycled under the clients several times) and until
    when its clients keep going."""

    pg: PostgresServer
    table: str
    proxy: ProxyProcess
    lifetime: str | None
    until: float

    async def run(
        self, what: str, client: Callable[[int], Awaitable[set[int]]]
    ) -> tuple[list[set[int]], int]:
        """CLIENTS clients at once, each returning the backend pids it ran on: those sets and
        the most server connections PostgreSQL saw. At least half the clients must have
        changed server connection."""
        async with PeakBackends(self.pg) as watch:
            pid_sets = await run_clients(what, CLIENTS, client)
        moved = sum(len(p) > 1 for p in pid_sets)
        assert moved >= CLIENTS // 2, f"only {moved} clients changed server connection"
        return pid_sets, watch.peak


@pytest.fixture(params=[None, "1"], ids=["steady", "server_lifetime_1s"])
def churn(request: pytest.FixtureRequest, pg: PostgresServer, proxy_factory: ProxyFactory) -> Churn:
    lifetime: str | None = request.param
    pg.wait_backends(0)
    table = pg.create_table("client int, n int")
    proxy = proxy_factory(SIDECAR_DEFAULT_POOL_SIZE=POOL, SIDECAR_SERVER_LIFETIME=lifetime)
    return Churn(pg, table, proxy, lifetime, time.monotonic() + (3.5 if lifetime else 0))


# --- prepared statements at the protocol level: real drivers, 100 clients over a pool of 5 ----


async def test_asyncpg_default_statement_cache(churn: Churn) -> None:
    table, proxy, until, lifetime = churn.table, churn.proxy, churn.until, churn.lifetime

    async def client(i: int) -> set[int]:
        conn = await asyncpg.connect(**cached(proxy, timeout=60))
        pids: set[int] = set()
        rounds = 0
        try:
            add = await conn.prepare("select $1::int + $2::int")  # reused across transactions
            while rounds < 8 or time.monotonic() < until:
                n = i * 1000 + rounds
                assert await conn.fetchval("select $1::int * 2", n) == 2 * n
                assert await add.fetchval(n, 1) == n + 1
                rows = await conn.fetch(
                    "select g, $1::text || g from generate_series(1, $2::int) g", f"c{i}-", 4
                )
                assert [tuple(r) for r in rows] == [(g, f"c{i}-{g}") for g in range(1, 5)]
                row = await conn.fetchrow("select $1::text as t, $2::int8 as b", str(n), n)
                assert row is not None and (row["t"], row["b"]) == (str(n), n)
                async with conn.transaction():
                    xid = await conn.fetchval("select txid_current()")
                    await conn.executemany(
                        f"insert into {table} (client, n) values ($1, $2)",
                        [(i, rounds * 3 + k) for k in range(3)],
                    )
                    assert await add.fetchval(rounds, i) == rounds + i
                    pids.add(await conn.fetchval("select pg_backend_pid()"))
                    assert await conn.fetchval("select txid_current()") == xid
                pids.add(await conn.fetchval("select pg_backend_pid()"))
                rounds += 1
            count = await conn.fetchval(f"select count(*) from {table} where client = $1", i)
            assert count == rounds * 3
        finally:
            await conn.close()
        return pids

    pid_sets, peak = await churn.run("asyncpg clients", client)
    everything = set().union(*pid_sets)
    if lifetime:
        assert len(everything) > POOL, f"servers were not recycled: {everything}"
        assert 'reason="server lifetime over"' in proxy.log_text()
    else:
        assert 1 <= peak <= POOL, f"{peak} server connections for a pool of {POOL}"
        assert len(everything) <= POOL


async def test_psycopg_prepares_everything(churn: Churn) -> None:
    table, proxy, until, lifetime = churn.table, churn.proxy, churn.until, churn.lifetime

    async def client(i: int) -> set[int]:
        autocommit = i % 2 == 0
        conn = await psycopg.AsyncConnection.connect(
            proxy.dsn(), autocommit=autocommit, prepare_threshold=0
        )
        pids: set[int] = set()
        rounds = 0
        inserted = 0
        try:
            while rounds < 6 or time.monotonic() < until:
                n = i * 1000 + rounds
                cur = await conn.execute("select %s::int * 2, pg_backend_pid()", (n,))
                row = await cur.fetchone()
                assert row is not None and row[0] == 2 * n
                pids.add(row[1])
                if not autocommit:
                    await conn.commit()
                # pipeline mode: several statements, one Sync
                async with conn.pipeline():
                    c1 = await conn.execute("select %s::text || 'x'", (str(n),))
                    c2 = await conn.execute(
                        "select g from generate_series(1, %s::int) g", (3 + i % 3,)
                    )
                    c3 = await conn.execute("select %s::int + %s::int", (n, i))
                    c4 = await conn.cursor().execute(
                        f"insert into {table} (client, n) values (%s, %s)", (i, n)
                    )
                    inserted += 1
                assert await c1.fetchone() == (f"{n}x",)
                assert await c2.fetchall() == [(g,) for g in range(1, 4 + i % 3)]
                assert await c3.fetchone() == (n + i,)
                assert c4.rowcount == 1
                if not autocommit:
                    await conn.commit()
                # an explicit transaction
                async with conn.transaction():
                    cur = await conn.execute("select txid_current(), pg_backend_pid()")
                    xid, pid = await cur.fetchone() or (None, None)
                    async with conn.cursor() as many:
                        await many.executemany(
                            f"insert into {table} (client, n) values (%s, %s)",
                            [(i, -k) for k in range(2)],
                        )
                    inserted += 2
                    cur = await conn.execute("select txid_current(), pg_backend_pid()")
                    assert await cur.fetchone() == (xid, pid)
                pids.add(pid)
                rounds += 1
            cur = await conn.execute(f"select count(*) from {table} where client = %s", (i,))
            assert await cur.fetchone() == (inserted,)
        finally:
            await conn.close()
        return pids

    pid_sets, peak = await churn.run("psycopg clients", client)
    if lifetime:
        assert len(set().union(*pid_sets)) > POOL, "servers were not recycled"
    else:
        assert 1 <= peak <= POOL, f"{peak} server connections for a pool of {POOL}"


@pytest.fixture(scope="module")
def pgbench_tables(pg: PostgresServer) -> None:
    """pgbench tables at scale 1 in appdb, created directly on the server as `app`."""
    run_pgbench(pg, pg.port, "require", "-i", "-s", "1", "-q")


#: Transactions each pgbench client runs: the run is bounded by work, not by time, so a loaded
#: machine makes it slower (run_pgbench's timeout still catches a stall), never shorter.
PGBENCH_TXS = 5


@pytest.mark.usefixtures("pgbench_tables")
@pytest.mark.parametrize(
    ("script", "lifetime"),
    [(["-S"], None), ([], None), ([], "0.2")],
    ids=["select-only", "tpcb", "tpcb-server_lifetime_0.2s"],
)
def test_pgbench_prepared(
    pg: PostgresServer, proxy_factory: ProxyFactory, script: list[str], lifetime: str | None
) -> None:
    """-j 4: pgbench prepares synchronously, each thread for its 25 clients in turn.

    Every client runs PGBENCH_TXS transactions (-t, not -T: a 3 s run on a loaded 2-core
    machine completed 0 transactions, its time gone on 100 logins and 700 synchronous
    prepares); all of them must complete, none may fail. A 0.2 s server lifetime retires
    servers many times within even the fastest run.
    """
    proxy = proxy_factory(
        SIDECAR_DEFAULT_POOL_SIZE=POOL,
        SIDECAR_MAX_CLIENT_CONN="300",
        SIDECAR_SERVER_LIFETIME=lifetime,
    )
    output = run_pgbench(
        pg,
        proxy.port,
        "disable",
        *script,
        "-M",
        "prepared",
        "-c",
        "100",
        "-j",
        "4",
        "-t",
        str(PGBENCH_TXS),
    )
    assert re.search(r"^number of failed transactions: 0\b", output, re.M), output
    processed = re.search(r"^number of transactions actually processed: (\d+)/", output, re.M)
    assert processed and int(processed.group(1)) == 100 * PGBENCH_TXS, output
    if lifetime:
        assert 'reason="server lifetime over"' in proxy.log_text()


# --- statement lifecycle ------------------------------------------------------------------------

CYCLE = [f"select $1::int + {k} as v{k}" for k in range(5)]


async def test_asyncpg_cache_eviction_closes_and_reprepares(
    pg: PostgresServer, proxy_factory: ProxyFactory
) -> None:
    """asyncpg with a cache of 2 closes the statements it evicts, then prepares them again."""
    proxy = proxy_factory(SIDECAR_DEFAULT_POOL_SIZE="2")

    async def client(i: int) -> set[int]:
        conn = await asyncpg.connect(**proxy.asyncpg_params(statement_cache_size=2))
        pids: set[int] = set()
        try:
            for rnd in range(12):
                for k, sql in enumerate(CYCLE):
                    assert await conn.fetchval(sql, i * 100 + rnd) == i * 100 + rnd + k
                pids.add(await conn.fetchval("select pg_backend_pid()"))
        finally:
            await conn.close()
        return pids

    pid_sets = await run_clients("asyncpg clients", 8, client)
    assert any(len(p) > 1 for p in pid_sets), "no client changed server connection"


async def test_psycopg_prepared_max_closes_and_reprepares(
    pg: PostgresServer, proxy_factory: ProxyFactory
) -> None:
    """psycopg with prepared_max=2 closes evicted statements (a Close message: libpq >= 17)."""
    proxy = proxy_factory(SIDECAR_DEFAULT_POOL_SIZE="2")
    queries = [q.replace("$1", "%s") for q in CYCLE]

    async def client(i: int) -> None:
        async with await psycopg.AsyncConnection.connect(
            proxy.dsn(), autocommit=True, prepare_threshold=0
        ) as conn:
            conn.prepared_max = 2
            for rnd in range(12):
                for k, sql in enumerate(queries):
                    cur = await conn.execute(sql, (i * 100 + rnd,))
                    assert await cur.fetchone() == (i * 100 + rnd + k,)

    await run_clients("psycopg clients", 8, client)


def _status(res: PGresult) -> tuple[pq.ExecStatus, str | None]:
    state = res.error_field(pq.DiagnosticField.SQLSTATE)
    return pq.ExecStatus(res.status), state.decode() if state else None


def _value(res: PGresult) -> str:
    assert res.status == pq.ExecStatus.TUPLES_OK, res.error_message
    value = res.get_value(0, 0)
    assert value is not None
    return value.decode()


def test_deallocate_all_and_discard_all_act_on_the_client_only(
    pg: PostgresServer, proxy_factory: ProxyFactory
) -> None:
    """Both go to the server, which drops every proxy statement there: other clients' ones
    are prepared again for them; the client's own are gone, as PostgreSQL would have it."""
    proxy = proxy_factory(SIDECAR_DEFAULT_POOL_SIZE="1")
    with (
        psycopg.connect(proxy.dsn(), autocommit=True) as a,
        psycopg.connect(proxy.dsn(), autocommit=True) as b,
    ):
        ac, bc = a.pgconn, b.pgconn
        assert bc.prepare(b"b1", b"select $1::int * 10").status == pq.ExecStatus.COMMAND_OK
        assert _value(bc.exec_prepared(b"b1", [b"4"])) == "40"
        for command in (b"DEALLOCATE ALL", b"DISCARD ALL"):
            assert ac.prepare(b"a1", b"select $1::int + 1").status == pq.ExecStatus.COMMAND_OK
            assert ac.prepare(b"a2", b"select $1::text").status == pq.ExecStatus.COMMAND_OK
            assert _value(ac.exec_prepared(b"a1", [b"1"])) == "2"
            res = ac.exec_(command)
            assert _status(res) == (pq.ExecStatus.COMMAND_OK, None), res.error_message
            assert res.command_status == command
            for name in (b"a1", b"a2"):
                assert _status(ac.exec_prepared(name, [b"1"])) == (
                    pq.ExecStatus.FATAL_ERROR,
                    "26000",
                )
            # the same name can be prepared again, with another text
            assert ac.prepare(b"a1", b"select $1::int - 1").status == pq.ExecStatus.COMMAND_OK
            assert _value(ac.exec_prepared(b"a1", [b"1"])) == "0"
            assert ac.exec_(b"DEALLOCATE ALL").status == pq.ExecStatus.COMMAND_OK
            # b's statement is untouched from b's point of view
            assert _value(bc.exec_prepared(b"b1", [b"5"])) == "50"
            assert backend_pid(a) == backend_pid(b)  # one server: both ran there


async def test_deallocate_name_by_simple_query(
    pg: PostgresServer, proxy_factory: ProxyFactory
) -> None:
    proxy = proxy_factory(SIDECAR_DEFAULT_POOL_SIZE="2")
    conn = await asyncpg.connect(**cached(proxy))
    try:
        stmt = await conn.prepare("select $1::int + 100")
        assert await stmt.fetchval(1) == 101
        name = stmt.get_name()
        assert await conn.execute(f"DEALLOCATE {name}", timeout=1) == "DEALLOCATE"
        with pytest.raises(asyncpg.InvalidSQLStatementNameError):
            await stmt.fetchval(1)
        assert await conn.fetchval("select 1") == 1
    finally:
        conn.terminate()


def test_discard_all_by_extended_protocol(pg: PostgresServer, proxy_factory: ProxyFactory) -> None:
    """pgx, JDBC, node-postgres send everything with Parse/Bind/Execute (unnamed statement)."""
    proxy = proxy_factory(SIDECAR_DEFAULT_POOL_SIZE="1")
    with (
        psycopg.connect(proxy.dsn(), autocommit=True) as a,
        psycopg.connect(proxy.dsn(), autocommit=True) as b,
    ):
        assert b.pgconn.prepare(b"b1", b"select $1::int * 10").status == pq.ExecStatus.COMMAND_OK
        for command in (b"DEALLOCATE ALL", b"DISCARD ALL"):
            assert _value(b.pgconn.exec_prepared(b"b1", [b"4"])) == "40"
            res = a.pgconn.exec_params(command, [])
            assert res.status == pq.ExecStatus.COMMAND_OK, res.error_message
            res = b.pgconn.exec_prepared(b"b1", [b"5"])
            assert _status(res) == (pq.ExecStatus.TUPLES_OK, None), res.error_message


def _proxy_statements(conn: psycopg.Connection[Any]) -> list[str]:
    """Statements prepared on the server this connection's next transaction runs on (simple
    query protocol, so the query itself prepares nothing)."""
    res = conn.pgconn.exec_(b"select name from pg_prepared_statements order by name")
    assert res.status == pq.ExecStatus.TUPLES_OK, res.error_message
    return [(res.get_value(r, 0) or b"").decode() for r in range(res.ntuples)]


async def test_max_prepared_statements_lru(pg: PostgresServer, proxy_factory: ProxyFactory) -> None:
    """A cap of 2 with 5 statements cycling: the server keeps at most 2, evicting the oldest."""
    proxy = proxy_factory(SIDECAR_DEFAULT_POOL_SIZE="1", SIDECAR_MAX_PREPARED_STATEMENTS="2")

    async def client(i: int) -> None:
        async with asyncpg_conn(proxy) as conn:
            for rnd in range(10):
                for k, sql in enumerate(CYCLE):
                    assert await conn.fetchval(sql, i + rnd) == i + rnd + k

    await run_clients("clients", 4, client)
    with psycopg.connect(proxy.dsn(), autocommit=True) as conn:
        names = _proxy_statements(conn)
    assert 1 <= len(names) <= 2 and all(n.startswith("sidecar_") for n in names), names


async def test_max_prepared_statements_zero_passes_names_through(
    pg: PostgresServer, proxy_factory: ProxyFactory
) -> None:
    proxy = proxy_factory(SIDECAR_DEFAULT_POOL_SIZE="1", SIDECAR_MAX_PREPARED_STATEMENTS="0")
    async with asyncpg_conn(proxy) as conn:
        stmt = await conn.prepare("select $1::int * 3")
        for rnd in range(5):
            async with conn.transaction():
                assert await stmt.fetchval(rnd) == 3 * rnd
            for k, sql in enumerate(CYCLE):
                assert await conn.fetchval(sql, rnd) == rnd + k
        names = await conn.fetch("select name from pg_prepared_statements")
        assert stmt.get_name() in {r["name"] for r in names}
        assert all(r["name"].startswith("__asyncpg_stmt_") for r in names)


def test_eviction_skipped_after_an_error(pg: PostgresServer, proxy_factory: ProxyFactory) -> None:
    proxy = proxy_factory(SIDECAR_DEFAULT_POOL_SIZE="1", SIDECAR_MAX_PREPARED_STATEMENTS="2")
    with psycopg.connect(proxy.dsn(), autocommit=True, prepare_threshold=0) as conn:
        assert conn.execute("select 1 as a").fetchone() == (1,)
        assert conn.execute("select 2 as b").fetchone() == (2,)
        # server LRU [a, b]; 1/0 evicts a, fails at Execute; c's eviction of b is then skipped
        with pytest.raises(psycopg.errors.DivisionByZero), conn.pipeline():
            conn.execute("select 1/0")
            conn.execute("select 3 as c")
        for sql, value in (("select 1 as a", 1), ("select 2 as b", 2), ("select 3 as c", 3)):
            assert conn.execute(sql).fetchone() == (value,)


async def test_failed_discard_all_does_not_break_other_clients(
    pg: PostgresServer, proxy_factory: ProxyFactory
) -> None:
    proxy = proxy_factory(SIDECAR_DEFAULT_POOL_SIZE="1")
    a = await asyncpg.connect(**cached(proxy))
    b = await asyncpg.connect(**cached(proxy))
    try:
        assert await a.fetchval("select $1::int + 1", 1) == 2
        # DISCARD ALL is refused inside a transaction block
        tx = b.transaction()
        await tx.start()
        with pytest.raises(asyncpg.ActiveSQLTransactionError):
            await b.execute("DISCARD ALL")
        await tx.rollback()
        assert await a.fetchval("select $1::int + 1", 2) == 3
        # DEALLOCATE ALL does not run in an aborted transaction
        tx = b.transaction()
        await tx.start()
        with pytest.raises(asyncpg.DivisionByZeroError):
            await b.execute("select 1/0")
        with pytest.raises(asyncpg.InFailedSQLTransactionError):
            await b.execute("DEALLOCATE ALL")
        await tx.rollback()
        assert await a.fetchval("select $1::int + 1", 3) == 4
    finally:
        await a.close()
        await b.close()


async def test_statement_reprepared_after_alter_table(
    pg: PostgresServer, proxy_factory: ProxyFactory
) -> None:
    proxy = proxy_factory(SIDECAR_DEFAULT_POOL_SIZE="1")
    table = pg.create_table()
    pg.query(f"insert into {table} values (1, 'a')")
    async with asyncpg_conn(proxy) as conn:
        assert [tuple(r) for r in await conn.fetch(f"select * from {table}")] == [(1, "a")]
        await asyncio.to_thread(pg.query, f"alter table {table} add column extra int default 7")
        # directly on PostgreSQL asyncpg re-prepares once and this succeeds
        assert [tuple(r) for r in await conn.fetch(f"select * from {table}")] == [(1, "a", 7)]


# --- errors in pipelines ------------------------------------------------------------------------


async def _bystanders(proxy: ProxyProcess, stop: asyncio.Event) -> int:
    """Clients running the same statements as the test's client until `stop`; their rounds."""

    async def one(i: int) -> int:
        rounds = 0
        async with await psycopg.AsyncConnection.connect(
            proxy.dsn(), autocommit=True, prepare_threshold=0
        ) as conn:
            while not stop.is_set() or rounds < 3:
                cur = await conn.execute("select %s::int + 1", (i,))
                assert await cur.fetchone() == (i + 1,)
                cur = await conn.execute("select %s::text || '!'", (str(i),))
                assert await cur.fetchone() == (f"{i}!",)
                rounds += 1
        return rounds

    return sum(await run_clients("bystanders", 6, one))


async def test_psycopg_pipeline_prepare_error(
    pg: PostgresServer, proxy_factory: ProxyFactory
) -> None:
    proxy = proxy_factory(SIDECAR_DEFAULT_POOL_SIZE="2")
    stop = asyncio.Event()
    others = asyncio.create_task(_bystanders(proxy, stop))
    try:
        async with await psycopg.AsyncConnection.connect(
            proxy.dsn(), autocommit=True, prepare_threshold=0
        ) as conn:
            for rnd in range(5):
                first = conn.cursor()
                bad = conn.cursor()
                last = conn.cursor()
                with pytest.raises(psycopg.errors.SyntaxError):
                    async with conn.pipeline():
                        await first.execute("select %s::int + 1", (rnd,))
                        await bad.execute("selec %s::int", (rnd,))
                        await last.execute("select %s::text || '!'", (str(rnd),))
                # the statement before the error ran; the one after it did not
                assert await first.fetchone() == (rnd + 1,)
                with pytest.raises(psycopg.Error):
                    await last.fetchone()
                # the connection works, and so do the statements the error skipped
                cur = await conn.execute("select %s::text || '!'", (str(rnd),))
                assert await cur.fetchone() == (f"{rnd}!",)
                cur = await conn.execute("select %s::int + 1", (rnd,))
                assert await cur.fetchone() == (rnd + 1,)
                async with conn.transaction():
                    cur = await conn.execute("select %s::int + 1", (rnd,))
                    assert await cur.fetchone() == (rnd + 1,)
    finally:
        stop.set()
    assert await others > 0


async def test_asyncpg_prepare_error(pg: PostgresServer, proxy_factory: ProxyFactory) -> None:
    proxy = proxy_factory(SIDECAR_DEFAULT_POOL_SIZE="2")
    stop = asyncio.Event()
    others = asyncio.create_task(_bystanders(proxy, stop))
    conn = await asyncpg.connect(**cached(proxy))
    try:
        for rnd in range(5):
            with pytest.raises(asyncpg.PostgresSyntaxError):
                await conn.prepare("selec $1::int")
            with pytest.raises(asyncpg.UndefinedTableError):
                await conn.fetchval("select n from no_such_table where n = $1", rnd)
            assert await conn.fetchval("select $1::int + 1", rnd) == rnd + 1
            async with conn.transaction():
                with pytest.raises(asyncpg.PostgresSyntaxError):
                    await conn.prepare("selec $1::int")
            stmt = await conn.prepare("select $1::text || '!'")
            assert await stmt.fetchval(str(rnd)) == f"{rnd}!"
    finally:
        await conn.close()
        stop.set()
    assert await others > 0


def test_injected_prepare_error_reaches_the_client(
    pg: PostgresServer, proxy_factory: ProxyFactory
) -> None:
    """The statement cannot be prepared on the server the client moved to: the Bind gets the
    error, the connection goes on, and the next use tries again."""
    table = pg.create_table()
    proxy = proxy_factory(SIDECAR_DEFAULT_POOL_SIZE="2")
    with psycopg.connect(proxy.dsn(), autocommit=True) as conn:
        pgconn = conn.pgconn
        sql = f"select count(*) from {table}".encode()
        assert pgconn.prepare(b"counting", sql).status == pq.ExecStatus.COMMAND_OK
        assert _value(pgconn.exec_prepared(b"counting", [])) == "0"
        pid = backend_pid(conn)
        pg.query(f"drop table {table}")
        with holding(proxy, pid, 2):
            for _ in range(2):
                assert _status(pgconn.exec_prepared(b"counting", [])) == (
                    pq.ExecStatus.FATAL_ERROR,
                    "42P01",
                )
                assert backend_pid(conn) != pid
        pg.query(f"create table {table} (id int primary key, val text)")
        pg.query(f"alter table {table} owner to app")
        pg.query(f"insert into {table} values (1, 'back')")
        with holding(proxy, pid, 2):
            assert _value(pgconn.exec_prepared(b"counting", [])) == "1"


def test_prepare_of_a_known_statement_needs_no_server(
    pg: PostgresServer, proxy_factory: ProxyFactory
) -> None:
    """A prepare-only batch (libpq's PQprepare, pgbench -M prepared) of a text a server has
    already accepted is answered by the proxy, even while every server is busy."""
    proxy = proxy_factory(SIDECAR_DEFAULT_POOL_SIZE="1")
    sql = b"select $1::int * 7"
    with psycopg.connect(proxy.dsn(), autocommit=True) as first:
        assert first.pgconn.prepare(b"seven", sql).status == pq.ExecStatus.COMMAND_OK
    with (
        psycopg.connect(proxy.dsn()) as holder,
        psycopg.connect(proxy.dsn(), autocommit=True) as conn,
    ):
        backend_pid(holder)  # its open transaction holds the only server
        result: list[PGresult] = []
        thread = threading.Thread(target=lambda: result.append(conn.pgconn.prepare(b"mine", sql)))
        thread.start()
        thread.join(5)
        answered = not thread.is_alive()
        holder.rollback()  # frees the server: a waiting prepare finishes now
        thread.join(5)
        assert answered, "the prepare waited for a server"
        assert result[0].status == pq.ExecStatus.COMMAND_OK
        assert _value(conn.pgconn.exec_prepared(b"mine", [b"6"])) == "42"
        # a text no server has seen yet waits for one as usual
        assert conn.pgconn.prepare(b"new", b"select $1::int * 8").status == (
            pq.ExecStatus.COMMAND_OK
        )


def test_bind_of_an_unknown_statement(pg: PostgresServer, proxy_factory: ProxyFactory) -> None:
    proxy = proxy_factory(SIDECAR_DEFAULT_POOL_SIZE="1")
    with psycopg.connect(proxy.dsn(), autocommit=True) as conn:
        pgconn = conn.pgconn
        assert pgconn.prepare(b"known", b"select 1").status == pq.ExecStatus.COMMAND_OK
        for _ in range(2):
            err = (pq.ExecStatus.FATAL_ERROR, "26000")
            assert _status(pgconn.exec_prepared(b"never_prepared", [])) == err
            assert _status(pgconn.describe_prepared(b"never_prepared")) == err
            # a statement only another client prepared is unknown to this one too
            with psycopg.connect(proxy.dsn(), autocommit=True) as other:
                assert _status(other.pgconn.exec_prepared(b"known", [])) == err
            assert _value(pgconn.exec_prepared(b"known", [])) == "1"


# --- SET and session settings -------------------------------------------------------------------


SETTINGS_QUERY = (
    "select current_setting('TimeZone'), current_setting('search_path'),"
    " current_setting('statement_timeout'), coalesce(current_setting('myapp.tenant', true), ''),"
    " pg_backend_pid()"
)


def test_set_follows_the_client_to_other_servers(
    pg: PostgresServer, proxy_factory: ProxyFactory
) -> None:
    pg.query("create schema if not exists myschema authorization app")
    pg.query("create table if not exists myschema.where_am_i as select 'myschema'::text as s")
    pg.query("alter table myschema.where_am_i owner to app")
    proxy = proxy_factory(SIDECAR_DEFAULT_POOL_SIZE="2")
    defaults = tuple(pg.query(SETTINGS_QUERY)[0][:4])
    default_tz, default_path = defaults[0], defaults[1]

    with psycopg.connect(proxy.dsn(), autocommit=True) as conn:
        expected = list(defaults)
        last = backend_pid(conn)

        def check(what: str) -> None:
            """The next transaction, on another server connection, sees `expected`; the next
            client on the server it ran on does not."""
            nonlocal last
            with holding(proxy, last, 2):
                row = conn.execute(SETTINGS_QUERY).fetchone()
                assert row is not None
                assert list(row[:4]) == expected, what
                assert row[4] != last, f"{what}: still on backend {last}"
                last = row[4]
                # the pool's other server is held: this client gets the one just used
                with psycopg.connect(proxy.dsn(), autocommit=True) as other:
                    row = other.execute(SETTINGS_QUERY).fetchone()
                assert row is not None and row[4] == last
                assert tuple(row[:4]) == defaults, f"{what}: leaked to another client"

        def run_and_check(statement: str, column: int, value: str, what: str) -> None:
            """Run `statement`, which sets column `column` of SETTINGS_QUERY to `value`."""
            conn.execute(statement)
            expected[column] = value
            check(what)

        run_and_check("SET TIME ZONE 'Asia/Tokyo'", 0, "Asia/Tokyo", "SET TIME ZONE")
        run_and_check(
            "SET search_path TO myschema, public", 1, "myschema, public", "SET search_path"
        )
        assert conn.execute("select s from where_am_i").fetchone() == ("myschema",)
        run_and_check("SET statement_timeout = '5s'", 2, "5s", "SET statement_timeout")
        run_and_check("RESET statement_timeout", 2, "0", "RESET statement_timeout")
        run_and_check("set myapp.tenant = 'acme'", 3, "acme", "SET of a custom setting")
        with conn.transaction():
            conn.execute("SET LOCAL statement_timeout = '7s'")
            conn.execute("SET LOCAL TIME ZONE 'UTC'")
            assert conn.execute("show statement_timeout").fetchone() == ("7s",)
        check("SET LOCAL does not persist")
        with conn.transaction():
            conn.execute("SET search_path TO public")
            conn.execute("SET myapp.tenant = 'other'")
            conn.execute("SET TIME ZONE 'Europe/Paris'")
            raise psycopg.Rollback()  # the transaction block rolls back and swallows it
        check("SET in a rolled-back transaction does not persist")
        with conn.transaction():
            conn.execute("select set_config('myapp.tenant', 'initech', false)")
        expected[3] = "initech"
        check("set_config(..., false) in a transaction")
        conn.execute("RESET TIME ZONE")
        conn.execute("RESET search_path")
        expected[:2] = [default_tz, default_path]
        check("RESET")


def test_set_role_follows_the_client(pg: PostgresServer, proxy_factory: ProxyFactory) -> None:
    pg.query(
        "do $$ begin create role sidecar_reader nologin;"
        " exception when duplicate_object then null; end $$"
    )
    pg.query("grant sidecar_reader to app")
    proxy = proxy_factory(SIDECAR_DEFAULT_POOL_SIZE="2")
    with psycopg.connect(proxy.dsn(), autocommit=True) as conn:
        for command, role in (("SET ROLE sidecar_reader", "sidecar_reader"), ("RESET ROLE", "app")):
            conn.execute(command)
            last = backend_pid(conn)
            with holding(proxy, last, 2):
                row = conn.execute("select current_user, pg_backend_pid()").fetchone()
                assert row is not None and row[1] != last
                assert row[0] == role, command
                with psycopg.connect(proxy.dsn(), autocommit=True) as other:
                    assert other.execute("select current_user").fetchone() == ("app",)


async def test_set_under_load(pg: PostgresServer, proxy_factory: ProxyFactory) -> None:
    """20 clients with their own settings over 3 servers: each always sees its own."""
    for k in range(3):
        pg.query(f"create schema if not exists tenant{k} authorization app")
        pg.query(f"create table if not exists tenant{k}.who as select {k} as k")
        pg.query(f"alter table tenant{k}.who owner to app")
    proxy = proxy_factory(SIDECAR_DEFAULT_POOL_SIZE="3")
    zones = ["UTC", "Asia/Tokyo", "Europe/Paris", "America/New_York", "Australia/Sydney"]

    async def client(i: int) -> set[int]:
        zone, timeout, tenant = zones[i % len(zones)], f"{1001 + i}ms", i % 3
        pids: set[int] = set()
        async with await psycopg.AsyncConnection.connect(
            proxy.dsn(), autocommit=True, prepare_threshold=0
        ) as conn:
            # prepare=False: see test_set_through_prepared_statements for prepared SETs
            await conn.execute(f"SET TIME ZONE '{zone}'", prepare=False)
            await conn.execute(f"SET statement_timeout = '{timeout}'", prepare=False)
            await conn.execute(f"SET search_path TO tenant{tenant}, public", prepare=False)
            await conn.execute(f"SET myapp.tenant = 'client-{i}'", prepare=False)
            for rnd in range(25):
                sql = (
                    "select current_setting('TimeZone'), current_setting('statement_timeout'),"
                    " (select k from who), current_setting('myapp.tenant'), pg_backend_pid()"
                )
                if rnd % 3 == 0:
                    async with conn.transaction():
                        row = await (await conn.execute(sql)).fetchone()
                else:
                    row = await (await conn.execute(sql)).fetchone()
                assert row is not None
                assert row[:4] == (zone, timeout, tenant, f"client-{i}"), f"client {i}"
                pids.add(row[4])
                await asyncio.sleep(0)
        return pids

    pid_sets = await run_clients("clients", 20, client)
    assert sum(len(p) > 1 for p in pid_sets) >= 10, "clients did not move between servers"


def test_set_through_prepared_statements(pg: PostgresServer, proxy_factory: ProxyFactory) -> None:
    """psycopg prepares (Parse+Sync) then executes (Bind..Sync): the SET must still count."""
    proxy = proxy_factory(SIDECAR_DEFAULT_POOL_SIZE="1")
    query = (
        "select coalesce(current_setting('myapp.tenant', true), ''),"
        " current_setting('search_path'), pg_backend_pid()"
    )
    default_path = pg.query("show search_path")[0][0]
    with psycopg.connect(proxy.dsn(), autocommit=True, prepare_threshold=0) as a:
        a.execute("SET myapp.tenant = 'acme'")
        a.execute("SET search_path TO pg_catalog")
        row = a.execute(query).fetchone()
        assert row is not None and row[:2] == ("acme", "pg_catalog")
        pid = row[2]
        with psycopg.connect(proxy.dsn(), autocommit=True) as b:
            # the pool's only server, used by `a` just before
            assert b.execute(query).fetchone() == ("", default_path, pid), "a's SET leaked"
        assert a.execute(query).fetchone() == ("acme", "pg_catalog", pid), "a's SET was lost"


async def test_set_config_through_a_cached_statement(
    pg: PostgresServer, proxy_factory: ProxyFactory
) -> None:
    """The row-level-security pattern: one cached statement sets the tenant per request."""
    proxy = proxy_factory(SIDECAR_DEFAULT_POOL_SIZE="2")
    async with asyncpg_conn(proxy) as conn:
        last = await conn.fetchval("select pg_backend_pid()")
        for tenant in ("alpha", "beta", "gamma"):
            await conn.execute("select set_config('myapp.tenant', $1, false)", tenant)
            with holding(proxy, last, 2):
                row = await conn.fetchrow(
                    "select current_setting('myapp.tenant', true), pg_backend_pid()"
                )
            assert row is not None and row[1] != last
            last = row[1]
            assert row[0] == tenant


async def test_reset_all_keeps_startup_settings(
    pg: PostgresServer, proxy_factory: ProxyFactory
) -> None:
    """asyncpg.Pool runs RESET ALL when a connection is released."""
    proxy = proxy_factory(SIDECAR_DEFAULT_POOL_SIZE="2")
    settings = {"application_name": "keep-me", "statement_timeout": "1234"}
    query = "select current_setting('application_name'), current_setting('statement_timeout')"
    seen = {}
    for where, port in (("direct", pg.port), ("proxy", proxy.port)):
        async with asyncpg_conn(proxy, port=port, server_settings=settings) as conn:
            await conn.execute("SET application_name = 'changed'; SET statement_timeout = 1")
            await conn.execute("RESET ALL")
            seen[where] = tuple(await conn.fetchrow(query) or ())
    assert seen["direct"] == ("keep-me", "1234ms")
    assert seen["proxy"] == seen["direct"]


# --- pinning ------------------------------------------------------------------------------------


def _advisory_holders(pg: PostgresServer, key: int) -> list[int]:
    rows = pg.query(
        "select pid from pg_locks where locktype = 'advisory' and objid = %s and granted", key
    )
    return [r[0] for r in rows]


def test_advisory_lock_pins_until_unlocked(pg: PostgresServer, proxy_factory: ProxyFactory) -> None:
    with pin_test(proxy_factory) as (proxy, conn, busy, cpid):
        row = conn.execute("select pg_advisory_lock(4242), pg_backend_pid()").fetchone()
        assert row is not None
        pid = row[1]
        poll_until(lambda: pin_reasons(proxy, cpid) == ["advisory lock"], what="at=pin")
        line = log_events(proxy, "pin", cpid)[0]
        assert f"backend_pid={pid}" in line and "pool=appdb" in line, line
        mark = time.monotonic()
        for _ in range(10):
            with conn.transaction():
                assert backend_pid(conn) == pid
            assert backend_pid(conn) == pid
            assert _advisory_holders(pg, 4242) == [pid]
        poll_until(lambda: busy.count_since(mark) > 10, what="busy clients to run")
        assert pid not in busy.seen_since(mark), "a pinned server was given to another client"

        conn.execute("select pg_advisory_unlock_all()")
        wait_unpinned(proxy, cpid)
        assert _advisory_holders(pg, 4242) == []
        mark = time.monotonic()
        poll_until(lambda: pid in busy.seen_since(mark), what="other clients to get the server")


async def test_advisory_lock_through_a_cached_statement(
    pg: PostgresServer, proxy_factory: ProxyFactory
) -> None:
    proxy = proxy_factory(SIDECAR_DEFAULT_POOL_SIZE="2")
    async with asyncpg_conn(proxy) as conn:
        for _ in range(2):  # the second time the statement comes from asyncpg's cache
            await conn.execute("select pg_advisory_lock($1)", 77)
            async with asyncpg_conn(proxy) as other:
                held = await other.fetchval(
                    "select count(*) from pg_locks"
                    " where locktype = 'advisory' and pid = pg_backend_pid()"
                )
            assert held == 0, "another client got the server that holds the lock"
            await conn.execute("select pg_advisory_unlock_all()")


def test_advisory_lock_prepared_by_psycopg(pg: PostgresServer, proxy_factory: ProxyFactory) -> None:
    proxy = proxy_factory(SIDECAR_DEFAULT_POOL_SIZE="1")
    with psycopg.connect(proxy.dsn(), autocommit=True, prepare_threshold=0) as conn:
        cpid = conn.info.backend_pid
        conn.execute("select pg_advisory_lock(76)")
        pid = backend_pid(conn)
    # the client left holding the lock: the proxy must have reset its server
    with psycopg.connect(proxy.dsn(), autocommit=True) as nxt:
        assert backend_pid(nxt) == pid
        assert _advisory_holders(pg, 76) == [], "the lock outlived its client"
    assert pin_reasons(proxy, cpid) == ["advisory lock"]


def test_temp_table_pins_and_on_commit_drop_does_not(
    pg: PostgresServer, proxy_factory: ProxyFactory
) -> None:
    with pin_test(proxy_factory) as (proxy, conn, busy, cpid):
        conn.execute("create temp table scratch (n int)")
        pid = backend_pid(conn)
        mark = time.monotonic()
        for n in range(5):
            with conn.transaction():
                conn.execute("insert into scratch values (%s)", (n,))
            assert backend_pid(conn) == pid
        assert conn.execute("select count(*), sum(n) from scratch").fetchone() == (5, 10)
        assert pid not in busy.seen_since(mark)
        assert pin_reasons(proxy, cpid) == ["temporary table"]
        conn.execute("drop table scratch")
        wait_unpinned(proxy, cpid)

    with psycopg.connect(proxy.dsn(), autocommit=True) as conn:
        cpid = conn.info.backend_pid
        for _ in range(3):
            with conn.transaction():
                conn.execute("create temp table gone (n int) on commit drop")
                conn.execute("insert into gone values (1)")
                last = backend_pid(conn)
            with holding(proxy, last, 2):
                assert backend_pid(conn) != last, "ON COMMIT DROP pinned the client"
        assert pin_reasons(proxy, cpid) == []


def test_withhold_cursor_in_autocommit(pg: PostgresServer, proxy_factory: ProxyFactory) -> None:
    """Django's default server-side cursors: DECLARE ... WITH HOLD in autocommit, FETCH in
    chunks, each FETCH its own transaction."""
    with pin_test(proxy_factory) as (proxy, conn, busy, cpid):
        rows: list[int] = []
        pids = set()
        with conn.cursor(name="django_chunked", withhold=True) as cur:
            cur.execute("select g from generate_series(1, 1000) g order by g")
            mark = time.monotonic()  # pinned from here on
            while chunk := cur.fetchmany(100):
                rows.extend(r[0] for r in chunk)
                pids.add(backend_pid(conn))
        assert rows == list(range(1, 1001))
        assert len(pids) == 1
        assert not pids & busy.seen_since(mark)
        assert pin_reasons(proxy, cpid) == ["WITH HOLD cursor"]
        wait_unpinned(proxy, cpid)
        # a second one in the same client pins and unpins again
        with conn.cursor(name="again", withhold=True) as cur:
            cur.execute("select g from generate_series(1, 10) g")
            assert [r[0] for r in cur.fetchmany(4)] == [1, 2, 3, 4]
            assert [r[0] for r in cur.fetchall()] == list(range(5, 11))
        wait_unpinned(proxy, cpid, times=2)


def test_listen_notify_unlisten(pg: PostgresServer, proxy_factory: ProxyFactory) -> None:
    proxy = proxy_factory(SIDECAR_DEFAULT_POOL_SIZE="2")
    with (
        psycopg.connect(proxy.dsn(), autocommit=True) as listener,
        psycopg.connect(proxy.dsn(), autocommit=True) as sender,
        Busy(proxy) as busy,
    ):
        cpid = listener.info.backend_pid
        listener.execute("LISTEN news")
        pid = backend_pid(listener)
        assert pin_reasons(proxy, cpid) == ["LISTEN"]
        mark = time.monotonic()
        wait_check_done(pg, pid)
        pg.query("select pg_notify('news', 'direct')")  # from outside the proxy
        sender.execute("NOTIFY news, 'through the proxy'")
        got = [n.payload for n in listener.notifies(timeout=5, stop_after=2)]
        assert got == ["direct", "through the proxy"]
        for k in range(3):
            with listener.transaction():
                assert backend_pid(listener) == pid
            wait_check_done(pg, pid)
            sender.execute("select pg_notify('news', %s)", (str(k),))
            assert [n.payload for n in listener.notifies(timeout=5, stop_after=1)] == [str(k)]
        assert pid not in busy.seen_since(mark)
        listener.execute("UNLISTEN news")
        wait_unpinned(proxy, cpid)


def test_notifications_are_not_lost(pg: PostgresServer, proxy_factory: ProxyFactory) -> None:
    proxy = proxy_factory(SIDECAR_DEFAULT_POOL_SIZE="2")
    count = 300
    with psycopg.connect(proxy.dsn(), autocommit=True) as listener:
        listener.execute("LISTEN burst")

        def send() -> None:
            with psycopg.connect(pg.dsn(), autocommit=True) as direct:
                for k in range(count):
                    direct.execute("select pg_notify('burst', %s)", (str(k),))

        sender = threading.Thread(target=send)
        sender.start()
        got: list[str] = []
        while sender.is_alive():
            listener.execute("select 1")  # a transaction; the proxy checks the pin after it
            got.extend(n.payload for n in listener.notifies(timeout=0.001))
        sender.join()
        if len(got) < count:
            got.extend(n.payload for n in listener.notifies(timeout=1, stop_after=count - len(got)))
    assert len(got) == count, f"{count - len(got)} of {count} notifications lost"


def test_sql_prepare_pins(pg: PostgresServer, proxy_factory: ProxyFactory) -> None:
    """SQL-level PREPARE is not renamed: the client keeps its server until DEALLOCATE."""
    with pin_test(proxy_factory) as (proxy, conn, busy, cpid):
        conn.execute("PREPARE twice (int) AS SELECT $1 * 2")
        pid = backend_pid(conn)
        mark = time.monotonic()
        for k in range(8):
            if k % 2:
                with conn.transaction():
                    assert conn.execute(f"EXECUTE twice({k})").fetchone() == (2 * k,)
            else:
                assert conn.execute(f"EXECUTE twice({k})").fetchone() == (2 * k,)
            assert backend_pid(conn) == pid
        assert pid not in busy.seen_since(mark)
        assert pin_reasons(proxy, cpid) == ["SQL PREPARE"]
        conn.execute("DEALLOCATE twice")
        wait_unpinned(proxy, cpid)
        with pytest.raises(psycopg.errors.InvalidSqlStatementName):
            conn.execute("EXECUTE twice(1)")


def test_discard_all_unpins(pg: PostgresServer, proxy_factory: ProxyFactory) -> None:
    proxy = proxy_factory(SIDECAR_DEFAULT_POOL_SIZE="2")
    with psycopg.connect(proxy.dsn(), autocommit=True) as conn:
        conn.execute("select pg_advisory_lock(99)")
        conn.execute("create temp table t_discard (n int)")
        pid = backend_pid(conn)
        conn.execute("DISCARD ALL")
        assert _advisory_holders(pg, 99) == []
        with holding(proxy, pid, 2):
            assert backend_pid(conn) != pid, "still pinned after DISCARD ALL"


def test_discard_all_logs_unpin(pg: PostgresServer, proxy_factory: ProxyFactory) -> None:
    proxy = proxy_factory(SIDECAR_DEFAULT_POOL_SIZE="2")
    with psycopg.connect(proxy.dsn(), autocommit=True) as conn:
        cpid = conn.info.backend_pid
        conn.execute("select pg_advisory_lock(98)")
        conn.execute("DISCARD ALL")
        conn.execute("select 1")  # served after the proxy's look at the session
        assert len(log_events(proxy, "unpin", cpid)) == 1


def test_failed_discard_all_keeps_the_pin(pg: PostgresServer, proxy_factory: ProxyFactory) -> None:
    proxy = proxy_factory(SIDECAR_DEFAULT_POOL_SIZE="2")
    with psycopg.connect(proxy.dsn(), autocommit=True) as conn:
        conn.execute("select pg_advisory_lock(97)")
        pid = backend_pid(conn)
        with pytest.raises(psycopg.errors.ActiveSqlTransaction), conn.transaction():
            conn.execute("DISCARD ALL")
        assert _advisory_holders(pg, 97) == [pid]
        assert backend_pid(conn) == pid  # after the proxy's look at the session
        with psycopg.connect(proxy.dsn(), autocommit=True) as other:
            assert backend_pid(other) != pid, "another client got the server holding the lock"


def test_pinned_client_leaves_a_clean_server(
    pg: PostgresServer, proxy_factory: ProxyFactory
) -> None:
    proxy = proxy_factory(SIDECAR_DEFAULT_POOL_SIZE="1")
    with psycopg.connect(proxy.dsn(), autocommit=True) as conn:
        cpid = conn.info.backend_pid
        conn.execute("select pg_advisory_lock(1234)")
        conn.execute("create temp table leftover (n int)")
        conn.execute("LISTEN leftovers")
        conn.execute("PREPARE leftover_stmt AS SELECT 1")
        conn.execute("DECLARE leftover_cursor CURSOR WITH HOLD FOR SELECT 1")
        conn.execute("SET search_path TO pg_catalog")
        pid = backend_pid(conn)
    # one line each time the set of reasons changes; the last one names them all
    assert set(pin_reasons(proxy, cpid)[-1].split(",")) == {
        "advisory lock",
        "temporary table",
        "LISTEN",
        "SQL PREPARE",
        "WITH HOLD cursor",
    }
    with psycopg.connect(proxy.dsn(), autocommit=True, row_factory=dict_row) as nxt:
        row = nxt.execute(
            "select pg_backend_pid() as pid,"
            " (select count(*) from pg_class where relnamespace = pg_my_temp_schema()) as temp,"
            " (select count(*) from pg_locks where locktype = 'advisory'"
            "  and pid = pg_backend_pid()) as locks,"
            " (select count(*) from pg_listening_channels()) as listens,"
            " (select count(*) from pg_prepared_statements where from_sql) as prepared,"
            " (select count(*) from pg_cursors) as cursors,"
            " current_setting('search_path') as path"
        ).fetchone()
    assert row is not None
    assert row.pop("pid") == pid, "the pool of 1 gave the next client another server"
    assert row == {
        "temp": 0,
        "locks": 0,
        "listens": 0,
        "prepared": 0,
        "cursors": 0,
        "path": pg.query("show search_path")[0][0],
    }
    assert _advisory_holders(pg, 1234) == []


def test_pinned_clients_are_counted(pg: PostgresServer, proxy_factory: ProxyFactory) -> None:
    proxy = proxy_factory(SIDECAR_DEFAULT_POOL_SIZE="3")
    with (
        psycopg.connect(proxy.dsn(), autocommit=True) as a,
        psycopg.connect(proxy.dsn(), autocommit=True) as b,
        psycopg.connect(proxy.dsn(dbname="sidecar"), autocommit=True, row_factory=dict_row) as ad,
    ):
        a.execute("select pg_advisory_lock(11)")
        b.execute("LISTEN counted")

        def pinned() -> int:
            rows = ad.execute("SHOW POOLS").fetchall()
            return int(next(r for r in rows if r["database"] == "appdb")["cl_pinned"])

        poll_until(lambda: pinned() == 2, timeout=3, what="cl_pinned = 2")
        a.execute("select pg_advisory_unlock_all()")
        poll_until(lambda: pinned() == 1, timeout=3, what="cl_pinned = 1")


def test_pinned_clients_in_the_stats_line(pg: PostgresServer, proxy_factory: ProxyFactory) -> None:
    proxy = proxy_factory(SIDECAR_DEFAULT_POOL_SIZE="2", SIDECAR_STATS_PERIOD="0.2")
    with psycopg.connect(proxy.dsn(), autocommit=True) as conn:
        conn.execute("select pg_advisory_lock(12)")
        conn.execute("select 1")

        def pinned_figure() -> list[str]:
            return [
                m.group(1)
                for ln in log_events(proxy, "stats")
                if (m := re.search(r" sample#[\w.]*pinned=(\d+)", ln))
            ]

        poll_until(lambda: "1" in pinned_figure(), timeout=1.5, what="a stats line with pinned=1")


# --- a mixed workload ---------------------------------------------------------------------------


async def test_mixed_workload(pg: PostgresServer, proxy_factory: ProxyFactory) -> None:
    """100 clients, 5 of them pinned by an advisory lock, over a pool of 10: the other 95 are
    multiplexed over the 5 servers left and all finish."""
    await asyncio.to_thread(pg.wait_backends, 0)
    pool, pinners, rounds = 10, 5, 10
    proxy = proxy_factory(SIDECAR_DEFAULT_POOL_SIZE=pool)
    pinned_ready = asyncio.Event()
    locked: list[int] = []
    release = asyncio.Event()

    async def pinner(i: int) -> int:
        async with asyncpg_conn(proxy, timeout=30) as conn:
            await conn.execute(f"select pg_advisory_lock({5000 + i})")
            pid = int(await conn.fetchval("select pg_backend_pid()"))
            locked.append(pid)
            if len(locked) == pinners:
                pinned_ready.set()
            while not release.is_set():
                async with conn.transaction():
                    assert await conn.fetchval("select pg_backend_pid()") == pid
                    assert await conn.fetchval("select $1::int + 1", i) == i + 1
                await asyncio.sleep(0.01)
            await conn.execute("select pg_advisory_unlock_all()")
            await conn.fetchval("select 1")  # runs after the proxy's unpin
            return pid

    async def worker(i: int) -> set[int]:
        await pinned_ready.wait()
        conn = await asyncpg.connect(**cached(proxy, timeout=30))
        pids: set[int] = set()
        try:
            for rnd in range(rounds):
                assert await conn.fetchval("select $1::int * 3", i + rnd) == 3 * (i + rnd)
                async with conn.transaction():
                    pids.add(await conn.fetchval("select pg_backend_pid()"))
                    assert await conn.fetchval("select $1::text", str(rnd)) == str(rnd)
        finally:
            await conn.close()
        return pids

    async with PeakBackends(pg) as watch:
        pinning = [asyncio.create_task(pinner(i)) for i in range(pinners)]
        await asyncio.wait_for(pinned_ready.wait(), 20)
        results = await asyncio.gather(
            *(worker(i) for i in range(CLIENTS - pinners)), return_exceptions=True
        )
        release.set()
        pinned_pids = await asyncio.gather(*pinning)
    multiplexed: set[int] = set().union(*raise_first(results, "unpinned clients"))
    assert len(set(pinned_pids)) == pinners
    assert not multiplexed & set(pinned_pids), "an unpinned client ran on a pinned server"
    assert 1 <= len(multiplexed) <= pool - pinners
    assert watch.peak <= pool, f"{watch.peak} server connections for a pool of {pool}"
    assert len(log_events(proxy, "pin")) == pinners
    assert len(log_events(proxy, "unpin")) == pinners
