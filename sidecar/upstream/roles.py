"""Instance roles: which instances match a pool's target_session_attrs, and how lag excludes them.

Sans-IO like the balancer: every call takes `now`; the pool does the I/O (logins, the check
query) and reports what it learned here. What this module decides:

- The role of an instance, from what its servers report: PostgreSQL 14+ sends `in_hot_standby`
  and `default_transaction_read_only` as ParameterStatus at login (no extra round trip); older
  servers answer ROLE_QUERY once per login.
- Whether that role matches the pool's target, in libpq's `target_session_attrs` words: `any`,
  `read-write`, `primary`, `read-only`, `standby`, `prefer-standby`. `auto` (the default)
  becomes `read-write` when the first instance to report is a primary (a leader pool) and
  `prefer-standby` when it is a hot standby (a follower pool: libpq's "a standby if there is
  one, else any").
- WRONG_ROLE: an instance that does not match gets no new servers; its idle servers close and
  busy ones close at release (the balancer's excess plan retires all its servers). It is
  re-checked by a login after a backoff (ROLE_BACKOFF_INITIAL doubling to ROLE_BACKOFF_MAX:
  short, because a standby being promoted is worth finding quickly), and is UP again when its
  role matches.
- Leader pools follow DNS: the newest answer wins. Once an address the newest answer names is UP
  with the leader's role, every address that answer no longer names is retired at once
  (DRAINING, FORGOTTEN when its servers are gone), whatever a TCP check of it says: an old
  leader can stay reachable, and even writable, after a failover.
- LAGGING: a standby whose replay lag exceeds SIDECAR_MAX_REPLICA_LAG serves no new
  transactions; when every candidate lags, the least-lagging one serves anyway (a late read
  beats no read).
"""

from __future__ import annotations

import enum
import ipaddress
import random
from collections import deque
from collections.abc import Iterable
from dataclasses import dataclass

from .balancer import Instance, InstanceSet, InstanceState

#: libpq's target_session_attrs values, and ours: `auto`.
TARGETS = ("auto", "any", "read-write", "primary", "read-only", "standby", "prefer-standby")
#: Targets that make a pool a leader pool (DNS followed, newest answer wins).
LEADER_TARGETS = frozenset(("read-write", "primary"))
#: ParameterStatus names that carry the role (reported at login by PostgreSQL 14+).
ROLE_PARAMS = frozenset(("in_hot_standby", "default_transaction_read_only"))

#: First wait before a WRONG_ROLE instance is tried again by a login; doubles per mismatch.
ROLE_BACKOFF_INITIAL = 0.5
#: Longest such wait: a promotion is noticed within this much (plus a login).
ROLE_BACKOFF_MAX = 5.0

#: The role for servers that did not report it at login (PostgreSQL 13 and older).
ROLE_QUERY = (
    "SELECT pg_catalog.pg_is_in_recovery(),"
    " pg_catalog.current_setting('default_transaction_read_only')"
)

#: The periodic check on an idle server: the role a NEW session would get (reset_val: not
#: this session's own SETs); for a standby its replay lag in seconds -- 0 when all WAL
#: received is replayed (an idle primary sends none, so the last replayed commit's age says
#: nothing), else the age of the last replayed commit; the cluster's system identifier (a
#: leader and its standbys share it) and the WAL position: current on a primary, replayed on
#: a standby.
CHECK_QUERY = (
    "SELECT pg_catalog.pg_is_in_recovery(),"
    " (SELECT reset_val FROM pg_catalog.pg_settings"
    " WHERE name = 'default_transaction_read_only'),"
    " CASE WHEN NOT pg_catalog.pg_is_in_recovery() THEN NULL"
    " WHEN pg_catalog.pg_last_wal_receive_lsn() IS NOT NULL"
    " AND pg_catalog.pg_last_wal_receive_lsn() <= pg_catalog.pg_last_wal_replay_lsn() THEN 0"
    " ELSE COALESCE(EXTRACT(epoch FROM pg_catalog.now()"
    " - pg_catalog.pg_last_xact_replay_timestamp()), 0) END,"
    " (SELECT system_identifier FROM pg_catalog.pg_control_system())::text,"
    " (CASE WHEN pg_catalog.pg_is_in_recovery() THEN pg_catalog.pg_last_wal_replay_lsn()"
    " ELSE pg_catalog.pg_current_wal_lsn() END)::text"
)

