"""The `pg` fixture itself: TLS, authentication methods, roles, helper methods."""

from __future__ import annotations

import asyncpg
import psycopg
import pytest
from pgfixtures import APP_PASSWORD, MD5_PASSWORD, PW_PASSWORD, CertAuthority, PostgresServer


def test_verify_full_tls_with_test_ca(pg: PostgresServer) -> None:
    url = pg.url(host="localhost", sslmode="verify-full", sslrootcert=str(pg.ca_file))
    with psycopg.connect(url) as conn:
        row = conn.execute(
            "SELECT ssl, current_user, current_database() FROM pg_stat_ssl"
            " WHERE pid = pg_backend_pid()"
        ).fetchone()
    assert row == (True, "app", "appdb")


def test_url_percent_encodes_password(pg: PostgresServer) -> None:
    assert APP_PASSWORD not in pg.url()
    assert "%40" in pg.url() and "%2F" in pg.url() and "%25" in pg.url()


def test_other_ca_is_rejected(pg: PostgresServer, other_ca: CertAuthority) -> None:
    url = pg.url(host="localhost", sslmode="verify-full", sslrootcert=str(other_ca.cert))
    with pytest.raises(psycopg.OperationalError, match="certificate verify failed"):
        psycopg.connect(url, connect_timeout=5).close()


def test_hostnossl_scram_for_app(pg: PostgresServer) -> None:
    with psycopg.connect(pg.dsn(require_auth="scram-sha-256")) as conn:
        assert conn.execute(
            "SELECT ssl FROM pg_stat_ssl WHERE pid = pg_backend_pid()"
        ).fetchone() == (False,)


@pytest.mark.parametrize(
    ("user", "password", "method"),
    [("md5user", MD5_PASSWORD, "md5"), ("pwuser", PW_PASSWORD, "password")],
)
@pytest.mark.parametrize("sslmode", ["disable", "require"])
def test_md5_and_password_roles(
    pg: PostgresServer, user: str, password: str, method: str, sslmode: str
) -> None:
    with psycopg.connect(pg.dsn(user, password, sslmode=sslmode, require_auth=method)) as conn:
        assert conn.execute("SELECT current_user").fetchone() == (user,)
    with pytest.raises(psycopg.OperationalError, match="password authentication failed"):
        psycopg.connect(pg.dsn(user, "wrong", sslmode=sslmode)).close()


def test_md5user_password_is_stored_as_md5(pg: PostgresServer) -> None:
    rows = pg.query(
        "SELECT rolname, left(rolpassword, 3) FROM pg_authid"
        " WHERE rolname IN ('app', 'md5user', 'pwuser') ORDER BY rolname"
    )
    assert rows == [("app", "SCR"), ("md5user", "md5"), ("pwuser", "SCR")]


async def test_asyncpg_direct(pg: PostgresServer) -> None:
    conn = await asyncpg.connect(
        host=pg.host, port=pg.port, user="app", password=APP_PASSWORD, database="appdb", ssl=False
    )
    try:
        assert await conn.fetchval("SELECT $1::int * 2", 21) == 42
    finally:
        await conn.close()


def test_count_backends_and_settings(pg: PostgresServer) -> None:
    before = pg.count_backends()
    with psycopg.connect(pg.dsn()):
        assert pg.count_backends() == before + 1
    pg.wait_backends(before)
    settings = dict(
        pg.query(
            "SELECT name, setting FROM pg_settings WHERE name = ANY(%s)",
            ["max_connections", "ssl", "password_encryption", "fsync", "listen_addresses"],
        )
    )
    assert settings == {
        "max_connections": "300",
        "ssl": "on",
        "password_encryption": "scram-sha-256",
        "fsync": "off",
        "listen_addresses": "127.0.0.1",
    }
    assert len(str(pg.socket_dir / f".s.PGSQL.{pg.port}")) < 100
    assert pg.port != 5432
    assert (pg.bin_dir / "pgbench").exists()
