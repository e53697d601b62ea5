"""A tiny authoritative UDP DNS server for tests, answering A/AAAA from a dict; never forwards.

It mimics a Heroku Postgres pool endpoint: in "rotate" mode every A (or AAAA) query gets ONE
address, round-robin, with the given TTL; in "all" mode every query gets them all. Unknown names
get NXDOMAIN. It runs in a thread with its own socket, so sync and async tests can both use it:

    with DNSServer({"followers.test": ["127.0.0.2", "127.0.0.3"]}) as dns:
        ... SIDECAR_DNS_NAMESERVERS=f"127.0.0.1:{dns.port}" ...
"""

from __future__ import annotations

import ipaddress
import socket
import threading
import time
from collections.abc import Iterable
from types import TracebackType

import dns.exception
import dns.flags
import dns.message
import dns.name
import dns.rcode
import dns.rdataclass
import dns.rdatatype
import dns.rrset

MODES = ("rotate", "all")


def _key(name: str | dns.name.Name) -> str:
    return str(name).lower().rstrip(".")


class DNSServer:
    """Answers A/AAAA queries for `records` (name -> addresses) on host:port (0: any free)."""

    def __init__(
        self,
        records: dict[str, list[str]] | None = None,
        mode: str = "rotate",
        ttl: int = 5,
        host: str = "127.0.0.1",
        port: int = 0,
    ) -> None:
        if mode not in MODES:
            raise ValueError(f"mode must be one of {MODES}")
        self.mode = mode
        self.ttl = ttl
        self._lock = threading.Lock()
        self._records: dict[str, list[str]] = {}
        self._next: dict[tuple[str, int], int] = {}
        #: Every query received: (time.monotonic(), name, type name such as "A").
        self.log: list[tuple[float, str, str]] = []
        for name, addrs in (records or {}).items():
            self.set_records(name, addrs)
        self._sock = socket.socket(socket.AF_INET, socket.SOCK_DGRAM)
        self._sock.bind((host, port))
        self.host = host
        self.port: int = self._sock.getsockname()[1]
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._serve, name=f"dns-{self.port}", daemon=True)

    # -- control (any thread) --------------------------------------------------------------------

    def start(self) -> DNSServer:
        self._thread.start()
        return self

    def stop(self) -> None:
        self._stop.set()
        if self._thread.is_alive():
            self._thread.join(5)
        self._sock.close()

    def __enter__(self) -> DNSServer:
        return self.start()

    def __exit__(
        self,
        exc_type: type[BaseException] | None,
        exc: BaseException | None,
        tb: TracebackType | None,
    ) -> None:
        self.stop()

    @property
    def nameserver(self) -> str:
        """This server as a SIDECAR_DNS_NAMESERVERS value."""
        return f"{self.host}:{self.port}"

    def set_records(self, name: str, addrs: Iterable[str]) -> None:
        """Replace the addresses of `name` (an empty list still answers NOERROR, no data)."""
        addrs = [str(ipaddress.ip_address(a)) for a in addrs]
        with self._lock:
            self._records[_key(name)] = addrs

    def remove(self, name: str) -> None:
        """Forget `name`: NXDOMAIN from now on."""
        with self._lock:
            self._records.pop(_key(name), None)

    @property
    def queries(self) -> int:
        """How many queries arrived so far (every type)."""
        with self._lock:
            return len(self.log)

    def queries_for(self, name: str, rdtype: str = "A") -> list[float]:
        """When each `rdtype` query for `name` arrived (time.monotonic())."""
        with self._lock:
            return [t for t, n, r in self.log if n == _key(name) and r == rdtype]

    # -- serving (its own thread) ------------------------------------------------------------------

    def _serve(self) -> None:
        # A short timeout so stop() is noticed; closing a socket does not wake recvfrom().
        self._sock.settimeout(0.05)
        while not self._stop.is_set():
            try:
                data, peer = self._sock.recvfrom(4096)
            except TimeoutError:
                continue
            except OSError:
                return
            reply = self._answer(data)
            if reply is not None:
                try:
                    self._sock.sendto(reply, peer)
                except OSError:
                    return

    def _answer(self, data: bytes) -> bytes | None:
        try:
            query = dns.message.from_wire(data)
        except dns.exception.DNSException:
            return None
        response = dns.message.make_response(query)
        response.flags |= dns.flags.AA
        if len(query.question) != 1:
            response.set_rcode(dns.rcode.FORMERR)
            return response.to_wire()
        question = query.question[0]
        name = _key(question.name)
        rdtype = question.rdtype
        with self._lock:
            self.log.append((time.monotonic(), name, dns.rdatatype.to_text(rdtype)))
            addrs = self._records.get(name)
            if addrs is None:
                response.set_rcode(dns.rcode.NXDOMAIN)
                return response.to_wire()
            version = {dns.rdatatype.A: 4, dns.rdatatype.AAAA: 6}.get(rdtype)
            matching = [a for a in addrs if ipaddress.ip_address(a).version == version]
            if matching and self.mode == "rotate":
                turn = self._next.get((name, rdtype), 0)
                self._next[(name, rdtype)] = turn + 1
                matching = [matching[turn % len(matching)]]
        if matching:
            response.answer.append(
                dns.rrset.from_text_list(
                    question.name,
                    self.ttl,
                    dns.rdataclass.IN,
                    rdtype,
                    matching,
                )
            )
        return response.to_wire()
