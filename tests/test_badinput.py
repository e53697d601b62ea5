"""Bad input end to end: garbage on real sockets, and every way a login can be wrong.

Each connection sends what no driver would — random bytes, truncated and oversized lengths,
messages of the wrong type for its state, garbage after a good login — and must get a
well-formed ErrorResponse (08P01 for broken framing) or be closed, within a few seconds. The
proxy's log must never show an unhandled exception, and a well-behaved client keeps running
queries through it the whole time. The sans-IO readers have their own fuzz tests in
test_protocol_fuzz.py; here the whole proxy (asyncio glue, pool, upstream) is in the loop.
"""

from __future__ import annotations

import base64
import contextlib
import inspect
import re
import socket
import struct
import threading
import time
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field

import psycopg
import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st
from pgfixtures import (
    APP_PASSWORD,
    MD5_PASSWORD,
    PostgresServer,
    ProxyFactory,
    ProxyProcess,
    poll_until,
)
from tcpproxy import Message, PgWire, WireError, errors, rows

from sidecar.protocol import auth
from sidecar.protocol import messages as m

FUZZ = settings(
    max_examples=300,
    deadline=None,
    database=None,  # the suite must not write into the repository
    suppress_health_check=[HealthCheck.function_scoped_fixture, HealthCheck.too_slow],
)
#: What the proxy may answer before a login completes (PostgreSQL's codes for the same).
STARTUP_SQLSTATES = {"08P01", "0A000", "28000", "28P01", "3D000", "42601", "22023", "53300"}
#: Log text that means an exception escaped the proxy's own handling.
CRASH_MARKERS = (
    "Traceback",
    "Exception in callback",
    "Fatal error",
    "exception was never retrieved",
    "_bug",
    "janitor_error",
)


def assert_no_crash(proxy: ProxyProcess) -> None:
    text = proxy.log_text()
    for marker in CRASH_MARKERS:
        assert marker not in text, f"{marker!r} in the proxy log:\n{text[-5000:]}"


@dataclass
class Bystander:
    """A well-behaved client querying through the proxy in a thread while a test runs."""

    proxy: ProxyProcess
    queries: int = 0
    worst: float = 0.0
    failures: list[BaseException] = field(default_factory=list)
    _stop: threading.Event = field(default_factory=threading.Event)

    def run(self) -> None:
        try:
            with psycopg.connect(self.proxy.dsn(), autocommit=True) as conn:
                while not self._stop.is_set():
                    started = time.monotonic()
                    n = self.queries
                    row = conn.execute("SELECT %s::int * 2, %s::text", (n, f"q{n}")).fetchone()
                    assert row == (2 * n, f"q{n}"), row
                    self.worst = max(self.worst, time.monotonic() - started)
                    self.queries += 1
                    self._stop.wait(0.005)
        except BaseException as exc:  # reported by the test, not lost in the thread
            self.failures.append(exc)

    def check(self) -> None:
        assert not self.failures, f"the bystander failed: {self.failures[0]!r}"
        assert self.queries > 0
        assert self.worst < 5, f"a bystander query took {self.worst:.2f}s"


@pytest.fixture
def bystander(proxy: ProxyProcess) -> Iterator[Bystander]:
    with watching(proxy) as watcher:
        yield watcher


@contextlib.contextmanager
def watching(proxy: ProxyProcess) -> Iterator[Bystander]:
    """Run a Bystander through the block; check it at the end."""
    watcher = Bystander(proxy)
    thread = threading.Thread(target=watcher.run, daemon=True)
    thread.start()
    poll_until(lambda: watcher.queries or watcher.failures, what="the bystander's first query")
    try:
        yield watcher
    finally:
        watcher._stop.set()
        thread.join(15)
    watcher.check()


def leading_requests(data: bytes) -> list[bytes]:
    """The SSL/GSSENC requests that open `data` and are answered by one byte: each kind
    once, as PostgreSQL does (a repeat is an error); nothing after an SSLRequest, whose "S"
    makes the rest a TLS handshake."""
    seen: list[bytes] = []
    while (packet := data[len(seen) * 8 : len(seen) * 8 + 8]) in (
        m.ssl_request(),
        _gssenc_request(),
    ):
        if packet in seen:
            break
        seen.append(packet)
        if packet == m.ssl_request():
            break
    return seen


