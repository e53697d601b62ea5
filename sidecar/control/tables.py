"""The admin console's command table: SHOW, PAUSE, RESUME, RECONNECT, RELOAD, SHUTDOWN.

`Console` plans each statement (its columns are known before it runs, for Describe) and runs it
against the live pools, building each SHOW's rows from the data plane. Column names follow
PgBouncer's where the concept is the same, so existing dashboards and scripts keep working.
Only PAUSE, RESUME, RECONNECT, RELOAD and SHUTDOWN change anything.
"""

from __future__ import annotations

import asyncio
import contextlib
import dataclasses
import os
import socket
import struct
import time
from collections.abc import Callable, Iterable
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any
from urllib.parse import urlsplit

from .. import __version__, log
from ..config import ConfigError, PoolConfig, Settings, load_settings, pool_name_for_var
from ..dataplane.client import ClientState
from ..protocol import messages as m
from ..protocol.errors import (
    ADMIN_SHUTDOWN,
    FEATURE_NOT_SUPPORTED,
    INVALID_CATALOG_NAME,
    SYNTAX_ERROR,
)
from ..protocol.rows import FLOAT8, INT8, TEXT, Column
from ..upstream.roles import role_name
from .commands import EMPTY_PLAN, AdminError, Plan, Result, Row, RunResult, Token, tokenize

if TYPE_CHECKING:
    from ..dataplane.client import ClientConn
    from ..dataplane.pool import Pool
    from ..dataplane.proxy import Proxy
    from ..dataplane.server import ServerConn

logger = log.get()

CONFIG_FILE_ERROR = "F0000"
#: Settings RELOAD changes in place, per pool and for the process; every other change needs
#: a restart (the listeners, TLS contexts and pool mode are fixed when the pools are built).
RELOADABLE_POOL = frozenset(
    {
        "default_pool_size",
        "min_pool_size",
        "reserve_pool_size",
        "reserve_pool_timeout",
        "query_wait_timeout",
        "server_connect_timeout",
        "server_lifetime",
        "server_idle_timeout",
        "idle_transaction_timeout",
        "client_idle_timeout",
        "log_connections",
        "log_disconnections",
    }
)
RELOADABLE = RELOADABLE_POOL | {"max_client_conn", "shutdown_timeout", "client_login_timeout"}

_SECRET_WORDS = ("password", "secret", "token")


# -- columns and values ----------------------------------------------------------------------

_TYPES = {"text": TEXT, "int8": INT8, "float8": FLOAT8}


def _columns(spec: str) -> tuple[Column, ...]:
    """`"name other:int8 avg:float8"` -> Columns (text unless a type is given)."""
    out = []
    for word in spec.split():
        name, _, kind = word.partition(":")
        out.append(Column(name, _TYPES[kind or "text"]))
    return tuple(out)


STATS_TOTALS = (
    "total_xact_count",
    "total_query_count",
    "total_received",
    "total_sent",
    "total_xact_time",
    "total_query_time",
    "total_wait_time",
)
STATS_AVERAGES = (
    "avg_xact_count",
    "avg_query_count",
    "avg_recv",
    "avg_sent",
    "avg_xact_time",
    "avg_query_time",
    "avg_wait_time",
)
# SHOW STATS_TOTALS / STATS_AVERAGES name the same figures without their prefix.
_SHORT_NAMES = {
    "xact_count": "xact_count",
    "query_count": "query_count",
    "received": "bytes_received",
    "sent": "bytes_sent",
    "recv": "bytes_received",
    "xact_time": "xact_time",
    "query_time": "query_time",
    "wait_time": "wait_time",
}

