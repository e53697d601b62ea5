"""Server side: one upstream PostgreSQL connection, from TCP/TLS connect and auth to forwarding.

The connect handshake and internal queries read whole messages; once a connection serves a
client, `data_received` only walks message headers and forwards each chunk untouched. State
moves between pool lists are made by `Pool`, never here.
"""

from __future__ import annotations

import asyncio
import enum
import random
import ssl
import struct
import time
from collections.abc import Callable
from typing import TYPE_CHECKING, cast

from .. import log
from ..protocol import messages as m
from ..protocol.auth import AuthError, ScramClient, md5_password_response
from ..protocol.backend import Backend
from ..protocol.errors import (
    CANNOT_CONNECT_NOW,
    CONNECTION_FAILURE,
    PROTOCOL_VIOLATION,
    SQLCLIENT_UNABLE_TO_ESTABLISH,
    TOO_MANY_CONNECTIONS,
    ProtocolError,
)
from ..protocol.frontend import Q_DISCARD
from ..protocol.statements import ServerStatements
from ..upstream.roles import ROLE_PARAMS
from .counters import PoolStats
from .sockets import TLS_READ_BUFFER, follow, set_nodelay

if TYPE_CHECKING:
    from ..upstream.balancer import Instance
    from .client import ClientConn
    from .pool import Pool

logger = log.get()

# Module globals (a cached lookup in the compiled build), not m.X attribute reads.
_Z, _S, _I = m.READY_FOR_QUERY, m.PARAMETER_STATUS, m.TX_IDLE


def _unconnected(data: bytes) -> None:
    raise ConnectionError("no transport yet")


def _client_set(client: ClientConn | None, name: str) -> bool:
    """The client's own statements changed `name` in this transaction (SET, RESET ALL,
    DISCARD ALL, set_config)."""
    if client is None:
        return False
    frontend = client.frontend
    return (
        bool(frontend.flags & Q_DISCARD)
        or name in frontend.set_names
        or ("all" in frontend.set_names)
    )


class ServerState(enum.Enum):
    CONNECTING = "connecting"  #: opening TCP/TLS and authenticating; counted by Pool.connecting
    IDLE = "idle"  #: in Pool.idle, ready for a client
    ACTIVE = "active"  #: in Pool.active, linked to a client (or running an internal query for one)
    CLOSED = "closed"  #: in no list; transport closed or closing


# The members as module globals (see client.py).
S_CONNECTING, S_IDLE, S_ACTIVE, S_CLOSED = ServerState


class ServerError(Exception):
    """Connecting or talking to the server failed; carries what to tell the client."""

    def __init__(self, sqlstate: str, message: str, *, retryable: bool) -> None:
        super().__init__(message)
        self.sqlstate = sqlstate
        self.retryable = retryable


# Errors from the server at connect time that mean "try later / elsewhere", not "config is wrong".
_RETRYABLE_STATES = {TOO_MANY_CONNECTIONS, CANNOT_CONNECT_NOW, "57P01", "57P02", "08006"}


def as_protocol(conn: object) -> asyncio.BaseProtocol:
    """A ServerConn or ClientConn where asyncio's API wants a protocol: they are protocols
    without asyncio's base classes (extension types in the compiled build)."""
    return cast(asyncio.BaseProtocol, conn)


def make_ssl_context(sslmode: str, ca_file: str | None) -> ssl.SSLContext | None:
    """TLS context for an sslmode, as libpq interprets it."""
    if sslmode == "disable":
        return None
    if sslmode in ("verify-ca", "verify-full"):
        ctx = ssl.create_default_context(cafile=ca_file or None)
        ctx.check_hostname = sslmode == "verify-full"
        return ctx
    # allow / prefer / require: encrypt, but do not authenticate the server (libpq's meaning).
    ctx = ssl.SSLContext(ssl.PROTOCOL_TLS_CLIENT)
    ctx.check_hostname = False
    ctx.verify_mode = ssl.CERT_NONE
    return ctx


