"""The floor for a pooler written in Python: a 1:1 byte forwarder on uvloop.

`python bench/floor.py LISTEN_PORT UPSTREAM_PORT [--tls]` listens on 127.0.0.1 and gives every
client its own connection to PostgreSQL on 127.0.0.1:UPSTREAM_PORT, forwarding bytes both ways
as they come: no parsing, no pooling, TCP_NODELAY. With --tls that connection is TLS (an
SSLRequest, then the handshake, as a pooler's sslmode=require); the client's stays in clear.
It is what any asyncio proxy pays per message before doing anything (two reads, two writes,
two Protocol callbacks per round trip), so its CPU per transaction beside the sidecar's and
PgBouncer's says which part of the gap is Python itself. Bench-only: never part of the
product.
"""

from __future__ import annotations

import asyncio
import contextlib
import socket
import ssl
import struct
import sys

HOST = "127.0.0.1"
#: PostgreSQL's SSLRequest: length 8, code 80877103.
SSL_REQUEST = struct.pack("!ii", 8, 80877103)


def _client_context() -> ssl.SSLContext:
    """sslmode=require: encrypt, verify nothing (as libpq and the poolers under test)."""
    ctx = ssl.create_default_context()
    ctx.check_hostname = False
    ctx.verify_mode = ssl.CERT_NONE
    return ctx


def _nodelay(transport: asyncio.BaseTransport) -> None:
    sock = transport.get_extra_info("socket")
    if sock is not None:
        sock.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)


def _without_plus(data: bytes) -> bytes:
    """The server's AuthenticationSASL without SCRAM-SHA-256-PLUS (--tls; once per login).

    Over TLS PostgreSQL offers channel binding, and a client in clear that sees it offered
    refuses to go on (a downgrade, as far as it can tell). The poolers end SCRAM themselves;
    the floor only has to hide the mechanism it cannot bind to the client's connection.
    """
    if data[:1] != b"R" or len(data) < 9 or struct.unpack_from("!i", data, 5)[0] != 10:
        return data
    length = struct.unpack_from("!i", data, 1)[0]
    mechanisms = data[9 : 1 + length].split(b"\0")
    kept = b"".join(m + b"\0" for m in mechanisms if m and m != b"SCRAM-SHA-256-PLUS") + b"\0"
    body = struct.pack("!i", 10) + kept
    return b"R" + struct.pack("!i", 4 + len(body)) + body + data[1 + length :]


class Upstream(asyncio.Protocol):
    def __init__(self, client: Client) -> None:
        self.client = client
        #: The server's one-byte answer to our SSLRequest, while we wait for it (--tls).
        self.answer: asyncio.Future[bytes] | None = None
        #: --tls: the server's first message still to come (see _without_plus).
        self.first = False

    def connection_made(self, transport: asyncio.BaseTransport) -> None:
        _nodelay(transport)

    def data_received(self, data: bytes) -> None:
        if self.answer is not None and not self.answer.done():
            self.answer.set_result(data)
            return
        if self.first:
            self.first = False
            data = _without_plus(data)
        self.client.transport.write(data)

    def connection_lost(self, exc: Exception | None) -> None:
        self.client.transport.close()


class Client(asyncio.Protocol):
    def __init__(self, upstream_port: int, tls: ssl.SSLContext | None) -> None:
        self.upstream_port = upstream_port
        self.tls = tls
        self.upstream: asyncio.Transport | None = None
        self.early: list[bytes] = []  # what the client sent before the upstream was there

    def connection_made(self, transport: asyncio.BaseTransport) -> None:
        self.transport: asyncio.Transport = transport  # type: ignore[assignment]
        _nodelay(transport)
        self.task = asyncio.get_running_loop().create_task(self._connect())

    async def _connect(self) -> None:
        loop = asyncio.get_running_loop()
        try:
            upstream, proto = await loop.create_connection(
                lambda: Upstream(self), HOST, self.upstream_port
            )
            if self.tls is not None:
                proto.answer = loop.create_future()
                upstream.write(SSL_REQUEST)
                if await proto.answer != b"S":
                    raise OSError("the server refused TLS")
                proto.first = True
                tls = await loop.start_tls(upstream, proto, self.tls)
                assert tls is not None
                upstream = tls
        except OSError:
            self.transport.close()
            return
        if self.transport.is_closing():
            upstream.close()
            return
        self.upstream = upstream
        for data in self.early:
            upstream.write(data)
        self.early.clear()

    def data_received(self, data: bytes) -> None:
        if self.upstream is not None:
            self.upstream.write(data)
        else:
            self.early.append(data)

    def connection_lost(self, exc: Exception | None) -> None:
        if self.upstream is not None:
            self.upstream.close()


async def serve(port: int, upstream_port: int, tls: bool) -> None:
    loop = asyncio.get_running_loop()
    ctx = _client_context() if tls else None
    server = await loop.create_server(lambda: Client(upstream_port, ctx), HOST, port, backlog=4096)
    async with server:
        await server.serve_forever()


def main() -> None:
    port, upstream_port = int(sys.argv[1]), int(sys.argv[2])
    tls = sys.argv[3:] == ["--tls"]
    try:
        import uvloop
    except ImportError:
        run = asyncio.run
    else:
        run = uvloop.run
    with contextlib.suppress(KeyboardInterrupt):  # the bench stops its poolers with SIGINT
        run(serve(port, upstream_port, tls))


if __name__ == "__main__":
    main()
