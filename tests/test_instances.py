"""upstream.instances.Discovery against a real UDP DNS server (tests/dnsserver.py) on loopback."""

from __future__ import annotations

import asyncio
import itertools
import socket
import time
from collections.abc import AsyncIterator, Callable, Iterator
from typing import Any

import pytest
import structlog
from dnsserver import DNSServer

from sidecar.config import ConfigError, Settings, load_settings, parse_nameservers
from sidecar.upstream.balancer import InstanceSet, InstanceState
from sidecar.upstream.instances import Discovery, hosts_file_names

NAME = "followers.test"
F1, F2, F3, F4 = "127.0.0.2", "127.0.0.3", "127.0.0.4", "127.0.0.5"


async def until(check: Callable[[], Any], timeout: float = 5.0, what: str = "condition") -> Any:
    deadline = time.monotonic() + timeout
    while True:
        result = check()
        if result:
            return result
        if time.monotonic() > deadline:
            raise AssertionError(f"timed out after {timeout}s waiting for {what}")
        await asyncio.sleep(0.01)


@pytest.fixture
def dns_rotate() -> Iterator[DNSServer]:
    with DNSServer({NAME: [F1, F2, F3]}, mode="rotate", ttl=0) as server:
        yield server


class Harness:
    """A Discovery for `host` plus what its on_change callback saw."""

    def __init__(self, host: str, port: int = 5432, **settings: Any) -> None:
        settings.setdefault("dns_min_interval", 0.2)
        self.settings = Settings(**settings)
        self.set = InstanceSet(host, port)
        self.changes = 0
        self.discovery = Discovery(host, port, self.settings, self.set, self._changed)

    def _changed(self) -> None:
        self.changes += 1

    def addrs(self) -> set[str]:
        return {i.addr for i in self.set}


@pytest.fixture
async def harnesses() -> AsyncIterator[list[Harness]]:
    started: list[Harness] = []
    yield started
    for h in started:
        await h.discovery.stop()


async def start(harnesses: list[Harness], host: str, **settings: Any) -> Harness:
    h = Harness(host, **settings)
    harnesses.append(h)
    await h.discovery.start()
    return h


# -- DNS -----------------------------------------------------------------------------------------


async def test_rotating_single_answers_accumulate(
    dns_rotate: DNSServer, harnesses: list[Harness]
) -> None:
    h = await start(harnesses, NAME, dns_nameservers=dns_rotate.nameserver)
    # start() returns with the first answer: one address, no waiting for the rest.
    assert h.addrs() == {F1}
    assert h.changes == 1
    await until(lambda: h.addrs() == {F1, F2, F3}, what="all three addresses")
    assert h.changes == 3
    assert all(i.state is InstanceState.UP for i in h.set)
    assert h.discovery.last_error is None


async def test_all_records_in_one_answer(harnesses: list[Harness]) -> None:
    with DNSServer({NAME: [F1, F2, F3]}, mode="all", ttl=5) as server:
        h = await start(harnesses, NAME, dns_nameservers=server.nameserver)
        assert h.addrs() == {F1, F2, F3}
        assert h.changes == 1
        assert h.discovery.last_ttl == 5


async def test_address_added_later_is_discovered(
    dns_rotate: DNSServer, harnesses: list[Harness]
) -> None:
    h = await start(harnesses, NAME, dns_nameservers=dns_rotate.nameserver)
    await until(lambda: h.addrs() == {F1, F2, F3}, what="the first three")
    with structlog.testing.capture_logs() as logs:
        dns_rotate.set_records(NAME, [F1, F2, F3, F4])
        await until(lambda: F4 in h.addrs(), what="the fourth address")
    assert {"event": "instance_added", "host": NAME, "instance": F4, "log_level": "info"} in logs


async def test_ttl_is_respected(harnesses: list[Harness]) -> None:
    with DNSServer({NAME: [F1, F2]}, mode="rotate", ttl=1) as server:
        await start(harnesses, NAME, dns_nameservers=server.nameserver)
        await until(lambda: len(server.queries_for(NAME)) >= 3, what="three A queries")
        times = server.queries_for(NAME)
        gaps = [b - a for a, b in itertools.pairwise(times)]
        assert all(0.9 <= g < 3.0 for g in gaps), gaps


