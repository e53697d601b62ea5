"""Real processes for the integration tests: a PostgreSQL 15 server, test CAs, the proxy.

Everything here runs real binaries on loopback only. conftest.py wraps these classes in
fixtures; tests import the constants and helpers directly.
"""

from __future__ import annotations

import contextlib
import os
import shlex
import shutil
import signal
import socket
import subprocess
import sys
import tempfile
import threading
import time
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any, TypeVar
from urllib.parse import quote, urlencode

import psycopg
from psycopg import sql
from psycopg.conninfo import make_conninfo

HOST = "127.0.0.1"
SUPERUSER = "postgres"
APP_PASSWORD = "s3cr@t:/%+pw"
MD5_PASSWORD = "md5-p@ss"
PW_PASSWORD = "plain-p@ss"
#: The password of each login role the `pg` fixture creates.
PASSWORDS = {"app": APP_PASSWORD, "md5user": MD5_PASSWORD, "pwuser": PW_PASSWORD}

REPO_ROOT = Path(__file__).resolve().parent.parent
#: Command that starts the proxy; SIDECAR_TEST_PROXY (shell words) replaces it, e.g. to run
#: the same suite against another pooler behind a wrapper script.
PROXY_COMMAND_ENV = "SIDECAR_TEST_PROXY"

T = TypeVar("T")


def pg_bin_dir() -> Path:
    """Where the PostgreSQL server binaries live (PG_BIN_DIR overrides)."""
    override = os.environ.get("PG_BIN_DIR")
    if override:
        return Path(override)
    default = Path("/usr/lib/postgresql/15/bin")
    if (default / "initdb").exists():
        return default
    pg_config = shutil.which("pg_config")
    if pg_config:
        out = subprocess.run([pg_config, "--bindir"], capture_output=True, text=True, check=True)
        return Path(out.stdout.strip())
    return default


def free_port() -> int:
    """A TCP port nobody listens on right now (the kernel's choice, so never 5432)."""
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as s:
        s.bind((HOST, 0))
        return int(s.getsockname()[1])


def short_tempdir(prefix: str) -> Path:
    """A fresh directory directly under /tmp: unix socket paths must stay under ~100 chars."""
    return Path(tempfile.mkdtemp(prefix=prefix, dir="/tmp"))


def poll_until(
    check: Callable[[], T | None],
    *,
    timeout: float = 10.0,
    interval: float = 0.02,
    what: str = "condition",
) -> T:
    """Call `check` until it returns something truthy; fail after `timeout` seconds."""
    deadline = time.monotonic() + timeout
    while True:
        result = check()
        if result:
            return result
        if time.monotonic() > deadline:
            raise AssertionError(f"timed out after {timeout}s waiting for {what}")
        time.sleep(interval)


def _run(cmd: list[str | Path], **kwargs: Any) -> subprocess.CompletedProcess[str]:
    """Run a command; on failure raise with its output, which CalledProcessError hides."""
    proc = subprocess.run(
        [str(c) for c in cmd],
        stdin=subprocess.DEVNULL,
        capture_output=True,
        text=True,
        check=False,
        **kwargs,
    )
    if proc.returncode != 0:
        raise RuntimeError(
            f"{shlex.join(str(c) for c in cmd)} exited {proc.returncode}\n"
            f"stdout:\n{proc.stdout}\nstderr:\n{proc.stderr}"
        )
    return proc


# --- certificates -------------------------------------------------------------------------

_EC_KEY = ["-newkey", "ec", "-pkeyopt", "ec_paramgen_curve:prime256v1", "-nodes"]