class ServerConn:
    """One connection to an upstream PostgreSQL instance: an asyncio protocol (data_received).

    No asyncio base class: in the compiled build it is an extension type (server.pxd), which
    cannot derive from one; event loops only call its methods. uvloop takes the buffer
    protocol from an asyncio.BufferedProtocol only (TLSServerConn below).
    """

    # Slots: no per-instance dict (10,000 idle clients), faster attribute access.
    __slots__ = (
        "_inbuf",
        "_lost",
        "_lost_called",
        "_waiter",
        "backend",
        "client",
        "close_reason",
        "created_at",
        "dirty_tail",
        "expires_at",
        "fatal_seen",
        "host",
        "instance",
        "last_used",
        "linked_at",
        "mid_message",
        "out_of_step",
        "params",
        "paused",
        "pending",
        "pid",
        "pool",
        "port",
        "query_start",
        "secret",
        "state",
        "statements",
        "stats",
        "tls",
        "transaction_mode",
        "transport",
        "write",
        "xact_start",
    )

    def __init__(self, pool: Pool, host: str, port: int) -> None:
        self.pool = pool
        self.host = host
        self.port = port
        self.transport: asyncio.Transport | None = None
        #: The transport's write (a bound method: one call less per message).
        self.write: Callable[[bytes], object] = _unconnected
        self.state = S_CONNECTING
        self.client: ClientConn | None = None
        self.params: dict[str, str] = {}
        self.pid = 0
        self.secret = 0
        # Requests (Query/Sync/FunctionCall) sent whose ReadyForQuery has not come back yet.
        self.pending = 0
        # The client sent bytes after its last Sync (an unfinished extended-protocol batch).
        self.dirty_tail = False
        self.transaction_mode = pool.transaction_mode
        self.stats = pool.stats
        # When the current query / transaction started (for the stats' average times).
        self.query_start = 0.0
        self.xact_start = 0.0
        self.backend = Backend()
        # Statement renaming (transaction mode with max_prepared_statements > 0).
        cap = pool.settings.max_prepared_statements
        self.statements = ServerStatements(cap) if cap and pool.transaction_mode else None
        now = time.monotonic()
        self.created_at = now
        self.last_used = now
        self.linked_at = now
        self.expires_at = now + pool.settings.server_lifetime * (1.0 - 0.2 * random.random())
        self.close_reason = ""
        #: The instance it runs on (set once connected; its `servers` count includes us).
        self.instance: Instance | None = None
        self.tls = False
        self.fatal_seen = False
        # Message mode (handshake, internal queries): a buffer and a waiter instead of forwarding.
        self._inbuf: bytearray | None = bytearray()
        self._waiter: asyncio.Future[None] | None = None
        self._lost: BaseException | None = None
        self._lost_called = False
        #: Reading paused because the linked client reads slower than we receive.
        self.paused = False
        #: The client's last message to this server was streamed only in part.
        self.mid_message = False
        #: What the proxy booked for this connection may not match what it was sent.
        self.out_of_step = False

    # -- asyncio callbacks ------------------------------------------------------------------

    def connection_made(self, transport: asyncio.BaseTransport) -> None:
        # uvloop's transports implement asyncio.Transport without subclassing it.
        self.transport = cast(asyncio.Transport, transport)
        self.write = self.transport.write
        set_nodelay(self.transport, keepalive=True)

    def data_received(self, data: bytes) -> None:
        if self._inbuf is not None:
            self._inbuf += data
            self._wake()
            return
        # Annotated locals: in the compiled build, C-level access to the walker's fields and
        # the counters (server.pxd cimports their types).
        backend: Backend = self.backend
        try:
            out = backend.feed(data, self.statements)
        except ProtocolError as exc:
            self.pool.close_server(self, f"server protocol violation: {exc}")
            return
        client = self.client
        if backend.rare and self._rare(backend, client):
            return
        if client is None:
            return  # async messages (NOTICE, ParameterStatus) while idle in the pool
        st: PoolStats = self.stats
        if out:
            client.write(out)
            st.bytes_out += len(out)
        zs = backend.zs
        if zs:
            self.pending = self.pending - zs if self.pending > zs else 0
            now = time.monotonic()
            st.queries += zs
            st.query_time += now - self.query_start
            self.query_start = now
            if backend.xacts:
                st.xacts += backend.xacts
                st.xact_time += now - self.xact_start
            if backend.rare and backend.fatal_cut:
                if (
                    self.transaction_mode
                    and not self.pending
                    and not self.dirty_tail
                    and not client.pins
                ):
                    # The backend is going away (terminated, shutting down) right after the
                    # client's transaction ended: that FATAL was not the client's, and the
                    # server must not serve anyone else.
                    self.pool.retire_dying(self)
                    return
                # The client still counts on this server (session mode, pinned, more
                # requests in flight): the FATAL is its news.
                client.write(backend.cut)
            if (
                not self.pending
                and self.transaction_mode
                and backend.tx_status == _I
                and not self.dirty_tail
                and backend.at_boundary
            ):
                self.pool.transaction_done(self, now)

    def _rare(self, backend: Backend, client: ClientConn | None) -> bool:
        """ParameterStatus and errors in the last feed. True if the server was closed."""
        if backend.params is not None:
            for name, value in backend.params:
                self.params[name] = value
                if name in ROLE_PARAMS and not _client_set(client, name):
                    # The instance's role changed under us (promotion, demotion, a reload):
                    # the pool's news, not a setting the client made.
                    self.pool.role_reported(self, name, value)
                    continue
                if client is not None:
                    client.params[name] = value
        if backend.errors:
            self.stats.errors += backend.errors
            self.fatal_seen = self.fatal_seen or backend.fatal
        if client is None and self.fatal_seen and self.state is S_IDLE:
            # Going away (terminated, shut down): out of the idle list now, before a client
            # is handed a server whose goodbye it never saw.
            self.pool.close_server(self, "server sent FATAL while idle")
            return True
        return False

    def eof_received(self) -> None:
        return None  # the transport closes; connection_lost follows

    def connection_lost(self, exc: Exception | None) -> None:
        self._lost_called = True
        self._lost = exc or ConnectionResetError("server closed the connection")
        self._wake()
        # While connecting, the handshake's awaiter sees the loss and reports the failure.
        if self.state not in (S_CLOSED, S_CONNECTING):
            reason = "server closed the connection unexpectedly"
            if self.fatal_seen:
                reason = "server sent FATAL and closed the connection"
            self.pool.server_lost(self, reason)

    def pause_writing(self) -> None:
        follow(self.client, writable=False)  # the server reads slower than the client sends

    def resume_writing(self) -> None:
        follow(self.client, writable=True)

    @property
    def tx_status(self) -> int:
        """Status byte of the last ReadyForQuery: I (idle), T (in transaction), E (failed)."""
        return self.backend.tx_status

    @property
    def at_boundary(self) -> bool:
        return self.backend.at_boundary

    # -- forwarding ---------------------------------------------------------------------------

    def pause_reading(self) -> None:
        if self.transport is not None and not self.transport.is_closing():
            self.paused = True
            self.transport.pause_reading()

    def resume_reading(self) -> None:
        if self.transport is not None and not self.transport.is_closing():
            self.paused = False
            self.transport.resume_reading()

    def abort(self) -> None:
        if self.transport is not None:
            self.transport.abort()

    def close_transport(self) -> None:
        if self.transport is not None and not self.transport.is_closing():
            # Polite goodbye so the backend logs no "unexpected EOF" -- unless a client's
            # message was cut short: the Terminate's bytes would complete it (a cut Execute
            # of COMMIT would run). Then the backend gets EOF mid-message and rolls back.
            if not self.mid_message:
                self.transport.write(m.TERMINATE_MSG)
            self.transport.close()

    # -- message mode -------------------------------------------------------------------------

    def _wake(self) -> None:
        w = self._waiter
        if w is not None and not w.done():
            w.set_result(None)

    async def _more(self) -> None:
        if self._lost is not None:
            raise ServerError(
                SQLCLIENT_UNABLE_TO_ESTABLISH,
                f"server closed the connection: {self._lost}",
                retryable=True,
            )
        self._waiter = asyncio.get_running_loop().create_future()
        try:
            await self._waiter
        finally:
            self._waiter = None

    async def _read_byte(self) -> int:
        assert self._inbuf is not None
        while not self._inbuf:
            await self._more()
        b = self._inbuf[0]
        del self._inbuf[:1]
        return b

    async def _read_message(self) -> tuple[int, bytes]:
        buf = self._inbuf
        assert buf is not None
        while True:
            try:
                msg = m.take_message(buf)
            except ProtocolError:
                raise ServerError(
                    PROTOCOL_VIOLATION, "server sent garbage", retryable=True
                ) from None
            if msg is not None:
                return msg
            await self._more()

    def enter_message_mode(self) -> None:
        self._inbuf = bytearray()

    def enter_data_mode(self) -> None:
        """Switch to forwarding; bytes buffered past the last message are replayed."""
        rest = bytes(self._inbuf or b"")
        self._inbuf = None
        self.backend.reset()
        if rest:
            self.data_received(rest)

    async def query_internal(
        self, sql: str
    ) -> tuple[dict[str, str] | None, list[list[str | None]]]:
        """Run one simple query of the proxy's own: (first error's fields or None, text rows).

        A server that does not answer within server_connect_timeout is closed (ServerError).
        """
        self.enter_message_mode()
        self.write(m.query(sql))
        try:
            async with asyncio.timeout(self.pool.settings.server_connect_timeout or None):
                return await self._internal_answer(sql)
        except TimeoutError:
            self.pool.close_server(self, "no answer to the proxy's own query (server stalled)")
            raise ServerError(CONNECTION_FAILURE, "server stalled", retryable=True) from None

    async def _internal_answer(
        self, sql: str
    ) -> tuple[dict[str, str] | None, list[list[str | None]]]:
        error: dict[str, str] | None = None
        rows: list[list[str | None]] = []
        while True:
            typ, body = await self._read_message()
            if typ == _Z:
                self.backend.tx_status = body[0]
                break
            if typ == _S:
                name, value = m.parse_parameter_status(body)
                self.params[name] = value
                if name in ROLE_PARAMS and name not in sql and self.instance is not None:
                    # A reload or promotion that landed on our own query (the settings sync,
                    # a check): the role changed, not a setting we made.
                    self.pool.role_reported(self, name, value)
            elif typ == ord("D"):
                rows.append(m.parse_data_row(body))
            elif typ == ord("A") and self.client is not None:
                # A NOTIFY for a pinned LISTEN client, arriving during our own query: about
                # this backend itself, it names the client's process id (see Backend).
                if body[:4] == struct.pack("!i", self.pid):
                    body = struct.pack("!i", self.client.pid) + body[4:]
                self.client.write(m.message(b"A", body))
            elif typ == ord("E") and error is None:
                error = m.parse_error_fields(body)
        self.enter_data_mode()
        return error, rows

    # -- connect ------------------------------------------------------------------------------

    async def handshake(
        self,
        transport: asyncio.Transport,
        ssl_ctx: ssl.SSLContext | None,
        sslmode: str,
        server_hostname: str,
    ) -> None:
        """TLS negotiation, startup and authentication, up to the first ReadyForQuery."""
        loop = asyncio.get_running_loop()
        up = self.pool.config.upstream
        if ssl_ctx is not None:
            transport.write(m.ssl_request())
            answer = await self._read_byte()
            if answer == ord("S"):
                try:
                    new = await loop.start_tls(
                        transport, as_protocol(self), ssl_ctx, server_hostname=server_hostname
                    )
                except (ssl.SSLError, ssl.CertificateError) as exc:
                    # verify_message says why a certificate was refused ("IP address
                    # mismatch, certificate is not valid for ...", "self-signed certificate").
                    why = getattr(exc, "reason", None) or str(exc)
                    detail = getattr(exc, "verify_message", None)
                    raise ServerError(
                        SQLCLIENT_UNABLE_TO_ESTABLISH,
                        f"TLS handshake with server failed: {exc.__class__.__name__}: {why}"
                        + (f" ({detail})" if detail else ""),
                        retryable=False,
                    ) from None
                if new is None:
                    raise ServerError(SQLCLIENT_UNABLE_TO_ESTABLISH, "TLS failed", retryable=True)
                self.transport = new
                self.write = new.write
                self.tls = True
            elif answer == ord("N"):
                if sslmode not in ("allow", "prefer"):
                    raise ServerError(
                        SQLCLIENT_UNABLE_TO_ESTABLISH,
                        "server does not support SSL, but SSL was required",
                        retryable=False,
                    )
            else:
                raise ServerError(
                    PROTOCOL_VIOLATION, "server answered SSLRequest with garbage", retryable=True
                )
        params = {"user": up.user, "database": up.dbname, **up.params}
        self.write(m.startup_message(params))
        scram: ScramClient | None = None
        while True:
            typ, body = await self._read_message()
            if typ == ord("R"):
                code, data = m.parse_auth_request(body)
                if code == m.AUTH_OK:
                    continue
                if code == m.AUTH_SASL:
                    if "SCRAM-SHA-256" not in m.parse_sasl_mechanisms(data):
                        raise ServerError(
                            "28000", "server offers no SASL mechanism we support", retryable=False
                        )
                    scram = ScramClient(up.password)
                    self.write(m.sasl_initial_response("SCRAM-SHA-256", scram.client_first()))
                elif code == m.AUTH_SASL_CONTINUE and scram is not None:
                    try:
                        self.write(m.password_message(scram.handle_server_first(data)))
                    except AuthError as exc:
                        raise ServerError(
                            "28000", f"SCRAM with server failed: {exc}", retryable=False
                        ) from None
                elif code == m.AUTH_SASL_FINAL and scram is not None:
                    try:
                        scram.verify_server_final(data)
                    except AuthError as exc:
                        raise ServerError(
                            "28000", f"SCRAM with server failed: {exc}", retryable=False
                        ) from None
                elif code == m.AUTH_MD5:
                    self.write(
                        m.password_message(
                            md5_password_response(up.user, up.password, data[:4]) + b"\x00"
                        )
                    )
                elif code == m.AUTH_CLEARTEXT:
                    self.write(m.password_message(up.password.encode() + b"\x00"))
                else:
                    raise ServerError(
                        "28000",
                        f"server asks for unsupported authentication {code}",
                        retryable=False,
                    )
            elif typ == ord("E"):
                fields = m.parse_error_fields(body)
                sqlstate = fields.get("C", SQLCLIENT_UNABLE_TO_ESTABLISH)
                raise ServerError(
                    sqlstate,
                    fields.get("M", "server error"),
                    retryable=sqlstate in _RETRYABLE_STATES,
                )
            elif typ == ord("S"):
                name, value = m.parse_parameter_status(body)
                self.params[name] = value
            elif typ == ord("K"):
                self.pid, self.secret = m.parse_backend_key(body)
                self.backend.own_pid = self.pid
            elif typ == _Z:
                self.backend.tx_status = body[0]
                break
            # NoticeResponse and anything else harmless during startup: ignore.
        self.enter_data_mode()


