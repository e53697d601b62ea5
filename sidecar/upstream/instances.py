"""Instance discovery for one upstream host: DNS refreshes at the TTL, and TCP health probes.

A Heroku Postgres follower pool endpoint answers each DNS query with ONE instance address,
rotating, TTL 5 s. `Discovery` asks again every TTL and feeds every answer to an
`InstanceSet` (upstream.balancer), which accumulates the union and applies the forget rules;
`probe` checks the instances the set says are due. The decisions live in the balancer; this
module only does the I/O and the logging.
"""

from __future__ import annotations

import asyncio
import contextlib
import random
import socket
import time
from collections.abc import Callable, Iterable

import dns.asyncresolver
import dns.exception
import dns.nameserver
import dns.rdatatype
import dns.resolver

from .. import log
from ..config import Settings, parse_nameservers
from .balancer import Instance, InstanceSet, InstanceState, canonical_addr

logger = log.get()

#: Refresh period for names DNS cannot tell a TTL for (/etc/hosts, getaddrinfo fallback).
NO_TTL_REFRESH = 5.0
#: Longest wait for one DNS query (all its retries), and for a getaddrinfo fallback.
DNS_TIMEOUT = 3.0
GETADDRINFO_TIMEOUT = 5.0
#: Longest wait for a probe's TCP connect (shortened to server_connect_timeout if smaller).
PROBE_TIMEOUT = 3.0
HOSTS_FILE = "/etc/hosts"


def hosts_file_names(path: str = HOSTS_FILE) -> set[str]:
    """Every host name listed in a hosts(5) file, lower-cased; empty if it cannot be read."""
    names: set[str] = set()
    try:
        with open(path, encoding="utf-8", errors="replace") as f:
            for line in f:
                words = line.split("#", 1)[0].split()
                names.update(w.lower().rstrip(".") for w in words[1:])
    except OSError:
        pass
    return names


def make_resolver(nameservers: str) -> dns.asyncresolver.Resolver | None:
    """A resolver for SIDECAR_DNS_NAMESERVERS, else the system's; None if there is none."""
    servers = parse_nameservers(nameservers)
    if servers:
        resolver = dns.asyncresolver.Resolver(configure=False)
        resolver.nameservers = [dns.nameserver.Do53Nameserver(ip, port) for ip, port in servers]
    else:
        try:
            resolver = dns.asyncresolver.Resolver()
        except dns.resolver.NoResolverConfiguration:
            return None
    resolver.lifetime = DNS_TIMEOUT
    resolver.cache = None  # the TTL is exactly what we must not outlive
    return resolver


