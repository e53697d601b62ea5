"""Socket options and the TLS read buffer, shared by both sides of the proxy.

A module of its own (not compiled): client.py and server.py both use them, and in the
compiled build neither may import the other at run time (their extension types cimport each
other; see client.pxd).
"""

from __future__ import annotations

import asyncio
import socket
from typing import Protocol


class Reader(Protocol):
    def pause_reading(self) -> None: ...

    def resume_reading(self) -> None: ...


def follow(peer: Reader | None, *, writable: bool) -> None:
    """Flow control across the proxy: the peer's reading follows this side's writability, so
    a side slower than the other (a big result, a big COPY) keeps memory bounded."""
    if peer is None:
        return
    if writable:
        peer.resume_reading()
    else:
        peer.pause_reading()


def set_nodelay(transport: asyncio.BaseTransport, *, keepalive: bool = False) -> None:
    """TCP_NODELAY (latency over batching); keepalive probes towards servers, so a peer that
    vanished (failover, a dropped NAT entry) is noticed within about a minute."""
    sock = transport.get_extra_info("socket")
    if sock is not None and sock.family in (socket.AF_INET, socket.AF_INET6):
        sock.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
        if keepalive:
            sock.setsockopt(socket.SOL_SOCKET, socket.SO_KEEPALIVE, 1)
            for name, value in (("TCP_KEEPIDLE", 30), ("TCP_KEEPINTVL", 10), ("TCP_KEEPCNT", 3)):
                if hasattr(socket, name):
                    sock.setsockopt(socket.IPPROTO_TCP, getattr(socket, name), value)


# Where TLS connections' decrypted bytes land, one buffer for all of them (servers' and apps'):
# each read is copied out (into a bytes of its own size) before the next one can start.
_TLS_READ_SIZE = 256 * 1024
TLS_READ_BUFFER = memoryview(bytearray(_TLS_READ_SIZE))