@dataclass(frozen=True)
class CertAuthority:
    """A throwaway CA made with the openssl CLI."""

    cert: Path
    key: Path

    def issue(self, directory: Path, name: str, san: str) -> tuple[Path, Path]:
        """Sign a server certificate (cert, key) whose subjectAltName is `san`."""
        key = directory / f"{name}.key"
        csr = directory / f"{name}.csr"
        cert = directory / f"{name}.crt"
        ext = directory / f"{name}.ext"
        ext.write_text(
            f"subjectAltName={san}\n"
            "basicConstraints=critical,CA:FALSE\n"
            "keyUsage=critical,digitalSignature,keyEncipherment\n"
            "extendedKeyUsage=serverAuth\n"
            "subjectKeyIdentifier=hash\n"
            "authorityKeyIdentifier=keyid,issuer\n"
        )
        _run(
            [
                "openssl",
                "req",
                "-new",
                *_EC_KEY,
                "-keyout",
                key,
                "-out",
                csr,
                "-subj",
                "/CN=localhost",
            ]
        )
        _run(
            [
                "openssl", "x509", "-req", "-in", csr, "-CA", self.cert, "-CAkey", self.key,
                "-set_serial", str(int.from_bytes(os.urandom(8), "big")),
                "-days", "30", "-extfile", ext, "-out", cert,
            ]
        )  # fmt: skip
        csr.unlink()
        ext.unlink()
        key.chmod(0o600)
        return cert, key


def make_ca(directory: Path, common_name: str) -> CertAuthority:
    """Create a self-signed CA certificate and key in `directory`."""
    key = directory / "ca.key"
    cert = directory / "ca.crt"
    _run(
        [
            "openssl", "req", "-x509", "-new", *_EC_KEY, "-keyout", key, "-out", cert,
            "-days", "30", "-subj", f"/CN={common_name}",
            "-addext", "basicConstraints=critical,CA:TRUE",
            "-addext", "keyUsage=critical,keyCertSign,cRLSign",
        ]
    )  # fmt: skip
    key.chmod(0o600)
    cert.chmod(0o644)
    return CertAuthority(cert=cert, key=key)


# --- PostgreSQL -----------------------------------------------------------------------------


def server_os_user() -> tuple[int, int] | None:
    """(uid, gid) to run PostgreSQL servers and tools as, or None to run them as ourselves.

    PostgreSQL refuses to run as root, so as root we use the `postgres` system user.
    """
    if os.geteuid() != 0:
        return None
    import pwd

    entry = pwd.getpwnam("postgres")
    return entry.pw_uid, entry.pw_gid


def chown_to_server(path: Path, recursive: bool = False) -> None:
    """Give `path` (and, if `recursive`, everything below it) to the server's OS user."""
    ids = server_os_user()
    if ids is None:
        return
    os.chown(path, *ids)
    if recursive:
        for root, dirs, files in os.walk(path):
            for name in dirs + files:
                os.chown(os.path.join(root, name), *ids)


def run_as_server(cmd: list[str | Path], cwd: Path) -> subprocess.CompletedProcess[str]:
    """Run a PostgreSQL tool (initdb, pg_ctl, pg_basebackup) as the server's OS user, in `cwd`
    with a minimal environment; raise with its output on failure."""
    env = {"PATH": os.environ.get("PATH", "/usr/bin:/bin"), "LC_ALL": "C", "LANG": "C"}
    kwargs: dict[str, Any] = {"env": env, "cwd": cwd}
    ids = server_os_user()
    if ids is not None:
        kwargs.update(user=ids[0], group=ids[1], extra_groups=[])
    return _run(cmd, **kwargs)


class TcpAddress:
    """url() and dsn() for clients of a server listening on self.host:self.port over TCP."""

    host: str
    port: int
    #: sslmode of dsn() unless the caller gives one
    sslmode = "disable"
    #: whether url() says sslmode too (else the URL leaves it to the client's default)
    url_sslmode = False

    def url(
        self,
        user: str = "app",
        password: str | None = None,
        dbname: str = "appdb",
        *,
        host: str | None = None,
        port: int | None = None,
        **query: str,
    ) -> str:
        """A postgres:// URL; user and password (default: the user's) percent-encoded."""
        if self.url_sslmode:
            query.setdefault("sslmode", self.sslmode)
        return postgres_url(host or self.host, port or self.port, user, password, dbname, query)

    def dsn(
        self,
        user: str = "app",
        password: str | None = None,
        dbname: str = "appdb",
        **params: Any,
    ) -> str:
        """A libpq keyword DSN (`sslmode` and connect_timeout=10 unless given)."""
        return libpq_dsn(self.host, self.port, user, password, dbname, self.sslmode, params)


