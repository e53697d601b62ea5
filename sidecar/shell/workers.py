"""Multi-core mode (`SIDECAR_WORKERS=N`): N proxy processes behind the proxy's one address.

One Python process tops out at about one core. With N > 1 the proxy runs as N workers, each a
whole `Proxy` (pools, janitor, stats, console) in its own process:

- Worker 0 is the proxy that always runs -- in `bin/start-sidecar`'s process, or in
  `python -m sidecar` -- and supervises workers 1..N-1, its child processes: SIGTERM is
  forwarded to them (each drains like worker 0), a worker that dies is logged with the reason
  and started again after a backoff, and worker 0 stops only once they are gone.
- Listening: every worker binds its own TCP socket on 127.0.0.1:PORT with SO_REUSEPORT, so the
  kernel spreads new connections over them (and stops sending any to a worker that died). A
  Unix socket cannot be shared that way: worker 0 creates `.s.PGSQL.<port>` (mode 0600) and the
  others inherit its listening fd; all of them accept on it.
- Totals hold: worker i gets `total // N (+1 if i < total % N)` of default_pool_size,
  min_pool_size, reserve_pool_size, max_client_conn and max_per_instance, per pool. Shares
  differ by at most one and sum to the total. A share that would be 0 where 0 means "nothing"
  (a pool of no servers, no client admitted) or "unlimited" (max_per_instance) refuses to start
  when N was given, and lowers N (saying why) when it was `auto`. The connection budget
  (upstream/budget.py) is not shared out: every worker counts its own connections against the
  instance's total and the whole budget, one agent among the app's sidecars; dividing the budget
  by N would have the whole app settle at budget / N, since the total is everyone's.
- Cancels: a CancelRequest arrives on a new connection, which may reach any worker. The pid of
  the BackendKeyData a worker issues is `pid % N == worker`, so the receiving worker knows the
  owner and forwards the 16 bytes to it over the owner's control socket: a Unix socket in a
  private directory (mode 0700), never a TCP port.

Why re-exec (`python -I -c ...` running `child_main`) and not fork or multiprocessing: a worker
that dies must be started again by a parent whose event loop (uvloop, executor threads, signal
handlers) is running, and forking a running loop is not safe; a fresh interpreter always is.
It costs a Python start-up per worker, once. A child gets the configuration worker 0 validated
over a stdin pipe (it holds passwords, so never argv or the environment), which also keeps a
restarted worker's shares equal to the others' even if sidecar.yml changed meanwhile; and the
Unix listening socket through `pass_fds`. Children die with their parent: PR_SET_PDEATHSIG
sends them SIGTERM (they drain and exit) if worker 0's process goes away without them.
"""

from __future__ import annotations

import asyncio
import contextlib
import ctypes
import dataclasses
import errno
import fcntl
import functools
import json
import os
import random
import secrets
import shutil
import signal
import socket
import struct
import subprocess
import sys
import tempfile
import threading
import time
from collections.abc import Callable, Sequence
from typing import TYPE_CHECKING, Any, cast

from .. import log
from ..config import MAX_WORKERS, ConfigError, PoolConfig, Settings, Upstream, parse_workers
from ..dataplane.clienttls import ClientTLS, load_client_tls
from ..protocol import messages as m

if TYPE_CHECKING:
    from ..dataplane.proxy import Proxy

logger = log.get()

#: Settings that are totals over the whole sidecar: each worker gets its share.
SHARED = (
    "default_pool_size",
    "min_pool_size",
    "reserve_pool_size",
    "max_client_conn",
    "max_per_instance",
)

#: A restarted worker waits this long first, doubling per quick death up to MAX_BACKOFF.
FIRST_BACKOFF = 0.5
MAX_BACKOFF = 30.0
#: A worker that lived this long counts as healthy: its next death starts the backoff afresh.
HEALTHY_AFTER = 30.0
#: Time past shutdown_timeout for workers' last writes before worker 0 SIGKILLs them.
STOP_GRACE = 1.0
#: How long a cancel may take to reach another worker's control socket.
FORWARD_TIMEOUT = 2.0

