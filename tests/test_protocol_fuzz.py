"""Property tests for sidecar.protocol.messages: random bytes and random chunkings.

Whatever a peer sends, the only exception the sans-IO core may raise is ProtocolError, and how
the bytes happen to be split into chunks never changes what it reports.
"""

from __future__ import annotations

import contextlib
import itertools
import struct
from collections.abc import Callable

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from sidecar.protocol import messages as m
from sidecar.protocol.errors import PROTOCOL_VIOLATION, ProtocolError

Event = tuple[int, bytes]

# No example database: the suite must not write into the repository.
FUZZ = settings(max_examples=300, deadline=None, database=None)

message_lists = st.lists(st.tuples(st.integers(0, 255), st.binary(max_size=300)), max_size=20)


def encode(msgs: list[Event]) -> bytes:
    return b"".join(bytes([t]) + struct.pack("!i", len(b) + 4) + b for t, b in msgs)


@st.composite
def damaged_streams(draw: st.DrawFn) -> bytes:
    """A valid stream with a few bytes overwritten and maybe cut short: mostly sane headers,
    so the readers get deep into the stream before anything goes wrong."""
    data = bytearray(encode(draw(message_lists)))
    if data:
        for _ in range(draw(st.integers(0, 3))):
            data[draw(st.integers(0, len(data) - 1))] = draw(st.integers(0, 255))
        data = data[: draw(st.integers(0, len(data)))]
    return bytes(data)


garbage = st.one_of(st.binary(max_size=600), damaged_streams())


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
    """Accepted exactly when PostgreSQL would accept the layout (plus valid UTF-8 and a user),
    with the same parameters."""
    packet = struct.pack("!ii", len(body) + 8, m.PROTOCOL_V3) + body
    expected = reference_startup_params(body)
    if expected is not None:
        try:
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
