"""The per-pool counters the hot path adds to, and their read-and-reset into a `Period`.

The hot path only adds to plain attributes of a `PoolStats`; all arithmetic (rates, averages)
happens in `pop`, once per stats period (control.stats reads it).
"""

from __future__ import annotations

from dataclasses import dataclass, fields


class PoolStats:
    """Counters since the last pop. Times are seconds (floats), sizes bytes."""

    __slots__ = (
        "bytes_in",
        "bytes_out",
        "errors",
        "logins",
        "max_wait",
        "queries",
        "query_time",
        "wait_time",
        "waits",
        "xact_time",
        "xacts",
    )

    def __init__(self) -> None:
        self.clear()

    def clear(self) -> None:
        self.xacts = 0
        self.queries = 0
        self.xact_time = 0.0
        self.query_time = 0.0
        self.waits = 0
        self.wait_time = 0.0
        self.max_wait = 0.0
        self.bytes_in = 0
        self.bytes_out = 0
        self.errors = 0
        self.logins = 0

    def waited(self, seconds: float) -> None:
        self.waits += 1
        self.wait_time += seconds
        if seconds > self.max_wait:
            self.max_wait = seconds


@dataclass(slots=True)
class Totals:
    """Since start: what PgBouncer's SHOW STATS calls total_*."""

    xacts: int = 0
    queries: int = 0
    xact_time: float = 0.0
    query_time: float = 0.0
    wait_time: float = 0.0
    bytes_in: int = 0
    bytes_out: int = 0
    errors: int = 0
    logins: int = 0


@dataclass(frozen=True, slots=True)
class Period:
    """One popped period, with the derived rates and averages."""

    seconds: float
    xacts: int
    queries: int
    errors: int
    xacts_per_s: float
    queries_per_s: float
    avg_xact_ms: float
    avg_query_ms: float
    avg_wait_ms: float
    max_wait_ms: float
    in_bytes_per_s: float
    out_bytes_per_s: float


def pop(stats: PoolStats, totals: Totals, seconds: float) -> Period:
    """Read and reset `stats` (adding them to `totals`), deriving per-second figures."""
    s = stats
    per = max(seconds, 1e-9)
    period = Period(
        seconds=seconds,
        xacts=s.xacts,
        queries=s.queries,
        errors=s.errors,
        xacts_per_s=s.xacts / per,
        queries_per_s=s.queries / per,
        avg_xact_ms=1000.0 * s.xact_time / s.xacts if s.xacts else 0.0,
        avg_query_ms=1000.0 * s.query_time / s.queries if s.queries else 0.0,
        avg_wait_ms=1000.0 * s.wait_time / s.waits if s.waits else 0.0,
        max_wait_ms=1000.0 * s.max_wait,
        in_bytes_per_s=s.bytes_in / per,
        out_bytes_per_s=s.bytes_out / per,
    )
    for f in fields(Totals):
        setattr(totals, f.name, getattr(totals, f.name) + getattr(s, f.name))
    s.clear()
    return period
