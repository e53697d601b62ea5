"""upstream.balancer: choice, caps, quarantine, rebalancing plans, forget rules; fake clock."""

from __future__ import annotations

import random
from collections import Counter

import pytest
from instancesets import A, B, C, inst, make_set, state

from sidecar.upstream.balancer import (
    BACKOFF_INITIAL,
    BACKOFF_JITTER,
    BACKOFF_MAX,
    STALE_CHECK_INTERVAL,
    Instance,
    InstanceSet,
    InstanceState,
    backoff,
)

FORGET = 120.0


def open_on(s: InstanceSet, cap: int, now: float, rng: random.Random) -> Instance | None:
    """What the pool does per new server connection: choose, then count it."""
    chosen = s.choose(cap, now, rng)
    if chosen is not None:
        chosen.servers += 1
    return chosen


# -- choose --------------------------------------------------------------------------------------


def test_twenty_picks_spread_ten_ten() -> None:
    s = make_set(A, B)
    rng = random.Random(1)
    picks = Counter(open_on(s, 0, 0.0, rng).addr for _ in range(20))  # type: ignore[union-attr]
    assert picks == {A: 10, B: 10}


def test_least_connections_first() -> None:
    s = make_set(A, B, C)
    inst(s, A).servers = 5
    inst(s, B).servers = 2
    inst(s, C).servers = 3
    assert s.choose(0, 0.0, random.Random(0)) is inst(s, B)


def test_cap_is_respected_and_none_when_all_full() -> None:
    s = make_set(A, B)
    rng = random.Random(2)
    chosen = [open_on(s, 3, 0.0, rng) for _ in range(6)]
    assert all(c is not None for c in chosen)
    assert inst(s, A).servers == 3 and inst(s, B).servers == 3
    assert s.choose(3, 0.0, rng) is None
    inst(s, B).servers -= 1  # one closed: room again, only there
    assert s.choose(3, 0.0, rng) is inst(s, B)


def test_cap_counts_connections_being_opened() -> None:
    s = make_set(A)
    rng = random.Random(3)
    # Nothing has finished connecting, yet the third attempt is refused.
    assert open_on(s, 2, 0.0, rng) is not None
    assert open_on(s, 2, 0.0, rng) is not None
    assert s.choose(2, 0.0, rng) is None


def test_ties_are_broken_at_random() -> None:
    s = make_set(A, B, C)
    firsts = Counter(s.choose(0, 0.0, random.Random(seed)).addr for seed in range(60))  # type: ignore[union-attr]
    assert set(firsts) == {A, B, C}
    assert min(firsts.values()) >= 5


def test_same_seed_same_choice() -> None:
    s = make_set(A, B, C)
    assert s.choose(0, 0.0, random.Random(7)) is s.choose(0, 0.0, random.Random(7))


def test_draining_and_quarantined_never_chosen_while_an_up_one_fits() -> None:
    s = make_set(A, B, C)
    inst(s, A).state = InstanceState.DRAINING
    s.failure(inst(s, B), 0.0, "refused", random.Random(0))
    inst(s, C).servers = 50
    rng = random.Random(4)
    for now in (0.0, 100.0):
        assert s.choose(0, now, rng) is inst(s, C)


def test_draining_never_chosen_even_when_nothing_else() -> None:
    s = make_set(A)
    inst(s, A).state = InstanceState.DRAINING
    assert s.choose(0, 0.0, random.Random(0)) is None


def test_empty_set_chooses_nothing() -> None:
    assert InstanceSet("followers.test", 5432).choose(0, 0.0, random.Random(0)) is None


# -- quarantine ----------------------------------------------------------------------------------


def test_backoff_grows_to_the_max_with_jitter() -> None:
    rng = random.Random(5)
    lows = [BACKOFF_INITIAL * 2**i * (1 - BACKOFF_JITTER) for i in range(12)]
    for failures in range(1, 13):
        base = min(BACKOFF_MAX, BACKOFF_INITIAL * 2 ** (failures - 1))
        samples = [backoff(failures, rng) for _ in range(200)]
        assert all(base * (1 - BACKOFF_JITTER) <= d <= base * (1 + BACKOFF_JITTER) for d in samples)
        assert len({round(d, 6) for d in samples}) > 100  # jittered, not one value
    assert min(backoff(1, rng) for _ in range(100)) >= lows[0]
    assert max(backoff(50, rng) for _ in range(100)) <= BACKOFF_MAX * (1 + BACKOFF_JITTER)