def _gssenc_request() -> bytes:
    return struct.pack("!ii", 8, m.GSSENC_REQUEST_CODE)


def exchange(proxy: ProxyProcess, data: bytes, *, after_login: bool = False) -> list[Message]:
    """Send `data` on a new connection (logged in first if asked), half-close, and return what
    the proxy says until it closes. Fails if it neither answers nor closes in 10 s, or if it
    sends anything but whole backend messages."""
    with PgWire.connect(proxy.host, proxy.port) as wire:
        if after_login:
            answer = wire.login("app", APP_PASSWORD, "appdb")
            assert not errors(answer), answer
        with contextlib.suppress(BrokenPipeError, ConnectionResetError):
            wire.send(data)  # it may hang up before the last bytes
        wire.half_close()
        if not after_login:
            for packet in leading_requests(data):
                # TLS is offered on TCP (SIDECAR_CLIENT_TLS=allow), GSSAPI encryption is not.
                answer = wire.recv_byte(10)
                assert answer == (b"S" if packet == m.ssl_request() else b"N"), answer
        return wire.until_closed(10)


def check_answer(answer: list[Message], allowed: set[str] | None) -> None:
    """Every ErrorResponse well formed (and its code allowed); the proxy then closed."""
    for typ, body in answer:
        if typ != m.ERROR_RESPONSE:
            continue
        fields = m.parse_error_fields(body)
        assert fields.get("S") in ("ERROR", "FATAL"), fields
        assert re.fullmatch(r"[0-9A-Z]{5}", fields.get("C", "")), fields
        assert fields.get("M"), fields
        if allowed is not None:
            assert fields["C"] in allowed, fields


# --- strategies -----------------------------------------------------------------------------

lengths = st.one_of(
    st.integers(-(2**31), 2**31 - 1),
    st.sampled_from(
        [-1, 0, 3, 4, 7, 8, 9, 10_000, 10_001, 10_004, 10_005, 2**30, 2**30 + 1, 2**31 - 1]
    ),
)


@st.composite
def startup_garbage(draw: st.DrawFn) -> bytes:
    """Bytes a client might open with: random, a startup packet with a wrong length or
    version or body, SSL/GSSENC requests, cancel requests — cut anywhere."""
    kind = draw(st.sampled_from(["random", "framed", "startup", "requests"]))
    if kind == "random":
        return draw(st.binary(min_size=1, max_size=600))
    if kind == "framed":
        body = draw(st.binary(max_size=300))
        data = struct.pack("!i", draw(lengths)) + body
    elif kind == "startup":
        params = draw(
            st.dictionaries(
                st.sampled_from(["user", "database", "options", "application_name", "x", ""]),
                st.sampled_from(["app", "appdb", "nope", "", "-c x", "-c work_mem=64kB", "é"]),
                max_size=4,
            )
        )
        packet = bytearray(m.startup_message(params))
        if draw(st.booleans()):  # another protocol version
            packet[4:8] = struct.pack("!i", draw(st.integers(0, 2**31 - 1)))
        for _ in range(draw(st.integers(0, 2))):  # flip a byte
            packet[draw(st.integers(0, len(packet) - 1))] = draw(st.integers(0, 255))
        data = bytes(packet)
    else:
        choices = [m.ssl_request(), _gssenc_request(), m.cancel_request(1, 2)]
        parts = draw(st.lists(st.sampled_from(choices), min_size=1, max_size=3))
        data = b"".join(parts) + draw(st.binary(max_size=40))
    return data[: draw(st.integers(1, len(data)))] if draw(st.booleans()) else data


@st.composite
def session_garbage(draw: st.DrawFn) -> bytes:
    """What a logged-in client might send: random bytes, messages of any type with random
    bodies, bad lengths, and valid messages cut short."""
    parts = []
    for _ in range(draw(st.integers(1, 4))):
        kind = draw(st.sampled_from(["random", "message", "length", "cut"]))
        if kind == "random":
            parts.append(draw(st.binary(min_size=1, max_size=200)))
        elif kind == "message":
            typ = draw(st.sampled_from(b"QPBEDCSHFdcfXpZ?\x00\xff"))
            parts.append(m.message(bytes([typ]), draw(st.binary(max_size=120))))
        elif kind == "length":
            typ = draw(st.sampled_from(b"QPBEDSdp"))
            parts.append(bytes([typ]) + struct.pack("!i", draw(lengths)) + b"x" * 8)
        else:
            valid = m.query("SELECT 1") + m.message(b"P", b"\x00SELECT 1\x00\x00\x00")
            parts.append(valid[: draw(st.integers(1, len(valid) - 1))])
    return b"".join(parts)


