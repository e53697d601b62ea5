"""The admin console (`sidecar` / `pgbouncer` virtual database) through real clients.

psql, psycopg 3 (extended protocol, prepared, binary, simple protocol) and asyncpg talk to a
real proxy serving a real PostgreSQL; the figures the console shows are checked against what
the test did and against pg_stat_activity. The sans-IO pieces (statement splitting, result
encoding, the extended protocol's error rule) are also tested on plain bytes.
"""

from __future__ import annotations

import dataclasses
import os
import struct
import subprocess
import threading
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import asyncpg
import psycopg
import psycopg.errors
import pytest
from pgfixtures import APP_PASSWORD, PostgresServer, ProxyFactory, ProxyProcess, poll_until
from psycopg import ClientCursor, pq
from psycopg.conninfo import make_conninfo
from psycopg.rows import dict_row

from sidecar import __version__
from sidecar.config import Settings
from sidecar.control.commands import AdminError, split_statements, tokenize
from sidecar.control.console import AdminSession
from sidecar.dataplane.client import ClientState
from sidecar.protocol import messages as m
from sidecar.protocol import rows as r

Row = dict[str, Any]

#: PgBouncer's SHOW CLIENTS and SHOW SERVERS have the same columns (one row per connection).
CONNECTION_COLUMNS = [
    "type",
    "user",
    "database",
    "state",
    "addr",
    "port",
    "local_addr",
    "local_port",
    "connect_time",
    "request_time",
    "wait",
    "wait_us",
    "close_needed",
    "ptr",
    "link",
    "remote_pid",
    "tls",
    "application_name",
]
#: SHOW STATS_TOTALS and SHOW STATS_AVERAGES: SHOW STATS' two halves, under the same short names.
STATS_HALF_COLUMNS = [
    "database",
    "xact_count",
    "query_count",
    "bytes_received",
    "bytes_sent",
    "xact_time",
    "query_time",
    "wait_time",
]
#: Columns a PgBouncer dashboard reads; the console must have each (in this order).
PGBOUNCER_COLUMNS = {
    "stats": [
        "database",
        "total_xact_count",
        "total_query_count",
        "total_received",
        "total_sent",
        "total_xact_time",
        "total_query_time",
        "total_wait_time",
        "avg_xact_count",
        "avg_query_count",
        "avg_recv",
        "avg_sent",
        "avg_xact_time",
        "avg_query_time",
        "avg_wait_time",
    ],
    "pools": [
        "database",
        "user",
        "cl_active",
        "cl_waiting",
        "sv_active",
        "sv_idle",
        "sv_used",
        "sv_tested",
        "sv_login",
        "maxwait",
        "maxwait_us",
        "pool_mode",
    ],
    "clients": CONNECTION_COLUMNS,
    "servers": CONNECTION_COLUMNS,
    "databases": [
        "name",
        "host",
        "port",
        "database",
        "force_user",
        "pool_size",
        "min_pool_size",
        "reserve_pool",
        "pool_mode",
        "max_connections",
        "current_connections",
        "paused",
        "disabled",
    ],
    "config": ["key", "value", "default", "changeable"],
    "version": ["version"],
    "instances": ["pool", "addr", "port", "state", "servers", "cap", "last_seen", "last_error"],
    "lists": ["list", "items"],
    "users": ["name", "pool_mode"],
    "totals": ["name", "value"],
    "stats_totals": STATS_HALF_COLUMNS,
    "stats_averages": STATS_HALF_COLUMNS,
    "help": ["command", "description"],
}
#: Our own columns, after PgBouncer's.
OWN_COLUMNS = {
    "stats": ["total_errors"],
    "pools": ["sv_max", "cl_pinned"],
    "clients": ["client_pid"],
    "servers": ["pending"],
    "databases": ["current_client_connections", "server_lifetime"],
    "instances": [
        "last_seen_age",
        "failures",
        "connect_ms",
        "role",
        "lag_s",
        # the connection budget (test_budget_live.py)
        "budget",
        "soft_cap",
        "instance_total",
    ],
}


def client_env(**extra: str) -> dict[str, str]:
    """The environment for psql, without the caller's libpq settings."""
    env = {k: v for k, v in os.environ.items() if not k.startswith("PG")}
    env.update(extra)
    return env


