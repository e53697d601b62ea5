"""Server connection pools: the wait queue, and the ONE place a server moves between lists.

A pool serves one (database name, user) from one upstream. Server states (see ServerState):
connecting (counted), idle (a LIFO stack, so hot connections stay hot and extras time out),
active (linked to a client), closed. `_move` is the only code that changes a server's state.
"""

from __future__ import annotations

import asyncio
import contextlib
import random
import time
from collections import deque
from collections.abc import Coroutine
from typing import TYPE_CHECKING, Any

from .. import log
from ..config import PoolConfig, Settings, budget_setting
from ..protocol import messages as m
from ..protocol.auth import ScramSecret
from ..protocol.errors import (
    CONNECTION_FAILURE,
    IDLE_IN_TRANSACTION_TIMEOUT,
    IDLE_SESSION_TIMEOUT,
    QUERY_CANCELED,
    SQLCLIENT_UNABLE_TO_ESTABLISH,
    TOO_MANY_CONNECTIONS,
)
from ..protocol.frontend import PIN_FLAGS, Q_DISCARD, Q_SET, single_request
from ..protocol.statements import Registry
from ..upstream import budget
from ..upstream import roles as r
from ..upstream.balancer import Instance, InstanceSet, InstanceState
from ..upstream.instances import Discovery
from .client import (
    C_CLOSED,
    C_IDLE,
    C_LINKED,
    C_LOGIN,
    C_SETUP,
    C_WAITING,
    NO_PINS,
    ClientConn,
    ClientState,
    setting_name,
)
from .counters import Period, PoolStats, Totals
from .server import (
    S_ACTIVE,
    S_CLOSED,
    S_CONNECTING,
    S_IDLE,
    ServerConn,
    ServerError,
    ServerState,
    make_ssl_context,
    open_server,
)

if TYPE_CHECKING:
    from .proxy import Proxy

logger = log.get()

# Module globals (a cached lookup in the compiled build), not m.X attribute reads.
_I, _T, _E = m.TX_IDLE, m.TX_IN_BLOCK, m.TX_FAILED

# Reported parameters a session cannot change: they may differ between instances (a minor
# version upgrade rolling through a follower pool) and are never synced. (is_superuser
# follows session_authorization, which is synced: SET SESSION AUTHORIZATION must not leak.)
FIXED = frozenset(
    ["server_version", "server_encoding", "integer_datetimes", "is_superuser", "in_hot_standby"]
)


# One query tells whether a session still holds state that cannot move to another server.
PIN_CHECKS = (
    "(SELECT count(*) FROM pg_catalog.pg_locks"
    " WHERE locktype = 'advisory' AND pid = pg_catalog.pg_backend_pid())",
    "(SELECT count(*) FROM pg_catalog.pg_class"
    " WHERE relnamespace = pg_catalog.pg_my_temp_schema())",
    "(SELECT count(*) FROM pg_catalog.pg_cursors WHERE is_holdable)",
    "(SELECT count(*) FROM pg_catalog.pg_listening_channels())",
    "(SELECT count(*) FROM pg_catalog.pg_prepared_statements WHERE from_sql)",
)
PIN_CHECK_REASONS = (
    "advisory lock",
    "temporary table",
    "WITH HOLD cursor",
    "LISTEN",
    "SQL PREPARE",
)


# While no instance matches the pool's target_session_attrs, a client waits this long (one
# Heroku DNS TTL: time for a failover to show) before it gets the reason as an 08001 error.
ROLE_WAIT = 5.0

# A client waiting longer than this for a server is worth a warning line.
SLOW_WAIT = 1.0
WARN_EVERY = 10.0


def _literal(value: str) -> str:
    return "'" + value.replace("'", "''") + "'"


def _plain_name(value: str) -> bool:
    """An application_name PostgreSQL keeps as it is: printable ASCII, under NAMEDATALEN."""
    return len(value) < 64 and all(" " <= ch <= "~" for ch in value)


def _ident(name: str) -> str:
    return '"' + name.replace('"', '""') + '"'


def sync_sql(
    want: dict[str, str], have: dict[str, str], defaults: dict[str, str] | None
) -> str | None:
    """SQL that makes the server's session settings the client's, or None if equal."""
    if want == have:
        return None
    defaults = defaults or {}
    sets: list[str] = []
    resets: list[str] = []
    for key in {*want, *have}:
        if key in FIXED:
            continue
        default = defaults.get(key)
        target = want.get(key, default)
        current = have.get(key, default)
        if target == current or (key not in defaults and key not in want and current is None):
            continue
        if target is None:
            resets.append(f"RESET {_ident(key)}")
        else:
            sets.append(f"pg_catalog.set_config({_literal(key)}, {_literal(target)}, false)")
    if not sets and not resets:
        return None
    parts = ([f"SELECT {', '.join(sets)}"] if sets else []) + resets
    return "; ".join(parts)