def test_failures_quarantine_longer_each_time() -> None:
    s = make_set(A)
    a = inst(s, A)
    rng = random.Random(6)
    now = 10.0
    lengths = []
    for n in range(1, 8):
        s.failure(a, now, f"connection refused #{n}", rng)
        assert a.state is InstanceState.QUARANTINED
        assert a.failures == n and a.connect_failures == n
        assert a.last_error == f"connection refused #{n}"
        lengths.append(a.quarantine_until - now)
        now = a.quarantine_until
    assert lengths == sorted(lengths)
    assert lengths[0] == pytest.approx(0.5, rel=BACKOFF_JITTER)
    assert lengths[-1] == pytest.approx(30.0, rel=BACKOFF_JITTER)


def test_two_instances_failing_together_are_retried_at_different_times() -> None:
    s = make_set(A, B)
    rng = random.Random(7)
    s.failure(inst(s, A), 0.0, "refused", rng)
    s.failure(inst(s, B), 0.0, "refused", rng)
    assert inst(s, A).quarantine_until != inst(s, B).quarantine_until


def test_half_open_trial_one_at_a_time() -> None:
    s = make_set(A)
    a = inst(s, A)
    rng = random.Random(8)
    s.failure(a, 0.0, "refused", rng)
    assert s.choose(0, a.quarantine_until - 0.01, rng) is None  # still quarantined
    now = a.quarantine_until
    assert open_on(s, 0, now, rng) is a  # the trial
    assert a.trial
    assert s.choose(0, now, rng) is None  # no second trial while the first is in flight
    s.failure(a, now + 0.1, "refused again", rng)
    assert not a.trial and a.failures == 2
    a.servers -= 1
    now = a.quarantine_until
    assert open_on(s, 0, now, rng) is a
    s.success(a, now + 0.01, connect_ms=12.0)
    assert a.state is InstanceState.UP and not a.trial and a.failures == 0
    assert a.last_error is None
    assert s.choose(0, now, rng) is a


def test_trial_respects_the_cap() -> None:
    s = make_set(A)
    a = inst(s, A)
    a.servers = 2
    s.failure(a, 0.0, "refused", random.Random(0))
    assert s.choose(2, 100.0, random.Random(0)) is None


def test_up_instance_preferred_over_a_trial() -> None:
    s = make_set(A, B)
    s.failure(inst(s, A), 0.0, "refused", random.Random(0))
    inst(s, B).servers = 9
    assert s.choose(10, 100.0, random.Random(0)) is inst(s, B)
    inst(s, B).servers = 10
    assert s.choose(10, 100.0, random.Random(0)) is inst(s, A)


def test_success_of_a_concurrent_connect_lifts_quarantine() -> None:
    s = make_set(A)
    a = inst(s, A)
    s.failure(a, 0.0, "refused", random.Random(0))
    s.success(a, 0.1, connect_ms=20.0)
    assert a.state is InstanceState.UP and a.quarantine_until == 0.0


def test_connect_ms_is_a_moving_average() -> None:
    s = make_set(A)
    a = inst(s, A)
    s.success(a, 0.0, connect_ms=10.0)
    assert a.connect_ms == 10.0
    s.success(a, 0.0, connect_ms=20.0)
    assert a.connect_ms == pytest.approx(12.0)
    s.success(a, 0.0)  # a probe does not move it
    assert a.connect_ms == pytest.approx(12.0)


def test_probe_due_after_quarantine_and_claims_the_trial() -> None:
    s = make_set(A, B)
    a = inst(s, A)
    rng = random.Random(9)
    s.failure(a, 0.0, "refused", rng)
    s.failure(a, 0.0, "refused", rng)
    assert s.probe_due(a.quarantine_until - 0.01) == []
    assert s.probe_due(a.quarantine_until) == [a]
    assert a.trial
    assert s.probe_due(a.quarantine_until + 5) == []  # already being probed
    assert s.choose(0, a.quarantine_until, rng) is inst(s, B)
    # A TCP probe proves less than a login: UP again, but the failure count stays.
    s.success(a, a.quarantine_until + 0.01)
    assert a.state is InstanceState.UP and not a.trial and a.failures == 2
    s.failure(a, 10.0, "too many connections", rng)
    assert a.failures == 3
    assert a.quarantine_until - 10.0 == pytest.approx(2.0, rel=BACKOFF_JITTER)


