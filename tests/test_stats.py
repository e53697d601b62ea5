"""The periodic `at=stats` log lines: counts, rates, averages and gauges match the traffic.

Each test starts a real proxy with a short SIDECAR_STATS_PERIOD and reads its log file, the
same lines `heroku logs` shows. Waits poll the log; the only waiting is for periods to pass.
"""

from __future__ import annotations

import re
import threading
import time
from typing import Any
from urllib.parse import quote

import psycopg
import psycopg.errors
import pytest
from pgfixtures import APP_PASSWORD, ProxyFactory, ProxyProcess, poll_until
from psycopg.rows import dict_row

PERIOD = 2.0
XACTS = 1000
CONNECTIONS = 4

_PAIR = re.compile(r'(\S+?)=("(?:[^"\\]|\\.)*"|\S*)')
#: One pool's line: logfmt, `sample#` gauges and rates, then the period's `count#` counters.
LINE = re.compile(
    r"^sidecar at=stats pool=appdb"
    r"(?: sample#[a-z_.]+=-?[0-9]+(?:\.[0-9]+)?)+"
    r" count#xacts=[0-9]+ count#queries=[0-9]+ count#errors=[0-9]+$"
)


def logfmt(line: str) -> dict[str, str]:
    return {k: v.strip('"') for k, v in _PAIR.findall(line)}


def stats_lines(proxy: ProxyProcess) -> list[dict[str, str]]:
    """Every complete `at=stats` line so far, parsed."""
    text = proxy.log_text()
    complete = text[: text.rfind("\n") + 1]
    return [logfmt(line) for line in complete.splitlines() if line.startswith("sidecar at=stats ")]


def wait_for_lines(proxy: ProxyProcess, count: int, timeout: float) -> list[dict[str, str]]:
    """Poll the log until it holds at least `count` stats lines; return them all."""

    def enough() -> list[dict[str, str]] | None:
        lines = stats_lines(proxy)
        return lines if len(lines) >= count else None

    return poll_until(enough, timeout=timeout, interval=0.005, what=f"{count} stats lines")


def num(line: dict[str, str], key: str) -> float:
    return float(line[key])


def run_transactions(conns: list[psycopg.Connection[Any]], total: int) -> None:
    """`total` autocommit `select 1`s spread over the connections, one thread each."""
    errors: list[BaseException] = []
    share = total // len(conns)
    assert share * len(conns) == total

    def work(conn: psycopg.Connection[Any]) -> None:
        try:
            for _ in range(share):
                conn.execute("select 1")
        except BaseException as exc:
            errors.append(exc)

    threads = [threading.Thread(target=work, args=(c,)) for c in conns]
    for t in threads:
        t.start()
    for t in threads:
        t.join(30)
    assert not errors, errors


