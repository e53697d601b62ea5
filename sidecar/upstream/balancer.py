"""Which instance gets the next server connection: health states, caps and spread, sans-IO.

One `InstanceSet` holds what is known about the instances behind one host:port — fed by DNS
discovery (`seen`, `expire`) and by connect outcomes (`success`, `failure`) — and answers the
pool's two questions: where to open the next server connection (`choose`) and which idle ones to
retire so connections are spread evenly (`excess`). No asyncio, no sockets, no clock of its own:
every call takes `now` (time.monotonic() in production, a plain number in tests).

Rules, per address:
- Named by a DNS answer for the first time: UP. Named again while DRAINING: UP again.
- A failed connect, login or probe (failure()): QUARANTINED, retried after a backoff of 0.5 s
  doubling to 30 s, jittered — by one half-open trial connection (choose) or a probe
  (probe_due). A good connect or probe (success()): UP.
- Stale (missing from DNS answers for `forget_after`) and UP: kept, still chosen, and probed
  every STALE_CHECK_INTERVAL. Stale and failing (QUARANTINED, or a failure while stale):
  DRAINING while it still has servers, else FORGOTTEN. DRAINING with no servers left: FORGOTTEN.
- FORGOTTEN instances leave the set; named by DNS later, they come back as new.
- WRONG_ROLE (its role does not match the pool's target) and LAGGING (a standby behind the
  pool's lag limit) are set and cleared by roles.Roles: never chosen, every server retired as
  for DRAINING. A WRONG_ROLE instance unseen by DNS for forget_after is retired too.

Why staleness alone never takes a healthy instance out of rotation: a pool endpoint's DNS
rotates one address per answer across ALL its clients, so with 13 instances and a query every
5 s a live instance goes unseen for 120 s about one time in seven. So an address is kept until
it is stale AND fails a health check (a probe, or a real connection refused, unreachable or
timed out).
"""

from __future__ import annotations

import enum
import ipaddress
import random
from collections.abc import Iterable, Iterator
from dataclasses import dataclass
from typing import Any

#: First quarantine after a failure; doubles with each consecutive failure.
BACKOFF_INITIAL = 0.5
#: Longest quarantine (before jitter).
BACKOFF_MAX = 30.0
#: Quarantines are stretched or shrunk by up to this fraction, so instances (and dynos) that
#: failed together are not all retried in the same instant.
BACKOFF_JITTER = 0.2
#: How often a stale but UP instance is probed to decide whether to keep it.
STALE_CHECK_INTERVAL = 10.0
#: Weight of the newest sample in the connect time average.
CONNECT_MS_ALPHA = 0.2


class InstanceState(enum.Enum):
    UP = "up"  #: healthy as far as we know; chosen for new server connections
    QUARANTINED = "quarantined"  #: a connect or probe failed; retried after `quarantine_until`
    DRAINING = "draining"  #: left DNS and failed a check with servers open: never chosen, emptied
    FORGOTTEN = "forgotten"  #: removed from its set; a pool still holding it must let go
    #: its role does not match the pool's target_session_attrs (roles.py): never chosen,
    #: emptied, re-checked by a login after `recheck_at`
    WRONG_ROLE = "wrong_role"
    #: a standby whose replay lag is over the pool's limit (roles.py): never chosen, emptied
    LAGGING = "lagging"


def canonical_addr(addr: str) -> str:
    """One spelling per address ("::0001" and "::1" are one instance); paths pass unchanged."""
    try:
        return ipaddress.ip_address(addr).compressed
    except ValueError:
        return addr


