"""Security properties: where the proxy listens, where secrets never go, and upstream TLS.

- It listens on 127.0.0.1 and its Unix socket (mode 0600) only, whatever PORT says.
- No password (raw or percent-encoded), SCRAM secret or URL with a password appears in a log
  line, an error a client gets, the admin console or an exception's text. The suite-wide log
  sweep is in test_zz_no_secrets.py, which runs last.
- Upstream TLS is `require` by default and never falls back to cleartext; `verify-full` checks
  the certificate's names against the host the URL names.
"""

from __future__ import annotations

import contextlib
import os
import socket
import stat
import threading
from collections.abc import Iterator
from urllib.parse import quote

import psycopg
import pytest
from pgfixtures import (
    APP_PASSWORD,
    PASSWORDS,
    CertAuthority,
    PostgresServer,
    ProxyFactory,
    ProxyProcess,
    free_port,
)
from tcpproxy import TCP_LISTEN, PgWire, Relay, errors, rows, tcp_sockets

from sidecar.config import ConfigError, Settings, parse_url
from sidecar.protocol import messages as m
from sidecar.protocol.auth import ScramClient, ScramSecret

#: A role of our own, with a password full of characters URLs must encode.
SECRET_USER = "sec_user"
SECRET_PASSWORD = "Zq9#s3cr/t?k@y:%&"
#: Passwords this file puts in URLs; test_zz_no_secrets.py sweeps every log for them too.
EXTRA_SECRETS = (SECRET_PASSWORD, "wr0ng-Upstream/pw#")


def secret_forms(password: str) -> set[str]:
    """The ways a password can show up: as is, and percent-encoded."""
    return {password, quote(password, safe=""), quote(password)}


def assert_no_secret(text: str, where: str) -> None:
    for password in (*PASSWORDS.values(), *EXTRA_SECRETS):
        for form in secret_forms(password):
            assert form not in text, f"a password ({form!r}) appears in {where}"
    assert "SCRAM-SHA-256$" not in text, f"a SCRAM verifier appears in {where}"


@pytest.fixture(scope="module")
def secret_role(pg: PostgresServer) -> str:
    with contextlib.suppress(psycopg.errors.DuplicateObject):
        pg.query(f"CREATE ROLE {SECRET_USER} LOGIN PASSWORD '{SECRET_PASSWORD}'")
    pg.query(f"GRANT CONNECT ON DATABASE appdb TO {SECRET_USER}")
    return SECRET_USER


# --- listening ------------------------------------------------------------------------------


def test_listens_on_loopback_and_its_unix_socket_only(proxy_factory: ProxyFactory) -> None:
    heroku_port = free_port()
    # PORT is the web dyno's public port: never ours. Nor are made-up listen settings.
    proxy = proxy_factory(
        PORT=str(heroku_port),
        SIDECAR_LISTEN_ADDR="0.0.0.0",
        PGBOUNCER_LISTEN_ADDR="0.0.0.0",
    )
    mine = tcp_sockets(proxy.proc.pid)
    listening = [s for s in mine if s.state == TCP_LISTEN]
    assert [(s.family, s.local) for s in listening] == [
        (socket.AF_INET, ("127.0.0.1", proxy.port))
    ], listening
    everyone = [s for s in tcp_sockets() if s.state == TCP_LISTEN]
    assert not [s for s in everyone if s.local[1] == heroku_port], "something listens on PORT"
    with pytest.raises(ConnectionRefusedError), socket.socket() as sock:
        sock.connect(("127.0.0.2", proxy.port))  # another loopback address: nobody there

    path = os.path.join(proxy.socket_dir, f".s.PGSQL.{proxy.port}")
    mode = os.stat(path).st_mode
    assert stat.S_ISSOCK(mode) and stat.S_IMODE(mode) == 0o600, oct(mode)
    with PgWire(socket.socket(socket.AF_UNIX)) as wire:
        wire.sock.connect(path)
        assert not errors(wire.login("app", APP_PASSWORD, "appdb"))


# --- secrets ----------------------------------------------------------------------------------


