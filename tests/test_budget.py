"""The connection budget's rule (upstream/budget.py), on a simulation of N sidecars.

Each simulated sidecar has a demand (clients that want a server at once) and a soft cap; every
interval each one, in a random order (their checks are not synchronised), reads the instance
total as it is at that moment and applies the rule; its connection count then follows its cap
(short transactions: a lower cap closes servers at the next release, a higher one opens them
for the clients waiting). The same function runs in the sidecar.
"""

from __future__ import annotations

import random
from dataclasses import dataclass, field

import pytest

from sidecar.config import ConfigError, Settings, budget_setting
from sidecar.upstream import budget
from sidecar.upstream.balancer import InstanceSet
from sidecar.upstream.budget import BudgetSetting, InstanceBudget, next_cap, parse_budget


@dataclass
class Agent:
    demand: int
    state: InstanceBudget = field(default_factory=InstanceBudget)
    own: int = 0
    hard: int = 20

    def check(self, total: int, setting: BudgetSetting) -> None:
        self.state.answer(
            setting,
            own=self.own,
            total=total,
            max_connections=0,
            reserved=0,
            hard=self.hard,
        )
        self.follow()

    def follow(self) -> None:
        """Connections follow the cap and the demand; what the sidecar saw, for next time."""
        cap = self.state.soft_cap or self.hard
        want = min(self.demand, self.hard)
        self.state.hungry = self.demand > cap  # clients waited, for a soft or a hard cap
        self.own = min(want, cap) if self.demand else 0
        self.state.used = self.own


class Sim:
    def __init__(self, budget_: int, demands: list[int], seed: int, outside: int = 0) -> None:
        self.setting = BudgetSetting(fixed=budget_)
        self.budget = budget_
        self.rng = random.Random(seed)
        self.outside = outside
        self.agents: list[Agent] = []
        for d in demands:
            self.join(d)

    def join(self, demand: int) -> Agent:
        # A new sidecar opens one server, and its first check comes right after.
        agent = Agent(demand=demand, own=1)
        self.agents.append(agent)
        return agent

    def total(self) -> int:
        return sum(a.own for a in self.agents) + self.outside

    def interval(self) -> None:
        order = [a for a in self.agents if a.demand]
        self.rng.shuffle(order)
        for agent in order:
            agent.check(self.total(), self.setting)

    def run(self, intervals: int) -> list[list[int]]:
        shares = []
        for _ in range(intervals):
            self.interval()
            shares.append([a.own for a in self.agents])
        return shares


SEEDS = range(12)


@pytest.mark.parametrize("seed", SEEDS)
def test_equal_demand_converges_to_fair_shares_within_the_budget(seed: int) -> None:
    sim = Sim(30, [25, 25, 25], seed)
    sim.run(10)
    for shares in sim.run(10):
        assert max(shares) - min(shares) <= 4, shares  # each within ±2 of the others' middle
        # within the budget plus one interval's slack (one probe per sidecar)
        assert sum(shares) <= 30 + len(shares) + 1, shares
        assert min(shares) >= 8, shares  # nobody starves: about 10 each


@pytest.mark.parametrize("seed", SEEDS)
def test_many_sidecars_on_a_large_instance(seed: int) -> None:
    # 40 dynos on a 380-connection instance, auto budget: 0.9 * 377 = 339.
    sim = Sim(339, [30] * 40, seed)
    sim.run(10)
    for shares in sim.run(5):
        assert max(shares) - min(shares) <= 2, shares
        assert sum(shares) <= 377, sum(shares)  # max_connections - reserved


@pytest.mark.parametrize("seed", SEEDS)
def test_freed_budget_is_taken_up_within_three_intervals(seed: int) -> None:
    sim = Sim(30, [25, 25, 25], seed)
    sim.run(12)
    sim.agents[2].demand = 0  # a dyno stops
    sim.agents[2].own = 0
    shares = sim.run(3)[-1]
    assert shares[0] >= 13 and shares[1] >= 13, shares  # from ~10 to ~15 each
    assert sum(shares) <= 30 + 2 + 1


@pytest.mark.parametrize("seed", SEEDS)
def test_a_newcomer_gets_room_within_three_intervals(seed: int) -> None:
    sim = Sim(30, [25, 25], seed)
    sim.run(12)
    sim.join(25)
    shares = sim.run(3)[-1]
    assert shares[2] >= 7, shares  # room for the newcomer: about 10 each
    for shares in sim.run(10)[-5:]:
        assert max(shares) - min(shares) <= 4, shares
        assert sum(shares) <= 30 + 3 + 1, shares