#: Control message (worker -> worker 0): "stop the whole sidecar", with a reason. Cancels use
#: PostgreSQL's own CancelRequest packet, so one framing serves both: int32 length, int32 code.
STOP_CODE = 0x53_43_53_54  # "SCST"
#: Control message (worker -> every other): a DNS answer, "<pool>\n<addr> <addr>...".
SEEN_CODE = 0x53_43_53_4E  # "SCSN"
#: Control message (a console's worker -> every other): "<verb>\n<pool>" (no pool: all of
#: them) for PAUSE, RESUME or RECONNECT. The receiver runs it on its own pools and answers on
#: the same connection with a frame of this code: "ok", or what went wrong.
ADMIN_CODE = 0x53_43_41_44  # "SCAD"
#: The console commands that act on every worker.
ADMIN_VERBS = ("pause", "resume", "reconnect")
_MAX_CONTROL_MESSAGE = 1024


def _frame(code: int, body: bytes) -> bytes:
    """A control message: int32 length (itself included), int32 code, body."""
    return struct.pack("!ii", 8 + len(body), code) + body


# -- shares ------------------------------------------------------------------------------------


def share(total: int, index: int, count: int) -> int:
    """Worker `index`'s part of `total`: parts differ by at most one and sum to `total`."""
    return total // count + (1 if index < total % count else 0)


def share_settings(settings: Settings, index: int, count: int) -> Settings:
    shares = {k: share(getattr(settings, k), index, count) for k in SHARED}
    return dataclasses.replace(settings, **shares)  # type: ignore[arg-type]


def share_pool(pool: PoolConfig, index: int, count: int) -> PoolConfig:
    """The pool with its own (sidecar.yml) totals split too."""
    if not any(k in SHARED for k in pool.overrides):
        return pool
    overrides = {
        k: share(v, index, count) if k in SHARED and isinstance(v, int) else v
        for k, v in pool.overrides.items()
    }
    return dataclasses.replace(pool, overrides=overrides)


def _indivisible(settings: Settings, pools: Sequence[PoolConfig]) -> list[tuple[int, str]]:
    """(total, name) of every total of which each worker needs at least one."""
    found = [(settings.max_client_conn, "SIDECAR_MAX_CLIENT_CONN")]
    for pool in pools:
        effective = pool.settings(settings)
        for key in ("default_pool_size", "max_per_instance"):
            total = getattr(effective, key)
            if key == "max_per_instance" and total == 0:
                continue  # no cap: nothing to split
            if key in pool.overrides:
                found.append((total, f"{key} of pool {pool.name} (sidecar.yml)"))
            else:
                found.append((total, f"SIDECAR_{key.upper()} (pool {pool.name})"))
    return found


def worker_count(
    settings: Settings, pools: Sequence[PoolConfig], cpus: int | None = None
) -> tuple[int, str | None]:
    """How many workers to run, and for `auto` how it chose (None for a number).

    A number that cannot give every worker at least one of each indivisible total is a
    ConfigError naming the setting; `auto` lowers itself to fit instead.
    """
    wanted = parse_workers(settings.workers)
    limits = _indivisible(settings, pools)
    if wanted is not None:
        for total, name in limits:
            if total < wanted:
                raise ConfigError(
                    f"SIDECAR_WORKERS={wanted} needs {name} of at least {wanted} (one per"
                    f" worker), got {total}; lower SIDECAR_WORKERS or raise {name.split()[0]}"
                )
        return wanted, None
    if cpus is None:
        cpus, source = usable_cpus()
    else:
        source = "CPUs"
    count, why = min(cpus, MAX_WORKERS), None
    for total, name in limits:
        if total < count:
            count, why = total, f"{name} is {total}"
    return max(count, 1), f"auto: {cpus} {source}" + (f", but {why}" if why else "")


