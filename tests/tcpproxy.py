"""Loopback plumbing for fault tests: a killable, stallable TCP relay and a raw wire client.

`Relay` sits between the proxy and PostgreSQL (like psycopg's test proxy): it forwards bytes
until told to stall (stop reading both sockets of its links, so the kernel buffers fill and
the peers see a server that neither answers nor closes) or to kill (reset every link). It runs
its own event loop in a thread, so sync and async tests drive it alike.

`PgWire` is a PostgreSQL v3 client over a blocking socket, for tests that must send what no
driver would: garbage, truncated messages, tampered SCRAM proofs, or a session cut at any byte.

`tcp_sockets`, `rss_bytes`: what the kernel says about a process's sockets and memory.

Loopback only: the relay listens on a 127.0.0.0/8 address and connects to one.
"""

from __future__ import annotations

import asyncio
import contextlib
import os
import socket
import struct
import threading
import time
from collections.abc import Callable, Coroutine, Iterator
from dataclasses import dataclass
from typing import Any, TypeVar

from sidecar.protocol import messages as m
from sidecar.protocol.auth import ScramClient, md5_password_response

T = TypeVar("T")
Message = tuple[int, bytes]

_LINGER_RESET = struct.pack("ii", 1, 0)


def _reset(transport: asyncio.BaseTransport | None) -> None:
    """Close with a TCP RST (SO_LINGER 0), as a crashed host or dropped NAT entry would."""
    if transport is None or transport.is_closing():
        return
    sock = transport.get_extra_info("socket")
    if sock is not None:
        with contextlib.suppress(OSError):
            sock.setsockopt(socket.SOL_SOCKET, socket.SO_LINGER, _LINGER_RESET)
    transport.abort()


class _Side(asyncio.Protocol):
    def __init__(self, link: _Link, *, start_paused: bool = False) -> None:
        self.link = link
        self.transport: asyncio.Transport | None = None
        self.peer: _Side | None = None
        self.closed = False
        self.start_paused = start_paused

    def connection_made(self, transport: asyncio.BaseTransport) -> None:
        self.transport = transport  # type: ignore[assignment]
        if self.start_paused:
            self.transport.pause_reading()

    def data_received(self, data: bytes) -> None:
        link = self.link
        if link.opening is not None and self is link.down:
            # refuse_tls: the client's first 8 bytes may be an SSLRequest, answered here.
            data, link.opening = link.opening + data, None
            if len(data) < 8:
                link.opening = data
                return
            if data.startswith(m.ssl_request()) and self.transport is not None:
                link.relay.tls_refused += 1
                self.transport.write(b"N")
                data = data[8:]
        peer = self.peer
        if peer is not None and peer.transport is not None and not peer.transport.is_closing():
            peer.transport.write(data)
            self.link.relay.bytes_forwarded += len(data)

    def eof_received(self) -> bool:
        peer = self.peer
        if peer is not None and peer.transport is not None and peer.transport.can_write_eof():
            with contextlib.suppress(OSError, RuntimeError):
                peer.transport.write_eof()
        return True  # keep the other direction open

    def connection_lost(self, exc: Exception | None) -> None:
        self.closed = True
        self.link.side_lost()

    # flow control: a slow reader on one side slows the writer on the other
    def pause_writing(self) -> None:
        if self.peer is not None and self.peer.transport is not None:
            self.peer.transport.pause_reading()

    def resume_writing(self) -> None:
        if self.peer is not None and self.peer.transport is not None and not self.link.stalled:
            self.peer.transport.resume_reading()


class _Link:
    """One accepted connection and its upstream connection."""

    def __init__(self, relay: Relay) -> None:
        self.relay = relay
        # The accepted side reads nothing until its upstream connection exists.
        self.down = _Side(self, start_paused=True)  # towards whoever connected to the relay
        self.up = _Side(self)  # towards the target
        self.down.peer, self.up.peer = self.up, self.down
        self.stalled = False
        #: refuse_tls: what arrived of the client's first 8 bytes (None: past them).
        self.opening: bytes | None = b"" if relay.refuse_tls else None

    def sides(self) -> Iterator[asyncio.Transport]:
        for side in (self.down, self.up):
            if side.transport is not None and not side.transport.is_closing():
                yield side.transport

    def stall(self) -> None:
        self.stalled = True
        for t in self.sides():
            t.pause_reading()

    def resume(self) -> None:
        self.stalled = False
        for t in self.sides():
            t.resume_reading()

    def kill(self) -> None:
        _reset(self.down.transport)
        _reset(self.up.transport)

    def side_lost(self) -> None:
        # One side went away: pass a close on (a reset stays a reset: abort, not FIN).
        for side in (self.down, self.up):
            if side.transport is not None and not side.transport.is_closing():
                side.transport.close()
        if self.down.closed and self.up.closed:
            self.relay.links.discard(self)