#: Leader WAL samples older than this are dropped.
WAL_HISTORY_S = 900.0


class Change(enum.Enum):
    """What an observation changed, for the pool to log and act on."""

    NONE = "none"  #: nothing worth a line
    RESOLVED = "resolved"  #: `auto` became a concrete target (log `at=pool ... role=`)
    WRONG = "wrong"  #: the instance went WRONG_ROLE
    BACK = "back"  #: a WRONG_ROLE instance matches again: UP


def truthy(value: str | None) -> bool | None:
    """A boolean GUC as PostgreSQL reports it ("on"/"off"; "t"/"f" from a query)."""
    if value is None:
        return None
    return value.strip().lower() in ("on", "t", "true", "1", "yes")


def role_name(hot_standby: bool | None, read_only: bool | None) -> str:
    if hot_standby is None:
        return "unknown"
    if hot_standby:
        return "standby"
    return "read-only-primary" if read_only else "primary"


def matches(target: str, hot_standby: bool, read_only: bool) -> bool:
    """libpq's test for one server (prefer-standby accepts anything: ranks decide)."""
    if target == "read-write":
        return not hot_standby and not read_only
    if target == "read-only":
        return hot_standby or read_only
    if target == "primary":
        return not hot_standby
    if target == "standby":
        return hot_standby
    return True  # any, prefer-standby


def role_from_params(params: dict[str, str]) -> tuple[bool, bool] | None:
    """(hot standby, read only) from what a server reported at login; None before 14."""
    if "in_hot_standby" not in params:
        return None
    return bool(truthy(params["in_hot_standby"])), bool(
        truthy(params.get("default_transaction_read_only", "off"))
    )


def backoff(mismatches: int, rng: random.Random) -> float:
    base = min(ROLE_BACKOFF_MAX, ROLE_BACKOFF_INITIAL * 2.0 ** max(mismatches - 1, 0))
    return base * (1.0 + 0.2 * (2.0 * rng.random() - 1.0))


