"""upstream.roles: targets, WRONG_ROLE and its re-checks, DNS following, LAGGING; fake clock."""

from __future__ import annotations

import random

import pytest
from instancesets import A, B, C, inst, make_set, state

from sidecar.config import ConfigError, PoolConfig, Settings, load_settings, parse_url
from sidecar.upstream.balancer import InstanceSet, InstanceState
from sidecar.upstream.roles import (
    ROLE_BACKOFF_MAX,
    Change,
    Roles,
    WalHistory,
    matches,
    parse_check,
    parse_lsn,
    role_from_params,
)
from sidecar.yamlconfig import apply_text

RNG = random.Random(0)


PRIMARY = (False, False)
STANDBY = (True, True)  # a hot standby reports default_transaction_read_only off, but either way
READ_ONLY_PRIMARY = (False, True)


@pytest.mark.parametrize(
    ("target", "primary", "standby", "ro_primary"),
    [
        ("any", True, True, True),
        ("read-write", True, False, False),
        ("primary", True, False, True),
        ("read-only", False, True, True),
        ("standby", False, True, False),
        ("prefer-standby", True, True, True),
    ],
)
def test_matches_is_libpqs_test(
    target: str, primary: bool, standby: bool, ro_primary: bool
) -> None:
    assert matches(target, *PRIMARY) is primary
    assert matches(target, *STANDBY) is standby
    assert matches(target, *READ_ONLY_PRIMARY) is ro_primary


def test_role_from_login_parameters() -> None:
    assert role_from_params({"in_hot_standby": "on", "default_transaction_read_only": "off"}) == (
        True,
        False,
    )
    assert role_from_params({"in_hot_standby": "off", "default_transaction_read_only": "on"}) == (
        False,
        True,
    )
    assert role_from_params({"server_version": "13.4"}) is None  # before 14: ask


def test_check_row() -> None:
    check = parse_check(["t", "off", "3.25", "7301234567890123456", "16/B374D848"])
    assert (check.hot_standby, check.read_only, check.lag_s) == (True, False, 3.25)
    assert check.system_id == "7301234567890123456"
    assert check.lsn == (0x16 << 32) | 0xB374D848
    check = parse_check(["f", "on", None, None, None])
    assert (check.hot_standby, check.read_only, check.lag_s, check.lsn) == (False, True, None, None)
    assert parse_lsn("0/0") == 0 and parse_lsn("junk") is None and parse_lsn("1/zz") is None


def test_lag_against_the_leaders_wal_position() -> None:
    wal = WalHistory(keep=100.0)
    assert wal.lag(5, 0.0, 10.0) is None  # nothing known about the leader yet
    wal.add(10.0, 100)
    wal.add(11.0, 200)
    wal.add(12.0, 200)  # no new WAL: an idle leader, still fresh
    wal.add(13.0, 300)
    assert wal.lag(300, 13.5, 2.0) == 0.0  # replayed all the leader had
    assert wal.lag(250, 13.5, 2.0) == 0.5  # not yet what it had at 13.0
    assert wal.lag(150, 14.0, 2.0) == 3.0  # not what it had at 11.0
    assert wal.lag(50, 14.0, 2.0) == 4.0  # behind the oldest sample: at least that
    assert wal.lag(150, 20.0, 2.0) is None  # the leader's position is stale: no verdict
    wal.add(200.0, 400)
    assert [lsn for _t, lsn in wal.samples] == [400]  # old samples dropped


def test_auto_becomes_a_leader_pool_on_a_primary() -> None:
    s = make_set(A)
    roles = Roles("auto")
    assert roles.observe(inst(s, A), *PRIMARY, 1.0, RNG) is Change.RESOLVED
    assert roles.target == "read-write" and roles.leader and roles.pool_role == "leader"
    assert state(inst(s, A)) is InstanceState.UP