class Relay:
    """A TCP relay on `listen_host`:<free port> forwarding to `target` (host, port).

    - `stall()`: links open now stop forwarding both ways; later links still forward.
    - `stall_new(True)`: links accepted from now on forward nothing (a stalled server).
    - `resume()`: every link forwards again; new links too.
    - `kill()`: reset every open link (RST both ways).
    - `refuse_tls=True`: an SSLRequest is answered "N" by the relay, as a server without TLS
      does, and the connection goes on in clear (`tls_refused` counts them).
    """

    def __init__(
        self, target: tuple[str, int], listen_host: str = "127.0.0.1", *, refuse_tls: bool = False
    ) -> None:
        if not listen_host.startswith("127."):
            raise ValueError("the relay is for loopback addresses only")
        self.target = target
        self.listen_host = listen_host
        self.port = 0
        self.links: set[_Link] = set()
        self.accepted = 0
        self.bytes_forwarded = 0
        self.refuse_tls = refuse_tls
        self.tls_refused = 0
        self._stall_new = False
        self._server: asyncio.Server | None = None
        self._loop = asyncio.new_event_loop()
        self._thread = threading.Thread(target=self._loop.run_forever, daemon=True, name="relay")

    # -- lifecycle (called from the test's thread) ------------------------------------------

    def start(self) -> Relay:
        self._thread.start()
        self._call(self._start())
        return self

    def close(self) -> None:
        if not self._thread.is_alive():
            return
        with contextlib.suppress(Exception):
            self._call(self._close())
        self._loop.call_soon_threadsafe(self._loop.stop)
        self._thread.join(5)
        self._loop.close()

    def __enter__(self) -> Relay:
        return self.start()

    def __exit__(self, *exc: object) -> None:
        self.close()

    # -- faults -----------------------------------------------------------------------------

    def stall(self) -> int:
        """Stop forwarding on the links open now; returns how many there are."""
        return self._call(self._each(_Link.stall))

    def stall_new(self, on: bool = True) -> None:
        self._stall_new = on

    def resume(self) -> int:
        self._stall_new = False
        return self._call(self._each(_Link.resume))

    def kill(self) -> int:
        """Reset every open link; returns how many there were."""
        return self._call(self._each(_Link.kill))

    @property
    def open_links(self) -> int:
        return len(self.links)

    # -- the relay's own loop ---------------------------------------------------------------

    def _call(self, coro: Coroutine[Any, Any, T], timeout: float = 10.0) -> T:
        return asyncio.run_coroutine_threadsafe(coro, self._loop).result(timeout)

    async def _start(self) -> None:
        self._server = await asyncio.get_running_loop().create_server(
            self._accept, self.listen_host, 0, reuse_address=True
        )
        self.port = int(self._server.sockets[0].getsockname()[1])

    async def _close(self) -> None:
        if self._server is not None:
            self._server.close()
        for link in list(self.links):
            link.kill()

    async def _each(self, action: Callable[[_Link], None]) -> int:
        links = list(self.links)
        for link in links:
            action(link)
        return len(links)

    def _accept(self) -> _Side:
        link = _Link(self)
        self.links.add(link)
        self.accepted += 1
        link.stalled = link.up.start_paused = self._stall_new
        asyncio.get_running_loop().create_task(self._connect_up(link))
        return link.down

    async def _connect_up(self, link: _Link) -> None:
        try:
            await asyncio.get_running_loop().create_connection(lambda: link.up, *self.target)
        except OSError:
            _reset(link.down.transport)
            return
        if link.down.closed:
            link.side_lost()
        elif link.stalled:
            for t in link.sides():
                t.pause_reading()
        elif link.down.transport is not None:
            link.down.transport.resume_reading()


# --- a raw PostgreSQL wire client -----------------------------------------------------------


class WireError(Exception):
    """The peer closed, or sent something that is not a well-formed backend message."""