STATS_COLUMNS = (
    Column("database"),
    *(Column(n, INT8) for n in (*STATS_TOTALS, *STATS_AVERAGES, "total_errors")),
)
STATS_TOTALS_COLUMNS = (
    Column("database"),
    *(Column(_SHORT_NAMES[n.removeprefix("total_")], INT8) for n in STATS_TOTALS),
)
STATS_AVERAGES_COLUMNS = (
    Column("database"),
    *(Column(_SHORT_NAMES[n.removeprefix("avg_")], INT8) for n in STATS_AVERAGES),
)
TOTALS_COLUMNS = _columns("name value:int8")
POOLS_COLUMNS = _columns(
    "database user cl_active:int8 cl_waiting:int8 sv_active:int8 sv_idle:int8 sv_used:int8"
    " sv_tested:int8 sv_login:int8 maxwait:int8 maxwait_us:int8 pool_mode sv_max:int8"
    " cl_pinned:int8"
)
_CONN_COLUMNS = (
    "type user database state addr port:int8 local_addr local_port:int8 connect_time"
    " request_time wait:int8 wait_us:int8 close_needed:int8 ptr link remote_pid:int8 tls"
    " application_name"
)
CLIENTS_COLUMNS = _columns(_CONN_COLUMNS + " client_pid:int8")
SERVERS_COLUMNS = _columns(_CONN_COLUMNS + " pending:int8")
DATABASES_COLUMNS = _columns(
    "name host port:int8 database force_user pool_size:int8 min_pool_size:int8"
    " reserve_pool:int8 pool_mode max_connections:int8 current_connections:int8 paused:int8"
    " disabled:int8 current_client_connections:int8 server_lifetime:int8"
)
USERS_COLUMNS = _columns("name pool_mode")
CONFIG_COLUMNS = _columns("key value default changeable")
VERSION_COLUMNS = _columns("version")
INSTANCES_COLUMNS = _columns(
    "pool addr port:int8 state servers:int8 cap:int8 last_seen last_error"
    " last_seen_age:float8 failures:int8 connect_ms:float8 role lag_s:float8"
    # The connection budget (upstream/budget.py): NULL while off or not counted yet.
    " budget:int8 soft_cap:int8 instance_total:int8"
)
LISTS_COLUMNS = _columns("list items:int8")
WORKERS_COLUMNS = _columns("worker:int8 workers:int8 pid:int8")
HELP_COLUMNS = _columns("command description")

#: PgBouncer console commands this console knows but does not offer (0A000, not 42601).
_PGBOUNCER_ONLY = frozenset(
    {
        "show fds",
        "show sockets",
        "show active_sockets",
        "show mem",
        "show dns_hosts",
        "show dns_zones",
        "show state",
        "show peers",
        "show peer_pools",
        "show prepared_statements",
        "show servers_prepared",
        "kill",
        "kill_client",
        "suspend",
        "enable",
        "disable",
        "wait_close",
        "set",
    }
)
_TRANSACTION_WORDS = frozenset({"begin", "start", "commit", "end", "rollback", "abort"})

HELP = (
    ("SHOW STATS", "traffic per pool: totals since start, averages over the last stats period"),
    ("SHOW STATS_TOTALS | STATS_AVERAGES", "the two halves of SHOW STATS, PgBouncer-style"),
    ("SHOW TOTALS", "SHOW STATS summed over every pool, one name/value row each"),
    ("SHOW POOLS", "clients and servers per pool right now"),
    ("SHOW CLIENTS", "one row per client connection (the console's own included)"),
    ("SHOW SERVERS", "one row per open server connection"),
    ("SHOW DATABASES", "each pool's upstream and sizes"),
    ("SHOW USERS", "upstream users"),
    ("SHOW INSTANCES", "the PostgreSQL instances behind each pool"),
    ("SHOW CONFIG", "every setting, its default and whether RELOAD can change it"),
    ("SHOW LISTS", "sizes of the internal lists"),
    ("SHOW WORKERS", "the worker process this console reached, of SIDECAR_WORKERS"),
    ("SHOW VERSION", "pg-sidecar's version"),
    ("SHOW HELP", "this list"),
    ("PAUSE [pool]", "stop handing out servers; completes once every busy server is back"),
    ("RESUME [pool]", "undo PAUSE"),
    ("RECONNECT [pool]", "replace server connections (idle now, busy ones when released)"),
    ("RELOAD", "re-read the environment and sidecar.yml; apply pool sizes and timeouts"),
    ("SHUTDOWN", "stop the proxy: refuse new clients, let connected ones finish (like SIGTERM)"),
)


def _us(seconds: float) -> int:
    return round(seconds * 1_000_000)


def _wall(monotonic: float, now_mono: float, now_wall: float) -> str:
    """A monotonic instant as PgBouncer prints times: `2024-05-01 12:00:00 UTC`."""
    when = now_wall - (now_mono - monotonic)
    return time.strftime("%Y-%m-%d %H:%M:%S UTC", time.gmtime(when))


def _ptr(obj: object | None) -> str | None:
    return None if obj is None else f"{id(obj):#x}"


