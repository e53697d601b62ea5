"""TLS from the app to the proxy (SIDECAR_CLIENT_TLS*), with real clients: psql, psycopg,
asyncpg (node-postgres: test_node.py). Apps that demand TLS connect unchanged; plaintext apps
too; `require` and `off` answer as PostgreSQL with a hostssl line / ssl=off would."""

from __future__ import annotations

import hashlib
import os
import signal
import socket
import ssl
import struct
import subprocess
import sys
import time
from pathlib import Path

import asyncpg
import psycopg
import pytest
from cryptography import x509
from cryptography.hazmat.primitives.asymmetric import ec
from pgfixtures import (
    APP_PASSWORD,
    PostgresServer,
    ProxyFactory,
    ProxyProcess,
    poll_until,
)
from tcpproxy import PgWire, errors

from sidecar.config import ConfigError, load_settings
from sidecar.protocol import messages as m

BIG = 6_000_000  # bytes in one value: many TLS records each way, more than one 256 KiB read


def psql(
    proxy: ProxyProcess, conninfo: str, sql: str, **env: str
) -> subprocess.CompletedProcess[str]:
    full = {**os.environ, "PGPASSWORD": APP_PASSWORD, "PGCONNECT_TIMEOUT": "10", **env}
    return subprocess.run(
        [
            "psql",
            f"host={proxy.host} port={proxy.port} user=app dbname=appdb {conninfo}",
            *("-X", "-At", "-c", sql),
        ],
        env=full,
        capture_output=True,
        text=True,
        timeout=60,
    )


def peer_certificate(host: str, port: int, ctx: ssl.SSLContext | None = None) -> bytes:
    """SSLRequest by hand, then a handshake: the certificate the proxy serves (DER)."""
    if ctx is None:
        ctx = ssl.SSLContext(ssl.PROTOCOL_TLS_CLIENT)
        ctx.check_hostname = False
        ctx.verify_mode = ssl.CERT_NONE
    with socket.create_connection((host, port), 10) as sock:
        sock.sendall(m.ssl_request())
        assert sock.recv(1) == b"S"
        with ctx.wrap_socket(sock, server_hostname="localhost") as tls:
            der = tls.getpeercert(binary_form=True)
    assert der is not None
    return der


def plaintext_refusal(proxy: ProxyProcess) -> dict[str, str]:
    """The one error a plaintext startup gets before any authentication."""
    with PgWire.connect(proxy.host, proxy.port) as wire:
        wire.send(m.startup_message({"user": "app", "database": "appdb"}))
        answer = wire.until_closed(10)
    [error] = errors(answer)
    assert len(answer) == 1, answer
    return error


# --- the default: TLS when asked, plaintext otherwise ---------------------------------------------


def test_psql_sslmode_require_and_pgsslmode(proxy: ProxyProcess) -> None:
    for conninfo, env in (("sslmode=require", {}), ("", {"PGSSLMODE": "require"})):
        res = psql(proxy, conninfo, r"\conninfo", **env)
        assert res.returncode == 0, res.stderr
        assert "SSL connection (protocol: TLSv1." in res.stdout, res.stdout
        res = psql(proxy, conninfo, "select 40 + 2", **env)
        assert (res.returncode, res.stdout.strip()) == (0, "42"), res.stderr


def test_psycopg_require_prefer_and_plaintext(proxy: ProxyProcess) -> None:
    for sslmode, tls in (("require", True), ("prefer", True), ("disable", False)):
        with psycopg.connect(proxy.dsn(sslmode=sslmode)) as conn:
            assert conn.execute("select 1").fetchone() == (1,)
            assert conn.pgconn.ssl_in_use is tls, sslmode
            if tls:
                # the admin console sees it too (SHOW CLIENTS' tls column, as PgBouncer)
                mine = [c for c in proxy.show("CLIENTS") if c["database"] == "appdb"]
                assert [str(c["tls"]).split("/")[0] for c in mine] == ["TLSv1.3"], mine
    assert "tls=true" in proxy.log_text()