class PgWire:
    """A PostgreSQL v3 client on a blocking socket; every step is explicit."""

    def __init__(self, sock: socket.socket) -> None:
        self.sock = sock
        self.buf = bytearray()
        self.eof = False

    @classmethod
    def connect(cls, host: str, port: int, timeout: float = 10.0) -> PgWire:
        sock = socket.create_connection((host, port), timeout)
        sock.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
        return cls(sock)

    def __enter__(self) -> PgWire:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()

    # -- sending ------------------------------------------------------------------------------

    def send(self, data: bytes) -> None:
        self.sock.sendall(data)

    def startup(self, user: str, database: str, **params: str) -> None:
        self.send(m.startup_message({"user": user, "database": database, **params}))

    def close(self) -> None:
        with contextlib.suppress(OSError):
            self.sock.close()

    def abort(self) -> None:
        """Close with a TCP RST: the client process died, or its host did."""
        with contextlib.suppress(OSError):
            self.sock.setsockopt(socket.SOL_SOCKET, socket.SO_LINGER, _LINGER_RESET)
        self.close()

    def half_close(self) -> None:
        with contextlib.suppress(OSError):
            self.sock.shutdown(socket.SHUT_WR)

    # -- receiving ----------------------------------------------------------------------------

    def _fill(self, deadline: float) -> bool:
        """Read more bytes; False on EOF. Raises TimeoutError past the deadline."""
        left = deadline - time.monotonic()
        if left <= 0:
            raise TimeoutError("no answer from the peer in time")
        self.sock.settimeout(left)
        try:
            chunk = self.sock.recv(65536)
        except TimeoutError:
            raise TimeoutError("no answer from the peer in time") from None
        except ConnectionResetError:
            chunk = b""
        if not chunk:
            self.eof = True
            return False
        self.buf += chunk
        return True

    def _pop(self) -> Message | None:
        buf = self.buf
        if len(buf) < 5:
            return None
        (length,) = struct.unpack_from("!i", buf, 1)
        if length < 4 or length > m.MAX_MESSAGE_LENGTH:
            raise WireError(f"malformed backend message header {bytes(buf[:5])!r}")
        if len(buf) < length + 1:
            return None
        msg = (buf[0], bytes(buf[5 : length + 1]))
        del buf[: length + 1]
        return msg

    def recv(self, timeout: float = 10.0) -> Message:
        """The next whole message; WireError if the peer closes first."""
        deadline = time.monotonic() + timeout
        while True:
            msg = self._pop()
            if msg is not None:
                return msg
            if self.eof or not self._fill(deadline):
                raise WireError(f"connection closed ({len(self.buf)} bytes of a message left)")

    def recv_byte(self, timeout: float = 10.0) -> bytes:
        deadline = time.monotonic() + timeout
        while not self.buf:
            if self.eof or not self._fill(deadline):
                raise WireError("connection closed")
        b = bytes(self.buf[:1])
        del self.buf[:1]
        return b

    def until_ready(self, timeout: float = 10.0) -> list[Message]:
        """Messages up to and including the next ReadyForQuery."""
        deadline = time.monotonic() + timeout
        out: list[Message] = []
        while True:
            msg = self.recv(max(deadline - time.monotonic(), 0.001))
            out.append(msg)
            if msg[0] == m.READY_FOR_QUERY:
                return out

    def until_ready_or_closed(self, timeout: float = 10.0) -> list[Message]:
        """Messages up to the next ReadyForQuery, or all of them if the peer closes first."""
        deadline = time.monotonic() + timeout
        out: list[Message] = []
        while True:
            msg = self._pop()
            if msg is not None:
                out.append(msg)
                if msg[0] == m.READY_FOR_QUERY:
                    return out
                continue
            if self.eof or not self._fill(deadline):
                return out

    def until_closed(self, timeout: float = 10.0) -> list[Message]:
        """Every message until the peer closes; TimeoutError if it does not close in time.

        A partial message left at the close raises WireError: a server never cuts one short.
        """
        deadline = time.monotonic() + timeout
        out: list[Message] = []
        while True:
            msg = self._pop()
            if msg is not None:
                out.append(msg)
                continue
            if self.eof or not self._fill(deadline):
                if self.buf:
                    raise WireError(f"closed inside a message: {bytes(self.buf[:40])!r}")
                return out

    # -- conversations ------------------------------------------------------------------------

    def login(
        self,
        user: str,
        password: str,
        database: str,
        *,
        tamper: Callable[[bytes], bytes] | None = None,
        timeout: float = 10.0,
        **params: str,
    ) -> list[Message]:
        """Startup and authenticate (SCRAM or md5, as asked) up to the first ReadyForQuery.

        `tamper` rewrites the SCRAM client-final-message (or md5 response) before it is sent.
        Returns the messages after authentication; an ErrorResponse ends the list early.
        """
        self.startup(user, database, **params)
        scram: ScramClient | None = None
        out: list[Message] = []
        while True:
            typ, body = self.recv(timeout)
            if typ == m.ERROR_RESPONSE:
                out.append((typ, body))
                return out
            if typ != m.AUTHENTICATION:
                out.append((typ, body))
                if typ == m.READY_FOR_QUERY:
                    return out
                continue
            code, data = m.parse_auth_request(body)
            if code == m.AUTH_OK:
                continue
            if code == m.AUTH_SASL:
                scram = ScramClient(password)
                self.send(m.sasl_initial_response("SCRAM-SHA-256", scram.client_first()))
            elif code == m.AUTH_SASL_CONTINUE and scram is not None:
                final = scram.handle_server_first(data)
                self.send(m.password_message(tamper(final) if tamper else final))
            elif code == m.AUTH_SASL_FINAL and scram is not None:
                scram.verify_server_final(data)
            elif code == m.AUTH_MD5:
                answer = md5_password_response(user, password, data[:4])
                self.send(m.password_message((tamper(answer) if tamper else answer) + b"\x00"))
            else:
                raise WireError(f"unexpected authentication request {code}")

    def query(self, sql: str, timeout: float = 10.0) -> list[Message]:
        self.send(m.query(sql))
        return self.until_ready(timeout)