class BackendCounts:
    """count_backends / wait_backends for a server class with a superuser `query` method."""

    def query(self, sql_text: str, *params: Any, dbname: str = "appdb") -> list[tuple[Any, ...]]:
        raise NotImplementedError

    def count_backends(self, user: str = "app", dbname: str = "appdb") -> int:
        """How many client backends `user` has on `dbname` right now."""
        rows = self.query(
            "SELECT count(*) FROM pg_stat_activity"
            " WHERE backend_type = 'client backend' AND usename = %s AND datname = %s",
            user,
            dbname,
            dbname="postgres",
        )
        return int(rows[0][0])

    def wait_backends(
        self, expected: int = 0, user: str = "app", dbname: str = "appdb", timeout: float = 10.0
    ) -> None:
        """Wait until `user` has exactly `expected` backends on `dbname`."""
        poll_until(
            lambda: self.count_backends(user, dbname) == expected,
            timeout=timeout,
            what=f"{expected} backends of {user} on {dbname} of {self!r}",
        )


class PostgresServer(BackendCounts, TcpAddress):
    """A private PostgreSQL cluster on 127.0.0.1 and its own unix socket directory.

    Roles: `postgres` (superuser, trusted over the unix socket, replication included), `app`
    (SCRAM, owns `appdb`), `md5user` (md5 over TCP), `pwuser` (plain `password` over TCP).
    Attributes: host, port, socket_dir, ca_file, bin_dir, data_dir, log_file.
    """

    host = HOST

    def __init__(self, base: Path, port: int, bin_dir: Path, ca: CertAuthority) -> None:
        self.base = base
        self.port = port
        self.bin_dir = bin_dir
        self.ca = ca
        self.ca_file = ca.cert
        self.socket_dir = base
        self.data_dir = base / "data"
        self.log_file = base / "postgres.log"
        self._conns: dict[tuple[str, str], psycopg.Connection[tuple[Any, ...]]] = {}
        self._lock = threading.Lock()

    # lifecycle

    @classmethod
    def start(cls) -> PostgresServer:
        base = short_tempdir("pg")
        server: PostgresServer | None = None
        try:
            ca = make_ca(base, "pg-sidecar test CA")
            server = cls(base, free_port(), pg_bin_dir(), ca)
            server._initdb()
            server._pg_ctl("start", "-w", "-t", "60", "-l", server.log_file)
            server._create_roles()
        except BaseException:
            log = base / "postgres.log"
            if log.exists():
                sys.stderr.write(log.read_text(errors="replace"))
            with contextlib.suppress(Exception):
                if server is not None:  # as the server's OS user: pg_ctl refuses root
                    server._pg_ctl("stop", "-m", "immediate")
            shutil.rmtree(base, ignore_errors=True)
            raise
        return server

    def stop(self) -> None:
        with self._lock:
            for conn in self._conns.values():
                conn.close()
            self._conns.clear()
        try:
            self._pg_ctl("stop", "-m", "immediate")
        finally:
            shutil.rmtree(self.base, ignore_errors=True)

    def _pg_ctl(self, action: str, *args: str | Path) -> None:
        run_as_server([self.bin_dir / "pg_ctl", action, "-D", self.data_dir, *args], self.base)

    def _initdb(self) -> None:
        cert, key = self.ca.issue(self.base, "server", "DNS:localhost,IP:127.0.0.1")
        if server_os_user() is not None:
            chown_to_server(self.base, recursive=True)
            # the CA stays readable by us (root) only; the server never needs it
            os.chown(self.ca.key, 0, 0)
        run_as_server(
            [
                self.bin_dir / "initdb", "-D", self.data_dir, "-U", SUPERUSER,
                "--auth=trust", "--encoding=UTF8", "--locale=C", "--no-sync",
            ],
            self.base,
        )  # fmt: skip
        for path in (cert, key):
            shutil.move(path, self.data_dir / path.name)
        settings = {
            "listen_addresses": HOST,
            "port": str(self.port),
            "unix_socket_directories": str(self.socket_dir),
            "password_encryption": "scram-sha-256",
            "ssl": "on",
            "ssl_cert_file": "server.crt",
            "ssl_key_file": "server.key",
            "max_connections": "300",
            "fsync": "off",
            "synchronous_commit": "off",
            "full_page_writes": "off",
            "log_min_messages": "warning",
            "logging_collector": "off",
        }
        with (self.data_dir / "postgresql.conf").open("a") as conf:
            conf.write("\n# pg-sidecar test settings\n")
            for name, value in settings.items():
                conf.write(f"{name} = '{value}'\n")
        (self.data_dir / "pg_hba.conf").write_text(
            "local     all  all      trust\n"
            # pg_basebackup and streaming followers (the `all` database does not match these)
            "local     replication  all  trust\n"
            "host      all  md5user  127.0.0.1/32  md5\n"
            "host      all  pwuser   127.0.0.1/32  password\n"
            "hostssl   all  all      127.0.0.1/32  scram-sha-256\n"
            "hostnossl all  all      127.0.0.1/32  scram-sha-256\n"
        )

    def _create_roles(self) -> None:
        with psycopg.connect(self._superuser_conninfo("postgres"), autocommit=True) as conn:
            create = sql.SQL("CREATE ROLE {} LOGIN PASSWORD {}")
            conn.execute(create.format(sql.Identifier("app"), APP_PASSWORD))
            conn.execute("CREATE DATABASE appdb OWNER app")
            conn.execute("SET password_encryption = 'md5'")
            conn.execute(create.format(sql.Identifier("md5user"), MD5_PASSWORD))
            conn.execute("RESET password_encryption")
            conn.execute(create.format(sql.Identifier("pwuser"), PW_PASSWORD))
            conn.execute("GRANT CONNECT ON DATABASE appdb TO md5user, pwuser")

    # addresses

    def _superuser_conninfo(self, dbname: str, user: str = SUPERUSER) -> str:
        return make_conninfo(
            "", host=str(self.socket_dir), port=self.port, user=user, dbname=dbname
        )

    # queries as the superuser

    def query(
        self, sql_text: str, *params: Any, dbname: str = "appdb", user: str = SUPERUSER
    ) -> list[tuple[Any, ...]]:
        """Run one statement over the unix socket (trusted, autocommit); return its rows.

        Thread-safe; connections are kept per (user, dbname) and reopened once broken.
        """
        with self._lock:
            conn = self._conns.get((user, dbname))
            if conn is None or conn.closed:
                conn = psycopg.connect(self._superuser_conninfo(dbname, user), autocommit=True)
                self._conns[(user, dbname)] = conn
            cur = conn.execute(sql_text, params or None, prepare=False)
            return cur.fetchall() if cur.description is not None else []

    def create_table(self, columns: str = "id int PRIMARY KEY, val text") -> str:
        """Create a fresh table in appdb owned by `app`; return its name."""
        name = f"t_{os.urandom(4).hex()}"
        self.query(f"CREATE TABLE {name} ({columns})")
        self.query(f"ALTER TABLE {name} OWNER TO app")
        return name

    def backends(self, user: str = "app", dbname: str = "appdb") -> list[tuple[Any, ...]]:
        """(pid, state, query, ssl) of the client backends of `user` on `dbname`."""
        return self.query(
            "SELECT a.pid, a.state, a.query, s.ssl FROM pg_stat_activity a"
            " LEFT JOIN pg_stat_ssl s USING (pid)"
            " WHERE a.backend_type = 'client backend' AND a.usename = %s AND a.datname = %s",
            user,
            dbname,
            dbname="postgres",
        )

    def __repr__(self) -> str:
        return f"<PostgresServer {self.host}:{self.port} {self.base}>"