async def test_min_interval_floors_a_zero_ttl(harnesses: list[Harness]) -> None:
    with DNSServer({NAME: [F1, F2]}, mode="rotate", ttl=0) as server:
        await start(harnesses, NAME, dns_nameservers=server.nameserver, dns_min_interval=0.3)
        await until(lambda: len(server.queries_for(NAME)) >= 4, what="four A queries")
        times = server.queries_for(NAME)
        gaps = [b - a for a, b in itertools.pairwise(times)]
        assert all(g >= 0.28 for g in gaps), gaps


async def test_request_refresh_asks_again_soon(harnesses: list[Harness]) -> None:
    with DNSServer({NAME: [F1, F2]}, mode="rotate", ttl=60) as server:
        h = await start(harnesses, NAME, dns_nameservers=server.nameserver)
        assert h.addrs() == {F1}
        h.discovery.request_refresh()
        await until(lambda: h.addrs() == {F1, F2}, what="a refresh before the 60 s TTL")
        assert len(server.queries_for(NAME)) == 2


async def test_failed_queries_keep_the_known_set(
    dns_rotate: DNSServer, harnesses: list[Harness], monkeypatch: pytest.MonkeyPatch
) -> None:
    async def no_libc_either(self: Discovery) -> list[str]:
        raise socket.gaierror(socket.EAI_NONAME, "Name or service not known")

    # Keep the test off the real system resolver.
    monkeypatch.setattr(Discovery, "_getaddrinfo", no_libc_either)
    h = await start(harnesses, NAME, dns_nameservers=dns_rotate.nameserver)
    await until(lambda: len(h.addrs()) == 3, what="all three addresses")
    with structlog.testing.capture_logs() as logs:
        dns_rotate.remove(NAME)  # NXDOMAIN from now on
        before = len(dns_rotate.queries_for(NAME))
        await until(lambda: len(dns_rotate.queries_for(NAME)) >= before + 3, what="3 retries")
    assert h.discovery.last_error is not None and "NXDOMAIN" in h.discovery.last_error
    assert h.addrs() == {F1, F2, F3}
    assert [e["event"] for e in logs] == ["dns_failed"]  # once, not per query
    with structlog.testing.capture_logs() as logs:
        dns_rotate.set_records(NAME, [F1])
        await until(lambda: h.discovery.last_error is None, what="recovery")
    assert [e["event"] for e in logs] == ["dns_recovered"]


async def test_unresolvable_at_start_returns_and_keeps_trying(
    harnesses: list[Harness], monkeypatch: pytest.MonkeyPatch
) -> None:
    async def no_libc_either(self: Discovery) -> list[str]:
        raise socket.gaierror(socket.EAI_NONAME, "Name or service not known")

    monkeypatch.setattr(Discovery, "_getaddrinfo", no_libc_either)
    with DNSServer({}, mode="rotate", ttl=0) as server:
        h = await start(harnesses, NAME, dns_nameservers=server.nameserver)
        assert len(h.set) == 0 and h.discovery.last_error
        server.set_records(NAME, [F2])
        await until(lambda: h.addrs() == {F2}, what="the late answer")
        assert h.changes == 1


async def test_forgotten_after_leaving_dns_and_failing(harnesses: list[Harness]) -> None:
    with DNSServer({NAME: [F1, F2]}, mode="all", ttl=0) as server:
        h = await start(harnesses, NAME, dns_nameservers=server.nameserver, dns_forget_after=0.5)
        f1 = h.set.get(F1)
        assert f1 is not None
        h.set.failure(f1, h.discovery.clock(), "refused", h.discovery.rng)
        changes = h.changes
        with structlog.testing.capture_logs() as logs:
            server.set_records(NAME, [F2])
            await until(lambda: h.set.get(F1) is None, what="F1 forgotten")
        assert f1.state is InstanceState.FORGOTTEN
        assert h.changes == changes + 1
        assert [e["event"] for e in logs] == ["instance_forgotten"]
        assert h.addrs() == {F2}


