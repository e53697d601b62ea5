"""Client side: one app connection, from startup packet and authentication to byte forwarding.

Thin asyncio glue over the sans-IO protocol core. Which server a client gets, and when it is
given back, is decided by `Pool`.
"""

from __future__ import annotations

import asyncio
import enum
import secrets
import time
from collections.abc import Callable
from typing import TYPE_CHECKING, Protocol, cast

from .. import log
from ..protocol import messages as m
from ..protocol.auth import AuthError, ScramServer, verify_md5_response
from ..protocol.backend import Backend
from ..protocol.errors import (
    ADMIN_SHUTDOWN,
    INVALID_AUTHORIZATION,
    INVALID_CATALOG_NAME,
    INVALID_PASSWORD,
    PROTOCOL_VIOLATION,
    TOO_MANY_CONNECTIONS,
    ProtocolError,
)
from ..protocol.frontend import Frontend, local_prepare
from .counters import PoolStats
from .sockets import TLS_READ_BUFFER, follow, set_nodelay

if TYPE_CHECKING:
    from .pool import Pool
    from .proxy import Proxy
    from .server import ServerConn

logger = log.get()


class ConsoleSession(Protocol):
    """What a console connection needs of the admin console (control.console.AdminSession).

    The proxy hands the console in (Proxy.console), so the data plane never imports it.
    """

    def welcome(self) -> bytes: ...

    def feed(self, data: bytes) -> None: ...


# Startup parameters that are session settings; anything else unknown is passed as a SET too.
_CANONICAL_NAMES = {
    "datestyle": "DateStyle",
    "timezone": "TimeZone",
    "intervalstyle": "IntervalStyle",
}
_PARSE_COMPLETE = b"1\x00\x00\x00\x04"
_TERMINATE = m.TERMINATE_MSG  # a module global: one lookup less per request
_I = ord("I")
_P = ord("P")
# Database names that reach the admin console instead of a pool (pgbouncer: scripts keep working).
ADMIN_DATABASES = ("sidecar", "pgbouncer")
# Startup keys that are not session settings.
_NOT_SETTINGS = {"user", "database", "options", "replication"}


def _unconnected(data: bytes) -> None:
    raise ConnectionError("no transport yet")


_CLIENT_CLOSED = "client closed the connection"


class ClientState(enum.Enum):
    STARTUP = "startup"  #: reading the startup packet (maybe after an SSLRequest)
    AUTH = "auth"  #: exchanging authentication messages
    LOGIN = "login"  #: authenticated; waiting for the pool's first server to learn its parameters
    IDLE = "idle"  #: logged in, holding no server
    WAITING = "waiting"  #: in Pool.waiters, with bytes buffered for the server it waits for
    SETUP = "setup"  #: a server is assigned and gets this client's settings; bytes still buffered
    LINKED = "linked"  #: holds a server; bytes flow both ways
    ADMIN = "admin"  #: logged in to the admin console; queries answered by AdminSession
    CLOSED = "closed"  #: gone


# The members as module globals: an Enum attribute lookup costs ~65 ns, and the hot path tests
# states several times per message.
C_STARTUP, C_AUTH, C_LOGIN, C_IDLE, C_WAITING, C_SETUP, C_LINKED, C_ADMIN, C_CLOSED = ClientState


#: Shared by every unpinned client (an empty set would cost 216 bytes each).
NO_PINS: frozenset[str] = frozenset()

_BUFFERING = (C_IDLE, C_WAITING, C_SETUP, C_LOGIN)


def parse_options(options: str) -> dict[str, str]:
    """`-c name=value` / `--name=value` settings from the startup `options` parameter."""
    out: dict[str, str] = {}
    tokens: list[str] = []
    cur: list[str] = []
    escaped = False
    for ch in options:
        if escaped:
            cur.append(ch)
            escaped = False
        elif ch == "\\":
            escaped = True
        elif ch.isspace():
            if cur:
                tokens.append("".join(cur))
                cur = []
        else:
            cur.append(ch)
    if cur:
        tokens.append("".join(cur))
    i = 0
    while i < len(tokens):
        tok = tokens[i]
        if tok == "-c" and i + 1 < len(tokens):
            tok = tokens[i + 1]
            i += 1
        elif tok.startswith("-c") or tok.startswith("--"):
            tok = tok[2:]
        else:
            raise ProtocolError(f"invalid command-line argument for server process: {tok}", "42601")
        name, sep, value = tok.partition("=")
        if not sep:
            raise ProtocolError(f"invalid command-line argument for server process: {tok}", "42601")
        out[name.replace("-", "_")] = value
        i += 1
    return out


