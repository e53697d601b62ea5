"""Property tests for the sans-IO protocol core: random bytes and random chunkings, fed to the
readers and parsers of sidecar.protocol.messages and to the data path's stream walkers
(protocol.frontend.Frontend, protocol.backend.Backend).

Whatever a peer sends, the only exception the sans-IO core may raise is ProtocolError, and how
the bytes happen to be split into chunks never changes what it reports or forwards.
"""

from __future__ import annotations

import contextlib
import itertools
import struct
from collections.abc import Callable
from dataclasses import dataclass

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from sidecar.protocol import messages as m
from sidecar.protocol.backend import Backend
from sidecar.protocol.errors import PROTOCOL_VIOLATION, ProtocolError
from sidecar.protocol.frontend import Frontend
from sidecar.protocol.statements import Registry, ServerStatements, Special

Event = tuple[int, bytes]

# No example database: the suite must not write into the repository.
FUZZ = settings(max_examples=300, deadline=None, database=None)

message_lists = st.lists(st.tuples(st.integers(0, 255), st.binary(max_size=300)), max_size=20)


def encode(msgs: list[Event]) -> bytes:
    return b"".join(bytes([t]) + struct.pack("!i", len(b) + 4) + b for t, b in msgs)


@st.composite
def damaged(draw: st.DrawFn, streams: st.SearchStrategy[bytes]) -> bytes:
    """A valid stream with a few bytes overwritten and maybe cut short: mostly sane headers,
    so the readers get deep into the stream before anything goes wrong."""
    data = bytearray(draw(streams))
    if data:
        for _ in range(draw(st.integers(0, 3))):
            data[draw(st.integers(0, len(data) - 1))] = draw(st.integers(0, 255))
        data = data[: draw(st.integers(0, len(data)))]
    return bytes(data)


damaged_streams = damaged(message_lists.map(encode))
garbage = st.one_of(st.binary(max_size=600), damaged_streams)


def split(data: bytes, cuts: list[int]) -> list[bytes]:
    points = [0, *sorted(cuts), len(data)]
    return [data[a:b] for a, b in itertools.pairwise(points)]


def chunkings(data: bytes) -> st.SearchStrategy[list[bytes]]:
    return st.lists(st.integers(0, len(data)), max_size=30).map(lambda cuts: split(data, cuts))


def drain(reader: m.MessageReader) -> list[Event]:
    out: list[Event] = []
    while (msg := reader.next()) is not None:
        out.append(msg)
    return out


# ---------------------------------------------------------------------------
# Random bytes: nothing but ProtocolError escapes


@FUZZ
@given(raw=garbage, data=st.data())
def test_message_reader_random_bytes(raw: bytes, data: st.DataObject) -> None:
    """Messages come out exactly as framed in the input, each as soon as its last byte is in,
    and a ProtocolError is the only way out."""
    reader = m.MessageReader(max_length=data.draw(st.sampled_from([m.MAX_MESSAGE_LENGTH, 64])))
    got: list[Event] = []
    fed = 0
    try:
        for chunk in data.draw(chunkings(raw)):
            fed += len(chunk)
            reader.feed(chunk)
            got += drain(reader)
            assert all(type(body) is bytes for _, body in got)
    except ProtocolError as exc:
        assert exc.sqlstate == PROTOCOL_VIOLATION
        return
    consumed = len(encode(got))
    assert encode(got) == raw[:consumed]
    assert reader.take_rest() == raw[consumed:fed]


@FUZZ
@given(
    raw=st.one_of(st.binary(max_size=300), st.binary(max_size=40).map(lambda b: b"\x00\x00" + b)),
    data=st.data(),
)
def test_startup_reader_random_bytes(raw: bytes, data: st.DataObject) -> None:
    reader = m.StartupReader()
    try:
        for chunk in data.draw(chunkings(raw)):
            pending = chunk
            while True:
                event, pending = reader.feed(pending)
                if event is None or not pending:
                    break
    except ProtocolError:
        pass


PARSERS: list[Callable[[bytes], object]] = [
    m.parse_auth_request,
    m.parse_sasl_mechanisms,
    m.parse_sasl_initial_response,
    m.parse_parameter_status,
    m.parse_error_fields,
    m.parse_backend_key,
    m.parse_startup_packet,
]


@pytest.mark.parametrize("parse", PARSERS, ids=lambda f: f.__name__)
@FUZZ
@given(raw=st.binary(max_size=200))
def test_parsers_random_bytes(parse: Callable[[bytes], object], raw: bytes) -> None:
    with contextlib.suppress(ProtocolError):
        parse(raw)


def reference_startup_params(body: bytes) -> dict[bytes, bytes] | None:
    """PostgreSQL's own reading of the parameter list (ProcessStartupPacket): name/value pairs
    until an empty name, which must be the packet's last byte; None where it says "invalid
    startup packet layout"."""
    params: dict[bytes, bytes] = {}
    offset = 0
    while offset < len(body):
        name_end = body.find(b"\x00", offset)
        if name_end == offset:
            break  # the terminator
        if name_end < 0 or name_end + 1 >= len(body):
            return None  # missing value
        value_end = body.find(b"\x00", name_end + 1)
        if value_end < 0:
            return None
        params[body[offset:name_end]] = body[name_end + 1 : value_end]
        offset = value_end + 1
    return params if offset == len(body) - 1 else None


