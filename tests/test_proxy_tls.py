"""Server side of the proxy: TLS towards PostgreSQL and the upstream authentication methods."""

from __future__ import annotations

import asyncio
import hashlib
import threading
import time

import asyncpg
import psycopg
import pytest
from pgfixtures import (
    MD5_PASSWORD,
    PW_PASSWORD,
    CertAuthority,
    PostgresServer,
    ProxyFactory,
    ProxyProcess,
)
from tcpproxy import Relay


def server_uses_tls(
    pg: PostgresServer, proxy: ProxyProcess, user: str = "app", dbname: str = "appdb"
) -> bool:
    """Run a query through the proxy; say whether the server connection serving it uses TLS."""
    with psycopg.connect(proxy.dsn(user, dbname=dbname), autocommit=True) as conn:
        row = conn.execute("select pg_backend_pid(), current_user").fetchone()
    assert row is not None and row[1] == user
    rows = pg.query(
        "select s.ssl from pg_stat_ssl s join pg_stat_activity a using (pid)"
        " where a.pid = %s and a.usename = %s and a.backend_type = 'client backend'",
        row[0],
        user,
        dbname="postgres",
    )
    assert len(rows) == 1, f"backend {row[0]} not found: {rows}"
    return bool(rows[0][0])


def test_tls_by_default(pg: PostgresServer, proxy: ProxyProcess) -> None:
    assert server_uses_tls(pg, proxy)
    rows = pg.query(
        "select ssl from pg_stat_ssl join pg_stat_activity using (pid)"
        " where usename = 'app' and backend_type = 'client backend'",
        dbname="postgres",
    )
    assert rows and any(ssl for (ssl,) in rows)


@pytest.mark.parametrize(
    ("sslmode", "with_ca", "tls"),
    [
        ("disable", False, False),
        ("prefer", False, True),
        ("require", False, True),
        ("verify-ca", True, True),
        ("verify-full", True, True),
    ],
)
def test_server_sslmode(
    pg: PostgresServer, proxy_factory: ProxyFactory, sslmode: str, with_ca: bool, tls: bool
) -> None:
    env = {"SIDECAR_SERVER_TLS_SSLMODE": sslmode}
    if with_ca:
        env["SIDECAR_SERVER_TLS_CA_FILE"] = str(pg.ca_file)
    # the server certificate names "localhost" (and 127.0.0.1)
    proxy = proxy_factory(f"appdb={pg.url(host='localhost')}", **env)
    assert server_uses_tls(pg, proxy) is tls


async def test_verify_full_with_another_ca_fails(
    pg: PostgresServer, proxy_factory: ProxyFactory, other_ca: CertAuthority
) -> None:
    proxy = proxy_factory(
        f"appdb={pg.url(host='localhost')}",
        SIDECAR_SERVER_TLS_SSLMODE="verify-full",
        SIDECAR_SERVER_TLS_CA_FILE=str(other_ca.cert),
    )
    # The proxy may report the failure at login or at the first query.
    with pytest.raises(asyncpg.PostgresError) as excinfo:
        conn = await asyncpg.connect(**proxy.asyncpg_params(timeout=30))
        try:
            await conn.fetchval("select 1", timeout=30)
        finally:
            await conn.close()
    assert excinfo.value.sqlstate == "08001"


@pytest.mark.parametrize(
    ("user", "password", "dbname"),
    [("md5user", MD5_PASSWORD, "md5db"), ("pwuser", PW_PASSWORD, "pwdb"), ("app", None, "appdb")],
)
def test_upstream_auth_methods(
    pg: PostgresServer, proxy_factory: ProxyFactory, user: str, password: str | None, dbname: str
) -> None:
    proxy = proxy_factory(
        f"appdb={pg.url()}",
        f"md5db={pg.url('md5user')}",
        f"pwdb={pg.url('pwuser')}",
    )
    with psycopg.connect(proxy.dsn(user, password, dbname=dbname), autocommit=True) as conn:
        row = conn.execute("select current_user, current_database(), %s::int + 1", (1,)).fetchone()
    assert row == (user, "appdb", 2)
    with pytest.raises(psycopg.OperationalError):
        psycopg.connect(proxy.dsn(user, "wrong", dbname=dbname)).close()