# --- fuzz -------------------------------------------------------------------------------------


def test_fuzz_before_login(proxy: ProxyProcess, bystander: Bystander) -> None:
    sent: list[bytes] = []

    @FUZZ
    @given(data=startup_garbage())
    def case(data: bytes) -> None:
        sent.append(data)
        check_answer(exchange(proxy, data), STARTUP_SQLSTATES)

    case()
    assert len(sent) >= 100, len(sent)
    assert_no_crash(proxy)


def test_fuzz_after_login(proxy: ProxyProcess) -> None:
    # Well-framed messages reach PostgreSQL, whose errors pass through (any SQLSTATE, but
    # well formed); broken framing is the proxy's to answer.
    fuzz_after_login(proxy)


def test_fuzz_after_login_leaves_other_clients_alone(proxy: ProxyProcess) -> None:
    with watching(proxy):
        fuzz_after_login(proxy)


def fuzz_after_login(proxy: ProxyProcess) -> None:
    sent: list[bytes] = []

    @FUZZ
    @given(data=session_garbage())
    def case(data: bytes) -> None:
        sent.append(data)
        check_answer(exchange(proxy, data, after_login=True), None)

    case()
    assert len(sent) >= 100, len(sent)
    assert_no_crash(proxy)
    assert_pool_clean(proxy)


def assert_pool_clean(proxy: ProxyProcess) -> None:
    """Once the fuzzed clients are gone, no server is left busy or lost to them."""

    def settled() -> dict[str, object] | None:
        [pool] = [p for p in proxy.show("POOLS") if p["database"] == "appdb"]
        # the bystander may hold one server at any moment
        ok = int(pool["cl_waiting"]) == 0 and int(pool["sv_active"]) <= 1
        return pool if ok else None

    poll_until(settled, timeout=15, what="the pool to settle")


# --- chosen cases -----------------------------------------------------------------------------


def fatal_codes(answer: list[Message]) -> list[str]:
    return [e["C"] for e in errors(answer) if e.get("S") == "FATAL"]


@pytest.mark.parametrize(
    "data",
    [
        pytest.param(struct.pack("!i", 10_005) + b"\x00" * 10_004, id="startup-over-10kB"),
        pytest.param(struct.pack("!ii", 20_000, m.PROTOCOL_V3) + b"user\x00" * 3000, id="20kB"),
        pytest.param(struct.pack("!i", -8) + b"\x00" * 8, id="negative-length"),
        pytest.param(struct.pack("!i", 2**30 + 1) + b"\x00" * 8, id="over-1GB"),
        pytest.param(b"GET / HTTP/1.1\r\nHost: localhost\r\n\r\n", id="http"),
        pytest.param(
            b"\x16\x03\x01\x02\x00\x01\x00\x01\xfc\x03\x03" + b"\x00" * 40, id="tls-hello"
        ),
        # Typed messages where the startup packet belongs: a driver closing a connection it
        # had not started (node-postgres connect() then end()), or one that skipped it.
        pytest.param(m.TERMINATE_MSG, id="terminate"),
        pytest.param(m.query("SELECT 1"), id="query"),
        pytest.param(struct.pack("!iii", 12, m.CANCEL_REQUEST_CODE, 1), id="short-cancel"),
    ],
)
def test_bad_startup_packet(pg: PostgresServer, proxy: ProxyProcess, data: bytes) -> None:
    """As PostgreSQL: "invalid length of startup packet" is logged, and the connection
    closed without an ErrorResponse (a driver would report it on a connection the app itself
    was closing). Checked against PostgreSQL directly, then the proxy."""
    for host, port in ((pg.host, pg.port), (proxy.host, proxy.port)):
        with PgWire.connect(host, port) as wire:
            with contextlib.suppress(BrokenPipeError, ConnectionResetError):
                wire.send(data)
            # no half-close: the server must hang up on its own
            try:
                answer = wire.until_closed(10)
            except ConnectionResetError:  # closed with our bytes unread: a reset, no answer
                answer = []
        assert answer == [], (port, answer)
    poll_until(
        lambda: 'reason="protocol violation: invalid length of startup packet"' in proxy.log_text(),
        what="the reason logged",
    )
    assert_no_crash(proxy)