def console(proxy: ProxyProcess, dbname: str = "sidecar", **kwargs: Any) -> psycopg.Connection[Row]:
    """A psycopg connection to the admin console (autocommit, rows as dicts)."""
    return psycopg.connect(
        proxy.dsn(dbname=dbname), autocommit=True, row_factory=dict_row, **kwargs
    )


def show(conn: psycopg.Connection[Row], what: str) -> list[Row]:
    return conn.execute(f"SHOW {what}").fetchall()


def columns_of(conn: psycopg.Connection[Row], sql: str) -> list[str]:
    cur = conn.execute(sql)
    assert cur.description is not None
    return [c.name for c in cur.description]


def only(rows: list[Row], **match: Any) -> Row:
    found = [row for row in rows if all(row[k] == v for k, v in match.items())]
    assert len(found) == 1, f"expected one row with {match}, got {found} of {rows}"
    return found[0]


def run_in_thread(fn: Callable[[], Any]) -> tuple[threading.Thread, dict[str, Any]]:
    """Start `fn` in a thread; the dict gets its "result" or "error" when it ends."""
    out: dict[str, Any] = {}

    def target() -> None:
        try:
            out["result"] = fn()
        except BaseException as exc:
            out["error"] = exc

    thread = threading.Thread(target=target, daemon=True)
    thread.start()
    return thread, out


def joined(thread: threading.Thread, out: dict[str, Any], timeout: float = 10.0) -> Any:
    thread.join(timeout)
    assert not thread.is_alive(), "the thread did not finish"
    if "error" in out:
        raise out["error"]
    return out.get("result")


# --- psql ---------------------------------------------------------------------------------


@pytest.mark.parametrize("dbname", ["sidecar", "pgbouncer"])
def test_psql(pg: PostgresServer, proxy: ProxyProcess, dbname: str) -> None:
    def psql(*commands: str) -> subprocess.CompletedProcess[str]:
        args = [str(pg.bin_dir / "psql"), "-X", "-A", "-F", "|", "-v", "ON_ERROR_STOP=1"]
        args += ["-h", proxy.host, "-p", str(proxy.port), "-U", "app", "-d", dbname]
        for command in commands:
            args += ["-c", command]
        return subprocess.run(
            args,
            env=client_env(PGSSLMODE="disable", PGPASSWORD=APP_PASSWORD),
            stdin=subprocess.DEVNULL,
            capture_output=True,
            text=True,
            timeout=30,
            check=False,
        )

    out = psql("SHOW STATS", "show version;", "SHOW POOLS")
    assert out.returncode == 0, out.stderr
    lines = out.stdout.splitlines()
    stats_header = lines[0].split("|")
    assert stats_header[: len(PGBOUNCER_COLUMNS["stats"])] == PGBOUNCER_COLUMNS["stats"]
    assert lines[1].startswith("appdb|")
    assert lines[2] == "(1 row)"
    assert lines[3:6] == ["version", f"pg-sidecar {__version__}", "(1 row)"]
    assert lines[6].split("|")[:3] == ["database", "user", "cl_active"]
    assert lines[7].startswith("appdb|app|")

    bad = psql("SHOW NOTHING")
    assert bad.returncode != 0
    assert 'unknown SHOW subject "NOTHING"' in bad.stderr
    # several statements in one simple Query; each one's result is shown (psql 15)
    both = psql("SHOW VERSION; SHOW LISTS")
    assert both.returncode == 0, both.stderr
    assert f"pg-sidecar {__version__}" in both.stdout
    assert "used_clients|" in both.stdout


# --- every SHOW, through psycopg --------------------------------------------------------------


@pytest.mark.parametrize(
    "options",
    [{}, {"prepare_threshold": 0}, {"binary": True}],
    ids=["extended", "prepared", "binary"],
)
def test_every_show_has_pgbouncer_columns(proxy: ProxyProcess, options: dict[str, Any]) -> None:
    binary = options.pop("binary", False)
    with psycopg.connect(proxy.dsn(), autocommit=True) as app:
        app.execute("select 1")
    with console(proxy, **options) as conn:
        for what, expected in PGBOUNCER_COLUMNS.items():
            for _ in range(2):  # the second run of a prepared statement reuses it
                cur = conn.cursor(binary=binary)
                cur.execute(f"SHOW {what}")
                assert cur.description is not None
                names = [c.name for c in cur.description]
                assert names[: len(expected)] == expected, what
                assert names[len(expected) :] == OWN_COLUMNS.get(what, []), what
                cur.fetchall()
        stats = only(show(conn, "stats"), database="appdb")
        assert stats["total_xact_count"] >= 1
        assert stats["total_query_count"] >= 1
        assert stats["total_received"] > 0 and stats["total_sent"] > 0
        assert isinstance(stats["avg_xact_time"], int)
        assert show(conn, "version") == [{"version": f"pg-sidecar {__version__}"}]
        pools = only(show(conn, "pools"), database="appdb")
        assert (pools["user"], pools["pool_mode"], pools["sv_max"]) == ("app", "transaction", 20)
        instance = only(show(conn, "instances"), pool="appdb")
        assert instance["state"] == "up" and instance["servers"] == 1
        # auto: 90 % of the test server's 300 - 3 reserved; nothing limits this lone pool
        assert instance["budget"] == 267 and instance["soft_cap"] == 20
        assert instance["instance_total"] >= 1