def _password(user: str, password: str | None) -> str | None:
    return PASSWORDS.get(user) if password is None else password


def libpq_dsn(
    host: str,
    port: int,
    user: str,
    password: str | None,
    dbname: str,
    sslmode: str,
    params: dict[str, Any],
) -> str:
    """A libpq keyword DSN over TCP; `sslmode` and connect_timeout=10 unless `params` set them;
    no password given means the one the `pg` fixture made for `user` (if any)."""
    params = {"sslmode": sslmode, "connect_timeout": 10, **params}
    return make_conninfo(
        "",
        host=host,
        port=port,
        user=user,
        password=_password(user, password),
        dbname=dbname,
        **params,
    )


def postgres_url(
    host: str, port: int, user: str, password: str | None, dbname: str, query: dict[str, Any]
) -> str:
    """A postgres:// URL, user and password percent-encoded; no password given means the one
    the `pg` fixture made for `user` (if any)."""
    password = _password(user, password)
    auth = quote(user, safe="")
    if password is not None:
        auth += ":" + quote(password, safe="")
    text = f"postgres://{auth}@{host}:{port}/{quote(dbname, safe='')}"
    if query:
        text += "?" + urlencode({k: str(v) for k, v in query.items()})
    return text


# --- the proxy ------------------------------------------------------------------------------