# Near-valid parameter lists: a few plausible strings joined by NULs, some trailing NULs.
param_lists = st.tuples(
    st.lists(st.sampled_from([b"user", b"bob", b"database", b"", b"x", b"\xc3\xa9", b"\xff"])),
    st.integers(0, 2),
).map(lambda t: b"\x00".join(t[0]) + b"\x00" * t[1])


@FUZZ
@given(body=st.one_of(param_lists, st.binary(max_size=60)))
def test_parse_startup_params_like_postgres(body: bytes) -> None:
    """Accepted exactly when PostgreSQL would accept the layout (plus valid UTF-8 in every
    string, a repeated key's overridden value too, and a user), with the same parameters."""
    packet = struct.pack("!ii", len(body) + 8, m.PROTOCOL_V3) + body
    expected = reference_startup_params(body)
    if expected is not None:
        try:
            for part in body.split(b"\x00"):
                part.decode()
            decoded = {k.decode(): v.decode() for k, v in expected.items()}
        except UnicodeDecodeError:
            expected = None
        else:
            if not decoded.get("user"):
                expected = None
    if expected is None:
        with pytest.raises(ProtocolError):
            m.parse_startup_packet(packet)
    else:
        assert m.parse_startup_packet(packet) == m.StartupMessage(decoded)


# ---------------------------------------------------------------------------
# Valid streams: chunking changes nothing


@FUZZ
@given(msgs=message_lists, data=st.data())
def test_message_reader_chunking_never_changes_events(
    msgs: list[Event], data: st.DataObject
) -> None:
    """Same messages however the stream is cut, each handed over with the chunk that ends it."""
    stream = encode(msgs)
    boundaries = [0]
    for _, body in msgs:
        boundaries.append(boundaries[-1] + 5 + len(body))
    reader = m.MessageReader()
    got: list[Event] = []
    fed = 0
    for chunk in data.draw(chunkings(stream)):
        fed += len(chunk)
        reader.feed(chunk)
        got += drain(reader)
        assert len(encode(got)) == max(b for b in boundaries if b <= fed)
    assert got == msgs
    assert reader.take_rest() == b""


startup_text = st.text(st.characters(codec="utf-8", exclude_characters="\x00"), max_size=12)
startup_packets = st.one_of(
    st.just((m.ssl_request(), m.SSLRequest())),
    st.just((struct.pack("!ii", 8, m.GSSENC_REQUEST_CODE), m.GSSENCRequest())),
    st.builds(
        lambda pid, secret: (m.cancel_request(pid, secret), m.CancelRequest(pid, secret)),
        st.integers(-(2**31), 2**31 - 1),
        st.integers(-(2**31), 2**31 - 1),
    ),
    st.builds(
        lambda user, extra: (
            m.startup_message({"user": user, **extra}),
            m.StartupMessage({"user": user, **extra}),
        ),
        startup_text.filter(bool),
        st.dictionaries(startup_text.filter(bool).filter(lambda k: k != "user"), startup_text),
    ),
)


@FUZZ
@given(packets=st.lists(startup_packets, min_size=1, max_size=4), data=st.data())
def test_startup_reader_chunking_never_changes_events(
    packets: list[tuple[bytes, m.StartupEvent]], data: st.DataObject
) -> None:
    stream = b"".join(p for p, _ in packets)
    reader = m.StartupReader()
    events: list[m.StartupEvent] = []
    for chunk in data.draw(chunkings(stream)):
        pending = chunk
        while True:
            event, pending = reader.feed(pending)
            if event is None:
                break
            events.append(event)
            if not pending:
                break
    assert events == [e for _, e in packets]


# ---------------------------------------------------------------------------
# Bad lengths: always a ProtocolError, never a wait for 2 GB


bad_lengths = st.one_of(st.integers(-(2**31), 3), st.integers(m.MAX_MESSAGE_LENGTH + 1, 2**31 - 1))


@FUZZ
@given(msgs=message_lists, typ=st.integers(0, 255), length=bad_lengths, data=st.data())
def test_bad_message_length_always_rejected(
    msgs: list[Event], typ: int, length: int, data: st.DataObject
) -> None:
    stream = encode(msgs) + bytes([typ]) + struct.pack("!i", length)
    reader = m.MessageReader()
    with pytest.raises(ProtocolError) as err:
        for chunk in data.draw(chunkings(stream)):
            reader.feed(chunk)
            drain(reader)
    assert err.value.sqlstate == PROTOCOL_VIOLATION


@FUZZ
@given(
    length=st.one_of(st.integers(-(2**31), 7), st.integers(m.MAX_STARTUP_LENGTH + 1, 2**31 - 1)),
    tail=st.binary(max_size=20),
    data=st.data(),
)
def test_bad_startup_length_always_rejected(length: int, tail: bytes, data: st.DataObject) -> None:
    reader = m.StartupReader()
    with pytest.raises(ProtocolError) as err:
        for chunk in data.draw(chunkings(struct.pack("!i", length) + tail)):
            reader.feed(chunk)
    assert err.value.sqlstate == PROTOCOL_VIOLATION


# ===========================================================================
# The data path: the stream walkers Frontend (client to server) and Backend (server to client)
#
# Random input is checked against a reference reading of the whole input (`Frame`s), written
# from the protocol: where each message starts and ends, and how many bytes a walker needs
# before it acts on it (the 5-byte header, or the whole message for the types it holds back).
# From that follows what the walker must have forwarded after any prefix of the input, and in
# which feed it must count a request, stop at a Terminate, cut a FATAL or raise.