def errors(messages: list[Message]) -> list[dict[str, str]]:
    """The fields of every ErrorResponse among `messages`."""
    return [m.parse_error_fields(body) for typ, body in messages if typ == m.ERROR_RESPONSE]


def rows(messages: list[Message]) -> list[list[str | None]]:
    """Text values of every DataRow among `messages`."""
    return [m.parse_data_row(body) for typ, body in messages if typ == ord("D")]


# --- sockets as the kernel sees them --------------------------------------------------------

TCP_ESTABLISHED = 0x01
TCP_LISTEN = 0x0A
#: /proc/net/tcp "tr" value of a socket whose keepalive timer is running.
TIMER_KEEPALIVE = 2


@dataclass(frozen=True)
class TcpSocket:
    """One line of /proc/net/tcp{,6}."""

    local: tuple[str, int]
    remote: tuple[str, int]
    state: int
    tx_queue: int
    rx_queue: int
    timer: int  #: 0 none, 1 retransmit, 2 keepalive, 3 TIME_WAIT, 4 zero window probe
    when: int  #: clock ticks (USER_HZ) until the timer fires
    inode: int
    family: int


def _addr(text: str) -> tuple[str, int]:
    host, port = text.split(":")
    raw = bytes.fromhex(host)
    if len(raw) == 4:
        ip = socket.inet_ntop(socket.AF_INET, raw[::-1])
    else:  # four little-endian 32-bit words
        words = b"".join(raw[i : i + 4][::-1] for i in range(0, 16, 4))
        ip = socket.inet_ntop(socket.AF_INET6, words)
    return ip, int(port, 16)


def socket_inodes(pid: int) -> set[int]:
    """Inodes of the sockets process `pid` has open."""
    inodes: set[int] = set()
    fd_dir = f"/proc/{pid}/fd"
    for fd in os.listdir(fd_dir):
        with contextlib.suppress(OSError):
            link = os.readlink(f"{fd_dir}/{fd}")
            if link.startswith("socket:["):
                inodes.add(int(link[8:-1]))
    return inodes


def tcp_sockets(pid: int | None = None) -> list[TcpSocket]:
    """TCP sockets of the machine (IPv4 and IPv6), or only those process `pid` holds."""
    inodes = socket_inodes(pid) if pid is not None else None
    out: list[TcpSocket] = []
    for path, family in (("/proc/net/tcp", socket.AF_INET), ("/proc/net/tcp6", socket.AF_INET6)):
        with contextlib.suppress(FileNotFoundError), open(path) as f:
            next(f)
            for line in f:
                fields = line.split()
                inode = int(fields[9])
                if inodes is not None and inode not in inodes:
                    continue
                tx, rx = fields[4].split(":")
                timer, when = fields[5].split(":")
                out.append(
                    TcpSocket(
                        local=_addr(fields[1]),
                        remote=_addr(fields[2]),
                        state=int(fields[3], 16),
                        tx_queue=int(tx, 16),
                        rx_queue=int(rx, 16),
                        timer=int(timer, 16),
                        when=int(when, 16),
                        inode=inode,
                        family=family,
                    )
                )
    return out


def rss_bytes(pid: int) -> int:
    """Resident set size of process `pid` (VmRSS)."""
    with open(f"/proc/{pid}/status") as f:
        for line in f:
            if line.startswith("VmRSS:"):
                return int(line.split()[1]) * 1024
    raise AssertionError(f"no VmRSS for pid {pid}")