@dataclass(eq=False)
class Instance:
    """One PostgreSQL instance behind the host, and this pool's view of it."""

    addr: str  #: IP literal (or a unix socket directory for a socket host)
    port: int
    state: InstanceState = InstanceState.UP
    #: This pool's server connections to it, open OR being opened: the pool adds one before it
    #: starts connecting and takes it away when the connection closes (or fails to open).
    servers: int = 0
    first_seen: float = 0.0  #: monotonic time of the first DNS answer naming it
    last_seen: float = 0.0  #: monotonic time of the last DNS answer naming it
    last_seen_wall: float | None = None  #: time.time() of that answer, for display
    last_error: str | None = None
    failures: int = 0  #: consecutive failed connects/probes; drives the backoff
    quarantine_until: float = 0.0  #: QUARANTINED: no trial before this (monotonic)
    connect_failures: int = 0  #: failed connects and probes in total, for stats
    connect_ms: float | None = None  #: moving average of successful connect (and login) times
    #: A half-open trial connection or a probe is in flight: no second one until it reports.
    trial: bool = False
    #: Missing from DNS answers for forget_after (set by expire(), cleared by seen()).
    stale: bool = False
    checked_at: float = 0.0  #: last time it proved healthy or a probe of it started
    # Role and lag (kept by roles.Roles; None until a server of it reported).
    hot_standby: bool | None = None
    read_only: bool | None = None
    role_checked: float = 0.0  #: last time its role was learned (login or check)
    role_mismatches: int = 0  #: consecutive logins/checks with the wrong role: the backoff
    recheck_at: float = 0.0  #: WRONG_ROLE: no trial login before this (monotonic)
    lag_s: float | None = None  #: replay lag at the last check (standbys)
    checking: bool = False  #: a role/lag check query is running on one of its servers
    #: Choice preference, lower first (prefer-standby ranks primaries after standbys).
    rank: int = 0
    #: Not named by the newest DNS answer of its address family (leader pools follow DNS).
    superseded: bool = False
    #: Connection budget (budget.py): this pool's soft cap here (0 = none), the instance's
    #: budget and its last counted total of the user's backends (None = not known yet).
    soft_cap: int = 0
    budget: int | None = None
    instance_total: int | None = None
    #: Servers there in use by a client now, and the most at once since the budget last
    #: looked (kept by the pool's one state mover).
    active: int = 0
    busiest: int = 0

    def limit(self, cap: int) -> int:
        """The hard cap `cap` (0 = none) lowered by the soft cap, if any."""
        soft = self.soft_cap
        if soft <= 0:
            return cap
        return soft if cap <= 0 else min(cap, soft)

    @property
    def label(self) -> str:
        """addr:port, with brackets around IPv6 addresses."""
        return f"[{self.addr}]:{self.port}" if ":" in self.addr else f"{self.addr}:{self.port}"


def backoff(failures: int, rng: random.Random) -> float:
    """Quarantine length after `failures` consecutive failures: 0.5 s doubling to 30 s, ±20 %."""
    base = min(BACKOFF_MAX, BACKOFF_INITIAL * 2.0 ** max(failures - 1, 0))
    return base * (1.0 + BACKOFF_JITTER * (2.0 * rng.random() - 1.0))


