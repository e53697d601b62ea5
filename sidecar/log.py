"""Logging setup: structlog rendering one logfmt line per event, `sidecar at=<event> key=value`.

Heroku reads stdout; logfmt with `sample#`/`count#` keys is what its log drains parse.
"""

from __future__ import annotations

import sys
from typing import Any, TextIO

import structlog

#: This process's worker index when the proxy runs as several processes (SIDECAR_WORKERS > 1);
#: None otherwise, and then lines carry no `worker=` at all.
_worker: int | None = None


def _event_to_at(_logger: Any, _name: str, event_dict: Any) -> Any:
    event_dict["at"] = event_dict.pop("event", "log")
    # Heroku's convention: plain lines are info; only say the level when it is not.
    if event_dict.get("level") == "info":
        del event_dict["level"]
    if _worker is not None:
        event_dict.setdefault("worker", _worker)
    return event_dict


def setup(stream: TextIO | None = None) -> None:
    """Configure structlog once per process; safe to call again (tests, the launcher)."""
    structlog.configure(
        processors=[
            structlog.processors.add_log_level,
            _event_to_at,
            structlog.processors.LogfmtRenderer(
                key_order=["at", "level", "worker"], drop_missing=True, bool_as_flag=False
            ),
            _prefix,
        ],
        # One write() per line, newline included: with several worker processes on one stdout
        # a line must not be split around another process's (print() writes "\n" separately).
        logger_factory=structlog.WriteLoggerFactory(stream or sys.stdout),
        cache_logger_on_first_use=True,
    )


def set_worker(index: int | None) -> None:
    """From now on every line of this process says `worker=<index>` (None: no worker field)."""
    global _worker
    _worker = index


def _prefix(_logger: Any, _name: str, line: Any) -> Any:
    return "sidecar " + line


def get(name: str = "sidecar") -> Any:
    return structlog.get_logger(name)