class ProxyProcess(TcpAddress):
    """One running `python -m sidecar` process, with its output in a log file."""

    host = HOST
    url_sslmode = True  # the proxy refuses TLS on loopback: say so in its URLs too

    def __init__(
        self,
        argv: list[str],
        env: dict[str, str],
        port: int,
        socket_dir: Path,
        log_path: Path,
    ) -> None:
        self.argv = argv
        self.env = env
        self.port = port
        self.socket_dir = socket_dir
        self.log_path = log_path
        with log_path.open("wb") as log:
            self.proc = subprocess.Popen(
                argv,
                env=env,
                cwd=REPO_ROOT,
                stdin=subprocess.DEVNULL,
                stdout=log,
                stderr=subprocess.STDOUT,
            )

    def log_text(self) -> str:
        return self.log_path.read_text(errors="replace")

    def show(self, what: str) -> list[dict[str, Any]]:
        """SHOW <what> on the admin console, as dicts."""
        with psycopg.connect(self.dsn(dbname="sidecar"), autocommit=True) as conn:
            cur = conn.execute(f"SHOW {what}", prepare=False)
            names = [d.name for d in cur.description or []]
            return [dict(zip(names, row, strict=True)) for row in cur.fetchall()]

    def wait_ready(self, timeout: float = 10.0) -> None:
        """Poll-connect to the TCP port until it accepts; fail early if the process dies."""
        deadline = time.monotonic() + timeout
        while True:
            if self.proc.poll() is not None:
                raise AssertionError(
                    f"proxy exited with {self.proc.returncode} before accepting connections;"
                    f" command: {shlex.join(self.argv)}\n--- output ---\n{self.log_text()}"
                )
            with contextlib.suppress(OSError), socket.create_connection((HOST, self.port), 0.5):
                return
            if time.monotonic() > deadline:
                raise AssertionError(
                    f"proxy did not accept on {HOST}:{self.port} within {timeout}s\n"
                    f"--- output ---\n{self.log_text()}"
                )
            time.sleep(0.02)

    def stop(self, timeout: float = 10.0) -> int:
        """SIGTERM, wait up to `timeout` seconds, then SIGKILL. Returns the exit status."""
        if self.proc.poll() is None:
            self.proc.send_signal(signal.SIGTERM)
            try:
                self.proc.wait(timeout)
            except subprocess.TimeoutExpired:
                self.proc.kill()
                self.proc.wait()
        return self.proc.returncode

    # client addresses (url and dsn: TcpAddress)

    def asyncpg_params(
        self,
        user: str = "app",
        password: str | None = None,
        dbname: str = "appdb",
        **kwargs: Any,
    ) -> dict[str, Any]:
        """Keyword arguments for asyncpg.connect() through the proxy."""
        params: dict[str, Any] = {
            "host": self.host,
            "port": self.port,
            "user": user,
            "password": _password(user, password),
            "database": dbname,
            "ssl": False,
            "statement_cache_size": 0,
            "timeout": 10,
        }
        params.update(kwargs)
        return params