# -- excess: the rebalancing plan ---------------------------------------------------------------


def test_excess_when_an_instance_joins() -> None:
    s = make_set(A)
    inst(s, A).servers = 20
    assert s.excess(0) == {}
    s.seen([B], 1.0)
    assert s.excess(0) == {A: 10}


def test_excess_uneven_total_keeps_spread_within_one() -> None:
    s = make_set(A, B, C)
    inst(s, A).servers = 21
    inst(s, B).servers = 1
    inst(s, C).servers = 0
    plan = s.excess(0)
    assert plan == {A: 21 - 8}  # targets 8/7/7: A keeps the larger share
    after = {A: 21 - plan[A], B: 1, C: 0}
    assert after[A] == 8


def test_excess_is_empty_when_balanced_within_one() -> None:
    s = make_set(A, B, C)
    for addr, n in ((A, 7), (B, 6), (C, 7)):
        inst(s, addr).servers = n
    assert s.excess(0) == {}
    assert s.excess(7) == {}


def test_excess_above_the_cap() -> None:
    s = make_set(A, B)
    inst(s, A).servers = 12
    inst(s, B).servers = 12
    assert s.excess(10) == {A: 2, B: 2}


def test_excess_for_join_never_targets_above_the_cap() -> None:
    s = make_set(A, B)
    inst(s, A).servers = 30
    assert s.excess(12) == {A: 18}


def test_excess_draining_all_and_quarantined_only_above_cap() -> None:
    s = make_set(A, B, C)
    inst(s, A).servers = 4
    inst(s, A).state = InstanceState.DRAINING
    inst(s, B).servers = 6
    s.failure(inst(s, B), 0.0, "refused", random.Random(0))
    inst(s, C).servers = 3
    assert s.excess(0) == {A: 4}
    assert s.excess(5) == {A: 4, B: 1}


# -- DNS: seen / expire / forget ----------------------------------------------------------------


def test_seen_accumulates_the_union_of_single_answers() -> None:
    s = InstanceSet("followers.test", 5432)
    assert [i.addr for i in s.seen([A], 0.0, 1.0)] == [A]
    assert [i.addr for i in s.seen([B], 5.0, 6.0)] == [B]
    assert s.seen([A], 10.0, 11.0) == []
    assert {i.addr for i in s} == {A, B}
    a = inst(s, A)
    assert (a.first_seen, a.last_seen, a.last_seen_wall, a.state) == (
        0.0,
        10.0,
        11.0,
        InstanceState.UP,
    )
    assert a.port == 5432


def test_seen_canonicalizes_addresses() -> None:
    s = InstanceSet("followers.test", 5432)
    s.seen(["2001:db8:0:0::1"], 0.0)
    s.seen(["2001:DB8::1"], 1.0)
    assert [i.addr for i in s] == ["2001:db8::1"]
    assert inst(s, "2001:db8::1").label == "[2001:db8::1]:5432"


def test_stale_but_healthy_instance_is_kept_and_checked() -> None:
    s = make_set(A, B)
    s.seen([B], FORGET)
    assert s.expire(FORGET, FORGET) == []
    a = inst(s, A)
    assert a.state is InstanceState.UP and a.stale
    assert s.choose(0, FORGET, random.Random(0)) in (a, inst(s, B))
    # It gets a probe, and another one STALE_CHECK_INTERVAL after the last.
    assert s.probe_due(FORGET) == [a]
    s.success(a, FORGET + 0.01)
    assert s.probe_due(FORGET + 1) == []
    assert s.probe_due(FORGET + 0.02 + STALE_CHECK_INTERVAL) == [a]
    s.success(a, FORGET + 11)
    # Seen again: no longer stale, no more probes.
    s.seen([A], FORGET + 20)
    assert not a.stale
    assert s.probe_due(FORGET + 100) == []


def test_stale_and_failing_check_without_servers_is_forgotten() -> None:
    s = make_set(A, B)
    s.seen([B], FORGET)
    s.expire(FORGET, FORGET)
    a = inst(s, A)
    assert s.probe_due(FORGET) == [a]
    s.failure(a, FORGET + 3, "probe: ConnectionRefusedError", random.Random(0))
    assert a.state is InstanceState.FORGOTTEN
    assert s.get(A) is None and len(s) == 1