def test_large_results_and_copy_over_client_tls(proxy: ProxyProcess) -> None:
    """Big values and many rows both ways, intact: reads larger than the TLS buffer, writes
    that make the TLS transport push back (pause_writing) on a slow reader."""
    with psycopg.connect(proxy.dsn(sslmode="require"), autocommit=True) as conn:
        assert conn.pgconn.ssl_in_use
        row = conn.execute(
            "select v, md5(v) from (select repeat(md5('x'), %s) v) s", (BIG // 32,)
        ).fetchone()
        assert row is not None
        assert len(row[0]) == BIG and hashlib.md5(row[0].encode()).hexdigest() == row[1]
        rows = conn.execute(
            "select g, repeat(chr(65 + g % 26), 1000) from generate_series(1, 20000) g"
        ).fetchall()
        assert len(rows) == 20000
        assert all(r[1] == chr(65 + r[0] % 26) * 1000 for r in rows)
        conn.execute("create temp table t (v text)")
        payload = os.urandom(BIG // 2).hex()
        with conn.cursor() as cur, cur.copy("copy t from stdin") as copy:
            copy.write_row((payload,))
        got = conn.execute("select md5(v), length(v) from t").fetchone()
        assert got == (hashlib.md5(payload.encode()).hexdigest(), len(payload))


async def test_asyncpg_ssl_require(proxy: ProxyProcess) -> None:
    conn = await asyncpg.connect(**proxy.asyncpg_params(ssl="require"))
    try:
        assert conn._transport.get_extra_info("ssl_object") is not None  # type: ignore[attr-defined]
        value = await conn.fetchval("select repeat('y', $1::int)", BIG)
        assert value == "y" * BIG
        # extended protocol over TLS, many in a row, and a batch in one write
        assert [await conn.fetchval("select $1::int", i) for i in range(50)] == list(range(50))
        await conn.executemany("select $1::int", [(i,) for i in range(200)])
    finally:
        await conn.close()


def test_generated_certificate(proxy: ProxyProcess) -> None:
    """EC P-256, for the local names, made at start (the time it took is logged)."""
    cert = x509.load_der_x509_certificate(peer_certificate(proxy.host, proxy.port))
    key = cert.public_key()
    assert isinstance(key, ec.EllipticCurvePublicKey) and key.curve.name == "secp256r1"
    san = cert.extensions.get_extension_for_class(x509.SubjectAlternativeName).value
    assert san.get_values_for_type(x509.DNSName) == ["localhost"]
    assert sorted(str(ip) for ip in san.get_values_for_type(x509.IPAddress)) == [
        "127.0.0.1",
        "::1",
    ]
    [line] = [x for x in proxy.log_text().splitlines() if "at=client_tls " in x]
    assert "mode=allow" in line and "cert=generated" in line and " ms=" in line, line


def test_certificate_is_made_after_listening_and_first_tls_client_waits(
    proxy_factory: ProxyFactory,
) -> None:
    """The generated certificate is not part of the time to ready: the proxy accepts first,
    and an app's SSLRequest that comes before the certificate waits for it."""
    proxy = proxy_factory()  # returns as soon as the port accepts
    with psycopg.connect(proxy.dsn(sslmode="require"), connect_timeout=20) as conn:
        assert conn.pgconn.ssl_in_use
        assert conn.execute("select 1").fetchone() == (1,)
    lines = proxy.log_text().splitlines()
    listening = next(i for i, x in enumerate(lines) if "at=listening " in x)
    made = next(i for i, x in enumerate(lines) if "at=client_tls " in x)
    assert listening < made, lines


def test_gssencrequest_still_refused(proxy: ProxyProcess) -> None:
    with socket.create_connection((proxy.host, proxy.port), 10) as sock:
        sock.sendall(struct.pack("!ii", 8, m.GSSENC_REQUEST_CODE))
        assert sock.recv(1) == b"N"
    # libpq's gssencmode=prefer (its default where GSSAPI is built in) then asks for TLS
    with psycopg.connect(proxy.dsn(sslmode="require", gssencmode="prefer")) as conn:
        assert conn.pgconn.ssl_in_use


def test_unix_socket_answers_n_as_postgresql(pg: PostgresServer, proxy: ProxyProcess) -> None:
    """PostgreSQL refuses TLS on a Unix socket ("N"); libpq does not even ask there, so
    sslmode=require over the socket connects in clear against PostgreSQL and the proxy alike."""
    for directory, port in ((pg.socket_dir, pg.port), (proxy.socket_dir, proxy.port)):
        with socket.socket(socket.AF_UNIX) as sock:
            sock.settimeout(10)
            sock.connect(str(Path(directory) / f".s.PGSQL.{port}"))
            sock.sendall(m.ssl_request())
            assert sock.recv(1) == b"N", directory
    dsn = proxy.dsn(sslmode="require") + f" host={proxy.socket_dir}"
    with psycopg.connect(dsn) as conn:
        assert conn.execute("select 1").fetchone() == (1,)
        assert not conn.pgconn.ssl_in_use


def test_two_workers_serve_one_certificate(proxy_factory: ProxyFactory) -> None:
    """Worker 0 makes the certificate; the other worker gets it with its configuration."""
    proxy = proxy_factory(SIDECAR_WORKERS="2")
    seen_workers: set[int] = set()
    certs: set[bytes] = set()

    def both_workers_seen() -> bool:
        with psycopg.connect(proxy.dsn(sslmode="require")) as conn:
            assert conn.execute("select 1").fetchone() == (1,)
            assert conn.pgconn.ssl_in_use
            seen_workers.add(conn.info.backend_pid % 2)  # the pid names its worker
        certs.add(peer_certificate(proxy.host, proxy.port))
        return seen_workers == {0, 1}

    poll_until(both_workers_seen, timeout=60, what="a TLS client on each worker")
    assert len(certs) == 1


# --- SIDECAR_CLIENT_TLS=require / off ------------------------------------------------------------


def test_require_refuses_plaintext_as_a_hostssl_line(proxy_factory: ProxyFactory) -> None:
    proxy = proxy_factory(SIDECAR_CLIENT_TLS="require")
    # PostgreSQL's words when only hostssl lines would match (checked against PostgreSQL 15),
    # right after the startup packet
    assert plaintext_refusal(proxy) == {
        "S": "FATAL",
        "V": "FATAL",
        "C": "28000",
        "M": 'no pg_hba.conf entry for host "127.0.0.1", user "app", database "appdb",'
        " no encryption",
    }
    with pytest.raises(psycopg.OperationalError, match=r"no pg_hba\.conf entry"):
        psycopg.connect(proxy.dsn(sslmode="disable"))
    with psycopg.connect(proxy.dsn(sslmode="prefer")) as conn:
        assert conn.pgconn.ssl_in_use
    # as a `local` line: the Unix socket (no TLS there, as PostgreSQL) is not refused
    with psycopg.connect(proxy.dsn() + f" host={proxy.socket_dir}") as conn:
        assert conn.execute("select 1").fetchone() == (1,)
    assert "connection without TLS refused (SIDECAR_CLIENT_TLS=require)" in proxy.log_text()


def test_off_answers_n(proxy_factory: ProxyFactory) -> None:
    proxy = proxy_factory(SIDECAR_CLIENT_TLS="off")
    res = psql(proxy, "sslmode=require", "select 1")
    assert res.returncode != 0
    assert "server does not support SSL, but SSL was required" in res.stderr, res.stderr
    with psycopg.connect(proxy.dsn(sslmode="prefer")) as conn:
        assert not conn.pgconn.ssl_in_use
    assert "at=client_tls" not in proxy.log_text()


def test_pgbouncer_client_tls_sslmode_maps_onto_it(proxy_factory: ProxyFactory) -> None:
    proxy = proxy_factory(PGBOUNCER_CLIENT_TLS_SSLMODE="verify-full")
    assert plaintext_refusal(proxy)["C"] == "28000"


# --- the user's own certificate; verify-full -----------------------------------------------


def test_users_certificate_pair_is_served_and_verify_full_works(
    pg: PostgresServer, proxy_factory: ProxyFactory, tmp_path: Path
) -> None:
    cert, key = pg.ca.issue(tmp_path, "sidecar", "DNS:localhost,IP:127.0.0.1")
    proxy = proxy_factory(SIDECAR_CLIENT_TLS_CERT=str(cert), SIDECAR_CLIENT_TLS_KEY=str(key))
    verified = ssl.create_default_context(cafile=str(pg.ca_file))
    served = peer_certificate(proxy.host, proxy.port, verified)
    assert served == ssl.PEM_cert_to_DER_cert(cert.read_text())
    for host in ("localhost", "127.0.0.1"):
        dsn = proxy.dsn(sslmode="verify-full", sslrootcert=str(pg.ca_file)).replace(
            "host=127.0.0.1", f"host={host}"
        )
        with psycopg.connect(dsn) as conn:
            assert conn.pgconn.ssl_in_use
    assert f"cert={cert}" in proxy.log_text()


def test_verify_full_against_the_generated_certificate_is_a_clear_error(
    pg: PostgresServer, proxy: ProxyProcess
) -> None:
    """An app that verifies the server cannot trust a certificate made at start: its driver
    says so (docs: give SIDECAR_CLIENT_TLS_CERT/KEY it trusts, or drop the parameter)."""
    res = psql(proxy, f"sslmode=verify-full sslrootcert={pg.ca_file}", "select 1")
    assert res.returncode != 0
    assert "certificate verify failed" in res.stderr, res.stderr
    with pytest.raises(psycopg.OperationalError, match="certificate verify failed"):
        psycopg.connect(proxy.dsn(sslmode="verify-full", sslrootcert=str(pg.ca_file)))
    # and the sidecar's log says why, for whoever reads it rather than the app's
    poll_until(
        lambda: 'reason="TLS handshake failed: TLSV1_ALERT_UNKNOWN_CA"' in proxy.log_text(),
        what="the handshake failure logged",
    )


@pytest.mark.parametrize(
    ("env", "message"),
    [
        ({"SIDECAR_CLIENT_TLS": "on"}, "SIDECAR_CLIENT_TLS must be one of allow, off, require"),
        ({"SIDECAR_CLIENT_TLS_CERT": "/nonexistent.crt"}, "SIDECAR_CLIENT_TLS_KEY is not"),
        (
            {"SIDECAR_CLIENT_TLS_CERT": "/nonexistent.crt", "SIDECAR_CLIENT_TLS_KEY": "/x.key"},
            "SIDECAR_CLIENT_TLS_CERT '/nonexistent.crt' is not a file",
        ),
        ({"PGBOUNCER_CLIENT_TLS_SSLMODE": "yes"}, "PGBOUNCER_CLIENT_TLS_SSLMODE must be one of"),
    ],
)
def test_config_errors_stop_the_start(
    pg: PostgresServer, env: dict[str, str], message: str
) -> None:
    full = {k: v for k, v in os.environ.items() if not k.startswith(("SIDECAR_", "PGBOUNCER_"))}
    res = subprocess.run(
        [sys.executable, "-m", "sidecar", f"appdb={pg.url()}"],
        env={**full, **env, "SIDECAR_PORT": "1"},
        capture_output=True,
        text=True,
        timeout=60,
    )
    assert res.returncode == 2, res.stdout + res.stderr
    assert message in res.stdout + res.stderr


def test_a_mismatched_pair_is_a_config_error(pg: PostgresServer, tmp_path: Path) -> None:
    cert, _ = pg.ca.issue(tmp_path, "one", "DNS:localhost")
    _, other_key = pg.ca.issue(tmp_path, "two", "DNS:localhost")
    with pytest.raises(ConfigError, match="do not load as a PEM certificate and its private key"):
        load_settings(
            {"SIDECAR_CLIENT_TLS_CERT": str(cert), "SIDECAR_CLIENT_TLS_KEY": str(other_key)}
        )


def test_shutdown_mid_handshake_sends_nothing_in_clear(proxy_factory: ProxyFactory) -> None:
    """A client still in its TLS handshake at shutdown is closed without a plaintext
    ErrorResponse thrown into the TLS stream it expects, and does not hold the exit for the
    drain's 25 s (only logged-in clients are waited for)."""
    proxy = proxy_factory()
    started = time.monotonic()
    with socket.create_connection((proxy.host, proxy.port), 10) as sock:
        sock.settimeout(20)
        sock.sendall(m.ssl_request())
        assert sock.recv(1) == b"S"
        proxy.proc.send_signal(signal.SIGTERM)
        rest = b""
        while chunk := sock.recv(4096):
            rest += chunk
    assert rest == b"", rest
    assert proxy.proc.wait(20) == 0
    assert time.monotonic() - started < 15


def test_cryptography_is_not_loaded_into_the_proxy(proxy: ProxyProcess) -> None:
    """The generated certificate is made by a child Python: cryptography's Rust core (about
    11 MiB of RSS) never stays in the proxy, and the start-up line still reads the certificate."""
    assert proxy.proc is not None
    maps = Path(f"/proc/{proxy.proc.pid}/maps").read_text()
    assert "cryptography" not in maps
    with psycopg.connect(proxy.dsn(sslmode="require")) as conn:
        assert conn.pgconn.ssl_in_use
    assert "cryptography" not in Path(f"/proc/{proxy.proc.pid}/maps").read_text()
    [line] = [x for x in proxy.log_text().splitlines() if "at=client_tls " in x]
    expiry = x509.load_der_x509_certificate(peer_certificate(proxy.host, proxy.port))
    not_after = expiry.not_valid_after_utc.date().isoformat()
    assert f'subject="CN=pg-sidecar (localhost)" not_after={not_after}' in line, line