WALKERS = settings(max_examples=200, deadline=None, database=None)
#: The length and type checks come before anything else a walker does: fewer examples do.
REJECTS = settings(max_examples=100, deadline=None, database=None)

_I = ord("I")
_X = ord("X")
#: Every message type a logged-in client may send (PostgreSQL closes the session on others).
FRONTEND_TYPES = b"BCDEFHPQSXcdf"
#: Held back whole by Frontend(inspect=True) (transaction mode): their bodies are read.
FRONTEND_HELD = b"QPBDC"
#: Extended-protocol messages: the batch stays open until a Sync (or a Query, FunctionCall).
EXTENDED = b"PBCDEH"
COPY = b"dcf"
REQUESTS = b"QSF"
#: Held back whole by Backend: ReadyForQuery, ParameterStatus, ErrorResponse, CopyInResponse,
#: NotificationResponse.
#: (ParseComplete and CloseComplete too while statement fixups are pending: only in the "link"
#: mode, which the reference checks loosely.)
BACKEND_HELD = b"ZSEGA"


def i16(v: int) -> bytes:
    return struct.pack("!h", v)


def i32(v: int) -> bytes:
    return struct.pack("!i", v)


def cstr(s: bytes) -> bytes:
    return s + b"\x00"


@dataclass(frozen=True)
class Frame:
    """One message of the input as the reference reads it."""

    start: int
    end: int  #: start + 1 + length; may lie past the end of the input
    typ: int
    ready: int  #: input length from which the walker acts on it
    stop: str = ""  #: "error" or "terminate": the walker goes no further than this message
    error: str = ""  #: the ProtocolError message, once ready
    may_fail: bool = False  #: a malformed body that the walker reads only in some states


def _length(data: bytes, pos: int) -> int:
    return int(struct.unpack_from("!i", data, pos + 1)[0])


def frontend_frames(data: bytes, inspect: bool) -> list[Frame]:
    held = FRONTEND_HELD if inspect else b""
    frames: list[Frame] = []
    pos = 0
    while len(data) - pos >= 5:
        typ, length = data[pos], _length(data, pos)
        end = pos + 1 + length
        if not 4 <= length <= m.MAX_MESSAGE_LENGTH:
            frames.append(
                Frame(pos, end, typ, pos + 5, "error", f"invalid message length {length}")
            )
            break
        if typ not in FRONTEND_TYPES:
            error = f"invalid frontend message type {typ}"
            frames.append(Frame(pos, end, typ, pos + 5, "error", error))
            break
        if typ == _X:
            frames.append(Frame(pos, end, typ, pos + 5, "terminate"))
            break
        if typ not in held:
            frames.append(Frame(pos, end, typ, pos + 5))
        else:
            # Parse starts with the statement name, a NUL-terminated string; Bind with two (the
            # walker reads those only once the client has named statements or effects).
            body = data[pos + 5 : end]
            if typ == ord("P") and b"\x00" not in body:
                error = "invalid string in message"
                frames.append(Frame(pos, end, typ, end, "error", error))
                break
            may_fail = typ == ord("B") and body.count(b"\x00") < 2
            frames.append(Frame(pos, end, typ, end, may_fail=may_fail))
        pos = end
    return frames


def backend_frames(data: bytes) -> list[Frame]:
    frames: list[Frame] = []
    pos = 0
    while len(data) - pos >= 5:
        typ, length = data[pos], _length(data, pos)
        end = pos + 1 + length
        if not 4 <= length <= m.MAX_MESSAGE_LENGTH:
            error = f"invalid message length {length} from server"
            frames.append(Frame(pos, end, typ, pos + 5, "error", error))
            break
        if typ not in BACKEND_HELD:
            frames.append(Frame(pos, end, typ, pos + 5))
        elif typ == ord("S") and end <= len(data) and data[pos + 5 : end].count(b"\x00") < 2:
            frames.append(Frame(pos, end, typ, end, "error", "malformed ParameterStatus"))
            break
        else:
            frames.append(Frame(pos, end, typ, end))
        pos = end
    return frames


@dataclass(frozen=True)
class View:
    """What a walker that has been fed data[:fed] must have done (short of its stop)."""

    sent: int  #: bytes forwarded: data[:sent]
    mid_message: bool  #: `fed` ends inside a message whose start was forwarded (streamed)
    batch_open: bool  #: the last whole message, copy messages aside, is an extended one


def view(frames: list[Frame], fed: int) -> View:
    sent = fed
    mid = False
    last = -1
    for fr in frames:
        if fed < fr.ready or fr.stop:
            sent = min(fr.start, fed)  # an incomplete header or held message, or the stop
            break
        if fed < fr.end:
            mid = True
            break
        if fr.typ not in COPY:
            last = fr.typ
    else:
        sent = min(fed, frames[-1].end if frames else 0)  # under 5 bytes past the last one
    return View(sent, mid, last >= 0 and last in EXTENDED)


def newly_ready(frames: list[Frame], before: int, fed: int) -> list[Frame]:
    """Frames the walker acts on in the feed that takes it from `before` to `fed` bytes."""
    return [fr for fr in frames if before < fr.ready <= fed]


def messages_of(data: bytes) -> list[Event]:
    reader = m.MessageReader()
    reader.feed(data)
    out = drain(reader)
    assert reader.take_rest() == b""
    return out


# --- strategies: what clients and servers send ------------------------------------------------