def usable_cpus(root: str = "/") -> tuple[int, str]:
    """CPUs this process may use, and what said so: "CPUs" (its affinity mask) or "CPUs
    (cgroup quota)" when a CPU quota allows fewer.

    A container sees every CPU of its host in its affinity mask; what it gets is its cgroup's
    quota (cgroup v2 `cpu.max`, v1 `cpu.cfs_quota_us` / `cpu.cfs_period_us`), the tightest of
    its cgroup and their parents'. A quota of 1.5 CPUs is 1 worker: a second would only
    share the first one's time. `root` is where /proc and /sys are (tests).
    """
    affinity = len(os.sched_getaffinity(0))
    quota = _cgroup_quota(root)
    if quota is not None and quota < affinity:
        return max(int(quota), 1), "CPUs (cgroup quota)"
    return affinity, "CPUs"


def _cgroup_quota(root: str) -> float | None:
    """The tightest CPU quota over this process's cgroup and its parents, in CPUs; None if
    none is set (or cgroups are not there to read)."""
    try:
        with open(os.path.join(root, "proc/self/cgroup")) as f:
            lines = f.read().splitlines()
    except OSError:
        return None
    found: list[float] = []
    for line in lines:
        _id, _, rest = line.partition(":")
        controllers, _, path = rest.partition(":")
        files: tuple[str, ...]
        if controllers == "":  # v2: cpu.max is "max 100000" or "200000 100000"
            base, files = os.path.join(root, "sys/fs/cgroup"), ("cpu.max",)
        elif "cpu" in controllers.split(","):
            base = os.path.join(root, "sys/fs/cgroup", controllers)
            if not os.path.isdir(base):  # mounted as cpu,cpuacct but listed the other way
                base = os.path.join(root, "sys/fs/cgroup/cpu")
            files = ("cpu.cfs_quota_us", "cpu.cfs_period_us")
        else:
            continue
        # The cgroup and each parent up to the mount's root: a limit anywhere applies.
        parts = [p for p in path.split("/") if p]
        for depth in range(len(parts), -1, -1):
            quota = _read_quota(os.path.join(base, *parts[:depth]), files)
            if quota is not None:
                found.append(quota)
    return min(found) if found else None


def _read_quota(directory: str, files: tuple[str, ...]) -> float | None:
    try:
        texts = []
        for name in files:
            with open(os.path.join(directory, name)) as f:
                texts.append(f.read().split())
        if len(files) == 1:  # cpu.max
            quota, period = texts[0][0], texts[0][1]
        else:
            quota, period = texts[0][0], texts[1][0]
        if quota in ("max", "-1"):
            return None
        return int(quota) / int(period) if int(period) > 0 and int(quota) > 0 else None
    except (OSError, ValueError, IndexError):
        return None


# -- one worker --------------------------------------------------------------------------------


def _own_pid(candidate: int, index: int, count: int) -> int:
    """`candidate` moved to the nearest pid this worker owns (pid % count == index); 0 if none."""
    pid = candidate - candidate % count + index
    return pid if 0 < pid < 2**31 else 0


