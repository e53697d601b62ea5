"""The stats reporter: each period, the pools' counters popped into Heroku-style logfmt lines
(`sample#`, `count#`), one per pool and one per instance. Reads the data plane only.
"""

from __future__ import annotations

import asyncio
import time
from typing import TYPE_CHECKING, Any

from .. import log
from ..dataplane.counters import Period, pop

if TYPE_CHECKING:
    from ..dataplane.proxy import Proxy

logger = log.get()


def _num(value: float) -> str:
    return str(round(value, 2)) if isinstance(value, float) else str(value)


def pool_line_fields(pool_name: str, gauges: dict[str, int], period: Period) -> dict[str, Any]:
    """The key=value pairs of one `at=stats` line, in order."""
    out: dict[str, Any] = {"pool": pool_name}
    for key, value in gauges.items():
        out[f"sample#{key}"] = value
    out["sample#xacts_per_s"] = _num(period.xacts_per_s)
    out["sample#queries_per_s"] = _num(period.queries_per_s)
    out["sample#avg_xact_ms"] = _num(period.avg_xact_ms)
    out["sample#avg_query_ms"] = _num(period.avg_query_ms)
    out["sample#avg_wait_ms"] = _num(period.avg_wait_ms)
    out["sample#max_wait_ms"] = _num(period.max_wait_ms)
    out["sample#in_bytes_per_s"] = _num(period.in_bytes_per_s)
    out["sample#out_bytes_per_s"] = _num(period.out_bytes_per_s)
    out["count#xacts"] = period.xacts
    out["count#queries"] = period.queries
    out["count#errors"] = period.errors
    return out


async def reporter(proxy: Proxy) -> None:
    """Every stats_period seconds: one line per pool (and per instance, where pools have them)."""
    period = proxy.settings.stats_period
    if period <= 0:
        return
    last = time.monotonic()
    while True:
        await asyncio.sleep(period)
        now = time.monotonic()
        emit(proxy, now - last)
        last = now


def emit(proxy: Proxy, seconds: float) -> None:
    for pool in proxy.pools.values():
        figures = pop(pool.stats, pool.totals, seconds)
        pool.last_period = figures
        logger.info("stats", **pool_line_fields(pool.name, pool.gauges(), figures))
        for inst in pool.instance_lines():
            logger.info("instance", pool=pool.name, **inst)