def test_show_config_lists_every_setting_and_no_secret(
    pg: PostgresServer, proxy: ProxyProcess
) -> None:
    with console(proxy) as conn:
        rows = show(conn, "config")
    assert [row["key"] for row in rows] == [f.name for f in dataclasses.fields(Settings)]
    defaults = Settings()
    for row in rows:
        assert row["changeable"] in ("yes", "no")
        assert APP_PASSWORD not in row["value"]
        assert "://" not in row["value"]
    by_key = {row["key"]: row for row in rows}
    assert by_key["socket_dir"]["value"] == str(proxy.socket_dir)
    assert by_key["default_pool_size"]["default"] == str(defaults.default_pool_size)
    assert by_key["default_pool_size"]["changeable"] == "yes"
    assert by_key["pool_mode"]["changeable"] == "no"
    assert by_key["log_connections"]["value"] in ("0", "1")


def test_clients_pools_servers_match_what_clients_do(
    pg: PostgresServer, proxy: ProxyProcess
) -> None:
    in_tx = psycopg.connect(proxy.dsn(application_name="in-tx"))
    idle = [psycopg.connect(proxy.dsn(), autocommit=True) for _ in range(2)]
    try:
        tx_backend = in_tx.execute("select pg_backend_pid()").fetchone()
        assert tx_backend is not None
        for conn in idle:
            conn.execute("select 1")
        with console(proxy) as admin:
            clients = show(admin, "clients")
            pools = show(admin, "pools")
            servers = show(admin, "servers")
            databases = show(admin, "databases")
            backends = {row[0] for row in pg.backends()}

        app_clients = [c for c in clients if c["database"] == "appdb"]
        assert len(app_clients) == 3
        tx_client = only(app_clients, client_pid=in_tx.info.backend_pid)
        assert tx_client["state"] == "active"
        assert tx_client["application_name"] == "in-tx"
        assert (tx_client["type"], tx_client["user"], tx_client["addr"]) == (
            "C",
            "app",
            "127.0.0.1",
        )
        assert tx_client["port"] > 0 and tx_client["local_port"] == proxy.port
        for conn in idle:
            row = only(app_clients, client_pid=conn.info.backend_pid)
            assert row["state"] == "idle" and row["link"] is None
        me = only(clients, database="sidecar")
        assert me["state"] == "active"

        pool = only(pools, database="appdb")
        # cl_active is PgBouncer's: logged-in clients that are not waiting (idle ones too)
        assert (pool["cl_active"], pool["cl_waiting"], pool["sv_active"]) == (3, 0, 1)
        assert pool["sv_active"] + pool["sv_idle"] == len(servers) == len(backends)

        assert {s["remote_pid"] for s in servers} == backends
        busy = only(servers, state="active")
        assert busy["remote_pid"] == tx_backend[0]
        assert busy["link"] == tx_client["ptr"] and tx_client["link"] == busy["ptr"]
        assert busy["tls"].startswith("TLS"), busy["tls"]  # sslmode=require by default
        assert (busy["addr"], busy["port"]) == ("127.0.0.1", pg.port)
        assert busy["pending"] == 0

        db = only(databases, name="appdb")
        assert (db["host"], db["port"], db["database"], db["force_user"]) == (
            pg.host,
            pg.port,
            "appdb",
            "app",
        )
        assert db["current_connections"] == len(backends)
        assert (db["paused"], db["disabled"]) == (0, 0)
        in_tx.commit()
    finally:
        in_tx.close()
        for conn in idle:
            conn.close()