class Worker:
    """This process's place among the workers: its index, its control socket, cancel routing."""

    def __init__(self, index: int, count: int, ctl_dir: str, unix_fd: int | None = None) -> None:
        self.index = index
        self.count = count
        self.ctl_dir = ctl_dir
        #: The Unix listening socket worker 0 made (children); None: make it (worker 0).
        self.unix_fd = unix_fd
        #: Where that socket is, for the log.
        self.unix_path: str | None = None
        self.proxy: Proxy | None = None
        self._control: asyncio.Server | None = None
        self._tasks: set[asyncio.Task[None]] = set()

    def ctl_path(self, index: int) -> str:
        return os.path.join(self.ctl_dir, f"worker-{index}")

    def new_pid(self) -> int:
        """A random positive int32 pid that names this worker."""
        while True:
            pid = _own_pid(secrets.randbits(31), self.index, self.count)
            if pid:
                return pid

    def owner(self, pid: int) -> int:
        return pid % self.count

    # listeners

    async def tcp_server(
        self, loop: asyncio.AbstractEventLoop, factory: Callable[[], asyncio.Protocol], port: int
    ) -> asyncio.Server:
        from ..dataplane.proxy import LISTEN_ADDR

        return await loop.create_server(
            factory, LISTEN_ADDR, port, reuse_address=True, reuse_port=True, backlog=4096
        )

    async def unix_server(
        self, loop: asyncio.AbstractEventLoop, factory: Callable[[], asyncio.Protocol]
    ) -> asyncio.Server:
        """Accept on the Unix socket worker 0 listens on (never unlinking it: not ours)."""
        assert self.unix_fd is not None
        sock = socket.socket(fileno=self.unix_fd)
        self.unix_path = str(sock.getsockname()) or None
        try:
            # Python 3.13's asyncio would remove the socket file when this server closes.
            return await loop.create_unix_server(
                factory,
                sock=sock,
                backlog=4096,
                cleanup_socket=False,  # type: ignore[call-arg,unused-ignore]
            )
        except TypeError:
            return await loop.create_unix_server(factory, sock=sock, backlog=4096)

    # lifecycle

    async def start(self, proxy: Proxy, unix: asyncio.Server | None) -> None:
        """Listen on the control socket (the proxy's own listeners are up)."""
        self.proxy = proxy
        loop = asyncio.get_running_loop()
        path = self.ctl_path(self.index)
        with contextlib.suppress(FileNotFoundError):
            os.unlink(path)  # a dead predecessor's
        self._control = await loop.create_unix_server(lambda: _Control(self), path)
        for pool in proxy.pools.values():
            # Each worker asks DNS itself; sharing the answers lets every one of them know
            # every instance as soon as any of them does (a follower pool endpoint names one
            # instance per answer, and answers could otherwise alternate between workers).
            pool.discovery.on_answer = functools.partial(self._share_answer, pool.name)

    def shutdown(self, why: str) -> None:
        """The proxy of this worker started its drain."""

    def stop_all(self, why: str) -> None:
        """Stop every worker (console SHUTDOWN): ask worker 0, which stops the rest."""
        body = why.encode()[:200]
        self._spawn(self._send(0, _frame(STOP_CODE, body), "stop"))

    async def close(self, deadline: float) -> None:
        """The proxy drained; stop answering control messages."""
        if self._control is not None:
            self._control.close()

    # control messages

    def forward_cancel(self, pid: int, secret: int) -> None:
        """Hand a cancel for another worker's client to that worker."""
        target = self.owner(pid)
        self._spawn(self._send(target, m.cancel_request(pid, secret), "cancel"))

    def _share_answer(self, pool: str, addrs: list[str]) -> None:
        body = f"{pool}\n{' '.join(addrs)}".encode()
        if len(body) + 8 > _MAX_CONTROL_MESSAGE:
            return
        data = _frame(SEEN_CODE, body)
        for target in range(self.count):
            if target != self.index:
                self._spawn(self._send(target, data, "seen"))

    async def _deliver(
        self, target: int, data: bytes
    ) -> tuple[asyncio.StreamReader, asyncio.StreamWriter]:
        """Write `data` to worker `target`'s control socket, within FORWARD_TIMEOUT; the caller
        reads an answer if it wants one, and closes the writer."""
        async with asyncio.timeout(FORWARD_TIMEOUT):
            reader, writer = await asyncio.open_unix_connection(self.ctl_path(target))
            try:
                writer.write(data)
                await writer.drain()
            except BaseException:
                writer.close()
                raise
        return reader, writer

    async def _send(self, target: int, data: bytes, what: str) -> None:
        try:
            _reader, writer = await self._deliver(target, data)
            writer.close()
        except (OSError, TimeoutError) as exc:
            if what != "seen":  # that worker is restarting; its own DNS answers will do
                logger.warning(
                    "control_send_failed", to_worker=target, message=what, error=str(exc)
                )
            return
        if what == "cancel":
            logger.info("cancel_forwarded", to_worker=target)

    async def on_every_other(self, verb: str, pool: str) -> list[str]:
        """Run a console command (ADMIN_VERBS) on every other worker's pools: what went wrong,
        a line per worker (empty: all of them did it). `pool` "": every pool."""
        body = f"{verb}\n{pool}".encode()
        if len(body) + 8 > _MAX_CONTROL_MESSAGE:
            return [f"pool name too long to pass on to the other workers ({len(body)} bytes)"]
        data = _frame(ADMIN_CODE, body)
        others = [t for t in range(self.count) if t != self.index]
        answers = await asyncio.gather(*(self._ask(t, data) for t in others))
        return [
            f"worker {t}: {answer}"
            for t, answer in zip(others, answers, strict=True)
            if answer != "ok"
        ]

    async def _ask(self, target: int, data: bytes) -> str:
        try:
            reader, writer = await self._deliver(target, data)
            try:
                # No time limit: PAUSE completes when that worker's busy servers are back.
                length, code = struct.unpack("!ii", await reader.readexactly(8))
                if code != ADMIN_CODE or not 8 <= length <= _MAX_CONTROL_MESSAGE:
                    return "answered with something else than a command's result"
                return (await reader.readexactly(length - 8)).decode(errors="replace")
            finally:
                writer.close()
        except (OSError, TimeoutError, asyncio.IncompleteReadError) as exc:
            # Restarting (it starts unpaused, with fresh servers), or gone.
            return f"not reached ({exc.__class__.__name__}: {exc or 'closed'})"

    def run_admin(self, body: bytes, transport: asyncio.BaseTransport) -> None:
        """Another worker's console asks: run it here, answer on `transport`."""
        self._spawn(self._run_admin(body, cast(asyncio.WriteTransport, transport)))

    async def _run_admin(self, body: bytes, transport: asyncio.WriteTransport) -> None:
        verb, _, name = body.decode(errors="replace").partition("\n")
        proxy = self.proxy
        try:
            if proxy is None or verb not in ADMIN_VERBS:
                raise LookupError(f"cannot run {verb!r} here")
            if name and name not in proxy.pools:
                raise LookupError(f'no such database: "{name}"')
            pools = [proxy.pools[name]] if name else list(proxy.pools.values())
            logger.info(
                "admin_command",
                command=verb,
                pools=",".join(p.name for p in pools) or None,
                from_console="another worker",
            )
            if verb == "pause":
                await asyncio.gather(*(p.pause() for p in pools))
                logger.info("paused", pools=",".join(p.name for p in pools))
            else:
                for pool in pools:
                    if verb == "resume":
                        pool.resume()
                    else:
                        pool.reconnect()
            answer = "ok"
        except LookupError as exc:
            answer = str(exc)
        except Exception as exc:  # a bug: say so there and here, keep serving
            logger.exception("admin_command_failed", command=verb)
            answer = f"failed: {exc.__class__.__name__}: {exc}"
        if not transport.is_closing():
            reply = answer.encode()[: _MAX_CONTROL_MESSAGE - 8]
            transport.write(_frame(ADMIN_CODE, reply))
            transport.close()

    def received(self, code: int, body: bytes) -> None:
        try:
            self._received(code, body)
        except Exception:  # a bug: say so, and keep serving
            logger.exception("control_message_failed", code=code, length=len(body))

    def _received(self, code: int, body: bytes) -> None:
        proxy = self.proxy
        if proxy is None:
            return
        if code == m.CANCEL_REQUEST_CODE and len(body) == 8:
            pid, secret = struct.unpack("!ii", body)
            proxy.cancel(pid, secret)
        elif code == SEEN_CODE:
            name, _, addrs = body.decode(errors="replace").partition("\n")
            pool = proxy.pools.get(name)
            if pool is not None and addrs:
                pool.discovery.seen_elsewhere(addrs.split())
        elif code == STOP_CODE and self.index == 0:
            proxy.shutdown(body.decode(errors="replace")[:200] or "stop requested")
        else:
            logger.warning("control_message_ignored", code=code, length=len(body))

    def _spawn(self, coro: Any) -> None:
        task = asyncio.get_running_loop().create_task(coro)
        self._tasks.add(task)
        task.add_done_callback(self._tasks.discard)