def test_no_secret_in_console_errors_or_log(
    pg: PostgresServer, proxy_factory: ProxyFactory, secret_role: str
) -> None:
    proxy = proxy_factory(
        f"appdb={pg.url()}",
        f"secdb={pg.url(secret_role, SECRET_PASSWORD)}",
        # the server rejects this password: the error travels to the log and the client
        f"baddb={pg.url('app', EXTRA_SECRETS[1])}",
        SIDECAR_QUERY_WAIT_TIMEOUT="5",
    )
    seen: list[str] = []
    with psycopg.connect(proxy.dsn(secret_role, SECRET_PASSWORD, dbname="secdb")) as conn:
        assert conn.execute("SELECT current_user").fetchone() == (secret_role,)
    with PgWire.connect(proxy.host, proxy.port) as wire:
        answer = wire.login("app", EXTRA_SECRETS[1], "baddb", timeout=15)
        seen.append(repr(errors(answer)))
    assert [e["C"] for e in errors(answer)] == ["28P01"], answer
    for wrong in ("nope", SECRET_PASSWORD):  # a client's wrong password is not echoed either
        with PgWire.connect(proxy.host, proxy.port) as wire:
            seen.append(repr(wire.login(secret_role, wrong + "x", "secdb")))
    # every console table, as each user
    for user, password in (("app", APP_PASSWORD), (secret_role, SECRET_PASSWORD)):
        with psycopg.connect(proxy.dsn(user, password, dbname="sidecar"), autocommit=True) as c:
            help_rows = c.execute("SHOW HELP", prepare=False).fetchall()
            commands = {str(r[0]).split(" |")[0] for r in help_rows if str(r[0]).startswith("SHOW")}
            assert len(commands) >= 10, commands
            for command in sorted(commands):
                seen.append(repr(c.execute(command, prepare=False).fetchall()))
    text = "\n".join(seen)
    assert secret_role in text  # the tables were there to look at
    assert_no_secret(text, "the admin console or a client's error")
    assert_no_secret(proxy.log_text(), "the proxy log")


def test_no_secret_in_reprs_and_exceptions() -> None:
    url = f"postgres://app:{quote(SECRET_PASSWORD, safe='')}@db.example:5432/appdb"
    upstream = parse_url(url)
    assert upstream.password == SECRET_PASSWORD
    assert_no_secret(repr(upstream), "repr(Upstream)")
    assert_no_secret(upstream.redacted(), "Upstream.redacted()")
    assert_no_secret(repr(ScramClient(SECRET_PASSWORD)), "repr(ScramClient)")
    assert_no_secret(repr(ScramSecret.from_password(SECRET_PASSWORD, iterations=16)), "secret")
    for bad in (url.replace("postgres:", "mysql:"), url.replace("db.example", "")):
        with pytest.raises(ConfigError) as excinfo:
            parse_url(bad, "DATABASE_URL")
        assert_no_secret(str(excinfo.value), "a config error")


@pytest.mark.parametrize("password", ["s3cr3t/x", "s3cr3t?x", "s3cr3t#x"])
def test_config_error_does_not_quote_the_password(
    proxy_factory: ProxyFactory, password: str
) -> None:
    url = f"postgres://app:{password}@127.0.0.1:5432/appdb"  # not percent-encoded
    with pytest.raises(ConfigError) as excinfo:
        parse_url(url, "DATABASE_URL")
    message = str(excinfo.value)
    assert "DATABASE_URL" in message
    assert "s3cr3t" not in message, message
    # and so the proxy's log at start
    with pytest.raises(AssertionError, match="exited with 2"):
        proxy_factory(f"appdb={url}")
    assert "s3cr3t" not in proxy_factory.started[-1].log_text()


# --- upstream TLS -----------------------------------------------------------------------------


class NoTlsServer:
    """A fake PostgreSQL that answers SSLRequest with "N" and records what comes next."""

    def __init__(self) -> None:
        self.listener = socket.create_server(("127.0.0.1", 0))
        self.port = int(self.listener.getsockname()[1])
        self.received: list[bytes] = []
        self.ssl_requests = 0
        self._thread = threading.Thread(target=self._serve, daemon=True)
        self._thread.start()

    def _serve(self) -> None:
        with contextlib.suppress(OSError):
            while True:
                conn, _ = self.listener.accept()
                with conn:
                    conn.settimeout(2)
                    with contextlib.suppress(OSError):
                        if conn.recv(8) == m.ssl_request():
                            self.ssl_requests += 1
                            conn.sendall(b"N")
                        while chunk := conn.recv(4096):
                            self.received.append(chunk)

    def close(self) -> None:
        self.listener.close()
        self._thread.join(5)