async def test_asyncpg(proxy: ProxyProcess) -> None:
    for cache in (0, 100):  # unnamed and named prepared statements
        conn = await asyncpg.connect(
            **proxy.asyncpg_params(dbname="sidecar", statement_cache_size=cache)
        )
        try:
            rows = await conn.fetch("SHOW POOLS")
            assert [r["database"] for r in rows] == ["appdb"]
            assert rows[0]["pool_mode"] == "transaction"
            assert rows[0]["cl_waiting"] == 0
            assert await conn.fetchval("show version") == f"pg-sidecar {__version__}"
            stats = await conn.fetchrow("SHOW STATS")
            assert stats is not None and stats["database"] == "appdb"
            with pytest.raises(asyncpg.PostgresSyntaxError):
                await conn.fetch("DROP TABLE everything")
            me = [
                c
                for c in await conn.fetch("SHOW CLIENTS")
                if c["client_pid"] == conn.get_server_pid()
            ]
            assert len(me) == 1 and me[0]["database"] == "sidecar"
        finally:
            await conn.close()


async def test_console_wrong_password(proxy: ProxyProcess) -> None:
    with pytest.raises(asyncpg.PostgresError) as excinfo:
        await asyncpg.connect(**proxy.asyncpg_params(dbname="sidecar", password="wrong"))
    assert excinfo.value.sqlstate == "28P01"
    with pytest.raises(asyncpg.PostgresError) as excinfo:
        await asyncpg.connect(**proxy.asyncpg_params(dbname="pgbouncer", user="nobody"))
    assert excinfo.value.sqlstate == "28P01"


# --- errors keep the console usable ----------------------------------------------------------


@pytest.mark.parametrize(
    ("sql", "sqlstate"),
    [
        ("FLUSH EVERYTHING", "42601"),
        ("SHOW", "42601"),
        ("SHOW NOTHING", "42601"),
        ("SHOW STATS please", "42601"),
        ("PAUSE a b", "42601"),
        ("SHOW FDS", "0A000"),
        ("BEGIN", "0A000"),
        ("PAUSE nosuchpool", "3D000"),
        ('RESUME "APPDB"', "3D000"),
        ("SHOW 'unterminated", "42601"),
    ],
)
def test_errors_do_not_disconnect(proxy: ProxyProcess, sql: str, sqlstate: str) -> None:
    with console(proxy) as conn:
        with pytest.raises(psycopg.Error) as excinfo:
            conn.execute(sql)
        assert excinfo.value.sqlstate == sqlstate
        assert show(conn, "version") == [{"version": f"pg-sidecar {__version__}"}]


def test_simple_protocol_and_empty_queries(proxy: ProxyProcess) -> None:
    with console(proxy, cursor_factory=ClientCursor) as conn:
        cur = conn.execute("SHOW VERSION; -- a comment; SHOW NOTHING\n SHOW LISTS;")
        assert cur.fetchall() == [{"version": f"pg-sidecar {__version__}"}]
        assert cur.nextset()
        assert {row["list"] for row in cur.fetchall()} >= {"pools", "used_clients"}
        # an error ends the query string: what follows does not run
        with pytest.raises(psycopg.errors.SyntaxError):
            conn.execute("SHOW NOTHING; RESUME")
        pgconn = conn.pgconn
        assert pgconn.exec_(b"").status == pq.ExecStatus.EMPTY_QUERY
        assert pgconn.exec_(b" ; ;").status == pq.ExecStatus.EMPTY_QUERY
        assert pgconn.exec_params(b"", []).status == pq.ExecStatus.EMPTY_QUERY
        res = pgconn.exec_(b"resume appdb")
        assert (res.status, res.command_status) == (pq.ExecStatus.COMMAND_OK, b"RESUME")
        assert conn.info.transaction_status == pq.TransactionStatus.IDLE


# --- PAUSE / RESUME / RECONNECT / RELOAD / SHUTDOWN ----------------------------------------------