class _Control(asyncio.Protocol):
    """One control connection: a single framed message, then closed."""

    def __init__(self, worker: Worker) -> None:
        self.worker = worker
        self.buf = b""
        self.transport: asyncio.BaseTransport | None = None

    def connection_made(self, transport: asyncio.BaseTransport) -> None:
        self.transport = transport

    def data_received(self, data: bytes) -> None:
        self.buf += data
        if len(self.buf) < 8:
            return
        length, code = struct.unpack_from("!ii", self.buf)
        if not 8 <= length <= _MAX_CONTROL_MESSAGE:
            logger.warning("control_message_ignored", length=length)
            self._close()
            return
        if len(self.buf) >= length:
            body = self.buf[8:length]
            if code == ADMIN_CODE and self.transport is not None:
                # Answered on this connection once done (PAUSE waits).
                self.buf = b""
                self.worker.run_admin(body, self.transport)
                return
            self._close()
            self.worker.received(code, body)

    def _close(self) -> None:
        self.buf = b""
        if self.transport is not None:
            self.transport.close()


# -- worker 0: the supervisor -------------------------------------------------------------------


def _package_root() -> str:
    """The directory holding the `sidecar` package, for a child's sys.path."""
    import sidecar

    return os.path.dirname(os.path.dirname(os.path.abspath(sidecar.__file__)))


