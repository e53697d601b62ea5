"""The proxy process: listeners, the client registry, cancel routing, the janitor and shutdown."""

from __future__ import annotations

import asyncio
import contextlib
import os
import secrets
import signal
import time
from collections.abc import Callable, Coroutine, Iterator, Sequence
from typing import TYPE_CHECKING, Any, cast

from .. import STALE, build, log
from ..config import PoolConfig, Settings
from ..protocol.errors import ADMIN_SHUTDOWN
from .client import ClientConn, ConsoleSession
from .clienttls import ClientTLS, load_client_tls
from .pool import Pool
from .server import send_cancel

if TYPE_CHECKING:
    # Types only: the process shell builds the Proxy and hands its Worker in.
    from ..shell.workers import Worker

logger = log.get()

JANITOR_PERIOD = 0.5
# Only this dyno's processes may reach the pool, whatever PORT or other settings say.
LISTEN_ADDR = "127.0.0.1"


ConsoleFactory = Callable[["Proxy", ClientConn], ConsoleSession]
SideTask = Callable[["Proxy"], Coroutine[Any, Any, None]]


def _no_console(proxy: Proxy, client: ClientConn) -> ConsoleSession:
    raise RuntimeError("this proxy was built without an admin console (use shell.assemble)")


class Proxy:
    """Owns every pool and client; one per process."""

    def __init__(
        self,
        settings: Settings,
        pools: list[PoolConfig],
        *,
        worker: Worker | None = None,
        console: ConsoleFactory | None = None,
        side_tasks: Sequence[SideTask] = (),
        client_tls: ClientTLS | None = None,
    ) -> None:
        self.settings = settings
        #: The certificate served to apps that ask for TLS (the shell makes it once for every
        #: worker; made here when not handed in), and the context of the TCP listener.
        if client_tls is None and settings.client_tls != "off":
            client_tls = load_client_tls(settings)
        self.client_tls = client_tls if settings.client_tls != "off" else None
        self.client_tls_ctx = self.client_tls.context() if self.client_tls else None
        #: Makes the session of a client that logs in to the admin console. The control
        #: surface is handed in (shell.assemble) so the data plane never imports it.
        self.console: ConsoleFactory = console or _no_console
        #: Tasks that run beside the listeners for the proxy's life (the stats reporter).
        self.side_tasks = tuple(side_tasks)
        #: This process's place among SIDECAR_WORKERS > 1 processes (settings are its share).
        self.worker = worker
        self.pools: dict[str, Pool] = {p.name: Pool(self, p, p.settings(settings)) for p in pools}
        self.clients: set[ClientConn] = set()
        #: Clients that have not authenticated yet: the janitor closes them after
        #: client_login_timeout.
        self.unauthenticated: set[ClientConn] = set()
        self.logged_in = 0
        self._keys: dict[tuple[int, int], ClientConn] = {}
        self._servers: list[asyncio.Server] = []
        self.shutting_down = False
        self._stopped = asyncio.Event()
        self._tasks: set[asyncio.Task[None]] = set()
        self.socket_path = ""

    def _new_client(self) -> asyncio.Protocol:
        # A protocol without asyncio's base class (an extension type in the compiled build).
        return cast(asyncio.Protocol, ClientConn(self))

    # -- lifecycle -------------------------------------------------------------------------------

    async def start(self) -> None:
        loop = asyncio.get_running_loop()
        s = self.settings
        w = self.worker
        if w is None:
            tcp = await loop.create_server(
                self._new_client, LISTEN_ADDR, s.port, reuse_address=True, backlog=4096
            )
        else:
            tcp = await w.tcp_server(loop, self._new_client, s.port)
        self._servers.append(tcp)
        unix: asyncio.Server | None = None
        if w is not None and w.unix_fd is not None:
            unix = await w.unix_server(loop, self._new_client)
            self._servers.append(unix)
        elif s.socket_dir:
            self.socket_path = os.path.join(s.socket_dir, f".s.PGSQL.{s.port}")
            with contextlib.suppress(FileNotFoundError):
                os.unlink(self.socket_path)
            unix = await loop.create_unix_server(self._new_client, self.socket_path, backlog=4096)
            # Only this dyno's own user may talk to the pool.
            os.chmod(self.socket_path, 0o600)
            self._servers.append(unix)
        if w is not None:
            await w.start(self, unix)
        for pool in self.pools.values():
            # Listening first: a client arriving before DNS answers just waits for it.
            self.spawn(pool.start())
        self.spawn(self._janitor())
        for task in self.side_tasks:
            self.spawn(task(self))
        logger.info(
            "listening",
            addr=f"{LISTEN_ADDR}:{s.port}",
            socket=self.socket_path or (w.unix_path if w else None),
            pool_mode=s.pool_mode,
            pools=",".join(self.pools),
            build=build(),
            **({} if w is None else {"workers": w.count, "pid": os.getpid()}),
        )
        if STALE:
            logger.warning(
                "build_stale",
                sources=",".join(STALE),
                hint="edited since the hot path was compiled: running pure Python; "
                "rebuild with pip install -e .",
            )
        for pool in self.pools.values():
            logger.info(
                "pool",
                pool=pool.name,
                upstream=pool.config.upstream.redacted(),
                sslmode=pool.sslmode,
                size=pool.settings.default_pool_size,
            )
        if self.client_tls is not None and (w is None or w.index == 0):
            # What making the certificate cost is part of the start-up time (docs).
            logger.info("client_tls", mode=s.client_tls, **self.client_tls.describe())

    async def serve(self) -> None:
        """Run until shut down (SIGTERM/SIGINT or `shutdown()`)."""
        loop = asyncio.get_running_loop()
        for sig in (signal.SIGTERM, signal.SIGINT):
            with contextlib.suppress(NotImplementedError, RuntimeError):
                loop.add_signal_handler(sig, self.shutdown, signal.Signals(sig).name)
        await self.start()
        await self._stopped.wait()

    async def wait_stopped(self) -> None:
        """Return once `shutdown()` has finished (for an embedder such as the launcher)."""
        await self._stopped.wait()

    def shutdown(self, why: str = "shutdown") -> None:
        """Refuse new clients; serve those in; exit when they are gone or on shutdown_timeout."""
        if self.shutting_down:
            return
        self.shutting_down = True
        logger.info(
            "shutdown",
            reason=why,
            clients=len(self.clients),
            timeout_s=self.settings.shutdown_timeout,
        )
        # Listeners stay open so new clients get a clear 57P01 rather than "connection refused";
        # clients already in keep being served, since the app finishes its own requests now.
        for pool in self.pools.values():
            pool.close_idle("shutdown")
        if self.worker is not None:
            self.worker.shutdown(why)
        self.spawn(self._drain())

    async def _drain(self) -> None:
        deadline = time.monotonic() + self.settings.shutdown_timeout
        # Only logged-in clients are waited for: one still in its startup, TLS handshake or
        # SCRAM exchange has no work in flight, and must not hold the exit for the timeout.
        while len(self.clients) > len(self.unauthenticated) and time.monotonic() < deadline:
            await asyncio.sleep(0.05)
        for client in list(self.clients):
            client.fail(
                ADMIN_SHUTDOWN,
                "terminating connection due to administrator command",
                reason="shutdown timeout",
            )
        for pool in self.pools.values():
            pool.close_all("shutdown")
            await pool.stop()
        if self.worker is not None:
            # Worker 0 keeps listening (and refusing with 57P01) while the others drain.
            await self.worker.close(deadline)
        for srv in self._servers:
            srv.close()
        if self.socket_path:
            with contextlib.suppress(FileNotFoundError):
                os.unlink(self.socket_path)
        # Let the Terminate messages and FATALs reach their sockets.
        await asyncio.sleep(0.05)
        logger.info("stopped")
        self._stopped.set()

    # -- clients ----------------------------------------------------------------------------------

    def client_connected(self, client: ClientConn) -> None:
        self.clients.add(client)
        self.unauthenticated.add(client)

    def client_authenticated(self, client: ClientConn) -> None:
        self.unauthenticated.discard(client)

    def client_disconnected(self, client: ClientConn) -> None:
        self.clients.discard(client)
        self.unauthenticated.discard(client)
        if client.counted:
            client.counted = False
            self.logged_in -= 1
        self._keys.pop((client.pid, client.secret), None)

    def admit(self, client: ClientConn) -> bool:
        """Count a client that sent a startup packet; False past max_client_conn."""
        if self.logged_in >= self.settings.max_client_conn:
            return False
        self.logged_in += 1
        client.counted = True
        return True

    def register_key(self, client: ClientConn) -> tuple[int, int]:
        """The BackendKeyData this client gets: ours, so a cancel comes to us.

        With several workers the pid also says which one (Worker.owner), since the cancel
        may reach another.
        """
        w = self.worker
        while True:
            pid = secrets.randbits(31) if w is None else w.new_pid()
            key = (pid, secrets.randbits(31))
            if key not in self._keys:
                self._keys[key] = client
                return key

    def auth_failed(self, client: ClientConn) -> None:
        logger.warning("auth_failed", pool=client.database, user=client.user, addr=client.addr)

    def clients_of(self, pool: Pool) -> Iterator[ClientConn]:
        return (c for c in list(self.clients) if c.pool is pool)

    def cancel(self, pid: int, secret: int) -> None:
        w = self.worker
        if w is not None and w.owner(pid) != w.index:
            w.forward_cancel(pid, secret)
            return
        client = self._keys.get((pid, secret))
        if client is None:
            logger.info("cancel_ignored", reason="unknown key")
            return
        server = client.server
        if server is None or server.client is not client:
            if client.pool is not None and client.pool.cancel_waiting(client):
                logger.info("cancel_waiting", addr=client.addr, client_pid=client.pid)
                return
            logger.info("cancel_ignored", reason="client holds no server", addr=client.addr)
            return
        self.spawn(self._cancel(server))

    async def _cancel(self, server: object) -> None:
        from .server import ServerConn

        assert isinstance(server, ServerConn)
        try:
            await send_cancel(server)
        except (OSError, TimeoutError) as exc:
            logger.warning("cancel_failed", error=str(exc))

    # -- janitor ---------------------------------------------------------------------------------

    async def _janitor(self) -> None:
        while True:
            await asyncio.sleep(JANITOR_PERIOD)
            now = time.monotonic()
            for pool in self.pools.values():
                try:
                    pool.maintain(now)
                except Exception:
                    logger.exception("janitor_error", pool=pool.name)
            self._login_timeouts(now)

    def _login_timeouts(self, now: float) -> None:
        """Close clients that connected client_login_timeout ago and are not logged in yet
        (a half-done startup, SCRAM exchange or TLS handshake holds a slot otherwise)."""
        timeout = self.settings.client_login_timeout
        if not timeout or not self.unauthenticated:
            return
        late = [c for c in self.unauthenticated if now - c.connected_at > timeout]
        for client in late:
            client.login_timed_out(timeout)

    def spawn(self, coro: Coroutine[Any, Any, None]) -> None:
        """Run `coro` as a task the proxy keeps a reference to until it ends."""
        task = asyncio.get_running_loop().create_task(coro)
        self._tasks.add(task)
        task.add_done_callback(self._tasks.discard)
