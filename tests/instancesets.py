"""Instance sets on a fake clock, for the balancer's and the roles' unit tests."""

from __future__ import annotations

from sidecar.upstream.balancer import Instance, InstanceSet, InstanceState

A, B, C = "10.1.0.1", "10.1.0.2", "10.1.0.3"


def make_set(*addrs: str, now: float = 0.0, host: str = "followers.test") -> InstanceSet:
    """A set that has just seen `addrs` in a DNS answer at `now`."""
    s = InstanceSet(host, 5432)
    s.seen(addrs, now, 1_700_000_000.0)
    return s


def inst(s: InstanceSet, addr: str) -> Instance:
    found = s.get(addr)
    assert found is not None
    return found


def state(i: Instance) -> InstanceState:
    """i.state, read through a call so mypy does not narrow it across mutations."""
    return i.state