_CHILD = (
    "import sys; sys.path.insert(0, sys.argv.pop(1)); "
    "from sidecar.shell.workers import child_main; sys.exit(child_main(sys.argv[1:]))"
)


def _describe(returncode: int) -> str:
    if returncode < 0:
        try:
            return f"killed by {signal.Signals(-returncode).name}"
        except ValueError:
            return f"killed by signal {-returncode}"
    return f"exited with code {returncode}"


def config_blob(
    settings: Settings, pools: Sequence[PoolConfig], client_tls: ClientTLS | None = None
) -> bytes:
    """What a child reads on stdin: the validated totals, as JSON, and the app-facing TLS
    certificate and key worker 0 made or read (every worker serves the same one)."""
    return json.dumps(
        {
            "settings": dataclasses.asdict(settings),
            "client_tls": None
            if client_tls is None
            else {
                "cert": client_tls.cert_pem.decode(),
                "key": client_tls.key_pem.decode(),
                "source": client_tls.source,
            },
            "pools": [
                {
                    "name": p.name,
                    "upstream": dataclasses.asdict(p.upstream),
                    "overrides": p.overrides,
                }
                for p in pools
            ],
        }
    ).encode()


def read_config(blob: bytes) -> tuple[Settings, list[PoolConfig], ClientTLS | None]:
    doc = json.loads(blob)
    settings = Settings(**doc["settings"])
    pools = [
        PoolConfig(name=p["name"], upstream=Upstream(**p["upstream"]), overrides=p["overrides"])
        for p in doc["pools"]
    ]
    tls = doc.get("client_tls")
    client_tls = (
        None if tls is None else ClientTLS(tls["cert"].encode(), tls["key"].encode(), tls["source"])
    )
    return settings, pools, client_tls


async def _exited(proc: subprocess.Popen[bytes]) -> int:
    """Wait for a child without blocking the loop: its pidfd turns readable when it exits."""
    loop = asyncio.get_running_loop()
    try:
        pidfd = os.pidfd_open(proc.pid)
    except OSError:  # a kernel before 5.3: a thread of its own waits instead
        return await _exited_in_thread(proc)
    done: asyncio.Future[None] = loop.create_future()

    def readable() -> None:
        if not done.done():
            done.set_result(None)

    loop.add_reader(pidfd, readable)
    try:
        await done
    finally:
        loop.remove_reader(pidfd)
        os.close(pidfd)
    return proc.wait()


async def _exited_in_thread(proc: subprocess.Popen[bytes]) -> int:
    loop = asyncio.get_running_loop()
    done: asyncio.Future[int] = loop.create_future()

    def exited(code: int) -> None:
        if not done.done():  # not cancelled meanwhile
            done.set_result(code)

    def wait() -> None:
        loop.call_soon_threadsafe(exited, proc.wait())

    # Not the default executor: its few threads serve DNS and the like.
    threading.Thread(target=wait, name=f"worker-{proc.pid}", daemon=True).start()
    return await done


