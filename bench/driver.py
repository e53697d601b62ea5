"""Socket-free driver of the real hot path: instructions per transaction under callgrind.

The real Proxy, Pool, ClientConn and ServerConn (built from load_settings + pools_from_args),
with fake transports: server connections moved to the pool's idle list, clients logged in
(idle). Each transaction is what pgbench -S sends and gets, handed to the objects' own
data_received: the client's request, then the server's answer, with everything in between
(walkers, acquire, link, flush, forward, transaction_done, release) running as in the
proxy. No sockets and no event loop, so the count is repeatable to a few instructions: on a
shared machine it is the measure for a hot-path decision (a pgbench run's noise is larger
than most changes).

    python bench/driver.py callgrind [--extended]   # valgrind at 2,000 and 12,000 xacts
    python bench/driver.py time [N] [--extended]   # wall clock, best of 5
    python bench/driver.py run N [--extended]       # N transactions (what callgrind runs)
    python bench/driver.py profile [--extended]     # the same, per function

Instructions per transaction = (I(12,000) - I(2,000)) / 10,000: start-up and imports cancel
out. SIDECAR_PURE_PYTHON=1 measures the pure-Python build with the same driver.
"""

from __future__ import annotations

import argparse
import os
import re
import shutil
import struct
import subprocess
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))

import sidecar  # noqa: E402
from sidecar.config import load_settings, pools_from_args  # noqa: E402
from sidecar.dataplane.client import C_IDLE, ClientConn  # noqa: E402
from sidecar.dataplane.proxy import Proxy  # noqa: E402
from sidecar.dataplane.server import S_IDLE, ServerConn  # noqa: E402

CLIENTS = 50
SERVERS = 20
PARAMS = {
    "client_encoding": "UTF8",
    "DateStyle": "ISO, MDY",
    "TimeZone": "UTC",
    "integer_datetimes": "on",
    "standard_conforming_strings": "on",
    "server_version": "15.0",
}


def msg(typ: bytes, body: bytes) -> bytes:
    return typ + struct.pack("!i", len(body) + 4) + body


SQL = b"SELECT abalance FROM pgbench_accounts WHERE aid = 12345;"
SIMPLE_REQUEST = msg(b"Q", SQL + b"\x00")
ROW_DESCRIPTION = msg(
    b"T", b"\x00\x01abalance\x00" + struct.pack("!ihihih", 16400, 2, 23, 4, -1, 0)
)
ROW = msg(b"D", struct.pack("!hi", 1, 4) + b"1234")
DONE = msg(b"C", b"SELECT 1\x00") + msg(b"Z", b"I")
SIMPLE_ANSWER = ROW_DESCRIPTION + ROW + DONE
# pgbench -M extended: the unnamed statement, one parameter.
EXTENDED_REQUEST = (
    msg(b"P", b"\x00SELECT abalance FROM pgbench_accounts WHERE aid = $1;\x00\x00\x00")
    + msg(b"B", b"\x00\x00\x00\x00\x00\x01" + struct.pack("!i", 5) + b"12345\x00\x00")
    + msg(b"D", b"P\x00")
    + msg(b"E", b"\x00\x00\x00\x00\x00")
    + msg(b"S", b"")
)
EXTENDED_ANSWER = msg(b"1", b"") + msg(b"2", b"") + ROW_DESCRIPTION + ROW + DONE


class FakeTransport:
    """What ClientConn/ServerConn use of a transport; keeps the last write."""

    def __init__(self) -> None:
        self.last = b""
        self.writes = 0

    def write(self, data: bytes) -> None:
        self.last = data
        self.writes += 1

    def get_extra_info(self, name: str, default: Any = None) -> Any:
        return default

    def is_closing(self) -> bool:
        return False

    def pause_reading(self) -> None:
        pass

    def resume_reading(self) -> None:
        pass

    def close(self) -> None:
        pass

    def abort(self) -> None:
        pass


def build() -> tuple[list[ClientConn], list[ServerConn]]:
    settings, _ = load_settings(
        {
            "SIDECAR_POOL_MODE": "transaction",
            "SIDECAR_DEFAULT_POOL_SIZE": str(SERVERS),
            "SIDECAR_STATS_PERIOD": "0",
        }
    )
    pools = pools_from_args(["bench=postgres://u:p@127.0.0.1:5432/bench?sslmode=disable"])
    proxy = Proxy(settings, pools)
    pool = proxy.pools["bench"]
    pool.defaults = dict(PARAMS)
    servers = []
    for _ in range(SERVERS):
        server = ServerConn(pool, "127.0.0.1", 5432)
        server.connection_made(FakeTransport())  # type: ignore[arg-type]
        server.params = dict(PARAMS)
        server.enter_data_mode()
        pool.connecting += 1
        pool._move(server, S_IDLE)
        servers.append(server)
    clients = []
    for _ in range(CLIENTS):
        client = ClientConn(proxy)
        client.connection_made(FakeTransport())  # type: ignore[arg-type]
        client.pool = pool
        client.frontend.inspect = True
        client.params = {}
        client.state = C_IDLE
        clients.append(client)
    return clients, servers