NAMES = [b"", b"s1", b"s2", b"s3"]
TEXTS = [
    b"select 1",
    b"select $1::int + 1",
    b"SET search_path TO a",
    b"select set_config('a.b', 'c', false)",
    b"DEALLOCATE s1",
    b'deallocate "s2"',
    b"DEALLOCATE ALL",
    b"DISCARD ALL",
    b"select pg_advisory_lock(1)",
    b"LISTEN x",
    b"begin",
    b"COPY t FROM STDIN",
    b"create temp table t (x int)",
    b"PREPARE p AS select 1",
    b"RESET ALL",
    b"select 1; select 2",
]
#: Bytes that look like headers, for bodies the walkers must not read into.
LOOKALIKES = [m.TERMINATE_MSG, m.SYNC_MSG, b"Q\xff\xff\xff\xff", b"Z\x00\x00\x00\x05I", b"\x00"]
opaque = st.lists(st.one_of(st.binary(max_size=24), st.sampled_from(LOOKALIKES)), max_size=4).map(
    b"".join
)
names = st.sampled_from(NAMES)
named = st.sampled_from(NAMES[1:])
texts = st.sampled_from(TEXTS)
#: Texts prepared again and again, so that servers already have some (stand-in Closes).
prepared_texts = st.one_of(st.sampled_from([b"select 1", b"select $1::int + 1"]), texts)
portals = st.sampled_from([b"", b"p1"])
SYNC = m.SYNC_MSG
EXECUTE = m.message(b"E", cstr(b"") + i32(0))


def _parse(name: bytes, text: bytes, types: list[int]) -> bytes:
    return m.message(b"P", cstr(name) + cstr(text) + i16(len(types)) + b"".join(map(i32, types)))


def _bind(portal: bytes, name: bytes, params: list[bytes]) -> bytes:
    values = b"".join(i32(len(p)) + p for p in params)
    return m.message(b"B", cstr(portal) + cstr(name) + i16(0) + i16(len(params)) + values + i16(0))


def _call(args: list[bytes]) -> bytes:
    values = b"".join(i32(len(a)) + a for a in args)
    return m.message(b"F", i32(1598) + i16(0) + i16(len(args)) + values + i16(0))


#: Whole, well-formed client messages of every type but Terminate.
frontend_messages = st.one_of(
    texts.map(lambda t: m.message(b"Q", cstr(t))),
    st.builds(_parse, names, texts, st.lists(st.sampled_from([0, 23, 25]), max_size=2)),
    st.builds(_bind, portals, names, st.lists(opaque, max_size=2)),
    st.builds(lambda k, n: m.message(b"D", k + cstr(n)), st.sampled_from([b"S", b"P"]), names),
    st.builds(lambda p, r: m.message(b"E", cstr(p) + i32(r)), portals, st.integers(0, 9)),
    st.builds(lambda k, n: m.message(b"C", k + cstr(n)), st.sampled_from([b"S", b"P"]), names),
    st.just(SYNC),
    st.just(m.message(b"H")),
    st.builds(_call, st.lists(opaque, max_size=2)),
    opaque.map(lambda b: m.message(b"d", b)),
    st.just(m.message(b"c")),
    st.just(m.message(b"f", cstr(b"no thanks"))),
)
#: What clients do, a few messages at a time: often enough named statements (with a small LRU,
#: evictions and injected Parses), DEALLOCATE of known names and COPY FROM STDIN that the
#: renaming and batch logic get to work.
frontend_steps = st.one_of(
    frontend_messages.map(lambda msg: [msg]),
    st.builds(lambda n, t: [_parse(n, t, []), SYNC], named, prepared_texts),
    st.builds(
        lambda n, ps: [_bind(b"", n, ps), EXECUTE, SYNC], named, st.lists(opaque, max_size=2)
    ),
    st.builds(
        lambda n, t: [
            _parse(n, t, []),
            _bind(b"", n, []),
            m.message(b"D", b"P\x00"),
            EXECUTE,
            SYNC,
        ],
        names,
        prepared_texts,
    ),
    named.map(lambda n: [m.query(f"DEALLOCATE {n.decode()}")]),
    named.map(lambda n: [_parse(n, b"select 1", []), SYNC, m.query(f"DEALLOCATE {n.decode()}")]),
    # Three statements through a small LRU, then the first one again: evicted, re-injected.
    st.just(
        [_parse(b"s%d" % i, b"select %d" % i, []) for i in (1, 2, 3)]
        + [SYNC, _bind(b"", b"s1", []), EXECUTE, m.message(b"D", b"Ss1\x00"), SYNC]
    ),
    opaque.map(lambda row: [EXECUTE, SYNC, m.message(b"d", row), m.message(b"c"), SYNC]),
)
frontend_streams = st.lists(frontend_steps, max_size=6).map(
    lambda steps: list(itertools.chain.from_iterable(steps))
)

text = st.text(alphabet="abcxyz é✓", max_size=16)  # never spells FATAL or PANIC


def _row_description(cols: list[str]) -> bytes:
    body = i16(len(cols))
    for n, col in enumerate(cols, 1):
        body += cstr(col.encode()) + i32(16384) + i16(n) + i32(25) + i16(-1) + i32(-1) + i16(0)
    return m.message(b"T", body)


def _data_row(values: list[bytes | None]) -> bytes:
    body = i16(len(values))
    for v in values:
        body += i32(-1) if v is None else i32(len(v)) + v
    return m.message(b"D", body)