def test_pause_waits_for_the_transaction_and_holds_new_queries(
    pg: PostgresServer, proxy_factory: ProxyFactory
) -> None:
    proxy = proxy_factory(SIDECAR_DEFAULT_POOL_SIZE="1")
    a = psycopg.connect(proxy.dsn())
    b = psycopg.connect(proxy.dsn(), autocommit=True)
    try:
        a.execute("select 1")  # a transaction holds the only server
        pauser = console(proxy)
        watcher = console(proxy)
        pause, pause_out = run_in_thread(lambda: pauser.execute("PAUSE appdb").statusmessage)

        poll_until(lambda: only(show(watcher, "databases"), name="appdb")["paused"] == 1)
        # still waiting for A: the console keeps serving other connections meanwhile
        assert pause.is_alive()
        assert only(show(watcher, "pools"), database="appdb")["sv_active"] == 1
        a.commit()
        assert joined(pause, pause_out) == "PAUSE"
        pg.wait_backends(0)  # a paused pool closes its idle servers

        query, query_out = run_in_thread(lambda: b.execute("select 2").fetchone())
        poll_until(lambda: only(show(watcher, "pools"), database="appdb")["cl_waiting"] == 1)
        waiting = only(show(watcher, "clients"), client_pid=b.info.backend_pid)
        assert waiting["state"] == "waiting"
        assert query.is_alive() and pg.count_backends() == 0
        assert watcher.execute("RESUME").statusmessage == "RESUME"
        assert joined(query, query_out) == (2,)
        assert only(show(watcher, "databases"), name="appdb")["paused"] == 0
        pauser.close()
        watcher.close()
    finally:
        a.close()
        b.close()
    assert "at=admin_command command=pause pools=appdb" in proxy.log_text()


def test_pause_every_pool_with_nothing_busy(
    pg: PostgresServer, proxy_factory: ProxyFactory
) -> None:
    proxy = proxy_factory(f"appdb={pg.url()}", f"other={pg.url()}")
    with console(proxy) as conn:
        assert conn.execute("PAUSE").statusmessage == "PAUSE"
        assert [d["paused"] for d in show(conn, "databases")] == [1, 1]
        assert conn.execute("RESUME").statusmessage == "RESUME"
        assert [d["paused"] for d in show(conn, "databases")] == [0, 0]
    with psycopg.connect(proxy.dsn(dbname="other"), autocommit=True) as app:
        assert app.execute("select 3").fetchone() == (3,)


def test_reconnect_replaces_servers(pg: PostgresServer, proxy: ProxyProcess) -> None:
    def backend(conn: psycopg.Connection[Any]) -> int:
        row = conn.execute("select pg_backend_pid()").fetchone()
        assert row is not None
        return int(row[0])

    with psycopg.connect(proxy.dsn(), autocommit=True) as app, console(proxy) as admin:
        first = backend(app)
        assert admin.execute("RECONNECT appdb").statusmessage == "RECONNECT"
        poll_until(lambda: first not in {row[0] for row in pg.backends()}, what="old pid gone")
        second = backend(app)
        assert second != first

        # a busy server is replaced once its transaction ends, not under it
        app.autocommit = False
        assert backend(app) == second
        admin.execute("RECONNECT")
        assert backend(app) == second
        app.commit()
        poll_until(lambda: second not in {row[0] for row in pg.backends()}, what="busy pid gone")
        app.autocommit = True
        assert backend(app) not in (first, second)


def test_reload_applies_sizes_and_refuses_pool_mode(
    pg: PostgresServer, proxy_factory: ProxyFactory, tmp_path: Path
) -> None:
    config = tmp_path / "sidecar.yml"
    config.write_text("pools:\n  appdb:\n    default_pool_size: 7\n")
    proxy = proxy_factory(SIDECAR_CONFIG=str(config))
    notices: list[str] = []
    with console(proxy) as conn:
        conn.add_notice_handler(lambda d: notices.append(d.message_primary or ""))
        config.write_text("pools:\n  appdb:\n    default_pool_size: 3\n    pool_mode: session\n")
        assert conn.execute("RELOAD").statusmessage == "RELOAD"
        db = only(show(conn, "databases"), name="appdb")
        assert (db["pool_size"], db["pool_mode"]) == (3, "transaction")
        assert only(show(conn, "pools"), database="appdb")["sv_max"] == 3
        assert any("appdb: default_pool_size" in n and n.endswith("-> 3") for n in notices)
        assert any("pool_mode" in n and "restart" in n for n in notices), notices

        config.write_text("pools:\n  appdb:\n    default_pool_size: zero\n")
        with pytest.raises(psycopg.Error) as excinfo:
            conn.execute("RELOAD")
        assert excinfo.value.sqlstate == "F0000"
        assert "default_pool_size" in str(excinfo.value)
        assert only(show(conn, "databases"), name="appdb")["pool_size"] == 3
    with psycopg.connect(proxy.dsn(), autocommit=True) as app:
        assert app.execute("select 1").fetchone() == (1,)