def test_stale_quarantined_instance_forgotten_by_expire() -> None:
    s = make_set(A, B)
    s.failure(inst(s, A), 1.0, "refused", random.Random(0))
    s.seen([B], FORGET - 1)
    assert s.expire(FORGET - 1, FORGET) == []  # not stale yet: kept, still retried
    gone = s.expire(FORGET, FORGET)
    assert [(i.addr, i.state) for i in gone] == [(A, InstanceState.FORGOTTEN)]
    assert s.get(A) is None


def test_stale_quarantined_instance_with_servers_drains_then_is_forgotten() -> None:
    s = make_set(A, B)
    a = inst(s, A)
    a.servers = 3
    s.failure(a, 1.0, "too many connections", random.Random(0))
    gone = s.expire(FORGET, FORGET)
    assert gone == [a] and a.state is InstanceState.DRAINING
    assert s.expire(FORGET + 1, FORGET) == []  # still has servers
    assert s.excess(0) == {A: 3}
    assert s.choose(0, 1000.0, random.Random(0)) is inst(s, B)
    a.servers = 0
    assert s.expire(FORGET + 2, FORGET) == [a]
    assert state(a) is InstanceState.FORGOTTEN and s.get(A) is None


def test_failed_connection_to_a_stale_instance_with_servers_drains_it() -> None:
    s = make_set(A, B)
    s.seen([B], FORGET)
    s.expire(FORGET, FORGET)
    a = inst(s, A)
    a.servers = 2
    s.failure(a, FORGET + 1, "connection reset", random.Random(0))
    assert a.state is InstanceState.DRAINING
    s.failure(a, FORGET + 2, "connection reset", random.Random(0))
    assert a.state is InstanceState.DRAINING  # stays draining, never quarantined again


def test_draining_instance_that_reappears_goes_back_up() -> None:
    s = make_set(A, B)
    a = inst(s, A)
    a.servers = 1
    s.failure(a, 1.0, "refused", random.Random(0))
    s.expire(FORGET, FORGET)
    assert a.state is InstanceState.DRAINING
    assert s.seen([A], FORGET + 5) == [a]
    assert state(a) is InstanceState.UP and not a.stale
    assert s.excess(0) == {}


def test_forgotten_instance_comes_back_as_new() -> None:
    s = make_set(A)
    old = inst(s, A)
    s.failure(old, 1.0, "refused", random.Random(0))
    s.expire(FORGET, FORGET)
    assert s.get(A) is None
    s.failure(old, FORGET + 1, "late report", random.Random(0))  # ignored: not in the set
    assert s.get(A) is None
    (new,) = s.seen([A], FORGET + 2)
    assert new is not old and new.state is InstanceState.UP and new.failures == 0


def test_static_set_never_expires() -> None:
    s = InstanceSet("127.0.0.1", 5432)
    assert s.static
    s.seen(["127.0.0.1"], 0.0)
    a = inst(s, "127.0.0.1")
    s.failure(a, 1.0, "refused", random.Random(0))
    assert s.expire(1e6, FORGET) == []
    assert s.get("127.0.0.1") is a and a.state is InstanceState.QUARANTINED
    assert InstanceSet("/tmp", 5432).static
    assert not InstanceSet("followers.test", 5432).static


# -- display -------------------------------------------------------------------------------------


def test_snapshot_rows() -> None:
    s = make_set(B, A, now=10.0)
    s.failure(inst(s, B), 11.0, "refused", random.Random(0))
    inst(s, A).servers = 4
    rows = s.snapshot(15.0, cap=8)
    assert [r["addr"] for r in rows] == [A, B]
    assert rows[0] == {
        "addr": A,
        "port": 5432,
        "state": "up",
        "servers": 4,
        "cap": 8,
        "last_seen_age": 5.0,
        "last_seen_wall": 1_700_000_000.0,
        "stale": False,
        "failures": 0,
        "connect_failures": 0,
        "connect_ms": None,
        "last_error": None,
        "hot_standby": None,
        "read_only": None,
        "lag_s": None,
        "budget": None,
        "soft_cap": None,
        "instance_total": None,
    }
    assert rows[1]["state"] == "quarantined" and rows[1]["last_error"] == "refused"