class Pool:
    """Servers for one pool name, and the clients waiting for them."""

    def __init__(self, proxy: Proxy, config: PoolConfig, settings: Settings) -> None:
        self.proxy = proxy
        self.config = config
        self.name = config.name
        self.settings = settings
        up = config.upstream
        self.sslmode = up.sslmode or settings.server_tls_sslmode
        self.ssl_context = make_ssl_context(
            self.sslmode, up.sslrootcert or settings.server_tls_ca_file or None
        )
        self.server_hostname = up.host
        self.transaction_mode = settings.pool_mode == "transaction"
        # PBKDF2 once per pool: a login storm then costs HMACs only.
        self.scram_secret = ScramSecret.from_password(up.password)
        self.idle: list[ServerConn] = []
        self.active: set[ServerConn] = set()
        self.connecting = 0
        self.waiters: deque[ClientConn] = deque()
        self.logins: list[ClientConn] = []
        # Parameters a fresh server reports; None until the first server has connected.
        self.defaults: dict[str, str] | None = None
        # (setting, value as a client wrote it) -> value as the server reports it.
        self._canon: dict[tuple[str, str], str] = {}
        self.last_error: ServerError | None = None
        # Instances behind the upstream host: one for a plain host, several for a follower pool.
        self.instances = InstanceSet(up.host, up.port)
        self.discovery = Discovery(
            up.host, up.port, settings, self.instances, on_change=self._instances_changed
        )
        # Instance roles against the target (the URL's target_session_attrs wins).
        self.roles = r.Roles(
            up.target_session_attrs or settings.target_session_attrs, settings.max_replica_lag
        )
        self.discovery.on_addrs = self._dns_answer
        #: One server per LAGGING instance, held (ACTIVE, no client) for its next lag check.
        self.parked: dict[str, ServerConn] = {}
        self._rng = random.Random()
        #: Idle-or-releasing servers to retire per instance address (rebalancing plan).
        self._excess: dict[str, int] = {}
        self._reported_failures: dict[str, int] = {}
        self._warned: dict[str, float] = {}
        self.paused = False
        self.stats = PoolStats()
        self.registry = Registry()
        self.totals = Totals()
        self.last_period: Period | None = None
        self.tasks: set[asyncio.Task[None]] = set()
        # The connection budget shared with the other dynos' sidecars (upstream/budget.py).
        setting = budget_setting(settings)
        self.budgets = (
            budget.Budgets(setting, settings.budget_interval) if setting.enabled else None
        )
        #: Instances whose budget check waits for one of our servers there to come free.
        self._budget_wanted: set[Instance] = set()

    # -- counts ------------------------------------------------------------------------------

    @property
    def size(self) -> int:
        return len(self.idle) + len(self.active) + self.connecting

    def _limit(self, now: float) -> int:
        limit = self.settings.default_pool_size
        if (
            self.settings.reserve_pool_size
            and self.waiters
            and now - self.waiters[0].wait_started >= self.settings.reserve_pool_timeout
        ):
            limit += self.settings.reserve_pool_size
        return limit

    # -- the one state mover -------------------------------------------------------------------

    def _move(self, server: ServerConn, new: ServerState) -> None:
        old = server.state
        if old is new:
            return
        # The busy steady state's two moves (idle <-> active) are tested first.
        if old is S_IDLE:
            if self.idle[-1] is server:
                self.idle.pop()
            else:
                self.idle.remove(server)
        elif old is S_ACTIVE:
            self.active.discard(server)
            if (inst := server.instance) is not None:
                inst.active -= 1
        elif old is S_CONNECTING:
            self.connecting -= 1
        else:
            raise AssertionError("a closed server never comes back")
        server.state = new
        if new is S_ACTIVE:
            self.active.add(server)
            if (inst := server.instance) is not None:
                # The peak in use, for the connection budget (a busy sidecar uses them all).
                inst.active += 1
                if inst.active > inst.busiest:
                    inst.busiest = inst.active
        elif new is S_IDLE:
            self.idle.append(server)  # last_used: set by _release, the one way here
        elif new is S_CONNECTING:
            self.connecting += 1
        elif server.instance is not None:  # closed
            server.instance.servers -= 1

    # -- clients -------------------------------------------------------------------------------

    def login(self, client: ClientConn) -> None:
        """An authenticated client needs the servers' parameters before its ReadyForQuery."""
        if self.defaults is not None:
            self._answer_login(client)
            return
        client.wait_started = time.monotonic()
        self.logins.append(client)
        self._fill(force=1)

    def _answer_login(self, client: ClientConn) -> None:
        """Tell the client its session parameters as PostgreSQL spells them (`UTF8` for the
        `utf8` it asked for, `ISO, MDY` for `iso, mdy`): settings whose spelling the pool has
        not learned yet are first tried on an idle server, where a value PostgreSQL refuses
        fails the login as it would directly. Without an idle server the login goes on, and
        the first link corrects the spelling (see _sync_then_flush)."""
        unknown = self._unspelled(client.params)
        if unknown and self.idle and not self.waiters and not self.paused:
            server = self.idle[-1]
            self._move(server, S_ACTIVE)
            self._spawn(self._learn_spelling(client, server, unknown))
            return
        client.finish_login()

    def _unspelled(self, params: dict[str, str]) -> dict[str, str]:
        """Reported settings among `params` whose spelling by the server is not known."""
        defaults = self.defaults or {}
        return {
            k: v
            for k, v in params.items()
            if k in defaults
            and k not in FIXED
            and v != defaults[k]
            and (k, v) not in self._canon
            and not (k == "application_name" and _plain_name(v))
        }

    async def _learn_spelling(
        self, client: ClientConn, server: ServerConn, unknown: dict[str, str]
    ) -> None:
        # set_config(..., true) lasts until the end of the query's own transaction: the
        # server's session is unchanged afterwards.
        sets = (
            f"pg_catalog.set_config({_literal(k)}, {_literal(v)}, true)" for k, v in unknown.items()
        )
        try:
            error, rows = await server.query_internal("SELECT " + ", ".join(sets))
        except ServerError:
            client.finish_login()  # the server is gone (server_lost said why); carry on
            return
        if server.state is S_ACTIVE and server.client is None:
            self._release(server)
        if error is not None:
            if client.state is C_LOGIN:
                client.fail(
                    error.get("C", "22023"),
                    error.get("M", "invalid setting"),
                    reason="invalid session setting",
                )
            return
        if rows:
            if len(self._canon) > 1000:
                self._canon.clear()  # many distinct values: start over rather than grow
            for (key, value), spelled in zip(unknown.items(), rows[0], strict=False):
                if spelled is not None:
                    self._canon[(key, value)] = spelled
        client.finish_login()

    def acquire(self, client: ClientConn) -> None:
        """The client has bytes for a server: link one now, or queue the client."""
        if self.idle and not self.paused and not self.waiters:
            self._link(client, self.idle[-1])
            return
        client.state = C_WAITING
        client.wait_started = time.monotonic()
        waiters = self.waiters
        waiters.append(client)
        s = self.settings
        if len(waiters) > self.connecting and self.size < s.default_pool_size + s.reserve_pool_size:
            # Room to open one. A full pool (the busy steady state) skips _fill; its
            # pool_full warning and the reserve pool's timeout come from the janitor's.
            self._fill()

    def cancel_waiting(self, client: ClientConn) -> bool:
        """A cancel request for a client still queued for a server: its query never started.
        Answer it as PostgreSQL answers a canceled query and keep the client, rather than
        run the query later (PgBouncer ignores such a cancel, and the client waits on).
        Only for one whole request; pipelined requests wait on."""
        if client.state is not C_WAITING or not single_request(b"".join(client.buffer)):
            return False
        with contextlib.suppress(ValueError):
            self.waiters.remove(client)
        client.buffer.clear()
        client.state = C_IDLE
        self.stats.errors += 1
        # Nothing ran: the client holds no server, so no transaction is open (status I).
        client.write(
            m.error_response(QUERY_CANCELED, "canceling statement due to user request")
            + m.ready_for_query(b"I")
        )
        return True

    def canonical(self, params: dict[str, str]) -> dict[str, str]:
        return {k: self._canon.get((k, v), v) for k, v in params.items()}

    def client_gone(self, client: ClientConn, state: ClientState, reason: str) -> None:
        """A client disconnected (or was closed) while in `state`."""
        if state is C_WAITING:
            with contextlib.suppress(ValueError):
                self.waiters.remove(client)
        elif state is C_LOGIN:
            if client in self.logins:
                self.logins.remove(client)
        elif state is C_SETUP:
            return  # _sync_then_flush sees the client is gone and frees the server
        server = client.server
        if server is None or server.client is not client:
            return
        client.server = None
        server.client = None
        if server.state is not S_ACTIVE:
            return
        self._retire_session(client, server, reason)

    def _retire_session(self, client: ClientConn, server: ServerConn, reason: str) -> None:
        """The client left: make its server fit for the next client, or close it."""
        clean = not server.pending and not server.dirty_tail and server.at_boundary
        clean = clean and not server.out_of_step and not server.backend.copy_in
        # Session state that would leak to the next client (session mode, or a pinned client).
        discard = not self.transaction_mode or bool(client.pins)
        discard = discard or bool(client.frontend.flags & (PIN_FLAGS | Q_SET))
        if clean and server.tx_status == _I and not discard:
            self._release(server)
        elif clean and server.tx_status in (_I, _T, _E):
            # Idle in a transaction, or session state to drop: wipe it rather than reconnect.
            queries = [] if server.tx_status == _I else ["ROLLBACK"]
            if discard:
                queries.append("DISCARD ALL")
            self._spawn(self._reset(server, queries))
        else:
            self.close_server(server, f"client disconnected mid-query ({reason})")

    async def _reset(self, server: ServerConn, queries: list[str]) -> None:
        error = None
        try:
            for sql in queries:
                error = error or (await server.query_internal(sql))[0]
        except ServerError:
            return  # connection_lost already moved it
        if error is not None or server.tx_status != _I:
            self.close_server(server, "reset query failed")
        elif server.state is S_ACTIVE:
            if "DISCARD ALL" in queries:
                self._discarded(server.params)
                if server.statements is not None:
                    server.statements.forget_all()
            self._release(server)

    def _discarded(self, params: dict[str, str]) -> None:
        """DISCARD ALL / RESET ALL ran: reported settings came back as ParameterStatus; the
        ones we SET that PostgreSQL does not report are gone."""
        defaults = self.defaults or {}
        for key in [k for k in params if k not in defaults]:
            del params[key]

    # -- servers -------------------------------------------------------------------------------

    def transaction_done(self, server: ServerConn, now: float) -> None:
        """ReadyForQuery `I` with nothing outstanding (transaction mode): free the server."""
        client = server.client
        if client is not None:
            if client.pins or client.frontend.flags:
                # The transaction may have left session state: look before letting go.
                client.state = C_SETUP
                self._spawn(self._after_transaction(client, server))
                return
            server.client = None
            client.unlink(now)
        self._release(server, now)

    def retire_dying(self, server: ServerConn) -> None:
        """The client's transaction ended and the backend then said FATAL: let the client go
        on elsewhere, close the server."""
        client = server.client
        server.client = None
        if client is not None and client.state is C_LINKED:
            client.unlink()
            if client.buffer:
                self.acquire(client)
        self.close_server(server, "server sent FATAL after the transaction ended")

    async def _after_transaction(self, client: ClientConn, server: ServerConn) -> None:
        """Record SETs the server does not report, and pin the client while it holds state."""
        frontend = client.frontend
        flags, names = frontend.flags, frontend.set_names
        frontend.flags, frontend.set_names = 0, []
        defaults = self.defaults or {}
        if flags & Q_DISCARD:
            # Whether DISCARD ALL ran (it fails inside a transaction block) is for the pin
            # check below to tell, not for the query text.
            self._discarded(client.params)
            self._discarded(server.params)
        if "all" in names:  # RESET ALL
            self._discarded(client.params)
            self._discarded(server.params)
        reset_all = bool(flags & Q_DISCARD) or "all" in names
        names = sorted({n for n in names if n != "all" and setting_name(n) not in defaults})
        check_pins = bool(flags & (PIN_FLAGS | Q_DISCARD) or client.pins)
        columns = list(PIN_CHECKS) if check_pins else []
        columns += [f"pg_catalog.current_setting({_literal(n)}, true)" for n in names]
        rows: list[list[str | None]] = []
        if columns:
            try:
                error, rows = await server.query_internal("SELECT " + ", ".join(columns))
            except ServerError:
                return  # connection_lost told the client
            if error is not None or not rows:
                self.close_server(server, f"session state check failed: {error}")
                return
        row = rows[0] if rows else []
        values = row[len(PIN_CHECKS) :] if check_pins else row
        for name, value in zip(names, values, strict=False):
            if value is not None:
                client.params[name] = value
                server.params[name] = value
        pins = (
            frozenset(
                reason
                for reason, count in zip(PIN_CHECK_REASONS, row, strict=False)
                if count != "0"
            )
            if check_pins
            else NO_PINS
        )
        if client.state is C_CLOSED:
            client.pins = pins
            server.client = None
            self._retire_session(client, server, "client left")
            return
        if reset_all and client.startup_params:
            # The session's reset values are the client's startup settings, not the ones
            # the proxy's server connection started with: put them back.
            client.params.update(client.startup_params)
            sql = sync_sql(client.params, server.params, self.defaults)
            if sql is not None:
                try:
                    error, _rows = await server.query_internal(sql)
                except ServerError:
                    return
                if error is not None:
                    self.close_server(server, f"restoring startup settings failed: {error}")
                    return
                for key, value in client.params.items():
                    if key not in defaults:
                        server.params[key] = value
            client.write(
                b"".join(
                    m.parameter_status(k, v)
                    for k, v in client.startup_params.items()
                    if k in defaults
                )
            )
        if pins:
            if pins != client.pins:
                logger.info(
                    "pin",
                    pool=self.name,
                    addr=client.addr,
                    client_pid=client.pid,
                    reason=",".join(sorted(pins)),
                    backend_pid=server.pid,
                )
            client.pins = pins
            client.flush_to(server)
            return
        if client.pins:
            logger.info("unpin", pool=self.name, addr=client.addr, client_pid=client.pid)
            client.pins = NO_PINS
        server.client = None
        client.state = C_LINKED
        client.unlink()
        self._release(server)
        if client.buffer:
            self.acquire(client)

    def _release(self, server: ServerConn, now: float = 0.0) -> None:
        """Back to idle, or straight to the next waiter; retire it if its time is over."""
        if server.paused:
            # Paused for the client that just let go (its last result filled its socket):
            # that client's resume_writing will no longer reach us.
            server.resume_reading()
        now = now or time.monotonic()
        server.last_used = now
        if server.fatal_seen:
            # The backend said FATAL while no client held it (terminated right after its
            # login, during the proxy's own query): it is going away. Handed on, a client's
            # request would meet only its close -- a silent one, the FATAL never its answer.
            self.close_server(server, "server sent FATAL before a client got it")
            self._fill()
            return
        st = server.statements
        if server.out_of_step or (st is not None and not st.settled):
            # Handing it on would apply one client's fixups to another's answers.
            self.close_server(server, "statement bookkeeping out of step with the server")
            self._fill()
            return
        if now >= server.expires_at:
            self.close_server(server, "server lifetime over")
            self._fill()
            return
        inst = server.instance
        if self._budget_wanted and inst in self._budget_wanted and not self.logins:
            # Between two transactions: the budget check that waited for it goes first (after
            # waiting logins: one may need this server to learn how settings are spelled).
            self._count_on(inst, server)
            return
        if inst is not None and self._excess and self._excess.get(inst.addr):
            # Rebalancing: this instance has more than its share; its replacement goes to
            # the least-loaded instance.
            self._excess[inst.addr] -= 1
            self.close_server(server, f"rebalancing away from {inst.addr}")
            self._fill()
            return
        if self.waiters and not self.paused:
            self._link(self.waiters.popleft(), server, now)
            return
        self._move(server, S_IDLE)

    def _link(self, client: ClientConn, server: ServerConn, now: float = 0.0) -> None:
        now = now or time.monotonic()
        if client.state is C_WAITING:
            waited = now - client.wait_started
            self.stats.waited(waited)
            if waited > SLOW_WAIT and self._may_warn("slow_wait", now):
                logger.warning(
                    "slow_wait",
                    pool=self.name,
                    wait_ms=round(1000 * waited),
                    clients_waiting=len(self.waiters),
                    hint="pool too small for the load, or long transactions",
                )
        else:
            stats: PoolStats = self.stats
            stats.waits += 1  # waited(0.0), without the call
        self._move(server, S_ACTIVE)
        server.client = client
        server.linked_at = now
        client.server = server
        if not client.params_full:
            # Every reported parameter too, from the first link on (not at login: idle clients
            # keep the smaller dict): two dicts with the same keys, and equal ones -- the
            # common case -- compare in one C-level comparison.
            client.params = {**(self.defaults or {}), **client.params}
            client.params_full = True
        # Equal settings (the common case) in one C-level comparison, without a call.
        want, have = client.params, server.params
        sql = None if want == have else sync_sql(want, have, self.defaults)
        delay = self.settings.server_check_delay
        if sql is None and delay >= 0 and now - server.last_used > delay:
            sql = self.settings.server_check_query  # "" is an empty query: one round trip
        if sql is None:
            client.flush_to(server, now)
        else:
            # Client bytes stay buffered until the server's settings are the client's.
            client.state = C_SETUP
            self._spawn(self._sync_then_flush(client, server, sql))

    async def _sync_then_flush(self, client: ClientConn, server: ServerConn, sql: str) -> None:
        try:
            error, _rows = await server.query_internal(sql)
        except ServerError:
            return  # connection_lost already moved it and told the client
        if server.state is not S_ACTIVE:
            return
        if client.state is C_CLOSED:
            server.client = None
            self._release(server)
            return
        defaults = self.defaults or {}
        for key in list(client.params):
            if key not in defaults:
                server.params[key] = client.params[key]
        for key in list(server.params):
            if key not in defaults and key not in client.params:
                del server.params[key]
        if error is not None:
            # The client's own startup setting is invalid: PostgreSQL would refuse the login.
            server.client = None
            client.server = None
            self._release(server) if server.tx_status == _I else self.close_server(
                server, "settings failed"
            )
            client.fail(
                error.get("C", "22023"),
                error.get("M", "invalid setting"),
                reason="invalid session setting",
            )
            return
        # Learn how the server spells what the client asked for, so the next link needs no SET;
        # a client told another spelling at login (no idle server then) hears the server's.
        respelled = []
        for key, value in list(client.params.items()):
            if key in defaults and key in server.params and key not in FIXED:
                spelled = server.params[key]
                self._canon[(key, value)] = spelled
                if spelled != value:
                    client.params[key] = spelled
                    if client.startup_params.get(key) == value:
                        client.startup_params[key] = spelled
                        respelled.append(m.parameter_status(key, spelled))
        if respelled:
            client.write(b"".join(respelled))
        client.flush_to(server)

    def close_server(self, server: ServerConn, reason: str) -> None:
        if server.state is S_CLOSED:
            return
        client = self._closed(server, reason, "server_close")
        server.close_transport()
        if client is not None:
            client.server = None
            client.fail(
                CONNECTION_FAILURE,
                f"server connection closed: {reason}",
                reason=f"server closed: {reason}",
            )
        self._fill()

    def _closed(self, server: ServerConn, reason: str, event: str) -> ClientConn | None:
        """Out of every list for good, logged with its reason (`event`: server_close when the
        proxy closes it, server_lost at warning level when it went away under us). Returns
        its client if that one must be told (see _requeue)."""
        client = server.client
        server.client = None
        self._move(server, S_CLOSED)
        server.close_reason = reason
        log_at = logger.warning if event == "server_lost" else logger.info
        where = f"{server.host}:{server.port}"
        log_at(event, pool=self.name, server=where, backend_pid=server.pid, reason=reason)
        return self._requeue(client, server, reason)

    def _requeue(
        self, client: ClientConn | None, server: ServerConn, reason: str
    ) -> ClientConn | None:
        """A server went away while its client's bytes were still held back (link setup):
        serve the client elsewhere. Returns the client if it must be told instead."""
        if client is None or client.state is not C_SETUP or client.pins:
            return client
        logger.info(
            "server_lost_retry",
            pool=self.name,
            addr=client.addr,
            server=f"{server.host}:{server.port}",
            reason=reason,
        )
        client.server = None
        if client.buffer:
            client.state = C_WAITING
            client.wait_started = time.monotonic()
            self.waiters.appendleft(client)
        else:
            client.state = C_IDLE
        return None

    def server_lost(self, server: ServerConn, reason: str) -> None:
        """The server's transport closed under us (crash, terminate, network)."""
        if server.state is S_CLOSED:
            return
        client = self._closed(server, reason, "server_lost")
        if client is not None:
            client.server = None
            if server.fatal_seen:
                client.close(f"server closed: {reason}")
            else:
                client.fail(
                    CONNECTION_FAILURE,
                    "server conn crashed? the server closed the connection unexpectedly",
                    reason=f"server closed: {reason}",
                )
        self._fill()

    def _fill(self, force: int = 0) -> None:
        """Open servers for waiting clients (and min_pool_size), within the pool's limit and
        each instance's cap, on the healthy instance with the fewest."""
        now = time.monotonic()
        if self.proxy.shutting_down and not self.waiters:
            return
        if self.paused and self.defaults is not None:
            return
        want = max(len(self.waiters) + len(self.logins) - self.connecting, force - self.connecting)
        want = max(want, self.settings.min_pool_size - self.size)
        room = self._limit(now) - self.size
        if room <= 0 and self.waiters and self._may_warn("pool_full", now):
            logger.warning(
                "pool_full",
                pool=self.name,
                servers=self.size,
                clients_waiting=len(self.waiters),
            )
        cap = self.settings.max_per_instance
        for _ in range(min(want, room)):
            inst = self.instances.choose(cap, now, self._rng)
            if inst is None:
                if self.budgets is not None:
                    self.budgets.blocked(self.instances)
                if len(self.instances) == 0 or all(
                    i.state is not InstanceState.UP for i in self.instances
                ):
                    self.discovery.request_refresh()
                return
            # Counted now, not when the task starts, so a second _fill in this tick sees it.
            inst.servers += 1
            self.connecting += 1
            self._spawn(self._connect(inst))

    async def _connect(self, inst: Instance) -> None:
        started = time.monotonic()
        try:
            server = await open_server(self, inst.addr, inst.port, self.server_hostname)
        except ServerError as exc:
            self._connect_failed(inst, exc)
            return
        except Exception as exc:  # a bug, but the pool must stay consistent
            logger.exception("server_connect_bug", pool=self.name)
            self._connect_failed(
                inst, ServerError(SQLCLIENT_UNABLE_TO_ESTABLISH, str(exc), retryable=True)
            )
            return
        role = r.role_from_params(server.params)
        if role is None:
            role = await self._ask_role(inst, server)
            if role is None:
                return
        now = time.monotonic()
        # Counted by `connecting` and inst.servers while opening; from here _move keeps books.
        server.instance = inst
        before = inst.state
        self.instances.success(inst, now, 1000.0 * (now - started))
        if before is InstanceState.QUARANTINED:
            logger.info("instance_up", pool=self.name, instance=inst.addr)
        self._role_learned(inst, self.roles.observe(inst, *role, now, self._rng), "login")
        if inst.state is InstanceState.WRONG_ROLE:
            self.close_server(server, f"instance role {inst.last_error}")
            self._fill()
            return
        if self._follow_dns():
            self._instances_changed()
        self.last_error = None
        if self.defaults is None:
            self.defaults = {k: v for k, v in server.params.items()}
        if self.settings.log_connections:
            logger.info(
                "server_connect",
                pool=self.name,
                server=f"{server.host}:{server.port}",
                backend_pid=server.pid,
                tls=server.tls,
            )
        if inst.state is InstanceState.LAGGING and inst.addr not in self.parked:
            self._move(server, S_ACTIVE)  # held for the lag check: no client gets it
            self.parked[inst.addr] = server
        else:
            # Idle before the waiting logins are answered: one may need it to learn how the
            # server spells its settings (_answer_login).
            self._release(server)
        if self.logins:
            logins, self.logins = self.logins, []
            for client in logins:
                self._answer_login(client)
            if inst in self._budget_wanted and server.state is S_IDLE:
                # The first count, held back for the logins, still goes before any query.
                self._count_on(inst, server)

    def _count_on(self, inst: Instance, server: ServerConn) -> None:
        """The budget check that waited for a server of `inst` takes this one (idle)."""
        self._budget_wanted.discard(inst)
        self._move(server, S_ACTIVE)
        self._spawn(self._budget_check(inst, server))

    def _connect_failed(self, inst: Instance, exc: ServerError) -> None:
        self.connecting -= 1
        inst.servers -= 1
        self.last_error = exc
        before = inst.state
        if before is InstanceState.QUARANTINED and not inst.trial:
            # Opened before the instance was quarantined: the same outage, not a new failure.
            inst.last_error = str(exc)
        else:
            self.instances.failure(inst, time.monotonic(), str(exc), self._rng)
        if inst.state is not before and inst.state in (
            InstanceState.DRAINING,
            InstanceState.FORGOTTEN,
        ):
            logger.info(f"instance_{inst.state.name.lower()}", pool=self.name, instance=inst.addr)
        if inst.state is not before and inst.state is InstanceState.QUARANTINED:
            logger.warning(
                "instance_quarantined",
                pool=self.name,
                instance=inst.addr,
                retry_in_s=round(max(inst.quarantine_until - time.monotonic(), 0.0), 1),
                error=str(exc),
            )
        logger.warning(
            "server_connect_failed",
            pool=self.name,
            instance=inst.addr,
            sqlstate=exc.sqlstate,
            error=str(exc),
            retryable=exc.retryable,
            instance_state=inst.state.name.lower(),
        )
        if not exc.retryable:
            # Configuration is wrong (auth, TLS): waiting will not help anyone.
            for client in [*self.logins, *self.waiters]:
                client.fail(exc.sqlstate, str(exc), reason="server login failed")
            self.logins.clear()
            self.waiters.clear()
        # Another instance may have room: clients should not wait for a quarantined one.
        self._fill()

    def _may_warn(self, what: str, now: float) -> bool:
        """At most one warning of a kind per WARN_EVERY seconds per pool: no log floods."""
        if now - self._warned.get(what, -WARN_EVERY) < WARN_EVERY:
            return False
        self._warned[what] = now
        return True

    # -- instances -----------------------------------------------------------------------------

    async def start(self) -> None:
        """Find the instances behind the upstream host (the first answer is enough)."""
        await self.discovery.start()
        # A follower pool measuring lag measures it against a leader pool's WAL position
        # when this process has one on the same cluster: leader pools then keep it.
        self.roles.record_wal = any(
            p.settings.max_replica_lag > 0 for p in self.proxy.pools.values()
        )
        self._instances_changed()

    async def stop(self) -> None:
        await self.discovery.stop()

    def _instances_changed(self) -> None:
        """An instance joined, left, failed or came back: replan the spread, serve waiters."""
        if self.budgets is not None:
            for inst in self.budgets.first_check(self.instances):
                # One server until the instance has answered: a sidecar starting under load
                # must not open its whole pool before it knows what the others hold. Its
                # first server counts (at _release) before it serves anyone.
                self._budget_wanted.add(inst)
        self._rebalance()
        self._fill()
        if not self.paused and not self.proxy.shutting_down:
            # A leader pool learns the role of each new address DNS gives at once.
            for inst in self.roles.unknown_due(self.instances):
                inst.servers += 1
                self.connecting += 1
                self._spawn(self._connect(inst))

    def _rebalance(self) -> None:
        self._excess = self.instances.excess(self.settings.max_per_instance)
        if not self._excess:
            return
        for server in list(self.idle):
            inst = server.instance
            if inst is not None and self._excess.get(inst.addr):
                self._excess[inst.addr] -= 1
                self.close_server(server, f"rebalancing away from {inst.addr}")

    def _probe(self) -> None:
        for inst in self.instances.probe_due(time.monotonic()):
            self._spawn(self._probe_one(inst))

    async def _probe_one(self, inst: Instance) -> None:
        await self.discovery.probe(inst)

    def _spawn(self, coro: Coroutine[Any, Any, None]) -> None:
        task = asyncio.get_running_loop().create_task(coro)
        self.tasks.add(task)
        task.add_done_callback(self.tasks.discard)

    # -- connection budget ---------------------------------------------------------------------

    def _hard_cap(self) -> int:
        """The most servers this pool may hold on one instance, whatever the budget says."""
        s = self.settings
        size = s.default_pool_size + s.reserve_pool_size
        return min(size, s.max_per_instance) if s.max_per_instance > 0 else size

    def _budget_tick(self, now: float) -> None:
        """Janitor: note clients waiting; start the checks that are due."""
        budgets = self.budgets
        if budgets is None or self.paused or self.proxy.shutting_down:
            return  # PAUSE waits for every server to come back; a drain needs no count
        if self.waiters:
            budgets.blocked(self.instances)
        for inst in [i for i in self._budget_wanted if i.servers <= 0]:
            # Its last server closed before coming free: count again once we hold one.
            self._budget_wanted.discard(inst)
            budgets.done(inst, now)
        if self.waiters:
            for inst in self._budget_wanted:
                if inst.budget is None and inst.soft_cap and inst.active >= inst.servers > 0:
                    # Never counted, and its servers are all held (a transaction left open):
                    # the one-server start must not hold the waiting clients back.
                    inst.soft_cap = 0
        for inst in budgets.due(self.instances, now):
            # The most recently used idle server there (the LIFO top): it goes back on top.
            spare = next((x for x in reversed(self.idle) if x.instance is inst), None)
            if spare is None:
                self._budget_wanted.add(inst)  # the next one released there (_release)
                continue
            self._move(spare, S_ACTIVE)
            self._spawn(self._budget_check(inst, spare))

    async def _budget_check(self, inst: Instance, server: ServerConn) -> None:
        """Count the user's backends on the instance, on one of our servers, and apply it."""
        assert self.budgets is not None
        sql = budget.QUERY.format(user=_literal(self.config.upstream.user))
        last_used = server.last_used
        try:
            error, rows = await server.query_internal(sql)
        except ServerError:
            self.budgets.done(inst, time.monotonic())
            return  # connection_lost (or the stall timeout) already moved it
        now = time.monotonic()
        row = rows[0] if rows else []
        if server.state is not S_ACTIVE or error is not None or len(row) != 3:
            self.budgets.done(inst, now)
            self.close_server(server, f"budget check failed: {error}")
            return
        if server.tx_status != _I:
            self.budgets.done(inst, now)
            self.close_server(server, "budget check left a transaction open")
            return
        total, max_conn, reserved = (int(v or 0) for v in row)
        before = inst.soft_cap
        warn = self.budgets.answer(
            inst,
            total=total,
            max_connections=max_conn,
            reserved=reserved,
            hard=self._hard_cap(),
        )
        # After the answer: an instance that has never answered is counted again at once.
        self.budgets.done(inst, now)
        if inst.soft_cap != before:
            logger.info(
                "soft_cap",
                pool=self.name,
                instance=inst.addr,
                soft_cap=inst.soft_cap,
                was=before,
                servers=inst.servers,
                instance_total=total,
                budget=inst.budget,
            )
        if warn and self._may_warn(f"over_budget {inst.addr}", now):
            logger.warning(
                "instance_over_budget",
                pool=self.name,
                instance=inst.addr,
                instance_total=total,
                budget=inst.budget,
                servers=inst.servers,
                soft_cap=inst.soft_cap,
                checks=self.budgets.state(inst).over,
                hint="connections outside the sidecars (another process, a console) use the budget",
            )
        # Not a use by a client: the idle timeout and server_check_delay still count from
        # the last client.
        self._release(server)
        if server.state is S_IDLE:
            server.last_used = last_used
        # A lower cap: retire idle servers above it now, busy ones at release; a higher one:
        # open for the clients waiting.
        self._rebalance()
        self._fill()

    # -- views ---------------------------------------------------------------------------------

    def gauges(self) -> dict[str, int]:
        """Right-now figures for the stats line and the admin console."""
        linked = sum(1 for s in self.active if s.client is not None)
        pinned = sum(1 for s in self.active if s.client is not None and s.client.pins)
        return {
            "clients.active": linked,
            "clients.pinned": pinned,
            "clients.waiting": len(self.waiters) + len(self.logins),
            "servers.active": len(self.active),
            "servers.idle": len(self.idle),
            "servers.connecting": self.connecting,
            "servers.max": self.settings.default_pool_size + self.settings.reserve_pool_size,
        }

    def instance_lines(self) -> list[dict[str, object]]:
        """One stats line's fields per instance (failures counted since the last line)."""
        lines: list[dict[str, object]] = []
        cap = self.settings.max_per_instance
        for row in self.instances.snapshot(time.monotonic(), cap):
            total = row["connect_failures"]
            failures = total - self._reported_failures.get(row["addr"], 0)
            if failures < 0:  # forgotten and seen again: a new instance, counting from 0
                failures = total
            self._reported_failures[row["addr"]] = total
            line: dict[str, object] = {
                "instance": row["addr"],
                "state": row["state"],
                "sample#servers": row["servers"],
                "sample#cap": cap,
            }
            if row["connect_ms"] is not None:
                line["sample#connect_ms"] = row["connect_ms"]
            line["count#connect_failures"] = failures
            line["count#connect_failures"] = failures
            if row["lag_s"] is not None:
                line["sample#lag_s"] = row["lag_s"]
            if row["hot_standby"] is not None:
                line["role"] = r.role_name(row["hot_standby"], row["read_only"])
            if row["budget"] is not None:
                line["sample#budget"] = row["budget"]
                line["sample#soft_cap"] = row["soft_cap"]
                line["sample#instance_total"] = row["instance_total"]
            if row["last_error"]:
                line["last_error"] = row["last_error"]
            lines.append(line)
        return lines

    # -- janitor -------------------------------------------------------------------------------

    def maintain(self, now: float) -> None:
        """Periodic work: timeouts, lifetimes, probes, rebalancing, min pool size, retries."""
        s = self.settings
        self._probe()
        self._check_roles(now)
        self._budget_tick(now)
        self._rebalance()
        for client in [*self.waiters, *self.logins]:
            if s.query_wait_timeout and now - client.wait_started >= s.query_wait_timeout:
                if self.last_error is not None and self.size == 0:
                    client.fail(
                        SQLCLIENT_UNABLE_TO_ESTABLISH,
                        f"no server available: {self.last_error}",
                        reason="query_wait_timeout, servers down",
                    )
                else:
                    client.fail(
                        TOO_MANY_CONNECTIONS,
                        "query_wait_timeout: no server connection became free",
                        reason="query_wait_timeout",
                    )
        keep = s.min_pool_size
        for server in list(self.idle):
            if now >= server.expires_at:
                self.close_server(server, "server lifetime over")
            elif (
                s.server_idle_timeout
                and now - server.last_used >= s.server_idle_timeout
                and self.size > keep
            ):
                self.close_server(server, "server idle timeout")
        if s.query_timeout:
            for server in list(self.active):
                holder = server.client
                if (
                    holder is not None
                    and server.pending
                    and now - server.query_start >= s.query_timeout
                ):
                    server.client = None
                    holder.server = None
                    holder.fail(
                        QUERY_CANCELED,
                        "canceling statement due to query_timeout",
                        reason="query_timeout",
                    )
                    self.close_server(server, "query_timeout")
        if s.idle_transaction_timeout or s.client_idle_timeout:
            for server in list(self.active):
                holder = server.client
                if (
                    holder is not None
                    and s.idle_transaction_timeout
                    and not server.pending
                    and server.tx_status != _I
                    and now - holder.last_active >= s.idle_transaction_timeout
                ):
                    holder.fail(
                        IDLE_IN_TRANSACTION_TIMEOUT,
                        "terminating connection due to idle-in-transaction timeout",
                        reason="idle_transaction_timeout",
                    )
        if s.client_idle_timeout:
            for client in self.proxy.clients_of(self):
                if client.state is C_IDLE and now - client.last_active >= s.client_idle_timeout:
                    client.fail(
                        IDLE_SESSION_TIMEOUT,
                        "terminating connection due to client_idle_timeout",
                        reason="client_idle_timeout",
                    )
        self._fill()

    def close_all(self, reason: str) -> None:
        for server in [*self.idle, *self.active]:
            self.close_server(server, reason)

    def close_idle(self, reason: str) -> None:
        for server in list(self.idle):
            self.close_server(server, reason)

    async def pause(self) -> None:
        """Hand out no servers; return once every server is back, then close them (PAUSE)."""
        self.paused = True
        for server in list(self.parked.values()):
            self.close_server(server, "pause")
        self.parked.clear()
        while self.active or self.connecting:
            await asyncio.sleep(0.05)
            if not self.paused:
                return
        self.close_idle("pause")

    def reconnect(self) -> None:
        """Replace every server: idle ones now, busy ones when their client releases them."""
        for server in self.active:
            server.expires_at = 0.0
        self.close_idle("reconnect requested")
        self._fill()

    def resume(self) -> None:
        self.paused = False
        while self.waiters and self.idle:
            self._link(self.waiters.popleft(), self.idle[-1])
        self._fill()

    # -- roles -----------------------------------------------------------------------------------

    async def _ask_role(self, inst: Instance, server: ServerConn) -> tuple[bool, bool] | None:
        """Before PostgreSQL 14 the role is not reported at login: one query."""
        try:
            error, rows = await server.query_internal(r.ROLE_QUERY)
        except ServerError as exc:
            if server.state is S_CLOSED:
                # query_internal's stall timeout closed it while still counted as connecting;
                # _connect_failed keeps the books for a failed connect.
                self.connecting += 1
            server.close_transport()
            self._connect_failed(inst, exc)
            return None
        if error is not None or not rows:
            server.close_transport()
            self._connect_failed(
                inst,
                ServerError(
                    SQLCLIENT_UNABLE_TO_ESTABLISH,
                    f"role query failed: {error and error.get('M')}",
                    retryable=True,
                ),
            )
            return None
        return bool(r.truthy(rows[0][0])), bool(r.truthy(rows[0][1]))

    def _role_learned(self, inst: Instance, change: r.Change, source: str) -> None:
        """Log what a role observation changed; replan when an instance left or came back."""
        if change is r.Change.NONE:
            return
        if change is r.Change.RESOLVED:
            logger.info(
                "pool",
                pool=self.name,
                target=self.roles.target,
                role=self.roles.pool_role,
                instance=inst.addr,
                instance_role=r.role_name(inst.hot_standby, inst.read_only),
            )
            if inst.state is not InstanceState.WRONG_ROLE:
                return
        role = r.role_name(inst.hot_standby, inst.read_only)
        about = {"pool": self.name, "instance": inst.addr, "role": role, "source": source}
        if inst.state is InstanceState.WRONG_ROLE:
            logger.warning(
                "instance_wrong_role",
                **about,
                target=self.roles.target,
                servers=inst.servers,
                retry_in_s=round(max(inst.recheck_at - time.monotonic(), 0.0), 1),
            )
            if self.roles.none_match(self.instances):
                self.discovery.request_refresh()
        else:
            logger.info("instance_role_ok", **about, target=self.roles.target)
        self._follow_dns()
        self._instances_changed()

    def _dns_answer(self, addrs: list[str]) -> list[Instance]:
        self.roles.answered(self.instances, addrs)
        return self.roles.follow_dns(self.instances)

    def _follow_dns(self) -> bool:
        """A leader pool whose newest DNS address proved itself: retire the superseded ones.
        True if one was."""
        retired = self.roles.follow_dns(self.instances)
        for inst in retired:
            logger.info(
                f"instance_{inst.state.name.lower()}",
                pool=self.name,
                instance=inst.addr,
                servers=inst.servers,
                reason="no longer in DNS; the address DNS names is the leader",
            )
        return bool(retired)

    def _leader_wal(self, system_id: str | None) -> r.WalHistory | None:
        """The WAL history of a leader pool of this process on the same cluster, if any."""
        if system_id is None:
            return None
        for pool in self.proxy.pools.values():
            if pool.roles.leader and pool.roles.system_id == system_id and pool.roles.wal.samples:
                return pool.roles.wal
        return None

    def role_reported(self, server: ServerConn, name: str, value: str) -> None:
        """A server reported a new in_hot_standby, or a default_transaction_read_only its
        client did not set (promotion, demotion, ALTER SYSTEM + reload): re-judge the role."""
        inst = server.instance
        if inst is None or inst.hot_standby is None:
            return
        hot, read_only = inst.hot_standby, bool(inst.read_only)
        if name == "in_hot_standby":
            hot = bool(r.truthy(value))
        else:
            read_only = bool(r.truthy(value))
        if (hot, read_only) == (inst.hot_standby, inst.read_only):
            return
        change = self.roles.observe(inst, hot, read_only, time.monotonic(), self._rng)
        self._role_learned(inst, change, "reported")

    def _check_roles(self, now: float) -> None:
        """Janitor: role re-checks by login, periodic role/lag checks on idle servers, and
        clients failed when no instance has the target role."""
        if self.proxy.shutting_down:
            return
        room = self._limit(now) - self.size
        for inst in self.roles.recheck_due(self.instances, now):
            if room <= 0 or self.paused:
                inst.trial = False
                continue
            room -= 1
            inst.servers += 1
            self.connecting += 1
            self._spawn(self._connect(inst))
        for inst in self.roles.check_due(self.instances, now, self.settings.lag_check_interval):
            server = self.parked.pop(inst.addr, None)
            if server is None or server.state is not S_ACTIVE:
                server = next((s for s in reversed(self.idle) if s.instance is inst), None)
                if server is None:
                    if inst.state is InstanceState.LAGGING and not inst.servers and room > 0:
                        # Its servers are gone: a new one to measure it (parked by _connect).
                        room -= 1
                        inst.servers += 1
                        self.connecting += 1
                        inst.role_checked = now
                        self._spawn(self._connect(inst))
                    continue
                self._move(server, S_ACTIVE)
            inst.checking = True
            self._spawn(self._check(inst, server))
        if (self.waiters or self.logins) and self.roles.none_match(self.instances):
            reason = self.roles.mismatch_reason(self.instances)
            for client in [*self.waiters, *self.logins]:
                if now - client.wait_started >= ROLE_WAIT:
                    client.fail(
                        SQLCLIENT_UNABLE_TO_ESTABLISH, reason, reason="no server with the role"
                    )

    async def _check(self, inst: Instance, server: ServerConn) -> None:
        """One role/lag check on a server taken from idle (or parked): then back, or kept
        parked while its instance lags, or closed if its role is wrong."""
        last_used = server.last_used
        try:
            error, rows = await server.query_internal(r.CHECK_QUERY)
        except ServerError:
            return  # connection_lost (or the stall timeout) closed it
        finally:
            inst.checking = False
        if server.state is not S_ACTIVE:
            return
        if error is not None or not rows or server.tx_status != _I:
            self.close_server(server, f"role check failed: {error and error.get('M')}")
            return
        now = time.monotonic()
        check = r.parse_check(rows[0])
        hot = check.hot_standby
        inst.role_checked = now
        self.roles.system_id = check.system_id or self.roles.system_id
        if self.roles.leader and not hot and check.lsn is not None:
            self.roles.wal.add(now, check.lsn)
        change = self.roles.observe(inst, hot, check.read_only, now, self._rng)
        self._role_learned(inst, change, "check")
        lag, lag_from = check.lag_s, "replay_timestamp"
        wal = self._leader_wal(check.system_id) if hot and check.lsn is not None else None
        if wal is not None and check.lsn is not None:
            by_lsn = wal.lag(check.lsn, now, 3 * self.settings.lag_check_interval + 1.0)
            if by_lsn is not None:
                lag, lag_from = by_lsn, "leader_lsn"
        changed = self.roles.lag(self.instances, inst, lag if hot else None)
        for other in changed:
            lagging = other.state is InstanceState.LAGGING
            logger.info(
                "instance_lagging" if lagging else "instance_caught_up",
                pool=self.name,
                instance=other.addr,
                lag_s=None if other.lag_s is None else round(other.lag_s, 1),
                max_lag_s=self.roles.max_lag,
                lag_from=lag_from,
            )
        if self.roles.all_lagging(self.instances) and self._may_warn("all_lagging", now):
            logger.warning(
                "all_instances_lagging",
                pool=self.name,
                max_lag_s=self.roles.max_lag,
                serving=",".join(i.addr for i in self.instances if i.state is InstanceState.UP),
            )
        if changed:
            self._rebalance()  # the new plan first: an instance caught up keeps its servers
        if inst.state is InstanceState.WRONG_ROLE:
            self.close_server(server, f"instance role {inst.last_error}")
        elif inst.state is InstanceState.LAGGING and inst.addr not in self.parked:
            self.parked[inst.addr] = server
        else:
            self._release(server)
            if server.state is S_IDLE:
                server.last_used = last_used  # a check is not use: idle timeouts still apply
        if changed:
            self._fill()


__all__ = ["Pool"]