def _split_addr(addr: object, unix_port: int) -> tuple[str, int]:
    """(addr, port) from a peername/sockname; Unix sockets show as `unix` like PgBouncer."""
    if isinstance(addr, tuple) and len(addr) >= 2:
        return str(addr[0]), int(addr[1])
    return "unix", unix_port


def _extra(transport: asyncio.BaseTransport | None, name: str) -> Any:
    return None if transport is None else transport.get_extra_info(name)


def _peer_pid(transport: asyncio.BaseTransport | None) -> int:
    """The pid of a Unix-socket peer (SO_PEERCRED), else 0."""
    sock = _extra(transport, "socket")
    if sock is None or sock.family != socket.AF_UNIX or not hasattr(socket, "SO_PEERCRED"):
        return 0
    with contextlib.suppress(OSError, ValueError, TypeError, struct.error):
        creds = sock.getsockopt(socket.SOL_SOCKET, socket.SO_PEERCRED, struct.calcsize("3i"))
        return int(struct.unpack("3i", creds)[0])
    return 0


def _tls_text(conn: ServerConn | ClientConn) -> str:
    """`TLSv1.3/TLS_AES_256_GCM_SHA384` like PgBouncer, or '' in clear."""
    ssl_object = _extra(conn.transport, "ssl_object")
    if not conn.tls or ssl_object is None:
        return ""
    cipher = ssl_object.cipher()
    version = ssl_object.version() or "TLS"
    return f"{version}/{cipher[0]}" if cipher else str(version)


def _setting_text(value: object) -> str:
    if isinstance(value, bool):
        return "1" if value else "0"
    if isinstance(value, float):
        return str(int(value)) if value.is_integer() else repr(value)
    return str(value)


def _safe_setting(name: str, value: object) -> str:
    """A setting as SHOW CONFIG prints it; anything that could be a secret is masked."""
    text = _setting_text(value)
    if any(word in name for word in _SECRET_WORDS) and text:
        return "********"
    if "://" in text:
        with contextlib.suppress(ValueError):
            if urlsplit(text).password is not None:
                return "********"
    return text


_CLIENT_STATES = {
    ClientState.STARTUP: "login",
    ClientState.AUTH: "login",
    ClientState.LOGIN: "waiting",  # for the pool's first server; PgBouncer's waiting-login
    ClientState.IDLE: "idle",
    ClientState.WAITING: "waiting",
    ClientState.SETUP: "active",
    ClientState.LINKED: "active",
    ClientState.ADMIN: "active",
    ClientState.CLOSED: "closed",
}
# Logged in to a pool and not waiting: PgBouncer's cl_active (idle clients included).
_CL_ACTIVE = (ClientState.IDLE, ClientState.SETUP, ClientState.LINKED)


# -- the commands ------------------------------------------------------------------------------


@dataclass(frozen=True, slots=True)
class _Show:
    columns: tuple[Column, ...]
    rows: Callable[[], list[Row]]