#: Asynchronous server messages, which may come between any two others.
async_messages = st.one_of(
    st.builds(m.parameter_status, st.sampled_from(["TimeZone", "application_name"]), text),
    st.builds(m.notice_response, text),
    opaque.filter(lambda b: b"\x00" not in b).map(
        lambda b: m.message(b"A", i32(42) + cstr(b"chan") + cstr(b))
    ),
)
#: Whole, well-formed server messages of the data phase, FATAL errors aside.
backend_messages = st.one_of(
    st.sampled_from([m.message(t) for t in (b"1", b"2", b"3", b"n", b"I", b"s", b"c")]),
    st.lists(text, min_size=1, max_size=3).map(_row_description),
    st.lists(st.one_of(st.none(), opaque), max_size=3).map(_data_row),
    st.sampled_from([b"SELECT 1", b"INSERT 0 1", b"SET", b"DEALLOCATE"]).map(
        lambda t: m.message(b"C", cstr(t))
    ),
    st.sampled_from([b"I", b"T", b"E"]).map(m.ready_for_query),
    st.builds(m.error_response, st.sampled_from(["42601", "0A000", "40001"]), text),
    st.lists(st.integers(0, 1), max_size=3).map(
        lambda fs: m.message(b"G", b"\x00" + i16(len(fs)) + b"".join(map(i16, fs)))
    ),
    opaque.map(lambda b: m.message(b"d", b)),
    async_messages,
)
backend_streams = st.lists(backend_messages, max_size=16)
FATAL_MSG = m.fatal("57P01", "terminating connection due to administrator command")
ERRORS = [m.error_response("42601", "syntax error"), m.error_response("0A000", "cached plan")]


@dataclass(frozen=True)
class Session:
    """A client's messages, its server's LRU size, and that server's answer to what the proxy
    sent it for them (renamed, with injected Parses and Closes and stand-ins)."""

    client: list[bytes]
    cap: int
    answer: bytes
    bounds: list[int]  #: message boundaries of `answer`, 0 and its end included


@st.composite
def sessions(draw: st.DrawFn) -> Session:
    """The answer is PostgreSQL's, message by message: an error in an extended-protocol message
    skips to the next Sync, Syncs and Queries get a ReadyForQuery, copy messages outside COPY
    are ignored; asynchronous messages come anywhere."""
    client = draw(frontend_streams)
    cap = draw(st.sampled_from([1, 2, 100]))
    sent, _, _ = Frontend(inspect=True).feed(b"".join(client), ServerStatements(cap), Registry())
    out: list[bytes] = []
    skipping = False
    for typ, body in messages_of(sent):
        if draw(st.integers(0, 9)) == 0:
            out.append(draw(async_messages))
        fails = draw(st.integers(0, 9)) == 0
        if typ == ord("S"):
            skipping = False
            out.append(m.ready_for_query(draw(st.sampled_from([b"I", b"I", b"T", b"E"]))))
        elif skipping or typ in COPY or typ == ord("H"):
            pass
        elif fails and typ in EXTENDED:
            out.append(draw(st.sampled_from(ERRORS)))
            skipping = True
        elif typ in b"QF":
            if fails:
                out.append(draw(st.sampled_from(ERRORS)))
            elif body == b"\x00":
                out.append(m.message(b"I"))
            else:
                out.append(m.message(b"C", b"SELECT 1\x00"))
            out.append(m.ready_for_query())
        else:
            answer = {"P": b"1", "B": b"2", "C": b"3", "D": b"n", "E": b"C"}[chr(typ)]
            out.append(m.message(answer, b"SELECT 1\x00" if answer == b"C" else b""))
    bounds = [0, *itertools.accumulate(map(len, out))]
    return Session(client, cap, b"".join(out), bounds)


frontend_garbage = st.one_of(
    st.binary(max_size=300), damaged(frontend_streams.map(b"".join)), damaged_streams
)
backend_garbage = st.one_of(
    st.binary(max_size=300), damaged(backend_streams.map(b"".join)), damaged_streams
)


# --- the walkers as the proxy drives them ------------------------------------------------------


class Client:
    """A Frontend as client.py drives it, with its server's statement context or without."""

    def __init__(self, inspect: bool, with_ctx: bool, cap: int = 2) -> None:
        self.fe = Frontend(inspect=inspect)
        self.ctx = ServerStatements(cap) if with_ctx else None
        self.registry = Registry() if with_ctx else None
        self.sent: list[bytes] = []
        self.requests = 0
        self.terminate = False

    def feed(self, chunk: bytes, copy_in: bool = False) -> tuple[bytes, int, bool]:
        out, requests, terminate = self.fe.feed(chunk, self.ctx, self.registry, copy_in)
        assert type(out) is bytes
        self.sent.append(out)
        self.requests += requests
        self.terminate = self.terminate or terminate
        if self.ctx is not None:
            # Every request counted is a batch booked for a ReadyForQuery, none other.
            assert self.ctx.sent_syncs == self.requests
        return out, requests, terminate


#: (inspect, statement context): session mode; transaction mode, without and with renaming.
FRONTEND_MODES = {
    "plain": (False, False),
    "plain-ctx": (False, True),
    "inspect": (True, False),
    "rename": (True, True),
}
frontend_modes = st.sampled_from(sorted(FRONTEND_MODES))
#: "plain": no statement context; "ctx": an empty one (nothing to fix up); "link": the one a
#: session's client booked.
backend_modes = st.sampled_from(["plain", "ctx", "link"])


