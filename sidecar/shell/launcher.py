"""`bin/start-sidecar COMMAND [ARG...]`: run the proxy and the app side by side in one dyno.

Reads the config vars named in SIDECAR_URLS, points each at the local proxy for the app
(keeping the original in `<VAR>_UPSTREAM`), starts the proxy on this process's event loop,
starts the app as a child once the proxy listens, and pairs their lifetimes:

- the app exits -> the proxy drains and stops; we exit with the app's code;
- the proxy stops on its own -> the app gets SIGTERM; we exit non-zero;
- SIGTERM/SIGINT -> the proxy stops taking new clients and serves the ones it has until they
  leave (or SIDECAR_SHUTDOWN_TIMEOUT); the app gets the signal exactly once.

On Heroku (`$DYNO` set) the dyno manager sends SIGTERM to every process in the dyno, so the
app already has it: forwarding ours would make it two. Off Heroku nobody else tells the app,
so we forward it -- except a SIGINT typed at a terminal, which the terminal already delivered
to our whole foreground process group, app included.
"""

from __future__ import annotations

import asyncio
import contextlib
import os
import signal
import sys
import time
from collections.abc import Coroutine, Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any, TypeVar
from urllib.parse import quote

from .. import log
from ..config import ConfigError, PoolConfig, Settings, _convert, load_settings, pools_from_env
from ..dataplane.proxy import LISTEN_ADDR, Proxy
from ..yamlconfig import apply_file
from .assemble import new_proxy, run_loop
from .workers import make_proxy, worker_count

T = TypeVar("T")

USAGE = "usage: start-sidecar COMMAND [ARG...]"

#: Exit codes of the launcher's own failures (the app's code is passed through otherwise).
EXIT_FAILED = 1  # config error, cannot listen, or the proxy stopped under the app
EXIT_USAGE = 2
EXIT_NOT_EXECUTABLE = 126  # as a shell says for a command it cannot run
EXIT_NOT_FOUND = 127

# Time allowed past SIDECAR_SHUTDOWN_TIMEOUT for the proxy's last writes and the app's reaping.
_GRACE = 2.0

logger = log.get()


# -- what the app sees ------------------------------------------------------------------------


def local_url(pool: PoolConfig, settings: Settings, *, with_password: bool = True) -> str:
    """The URL the app gets for `pool`: same user and password, the proxy as host.

    tcp:  postgres://USER:PASS@127.0.0.1:6000/NAME
    unix: postgres://USER:PASS@%2Ftmp:6000/NAME -- the socket directory percent-encoded in the
          host part, which libpq (psql, psycopg, the pg gem), asyncpg, node-postgres and
          Rails' URL resolver all read as a Unix socket directory. Not `@/NAME?host=/tmp&port=`:
          older node-postgres (pg-connection-string 2.6) ignores that `port=`.
    """
    up = pool.upstream
    auth = quote(up.user, safe="")
    if with_password and up.password:
        auth += ":" + quote(up.password, safe="")
    host = quote(settings.socket_dir, safe="") if settings.url_style == "unix" else LISTEN_ADDR
    return f"postgres://{auth}@{host}:{settings.port}/{quote(pool.name, safe='')}"


def rewrite_env(
    environ: Mapping[str, str], settings: Settings, pools: Mapping[str, PoolConfig]
) -> dict[str, str]:
    """The app's environment: each var (key of `pools`) points at the proxy.

    `<VAR>_SIDECAR` holds the same value (for code that picks one URL explicitly) and
    `<VAR>_UPSTREAM` the original (for work that must bypass the pool, e.g. migrations).
    """
    env = dict(environ)
    for var, pool in pools.items():
        url = local_url(pool, settings)
        env[f"{var}_UPSTREAM"] = environ[var]
        env[var] = url
        env[f"{var}_SIDECAR"] = url
    return env


# -- configuration -----------------------------------------------------------------------------


def enabled(environ: Mapping[str, str]) -> bool:
    """SIDECAR_ENABLED (or PGBOUNCER_ENABLED), read before anything else can fail."""
    for name in ("SIDECAR_ENABLED", "PGBOUNCER_ENABLED"):
        raw = environ.get(name)
        if raw is not None:
            return bool(_convert(name, raw, bool))
    return True


@dataclass(frozen=True)
class Plan:
    """Everything decided before anything starts."""

    settings: Settings
    #: config var name -> its pool, in SIDECAR_URLS order
    pools: dict[str, PoolConfig]
    env: dict[str, str]
    #: PGBOUNCER_* vars read because their SIDECAR_* twin was unset
    fallbacks: list[str]
    config_file: Path | None
    #: proxy processes (SIDECAR_WORKERS, `auto` resolved)
    workers: int = 1
    #: how `auto` chose the number of workers (None when SIDECAR_WORKERS is a number)
    workers_auto: str | None = None