def test_shutdown_stops_the_proxy(proxy: ProxyProcess) -> None:
    other = console(proxy, dbname="pgbouncer")
    conn = console(proxy)
    try:
        assert conn.execute("SHUTDOWN").statusmessage == "SHUTDOWN"
        assert proxy.proc.wait(timeout=10) == 0
        for closed in (conn, other):
            with pytest.raises(psycopg.OperationalError):
                closed.execute("SHOW VERSION")
    finally:
        conn.close()
        other.close()
    assert 'at=shutdown reason="admin SHUTDOWN"' in proxy.log_text()


# --- sans-IO: splitting, encoding, the session on plain bytes -----------------------------------


def test_split_statements() -> None:
    assert split_statements("") == []
    assert split_statements(" ; ;\n") == []
    assert split_statements("show stats;") == ["show stats"]
    assert split_statements("SHOW STATS ; show pools") == ["SHOW STATS", "show pools"]
    assert split_statements("pause \"a;b\"; resume 'c;''d'") == ['pause "a;b"', "resume 'c;''d'"]
    assert split_statements("-- x; y\nshow /* a; /* nested; */ b; */ version") == ["show   version"]
    for bad in ("show 'x", 'pause "x', "show /* x"):
        with pytest.raises(AdminError) as excinfo:
            split_statements(bad)
        assert excinfo.value.sqlstate == "42601"
    assert [(t.text, t.quoted) for t in tokenize('PAUSE "My""Pool"')] == [
        ("PAUSE", False),
        ('My"Pool', True),
    ]


def test_row_encoding() -> None:
    cols = (r.Column("name"), r.Column("n", r.INT8), r.Column("x", r.FLOAT8))
    text = r.data_row(["é", 12, 0.5], cols)
    assert text == b"D" + struct.pack("!ih", 4 + 2 + 6 + 6 + 7, 3) + (
        b"\x00\x00\x00\x02\xc3\xa9\x00\x00\x00\x0212\x00\x00\x00\x030.5"
    )
    binary = r.data_row(["a", -2, None], cols, (1, 1, 1))
    assert binary.endswith(struct.pack("!i", 8) + struct.pack("!q", -2) + struct.pack("!i", -1))
    desc = r.row_description(cols, (0, 1, 0))
    assert desc.startswith(b"T") and b"n\x00" in desc
    assert r.encode_value(float("inf"), r.FLOAT8) == b"Infinity"
    assert r.result_formats((), 2) == (0, 0)
    assert r.result_formats((1,), 3) == (1, 1, 1)
    with pytest.raises(ValueError, match="2 result formats but query has 3"):
        r.result_formats((0, 1), 3)
    with pytest.raises(ValueError, match="unsupported format code"):
        r.result_formats((2,), 1)


# A ClientConn stand-in: what AdminSession uses of it.
class FakeClient:
    def __init__(self) -> None:
        self.state = ClientState.ADMIN
        self.params = {"application_name": "unit"}
        self.pid, self.secret = 42, 7
        self.user, self.addr, self.database = "app", "unix", "sidecar"
        self.last_active = 0.0
        self.sent = bytearray()
        self.closed_because: str | None = None
        self.violation: str | None = None

    def write(self, data: bytes) -> None:
        self.sent += data

    def close(self, reason: str) -> None:
        self.closed_because = reason
        self.state = ClientState.CLOSED

    def protocol_violation(self, text: str) -> None:
        self.violation = text
        self.state = ClientState.CLOSED


class FakeProxy:
    def __init__(self) -> None:
        self.pools: dict[str, Any] = {}
        self.clients: set[Any] = set()
        self.settings = Settings()
        self.worker = None


@pytest.fixture
def session() -> Iterator[tuple[AdminSession, FakeClient]]:
    client = FakeClient()
    yield AdminSession(FakeProxy(), client), client  # type: ignore[arg-type]


def replies(client: FakeClient) -> list[tuple[str, bytes]]:
    reader = m.MessageReader()
    reader.feed(bytes(client.sent))
    client.sent.clear()
    out = []
    while (msg := reader.next()) is not None:
        out.append((chr(msg[0]), msg[1]))
    return out


def parse(sql: str, name: str = "") -> bytes:
    return m.message(b"P", name.encode() + b"\x00" + sql.encode() + b"\x00\x00\x00")