def backend_ctx(mode: str, session: Session) -> ServerStatements | None:
    if mode == "plain":
        return None
    ctx = ServerStatements(session.cap)
    if mode == "link":
        Frontend(inspect=True).feed(b"".join(session.client), ctx, Registry())
    return ctx


def specials(items: list[Special]) -> list[tuple[object, ...]]:
    return [
        (s.kind, s.ordinal, s.fix, s.stmt and s.stmt.name, s.tag, s.owner_name, s.confirmed)
        for s in items
    ]


def ctx_state(ctx: ServerStatements | None) -> tuple[object, ...]:
    if ctx is None:
        return ()
    return (
        list(ctx.lru),
        ctx.sent_syncs,
        ctx.recv_z,
        ctx.batch_parses,
        ctx.batch_closes,
        {k: specials(v) for k, v in ctx.fixups.items()},
        specials(ctx.open_specials),
    )


def frontend_state(fe: Frontend) -> tuple[object, ...]:
    return (
        sorted((k, s.name, s.confirmed) for k, s in fe.statements.items()),
        fe.flags,
        list(fe.set_names),
        fe.dirty_tail,
        fe.mid_message,
        fe.holding,
    )


# --- random bytes ---------------------------------------------------------------------------


@WALKERS
@given(mode=frontend_modes, raw=frontend_garbage, data=st.data())
def test_frontend_random_bytes(mode: str, raw: bytes, data: st.DataObject) -> None:
    """Nothing but ProtocolError escapes (the test stops feeding once one does, or once a
    Terminate is seen), and sent_syncs is the sum of the requests. Unless it renames
    statements, the Frontend matches the reference after every feed: all it returned is
    data[:sent] (the input up to an incomplete header, an incomplete held message, or the
    Terminate: bytes are forwarded untouched); it raises in the feed that makes the first bad
    header (or a held Parse/Bind without its NULs) whole, with the reference's message; it
    counts each Query/Sync/FunctionCall in the feed that makes it ready, reports Terminate in
    the feed that completes its header, and says holding, mid_message and dirty_tail as the
    reference does."""
    inspect, with_ctx = FRONTEND_MODES[mode]
    client = Client(inspect, with_ctx)
    exact = not (inspect and with_ctx)  # renaming rewrites messages
    frames = frontend_frames(raw, inspect)
    fed = 0
    for chunk in data.draw(chunkings(raw)):
        before, fed = fed, fed + len(chunk)
        ready = newly_ready(frames, before, fed)
        # Whether the server said CopyInResponse changes only the request count (not modelled).
        copy_in = False if exact else data.draw(st.booleans())
        try:
            _, requests, terminate = client.feed(chunk, copy_in)
        except ProtocolError as exc:
            assert exc.sqlstate == PROTOCOL_VIOLATION
            if exact:
                allowed = {fr.error for fr in ready if fr.stop == "error"}
                if any(fr.may_fail for fr in ready):
                    allowed.add("invalid string in message")
                assert str(exc) in allowed
            return
        if not exact:
            if terminate:
                return
            continue
        stop = next((fr for fr in ready if fr.stop), None)
        assert stop is None or stop.stop == "terminate", f"no {stop.error!r}"
        assert requests == sum(fr.typ in REQUESTS for fr in ready if not fr.stop)
        assert terminate is (stop is not None)
        expected = view(frames, fed)
        assert b"".join(client.sent) == raw[: expected.sent]
        if terminate:
            return
        fe = client.fe
        assert fe.holding is (expected.sent < fed)
        assert fe.mid_message is expected.mid_message
        assert fe.dirty_tail is (expected.batch_open or expected.mid_message)


@WALKERS
@given(mode=backend_modes, session=sessions(), data=st.data())
def test_backend_random_bytes(mode: str, session: Session, data: st.DataObject) -> None:
    """Nothing but ProtocolError escapes (the test stops feeding once one does, or once a FATAL
    is cut), and every ReadyForQuery is counted once (recv_z is the sum of zs). With nothing
    to fix up ("plain", "ctx"), the Backend matches the reference after every feed: all it
    returned is data[:sent] (the input up to an incomplete header or an incomplete held
    message: bytes are forwarded untouched), except that a FATAL/PANIC ErrorResponse made
    whole in the same feed as an earlier ReadyForQuery, while the last status is I, is cut:
    then all it returned is the input up to that FATAL, and `cut` is the rest of what was
    fed. zs, xacts, tx_status, at_boundary, errors and ParameterStatus pairs are the
    reference's, and it raises in the feed that makes the first bad header or malformed
    ParameterStatus ready, with the reference's message."""
    raw = data.draw(st.one_of(backend_garbage, damaged(st.just(session.answer))))
    ctx = backend_ctx(mode, session)
    exact = mode != "link"
    be = Backend()
    frames = backend_frames(raw)
    sent: list[bytes] = []
    zs_total = 0
    tx = _I
    fed = 0
    for chunk in data.draw(chunkings(raw)):
        before, fed = fed, fed + len(chunk)
        ready = newly_ready(frames, before, fed)
        try:
            out = be.feed(chunk, ctx)
        except ProtocolError as exc:
            assert exc.sqlstate == PROTOCOL_VIOLATION
            if exact:
                assert str(exc) in {fr.error for fr in ready}
            return
        assert type(out) is bytes
        sent.append(out)
        zs_total += be.zs
        if ctx is not None:
            assert ctx.recv_z == zs_total
        if not exact:
            if be.rare and be.fatal_cut:
                return
            continue
        zs = xacts = errors = 0
        fatal = False
        params: list[tuple[str, str]] = []
        cut_at = -1
        for fr in ready:
            assert not fr.stop, f"no {fr.error!r}"
            body = raw[fr.start + 5 : fr.end]
            if fr.typ == ord("Z"):
                tx = body[0] if body else _I
                zs += 1
                xacts += tx == _I
            elif fr.typ == ord("E"):
                errors += 1
                is_fatal = b"SFATAL\x00" in body or b"SPANIC\x00" in body
                fatal = fatal or is_fatal
                if is_fatal and zs and tx == _I:
                    cut_at = fr.start
                    break
            elif fr.typ == ord("S"):
                name, value = body.split(b"\x00")[:2]
                params.append((name.decode("utf-8", "replace"), value.decode("utf-8", "replace")))
        assert (be.zs, be.xacts, be.tx_status) == (zs, xacts, tx)
        assert be.rare is bool(errors or params)
        if be.rare:
            assert (be.errors, be.params) == (errors, params or None)
            assert be.fatal or not fatal
        if cut_at >= 0:
            assert be.fatal_cut
            assert b"".join(sent) == raw[:cut_at]
            assert be.cut == raw[cut_at:fed]
            return
        assert not (be.rare and be.fatal_cut)
        expected = view(frames, fed)
        assert b"".join(sent) == raw[: expected.sent]
        assert be.at_boundary is (expected.sent == fed and not expected.mid_message)