@pytest.fixture
def no_tls_server() -> Iterator[NoTlsServer]:
    server = NoTlsServer()
    try:
        yield server
    finally:
        server.close()


def test_tls_required_by_default_and_never_downgraded(
    proxy_factory: ProxyFactory, no_tls_server: NoTlsServer
) -> None:
    assert Settings().server_tls_sslmode == "require"
    url = f"postgres://app:{quote(APP_PASSWORD, safe='')}@127.0.0.1:{no_tls_server.port}/appdb"
    proxy = proxy_factory(f"appdb={url}")
    with PgWire.connect(proxy.host, proxy.port) as wire:
        answer = wire.login("app", APP_PASSWORD, "appdb", timeout=15)
    [error] = errors(answer)
    assert error["C"] == "08001" and "SSL was required" in error["M"], error
    assert no_tls_server.ssl_requests >= 1
    # not a byte after the refusal: no startup packet, no user name, no password
    assert b"".join(no_tls_server.received) == b""


def _tls_login(proxy: ProxyProcess) -> dict[str, str] | None:
    """Log in and query; None on success, else the error the proxy gave."""
    with PgWire.connect(proxy.host, proxy.port) as wire:
        answer = wire.login("app", APP_PASSWORD, "appdb", timeout=20)
        if errors(answer):
            return errors(answer)[0]
        assert rows(wire.query("SELECT ssl FROM pg_stat_ssl WHERE pid = pg_backend_pid()")) == [
            ["t"]
        ]
        return None


@pytest.mark.parametrize("host", ["localhost", "127.0.0.1"])
def test_verify_full_accepts_the_names_in_the_certificate(
    pg: PostgresServer, proxy_factory: ProxyFactory, host: str
) -> None:
    # the test CA's server certificate: subjectAltName DNS:localhost, IP:127.0.0.1
    proxy = proxy_factory(
        f"appdb={pg.url(host=host)}",
        SIDECAR_SERVER_TLS_SSLMODE="verify-full",
        SIDECAR_SERVER_TLS_CA_FILE=str(pg.ca_file),
    )
    assert _tls_login(proxy) is None


@pytest.fixture
def other_loopback(pg: PostgresServer) -> Iterator[Relay]:
    """The same server reached at 127.0.0.2, an address its certificate does not name."""
    with Relay((pg.host, pg.port), listen_host="127.0.0.2") as relay:
        yield relay


@pytest.mark.parametrize(
    ("sslmode", "ok"), [("verify-full", False), ("verify-ca", True), ("require", True)]
)
def test_verify_full_rejects_a_host_not_in_the_certificate(
    pg: PostgresServer, proxy_factory: ProxyFactory, other_loopback: Relay, sslmode: str, ok: bool
) -> None:
    proxy = proxy_factory(
        f"appdb={pg.url(host='127.0.0.2', port=other_loopback.port)}",
        SIDECAR_SERVER_TLS_SSLMODE=sslmode,
        SIDECAR_SERVER_TLS_CA_FILE=str(pg.ca_file),
    )
    error = _tls_login(proxy)
    if ok:
        assert error is None
        return
    assert error is not None and error["C"] == "08001", error
    assert "CERTIFICATE_VERIFY_FAILED" in error["M"], error
    assert "IP address mismatch" in error["M"], error  # ssl's verify_message: the why
    log = proxy.log_text()
    assert "retryable=false" in log  # a certificate problem is not retried in a loop


def test_verify_ca_rejects_another_ca(
    pg: PostgresServer, proxy_factory: ProxyFactory, other_ca: CertAuthority
) -> None:
    proxy = proxy_factory(
        f"appdb={pg.url()}",
        SIDECAR_SERVER_TLS_SSLMODE="verify-ca",
        SIDECAR_SERVER_TLS_CA_FILE=str(other_ca.cert),
    )
    error = _tls_login(proxy)
    assert error is not None and error["C"] == "08001", error
    assert "CERTIFICATE_VERIFY_FAILED" in error["M"], error