class Discovery:
    """Keeps one InstanceSet up to date with what DNS says about one host."""

    def __init__(
        self,
        host: str,
        port: int,
        settings: Settings,
        instance_set: InstanceSet,
        on_change: Callable[[], None],
        clock: Callable[[], float] = time.monotonic,
    ) -> None:
        self.host = host
        self.port = port
        self.settings = settings
        self.instance_set = instance_set
        self.on_change = on_change
        self.clock = clock
        self.rng = random.Random()
        #: Why the last resolution failed, or None after a good answer.
        self.last_error: str | None = None
        #: TTL of the last answer (None: none yet, or no TTL known).
        self.last_ttl: float | None = None
        self.refreshes = 0
        #: Called with the addresses of each DNS answer (SIDECAR_WORKERS > 1: the other
        #: workers learn them too, see workers.py).
        self.on_answer: Callable[[list[str]], None] | None = None
        #: Called with the addresses of every answer applied (ours or another worker's);
        #: returns instances it took out of rotation (roles.Roles.follow_dns), to be logged.
        self.on_addrs: Callable[[list[str]], list[Instance]] | None = None
        self._resolver: dns.asyncresolver.Resolver | None = None
        self._use_hosts = False
        self._task: asyncio.Task[None] | None = None
        self._first = asyncio.Event()
        self._wake = asyncio.Event()

    # -- lifecycle ------------------------------------------------------------------------------

    async def start(self) -> None:
        """Resolve once and keep refreshing in the background.

        Returns as soon as the first addresses are in the set (or the first attempt failed:
        see `last_error`; retries continue every dns_min_interval). An IP literal (or a unix
        socket directory) is its own only instance: no refresh task.
        """
        if self.instance_set.static:
            self._apply([self.host])
            return
        self._use_hosts = self.host.lower().rstrip(".") in hosts_file_names()
        if not self._use_hosts:
            self._resolver = make_resolver(self.settings.dns_nameservers)
        self._task = asyncio.get_running_loop().create_task(self._run())
        waiter = asyncio.ensure_future(self._first.wait())
        try:
            await asyncio.wait({waiter, self._task}, return_when=asyncio.FIRST_COMPLETED)
        finally:
            waiter.cancel()

    async def stop(self) -> None:
        task, self._task = self._task, None
        if task is not None:
            task.cancel()
            with contextlib.suppress(asyncio.CancelledError):
                await task

    def request_refresh(self) -> None:
        """Ask again soon (no sooner than dns_min_interval after the last query), e.g. when
        every known instance is failing."""
        self._wake.set()

    # -- refreshing -----------------------------------------------------------------------------

    async def _run(self) -> None:
        loop = asyncio.get_running_loop()
        floor = self.settings.dns_min_interval
        while True:
            started = loop.time()
            # Cleared before asking, so a refresh requested while this one runs is not lost.
            self._wake.clear()
            try:
                delay = await self._refresh()
            except Exception as exc:  # a bug; keep the known set and retry at the floor
                logger.exception("dns_refresh_bug", host=self.host)
                self._failed(f"internal error: {exc!r}")
                delay = floor
            self.refreshes += 1
            self._first.set()
            with contextlib.suppress(TimeoutError):
                await asyncio.wait_for(self._wake.wait(), delay)
            rest = floor - (loop.time() - started)
            if rest > 0:
                await asyncio.sleep(rest)

    async def _refresh(self) -> float:
        """One round of queries; return the seconds until the next one."""
        floor = self.settings.dns_min_interval
        errors: list[str] = []
        ttl: float | None = None
        got = False
        if self._resolver is not None:
            tasks = [
                asyncio.ensure_future(self._query(self._resolver, rdtype))
                for rdtype in (dns.rdatatype.A, dns.rdatatype.AAAA)
            ]
            try:
                # Apply each answer as it lands: the first client waits for one, not both.
                for next_done in asyncio.as_completed(tasks):
                    try:
                        addrs, answer_ttl = await next_done
                    except (dns.exception.DNSException, OSError) as exc:
                        errors.append(_describe(exc))
                        continue
                    if addrs:
                        got = True
                        ttl = answer_ttl if ttl is None else min(ttl, answer_ttl)
                        self.last_ttl = ttl
                        self._apply(addrs)
                        self._first.set()
            finally:
                for task in tasks:
                    task.cancel()
        if not got:
            # /etc/hosts names, and names DNS does not know (or no DNS at all): libc decides.
            try:
                addrs = await asyncio.wait_for(self._getaddrinfo(), GETADDRINFO_TIMEOUT)
            except (OSError, TimeoutError) as exc:
                errors.append(f"getaddrinfo: {_describe(exc)}")
            else:
                if addrs:
                    got = True
                    ttl = NO_TTL_REFRESH
                    self._apply(addrs)
                else:
                    errors.append("no addresses")
        if not got:
            self._failed("; ".join(errors) or "no addresses")
            return floor
        if self.last_error is not None:
            logger.info("dns_recovered", host=self.host)
            self.last_error = None
        self.last_ttl = ttl
        return max(ttl if ttl is not None else NO_TTL_REFRESH, floor)

    async def _query(
        self, resolver: dns.asyncresolver.Resolver, rdtype: dns.rdatatype.RdataType
    ) -> tuple[list[str], float]:
        answer = await resolver.resolve(self.host, rdtype, search=False, raise_on_no_answer=False)
        if answer.rrset is None:
            return [], 0.0
        addrs = [str(rdata.address) for rdata in answer.rrset]
        return addrs, float(answer.chaining_result.minimum_ttl)

    async def _getaddrinfo(self) -> list[str]:
        infos = await asyncio.get_running_loop().getaddrinfo(
            self.host, self.port, type=socket.SOCK_STREAM
        )
        addrs: dict[str, None] = {}
        for _family, _type, _proto, _canon, sockaddr in infos:
            addrs[str(sockaddr[0])] = None
        return list(addrs)

    def _failed(self, error: str) -> None:
        """Keep the known set; log the first failure of a run of them, not each retry."""
        if self.last_error is None:
            logger.warning("dns_failed", host=self.host, error=error, known=len(self.instance_set))
        self.last_error = error

    def seen_elsewhere(self, addrs: Iterable[str]) -> None:
        """An answer another worker got for this host: as good as our own."""
        if not self.instance_set.static:
            self._apply(addrs, shared=True)

    def _apply(self, addrs: Iterable[str], *, shared: bool = False) -> None:
        addrs = list(addrs)
        if not shared and self.on_answer is not None and not self.instance_set.static:
            self.on_answer(addrs)
        now = self.clock()
        added = self.instance_set.seen(addrs, now, time.time())
        gone = self.instance_set.expire(now, self.settings.dns_forget_after)
        if self.on_addrs is not None:
            gone += [i for i in self.on_addrs(addrs) if i not in gone]
        for inst in added:
            logger.info("instance_added", host=self.host, instance=inst.addr)
        for inst in gone:
            self._log_gone(inst)
        if added or gone:
            self._changed()

    def _log_gone(self, inst: Instance) -> None:
        if inst.state is InstanceState.DRAINING:
            logger.info(
                "instance_draining", host=self.host, instance=inst.addr, servers=inst.servers
            )
        elif inst.state is InstanceState.FORGOTTEN:
            logger.info(
                "instance_forgotten", host=self.host, instance=inst.addr, error=inst.last_error
            )

    def _changed(self) -> None:
        try:
            self.on_change()
        except Exception:
            logger.exception("instance_on_change_failed", host=self.host)

    # -- health ---------------------------------------------------------------------------------

    async def probe(self, inst: Instance) -> bool:
        """TCP-connect to the instance and record the outcome in the set; True if it accepted.

        For the instances `InstanceSet.probe_due` returns: this reports success()/failure()
        itself (which also ends the trial probe_due started), logs state changes, and calls
        on_change when the state changed. Connecting and closing without a byte leaves no
        line in PostgreSQL's log.
        """
        timeout = PROBE_TIMEOUT
        if self.settings.server_connect_timeout > 0:
            timeout = min(timeout, self.settings.server_connect_timeout)
        before = inst.state
        error: str | None = None
        try:
            if inst.addr.startswith("/"):
                connecting = asyncio.open_unix_connection(f"{inst.addr}/.s.PGSQL.{inst.port}")
            else:
                connecting = asyncio.open_connection(inst.addr, inst.port)
            _reader, writer = await asyncio.wait_for(connecting, timeout)
        except TimeoutError:
            error = f"probe: no answer within {timeout:g}s"
        except OSError as exc:
            error = f"probe: {_describe(exc)}"
        else:
            writer.close()
            with contextlib.suppress(OSError):
                await writer.wait_closed()
        now = self.clock()
        if error is None:
            self.instance_set.success(inst, now)
        else:
            self.instance_set.failure(inst, now, error, self.rng)
        if inst.state is not before:
            if inst.state is InstanceState.UP:
                logger.info("instance_up", host=self.host, instance=inst.addr)
            elif inst.state is InstanceState.QUARANTINED:
                logger.info("instance_unhealthy", host=self.host, instance=inst.addr, error=error)
            else:
                self._log_gone(inst)
            self._changed()
        return error is None


def _describe(exc: BaseException) -> str:
    text = str(exc).strip()
    return f"{type(exc).__name__}: {text}" if text else type(exc).__name__


__all__ = ["Discovery", "canonical_addr", "hosts_file_names", "make_resolver"]
