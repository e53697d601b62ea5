"""The follower fixtures themselves: real replicas that replay, behind a rotating DNS name."""

from __future__ import annotations

from typing import TYPE_CHECKING

import dns.resolver
import psycopg
from dnsserver import DNSServer

if TYPE_CHECKING:
    # Imported for real by pytest_plugins only: an earlier import would skip assert rewriting.
    from followers import ReplicaCluster

pytest_plugins = ["followers"]


def test_followers_are_replicas_that_replay(followers: ReplicaCluster) -> None:
    assert followers.addrs == ["127.0.0.2", "127.0.0.3"]
    for f in followers.followers:
        assert f.port == 5432
        assert f.in_recovery()
    table = followers.leader.create_table()
    followers.leader.query(f"INSERT INTO {table} VALUES (1, 'from the leader')")
    followers.wait_replayed()
    for f in followers.followers:
        assert f.query(f"SELECT val FROM {table}") == [("from the leader",)]


def test_app_connects_to_a_follower_over_tls(followers: ReplicaCluster) -> None:
    f = followers.followers[1]
    url = f.url(sslmode="verify-full", sslrootcert=str(followers.leader.ca_file))
    with psycopg.connect(url, connect_timeout=10) as conn:
        row = conn.execute(
            "SELECT pg_is_in_recovery(), ssl, current_user FROM pg_stat_ssl"
            " WHERE pid = pg_backend_pid()"
        ).fetchone()
        assert row == (True, True, "app")
        assert f.count_backends() == 1
    f.wait_backends(0)


def test_stop_and_start_a_follower(followers: ReplicaCluster) -> None:
    f = followers.followers[0]
    f.stop()
    assert not f.running
    f.start()
    assert f.running and f.in_recovery()
    followers.wait_replayed()


def test_a_third_follower_can_join(followers: ReplicaCluster) -> None:
    third = followers.add_follower()
    assert third.addr == "127.0.0.4" and third.in_recovery()
    followers.wait_replayed()
    # the `followers` fixture removes it again for the next test


def test_dns_rotates_over_the_followers(followers: ReplicaCluster) -> None:
    name = followers.name  # followers.test
    with DNSServer({name: followers.addrs}, mode="rotate", ttl=5) as server:
        resolver = dns.resolver.Resolver(configure=False)
        resolver.nameservers = [server.host]
        resolver.port = server.port
        answers = []
        for _ in range(4):
            answer = resolver.resolve(name, "A")
            assert answer.rrset is not None and len(answer.rrset) == 1
            assert answer.rrset.ttl == 5
            answers.append(answer.rrset[0].address)
        assert answers == ["127.0.0.2", "127.0.0.3", "127.0.0.2", "127.0.0.3"]
        try:
            resolver.resolve("nobody.test", "A")
        except dns.resolver.NXDOMAIN:
            pass
        else:
            raise AssertionError("unknown names must get NXDOMAIN")