async def test_tls_results_stay_whole_and_apart_under_concurrency(proxy: ProxyProcess) -> None:
    # Every TLS server connection decrypts into one shared read buffer (server.TLSServerConn):
    # results larger than it, read in many pieces by many connections at once, must reach
    # each client whole and unmixed -- also a client that reads slowly, so that the proxy
    # holds its bytes while other connections' reads reuse the buffer.

    def expected(tag: str, rows: int) -> list[str]:
        # rows of ~16 KiB: 40 rows are ~650 KiB, above the 256 KiB buffer
        return [
            hashlib.md5(f"{tag}-{i}".encode()).hexdigest() * 500 + f"|{tag}|{i}"
            for i in range(1, rows + 1)
        ]

    query = (
        "select repeat(md5($1 || '-' || i), 500) || '|' || $1 || '|' || i"
        " from generate_series(1, $2::int) i order by i"
    )

    stop = threading.Event()

    async def one(n: int) -> None:
        conn = await asyncpg.connect(**proxy.asyncpg_params(), command_timeout=20)
        try:
            round_ = 0
            while not stop.is_set() or round_ < 2:
                round_ += 1
                tag = f"c{n}r{round_}"
                rows = await conn.fetch(query, tag, 40)
                assert [r[0] for r in rows] == expected(tag, 40), f"client {n} round {round_}"
                # a small answer in between, on the same server stream
                assert await conn.fetchval("select $1::int + 1", n) == n + 1
        finally:
            conn.terminate()

    failures: list[BaseException] = []

    def others() -> None:
        async def run() -> None:
            await asyncio.gather(*(one(n) for n in range(12)))

        try:
            asyncio.run(run())
        except BaseException as exc:  # reported by the main thread
            failures.append(exc)

    slow = await asyncpg.connect(**proxy.asyncpg_params(), command_timeout=20)
    thread = threading.Thread(target=others, daemon=True)
    thread.start()
    try:
        for round_ in range(3):
            tag = f"slow{round_}"
            # ~10 MB: more than the kernel buffers between us take, so the proxy holds some
            task = asyncio.ensure_future(slow.fetch(query, tag, 600))
            await asyncio.sleep(0.05)  # the query is sent
            time.sleep(0.5)  # nothing reads this client's socket meanwhile
            rows = await task
            assert [r[0] for r in rows] == expected(tag, 600), f"slow client round {round_}"
    finally:
        stop.set()
        slow.terminate()
        thread.join(60)
    assert not thread.is_alive() and not failures, failures


async def test_prefer_goes_on_in_clear_when_the_server_refuses_tls(
    pg: PostgresServer, proxy_factory: ProxyFactory
) -> None:
    # sslmode=prefer makes a TLS-capable server connection (TLSServerConn, reading through
    # the buffer protocol); a server that says "N" is then spoken to in clear on it.
    with Relay((pg.host, pg.port), refuse_tls=True) as relay:
        proxy = proxy_factory(
            f"appdb={pg.url(port=relay.port)}", SIDECAR_SERVER_TLS_SSLMODE="prefer"
        )
        assert not server_uses_tls(pg, proxy)
        assert relay.tls_refused >= 1

        async def one(n: int) -> None:
            conn = await asyncpg.connect(**proxy.asyncpg_params(), command_timeout=20)
            try:
                for round_ in range(3):
                    tag = f"p{n}r{round_}"
                    rows = await conn.fetch(
                        "select repeat(md5($1 || '-' || i), 500) from generate_series(1, 40) i"
                        " order by i",
                        tag,
                    )
                    assert [r[0] for r in rows] == [
                        hashlib.md5(f"{tag}-{i}".encode()).hexdigest() * 500 for i in range(1, 41)
                    ]
            finally:
                conn.terminate()

        await asyncio.gather(*(one(n) for n in range(6)))
        assert proxy.stop() == 0  # while its servers' relay is still there