def test_thousand_transactions_in_one_period(proxy_factory: ProxyFactory) -> None:
    proxy = proxy_factory(
        SIDECAR_STATS_PERIOD=str(PERIOD), SIDECAR_DEFAULT_POOL_SIZE=str(CONNECTIONS)
    )
    # prepare_threshold=None: no Parse+Sync round trip of psycopg's own among the transactions
    conns = [
        psycopg.connect(proxy.dsn(), autocommit=True, prepare_threshold=None)
        for _ in range(CONNECTIONS)
    ]
    try:
        for conn in conns:
            conn.execute("select 1")  # logged in, a server each: the workload only queries
        # Align to the period: start right after a line, so the workload has a whole window.
        seen = len(wait_for_lines(proxy, 1, PERIOD + 5))
        first = len(wait_for_lines(proxy, seen + 1, PERIOD + 5))  # index of the workload's line
        started = time.monotonic()
        run_transactions(conns, XACTS)
        elapsed = time.monotonic() - started
        assert elapsed < PERIOD * 0.9, f"{XACTS} transactions took {elapsed:.2f}s"

        busy = wait_for_lines(proxy, first + 1, PERIOD + 5)[first]
        with psycopg.connect(proxy.dsn(dbname="sidecar"), autocommit=True) as admin:
            admin.row_factory = dict_row
            shown = admin.execute("SHOW STATS").fetchone()
        assert shown is not None
        lines = wait_for_lines(proxy, first + 2, PERIOD + 5)
    finally:
        for conn in conns:
            conn.close()

    # every transaction of the workload in the one window it ran in
    assert [int(line["count#xacts"]) for line in lines[first : first + 2]] == [XACTS, 0]
    assert int(busy["count#queries"]) == XACTS
    assert int(busy["count#errors"]) == 0
    rate = num(busy, "sample#xacts_per_s")
    assert abs(rate - XACTS / PERIOD) <= 0.05 * XACTS / PERIOD, rate
    assert abs(num(busy, "sample#queries_per_s") - rate) < 0.01
    for key in ("sample#avg_query_ms", "sample#avg_xact_ms"):
        assert 0 < num(busy, key) < 1000, (key, busy[key])
    # clients waited only while the pool opened servers 2-4
    assert 0 <= num(busy, "sample#avg_wait_ms") <= num(busy, "sample#max_wait_ms") < 1000
    assert num(busy, "sample#in_bytes_per_s") > 0 and num(busy, "sample#out_bytes_per_s") > 0
    # gauges at the end of the window: the workload is over, its servers are idle
    assert int(busy["sample#servers.active"]) == 0
    assert 1 <= int(busy["sample#servers.idle"]) <= CONNECTIONS
    assert int(busy["sample#clients.waiting"]) == 0
    assert int(busy["sample#servers.max"]) == CONNECTIONS

    # SHOW STATS agrees: totals since start (4 warm-up queries), averages of the last period
    assert shown["total_xact_count"] == XACTS + CONNECTIONS
    assert shown["total_query_count"] == XACTS + CONNECTIONS
    assert shown["avg_xact_count"] == round(rate)
    # the line rounds to 0.01 ms; the console shows whole microseconds
    assert abs(shown["avg_query_time"] - num(busy, "sample#avg_query_ms") * 1000) <= 10
    assert_no_password(proxy)


def test_period_without_traffic_is_all_zeros(proxy_factory: ProxyFactory) -> None:
    proxy = proxy_factory(SIDECAR_STATS_PERIOD="0.3")
    lines = wait_for_lines(proxy, 2, 10)
    raw = [ln for ln in proxy.log_text().splitlines() if ln.startswith("sidecar at=stats ")]
    for text in raw[:2]:
        assert LINE.match(text), text
    for line in lines[:2]:
        assert line["pool"] == "appdb"
        counts = {k: v for k, v in line.items() if k.startswith(("sample#", "count#"))}
        assert counts and all(float(v) == 0 for k, v in counts.items() if k != "sample#servers.max")
        assert int(line["sample#servers.max"]) == 20


def test_errors_are_counted(proxy_factory: ProxyFactory) -> None:
    proxy = proxy_factory(SIDECAR_STATS_PERIOD="0.5")
    with psycopg.connect(proxy.dsn(), autocommit=True) as conn:
        for _ in range(3):
            with pytest.raises(psycopg.errors.DivisionByZero):
                conn.execute("select 1/0")
        conn.execute("select 1")
        with pytest.raises(psycopg.errors.UndefinedTable):
            conn.execute("select * from no_such_table")

    def errors_so_far() -> int:
        return sum(int(line["count#errors"]) for line in stats_lines(proxy))

    poll_until(lambda: errors_so_far() == 4, timeout=5, what="4 errors in the stats lines")
    # ...and no more than that once another period has passed
    seen = len(stats_lines(proxy))
    wait_for_lines(proxy, seen + 1, 5)
    assert errors_so_far() == 4
    xacts = sum(int(line["count#xacts"]) for line in stats_lines(proxy))
    assert xacts == 5  # a failed autocommit statement is still a (rolled back) transaction
    assert_no_password(proxy)


def assert_no_password(proxy: ProxyProcess) -> None:
    text = proxy.log_text()
    for form in {APP_PASSWORD, quote(APP_PASSWORD, safe=""), quote(APP_PASSWORD)}:
        assert form not in text