def setting_name(name: str) -> str:
    low = name.lower()
    return _CANONICAL_NAMES.get(low, low)


class ClientConn:
    """One app connection to the proxy: an asyncio protocol (data_received).

    No asyncio base class: in the compiled build it is an extension type (client.pxd), which
    cannot derive from one; event loops only call its methods (see server.as_protocol).
    """

    # Slots: no per-instance dict (10,000 idle clients), faster attribute access.
    __slots__ = (
        "_handshaking",
        "_md5_salt",
        "_negotiated",
        "_paused",
        "_reader",
        "_sasl_started",
        "_scram",
        "_startup",
        "_tcp",
        "_user_ok",
        "addr",
        "admin",
        "buffer",
        "connected_at",
        "counted",
        "database",
        "frontend",
        "last_active",
        "params",
        "params_full",
        "pid",
        "pins",
        "pool",
        "proxy",
        "secret",
        "server",
        "startup_params",
        "state",
        "tls",
        "transport",
        "user",
        "wait_started",
        "write",
    )

    def __init__(self, proxy: Proxy) -> None:
        self.proxy = proxy
        self.transport: asyncio.Transport | None = None
        #: The transport's write (a bound method: one call less per message).
        self.write: Callable[[bytes], object] = _unconnected
        self.state = C_STARTUP
        self.pool: Pool | None = None
        self.server: ServerConn | None = None
        self.user = self.database = self.addr = ""
        #: Came in over TCP (TLS is offered there; PostgreSQL refuses it on a Unix socket).
        self._tcp = False
        #: The connection is encrypted (after an SSLRequest answered "S" and a handshake).
        self.tls = False
        #: Between that "S" and the handshake's end: nothing may be written in clear.
        self._handshaking = False
        # What this client's session should look like on any server: reported params and SETs.
        self.params: dict[str, str] = {}
        #: `params` holds every parameter a server reports too (see Pool._link).
        self.params_full = False
        #: The settings of its startup packet: what RESET ALL / DISCARD ALL go back to.
        self.startup_params: dict[str, str] = {}
        self.pid = self.secret = 0
        self.frontend = Frontend(inspect=False)
        self._startup: m.StartupReader | None = m.StartupReader()
        # SSLRequest / GSSENCRequest seen (a tuple: a set costs 216 bytes per client).
        self._negotiated: tuple[type, ...] = ()
        self._reader: m.MessageReader | None = None
        self._scram: ScramServer | None = None
        self._md5_salt = b""
        self._sasl_started = self._user_ok = False
        self.buffer: list[bytes] = []
        #: Why this client keeps its server past transactions (transaction mode), if it does.
        self.pins: frozenset[str] = NO_PINS
        self.wait_started = 0.0
        self.last_active = time.monotonic()
        self.connected_at = self.last_active
        self._paused = self.counted = False
        self.admin: ConsoleSession | None = None

    # -- asyncio callbacks ------------------------------------------------------------------

    def connection_made(self, transport: asyncio.BaseTransport) -> None:
        # uvloop's transports implement asyncio.Transport without subclassing it.
        self.transport = cast(asyncio.Transport, transport)
        self.write = self.transport.write
        set_nodelay(self.transport)
        peer = transport.get_extra_info("peername")
        self._tcp = isinstance(peer, tuple)
        self.addr = f"{peer[0]}:{peer[1]}" if self._tcp else "unix"
        self.proxy.client_connected(self)

    def data_received(self, data: bytes) -> None:
        try:
            if self.state is C_LINKED:
                self._forward(data)
            elif self.state in _BUFFERING:
                self._buffer(data)
            elif self.state is C_STARTUP:
                self._startup_data(data)
            elif self.state is C_AUTH:
                self._auth_data(data)
            elif self.state is C_ADMIN:
                assert self.admin is not None
                self.admin.feed(data)
        except ProtocolError as exc:
            if exc.silent:
                # As PostgreSQL: logged, closed without an ErrorResponse (the peer is no
                # PostgreSQL client, or one closing a connection it has not started).
                self.close(f"protocol violation: {exc}")
            else:
                self.fail(exc.sqlstate, str(exc), reason=f"protocol violation: {exc}")

    def eof_received(self) -> None:
        return None  # the transport closes; connection_lost follows

    def connection_lost(self, exc: Exception | None) -> None:
        if self.state is not C_CLOSED:
            startup = self._startup
            if self.state is C_STARTUP and startup is not None and startup.pending():
                # As PostgreSQL, which logs it: a client gone in the middle of its first packet.
                self._gone("incomplete startup packet")
            else:
                self._gone(_CLIENT_CLOSED)

    def pause_writing(self) -> None:
        follow(self.server, writable=False)  # the client reads slower than the server sends

    def resume_writing(self) -> None:
        follow(self.server, writable=True)

    # -- data phase ----------------------------------------------------------------------------

    def _forward(self, data: bytes, now: float = 0.0) -> None:
        """Walk the client's bytes for the linked server and send them."""
        server = self.server
        assert server is not None
        # Annotated locals: in the compiled build, C-level access to the walkers' fields
        # (client.pxd cimports their types).
        frontend: Frontend = self.frontend
        backend: Backend = server.backend
        try:
            out, requests, terminate = frontend.feed(
                data, server.statements, server.pool.registry, backend.copy_in
            )
        except ProtocolError as exc:
            # The walker may have booked messages before the bad one that were never sent:
            # that server's bookkeeping no longer matches it, so no one else may have it.
            server.out_of_step = True
            self.protocol_violation(str(exc))
            return
        now = now or time.monotonic()
        server.mid_message = frontend.mid_message
        if out:
            if not server.pending:  # nothing in flight: start the clocks
                server.query_start = now
                if backend.tx_status == _I:
                    server.xact_start = now
            server.pending += requests
            server.dirty_tail = frontend.dirty_tail
            server.write(out)
            stats: PoolStats = server.stats
            stats.bytes_in += len(out)
        self.last_active = now
        if terminate:
            self._gone("client close request")

    def _buffer(self, data: bytes) -> None:
        if not self.buffer:
            if data == _TERMINATE:
                self._gone("client close request")
                return
            # Only a named Parse (data[5]: the name's first byte) can be answered locally.
            if (
                data[0] == _P
                and len(data) > 5
                and data[5]
                and self.state is C_IDLE
                and self._prepare_locally(data)
            ):
                return
        self.buffer.append(data)
        if self.state is C_IDLE:
            assert self.pool is not None
            self.pool.acquire(self)

    def _prepare_locally(self, data: bytes) -> bool:
        """Answer a prepare-only batch of known statements without taking a server."""
        pool = self.pool
        if pool is None or not pool.transaction_mode or not pool.settings.max_prepared_statements:
            return False
        prepared = local_prepare(data, pool.registry)
        if prepared is None:
            return False
        self.frontend.prepared_locally(prepared)
        self.write(_PARSE_COMPLETE * len(prepared) + m.ready_for_query(b"I"))
        return True

    def flush_to(self, server: ServerConn, now: float = 0.0) -> None:
        """Linked to `server`: send what was buffered while waiting, then forward directly."""
        self.server = server
        self.state = C_LINKED
        server.backend.client_pid = self.pid
        buffer = self.buffer
        if buffer:
            data = buffer[0] if len(buffer) == 1 else b"".join(buffer)
            buffer.clear()
            self._forward(data, now)
        if self._paused:
            self.resume_reading()

    def unlink(self, now: float = 0.0) -> None:
        """The server went back to the pool; the client holds none until its next request."""
        self.server = None
        self.last_active = now or time.monotonic()
        if self.state is C_LINKED:
            self.state = C_IDLE
        if self._paused:
            self.resume_reading()

    def pause_reading(self) -> None:
        if self.transport is not None and not self._paused and not self.transport.is_closing():
            self._paused = True
            self.transport.pause_reading()

    def resume_reading(self) -> None:
        if self.transport is not None and self._paused and not self.transport.is_closing():
            self._paused = False
            self.transport.resume_reading()

    # -- startup and authentication --------------------------------------------------------------

    def _startup_data(self, data: bytes) -> None:
        assert self._startup is not None
        while True:
            event, data = self._startup.feed(data)
            if event is None:
                return
            if not isinstance(event, m.SSLRequest | m.GSSENCRequest):
                break
            # As PostgreSQL: each may come once (libpq: GSSENCRequest, then SSLRequest).
            kind = type(event)
            if kind in self._negotiated:
                raise ProtocolError(
                    "unsupported frontend protocol 1234.5679: server supports 3.0 to 3.0",
                    "0A000",
                )
            self._negotiated += (kind,)
            if kind is m.SSLRequest and self._tcp and self.proxy.client_tls_on:
                self.write(b"S")
                if data:
                    # Bytes sent before the handshake were not encrypted: PostgreSQL refuses
                    # them ("received unencrypted data after SSL request", CVE-2021-23214).
                    self.close("received unencrypted data after SSL request")
                    return
                self._handshaking = True
                self.proxy.spawn(self._start_tls())
                return
            # GSSAPI, TLS turned off, or a Unix socket (PostgreSQL answers "N" there too;
            # libpq does not even ask): the client goes on in clear, or gives up.
            self.write(b"N")
        rest = data
        if isinstance(event, m.CancelRequest):
            self.proxy.cancel(event.pid, event.secret)
            self.close("cancel request handled", log_it=False)
            return
        self._startup = None
        self._login_start(event.params)
        if rest and self.state is C_AUTH:
            self._auth_data(rest)

    async def _start_tls(self) -> None:
        """The TLS handshake after an "S"; then the startup packet comes encrypted."""
        transport = self.transport
        ctx = self.proxy.client_tls_ctx
        if ctx is None and transport is not None:
            # Right after start, the generated certificate may still be in the making: the
            # ClientHello waits in the kernel (start_tls resumes reading), not in the parser
            # of startup packets.
            transport.pause_reading()
            ctx = await self.proxy.client_tls_context()
            transport = self.transport
        if self.state is C_CLOSED or transport is None:
            return
        if ctx is None:
            self.close("TLS handshake failed: no certificate (see at=client_tls_failed)")
            return
        reader = TLSReader(self)
        timeout = self.proxy.settings.client_login_timeout
        try:
            new = await asyncio.get_running_loop().start_tls(
                transport,
                reader,
                ctx,
                server_side=True,
                # Past the login timeout: that one closes it, with its reason.
                ssl_handshake_timeout=timeout + 1 if timeout else None,
            )
        except Exception as exc:  # ssl.SSLError, ConnectionResetError, a handshake timeout
            self._handshaking = False
            if self.state is not C_CLOSED:
                why = getattr(exc, "reason", None) or str(exc) or exc.__class__.__name__
                self.close(f"TLS handshake failed: {why}")
            return
        self._handshaking = False
        if new is None or self.state is C_CLOSED:  # closed meanwhile (login timeout, shutdown)
            if new is not None:
                new.close()
            if self.state is not C_CLOSED:
                self.close("TLS handshake failed: no transport")
            return
        self.transport = new
        self.write = new.write
        self.tls = True
        reader.start()

    def _login_start(self, params: dict[str, str]) -> None:
        self.user = params["user"]
        self.database = params.get("database") or self.user
        if self.proxy.shutting_down:
            self.fail(
                ADMIN_SHUTDOWN, "the database system is shutting down", reason="shutting down"
            )
            return
        if self._tcp and not self.tls and self.proxy.settings.client_tls == "require":
            # What PostgreSQL says when only `hostssl` lines would match.
            host = self.addr.rpartition(":")[0]
            self.fail(
                INVALID_AUTHORIZATION,
                f'no pg_hba.conf entry for host "{host}", user "{self.user}",'
                f' database "{self.database}", no encryption',
                reason="connection without TLS refused (SIDECAR_CLIENT_TLS=require)",
            )
            return
        if not self.proxy.admit(self):
            self.fail(
                TOO_MANY_CONNECTIONS,
                "no more connections allowed (max_client_conn)",
                reason="max_client_conn reached",
            )
            return
        pool = self.proxy.pools.get(self.database)
        if self.database in ADMIN_DATABASES:
            # The console takes the credentials of any pool: the first pool of this user.
            pool = next(
                (p for p in self.proxy.pools.values() if p.config.upstream.user == self.user),
                next(iter(self.proxy.pools.values()), None),
            )
        if pool is None:
            self.fail(
                INVALID_CATALOG_NAME,
                f'database "{self.database}" does not exist',
                reason="unknown database",
            )
            return
        self.pool = pool
        self.frontend.inspect = pool.transaction_mode
        settings: dict[str, str] = {}
        for key, value in params.items():
            if key == "options":
                settings.update(parse_options(value))
            elif key not in _NOT_SETTINGS and not key.startswith("_pq_."):
                settings[key] = value
        self.params = {setting_name(k): v for k, v in settings.items()}
        up = pool.config.upstream
        # Unknown users still go through the whole exchange, so the reply tells nothing.
        self._user_ok = self.user == up.user
        self._reader = m.MessageReader(max_length=10_000)
        self.state = C_AUTH
        if self.proxy.settings.auth_type == "md5":
            self._md5_salt = secrets.token_bytes(4)
            self.write(m.auth_md5(self._md5_salt))
        else:
            self._scram = ScramServer(pool.scram_secret)
            self.write(m.auth_sasl(["SCRAM-SHA-256"]))

    def _auth_data(self, data: bytes) -> None:
        reader = self._reader
        assert reader is not None and self.pool is not None
        reader.feed(data)
        while self.state is C_AUTH:
            msg = reader.next()
            if msg is None:
                return
            typ, body = msg
            if typ != m.PASSWORD_MESSAGE:
                raise ProtocolError(f"expected password response, got message type {chr(typ)!r}")
            self._auth_step(body)
        if self._reader is not None and self.state is not C_CLOSED:
            # Bytes pipelined after the last auth message are the client's first queries.
            rest = reader.take_rest()
            self._reader = None
            if rest:
                self._buffer(rest)

    def _auth_step(self, body: bytes) -> None:
        assert self.pool is not None
        up = self.pool.config.upstream
        scram = self._scram
        try:
            if scram is None:
                ok = verify_md5_response(up.user, up.password, self._md5_salt, body)
                if not (ok and self._user_ok):
                    raise AuthError("md5 mismatch")
                self._authenticated()
            elif not self._sasl_started:
                self._sasl_started = True
                mechanism, first = m.parse_sasl_initial_response(body)
                if mechanism != "SCRAM-SHA-256":
                    raise AuthError("unsupported SASL mechanism")
                self.write(m.auth_request(m.AUTH_SASL_CONTINUE, scram.handle_client_first(first)))
            else:
                final = scram.handle_client_final(body)
                if not self._user_ok:
                    raise AuthError("unknown user")
                self.write(m.auth_request(m.AUTH_SASL_FINAL, final))
                self._authenticated()
        except (AuthError, ProtocolError):
            self.proxy.auth_failed(self)
            self.fail(
                INVALID_PASSWORD,
                f'password authentication failed for user "{self.user}"',
                reason="password authentication failed",
            )

    def _authenticated(self) -> None:
        assert self.pool is not None
        self.write(m.AUTH_OK_MSG)
        self._scram = None
        self.proxy.client_authenticated(self)
        self.pid, self.secret = self.proxy.register_key(self)
        if self.database in ADMIN_DATABASES:
            self.admin = self.proxy.console(self.proxy, self)
            self.state = C_ADMIN
            self.write(self.admin.welcome())
            if self.proxy.settings.log_connections:
                logger.info("admin_login", user=self.user, addr=self.addr)
            assert self._reader is not None
            rest = self._reader.take_rest()
            self._reader = None
            if rest:
                self.admin.feed(rest)
            return
        self.state = C_LOGIN
        self.pool.login(self)

    def finish_login(self) -> None:
        """The pool knows its servers' parameters: tell the client and let it send queries."""
        assert self.pool is not None
        if self.state is not C_LOGIN:
            return
        wanted = self.pool.canonical(self.params)
        self.startup_params = dict(wanted)
        self.params = wanted
        defaults = self.pool.defaults or {}
        out = [m.parameter_status(k, wanted.get(k, v)) for k, v in defaults.items()]
        out.append(m.backend_key_data(self.pid, self.secret))
        out.append(m.ready_for_query())
        self.write(b"".join(out))
        self.state = C_IDLE
        if self.proxy.settings.log_connections:
            logger.info(
                "login", pool=self.pool.name, user=self.user, addr=self.addr, client_pid=self.pid
            )
        if self.buffer:
            self.pool.acquire(self)

    # -- endings -----------------------------------------------------------------------------

    def fail(self, sqlstate: str, text: str, *, reason: str) -> None:
        """Send a FATAL error and close; the reason goes to the log."""
        if self.pool is not None:
            self.pool.stats.errors += 1
        if (
            self.transport is not None
            and not self.transport.is_closing()
            and not self._handshaking  # in clear, into a TLS handshake: only noise to it
        ):
            self.transport.write(m.fatal(sqlstate, text))
        self.close(reason)

    def login_timed_out(self, timeout: float) -> None:
        """Not logged in client_login_timeout after connecting: closed without a word, as
        PostgreSQL does on authentication_timeout (a client that went quiet is not reading)."""
        if self.state in (C_STARTUP, C_AUTH):
            self.close(f"client_login_timeout ({timeout:g}s) in {self.state.value}")

    def close(self, reason: str, *, log_it: bool = True) -> None:
        if self.transport is not None:
            self.transport.close()
        if self.state is not C_CLOSED:
            self._gone(reason, log_it=log_it)

    def _gone(self, reason: str, *, log_it: bool = True) -> None:
        state = self.state
        self.state = C_CLOSED
        if self.transport is not None and not self.transport.is_closing():
            self.transport.close()
        if self.pool is not None:
            self.pool.client_gone(self, state, reason)
        self.proxy.client_disconnected(self)
        # A client gone before its startup packet is a port probe, unless something went wrong.
        quiet = state is C_STARTUP and reason == _CLIENT_CLOSED
        if log_it and self.proxy.settings.log_disconnections and not quiet:
            logger.info(
                "disconnect",
                pool=self.pool.name if self.pool else None,
                user=self.user or None,
                addr=self.addr,
                reason=reason,
                **({"tls": True} if self.tls else {}),
                duration_s=round(time.monotonic() - self.connected_at, 3),
            )

    def protocol_violation(self, text: str) -> None:
        self.fail(PROTOCOL_VIOLATION, text, reason=f"protocol violation: {text}")