class Roles:
    """One pool's target, and the role bookkeeping of its instance set."""

    def __init__(self, target: str, max_lag: float = 0.0) -> None:
        if target not in TARGETS:
            raise ValueError(f"target_session_attrs {target!r}")
        self.configured = target
        #: The target in force; `auto` until the first instance reports its role.
        self.target = target
        self.max_lag = max_lag
        #: The cluster's system identifier, from the last check of any of its instances.
        self.system_id: str | None = None
        #: Leader pools: the leader's WAL positions, for follower pools on the same cluster.
        self.wal = WalHistory()
        #: Some pool of this process measures lag: a leader pool checks its instances (and
        #: keeps `wal`) even on an IP literal.
        self.record_wal = False

    @property
    def leader(self) -> bool:
        """A leader pool: its DNS name is followed (the newest answer wins)."""
        return self.target in LEADER_TARGETS

    @property
    def pool_role(self) -> str:
        if self.target == "auto":
            return "unknown"
        if self.target in LEADER_TARGETS:
            return "leader"
        if self.target in ("standby", "prefer-standby", "read-only"):
            return "follower"
        return "any"

    # -- roles ----------------------------------------------------------------------------------

    def observe(
        self,
        inst: Instance,
        hot_standby: bool,
        read_only: bool,
        now: float,
        rng: random.Random,
    ) -> Change:
        """A server of `inst` reported this role (at login, in a check, or a ParameterStatus)."""
        inst.hot_standby = hot_standby
        inst.read_only = read_only
        inst.role_checked = now
        change = Change.NONE
        if self.target == "auto":
            self.target = "prefer-standby" if hot_standby else "read-write"
            change = Change.RESOLVED
        # prefer-standby: a primary is a match, ranked after any standby.
        inst.rank = 1 if self.target == "prefer-standby" and not hot_standby else 0
        if inst.state in (InstanceState.DRAINING, InstanceState.FORGOTTEN):
            return change
        if matches(self.target, hot_standby, read_only):
            inst.role_mismatches = 0
            if inst.state is InstanceState.WRONG_ROLE:
                inst.state = InstanceState.UP
                inst.last_error = None
                return Change.BACK
            return change
        inst.role_mismatches += 1
        inst.recheck_at = now + backoff(inst.role_mismatches, rng)
        inst.last_error = f"{role_name(hot_standby, read_only)}, target {self.target}"
        if inst.state is not InstanceState.WRONG_ROLE:
            inst.state = InstanceState.WRONG_ROLE
            inst.lag_s = None
            return Change.WRONG
        return change

    def recheck_due(self, instances: InstanceSet, now: float) -> list[Instance]:
        """WRONG_ROLE instances whose backoff is over and with no trial login in flight; each
        is marked as having one (the pool opens a server there: its login tells the role)."""
        due = []
        for inst in instances:
            if inst.state is InstanceState.WRONG_ROLE and not inst.trial and inst.recheck_at <= now:
                inst.trial = True
                due.append(inst)
        return due

    def none_match(self, instances: InstanceSet) -> bool:
        """Every known instance reported a role that does not match: waiting will not help."""
        seen = False
        for inst in instances:
            if inst.state is InstanceState.WRONG_ROLE:
                seen = True
            elif inst.state in (InstanceState.UP, InstanceState.LAGGING, InstanceState.QUARANTINED):
                return False
        return seen

    def mismatch_reason(self, instances: InstanceSet) -> str:
        roles = sorted(
            {
                f"{i.label} is {role_name(i.hot_standby, i.read_only)}"
                for i in instances
                if i.state is InstanceState.WRONG_ROLE
            }
        )
        return f"no server matches target_session_attrs={self.target}: {'; '.join(roles)}"

    # -- DNS (leader pools) -------------------------------------------------------------------

    def answered(self, instances: InstanceSet, addrs: Iterable[str]) -> None:
        """A DNS answer named `addrs`: those are the newest; the others of the same address
        family are not (an A answer says nothing about IPv6 addresses, nor AAAA of IPv4)."""
        named = {_canonical(a) for a in addrs}
        families = {_family(a) for a in named}
        for inst in instances:
            if inst.addr in named:
                inst.superseded = False
            elif _family(inst.addr) in families:
                inst.superseded = True

    def follow_dns(self, instances: InstanceSet) -> list[Instance]:
        """Leader pools: once an address the newest answer names is UP with the leader's role,
        retire every superseded one now. Returns the instances that changed state."""
        if not self.leader or instances.static:
            return []
        ready = any(
            i.state is InstanceState.UP and not i.superseded and i.hot_standby is not None
            for i in instances
        )
        if not ready:
            return []
        changed: list[Instance] = []
        for inst in instances:
            if inst.superseded and inst.state is not InstanceState.FORGOTTEN:
                before = inst.state
                instances.retire(inst)
                if inst.state is not before:
                    changed.append(inst)
        return changed

    def unknown_due(self, instances: InstanceSet) -> list[Instance]:
        """Leader pools: addresses the newest answer names whose role is not known yet and
        that have no server to tell it; each is marked as having a trial login in flight.
        Why: a pool busy on the old leader may need no new server for a long while, and the
        new address must prove its role before the old one is let go."""
        if not self.leader or instances.static:
            return []
        due = []
        for inst in instances:
            if (
                inst.state is InstanceState.UP
                and not inst.superseded
                and inst.hot_standby is None
                and not inst.servers
                and not inst.trial
            ):
                inst.trial = True
                due.append(inst)
        return due

    # -- lag (follower pools) -----------------------------------------------------------------

    def lag(self, instances: InstanceSet, inst: Instance, lag_s: float | None) -> list[Instance]:
        """A check measured `inst`'s replay lag (None: not a standby). Re-decide which
        instances are LAGGING; return those whose state changed."""
        inst.lag_s = None if lag_s is None else max(0.0, lag_s)
        if self.max_lag <= 0:
            return []
        candidates = [i for i in instances if i.state in (InstanceState.UP, InstanceState.LAGGING)]
        over = [
            i
            for i in candidates
            if i.hot_standby and i.lag_s is not None and i.lag_s > self.max_lag
        ]
        keep: Instance | None = None
        if over and len(over) == len(candidates):
            # Every standby lags: the least-lagging one serves.
            keep = min(over, key=lambda i: (i.lag_s or 0.0, i.addr))
        changed: list[Instance] = []
        for i in candidates:
            want = InstanceState.LAGGING if i in over and i is not keep else InstanceState.UP
            if i.state is not want:
                i.state = want
                changed.append(i)
        return changed

    def all_lagging(self, instances: InstanceSet) -> bool:
        """Every standby lags (the one serving included): worth a warning."""
        if self.max_lag <= 0:
            return False
        standbys = [
            i
            for i in instances
            if i.state in (InstanceState.UP, InstanceState.LAGGING) and i.hot_standby
        ]
        return bool(standbys) and all(
            i.lag_s is not None and i.lag_s > self.max_lag for i in standbys
        )

    def check_due(self, instances: InstanceSet, now: float, interval: float) -> list[Instance]:
        """Instances whose periodic check (role, and lag where it counts) is due."""
        if interval <= 0:
            return []
        if self.max_lag <= 0 and not (self.leader and (self.record_wal or not instances.static)):
            # Nothing to measure: follower pools without a lag limit, and leader pools on an
            # IP literal (their role is checked at each login, and by what servers report)
            # unless a follower pool wants their WAL position.
            return []
        return [
            i
            for i in instances
            if i.state in (InstanceState.UP, InstanceState.LAGGING)
            and not i.checking
            and now - i.role_checked >= interval
        ]