def test_unsupported_protocol_version(proxy: ProxyProcess) -> None:
    packet = struct.pack("!ii", 9, 2 << 16) + b"\x00"
    with PgWire.connect(proxy.host, proxy.port) as wire:
        wire.send(packet)
        assert fatal_codes(wire.until_closed(10)) == ["0A000"]


@pytest.mark.parametrize(
    "data",
    [
        pytest.param(b"Q" + struct.pack("!i", -1), id="negative-length"),
        pytest.param(b"Q" + struct.pack("!i", 3), id="length-3"),
        pytest.param(b"Q" + struct.pack("!i", 2**30 + 1) + b"SELECT", id="over-1GB"),
        pytest.param(b"d" + struct.pack("!i", 2**31 - 1) + b"xxxx", id="copydata-2GB"),
        pytest.param(b"\xff" * 64, id="all-ones"),
    ],
)
def test_bad_length_after_login(proxy: ProxyProcess, bystander: Bystander, data: bytes) -> None:
    with PgWire.connect(proxy.host, proxy.port) as wire:
        assert not errors(wire.login("app", APP_PASSWORD, "appdb"))
        wire.send(data)
        answer = wire.until_closed(10)
    assert fatal_codes(answer) == ["08P01"], answer
    assert_no_crash(proxy)


@pytest.mark.parametrize(
    "message",
    [
        pytest.param(m.query("SELECT 1"), id="query"),
        pytest.param(m.SYNC_MSG, id="sync"),
        pytest.param(m.message(b"Z", b"I"), id="backend-type"),
        pytest.param(m.TERMINATE_MSG, id="terminate"),
    ],
)
def test_wrong_message_during_authentication(proxy: ProxyProcess, message: bytes) -> None:
    with PgWire.connect(proxy.host, proxy.port) as wire:
        wire.startup("app", "appdb")
        typ, body = wire.recv()
        assert typ == m.AUTHENTICATION and m.parse_auth_request(body)[0] == m.AUTH_SASL
        wire.send(message)
        answer = wire.until_closed(10)
    if message == m.TERMINATE_MSG:
        return  # a client leaving mid-login may be closed without a word
    assert fatal_codes(answer) == ["08P01"], answer
    assert_no_crash(proxy)


def test_unknown_message_type_after_login(proxy: ProxyProcess, bystander: Bystander) -> None:
    # PostgreSQL's answer, from the proxy: the message never reaches a server
    with PgWire.connect(proxy.host, proxy.port) as wire:
        assert not errors(wire.login("app", APP_PASSWORD, "appdb"))
        wire.send(m.message(b"?", b"hello"))
        answer = wire.until_closed(10)
    assert fatal_codes(answer) == ["08P01"], answer
    with PgWire.connect(proxy.host, proxy.port) as wire:
        assert not errors(wire.login("app", APP_PASSWORD, "appdb"))
        assert rows(wire.query("SELECT 'still here'")) == [["still here"]]
    assert_no_crash(proxy)


def test_garbage_to_the_admin_console(proxy: ProxyProcess) -> None:
    for data in (
        b"\x00" * 16,
        m.message(b"P", b"\xff\xfe"),
        m.message(b"B", b"\x00\x00\x00\x05"),
        m.message(b"Q", b"SHOW \xff\x00"),
        b"Q" + struct.pack("!i", -5),
    ):
        with PgWire.connect(proxy.host, proxy.port) as wire:
            assert not errors(wire.login("app", APP_PASSWORD, "sidecar"))
            wire.send(data)
            wire.half_close()
            check_answer(wire.until_closed(10), None)
    assert_no_crash(proxy)


def answer_to_many_ssl_requests(proxy: ProxyProcess) -> bytes:
    """What comes back, up to the close, for 3000 SSLRequests in one packet."""
    with PgWire.connect(proxy.host, proxy.port) as wire:
        wire.send(m.ssl_request() * 3000)
        wire.half_close()
        data = b""
        with pytest.raises(WireError):
            while True:
                data += wire.recv_byte(10)
    return data