class Console:
    """The command table of one console connection, over the proxy's live state."""

    def __init__(self, proxy: Proxy, client: ClientConn) -> None:
        self.proxy = proxy
        self.client = client
        self._shows: dict[str, _Show] = {
            "stats": _Show(STATS_COLUMNS, self.show_stats),
            "stats_totals": _Show(STATS_TOTALS_COLUMNS, self.show_stats_totals),
            "stats_averages": _Show(STATS_AVERAGES_COLUMNS, self.show_stats_averages),
            "totals": _Show(TOTALS_COLUMNS, self.show_totals),
            "pools": _Show(POOLS_COLUMNS, self.show_pools),
            "clients": _Show(CLIENTS_COLUMNS, self.show_clients),
            "servers": _Show(SERVERS_COLUMNS, self.show_servers),
            "databases": _Show(DATABASES_COLUMNS, self.show_databases),
            "users": _Show(USERS_COLUMNS, self.show_users),
            "config": _Show(CONFIG_COLUMNS, self.show_config),
            "version": _Show(VERSION_COLUMNS, self.show_version),
            "instances": _Show(INSTANCES_COLUMNS, self.show_instances),
            "lists": _Show(LISTS_COLUMNS, self.show_lists),
            "workers": _Show(WORKERS_COLUMNS, self.show_workers),
            "help": _Show(HELP_COLUMNS, self.show_help),
        }

    # planning

    def plan(self, statement: str) -> Plan:
        """Parse one statement; errors (unknown command, pool, syntax) raise AdminError."""
        tokens = tokenize(statement)
        if not tokens:
            return EMPTY_PLAN
        verb = tokens[0].keyword
        args = tokens[1:]
        if verb == "show":
            return self._plan_show(args)
        if verb in ("pause", "resume", "reconnect"):
            pools = self._pools(self._at_most_one(verb, args))
            if verb == "pause":
                return Plan(None, lambda: self.pause(pools))
            if verb == "resume":
                return Plan(None, lambda: self.resume(pools))
            return Plan(None, lambda: self.reconnect(pools))
        if verb == "reload":
            self._one_worker_only(verb)
            self._no_args(verb, args)
            return Plan(None, self.reload)
        if verb == "shutdown":
            self._no_args(verb, args)
            return Plan(None, self.shutdown)
        if verb in _TRANSACTION_WORDS:
            raise AdminError(
                FEATURE_NOT_SUPPORTED,
                "the admin console has no transactions",
                hint="connect with autocommit on (psycopg: autocommit=True)",
            )
        shown = " ".join(t.text for t in tokens[:2]).lower()
        if verb in _PGBOUNCER_ONLY or shown in _PGBOUNCER_ONLY:
            word = shown.upper() if verb == "show" else verb.upper()
            raise AdminError(FEATURE_NOT_SUPPORTED, f"{word} is not supported by pg-sidecar")
        raise AdminError(SYNTAX_ERROR, f'unknown command "{tokens[0].text}"', hint="try SHOW HELP")

    def _plan_show(self, args: list[Token]) -> Plan:
        if not args:
            raise AdminError(SYNTAX_ERROR, "SHOW needs a subject", hint="try SHOW HELP")
        subject = args[0].keyword
        show = self._shows.get(subject)
        if show is None:
            if f"show {subject}" in _PGBOUNCER_ONLY:
                raise AdminError(
                    FEATURE_NOT_SUPPORTED, f"SHOW {subject.upper()} is not supported by pg-sidecar"
                )
            raise AdminError(
                SYNTAX_ERROR, f'unknown SHOW subject "{args[0].text}"', hint="try SHOW HELP"
            )
        self._no_args(f"SHOW {subject.upper()}", args[1:])

        def run() -> Result:
            return Result("SHOW", show.rows())

        return Plan(show.columns, run)

    def _one_worker_only(self, verb: str) -> None:
        """With several workers this would change one worker's settings and not the others'."""
        w = self.proxy.worker
        if w is not None:
            raise AdminError(
                FEATURE_NOT_SUPPORTED,
                f"{verb.upper()} is not supported with SIDECAR_WORKERS={w.count}: this console"
                f" reached worker {w.index}, and it would change that worker's settings only",
                hint="restart the sidecar to apply new settings, or run SIDECAR_WORKERS=1",
            )

    @staticmethod
    def _no_args(what: str, args: list[Token]) -> None:
        if args:
            raise AdminError(
                SYNTAX_ERROR,
                f'syntax error at or near "{args[0].text}"',
                hint=f"{what.upper()} takes no arguments",
            )

    @staticmethod
    def _at_most_one(verb: str, args: list[Token]) -> Token | None:
        if len(args) > 1:
            raise AdminError(
                SYNTAX_ERROR,
                f'syntax error at or near "{args[1].text}"',
                hint=f"{verb.upper()} takes at most one pool name",
            )
        return args[0] if args else None

    def _pools(self, name: Token | None) -> list[Pool]:
        pools = self.proxy.pools
        if name is None:
            return list(pools.values())
        pool = pools.get(name.text)
        if pool is None and not name.quoted:
            # Unquoted names fold to lower case, as in SQL.
            pool = pools.get(name.text.lower())
        if pool is None:
            raise AdminError(
                INVALID_CATALOG_NAME,
                f'no such database: "{name.text}"',
                hint=f"pools: {', '.join(pools) or 'none'}",
            )
        return [pool]

    # SHOW

    def _pool_list(self) -> list[Pool]:
        return list(self.proxy.pools.values())

    @staticmethod
    def _totals(pool: Pool) -> dict[str, int]:
        t, s = pool.totals, pool.stats
        return {
            "total_xact_count": t.xacts + s.xacts,
            "total_query_count": t.queries + s.queries,
            "total_received": t.bytes_in + s.bytes_in,
            "total_sent": t.bytes_out + s.bytes_out,
            "total_xact_time": _us(t.xact_time + s.xact_time),
            "total_query_time": _us(t.query_time + s.query_time),
            "total_wait_time": _us(t.wait_time + s.wait_time),
        }

    @staticmethod
    def _averages(pool: Pool) -> dict[str, int]:
        p = pool.last_period
        if p is None:
            return dict.fromkeys(STATS_AVERAGES, 0)
        return {
            "avg_xact_count": round(p.xacts_per_s),
            "avg_query_count": round(p.queries_per_s),
            "avg_recv": round(p.in_bytes_per_s),
            "avg_sent": round(p.out_bytes_per_s),
            "avg_xact_time": round(p.avg_xact_ms * 1000),
            "avg_query_time": round(p.avg_query_ms * 1000),
            "avg_wait_time": round(p.avg_wait_ms * 1000),
        }

    def show_stats(self) -> list[Row]:
        rows: list[Row] = []
        for pool in self._pool_list():
            row: Row = {"database": pool.name}
            row.update(self._totals(pool))
            row.update(self._averages(pool))
            row["total_errors"] = pool.totals.errors + pool.stats.errors
            rows.append(row)
        return rows

    def show_stats_totals(self) -> list[Row]:
        return [
            {"database": p.name}
            | {_SHORT_NAMES[k.removeprefix("total_")]: v for k, v in self._totals(p).items()}
            for p in self._pool_list()
        ]

    def show_stats_averages(self) -> list[Row]:
        return [
            {"database": p.name}
            | {_SHORT_NAMES[k.removeprefix("avg_")]: v for k, v in self._averages(p).items()}
            for p in self._pool_list()
        ]

    def show_totals(self) -> list[Row]:
        sums = dict.fromkeys((*STATS_TOTALS, *STATS_AVERAGES), 0)
        for pool in self._pool_list():
            for figures in (self._totals(pool), self._averages(pool)):
                for key, value in figures.items():
                    sums[key] += value
        return [{"name": k, "value": v} for k, v in sums.items()]

    def _pool_clients(self, pool: Pool) -> list[ClientConn]:
        return [
            c
            for c in self.proxy.clients_of(pool)
            if c.state not in (ClientState.ADMIN, ClientState.CLOSED)
        ]

    def show_pools(self) -> list[Row]:
        now = time.monotonic()
        rows: list[Row] = []
        for pool in self._pool_list():
            waiting = [*pool.waiters, *pool.logins]
            oldest = min((c.wait_started for c in waiting), default=now)
            maxwait = max(now - oldest, 0.0)
            gauges = pool.gauges()
            clients = self._pool_clients(pool)
            rows.append(
                {
                    "database": pool.name,
                    "user": pool.config.upstream.user,
                    "cl_active": sum(c.state in _CL_ACTIVE for c in clients),
                    "cl_waiting": len(waiting),
                    "sv_active": len(pool.active),
                    "sv_idle": len(pool.idle),
                    "sv_used": 0,
                    "sv_tested": 0,
                    "sv_login": pool.connecting,
                    "maxwait": int(maxwait),
                    "maxwait_us": int((maxwait - int(maxwait)) * 1_000_000),
                    "pool_mode": pool.settings.pool_mode,
                    "sv_max": gauges.get(
                        "servers.max",
                        pool.settings.default_pool_size + pool.settings.reserve_pool_size,
                    ),
                    "cl_pinned": sum(bool(getattr(c, "pins", None)) for c in clients),
                }
            )
        return rows

    def show_clients(self) -> list[Row]:
        now, wall = time.monotonic(), time.time()
        port = self.proxy.settings.port
        rows: list[Row] = []
        for c in sorted(self.proxy.clients, key=lambda c: c.connected_at):
            if c.state is ClientState.CLOSED:
                continue
            transport = c.transport
            addr, rport = _split_addr(_extra(transport, "peername"), port)
            local_addr, local_port = _split_addr(_extra(transport, "sockname"), port)
            wait = now - c.wait_started if c.state is ClientState.WAITING else 0.0
            rows.append(
                {
                    "type": "C",
                    "user": c.user,
                    "database": c.database,
                    "state": _CLIENT_STATES[c.state],
                    "addr": addr,
                    "port": rport,
                    "local_addr": local_addr,
                    "local_port": local_port,
                    "connect_time": _wall(c.connected_at, now, wall),
                    "request_time": _wall(c.last_active, now, wall),
                    "wait": int(wait),
                    "wait_us": int((wait - int(wait)) * 1_000_000),
                    "close_needed": 0,
                    "ptr": _ptr(c),
                    "link": _ptr(c.server),
                    "remote_pid": _peer_pid(transport),
                    "tls": _tls_text(c),
                    "application_name": c.params.get("application_name", ""),
                    "client_pid": c.pid,
                }
            )
        return rows

    def show_servers(self) -> list[Row]:
        now, wall = time.monotonic(), time.time()
        rows: list[Row] = []
        for pool in self._pool_list():
            servers = sorted([*pool.active, *pool.idle], key=lambda s: s.created_at)
            for s in servers:
                peer = _extra(s.transport, "peername")
                addr, port = _split_addr(peer, s.port) if peer else (s.host, s.port)
                local_addr, local_port = _split_addr(_extra(s.transport, "sockname"), 0)
                busy = s.client is not None
                rows.append(
                    {
                        "type": "S",
                        "user": pool.config.upstream.user,
                        "database": pool.name,
                        "state": s.state.value,
                        "addr": addr,
                        "port": port,
                        "local_addr": local_addr,
                        "local_port": local_port,
                        "connect_time": _wall(s.created_at, now, wall),
                        "request_time": _wall(s.linked_at if busy else s.last_used, now, wall),
                        "wait": 0,
                        "wait_us": 0,
                        "close_needed": int(now >= s.expires_at),
                        "ptr": _ptr(s),
                        "link": _ptr(s.client),
                        "remote_pid": s.pid,
                        "tls": _tls_text(s),
                        "application_name": s.params.get("application_name", ""),
                        "pending": s.pending,
                    }
                )
        return rows

    def show_databases(self) -> list[Row]:
        rows: list[Row] = []
        for pool in self._pool_list():
            up, s = pool.config.upstream, pool.settings
            rows.append(
                {
                    "name": pool.name,
                    "host": up.host,
                    "port": up.port,
                    "database": up.dbname,
                    "force_user": up.user,
                    "pool_size": s.default_pool_size,
                    "min_pool_size": s.min_pool_size,
                    "reserve_pool": s.reserve_pool_size,
                    "server_lifetime": round(s.server_lifetime),
                    "pool_mode": s.pool_mode,
                    "max_connections": int(getattr(s, "max_per_instance", 0)),
                    "current_connections": pool.size,
                    "current_client_connections": len(self._pool_clients(pool)),
                    "paused": int(pool.paused),
                    "disabled": 0,
                }
            )
        return rows

    def show_users(self) -> list[Row]:
        seen: dict[str, str] = {}
        for pool in self._pool_list():
            seen.setdefault(pool.config.upstream.user, pool.settings.pool_mode)
        return [{"name": name, "pool_mode": mode} for name, mode in seen.items()]

    def show_config(self) -> list[Row]:
        current = self.proxy.settings
        rows: list[Row] = []
        for f in dataclasses.fields(Settings):
            rows.append(
                {
                    "key": f.name,
                    "value": _safe_setting(f.name, getattr(current, f.name)),
                    "default": _safe_setting(f.name, f.default),
                    "changeable": "yes" if f.name in RELOADABLE else "no",
                }
            )
        return rows

    def show_version(self) -> list[Row]:
        return [{"version": f"pg-sidecar {__version__}"}]

    def show_instances(self) -> list[Row]:
        now = time.monotonic()
        rows: list[Row] = []
        for pool in self._pool_list():
            cap = int(getattr(pool.settings, "max_per_instance", 0))
            # The instance set's snapshot, not instance_lines(): those count failures since the
            # last stats line, and reading them here would take them from the next line.
            instances = getattr(pool, "instances", None)
            snapshot = instances.snapshot(now, cap) if instances is not None else []
            for inst in snapshot:
                rows.append(_instance_row(pool.name, inst, cap))
            if not snapshot:
                up = pool.config.upstream
                rows.append(
                    {
                        "pool": pool.name,
                        "addr": up.host,
                        "port": up.port,
                        "state": "up",
                        "servers": pool.size,
                        "cap": cap,
                        "last_seen": None,
                        "last_error": None if pool.last_error is None else str(pool.last_error),
                        "last_seen_age": None,
                        "failures": 0,
                        "connect_ms": None,
                        "role": None,
                        "lag_s": None,
                        **_budget_cells({}),
                    }
                )
        return rows

    def show_lists(self) -> list[Row]:
        pools = self._pool_list()
        clients = [c for c in self.proxy.clients if c.state is not ClientState.CLOSED]
        logging_in = (ClientState.STARTUP, ClientState.AUTH, ClientState.LOGIN)
        return [
            {"list": "databases", "items": len(pools)},
            {"list": "users", "items": len({p.config.upstream.user for p in pools})},
            {"list": "pools", "items": len(pools)},
            {"list": "used_clients", "items": len(clients)},
            {"list": "login_clients", "items": sum(c.state in logging_in for c in clients)},
            {"list": "waiting_clients", "items": sum(len(p.waiters) for p in pools)},
            {"list": "free_servers", "items": sum(len(p.idle) for p in pools)},
            {"list": "used_servers", "items": sum(len(p.active) for p in pools)},
            {"list": "login_servers", "items": sum(p.connecting for p in pools)},
        ]

    def show_workers(self) -> list[Row]:
        w = self.proxy.worker
        return [
            {
                "worker": 0 if w is None else w.index,
                "workers": 1 if w is None else w.count,
                "pid": os.getpid(),
            }
        ]

    def show_help(self) -> list[Row]:
        return [{"command": c, "description": d} for c, d in HELP]

    # actions

    def _log(self, command: str, pools: Iterable[Pool] = ()) -> None:
        logger.info(
            "admin_command",
            command=command,
            pools=",".join(p.name for p in pools) or None,
            user=self.client.user,
            addr=self.client.addr,
        )

    async def pause(self, pools: list[Pool]) -> Result:
        self._log("pause", pools)
        others = asyncio.ensure_future(self._on_other_workers("pause", pools))
        await asyncio.gather(others, *(p.pause() for p in pools))
        logger.info("paused", pools=",".join(p.name for p in pools))
        return Result("PAUSE", notices=others.result())

    def resume(self, pools: list[Pool]) -> RunResult:
        self._log("resume", pools)
        for pool in pools:
            pool.resume()
        return self._everywhere("resume", pools, "RESUME")

    def reconnect(self, pools: list[Pool]) -> RunResult:
        self._log("reconnect", pools)
        for pool in pools:
            pool.reconnect()
        return self._everywhere("reconnect", pools, "RECONNECT")

    def _everywhere(self, verb: str, pools: list[Pool], tag: str) -> RunResult:
        """Done here; with SIDECAR_WORKERS > 1, done once the other workers did it too."""
        if self.proxy.worker is None:
            return Result(tag)

        async def others() -> Result:
            return Result(tag, notices=await self._on_other_workers(verb, pools))

        return others()

    async def _on_other_workers(self, verb: str, pools: list[Pool]) -> tuple[str, ...]:
        """The same command on every other worker (with SIDECAR_WORKERS > 1): a notice for
        each one it did not reach or that failed (the command stands where it ran)."""
        worker = self.proxy.worker
        if worker is None:
            return ()
        name = "" if len(pools) == len(self.proxy.pools) else pools[0].name
        problems = await worker.on_every_other(verb, name)
        for problem in problems:
            logger.warning("admin_command_incomplete", command=verb, problem=problem)
        return tuple(f"{verb.upper()} did not complete on {problem}" for problem in problems)

    def shutdown(self) -> Result:
        self._log("shutdown")
        if self.proxy.worker is not None:
            # Every worker stops, as with SIGTERM: worker 0 tells the others.
            self.proxy.worker.stop_all(f"admin SHUTDOWN on worker {self.proxy.worker.index}")
        self.proxy.shutdown("admin SHUTDOWN")
        # Other consoles would hold the drain open until shutdown_timeout; app clients finish.
        for other in list(self.proxy.clients):
            if other is not self.client and other.state is ClientState.ADMIN:
                other.write(
                    m.fatal(ADMIN_SHUTDOWN, "terminating connection due to administrator command")
                )
                other.close("admin SHUTDOWN")
        return Result("SHUTDOWN", close_session=True)

    def reload(self) -> Result:
        """Re-read env and sidecar.yml; apply what is safe to change in place, say what is not."""
        self._log("reload")
        try:
            new, _fallbacks = load_settings()
            configs = {
                n: dataclasses.replace(p.config, overrides={}) for n, p in self.proxy.pools.items()
            }
            configs = _apply_yaml(configs, new)
        except ConfigError as exc:
            raise AdminError(CONFIG_FILE_ERROR, f"RELOAD failed, nothing changed: {exc}") from None
        notices: list[str] = []
        old = self.proxy.settings
        applied, refused = _diff(old, new, RELOADABLE)
        for key in refused:
            notices.append(_refused(key, getattr(old, key), getattr(new, key)))
        if applied:
            self.proxy.settings = dataclasses.replace(old, **applied)  # type: ignore[arg-type]
            notices.extend(
                f"{k}: {_setting_text(getattr(old, k))} -> {_setting_text(v)}"
                for k, v in applied.items()
            )
        for name, pool in self.proxy.pools.items():
            effective = configs[name].settings(new)
            p_applied, p_refused = _diff(pool.settings, effective, RELOADABLE_POOL)
            for key in p_refused:
                if key not in refused and key not in RELOADABLE:
                    notices.append(
                        f"{name}: "
                        + _refused(key, getattr(pool.settings, key), getattr(effective, key))
                    )
            if p_applied:
                before = pool.settings
                pool.settings = dataclasses.replace(before, **p_applied)  # type: ignore[arg-type]
                notices.extend(
                    f"{name}: {k}: {_setting_text(getattr(before, k))} -> {_setting_text(v)}"
                    for k, v in p_applied.items()
                )
                logger.info(
                    "reload_applied",
                    pool=name,
                    **{k: _setting_text(v) for k, v in p_applied.items()},
                )
        if not notices:
            notices.append("RELOAD: nothing changed")
        return Result("RELOAD", notices=tuple(notices))


