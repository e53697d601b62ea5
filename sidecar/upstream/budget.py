"""One connection budget per instance, shared by every sidecar of an app, sans-IO.

Every dyno runs its own sidecar and none knows the others; the instance sees them all. So each
sidecar (each pool of each worker, precisely: an "agent") asks the instance, every
SIDECAR_BUDGET_INTERVAL and on a server connection it already has open there, how many backends
the pool's user has (`QUERY`), and moves a soft cap on its own connections there with
`next_cap`. No registry, no table, no extra connection: the count is the only message.

The rule, per agent and instance, with B the budget, T the instance total, c our own count:

- Fit: c * B / T. If every agent scales by B / T the total lands on B, whatever the split.
- Probe: an agent that wanted more than it had (clients waited for a server, at its soft cap
  or at a hard one: "hungry") adds STEP. Scaling alone keeps whatever split the agents had;
  the equal step is what makes the small shares catch up (AIMD's reason for additive
  increase), and it lets demand show.
- Level: with every hungry agent doing c' = c*B/T + STEP, the fixed point is the same for all
  of them, c = STEP*T / (T-B), whatever the number of agents and whatever the satisfied ones
  hold. Every agent can compute it from T alone (the excess smoothed over a few checks, SMOOTH),
  so each is pulled a quarter of the way up to it (PULL), half the way down (PULL_DOWN), once
  over the budget by enough to trust (TRUST_EXCESS): the shares converge within a few
  intervals rather than the tens the probe alone takes, and a newcomer starts at it.
- An agent whose clients never waited but that had every server its cap allows in use (a pool
  sized to the app's threads, at its hard cap) is busy all the same: over the budget it fits
  and comes down to the level, without a probe.
- An agent with room under its cap leaves what it does not use: over the budget its cap comes
  down to its peak use plus one (the one lets a rise in demand show as waiting). Under the
  budget it keeps the servers it has (closing them would free nothing anyone needs).
- Never below 1 (every agent keeps serving), never above the hard caps, and growth per interval
  at most doubles the count (plus half the free budget): agents that start together each see the
  instance nearly empty, and must not all take the whole budget at once.

The price of fairness without a registry: at the fixed point the total sits at B plus about one
connection per hungry agent (the probes), i.e. "the budget plus one interval's slack". The auto
budget (90 % of the usable connections) leaves room for it; a warning needs the total over the
budget by more than OVER_SLACK for more than OVER_CHECKS checks in a row.

Who counts: the backends of the pool's user (`usename`), in every database, client backends
only. The limit it protects (max_connections) is per instance, over all databases: pools of one
user on two databases share it, so counting per database would grant each the whole budget.
Other users (another credential, psql sessions of a person) are not ours to throttle: they are
outside demand, seen only as a tighter instance (and by the warning when they use our user).
"""

from __future__ import annotations

import math
from collections.abc import Iterable
from dataclasses import dataclass
from typing import TYPE_CHECKING

if TYPE_CHECKING:
    from .balancer import Instance

#: Every hungry agent adds this much per interval (the additive part of AIMD).
STEP = 1.0
#: Fraction of the way to the common level an agent moves per interval.
PULL = 0.25
#: The same, for an agent above the level.
PULL_DOWN = 0.5
#: The level is trusted once the total exceeds the budget by this many probes.
TRUST_EXCESS = 1.5
#: Weight of the newest count in the smoothed excess over the budget.
SMOOTH = 0.5
#: `auto`: this fraction of (max_connections - superuser_reserved_connections).
AUTO_FRACTION = 0.9
#: Consecutive checks over budget + slack before the warning line.
OVER_CHECKS = 3