def test_many_ssl_requests_in_one_packet(proxy: ProxyProcess) -> None:
    data = answer_to_many_ssl_requests(proxy)
    # PostgreSQL answers "S", then refuses what came before the handshake unencrypted
    # ("received unencrypted data after SSL request"): the proxy closes at once.
    assert data == b"S"
    assert_no_crash(proxy)
    poll_until(
        lambda: "received unencrypted data after SSL request" in proxy.log_text(),
        what="the refusal logged",
    )


def test_many_ssl_requests_in_one_packet_tls_off(proxy_factory: ProxyFactory) -> None:
    proxy = proxy_factory(SIDECAR_CLIENT_TLS="off")
    data = answer_to_many_ssl_requests(proxy)
    # PostgreSQL answers one SSLRequest; a second one is an unsupported protocol (0A000)
    assert data.startswith(b"N")
    assert b"0A000" in data or b"08P01" in data, data[:100]
    assert_no_crash(proxy)


# --- authentication ---------------------------------------------------------------------------


def _login_error(
    proxy: ProxyProcess,
    user: str = "app",
    password: str = APP_PASSWORD,
    database: str = "appdb",
    **kwargs: object,
) -> dict[str, str]:
    with PgWire.connect(proxy.host, proxy.port) as wire:
        answer = wire.login(user, password, database, **kwargs)  # type: ignore[arg-type]
        answer += wire.until_closed(10)
    [error] = errors(answer)
    assert error["S"] == "FATAL", error
    return error


def _flip_proof(final: bytes) -> bytes:
    head, _, proof = final.rpartition(b",p=")
    raw = bytearray(base64.b64decode(proof))
    raw[0] ^= 1
    return head + b",p=" + base64.b64encode(bytes(raw))


def _other_nonce(final: bytes) -> bytes:
    parts = final.split(b",")
    parts[1] = parts[1][:-2] + (b"AA" if not parts[1].endswith(b"AA") else b"BB")
    return b",".join(parts)


def test_authentication_failures(proxy: ProxyProcess) -> None:
    failed = 'password authentication failed for user "{}"'
    cases = {
        "wrong password": _login_error(proxy, password="not-it"),
        "unknown user": _login_error(proxy, user="mallory", password="whatever"),
        "tampered proof": _login_error(proxy, tamper=_flip_proof),
        "tampered nonce": _login_error(proxy, tamper=_other_nonce),
        "no proof": _login_error(proxy, tamper=lambda f: f.rpartition(b",p=")[0]),
    }
    for what, error in cases.items():
        user = "mallory" if what == "unknown user" else "app"
        assert error["C"] == "28P01", (what, error)
        assert error["M"] == failed.format(user), (what, error)
        # nothing that helps an attacker: no detail, no hint, no sign of which part was wrong
        assert set(error) <= {"S", "V", "C", "M"}, (what, error)

    unknown_db = _login_error(proxy, database="nosuchdb")
    assert unknown_db["C"] == "3D000" and unknown_db["M"] == 'database "nosuchdb" does not exist'

    log = proxy.log_text()
    assert log.count("at=auth_failed") == len(cases), log
    assert "user=mallory" in log  # who tried is logged; what they sent is not
    assert "not-it" not in log and "whatever" not in log


def test_md5_answer_when_scram_is_required(proxy: ProxyProcess) -> None:
    with PgWire.connect(proxy.host, proxy.port) as wire:
        wire.startup("app", "appdb")
        _, body = wire.recv()
        assert m.parse_auth_request(body)[0] == m.AUTH_SASL
        # a client that would downgrade: an md5 PasswordMessage instead of SASLInitialResponse
        md5 = auth.md5_password_response("app", APP_PASSWORD, b"\x01\x02\x03\x04")
        wire.send(m.password_message(md5 + b"\x00"))
        answer = wire.until_closed(10)
    [error] = errors(answer)
    assert error["C"] == "28P01" and set(error) <= {"S", "V", "C", "M"}, error
    assert not any(typ == m.AUTHENTICATION for typ, _ in answer), "it must not log the client in"


def _flip_last_hex_digit(answer: bytes) -> bytes:
    # Always a different digit: a fixed b"0" was the right answer one time in 16 (random salt).
    return answer[:-1] + (b"1" if answer.endswith(b"0") else b"0")


