"""`python -m sidecar [NAME=URL ...]`: run the proxy alone (pools from args or SIDECAR_URLS)."""

from __future__ import annotations

import sys

from . import log
from .config import ConfigError, load_settings, pools_from_args, pools_from_env
from .shell.assemble import run_loop
from .shell.workers import make_proxy, worker_count


def main(argv: list[str] | None = None) -> int:
    log.setup()
    logger = log.get()
    args = sys.argv[1:] if argv is None else argv
    if args and args[0] in ("-h", "--help"):
        print(__doc__)
        return 0
    try:
        settings, fallbacks = load_settings()
        pools = pools_from_args(args) if args else pools_from_env(settings)
        workers, how = worker_count(settings, pools)
    except ConfigError as exc:
        logger.error("config_error", error=str(exc))
        return 2
    if fallbacks:
        logger.info("pgbouncer_vars_used", vars=",".join(fallbacks))
    if how:
        logger.info("workers", workers=workers, chosen=how)

    async def _serve() -> None:
        await make_proxy(settings, pools, workers).serve()

    try:
        run_loop(_serve())
    except OSError as exc:
        logger.error("listen_failed", error=str(exc))
        return 1
    return 0


if __name__ == "__main__":
    sys.exit(main())
