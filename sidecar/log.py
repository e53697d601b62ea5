"""Logging setup: structlog rendering one logfmt line per event, `sidecar at=<event> key=value`.

Heroku reads stdout; logfmt with `sample#`/`count#` keys is what its log drains parse.
"""

from __future__ import annotations

import sys
from typing import Any, TextIO

import structlog


def _event_to_at(_logger: Any, _name: str, event_dict: Any) -> Any:
    event_dict["at"] = event_dict.pop("event", "log")
    # Heroku's convention: plain lines are info; only say the level when it is not.
    if event_dict.get("level") == "info":
        del event_dict["level"]
    return event_dict


def setup(stream: TextIO | None = None) -> None:
    """Configure structlog once per process; safe to call again (tests, the launcher)."""
    structlog.configure(
        processors=[
            structlog.processors.add_log_level,
            _event_to_at,
            structlog.processors.LogfmtRenderer(
                key_order=["at", "level"], drop_missing=True, bool_as_flag=False
            ),
            _prefix,
        ],
        logger_factory=structlog.PrintLoggerFactory(stream or sys.stdout),
        cache_logger_on_first_use=True,
    )


def _prefix(_logger: Any, _name: str, line: Any) -> Any:
    return "sidecar " + line


def get(name: str = "sidecar") -> Any:
    return structlog.get_logger(name)