def test_auto_becomes_a_follower_pool_on_a_standby() -> None:
    s = make_set(A, B)
    roles = Roles("auto")
    assert roles.observe(inst(s, A), *STANDBY, 1.0, RNG) is Change.RESOLVED
    assert roles.target == "prefer-standby" and not roles.leader
    assert roles.pool_role == "follower"
    # A promoted follower still serves, but after every standby.
    assert roles.observe(inst(s, B), *PRIMARY, 1.0, RNG) is Change.NONE
    assert state(inst(s, B)) is InstanceState.UP
    assert [s.choose(0, 1.0, RNG) for _ in range(5)] == [inst(s, A)] * 5


def test_wrong_role_is_retried_with_backoff_and_comes_back() -> None:
    s = make_set(A)
    roles = Roles("read-write")
    a = inst(s, A)
    a.servers = 3
    assert roles.observe(a, *STANDBY, 10.0, RNG) is Change.WRONG
    assert state(a) is InstanceState.WRONG_ROLE
    assert "standby" in (a.last_error or "")
    assert s.choose(0, 10.0, RNG) is None
    assert s.excess(0) == {A: 3}  # every server retired
    assert roles.none_match(s)
    assert "target_session_attrs=read-write" in roles.mismatch_reason(s)
    assert roles.recheck_due(s, 10.0) == []
    first = a.recheck_at - 10.0
    assert 0.3 < first < 0.7
    assert roles.recheck_due(s, a.recheck_at) == [a]
    assert roles.recheck_due(s, a.recheck_at) == []  # one trial at a time
    a.trial = False
    # Still a standby: the wait doubles, up to the cap.
    waits = []
    for n in range(8):
        now = 20.0 + 10 * n
        assert roles.observe(a, *STANDBY, now, RNG) is Change.NONE
        waits.append(a.recheck_at - now)
    assert waits[0] > first and max(waits) <= ROLE_BACKOFF_MAX * 1.2
    # Promoted: UP again, chosen again.
    assert roles.observe(a, *PRIMARY, 200.0, RNG) is Change.BACK
    assert state(a) is InstanceState.UP and a.last_error is None
    assert s.choose(0, 200.0, RNG) is a


def test_read_only_primary_is_wrong_for_read_write_but_fine_for_primary() -> None:
    s = make_set(A)
    a = inst(s, A)
    assert Roles("primary").observe(a, *READ_ONLY_PRIMARY, 1.0, RNG) is Change.NONE
    assert state(a) is InstanceState.UP
    assert Roles("read-write").observe(a, *READ_ONLY_PRIMARY, 1.0, RNG) is Change.WRONG


def test_wrong_role_unseen_by_dns_is_forgotten() -> None:
    s = make_set(A, B)
    roles = Roles("standby")
    roles.observe(inst(s, A), *PRIMARY, 1.0, RNG)
    s.seen([B], 200.0)
    gone = s.expire(200.0, 120.0)
    assert [i.addr for i in gone] == [A] and s.get(A) is None


# -- DNS following (leader pools) --------------------------------------------------------------


def test_leader_pool_drops_the_old_address_once_the_new_one_is_the_leader() -> None:
    s = make_set(A)
    roles = Roles("auto")
    a = inst(s, A)
    roles.observe(a, *PRIMARY, 1.0, RNG)
    a.servers = 2
    # Failover: DNS now names B. The old one is not dropped before B proves itself.
    s.seen([B], 5.0)
    roles.answered(s, [B])
    assert roles.follow_dns(s) == []
    assert state(a) is InstanceState.UP
    b = inst(s, B)
    # B is not promoted yet: still not enough.
    roles.observe(b, *STANDBY, 6.0, RNG)
    assert roles.follow_dns(s) == []
    # B is the leader now: A is drained at once, whatever a TCP check of it would say.
    assert roles.observe(b, *PRIMARY, 7.0, RNG) is Change.BACK
    assert roles.follow_dns(s) == [a]
    assert state(a) is InstanceState.DRAINING
    assert s.excess(0) == {A: 2}
    assert s.choose(0, 7.0, RNG) is b
    # Its servers gone, it is forgotten at the next answer.
    a.servers = 0
    assert s.expire(8.0, 120.0) == [a] and s.get(A) is None