def plan(environ: Mapping[str, str], cwd: Path) -> Plan:
    """Read and check the whole configuration; raises ConfigError naming what is wrong."""
    settings, fallbacks = load_settings(environ)
    pools = pools_from_env(settings, environ)
    names = settings.urls.split()
    pools, config_file = apply_file(
        pools, settings, {p.name: var for p, var in zip(pools, names, strict=True)}, environ, cwd
    )
    by_var = dict(zip(names, pools, strict=True))
    workers, how = worker_count(settings, pools)
    return Plan(
        settings=settings,
        pools=by_var,
        env=rewrite_env(environ, settings, by_var),
        fallbacks=fallbacks,
        config_file=config_file,
        workers=workers,
        workers_auto=how,
    )


# -- running -----------------------------------------------------------------------------------


def exit_code(returncode: int) -> int:
    """A child's status as a shell reports it: killed by signal N -> 128 + N."""
    return returncode if returncode >= 0 else 128 - returncode


def _terminal_signalled_group() -> bool:
    """True when a typed ^C reached our whole process group (we are the tty's foreground)."""
    try:
        return os.isatty(0) and os.tcgetpgrp(0) == os.getpgrp()
    except OSError:
        return False


class Launcher:
    """One run: the proxy, the app, and the rules that tie their ends together."""

    def __init__(
        self,
        settings: Settings,
        pools: Sequence[PoolConfig],
        env: Mapping[str, str],
        argv: Sequence[str],
        *,
        on_heroku: bool,
        proxy: Proxy | None = None,
    ) -> None:
        self.settings = settings
        self.env = dict(env)
        self.argv = list(argv)
        self.on_heroku = on_heroku
        self.proxy = proxy if proxy is not None else new_proxy(settings, pools)
        self.app: asyncio.subprocess.Process | None = None
        self._signals: asyncio.Queue[signal.Signals] = asyncio.Queue()
        self._tasks: list[asyncio.Task[Any]] = []

    async def run(self) -> int:
        loop = asyncio.get_running_loop()
        installed: list[signal.Signals] = []
        for sig in (signal.SIGTERM, signal.SIGINT):
            with contextlib.suppress(NotImplementedError, RuntimeError):
                loop.add_signal_handler(sig, self._signals.put_nowait, sig)
                installed.append(sig)
        try:
            code = await self._run()
        finally:
            for sig in installed:
                loop.remove_signal_handler(sig)
            for task in self._tasks:
                task.cancel()
        logger.info("exit", code=code)
        return code

    def _task(self, coro: Coroutine[Any, Any, T]) -> asyncio.Task[T]:
        task = asyncio.get_running_loop().create_task(coro)
        self._tasks.append(task)
        return task

    async def _run(self) -> int:
        started = time.monotonic()
        try:
            await self.proxy.start()
        except OSError as exc:
            logger.error("listen_failed", error=exc.strerror or str(exc), port=self.settings.port)
            await self._stop_proxy("listen failed")
            return EXIT_FAILED
        # start() returns once the sockets listen: a connect now is queued by the kernel and
        # served as soon as we yield, so the app can start without a sleep or a probe.
        if not self._signals.empty():
            sig = self._signals.get_nowait()
            logger.info("signal", signal=sig.name, app="not started")
            await self._stop_proxy(sig.name)
            return 128 + sig.value
        command = os.path.basename(self.argv[0])
        try:
            self.app = await asyncio.create_subprocess_exec(*self.argv, env=self.env)
        except OSError as exc:
            logger.error("app_not_started", command=command, error=exc.strerror or str(exc))
            await self._stop_proxy("app did not start")
            return EXIT_NOT_FOUND if isinstance(exc, FileNotFoundError) else EXIT_NOT_EXECUTABLE
        logger.info(
            "app_started",
            command=command,
            pid=self.app.pid,
            ready_ms=round((time.monotonic() - started) * 1000),
        )
        app_exit = self._task(self.app.wait())
        proxy_end = self._task(self.proxy.wait_stopped())
        signalled = self._task(self._signals.get())
        done, _ = await asyncio.wait(
            {app_exit, proxy_end, signalled}, return_when=asyncio.FIRST_COMPLETED
        )
        if app_exit in done:
            code = exit_code(app_exit.result())
            logger.info("app_exit", code=code)
            await self._stop_proxy("app exited", proxy_end)
            return code
        if signalled in done:
            return await self._on_signal(signalled.result(), app_exit, proxy_end)
        return await self._on_proxy_end(proxy_end, app_exit)

    async def _on_signal(
        self, sig: signal.Signals, app_exit: asyncio.Task[int], proxy_end: asyncio.Task[None]
    ) -> int:
        forward = not self.on_heroku and not (sig is signal.SIGINT and _terminal_signalled_group())
        logger.info("signal", signal=sig.name, forwarded=forward)
        self.proxy.shutdown(sig.name)
        if forward:
            self._signal_app(sig)
        deadline = time.monotonic() + self.settings.shutdown_timeout
        more = self._task(self._signals.get())
        while not app_exit.done() and (left := deadline - time.monotonic()) > 0:
            done, _ = await asyncio.wait(
                {app_exit, more}, timeout=left, return_when=asyncio.FIRST_COMPLETED
            )
            if more in done:
                # Once is enough: the app is already shutting down, and a second SIGTERM makes
                # several servers (puma, gunicorn) drop the requests they are still serving.
                logger.info("signal_ignored", signal=more.result().name, reason="shutting down")
                more = self._task(self._signals.get())
        code = await self._reap(app_exit, "still running after SIDECAR_SHUTDOWN_TIMEOUT")
        logger.info("app_exit", code=code)
        await self._stop_proxy(sig.name, proxy_end)
        return code

    async def _on_proxy_end(
        self, proxy_end: asyncio.Task[None], app_exit: asyncio.Task[int]
    ) -> int:
        exc = proxy_end.exception()
        if exc is not None:
            logger.error("proxy_died", error=f"{type(exc).__name__}: {exc}", app="SIGTERM")
        else:
            logger.error("proxy_died", error="stopped while the app was running", app="SIGTERM")
        self._signal_app(signal.SIGTERM)
        with contextlib.suppress(TimeoutError):
            await asyncio.wait_for(asyncio.shield(app_exit), self.settings.shutdown_timeout)
        code = await self._reap(app_exit, "still running after SIGTERM")
        logger.info("app_exit", code=code)
        return EXIT_FAILED

    def _signal_app(self, sig: signal.Signals) -> None:
        if self.app is not None and self.app.returncode is None:
            with contextlib.suppress(ProcessLookupError):
                self.app.send_signal(sig)

    async def _reap(self, app_exit: asyncio.Task[int], why: str) -> int:
        """The app's exit code, SIGKILLing it first if it is still running."""
        if not app_exit.done():
            logger.warning("app_killed", reason=why)
            if self.app is not None:
                with contextlib.suppress(ProcessLookupError):
                    self.app.kill()
        return exit_code(await app_exit)

    async def _stop_proxy(self, why: str, proxy_end: asyncio.Task[None] | None = None) -> None:
        """Drain and stop the proxy; returns when it stopped (bounded by its own timeout)."""
        self.proxy.shutdown(why)
        waiter = proxy_end if proxy_end is not None else self._task(self.proxy.wait_stopped())
        try:
            await asyncio.wait_for(asyncio.shield(waiter), self.settings.shutdown_timeout + _GRACE)
        except TimeoutError:
            logger.warning("proxy_stop_timeout", timeout_s=self.settings.shutdown_timeout)
        except Exception as exc:  # the proxy is going away either way; say why it was unclean
            logger.warning("proxy_stop_error", error=f"{type(exc).__name__}: {exc}")