@dataclass(frozen=True, slots=True)
class Check:
    """What one CHECK_QUERY said about an instance."""

    hot_standby: bool
    read_only: bool
    lag_s: float | None  #: by the last replayed commit's age (standbys)
    system_id: str | None  #: the cluster's identifier
    lsn: int | None  #: current WAL position (primary) or last replayed (standby)


def parse_check(row: list[str | None]) -> Check:
    hot = bool(truthy(row[0]))
    return Check(
        hot_standby=hot,
        read_only=bool(truthy(row[1])),
        lag_s=None if len(row) < 3 or row[2] is None else float(row[2]),
        system_id=row[3] if len(row) > 3 else None,
        lsn=parse_lsn(row[4]) if len(row) > 4 else None,
    )


def parse_lsn(text: str | None) -> int | None:
    """PostgreSQL's pg_lsn text ("16/B374D848") as a number; None if absent or malformed."""
    if not text:
        return None
    hi, sep, lo = text.partition("/")
    try:
        return (int(hi, 16) << 32) | int(lo, 16) if sep else None
    except ValueError:
        return None


class WalHistory:
    """A leader's WAL position over time, from its pool's periodic checks.

    A standby's lag is then measured against the leader itself: a standby that has not
    replayed the WAL the leader had written at time t is at least `now - t` behind. This
    needs no commit on the leader to age (an idle leader writes no WAL: no lag), and is as
    precise as the check interval.
    """

    def __init__(self, keep: float = WAL_HISTORY_S) -> None:
        self.keep = keep
        #: (monotonic time, WAL position), positions strictly increasing.
        self.samples: deque[tuple[float, int]] = deque()
        #: When the leader's position was last learned (an idle leader's stays the same).
        self.seen = float("-inf")

    def add(self, now: float, lsn: int) -> None:
        if not self.samples or lsn > self.samples[-1][1]:
            self.samples.append((now, lsn))
        self.seen = now
        while len(self.samples) > 1 and now - self.samples[0][0] > self.keep:
            self.samples.popleft()

    def lag(self, replayed: int, now: float, fresh: float) -> float | None:
        """Seconds `replayed` is behind the leader; None without a sample newer than
        `fresh` seconds (the leader pool has not been checked lately: use another measure)."""
        if not self.samples or now - self.seen > fresh:
            return None
        if replayed >= self.samples[-1][1]:
            return 0.0
        for at, lsn in self.samples:
            if lsn > replayed:
                return max(0.0, now - at)
        return 0.0


def _canonical(addr: str) -> str:
    try:
        return ipaddress.ip_address(addr).compressed
    except ValueError:
        return addr


def _family(addr: str) -> int:
    try:
        return ipaddress.ip_address(addr).version
    except ValueError:
        return 0


__all__ = [
    "CHECK_QUERY",
    "LEADER_TARGETS",
    "ROLE_PARAMS",
    "ROLE_QUERY",
    "TARGETS",
    "Change",
    "Check",
    "Roles",
    "WalHistory",
    "matches",
    "parse_check",
    "parse_lsn",
    "role_from_params",
    "role_name",
    "truthy",
]