def test_split_brain_the_address_dns_names_wins() -> None:
    s = make_set(A)
    roles = Roles("read-write")
    roles.observe(inst(s, A), *PRIMARY, 1.0, RNG)
    s.seen([B], 5.0)
    roles.answered(s, [B])
    roles.observe(inst(s, B), *PRIMARY, 5.1, RNG)
    assert [i.addr for i in roles.follow_dns(s)] == [A]  # no servers: forgotten
    assert s.get(A) is None
    # DNS goes back to A: it is new again, and then B is the superseded one.
    s.seen([A], 10.0)
    roles.answered(s, [A])
    assert roles.follow_dns(s) == []  # A's role unknown yet
    roles.observe(inst(s, A), *PRIMARY, 10.1, RNG)
    assert [i.addr for i in roles.follow_dns(s)] == [B]


def test_follower_pools_keep_the_union_of_answers() -> None:
    s = make_set(A)
    roles = Roles("standby")
    roles.observe(inst(s, A), *STANDBY, 1.0, RNG)
    s.seen([B], 2.0)
    roles.answered(s, [B])
    roles.observe(inst(s, B), *STANDBY, 2.1, RNG)
    assert roles.follow_dns(s) == []
    assert state(inst(s, A)) is InstanceState.UP


def test_an_ipv6_answer_does_not_supersede_ipv4_addresses() -> None:
    s = make_set(A)
    roles = Roles("read-write")
    roles.observe(inst(s, A), *PRIMARY, 1.0, RNG)
    s.seen(["fd00::1"], 2.0)
    roles.answered(s, ["fd00::1"])
    roles.observe(inst(s, "fd00::1"), *PRIMARY, 2.1, RNG)
    assert roles.follow_dns(s) == []


def test_static_hosts_are_never_followed() -> None:
    s = make_set("127.0.0.9", host="127.0.0.9")
    roles = Roles("read-write")
    roles.observe(inst(s, "127.0.0.9"), *PRIMARY, 1.0, RNG)
    roles.answered(s, ["127.0.0.9"])
    assert roles.follow_dns(s) == []
    assert roles.check_due(s, 100.0, 5.0) == []  # nothing to check periodically either


# -- lag (follower pools) ----------------------------------------------------------------------


def standbys(*addrs: str, max_lag: float = 2.0) -> tuple[InstanceSet, Roles]:
    s = make_set(*addrs)
    roles = Roles("standby", max_lag=max_lag)
    for a in addrs:
        roles.observe(inst(s, a), *STANDBY, 0.0, RNG)
    return s, roles


def test_lagging_instance_gets_no_new_servers_and_comes_back() -> None:
    s, roles = standbys(A, B)
    a, b = inst(s, A), inst(s, B)
    a.servers = 4
    assert roles.lag(s, b, 0.0) == []
    assert roles.lag(s, a, 5.0) == [a]
    assert state(a) is InstanceState.LAGGING and a.lag_s == 5.0
    assert [s.choose(0, 1.0, RNG) for _ in range(3)] == [b] * 3
    assert s.excess(0) == {A: 4}
    assert not roles.all_lagging(s)
    assert roles.lag(s, a, 0.5) == [a]
    assert state(a) is InstanceState.UP