class TLSServerConn(ServerConn, asyncio.BufferedProtocol):
    """A server connection that may go over TLS: reads through the buffer protocol.

    Why: for a protocol with only data_received, uvloop's TLS layer reads each record into a
    new 256 KiB bytes object, which glibc maps and unmaps every time (mmap, mremap, munmap and
    page faults on every transaction: about half of what TLS added to the sidecar's CPU per
    transaction in the bench). With get_buffer it decrypts into the buffer we lend it. Plain
    connections keep data_received alone: there uvloop's own buffer is cheaper than a Python
    call per read.
    """

    __slots__ = ()

    def get_buffer(self, sizehint: int) -> memoryview:
        return TLS_READ_BUFFER

    def buffer_updated(self, nbytes: int) -> None:
        self.data_received(bytes(TLS_READ_BUFFER[:nbytes]))


async def open_server(pool: Pool, host: str, port: int, server_hostname: str) -> ServerConn:
    """Connect, negotiate TLS and authenticate; raise ServerError on any failure."""
    loop = asyncio.get_running_loop()
    settings = pool.settings
    try:
        async with asyncio.timeout(settings.server_connect_timeout):
            try:
                kind = ServerConn if pool.ssl_context is None else TLSServerConn
                transport, made = await loop.create_connection(
                    lambda: as_protocol(kind(pool, host, port)), host, port
                )
                proto = cast(ServerConn, made)
            except OSError as exc:
                raise ServerError(
                    SQLCLIENT_UNABLE_TO_ESTABLISH,
                    f"could not connect to server {host}:{port}: {exc.strerror or exc}",
                    retryable=True,
                ) from None
            try:
                await proto.handshake(transport, pool.ssl_context, pool.sslmode, server_hostname)
            except BaseException:
                transport.abort()
                raise
    except TimeoutError:
        raise ServerError(
            SQLCLIENT_UNABLE_TO_ESTABLISH,
            f"timeout connecting to server {host}:{port} "
            f"(server_connect_timeout={settings.server_connect_timeout:g}s)",
            retryable=True,
        ) from None
    return proto


class _CancelProto(asyncio.Protocol):
    def __init__(self) -> None:
        self.done: asyncio.Future[bytes] = asyncio.get_running_loop().create_future()

    def data_received(self, data: bytes) -> None:
        if not self.done.done():
            self.done.set_result(data)

    def connection_lost(self, exc: Exception | None) -> None:
        if not self.done.done():
            self.done.set_result(b"")


async def send_cancel(server: ServerConn) -> None:
    """Forward a cancel request to the backend that runs `server`'s current query."""
    loop = asyncio.get_running_loop()
    pool = server.pool
    async with asyncio.timeout(pool.settings.server_connect_timeout):
        transport, proto = await loop.create_connection(_CancelProto, server.host, server.port)
        try:
            if server.tls and pool.ssl_context is not None:
                transport.write(m.ssl_request())
                answer = await proto.done
                if answer[:1] == b"S":
                    new = await loop.start_tls(
                        transport, proto, pool.ssl_context, server_hostname=pool.server_hostname
                    )
                    if new is None:
                        return
                    transport = new
                proto.done = loop.create_future()
            transport.write(m.cancel_request(server.pid, server.secret))
            # The server closes the connection once it has read the request.
            await proto.done
        finally:
            transport.close()