class TLSReader(asyncio.BufferedProtocol):
    """The app-side TLS transport's protocol: hands decrypted bytes to its ClientConn.

    A BufferedProtocol for the reason TLSServerConn is one (server.py): uvloop's TLS layer
    would otherwise read each record into a new 256 KiB bytes. ClientConn itself stays an
    asyncio.Protocol, so plaintext clients keep uvloop's cheaper data_received path.

    Bytes decrypted before start_tls has returned (a startup packet in the handshake's last
    flight) are held until the client writes through the TLS transport (`start`).
    """

    __slots__ = ("client", "held")

    def __init__(self, client: ClientConn) -> None:
        self.client = client
        self.held: list[bytes] | None = []

    def start(self) -> None:
        held, self.held = self.held, None
        if held:
            self.client.data_received(b"".join(held))

    def get_buffer(self, sizehint: int) -> memoryview:
        return TLS_READ_BUFFER

    def buffer_updated(self, nbytes: int) -> None:
        data = bytes(TLS_READ_BUFFER[:nbytes])
        if self.held is None:
            self.client.data_received(data)
        else:
            self.held.append(data)

    def connection_lost(self, exc: Exception | None) -> None:
        self.client.connection_lost(exc)

    def pause_writing(self) -> None:
        self.client.pause_writing()

    def resume_writing(self) -> None:
        self.client.resume_writing()