def test_when_every_instance_lags_the_least_lagging_serves() -> None:
    s, roles = standbys(A, B, C)
    a, b, c = inst(s, A), inst(s, B), inst(s, C)
    roles.lag(s, a, 9.0)
    roles.lag(s, b, 3.0)
    assert state(c) is InstanceState.UP
    changed = roles.lag(s, c, 30.0)
    assert state(a) is InstanceState.LAGGING and state(c) is InstanceState.LAGGING
    assert state(b) is InstanceState.UP and c in changed
    assert roles.all_lagging(s)
    assert s.choose(0, 1.0, RNG) is b
    # C catches up: it serves, B (still over) no longer has to.
    roles.lag(s, c, 0.0)
    assert state(c) is InstanceState.UP and state(b) is InstanceState.LAGGING
    assert not roles.all_lagging(s)


def test_lag_limit_off_measures_but_never_excludes() -> None:
    s, roles = standbys(A, B, max_lag=0.0)
    assert roles.lag(s, inst(s, A), 500.0) == []
    assert state(inst(s, A)) is InstanceState.UP and inst(s, A).lag_s == 500.0


def test_a_promoted_lagging_instance_is_not_stuck() -> None:
    s, roles = standbys(A, B)
    roles.lag(s, inst(s, A), 9.0)
    roles.observe(inst(s, A), *PRIMARY, 1.0, RNG)  # standby target: now WRONG_ROLE
    assert state(inst(s, A)) is InstanceState.WRONG_ROLE


def test_checks_are_due_once_per_interval() -> None:
    s, roles = standbys(A, B)
    assert {i.addr for i in roles.check_due(s, 5.0, 5.0)} == {A, B}
    inst(s, A).checking = True
    assert {i.addr for i in roles.check_due(s, 5.0, 5.0)} == {B}
    inst(s, A).checking = False
    roles.observe(inst(s, A), *STANDBY, 5.0, RNG)
    assert {i.addr for i in roles.check_due(s, 9.0, 5.0)} == {B}
    assert {i.addr for i in roles.check_due(s, 10.0, 5.0)} == {A, B}
    assert roles.check_due(s, 10.0, 0.0) == []
    # A follower pool without a lag limit has nothing to check.
    _, plain = standbys(A, max_lag=0.0)
    assert plain.check_due(s, 100.0, 5.0) == []


# -- configuration -----------------------------------------------------------------------------


def test_target_session_attrs_in_the_url() -> None:
    up = parse_url("postgres://u:p@db.test/d?sslmode=require&target_session_attrs=read-write")
    assert up.target_session_attrs == "read-write" and up.sslmode == "require"
    assert "target_session_attrs" not in up.params  # not a startup parameter
    assert parse_url("postgres://u:p@db.test/d").target_session_attrs is None
    with pytest.raises(ConfigError, match="target_session_attrs"):
        parse_url("postgres://u:p@db.test/d?target_session_attrs=leader")


def test_target_session_attrs_setting_and_per_pool_file() -> None:
    settings, _ = load_settings(
        {"SIDECAR_TARGET_SESSION_ATTRS": "read-write", "SIDECAR_MAX_REPLICA_LAG": "2.5"}
    )
    assert settings.target_session_attrs == "read-write"
    assert settings.max_replica_lag == 2.5 and settings.lag_check_interval == 5.0
    with pytest.raises(ConfigError, match="SIDECAR_TARGET_SESSION_ATTRS"):
        load_settings({"SIDECAR_TARGET_SESSION_ATTRS": "leader"})
    pools = [PoolConfig("database", parse_url("postgres://u:p@h/d"))]
    text = "pools:\n  DATABASE_URL:\n    target_session_attrs: standby\n    max_replica_lag: 3\n"
    (pool,) = apply_text(text, "sidecar.yml", pools, Settings(), {"database": "DATABASE_URL"})
    effective = pool.settings(Settings())
    assert effective.target_session_attrs == "standby" and effective.max_replica_lag == 3.0
    with pytest.raises(ConfigError, match="target_session_attrs"):
        apply_text(
            "pools:\n  database:\n    target_session_attrs: leader\n",
            "sidecar.yml",
            pools,
            Settings(),
            {},
        )