class ProxyFactory:
    """Starts proxies for one test and stops them (checking their logs) at teardown."""

    def __init__(self, pg: PostgresServer, log_dir: Path) -> None:
        self.pg = pg
        self.log_dir = log_dir
        self.started: list[ProxyProcess] = []
        self._dirs: list[Path] = []

    def __call__(self, *databases: str, **env: str | int | None) -> ProxyProcess:
        """Start a proxy serving `databases` (NAME=URL; default appdb=<pg.url()>).

        Keyword arguments are environment overrides (SIDECAR_POOL_MODE="session", ...);
        None removes a variable.
        """
        if not databases:
            databases = (f"appdb={self.pg.url()}",)
        port = free_port()
        socket_dir = short_tempdir("sc")
        self._dirs.append(socket_dir)
        command = os.environ.get(PROXY_COMMAND_ENV)
        argv = [*(shlex.split(command) if command else [sys.executable, "-m", "sidecar"])]
        argv += databases
        # Inherited pooler settings would make results depend on the developer's shell.
        proc_env = {
            k: v for k, v in os.environ.items() if not k.startswith(("SIDECAR_", "PGBOUNCER_"))
        }
        if command:
            proc_env[PROXY_COMMAND_ENV] = command
        proc_env.update(
            SIDECAR_PORT=str(port),
            SIDECAR_SOCKET_DIR=str(socket_dir),
            SIDECAR_STATS_PERIOD="0",
            PYTHONUNBUFFERED="1",
        )
        for name, value in env.items():
            if value is None:
                proc_env.pop(name, None)
            else:
                proc_env[name] = str(value)
        log_path = self.log_dir / f"proxy-{len(self.started)}-{port}.log"
        proxy = ProxyProcess(argv, proc_env, port, socket_dir, log_path)
        self.started.append(proxy)
        proxy.wait_ready()
        return proxy

    def close(self) -> list[str]:
        """Stop every proxy; return one problem line per leaked password."""
        problems: list[str] = []
        for proxy in self.started:
            proxy.stop()
            text = proxy.log_text()
            if text:
                # shown by pytest only when the test fails
                print(f"--- proxy log {proxy.log_path} (exit {proxy.proc.returncode}) ---")
                print(text[-20000:])
            for user, password in PASSWORDS.items():
                for form in {password, quote(password, safe=""), quote(password)}:
                    if form in text:
                        problems.append(f"{user}'s password appears in {proxy.log_path}")
        for d in self._dirs:
            shutil.rmtree(d, ignore_errors=True)
        return problems


@contextlib.contextmanager
def killable(proc: subprocess.Popen[str]) -> Iterator[subprocess.Popen[str]]:
    """Make sure a helper subprocess is dead and reaped when the block ends."""
    try:
        yield proc
    finally:
        if proc.poll() is None:
            proc.kill()
        proc.wait()
        for stream in (proc.stdin, proc.stdout, proc.stderr):
            if stream is not None:
                stream.close()