# --- valid streams: chunking changes nothing --------------------------------------------------


@WALKERS
@given(
    mode=frontend_modes,
    msgs=frontend_streams,
    end=st.sampled_from([b"", m.TERMINATE_MSG, m.TERMINATE_MSG + b"\xff after the end"]),
    copy_in=st.booleans(),
    cap=st.sampled_from([1, 2, 100]),
    data=st.data(),
)
def test_frontend_chunking_never_changes_output(
    mode: str, msgs: list[bytes], end: bytes, copy_in: bool, cap: int, data: st.DataObject
) -> None:
    """Whole, well-formed client messages (maybe then a Terminate and bytes after it), fed at
    once or in random chunks until a Terminate is seen: the same bytes out, the same summed
    request count, the same Terminate, the same Frontend state (dirty_tail, mid_message,
    holding, statements, flags, settings) and the same statement context (LRU, sent_syncs,
    recv_z, fixups and the open batch's bookings). Without renaming, the output is the input
    up to the Terminate, byte for byte."""
    inspect, with_ctx = FRONTEND_MODES[mode]
    stream = b"".join(msgs) + end

    def run(chunks: list[bytes]) -> tuple[object, ...]:
        client = Client(inspect, with_ctx, cap)
        for chunk in chunks:
            client.feed(chunk, copy_in)
            if client.terminate:
                break
        return (
            b"".join(client.sent),
            client.requests,
            client.terminate,
            frontend_state(client.fe),
            ctx_state(client.ctx),
        )

    whole = run([stream])
    assert run(data.draw(chunkings(stream))) == whole
    assert whole[2] is bool(end)
    if not (inspect and with_ctx):
        assert whole[0] == b"".join(msgs)


@WALKERS
@given(mode=backend_modes, session=sessions(), data=st.data())
def test_backend_chunking_never_changes_output(
    mode: str, session: Session, data: st.DataObject
) -> None:
    """A server's answer to a client's session, maybe cut short after any message by a FATAL
    (a server says nothing after one), fed at once or in random chunks until a FATAL is cut:
    the same bytes out (what the Backend returned, then `cut` if it cut a FATAL), the same
    summed zs, xacts and errors, the same final tx_status and at_boundary (True), and the
    same statement context (LRU, sent_syncs, recv_z, fixups, bookings). With
    nothing to fix up, what comes out (returned, then cut) is the input, byte for byte."""
    stream = session.answer
    if data.draw(st.booleans()):  # the server dies after any message
        at = data.draw(st.sampled_from(session.bounds))
        stream = stream[:at] + FATAL_MSG

    def run(chunks: list[bytes]) -> tuple[object, ...]:
        ctx = backend_ctx(mode, session)
        be = Backend()
        out: list[bytes] = []
        zs = xacts = errors = 0
        for chunk in chunks:
            out.append(be.feed(chunk, ctx))
            zs += be.zs
            xacts += be.xacts
            errors += be.errors if be.rare else 0
            if be.rare and be.fatal_cut:
                out.append(be.cut)
                break
        return b"".join(out), zs, xacts, errors, be.tx_status, be.at_boundary, ctx_state(ctx)

    whole = run([stream])
    assert run(data.draw(chunkings(stream))) == whole
    assert whole[5]
    if mode != "link":
        assert whole[0] == stream


def test_backend_forwards_a_fatal_during_a_deallocate_stand_in() -> None:
    """Found by test_backend_chunking_never_changes_output. The client prepared s1, then sent
    DEALLOCATE s1, which the proxy replaced with an empty query; the server dies (admin
    shutdown) before answering it. Fed with the ReadyForQuery before it, the FATAL is cut and
    the client gets it; fed on its own, the Backend takes it for the stand-in's own error and
    returns b"": the client sees its connection close with no word from the server. The
    FATAL must reach the client either way: only the stand-in's answer is not the client's."""
    client = [_parse(b"s1", b"select 1", []), SYNC, m.query("DEALLOCATE s1")]
    session = Session(client, 2, b"", [0])
    # The proxy sent Close sidecar_1, Parse sidecar_1, Sync, then the empty Query.
    prepared = m.message(b"3") + m.message(b"1") + m.ready_for_query(b"I")
    be = Backend()
    assert be.feed(prepared + FATAL_MSG, backend_ctx("link", session)) == prepared[5:]
    assert be.fatal_cut and be.cut == FATAL_MSG
    be = Backend()
    ctx = backend_ctx("link", session)
    assert be.feed(prepared, ctx) == prepared[5:]
    assert be.feed(FATAL_MSG, ctx) == FATAL_MSG  # was b"": taken for the stand-in's error