def _role_text(inst: dict[str, object]) -> str | None:
    hot = inst.get("hot_standby")
    if hot is None:
        return None
    return role_name(bool(hot), bool(inst.get("read_only")))


def _instance_row(pool: str, inst: dict[str, object], cap: int) -> Row:
    def num(key: str) -> float | None:
        value = inst.get(key)
        return (
            float(value) if isinstance(value, int | float) and not isinstance(value, bool) else None
        )

    seen_wall = num("last_seen_wall")
    last_seen = inst.get("last_seen")
    error = inst.get("last_error")
    return {
        "pool": pool,
        "addr": str(inst.get("addr", "")),
        "port": int(num("port") or 0),
        "state": str(inst.get("state", "")),
        "servers": int(num("servers") or 0),
        "cap": int(num("cap") or cap),
        "last_seen": (
            time.strftime("%Y-%m-%d %H:%M:%S UTC", time.gmtime(seen_wall))
            if seen_wall is not None
            else (None if last_seen is None else str(last_seen))
        ),
        "last_seen_age": num("last_seen_age"),
        "failures": int(num("failures") or 0),
        "connect_ms": num("connect_ms"),
        "last_error": None if error is None else str(error),
        "role": _role_text(inst),
        "lag_s": num("lag_s"),
        **_budget_cells(inst),
    }


