"""The demo's app: a small write/read workload through the sidecar, run by `bin/start-sidecar`.

The launcher has pointed DATABASE_URL (the leader) and FOLLOWER_URL (the followers' pool
endpoint) at the local proxy. Writer threads insert rows through DATABASE_URL; reader threads
read through FOLLOWER_URL and note which PostgreSQL instance answered (`inet_server_addr()`),
so the spread across followers is visible from the app's side too. Each thread keeps one client
connection for the whole run, as an app server's workers would; the proxy decides which server
connection, on which instance, runs each transaction.

Prints one summary line (and one line per follower that answered) at the end; exits 1 when any
transaction failed, 130 when interrupted (^C), 0 otherwise. With --hold it then prints
HOLDING_LINE and waits for SIGINT or SIGTERM before exiting (with the same status, except that
the signal that ends the hold is the expected way out, not an interruption), so the sidecar
keeps running around it.
"""

from __future__ import annotations

import argparse
import os
import random
import signal
import sys
import threading
import time
from collections import Counter

import psycopg

TABLE = "demo_events"
#: What --hold prints once the workload is done (scripts/demo.py watches for it).
HOLDING_LINE = "app: workload done; holding until SIGINT or SIGTERM"


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--seconds", type=float, default=15.0, help="how long to run")
    parser.add_argument("--writers", type=int, default=16, help="threads on DATABASE_URL")
    parser.add_argument("--readers", type=int, default=24, help="threads on FOLLOWER_URL")
    parser.add_argument(
        "--hold", action="store_true", help="after the workload, wait for SIGINT or SIGTERM"
    )
    return parser.parse_args(argv)


class Tally:
    """Counts shared by the worker threads."""

    def __init__(self) -> None:
        self.lock = threading.Lock()
        self.xacts: Counter[str] = Counter()
        self.errors: Counter[str] = Counter()
        self.by_instance: Counter[str] = Counter()
        self.first_error: str | None = None

    def ok(self, kind: str, instance: str | None = None) -> None:
        with self.lock:
            self.xacts[kind] += 1
            if instance is not None:
                self.by_instance[instance] += 1

    def failed(self, kind: str, error: BaseException) -> None:
        with self.lock:
            self.errors[kind] += 1
            if self.first_error is None:
                self.first_error = f"{kind}: {type(error).__name__}: {error}".strip()


def writer(url: str, stop: threading.Event, tally: Tally, seed: int) -> None:
    rng = random.Random(seed)
    try:
        conn = psycopg.connect(url, autocommit=True, connect_timeout=10)
    except psycopg.Error as e:
        tally.failed("write", e)
        return
    with conn:
        while not stop.is_set():
            try:
                # One short transaction of two statements, as a web request might do.
                with conn.transaction():
                    conn.execute(
                        f"INSERT INTO {TABLE} (worker, payload) VALUES (%s, %s)",
                        (seed, f"event {rng.randrange(10**6)}"),
                    )
                    conn.execute("SELECT pg_sleep(0.005)")
                tally.ok("write")
            except psycopg.Error as e:
                tally.failed("write", e)
                if conn.closed:
                    return
            stop.wait(rng.uniform(0.005, 0.03))  # think time between requests


def reader(url: str, stop: threading.Event, tally: Tally, seed: int) -> None:
    rng = random.Random(seed)
    try:
        conn = psycopg.connect(url, autocommit=True, connect_timeout=10)
    except psycopg.Error as e:
        tally.failed("read", e)
        return
    with conn:
        while not stop.is_set():
            try:
                # pg_sleep stands in for a slower query, so the readers need most of the pool
                # and the proxy has to spread server connections over the followers.
                row = conn.execute(
                    f"SELECT host(inet_server_addr()), pg_is_in_recovery(), count(*)"
                    f" FROM {TABLE}, pg_sleep(0.02)"
                ).fetchone()
                assert row is not None
                tally.ok("read", row[0] if row[1] else f"{row[0]} (NOT a follower!)")
            except psycopg.Error as e:
                tally.failed("read", e)
                if conn.closed:
                    return
            stop.wait(rng.uniform(0.005, 0.02))


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    leader_url = os.environ["DATABASE_URL"]
    follower_url = os.environ["FOLLOWER_URL"]
    stop = threading.Event()
    tally = Tally()
    threads = [
        threading.Thread(target=writer, args=(leader_url, stop, tally, i), name=f"writer-{i}")
        for i in range(args.writers)
    ] + [
        threading.Thread(target=reader, args=(follower_url, stop, tally, i), name=f"reader-{i}")
        for i in range(args.readers)
    ]
    print(
        f"app: {args.writers} writers on DATABASE_URL, {args.readers} readers on FOLLOWER_URL,"
        f" for {args.seconds:g}s",
        flush=True,
    )
    started = time.monotonic()
    interrupted = False
    try:
        for t in threads:
            t.start()
        stop.wait(args.seconds)
    except KeyboardInterrupt:
        interrupted = True
        print("app: interrupted, finishing the transactions in flight", flush=True)
    finally:
        stop.set()
        for t in threads:
            if t.is_alive():
                t.join()
    elapsed = time.monotonic() - started
    errors = sum(tally.errors.values())
    print(
        f"app: done in {elapsed:.1f}s: DATABASE_URL {tally.xacts['write']} write transactions,"
        f" FOLLOWER_URL {tally.xacts['read']} read transactions, errors={errors}",
        flush=True,
    )
    for instance, n in sorted(tally.by_instance.items()):
        print(f"app: reads answered by {instance}: {n}", flush=True)
    if tally.first_error is not None:
        print(f"app: first error: {tally.first_error}", flush=True)
    if args.hold and not interrupted:
        hold()
    if errors:
        return 1
    return 130 if interrupted else 0


def hold() -> None:
    """Wait, idle and without a connection, until SIGINT or SIGTERM arrives.

    Both are caught here (not left to KeyboardInterrupt or the default kill) so the app exits
    with its own status and bin/start-sidecar reports that, as it would for an app that stops
    cleanly on a signal. After the first, both are ignored: the same signal often comes twice
    (from the terminal or a process-group kill, and forwarded by bin/start-sidecar off
    Heroku), and the second must not turn a clean exit into an interrupted one. (Ignored, not
    handled: Python puts its own handlers back to the default while it exits, SIG_IGN it
    leaves alone.)
    """
    got: list[int] = []
    woken = threading.Event()

    def on_signal(signum: int, frame: object) -> None:
        got.append(signum)
        woken.set()
        for s in (signal.SIGINT, signal.SIGTERM):
            signal.signal(s, signal.SIG_IGN)

    for s in (signal.SIGINT, signal.SIGTERM):
        signal.signal(s, on_signal)
    print(HOLDING_LINE, flush=True)
    # A timeout, so the handler (which runs between bytecodes of this thread) gets its turn
    # even where a signal does not interrupt the wait.
    while not woken.wait(0.5):
        pass
    print(f"app: {signal.Signals(got[0]).name}, exiting", flush=True)


if __name__ == "__main__":
    sys.exit(main())
