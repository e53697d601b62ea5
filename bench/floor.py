"""The floor for a pooler written in Python: a 1:1 byte forwarder on uvloop.

`python bench/floor.py LISTEN_PORT UPSTREAM_PORT` listens on 127.0.0.1 and gives every client
its own connection to PostgreSQL on 127.0.0.1:UPSTREAM_PORT, forwarding bytes both ways as
they come: no parsing, no pooling, TCP_NODELAY. It is what any asyncio proxy pays per message
before doing anything (two reads, two writes, two Protocol callbacks per round trip), so its
CPU per transaction beside the sidecar's and PgBouncer's says which part of the gap is
Python itself. Bench-only: never part of the product.
"""

from __future__ import annotations

import asyncio
import contextlib
import socket
import sys

HOST = "127.0.0.1"


def _nodelay(transport: asyncio.BaseTransport) -> None:
    sock = transport.get_extra_info("socket")
    if sock is not None:
        sock.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)


class Upstream(asyncio.Protocol):
    def __init__(self, client: Client) -> None:
        self.client = client

    def connection_made(self, transport: asyncio.BaseTransport) -> None:
        _nodelay(transport)

    def data_received(self, data: bytes) -> None:
        self.client.transport.write(data)

    def connection_lost(self, exc: Exception | None) -> None:
        self.client.transport.close()


class Client(asyncio.Protocol):
    def __init__(self, upstream_port: int) -> None:
        self.upstream_port = upstream_port
        self.upstream: asyncio.Transport | None = None
        self.early: list[bytes] = []  # what the client sent before the upstream was there

    def connection_made(self, transport: asyncio.BaseTransport) -> None:
        self.transport: asyncio.Transport = transport  # type: ignore[assignment]
        _nodelay(transport)
        self.task = asyncio.get_running_loop().create_task(self._connect())

    async def _connect(self) -> None:
        loop = asyncio.get_running_loop()
        try:
            upstream, _ = await loop.create_connection(
                lambda: Upstream(self), HOST, self.upstream_port
            )
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


async def serve(port: int, upstream_port: int) -> None:
    loop = asyncio.get_running_loop()
    server = await loop.create_server(lambda: Client(upstream_port), HOST, port, backlog=4096)
    async with server:
        await server.serve_forever()


def main() -> None:
    port, upstream_port = int(sys.argv[1]), int(sys.argv[2])
    try:
        import uvloop
    except ImportError:
        run = asyncio.run
    else:
        run = uvloop.run
    with contextlib.suppress(KeyboardInterrupt):  # the bench stops its poolers with SIGINT
        run(serve(port, upstream_port))


if __name__ == "__main__":
    main()