def bind(statement: str = "", formats: tuple[int, ...] = (), params: int = 0) -> bytes:
    body = b"\x00" + statement.encode() + b"\x00" + struct.pack("!hh", 0, params)
    body += b"\xff\xff\xff\xff" * params
    body += struct.pack("!h", len(formats)) + b"".join(struct.pack("!h", f) for f in formats)
    return m.message(b"B", body)


def execute(max_rows: int = 0) -> bytes:
    return m.message(b"E", b"\x00" + struct.pack("!i", max_rows))


def describe(kind: bytes, name: str = "") -> bytes:
    return m.message(b"D", kind + name.encode() + b"\x00")


SYNC = m.message(b"S")


def test_session_welcome(session: tuple[AdminSession, FakeClient]) -> None:
    admin, client = session
    client.sent += admin.welcome()
    got = replies(client)
    assert [t for t, _ in got] == ["S"] * 7 + ["K", "Z"]
    params = dict(m.parse_parameter_status(body) for t, body in got if t == "S")
    assert params["server_version"] == f"15.0 (pg-sidecar {__version__})"
    assert params["application_name"] == "unit"
    assert m.parse_backend_key(got[7][1]) == (42, 7)


def test_session_extended_protocol(session: tuple[AdminSession, FakeClient]) -> None:
    admin, client = session
    admin.feed(parse("SHOW HELP") + describe(b"S") + bind(formats=(1,)) + describe(b"P"))
    admin.feed(execute(max_rows=2) + execute(max_rows=0) + SYNC)
    got = replies(client)
    types = "".join(t for t, _ in got)
    n = len(admin.console.show_help())
    assert types == "1tT2T" + "DD" + "s" + "D" * (n - 2) + "C" + "Z"
    assert got[1][1] == b"\x00\x00"  # no parameters
    assert got[-2][1] == b"SHOW\x00"

    # an error skips everything up to Sync, and the session carries on
    admin.feed(parse("SHOW NOTHING") + bind() + m.query("RESUME") + execute() + SYNC)
    admin.feed(parse("RESUME") + bind())
    admin.feed(describe(b"P") + execute() + SYNC)
    got = replies(client)
    assert "".join(t for t, _ in got) == "EZ12nCZ"
    assert m.parse_error_fields(got[0][1])["C"] == "42601"
    assert got[-2][1] == b"RESUME\x00"

    # wrong number of parameters or result formats, unknown names
    admin.feed(parse("SHOW VERSION", "v") + bind("v", params=1) + SYNC)
    admin.feed(bind("v", formats=(0, 1)) + SYNC + bind("nope") + SYNC + parse("show lists", "v"))
    admin.feed(SYNC + m.message(b"C", b"Sv\x00") + bind("v") + SYNC)
    got = replies(client)
    codes = [m.parse_error_fields(b)["C"] for t, b in got if t == "E"]
    assert codes == ["08P01", "08P01", "26000", "42P05", "26000"]
    assert "".join(t for t, _ in got) == "1EZEZEZEZ3EZ"


def test_session_terminate_and_garbage(session: tuple[AdminSession, FakeClient]) -> None:
    admin, client = session
    admin.feed(m.query("show version") + m.TERMINATE_MSG + m.query("show version"))
    assert client.closed_because == "client close request"
    assert "".join(t for t, _ in replies(client)) == "TDCZ"

    other = FakeClient()
    admin = AdminSession(FakeProxy(), other)  # type: ignore[arg-type]
    admin.feed(b"?\x00\x00\x00\x04")
    assert other.violation == "invalid frontend message type 63"
    third = FakeClient()
    admin = AdminSession(FakeProxy(), third)  # type: ignore[arg-type]
    admin.feed(m.message(b"Q", b"no terminator"))
    assert third.violation == "invalid Query message format"


def test_unix_socket_client_shows_its_process(proxy: ProxyProcess) -> None:
    dsn = make_conninfo(proxy.dsn(dbname="sidecar"), host=str(proxy.socket_dir))
    with psycopg.connect(dsn, autocommit=True, row_factory=dict_row) as conn:
        me = only(show(conn, "clients"), client_pid=conn.info.backend_pid)
    assert (me["addr"], me["port"], me["local_addr"]) == ("unix", proxy.port, "unix")
    assert me["remote_pid"] == os.getpid()