def _budget_cells(inst: dict[str, object]) -> Row:
    cells: Row = {}
    for key in ("budget", "soft_cap", "instance_total"):
        value = inst.get(key)
        cells[key] = value if isinstance(value, int) and not isinstance(value, bool) else None
    return cells


def _diff(
    old: Settings, new: Settings, allowed: frozenset[str]
) -> tuple[dict[str, object], list[str]]:
    """(changes RELOAD applies, names of changes it refuses)."""
    applied: dict[str, object] = {}
    refused: list[str] = []
    for f in dataclasses.fields(Settings):
        before, after = getattr(old, f.name), getattr(new, f.name)
        if before == after:
            continue
        if f.name in allowed:
            applied[f.name] = after
        else:
            refused.append(f.name)
    return applied, refused


def _refused(key: str, before: object, after: object) -> str:
    shown = _safe_setting(key, after)
    kept = _safe_setting(key, before)
    return f"{key} changed to {shown}, but only a restart applies it; keeping {kept}"


def _apply_yaml(configs: dict[str, PoolConfig], settings: Settings) -> dict[str, PoolConfig]:
    """The pool configs with sidecar.yml's overrides, when the YAML support is installed."""
    try:
        from .. import yamlconfig
    except ImportError:  # pragma: no cover - yamlconfig ships with the package
        return configs
    vars_by_pool = {pool_name_for_var(v): v for v in settings.urls.split()}
    vars_by_pool = {k: v for k, v in vars_by_pool.items() if k in configs}
    pools, _path = yamlconfig.apply_file(list(configs.values()), settings, vars_by_pool)
    return {p.name: p for p in pools}