def over_slack(budget: int) -> int:
    """How far over the budget the total may be without a warning: the probes of the hungry
    sidecars, about one each (3 sidecars at a budget of 30), or 10 % of the budget."""
    return max(3, budget // 10)


@dataclass(frozen=True, slots=True)
class BudgetSetting:
    """SIDECAR_INSTANCE_BUDGET parsed: off, a fixed number, or a fraction of each instance."""

    #: Connections per instance for all sidecars together (0 when `fraction` is used).
    fixed: int = 0
    #: Fraction of the instance's usable connections (0.0 when `fixed` is used).
    fraction: float = 0.0

    @property
    def enabled(self) -> bool:
        return self.fixed > 0 or self.fraction > 0

    def for_instance(self, max_connections: int, reserved: int) -> int:
        """The budget for an instance with these settings (at least 1)."""
        if self.fixed:
            return self.fixed
        return max(1, math.floor(self.fraction * max(max_connections - reserved, 1)))


def parse_budget(text: str) -> BudgetSetting:
    """`auto` (90 %), `N%` (N % of each instance's usable connections), a number, or 0 (off).

    Raises ValueError with the reason."""
    value = text.strip().lower()
    if value == "auto":
        return BudgetSetting(fraction=AUTO_FRACTION)
    if value.endswith("%"):
        try:
            percent = float(value[:-1])
        except ValueError:
            raise ValueError("a percentage must be a number followed by %") from None
        if not 0 < percent <= 100:
            raise ValueError("a percentage must be more than 0% and at most 100%")
        return BudgetSetting(fraction=percent / 100.0)
    try:
        number = int(value)
    except ValueError:
        raise ValueError("must be auto, a percentage like 50%, a number, or 0 (off)") from None
    if number < 0:
        raise ValueError("must not be negative")
    return BudgetSetting(fixed=number)


#: The one query, on a server connection the pool already has: the user's client backends on
#: the instance, and the two settings the auto budget needs. `{user}` is a quoted literal.
QUERY = (
    "SELECT count(*) FILTER (WHERE usename = {user} AND backend_type = 'client backend'),"
    " pg_catalog.current_setting('max_connections'),"
    " pg_catalog.current_setting('superuser_reserved_connections')"
    " FROM pg_catalog.pg_stat_activity"
)


def level(total: int, excess: float) -> float | None:
    """The share every hungry agent converges to (the fixed point of fit + probe: T / (T-B)
    probes), or None while the excess over the budget is too small to mean anything."""
    if excess < TRUST_EXCESS * STEP:
        return None
    return STEP * total / excess


def first_cap(own: int, total: int, budget: int, hard: int) -> float:
    """An agent's cap at its first answer from an instance: the common level if the instance
    is full (a newcomer gets room now, not after tens of probes), else a share of what is free."""
    t = max(total, own, 1)
    if t + STEP >= budget:
        # Full: the level the others converge to once this sidecar's own probe is added to
        # theirs (one sidecar alone at the budget makes room for half).
        return _bounded(STEP * t / (max(t - budget, STEP) + STEP), hard)
    return _bounded(own + max(STEP, (budget - t) / 2), hard)


def next_cap(
    cap: float,
    *,
    own: int,
    total: int,
    budget: int,
    hungry: bool,
    used: int,
    hard: int,
    excess: float | None = None,
) -> float:
    """The next soft cap of one agent on one instance.

    cap: the current soft cap (float: the fractions the integer counts drop are kept here);
    own: our server connections there now; total: the instance's count (ours included);
    hungry: clients waited for a server since the last check; used: the most servers
    in use at once there since the last check; hard: the hard cap (0 = none); excess: the
    total's excess over the budget, smoothed over the last checks (default: this one's).
    """
    t = max(total, own, 1)
    # Only while over the budget: under it there is no common level (the total still moves).
    lvl = level(t, t - budget if excess is None else excess) if t > budget else None
    if hungry:
        # At the cap: the float cap carries the probes that the integer count rounds away.
        base = max(float(own), cap)
        new = base * budget / t + STEP
        if lvl is not None:
            # Down harder than up: the shares still meet, and the total settles lower.
            pull = (PULL if lvl > base else PULL_DOWN) * (lvl - base)
            # Up by one more probe at most: a level read from a small excess is noisy, and an
            # overestimate grows the total; down by half at most.
            new += max(-base / 2, min(pull, STEP))
        new = min(new, base + max(STEP, base, (budget - t) / 2))
    elif t > budget and used >= own >= int(cap):
        # Nobody waited, but every server the cap allows was in use (a pool sized to the app's
        # threads, at its hard cap):
        # it fits to the budget like the others, without a probe (it asked for nothing more),
        # and comes down to the level with them.
        new = own * budget / t
        if lvl is not None and lvl < own:
            new += max(-own / 2, PULL_DOWN * (lvl - own))
        new = min(cap, new)
    elif t >= budget:
        # Satisfied, with room under its cap: what it did not use goes to the others.
        new = min(cap, used + 1.0)
    else:
        new = max(used + 1.0, min(cap, float(own + budget - t)))
    return _bounded(new, hard)


def _bounded(value: float, hard: int) -> float:
    value = max(1.0, value)
    return min(value, float(hard)) if hard > 0 else value


@dataclass(slots=True)
class InstanceBudget:
    """One agent's budget state for one instance."""

    #: The instance's budget; None until the first answer (the auto budget needs it).
    budget: int | None = None
    cap: float = 0.0  #: the soft cap (0.0: none yet)
    total: int | None = None  #: the instance total at the last answer
    hungry: bool = False  #: clients waited at the soft cap since the last check
    used: int = 0  #: most servers in use at once since the last check
    over: int = 0  #: consecutive checks with the total over budget + slack
    #: The total's excess over the budget, smoothed (SMOOTH): one count is off by the checks
    #: of others between two of ours, and the level divides by it.
    excess: float | None = None
    due: float = 0.0  #: monotonic time of the next check
    checking: bool = False  #: a check is in flight (or waits for a server to come free)

    @property
    def soft_cap(self) -> int:
        return max(1, int(self.cap)) if self.cap else 0

    def answer(
        self,
        setting: BudgetSetting,
        *,
        own: int,
        total: int,
        max_connections: int,
        reserved: int,
        hard: int,
    ) -> bool:
        """Apply one count; return True when the over-budget warning is due."""
        if self.budget is not None:
            ex = float(total - self.budget)
            if ex <= 0:
                self.excess = None  # under the budget: no level; start afresh when over
            else:
                old = self.excess
                self.excess = ex if old is None else old + SMOOTH * (ex - old)
        if self.budget is None:
            # Read once per instance: max_connections only changes with a restart, and an
            # instance that comes back after one is a new Instance with a new state.
            self.budget = setting.for_instance(max_connections, reserved)
            self.cap = first_cap(own, total, self.budget, hard)
        else:
            self.cap = next_cap(
                self.cap or float(max(own, 1)),
                own=own,
                total=total,
                budget=self.budget,
                hungry=self.hungry,
                used=self.used,
                hard=hard,
                excess=self.excess,
            )
        self.total = total
        self.hungry = False
        self.used = 0
        if total > self.budget + over_slack(self.budget):
            self.over += 1
        else:
            self.over = 0
        return self.over > OVER_CHECKS


class Budgets:
    """One pool's budget states, one per instance it uses; the pool does the talking.

    The pool calls `due` from its janitor and runs QUERY on a server of each instance it gets
    (an idle one, or the next one released there), then hands the answer to `answer`. It
    reports demand with `blocked` (clients wait); Instance.busiest has the most servers in use
    at once. Instances are keyed by identity: one that was forgotten and comes back
    is a new Instance, and starts afresh (its max_connections may have changed).
    """

    def __init__(self, setting: BudgetSetting, interval: float) -> None:
        self.setting = setting
        self.interval = interval
        self.states: dict[Instance, InstanceBudget] = {}

    def state(self, inst: Instance) -> InstanceBudget:
        st = self.states.get(inst)
        if st is None:
            st = self.states[inst] = InstanceBudget()
        return st

    def due(self, instances: Iterable[Instance], now: float) -> list[Instance]:
        """Instances to count now: those we hold servers on, whose interval is over."""
        live = set(instances)
        for gone in [i for i in self.states if i not in live]:
            del self.states[gone]
        due: list[Instance] = []
        for inst in live:
            if inst.servers <= 0:
                continue
            st = self.state(inst)
            if not st.checking and now >= st.due:
                st.checking = True
                due.append(inst)
        return due

    def first_check(self, instances: Iterable[Instance]) -> list[Instance]:
        """Instances never counted and not being counted: soft cap 1 until their first answer
        (if the pool holds none there yet); the caller runs their check on the first server
        it holds there."""
        new: list[Instance] = []
        for inst in instances:
            st = self.state(inst)
            if st.budget is None and not st.checking:
                st.checking = True
                if inst.servers == 0:
                    # Not if the pool already opened some there (a login came first): the
                    # excess plan would close them again.
                    inst.soft_cap = 1
                new.append(inst)
        return new

    def done(self, inst: Instance, now: float) -> None:
        """A check finished or failed: the next one is an interval away (or as soon as a
        server is there, while the instance has never answered)."""
        st = self.state(inst)
        st.checking = False
        st.due = now if st.budget is None else now + self.interval

    def blocked(self, instances: Iterable[Instance]) -> None:
        """Clients wait for a server: the pool wants more than it holds, on every instance it
        uses (one with room would have got the connection). Held back by a soft cap or by a
        hard one, it is a busy sidecar either way, and must take part in the level."""
        for inst in instances:
            if inst.servers > 0:
                self.state(inst).hungry = True

    def answer(
        self, inst: Instance, *, total: int, max_connections: int, reserved: int, hard: int
    ) -> bool:
        """Apply a count to the instance's soft cap; True when the over-budget warning is due."""
        st = self.state(inst)
        # The check's own server counts as in use: it is one of ours, busy for the count.
        st.used = max(st.used, inst.busiest)
        inst.busiest = inst.active
        warn = st.answer(
            self.setting,
            own=inst.servers,
            total=total,
            max_connections=max_connections,
            reserved=reserved,
            hard=hard,
        )
        inst.soft_cap = st.soft_cap
        inst.budget = st.budget
        inst.instance_total = total
        return warn


__all__ = [
    "AUTO_FRACTION",
    "OVER_CHECKS",
    "PULL",
    "QUERY",
    "STEP",
    "TRUST_EXCESS",
    "BudgetSetting",
    "Budgets",
    "InstanceBudget",
    "first_cap",
    "level",
    "next_cap",
    "over_slack",
    "parse_budget",
]