# -- entry point -----------------------------------------------------------------------------


def _exec(argv: list[str]) -> int:
    try:
        os.execvp(argv[0], argv)
    except OSError as exc:
        logger.error("app_not_started", command=argv[0], error=exc.strerror or str(exc))
        return EXIT_NOT_FOUND if isinstance(exc, FileNotFoundError) else EXIT_NOT_EXECUTABLE
    raise AssertionError("unreachable")  # pragma: no cover


def main(argv: list[str] | None = None) -> int:
    log.setup()
    args = list(sys.argv[1:] if argv is None else argv)
    if args and args[0] == "--":
        args = args[1:]
    if not args or args[0] in ("-h", "--help"):
        print(USAGE)
        print(__doc__)
        return 0 if args else EXIT_USAGE
    try:
        if not enabled(os.environ):
            logger.info("disabled", command=os.path.basename(args[0]))
            return _exec(args)
        the_plan = plan(os.environ, Path.cwd())
    except ConfigError as exc:
        logger.error("config_error", error=str(exc))
        return EXIT_FAILED
    s = the_plan.settings
    if the_plan.fallbacks:
        logger.info("pgbouncer_vars_used", vars=",".join(the_plan.fallbacks))
    if the_plan.config_file is not None:
        logger.info("config_file", file=str(the_plan.config_file))
    for var, pool in the_plan.pools.items():
        fields = {
            "var": var,
            "pool": pool.name,
            "upstream": pool.upstream.redacted(),
            "url": local_url(pool, s, with_password=False),
        }
        if pool.overrides:
            fields["overrides"] = ",".join(f"{k}={v}" for k, v in pool.overrides.items())
        logger.info("launch", **fields)
    if the_plan.workers_auto:
        logger.info("workers", workers=the_plan.workers, chosen=the_plan.workers_auto)
    pools = list(the_plan.pools.values())
    launcher = Launcher(
        s,
        pools,
        the_plan.env,
        args,
        on_heroku=bool(os.environ.get("DYNO")),
        proxy=make_proxy(s, pools, the_plan.workers),
    )
    result: list[int] = []

    async def _main() -> None:
        result.append(await launcher.run())

    run_loop(_main())
    return result[0]


if __name__ == "__main__":
    sys.exit(main())