class Supervisor(Worker):
    """Worker 0: also starts workers 1..N-1, restarts the ones that die, stops them all."""

    def __init__(
        self,
        count: int,
        settings: Settings,
        pools: Sequence[PoolConfig],
        client_tls: ClientTLS | None = None,
    ) -> None:
        super().__init__(0, count, ctl_dir="")
        self._blob = config_blob(settings, pools, client_tls)
        self._timeout = settings.shutdown_timeout
        self._procs: dict[int, subprocess.Popen[bytes]] = {}
        self._keepers: list[asyncio.Task[None]] = []
        self._stopping = asyncio.Event()
        self._unix_keep: int | None = None

    async def start(self, proxy: Proxy, unix: asyncio.Server | None) -> None:
        # Private to this user: other users' processes can neither cancel nor stop through it.
        near = proxy.settings.socket_dir
        # A Unix socket path has room for about 100 bytes.
        self.ctl_dir = tempfile.mkdtemp(
            prefix="sidecar-workers-", dir=near if near and len(near) < 60 else None
        )
        if unix is not None:
            # Our own duplicate, for children started later: the server's may close first.
            self._unix_keep = os.dup(unix.sockets[0].fileno())
        await super().start(proxy, unix)
        loop = asyncio.get_running_loop()
        self._keepers = [loop.create_task(self._keep(i)) for i in range(1, self.count)]

    async def tcp_server(
        self, loop: asyncio.AbstractEventLoop, factory: Callable[[], asyncio.Protocol], port: int
    ) -> asyncio.Server:
        # SO_REUSEPORT would let us join another process's listener on this port (another
        # sidecar of this user) and silently split its connections: a plain bind first fails
        # with EADDRINUSE as today if anyone listens there.
        from ..dataplane.proxy import LISTEN_ADDR

        with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as probe:
            probe.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
            probe.bind((LISTEN_ADDR, port))
        return await super().tcp_server(loop, factory, port)

    def _spawn_child(self, index: int) -> subprocess.Popen[bytes]:
        """Start worker `index`; its configuration waits in a pipe on its stdin.

        subprocess.Popen, not the loop's subprocess support: uvloop forks and runs Python code
        in the child before exec, which can deadlock while our executor threads (DNS, logins)
        hold locks; CPython's fork_exec runs none.
        """
        read_end, write_end = os.pipe()
        try:
            if len(self._blob) > 60_000:  # a pipe holds 64 KiB unless told otherwise
                fcntl.fcntl(write_end, fcntl.F_SETPIPE_SZ, len(self._blob))
            os.set_blocking(write_end, False)
            if os.write(write_end, self._blob) != len(self._blob):
                raise OSError(errno.EFBIG, "configuration larger than a pipe")
            os.close(write_end)
            write_end = -1
            fds = () if self._unix_keep is None else (self._unix_keep,)
            return subprocess.Popen(
                [
                    sys.executable,
                    "-I",
                    "-c",
                    _CHILD,
                    _package_root(),
                    f"--index={index}",
                    f"--count={self.count}",
                    f"--ctl-dir={self.ctl_dir}",
                    f"--unix-fd={-1 if self._unix_keep is None else self._unix_keep}",
                    f"--parent={os.getpid()}",
                ],
                stdin=read_end,
                pass_fds=fds,
            )
        finally:
            os.close(read_end)
            if write_end >= 0:
                os.close(write_end)

    async def _keep(self, index: int) -> None:
        """Run worker `index` until the sidecar stops, restarting it with backoff."""
        failures = 0
        while not self._stopping.is_set():
            started = time.monotonic()
            try:
                proc = self._spawn_child(index)
            except OSError as exc:
                reason, pid = f"could not start: {exc.strerror or exc}", None
            else:
                self._procs[index] = proc
                pid = proc.pid
                logger.info("worker_started", child=index, pid=pid)
                code = await _exited(proc)
                del self._procs[index]
                if self._stopping.is_set():
                    logger.info("worker_stopped", child=index, pid=pid, reason=_describe(code))
                    return
                reason = _describe(code)
            lived = time.monotonic() - started
            failures = 1 if lived >= HEALTHY_AFTER else failures + 1
            delay = min(MAX_BACKOFF, FIRST_BACKOFF * 2 ** (failures - 1))
            delay *= random.uniform(0.8, 1.2)
            logger.error(
                "worker_died",
                child=index,
                pid=pid,
                reason=reason,
                lived_s=round(lived, 1),
                restart_in_s=round(delay, 2),
            )
            with contextlib.suppress(TimeoutError):
                await asyncio.wait_for(self._stopping.wait(), delay)

    @staticmethod
    def _signal(proc: subprocess.Popen[bytes], sig: signal.Signals) -> None:
        with contextlib.suppress(ProcessLookupError):
            proc.send_signal(sig)  # does nothing once the child is reaped

    def shutdown(self, why: str) -> None:
        """Worker 0 drains: every other worker drains too (SIGTERM), none is restarted."""
        if self._stopping.is_set():
            return
        self._stopping.set()
        for proc in self._procs.values():
            self._signal(proc, signal.SIGTERM)

    def stop_all(self, why: str) -> None:
        pass  # our own proxy's shutdown stops the others

    async def close(self, deadline: float) -> None:
        """Wait for the other workers' drains; SIGKILL any still running past the deadline."""
        self.shutdown("stopping")
        keepers = [t for t in self._keepers if not t.done()]
        if keepers:
            left = max(0.0, deadline + STOP_GRACE - time.monotonic())
            _done, pending = await asyncio.wait(keepers, timeout=left)
            if pending:
                for index, proc in list(self._procs.items()):
                    logger.warning(
                        "worker_killed", child=index, pid=proc.pid, reason="drain timeout"
                    )
                    self._signal(proc, signal.SIGKILL)
                await asyncio.wait(pending, timeout=5.0)
        await super().close(deadline)
        if self._unix_keep is not None:
            os.close(self._unix_keep)
            self._unix_keep = None
        if self.ctl_dir:
            shutil.rmtree(self.ctl_dir, ignore_errors=True)

    @property
    def pids(self) -> dict[int, int]:
        """Running children: index -> pid."""
        return {i: p.pid for i, p in self._procs.items()}


