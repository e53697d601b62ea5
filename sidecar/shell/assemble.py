"""How a proxy process is put together: the data plane's Proxy with the control surface
handed in (admin console, stats reporter), and the event loop it runs on."""

from __future__ import annotations

import asyncio
from collections.abc import Sequence
from typing import TYPE_CHECKING

from ..config import PoolConfig, Settings
from ..control import stats
from ..control.console import AdminSession
from ..dataplane.clienttls import ClientTLS
from ..dataplane.proxy import Proxy

if TYPE_CHECKING:
    from .workers import Worker


def new_proxy(
    settings: Settings,
    pools: Sequence[PoolConfig],
    *,
    worker: Worker | None = None,
    client_tls: ClientTLS | None = None,
) -> Proxy:
    """A Proxy whose console logins get an AdminSession and whose pools are reported."""
    return Proxy(
        settings,
        list(pools),
        worker=worker,
        console=AdminSession,
        side_tasks=(stats.reporter,),
        client_tls=client_tls,
    )


def run_loop(main: object) -> None:
    """uvloop when installed (the fast path), plain asyncio otherwise."""
    try:
        import uvloop
    except ImportError:
        asyncio.run(main)  # type: ignore[arg-type]
    else:
        uvloop.run(main)  # type: ignore[arg-type]