def test_md5_client_auth(proxy_factory: ProxyFactory) -> None:
    proxy = proxy_factory(SIDECAR_AUTH_TYPE="md5")
    with PgWire.connect(proxy.host, proxy.port) as wire:
        assert not errors(wire.login("app", APP_PASSWORD, "appdb"))
    wrong = _login_error(proxy, tamper=_flip_last_hex_digit)
    assert wrong["C"] == "28P01"
    other = _login_error(proxy, user="md5user", password=MD5_PASSWORD)
    assert other["C"] == "28P01"  # md5user is not this pool's user


def test_password_checks_are_constant_time() -> None:
    # What compares secrets must be hmac.compare_digest, never ==.
    for func in (
        auth.verify_md5_response,
        auth.ScramServer._client_final,
        auth.ScramClient._server_final,
    ):
        source = inspect.getsource(func)
        assert "hmac.compare_digest(" in source, func.__qualname__
        compared = re.findall(r"(\S+)\s*[!=]=\s*(\S+)", source)
        values = [c for c in compared if not c[0].startswith("len(")]  # lengths are public
        secrets = [c for c in values if any(k in "".join(c) for k in ("key", "proof", "sig"))]
        assert not secrets, (func.__qualname__, secrets)


def test_login_with_a_cut_connection(proxy: ProxyProcess) -> None:
    # Clients that go away at each step of the login leave nothing behind.
    for cut in range(1, 6):
        with PgWire.connect(proxy.host, proxy.port) as wire:
            if cut >= 2:
                wire.startup("app", "appdb")
                wire.recv()
            if cut >= 3:
                scram = auth.ScramClient(APP_PASSWORD)
                wire.send(m.sasl_initial_response("SCRAM-SHA-256", scram.client_first()))
            if cut >= 4:
                _, body = wire.recv()
                final = scram.handle_server_first(m.parse_auth_request(body)[1])
                wire.send(m.password_message(final)[: len(final) // 2 if cut == 4 else None])
            if cut == 5:
                wire.recv()
            wire.sock.shutdown(socket.SHUT_RDWR)
    with PgWire.connect(proxy.host, proxy.port) as wire:
        assert not errors(wire.login("app", APP_PASSWORD, "appdb"))
        assert rows(wire.query("SELECT 1")) == [["1"]]
    assert_no_crash(proxy)


@pytest.mark.parametrize(
    "prefix",
    [
        pytest.param(m.message(b"P", b"s1\x00SELECT 1\x00\x00\x00") + m.SYNC_MSG, id="parse-sync"),
        pytest.param(m.message(b"P", b"s1\x00SELECT 1\x00\x00\x00"), id="parse"),
        pytest.param(m.query("SELECT 1"), id="query"),
    ],
)
def test_garbage_after_good_messages_leaves_the_server_in_step(
    proxy_factory: ProxyFactory, prefix: bytes
) -> None:
    # One chunk: good messages, then a broken length. The good part is never sent; the one
    # server must not carry bookkeeping for it to the next client, which prepares statements.
    def misbehave(wire: PgWire) -> None:
        wire.send(prefix + b"Q" + struct.pack("!i", -1))
        assert fatal_codes(wire.until_closed(10)) == ["08P01"]

    each_followed_by_a_good_client(proxy_factory(SIDECAR_DEFAULT_POOL_SIZE=1), misbehave)


def each_followed_by_a_good_client(
    proxy: ProxyProcess, misbehave: Callable[[PgWire], None]
) -> None:
    """Three clients in turn log in and `misbehave` on the proxy's one server, each followed by
    a client that prepares statements there and must get its rows."""
    for _ in range(3):
        with PgWire.connect(proxy.host, proxy.port) as wire:
            assert not errors(wire.login("app", APP_PASSWORD, "appdb"))
            misbehave(wire)
        next_client_prepares_and_gets_its_rows(proxy)
    assert_no_crash(proxy)


def next_client_prepares_and_gets_its_rows(proxy: ProxyProcess) -> None:
    """A well-behaved client on the (only) server the misbehaving one left: every statement
    prepared (prepare_threshold=0), so any bookkeeping left out of step shows."""
    with psycopg.connect(proxy.dsn(), autocommit=True, prepare_threshold=0) as conn:
        for n in range(5):
            row = conn.execute("SELECT %s::int * 2, %s::text", (n, f"q{n}")).fetchone()
            assert row == (2 * n, f"q{n}")


@pytest.mark.parametrize(
    "data",
    [
        pytest.param(m.message(b"H", b"-") + m.message(b"d", b"x"), id="bad-flush-copydata"),
        pytest.param(m.message(b"D", b"") + m.message(b"c", b""), id="bad-describe-copydone"),
        pytest.param(
            m.message(b"E", b"nope\x00\x00\x00\x00\x00") + m.message(b"f", b"x\x00"),
            id="bad-execute-copyfail",
        ),
    ],
)
def test_error_without_sync_then_leaving_leaves_the_server_in_step(
    proxy_factory: ProxyFactory, data: bytes
) -> None:
    # PostgreSQL answers the first message with an error and then skips everything up to a
    # Sync; the copy message after it changes nothing. A server left like that must not
    # serve the next client, whose queries it would silently skip.
    each_followed_by_a_good_client(
        proxy_factory(SIDECAR_DEFAULT_POOL_SIZE=1), lambda wire: wire.send(data)
    )


# --- client_login_timeout -----------------------------------------------------------------------


def _half_login(wire: PgWire, stage: str) -> None:
    """Go as far as `stage` in a login, then fall silent (the socket stays open)."""
    if stage == "connected":
        return
    if stage == "tls-handshake":
        wire.send(m.ssl_request())
        assert wire.recv_byte(10) == b"S"
        return
    wire.startup("app", "appdb")
    typ, body = wire.recv(10)
    assert typ == m.AUTHENTICATION and m.parse_auth_request(body)[0] == m.AUTH_SASL
    if stage == "mid-scram":
        # as node-postgres does on an empty password: it gives up half-way, socket open
        scram = auth.ScramClient(APP_PASSWORD)
        wire.send(m.sasl_initial_response("SCRAM-SHA-256", scram.client_first()))
        typ, body = wire.recv(10)
        assert m.parse_auth_request(body)[0] == m.AUTH_SASL_CONTINUE


@pytest.mark.parametrize(
    ("stage", "state"),
    [
        ("connected", "startup"),
        ("tls-handshake", "startup"),
        ("sasl-offered", "auth"),
        ("mid-scram", "auth"),
    ],
)
def test_client_login_timeout_closes_a_half_login(
    proxy_factory: ProxyFactory, stage: str, state: str
) -> None:
    """Not logged in SIDECAR_CLIENT_LOGIN_TIMEOUT after connecting: closed without a word (as
    PostgreSQL on authentication_timeout), with the reason logged; a logged-in client idle for
    longer is not touched."""
    proxy = proxy_factory(SIDECAR_CLIENT_LOGIN_TIMEOUT="1")
    with psycopg.connect(proxy.dsn(), autocommit=True) as settled:
        started = time.monotonic()
        with PgWire.connect(proxy.host, proxy.port) as wire:
            _half_login(wire, stage)
            assert wire.until_closed(15) == []
        assert time.monotonic() - started >= 1.0
        poll_until(
            lambda: f'reason="client_login_timeout (1s) in {state}"' in proxy.log_text(),
            what="the reason logged",
        )
        assert settled.execute("select 1").fetchone() == (1,)
    assert_no_crash(proxy)


def test_client_login_timeout_from_pgbouncer_var(proxy_factory: ProxyFactory) -> None:
    proxy = proxy_factory(PGBOUNCER_CLIENT_LOGIN_TIMEOUT="1")
    with PgWire.connect(proxy.host, proxy.port) as wire:
        assert wire.until_closed(15) == []
    poll_until(lambda: "client_login_timeout (1s)" in proxy.log_text(), what="the reason")


def test_incomplete_startup_packet_is_logged(proxy: ProxyProcess) -> None:
    """Gone half-way through its first packet: PostgreSQL logs "incomplete startup packet"."""
    packet = m.startup_message({"user": "app", "database": "appdb"})
    with PgWire.connect(proxy.host, proxy.port) as wire:
        wire.send(packet[:10])
    poll_until(lambda: 'reason="incomplete startup packet"' in proxy.log_text(), what="the reason")
    # and a port probe (connect, close) is still not logged
    with socket.create_connection((proxy.host, proxy.port), 10):
        pass
    assert proxy.log_text().count("at=disconnect") == 1