# -- building the proxy ------------------------------------------------------------------------


def make_proxy(settings: Settings, pools: Sequence[PoolConfig], count: int) -> Proxy:
    """Worker 0's proxy: exactly today's single proxy for one worker, else its share."""
    from .assemble import new_proxy

    if count <= 1:
        # The proxy reads the user's pair, or makes the certificate once it listens.
        return new_proxy(settings, pools)
    # Made (or read) once here: the other workers get it from worker 0.
    client_tls = load_client_tls(settings)
    log.set_worker(0)
    return new_proxy(
        share_settings(settings, 0, count),
        [share_pool(p, 0, count) for p in pools],
        worker=Supervisor(count, settings, pools, client_tls),
        client_tls=client_tls,
    )


# -- a child worker's process -------------------------------------------------------------------

_PR_SET_PDEATHSIG = 1


def _die_with(parent: int) -> bool:
    """SIGTERM when the parent goes; False if it is gone already."""
    try:
        libc = ctypes.CDLL(None, use_errno=True)
        if libc.prctl(_PR_SET_PDEATHSIG, int(signal.SIGTERM), 0, 0, 0) != 0:
            logger.warning("pdeathsig_failed", error=os.strerror(ctypes.get_errno()))
    except (OSError, AttributeError) as exc:
        logger.warning("pdeathsig_failed", error=str(exc))
    return os.getppid() == parent


def child_main(argv: list[str]) -> int:
    """Worker 1..N-1: started by worker 0 (Supervisor), configuration on stdin."""
    from .assemble import new_proxy, run_loop

    args = dict(a.removeprefix("--").split("=", 1) for a in argv)
    index, count, parent = int(args["index"]), int(args["count"]), int(args["parent"])
    log.setup()
    log.set_worker(index)
    if not _die_with(parent):
        logger.warning("worker_orphaned", parent=parent)
        return 1
    settings, pools, client_tls = read_config(sys.stdin.buffer.read())
    unix_fd = int(args["unix-fd"])
    worker = Worker(index, count, args["ctl-dir"], None if unix_fd < 0 else unix_fd)
    proxy = new_proxy(
        share_settings(settings, index, count),
        [share_pool(p, index, count) for p in pools],
        worker=worker,
        client_tls=client_tls,
    )
    try:
        run_loop(proxy.serve())
    except OSError as exc:
        logger.error("listen_failed", error=exc.strerror or str(exc), port=settings.port)
        return 1
    return 0