class InstanceSet:
    """Every known instance of one host:port, keyed by address."""

    def __init__(self, host: str, port: int) -> None:
        self.host = host
        self.port = port
        #: An IP literal (or socket directory) names its only instance forever: nothing expires.
        self.static = _is_static(host)
        self.instances: dict[str, Instance] = {}

    def __len__(self) -> int:
        return len(self.instances)

    def __iter__(self) -> Iterator[Instance]:
        return iter(list(self.instances.values()))

    def get(self, addr: str) -> Instance | None:
        return self.instances.get(canonical_addr(addr))

    # -- DNS ------------------------------------------------------------------------------------

    def seen(self, addrs: Iterable[str], now: float, wall: float | None = None) -> list[Instance]:
        """A DNS answer named these addresses; return the instances that are new or back (UP).

        New addresses start UP. A DRAINING one that is named again is wanted again: UP, its
        failure count kept so a flapping instance still backs off. QUARANTINED ones stay so:
        being in DNS says nothing about health.
        """
        changed: list[Instance] = []
        for raw in addrs:
            addr = canonical_addr(raw)
            inst = self.instances.get(addr)
            if inst is None:
                inst = Instance(addr=addr, port=self.port, first_seen=now, checked_at=now)
                self.instances[addr] = inst
                changed.append(inst)
            elif inst.state is InstanceState.DRAINING:
                inst.state = InstanceState.UP
                inst.checked_at = now
                changed.append(inst)
            inst.last_seen = now
            inst.last_seen_wall = wall
            inst.stale = False
        return changed

    def expire(self, now: float, forget_after: float) -> list[Instance]:
        """Apply the forget rules; return the instances that became DRAINING or FORGOTTEN.

        For an address missing from DNS answers for `forget_after` seconds ("stale"):
        - UP: kept and still chosen (DNS may just not have rotated to it); marked stale so
          `probe_due` checks it every STALE_CHECK_INTERVAL.
        - QUARANTINED (its last connect or probe failed) or WRONG_ROLE: FORGOTTEN if it has
          no servers, else DRAINING.
        Whatever its age, a DRAINING instance with no servers left is FORGOTTEN.
        FORGOTTEN instances are removed from the set. Nothing expires in a static set.
        """
        if self.static:
            return []
        changed: list[Instance] = []
        for inst in list(self.instances.values()):
            if inst.state is not InstanceState.DRAINING and now - inst.last_seen >= forget_after:
                inst.stale = True
                if inst.state in (InstanceState.QUARANTINED, InstanceState.WRONG_ROLE):
                    self._retire(inst, changed)
            elif inst.state is InstanceState.DRAINING and inst.servers <= 0:
                self._retire(inst, changed)
        return changed

    def retire(self, inst: Instance) -> None:
        """Out of rotation now whatever its health (a leader pool's superseded address)."""
        self._retire(inst, [])

    def _retire(self, inst: Instance, changed: list[Instance]) -> None:
        """Out of rotation: DRAINING while it has servers, else FORGOTTEN and removed."""
        if inst.servers > 0:
            if inst.state is not InstanceState.DRAINING:
                inst.state = InstanceState.DRAINING
                changed.append(inst)
            return
        inst.state = InstanceState.FORGOTTEN
        inst.trial = False
        self.instances.pop(inst.addr, None)
        changed.append(inst)

    # -- health ---------------------------------------------------------------------------------

    def failure(self, inst: Instance, now: float, error: str, rng: random.Random) -> None:
        """A connect, login or probe of `inst` failed (refused, unreachable, timed out, ...).

        QUARANTINED for a jittered, exponentially growing time. A stale instance has now
        failed its health check too: it goes DRAINING, or FORGOTTEN if it has no servers (so
        report the failure after taking the failed attempt off `servers`).
        """
        inst.trial = False
        inst.failures += 1
        inst.connect_failures += 1
        inst.last_error = error
        if inst.state is InstanceState.FORGOTTEN or self.instances.get(inst.addr) is not inst:
            return
        inst.quarantine_until = now + backoff(inst.failures, rng)
        if inst.state is InstanceState.DRAINING:
            return
        inst.state = InstanceState.QUARANTINED
        if inst.stale and not self.static:
            self._retire(inst, [])

    def success(self, inst: Instance, now: float, connect_ms: float | None = None) -> None:
        """`inst` accepted a connection: UP again (a DRAINING one stays DRAINING).

        `connect_ms` is for a real server connection (connect + TLS + login), which also resets
        the failure count. A probe passes None: a bare TCP accept proves less than a login, so
        the count is kept and a login refused right after it quarantines for longer.
        """
        inst.trial = False
        inst.checked_at = now
        if connect_ms is not None:
            inst.failures = 0
            inst.last_error = None
            if inst.connect_ms is None:
                inst.connect_ms = connect_ms
            else:
                inst.connect_ms += CONNECT_MS_ALPHA * (connect_ms - inst.connect_ms)
        if inst.state is InstanceState.QUARANTINED:
            inst.state = InstanceState.UP
            inst.quarantine_until = 0.0

    def probe_due(self, now: float) -> list[Instance]:
        """Instances the pool should probe now; each is marked as having a trial in flight.

        QUARANTINED instances whose quarantine is over, and stale UP instances not checked for
        STALE_CHECK_INTERVAL. Report each outcome with success(inst, now) or failure(...)
        (`instances.Discovery.probe` does both).
        """
        due: list[Instance] = []
        for inst in self.instances.values():
            if inst.trial:
                continue
            if (inst.state is InstanceState.QUARANTINED and inst.quarantine_until <= now) or (
                inst.state is InstanceState.UP
                and inst.stale
                and now - inst.checked_at >= STALE_CHECK_INTERVAL
            ):
                inst.trial = True
                inst.checked_at = now
                due.append(inst)
        return due

    # -- balancing ------------------------------------------------------------------------------

    def choose(self, cap: int, now: float, rng: random.Random) -> Instance | None:
        """Where to open the next server connection, or None if every instance is full or down.

        The UP instance with the fewest servers below `cap` (0 = no cap; lowered by the
        instance's soft cap), ties broken at random
        so dynos starting together do not all pile onto the same instance. With none, a
        QUARANTINED instance whose quarantine is over gets one trial connection (half-open);
        its outcome must be reported with success() or failure(). Never DRAINING/FORGOTTEN.
        The caller adds one to `servers` of the instance it gets.
        """
        up = [
            i
            for i in self.instances.values()
            if i.state is InstanceState.UP and ((c := i.limit(cap)) <= 0 or i.servers < c)
        ]
        if up:
            if any(i.rank for i in up):  # prefer-standby: standbys first
                best = min(i.rank for i in up)
                up = [i for i in up if i.rank == best]
            fewest = min(i.servers for i in up)
            return rng.choice([i for i in up if i.servers == fewest])
        trials = [
            i
            for i in self.instances.values()
            if i.state is InstanceState.QUARANTINED
            and not i.trial
            and i.quarantine_until <= now
            and ((c := i.limit(cap)) <= 0 or i.servers < c)
        ]
        if not trials:
            return None
        fewest = min(i.failures for i in trials)
        inst = rng.choice([i for i in trials if i.failures == fewest])
        inst.trial = True
        inst.checked_at = now
        return inst

    def excess(self, cap: int) -> dict[str, int]:
        """How many connections to retire per instance (idle ones, as they become idle).

        The servers on UP instances are split evenly over the UP instances (the spread within
        one, the fullest keeping the larger shares so the fewest connections move) and no
        target above the instance's cap (`cap` lowered by its soft cap, Instance.limit; what a
        capped instance cannot take is split over the others): when an instance joins with
        none, the others give up theirs and new connections, chosen by fewest servers, fill it.
        Every server on a DRAINING instance is excess; on a QUARANTINED one only what is above
        its cap. Instances with nothing to retire are left out.
        """
        plan: dict[str, int] = {}
        up = [i for i in self.instances.values() if i.state is InstanceState.UP]
        if up:
            remaining = sum(i.servers for i in up)
            # Instances whose cap (a soft cap can differ per instance) is below an even share
            # keep their cap; the rest is split evenly over the others.
            even = sorted(up, key=lambda i: (i.limit(cap) <= 0, i.limit(cap)))
            while even and 0 < even[0].limit(cap) <= remaining // len(even):
                inst = even.pop(0)
                remaining -= inst.limit(cap)
                if inst.servers > inst.limit(cap):
                    plan[inst.addr] = inst.servers - inst.limit(cap)
            if even:
                base, extra = divmod(remaining, len(even))
                ranked = sorted(even, key=lambda i: (-i.servers, i.addr))
                for rank, inst in enumerate(ranked):
                    target = base + (1 if rank < extra else 0)
                    if inst.limit(cap) > 0:
                        target = min(target, inst.limit(cap))
                    if inst.servers > target:
                        plan[inst.addr] = inst.servers - target
        gone = (InstanceState.DRAINING, InstanceState.WRONG_ROLE, InstanceState.LAGGING)
        for inst in self.instances.values():
            limit = inst.limit(cap)
            if inst.state in gone and inst.servers > 0:
                plan[inst.addr] = inst.servers
            elif inst.state is InstanceState.QUARANTINED and 0 < limit < inst.servers:
                plan[inst.addr] = inst.servers - limit
        return plan

    # -- display --------------------------------------------------------------------------------

    def snapshot(self, now: float, cap: int = 0) -> list[dict[str, Any]]:
        """One plain dict per instance (sorted by address) for stats lines and the console."""
        rows: list[dict[str, Any]] = []
        for inst in sorted(self.instances.values(), key=lambda i: i.addr):
            rows.append(
                {
                    "addr": inst.addr,
                    "port": inst.port,
                    "state": inst.state.name.lower(),
                    "servers": inst.servers,
                    "cap": cap,
                    "last_seen_age": round(now - inst.last_seen, 1),
                    "last_seen_wall": inst.last_seen_wall,
                    "stale": inst.stale,
                    "failures": inst.failures,
                    "connect_failures": inst.connect_failures,
                    "connect_ms": None if inst.connect_ms is None else round(inst.connect_ms, 1),
                    "last_error": inst.last_error,
                    "hot_standby": inst.hot_standby,
                    "read_only": inst.read_only,
                    "lag_s": None if inst.lag_s is None else round(inst.lag_s, 1),
                    "budget": inst.budget,
                    "soft_cap": inst.soft_cap or None,
                    "instance_total": inst.instance_total,
                }
            )
        return rows


def _is_static(host: str) -> bool:
    if host.startswith("/"):
        return True
    try:
        ipaddress.ip_address(host)
    except ValueError:
        return False
    return True


__all__ = [
    "BACKOFF_INITIAL",
    "BACKOFF_JITTER",
    "BACKOFF_MAX",
    "STALE_CHECK_INTERVAL",
    "Instance",
    "InstanceSet",
    "InstanceState",
    "backoff",
    "canonical_addr",
]