def run(n: int, extended: bool) -> None:
    clients, _ = build()
    request, answer = (
        (EXTENDED_REQUEST, EXTENDED_ANSWER) if extended else (SIMPLE_REQUEST, SIMPLE_ANSWER)
    )
    ncl = len(clients)
    for i in range(n):
        client = clients[i % ncl]
        client.data_received(request)
        server = client.server
        assert server is not None, "no server linked"
        server.data_received(answer)
        assert client.server is None, "server not released"
    assert clients[0].transport.last.endswith(msg(b"Z", b"I"))  # type: ignore[union-attr]


def _callgrind(n: int, extended: bool, out: Path) -> int:
    cmd = ["valgrind", "--tool=callgrind", f"--callgrind-out-file={out}"]
    cmd += [sys.executable, __file__, "run", str(n)] + (["--extended"] if extended else [])
    env = {**os.environ, "PYTHONHASHSEED": "0"}  # the same dict layouts every run
    subprocess.run(cmd, check=True, capture_output=True, env=env)
    text = out.read_text(errors="replace")
    found = re.search(r"^(?:summary|totals):\s*(\d+)", text, re.MULTILINE)
    assert found, "no totals in callgrind output"
    return int(found.group(1))


def _functions(out: Path) -> dict[str, int]:
    """Instructions per function (self cost) from callgrind_annotate."""
    text = subprocess.run(
        ["callgrind_annotate", "--inclusive=no", "--auto=no", "--threshold=100", str(out)],
        check=True,
        capture_output=True,
        text=True,
    ).stdout
    costs: dict[str, int] = {}
    for line in text.splitlines():
        found = re.match(r"\s*([\d,]+) \([ \d.]+%\)\s+(\S.*?)(?: \[.*\])?$", line)
        if found and "PROGRAM TOTALS" not in line:
            name = found.group(2).rsplit("/", 1)[-1]
            costs[name] = costs.get(name, 0) + int(found.group(1).replace(",", ""))
    return costs


def callgrind(extended: bool, profile: bool = False) -> float:
    if shutil.which("valgrind") is None:
        raise SystemExit("valgrind is not installed (apt-get install valgrind)")
    with tempfile.TemporaryDirectory() as tmp:
        small_out, big_out = Path(tmp) / "small.out", Path(tmp) / "big.out"
        small = _callgrind(2000, extended, small_out)
        big = _callgrind(12000, extended, big_out)
        if profile:
            # Per function, the difference of the two runs: start-up and imports cancel out.
            before, after = _functions(small_out), _functions(big_out)
            diff = {k: (v - before.get(k, 0)) / 10000 for k, v in after.items()}
            print(f"{'per xact':>9}  function (self cost, the 10,000 extra transactions)")
            for name, per in sorted(diff.items(), key=lambda kv: -kv[1])[:45]:
                print(f"{per:9,.0f}  {name}")
    return (big - small) / 10000


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("mode", choices=["callgrind", "time", "run", "profile"])
    ap.add_argument("n", nargs="?", type=int, default=100_000)
    ap.add_argument("--extended", action="store_true")
    args = ap.parse_args()
    kind = "extended" if args.extended else "simple"
    if args.mode == "run":
        run(args.n, args.extended)
    elif args.mode == "callgrind":
        per = callgrind(args.extended)
        print(f"build={sidecar.build()} {kind}: {per:,.0f} instructions per transaction")
    elif args.mode == "profile":
        per = callgrind(args.extended, profile=True)
        print(f"build={sidecar.build()} {kind}: {per:,.0f} instructions per transaction")
    else:
        best = float("inf")
        for _ in range(5):
            t0 = time.perf_counter()
            run(args.n, args.extended)
            best = min(best, time.perf_counter() - t0)
        per_us = best / args.n * 1e6
        print(f"build={sidecar.build()} {kind}: {per_us:.2f} us per transaction (best of 5)")


if __name__ == "__main__":
    main()