@pytest.mark.parametrize("seed", SEEDS)
def test_little_demand_leaves_its_share_to_the_others(seed: int) -> None:
    sim = Sim(30, [25, 3, 25], seed)
    for shares in sim.run(15)[-5:]:
        assert shares[1] == 3, shares
        assert shares[0] >= 11 and shares[2] >= 11, shares  # (30 - 3) / 2, about 13
        assert sum(shares) <= 30 + 3


@pytest.mark.parametrize("seed", SEEDS)
def test_outside_demand_shrinks_every_sidecar_but_never_below_one(seed: int) -> None:
    sim = Sim(30, [25, 25, 25], seed)
    sim.run(10)
    sim.outside = 15  # direct connections hold half the budget
    for shares in sim.run(10)[-3:]:
        assert max(shares) <= 8, shares
        assert min(shares) >= 1
    sim.outside = 60  # more than the whole budget: everyone keeps one
    for shares in sim.run(10)[-3:]:
        assert shares == [1, 1, 1]


def test_the_hard_cap_stays_an_upper_bound() -> None:
    sim = Sim(300, [25], seed=1)
    sim.agents[0].hard = 6
    assert sim.run(5)[-1] == [6]
    cap = next_cap(50.0, own=6, total=7, budget=300, hungry=True, used=6, hard=6)
    assert cap == 6.0


def test_growth_is_bounded_when_sidecars_start_together() -> None:
    # Every one of 40 dynos starts at once and first sees an empty instance: nobody may take
    # the whole budget; after a few intervals the total is back within budget + slack.
    sim = Sim(339, [30] * 40, seed=3)
    history = sim.run(8)
    assert sum(history[0]) < 40 * 30
    assert sum(history[-1]) <= 339 + 40


def test_a_lone_sidecar_takes_the_free_budget_quickly() -> None:
    sim = Sim(100, [60], seed=1)
    sim.agents[0].hard = 60
    history = sim.run(4)
    assert history[0][0] >= 40, history  # the first answer grants half of what is free
    assert history[-1][0] == 60


def test_level_is_the_common_fixed_point() -> None:
    assert budget.level(31, 1) is None  # too close to the budget to mean anything
    lvl = budget.level(33, 3)
    assert lvl == pytest.approx(11.0)
    # A hungry sidecar at the level stays there.
    assert next_cap(11.0, own=11, total=33, budget=30, hungry=True, used=11, hard=0) == (
        pytest.approx(11.0)
    )


def test_warning_only_after_more_than_three_checks_over_budget_and_slack() -> None:
    st = InstanceBudget()
    setting = BudgetSetting(fixed=30)
    flags = [
        st.answer(setting, own=1, total=t, max_connections=0, reserved=0, hard=20)
        for t in (40, 40, 40, 40, 40, 33, 40)
    ]
    assert flags == [False, False, False, True, True, False, False]


def test_parse_budget() -> None:
    assert parse_budget("auto") == BudgetSetting(fraction=0.9)
    assert parse_budget("50%") == BudgetSetting(fraction=0.5)
    assert parse_budget(" 120 ") == BudgetSetting(fixed=120)
    assert not parse_budget("0").enabled
    assert parse_budget("auto").for_instance(380, 3) == 339
    assert parse_budget("5%").for_instance(300, 3) == 14
    assert parse_budget("40").for_instance(380, 3) == 40
    for bad in ("-1", "lots", "0%", "150%", "x%"):
        with pytest.raises(ValueError):
            parse_budget(bad)
    with pytest.raises(ConfigError, match="SIDECAR_INSTANCE_BUDGET"):
        budget_setting(Settings(instance_budget="many"))


def test_soft_caps_lower_the_cap_where_it_is_checked() -> None:
    rng = random.Random(1)
    s = InstanceSet("followers.test", 5432)
    a, b = s.seen(["10.0.0.1", "10.0.0.2"], now=0.0)
    a.servers, b.servers = 2, 3
    a.soft_cap = 2
    # a is at its soft cap: new servers go to b, up to the hard cap
    assert s.choose(4, 0.0, rng) is b
    b.servers = 4
    assert s.choose(4, 0.0, rng) is None
    # A lowered soft cap retires what is above it; the rest is spread over the others.
    a.servers, b.servers = 6, 2
    a.soft_cap = 3
    assert s.excess(10) == {"10.0.0.1": 3}
    b.soft_cap = 1
    assert s.excess(10) == {"10.0.0.1": 3, "10.0.0.2": 1}
