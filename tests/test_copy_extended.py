"""Extended-protocol COPY FROM STDIN through the proxy releases its server afterwards."""

import psycopg
from psycopg import pq


def start_extended_copy(conn: psycopg.Connection, table: str) -> pq.abc.PGconn:
    """COPY FROM STDIN sent with the extended protocol (Parse/Bind/Execute/Sync), up to the
    server's CopyInResponse; returns the libpq connection to go on with."""
    pgc = conn.pgconn
    pgc.send_query_params(f"COPY {table} FROM STDIN".encode(), None)
    while True:
        res = pgc.get_result()
        if res is not None and res.status == pq.ExecStatus.COPY_IN:
            return pgc


def test_extended_copy_releases_server(pg, proxy_factory):
    table = pg.create_table("id int")
    # Pool of 1, short wait: a server never released fails the second client fast.
    proxy = proxy_factory(SIDECAR_DEFAULT_POOL_SIZE="1", SIDECAR_QUERY_WAIT_TIMEOUT="5")
    with (
        psycopg.connect(proxy.dsn(), autocommit=True) as a,
        psycopg.connect(proxy.dsn(), autocommit=True) as b,
    ):
        pgc = start_extended_copy(a, table)
        pgc.put_copy_data(b"1\n2\n")
        pgc.put_copy_end()
        res = pgc.get_result()
        assert res.status == pq.ExecStatus.COMMAND_OK
        while pgc.get_result() is not None:
            pass
        # Pool of 1: b only gets a server if a's was released.
        assert b.execute(f"select count(*) from {table}").fetchone() == (2,)
        assert a.execute("select 1").fetchone() == (1,)


def test_client_gone_mid_extended_copy_is_not_handed_on(pg, proxy_factory):
    # In copy-in the server ignores Sync, so no request is pending while the copy runs:
    # a client leaving then must not leave its server in copy mode to the next client.
    table = pg.create_table("id int")
    proxy = proxy_factory(SIDECAR_DEFAULT_POOL_SIZE="1", SIDECAR_QUERY_WAIT_TIMEOUT="5")
    for _ in range(3):
        a = psycopg.connect(proxy.dsn(), autocommit=True)
        pgc = start_extended_copy(a, table)
        pgc.put_copy_data(b"1\n2\n")
        pgc.flush()
        a.close()
        with psycopg.connect(proxy.dsn(), autocommit=True) as b:
            for n in range(3):
                assert b.execute("select %s::int", (n,)).fetchone() == (n,)
            assert b.execute(f"select count(*) from {table}").fetchone() == (0,)