async def test_ip_literal_is_its_own_instance(
    dns_rotate: DNSServer, harnesses: list[Harness]
) -> None:
    h = await start(harnesses, "127.0.0.1", dns_nameservers=dns_rotate.nameserver)
    assert h.addrs() == {"127.0.0.1"}
    assert h.discovery._task is None
    assert dns_rotate.queries == 0


async def test_hosts_file_name_uses_getaddrinfo(
    dns_rotate: DNSServer, harnesses: list[Harness]
) -> None:
    assert "localhost" in hosts_file_names()
    h = await start(harnesses, "localhost", dns_nameservers=dns_rotate.nameserver)
    assert "127.0.0.1" in h.addrs()
    assert dns_rotate.queries == 0  # never asked DNS
    assert h.discovery.last_ttl == 5.0


async def test_stop_ends_the_refresh_task(dns_rotate: DNSServer) -> None:
    h = Harness(NAME, dns_nameservers=dns_rotate.nameserver)
    await h.discovery.start()
    task = h.discovery._task
    assert task is not None and not task.done()
    await h.discovery.stop()
    assert task.done()
    # A query sent before the stop (the start's AAAA, say) may reach the server's thread only
    # now: count from when the count stops moving.
    count = -1
    for _ in range(50):
        if dns_rotate.queries == count:
            break
        count = dns_rotate.queries
        await asyncio.sleep(0.05)
    await asyncio.sleep(0.3)  # longer than the refresh interval: no query may come
    assert dns_rotate.queries == count


# -- probes --------------------------------------------------------------------------------------


@pytest.fixture
def listener() -> Iterator[int]:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        s.listen()
        yield s.getsockname()[1]


def closed_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


async def test_probe_brings_a_quarantined_instance_back(listener: int) -> None:
    h = Harness("127.0.0.1", port=listener)
    await h.discovery.start()
    (inst,) = list(h.set)
    h.set.failure(inst, h.discovery.clock(), "refused", h.discovery.rng)
    due = await until(lambda: h.set.probe_due(h.discovery.clock()), what="probe due")
    assert due == [inst]
    changes = h.changes
    assert await h.discovery.probe(inst) is True
    assert inst.state is InstanceState.UP and not inst.trial
    assert h.changes == changes + 1


async def test_probe_of_a_closed_port_quarantines() -> None:
    h = Harness("127.0.0.1", port=closed_port())
    await h.discovery.start()
    (inst,) = list(h.set)
    with structlog.testing.capture_logs() as logs:
        assert await h.discovery.probe(inst) is False
    assert inst.state is InstanceState.QUARANTINED
    assert inst.last_error is not None and inst.last_error.startswith("probe:")
    assert [e["event"] for e in logs] == ["instance_unhealthy"]


# -- settings ------------------------------------------------------------------------------------


def test_nameserver_setting_is_validated() -> None:
    assert parse_nameservers("127.0.0.1:5353  [::1]:53 10.0.0.2 ::1") == [
        ("127.0.0.1", 5353),
        ("::1", 53),
        ("10.0.0.2", 53),
        ("::1", 53),
    ]
    settings, _ = load_settings({"SIDECAR_DNS_NAMESERVERS": "127.0.0.1:5353"})
    assert settings.dns_nameservers == "127.0.0.1:5353"
    for bad in ("dns.example:53", "127.0.0.1:0", "127.0.0.1:x", "[::1", "[::1]x"):
        with pytest.raises(ConfigError, match="SIDECAR_DNS_NAMESERVERS"):
            load_settings({"SIDECAR_DNS_NAMESERVERS": bad})
    with pytest.raises(ConfigError, match="SIDECAR_DNS_MIN_INTERVAL"):
        load_settings({"SIDECAR_DNS_MIN_INTERVAL": "0"})
    settings, _ = load_settings(
        {"SIDECAR_MAX_PER_INSTANCE": "40", "SIDECAR_DNS_FORGET_AFTER": "30"}
    )
    assert (settings.max_per_instance, settings.dns_forget_after) == (40, 30.0)