# --- bad lengths and types: always a ProtocolError, from the feed that completes the header ---


def feed_until_error(feed: Callable[[bytes], object], chunks: list[bytes]) -> tuple[str, int, int]:
    """(error message, bytes fed before the chunk that raised, bytes fed with it)."""
    fed = 0
    for chunk in chunks:
        before, fed = fed, fed + len(chunk)
        try:
            feed(chunk)
        except ProtocolError as exc:
            assert exc.sqlstate == PROTOCOL_VIOLATION
            return str(exc), before, fed
    raise AssertionError("no ProtocolError")


@REJECTS
@given(
    mode=frontend_modes,
    msgs=frontend_streams,
    typ=st.integers(0, 255),
    length=bad_lengths,
    data=st.data(),
)
def test_frontend_rejects_bad_lengths(
    mode: str, msgs: list[bytes], typ: int, length: int, data: st.DataObject
) -> None:
    """Negative, under 4, or over 1 GB (PostgreSQL's limit), whatever the type (Terminate
    too), after any whole messages: the feed that completes the header raises."""
    stream = b"".join(msgs) + bytes([typ]) + i32(length)
    client = Client(*FRONTEND_MODES[mode])
    error, before, fed = feed_until_error(client.feed, data.draw(chunkings(stream)))
    assert error == f"invalid message length {length}"
    assert before < len(stream) <= fed


@REJECTS
@given(
    mode=backend_modes,
    session=sessions(),
    typ=st.integers(0, 255),
    length=bad_lengths,
    data=st.data(),
)
def test_backend_rejects_bad_lengths(
    mode: str, session: Session, typ: int, length: int, data: st.DataObject
) -> None:
    """The same from the server, after a session's answer."""
    stream = session.answer + bytes([typ]) + i32(length)
    ctx = backend_ctx(mode, session)
    be = Backend()
    error, before, fed = feed_until_error(lambda c: be.feed(c, ctx), data.draw(chunkings(stream)))
    assert error == f"invalid message length {length} from server"
    assert before < len(stream) <= fed


@REJECTS
@given(
    mode=frontend_modes,
    msgs=frontend_streams,
    typ=st.integers(0, 255).filter(lambda t: t not in FRONTEND_TYPES),
    length=st.integers(4, m.MAX_MESSAGE_LENGTH),
    body=st.binary(max_size=8),
    data=st.data(),
)
def test_frontend_rejects_unknown_message_types(
    mode: str, msgs: list[bytes], typ: int, length: int, body: bytes, data: st.DataObject
) -> None:
    """A type no client sends (Z, p, NUL...) with any valid length, after any whole messages:
    the feed that completes its header raises, whether the body is there or not."""
    prefix = b"".join(msgs)
    stream = prefix + bytes([typ]) + i32(length) + body
    client = Client(*FRONTEND_MODES[mode])
    error, before, fed = feed_until_error(client.feed, data.draw(chunkings(stream)))
    assert error == f"invalid frontend message type {typ}"
    assert before < len(prefix) + 5 <= fed


BAD_LENGTHS = [m.MAX_MESSAGE_LENGTH + 1, 0x7FFF_FFFF, -1, -4, -(2**31), 0, 3]


@pytest.mark.parametrize("length", BAD_LENGTHS, ids=hex)
@pytest.mark.parametrize("split", range(5))
@pytest.mark.parametrize("mode", [*FRONTEND_MODES, "server"])
def test_walkers_reject_huge_and_negative_lengths(length: int, split: int, mode: str) -> None:
    """1 GB + 1, 2 GB - 1, negative, too short: raised as soon as the header is in."""
    feed: Callable[[bytes], object]
    if mode == "server":
        prefix = m.ready_for_query(b"I") + m.message(b"C", b"SELECT 1\x00")
        feed = Backend().feed
        expected = f"invalid message length {length} from server"
    else:
        prefix = m.query("select 1") + SYNC
        feed = Client(*FRONTEND_MODES[mode]).feed
        expected = f"invalid message length {length}"
    data = prefix + b"D" + i32(length)
    feed(data[: len(prefix) + split])
    with pytest.raises(ProtocolError, match=f"^{expected}$"):
        feed(data[len(prefix) + split :])


def test_walkers_take_the_largest_length() -> None:
    """Exactly 1 GB (PostgreSQL's own limit) is a message: streamed or held, not an error."""
    top = i32(m.MAX_MESSAGE_LENGTH)
    fe = Frontend(inspect=False)
    assert fe.feed(b"d" + top + b"row") == (b"d" + top + b"row", 0, False)
    assert fe.mid_message
    fe = Frontend(inspect=True)
    assert fe.feed(b"Q" + top + b"select") == (b"", 0, False)
    assert fe.holding
    be = Backend()
    assert be.feed(b"D" + top + b"row") == b"D" + top + b"row"
    assert not be.at_boundary
    be = Backend()
    assert be.feed(b"E" + top + b"SERROR") == b""
    assert not be.at_boundary
