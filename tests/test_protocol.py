"""Unit tests for sidecar.protocol.messages: framing (MessageReader, StartupReader),
builders and parsers, checked against hand-written bytes of the PostgreSQL v3 message formats.

Plain bytes only: no sockets, no asyncio, no database.
"""

from __future__ import annotations

import random
import struct
from bisect import bisect_right
from collections.abc import Iterable
from dataclasses import dataclass, field

import pytest

from sidecar.protocol import messages as m
from sidecar.protocol.errors import (
    FEATURE_NOT_SUPPORTED,
    INVALID_AUTHORIZATION,
    PROTOCOL_VIOLATION,
    ProtocolError,
)

Event = tuple[int, bytes]


# ---------------------------------------------------------------------------
# Hand-rolled wire encoding, independent of the builders under test


def pkt(typ: bytes, body: bytes = b"") -> bytes:
    """One typed message: type byte, int32 length (self included), body."""
    assert len(typ) == 1
    return typ + struct.pack("!i", len(body) + 4) + body


def cstr(s: str) -> bytes:
    return s.encode("utf-8") + b"\x00"


def i16(v: int) -> bytes:
    return struct.pack("!h", v)


def i32(v: int) -> bytes:
    return struct.pack("!i", v)


def startup_packet(body: bytes) -> bytes:
    """An untyped startup-phase packet: int32 length (self included), then the body."""
    return i32(len(body) + 4) + body


def fields_body(fields: Iterable[tuple[str, str]]) -> bytes:
    """ErrorResponse/NoticeResponse body: code byte + cstring per field, then a NUL."""
    return b"".join(code.encode() + cstr(value) for code, value in fields) + b"\x00"


def row_description(*columns: tuple[str, int]) -> bytes:
    body = i16(len(columns))
    for attnum, (name, type_oid) in enumerate(columns, 1):
        # table oid, column attnum, type oid, typlen, typmod, format code
        body += cstr(name) + i32(16384) + i16(attnum) + i32(type_oid) + i16(-1) + i32(-1) + i16(0)
    return pkt(b"T", body)


def data_row(*values: bytes | None) -> bytes:
    body = i16(len(values))
    for value in values:
        body += i32(-1) if value is None else i32(len(value)) + value
    return pkt(b"D", body)


# ---------------------------------------------------------------------------
# Realistic streams


def server_stream() -> bytes:
    """A backend's side of a login, a simple query with a 100 kB row, a notice, an error, an
    extended-protocol round trip and a notification."""
    big = bytes(range(256)) * 400  # 102 400 bytes, every byte value, header look-alikes inside
    return b"".join(
        [
            pkt(b"R", i32(0)),
            pkt(b"S", cstr("server_version") + cstr("15.4")),
            pkt(b"S", cstr("client_encoding") + cstr("UTF8")),
            pkt(b"S", cstr("application_name") + cstr("pgbench ✓")),
            pkt(b"K", i32(4242) + i32(-559038737)),
            pkt(b"Z", b"I"),
            pkt(b"Z", b"T"),
            row_description(("id", 23), ("payload", 25)),
            data_row(b"1", b"one"),
            data_row(b"2", None),
            data_row(b"3", big),
            data_row(b"4", b"Z\x00\x00\x00\x05I"),  # a ReadyForQuery look-alike in a value
            pkt(b"C", cstr("SELECT 4")),
            pkt(b"S", cstr("TimeZone") + cstr("Europe/Zürich")),
            pkt(b"N", fields_body([("S", "NOTICE"), ("V", "NOTICE"), ("C", "00000"), ("M", "hi")])),
            pkt(b"Z", b"T"),
            pkt(
                b"E",
                fields_body(
                    [("S", "ERROR"), ("V", "ERROR"), ("C", "42601"), ("M", "syntax error")]
                ),
            ),
            pkt(b"Z", b"E"),
            pkt(b"I"),  # EmptyQueryResponse: an empty body
            pkt(b"1"),  # ParseComplete
            pkt(b"2"),  # BindComplete
            pkt(b"n"),  # NoData
            pkt(b"C", cstr("INSERT 0 1")),
            pkt(b"A", i32(4242) + cstr("chan") + cstr("payload")),
            pkt(b"Z", b"I"),
        ]
    )


def client_stream() -> bytes:
    """A frontend's side: simple query, an extended-protocol batch, COPY FROM STDIN, a function
    call, and Terminate."""
    copy_row = b"1\tX\x00\x00\x00\x04\tQ\x00\x00\x00\x05\n"  # Terminate/Query look-alikes
    return b"".join(
        [
            pkt(b"Q", cstr("SELECT 1;")),
            pkt(b"P", cstr("s1") + cstr("SELECT $1::int") + i16(1) + i32(23)),
            pkt(
                b"B",
                cstr("")
                + cstr("s1")
                + i16(1)
                + i16(0)  # one parameter format: text
                + i16(1)
                + i32(2)
                + b"42"  # one parameter value
                + i16(0),  # result formats: default
            ),
            pkt(b"D", b"P" + cstr("")),
            pkt(b"E", cstr("") + i32(0)),
            pkt(b"H"),  # Flush: an empty body
            pkt(b"S"),  # Sync: an empty body, reported
            pkt(b"Q", cstr("COPY t FROM STDIN")),
            pkt(b"d", copy_row),
            pkt(b"d", copy_row * 2000),
            pkt(b"c"),
            pkt(b"F", i32(1598) + i16(0) + i16(1) + i32(3) + b"abc" + i16(0)),
            pkt(b"C", b"S" + cstr("s1")),
            pkt(b"S"),
            pkt(b"X"),
        ]
    )


@dataclass
class Layout:
    """Where the messages of a well-formed stream start and end, computed independently."""

    data: bytes
    types: list[int] = field(default_factory=list)
    bodies: list[bytes] = field(default_factory=list)
    ends: list[int] = field(default_factory=list)

    @classmethod
    def of(cls, data: bytes) -> Layout:
        layout = cls(data)
        pos = 0
        while pos < len(data):
            (length,) = struct.unpack_from("!i", data, pos + 1)
            layout.types.append(data[pos])
            layout.bodies.append(data[pos + 5 : pos + 1 + length])
            pos += 1 + length
            layout.ends.append(pos)
        assert pos == len(data)
        return layout

    def events(self, upto: int | None = None) -> list[Event]:
        """(type, body) of the messages complete within data[:upto]."""
        count = len(self.ends) if upto is None else bisect_right(self.ends, upto)
        return list(zip(self.types[:count], self.bodies[:count], strict=True))


SERVER = Layout.of(server_stream())
CLIENT = Layout.of(client_stream())
STREAMS = {"server": SERVER, "client": CLIENT}


def test_streams_are_what_the_tests_think() -> None:
    assert max(len(b) for b in SERVER.bodies) > 100_000
    assert set(b"TDCSNEZ") <= set(SERVER.types)
    statuses = {body for typ, body in zip(SERVER.types, SERVER.bodies, strict=True) if typ == 90}
    assert statuses == {b"I", b"T", b"E"}  # ReadyForQuery 'Z' (90) in every state
    assert set(b"QPBESdcX") <= set(CLIENT.types)


# ---------------------------------------------------------------------------
# MessageReader: every message, whole


stream_ids = pytest.mark.parametrize("stream", sorted(STREAMS))


def drain(reader: m.MessageReader) -> list[Event]:
    out: list[Event] = []
    while (msg := reader.next()) is not None:
        out.append(msg)
    return out


@stream_ids
@pytest.mark.parametrize("seed", range(10))
def test_message_reader_chunks(stream: str, seed: int) -> None:
    layout = STREAMS[stream]
    data = layout.data
    rng = random.Random(seed)
    reader = m.MessageReader()
    got: list[Event] = []
    pos = 0
    while pos < len(data):
        end = min(len(data), pos + rng.choice([1, 2, 5, 100, 5000, 200_000]))
        reader.feed(data[pos:end])
        got += drain(reader)
        assert got == layout.events(end)
        pos = end
    assert all(type(body) is bytes for _, body in got)
    assert reader.take_rest() == b""


def test_message_reader_take_rest_hands_over_the_partial_tail() -> None:
    reader = m.MessageReader()
    tail = pkt(b"Q", cstr("SELECT 1"))[:7]
    reader.feed(pkt(b"p", b"secret\x00") + pkt(b"Q", cstr("x")) + tail)
    assert reader.next() == (ord("p"), b"secret\x00")
    assert reader.take_rest() == pkt(b"Q", cstr("x")) + tail
    assert reader.take_rest() == b""
    assert reader.next() is None


# ---------------------------------------------------------------------------
# Framing errors


BAD_LENGTHS = [0, 1, 3, -1, -4, -(2**31), m.MAX_MESSAGE_LENGTH + 1, 0x7FFF_FFFF]


def bad_header(length: int, typ: bytes = b"D") -> bytes:
    return typ + struct.pack("!i", length)


@pytest.mark.parametrize("length", BAD_LENGTHS)
@pytest.mark.parametrize("split", [0, 1, 3, 5])
def test_message_reader_rejects_bad_length(length: int, split: int) -> None:
    reader = m.MessageReader()
    data = pkt(b"p", b"abc") + bad_header(length, b"p")
    reader.feed(data[: 8 + split])
    assert reader.next() == (ord("p"), b"abc")
    reader.feed(data[8 + split :])
    with pytest.raises(ProtocolError) as err:
        reader.next()
    assert err.value.sqlstate == PROTOCOL_VIOLATION


def test_message_reader_custom_max_length() -> None:
    reader = m.MessageReader(max_length=10_000)  # what client.py uses during authentication
    reader.feed(pkt(b"p", b"x" * 9_996))
    assert reader.next() == (ord("p"), b"x" * 9_996)
    reader.feed(bad_header(10_001, b"p"))
    with pytest.raises(ProtocolError):
        reader.next()


# ---------------------------------------------------------------------------
# StartupReader and parse_startup_packet


SSL_BYTES = b"\x00\x00\x00\x08\x04\xd2\x16\x2f"  # 8, 1234 << 16 | 5679
GSSENC_BYTES = b"\x00\x00\x00\x08\x04\xd2\x16\x30"  # 8, 1234 << 16 | 5680
CANCEL_BYTES = b"\x00\x00\x00\x10\x04\xd2\x16\x2e"  # 16, 1234 << 16 | 5678, then pid, secret

UNICODE_PARAMS = {
    "user": "ünïcødé",
    "database": "app_db",
    "options": "-c search_path=schéma -c statement_timeout=5s",
    "application_name": "psql 🐘 テスト",
    "client_encoding": "UTF8",
}


def startup_body(params: dict[str, str], version: int = 3 << 16) -> bytes:
    return i32(version) + b"".join(cstr(k) + cstr(v) for k, v in params.items()) + b"\x00"


STARTUP_CASES: list[tuple[bytes, m.StartupEvent]] = [
    (SSL_BYTES, m.SSLRequest()),
    (GSSENC_BYTES, m.GSSENCRequest()),
    (CANCEL_BYTES + i32(12345) + i32(-559038737), m.CancelRequest(12345, -559038737)),
    (startup_packet(startup_body({"user": "bob"})), m.StartupMessage({"user": "bob"})),
    (startup_packet(startup_body(UNICODE_PARAMS)), m.StartupMessage(UNICODE_PARAMS)),
    (
        startup_packet(startup_body({"user": "u", "database": ""})),
        m.StartupMessage({"user": "u", "database": ""}),
    ),
]


@pytest.mark.parametrize(("packet", "event"), STARTUP_CASES)
@pytest.mark.parametrize("rest", [b"", b"Q", SSL_BYTES + b"\x16\x03\x01"])
def test_startup_reader_split_at_every_offset(
    packet: bytes, event: m.StartupEvent, rest: bytes
) -> None:
    data = packet + rest
    for cut in range(len(data) + 1):
        reader = m.StartupReader()
        first = reader.feed(data[:cut])
        if cut < len(packet):
            assert first == (None, b""), cut
            assert reader.feed(data[cut:]) == (event, rest), cut
        else:
            assert first == (event, data[len(packet) : cut]), cut


@pytest.mark.parametrize(("packet", "event"), STARTUP_CASES)
def test_startup_reader_one_byte_at_a_time(packet: bytes, event: m.StartupEvent) -> None:
    reader = m.StartupReader()
    for b in packet[:-1]:
        assert reader.feed(bytes([b])) == (None, b"")
    assert reader.feed(packet[-1:]) == (event, b"")


def test_startup_reader_is_reusable_after_a_packet() -> None:
    # SSLRequest refused ('N'), then the client goes on in plain text on the same reader.
    reader = m.StartupReader()
    startup = startup_packet(startup_body({"user": "bob", "database": "db"}))
    event, rest = reader.feed(SSL_BYTES + startup[:10])
    assert event == m.SSLRequest()
    assert rest == startup[:10]
    assert reader.feed(rest) == (None, b"")
    assert reader.feed(startup[10:]) == (m.StartupMessage({"user": "bob", "database": "db"}), b"")


def test_startup_reader_accepts_10004_bytes() -> None:
    base = startup_body({"user": "bob", "options": ""})
    params = {"user": "bob", "options": "x" * (m.MAX_STARTUP_LENGTH - 4 - len(base))}
    packet = startup_packet(startup_body(params))
    assert len(packet) == m.MAX_STARTUP_LENGTH
    assert m.StartupReader().feed(packet) == (m.StartupMessage(params), b"")


@pytest.mark.parametrize("length", [0, 4, 7, -1, -(2**31), 10_005, 0x7FFF_FFFF])
def test_startup_reader_rejects_bad_length_from_the_header_alone(length: int) -> None:
    reader = m.StartupReader()
    assert reader.feed(i32(length)[:3]) == (None, b"")
    with pytest.raises(ProtocolError) as err:
        reader.feed(i32(length)[3:])
    assert err.value.sqlstate == PROTOCOL_VIOLATION


def test_startup_reader_rejects_a_packet_over_10kb() -> None:
    packet = startup_packet(startup_body({"user": "bob", "options": "x" * 10_000}))
    with pytest.raises(ProtocolError):
        m.StartupReader().feed(packet)


@pytest.mark.parametrize(
    "version",
    [2 << 16, (1 << 16) | 0, (4 << 16) | 0, 0, -1],
    ids=["2.0", "1.0", "4.0", "0.0", "-1"],
)
def test_startup_unsupported_protocol(version: int) -> None:
    packet = startup_packet(startup_body({"user": "bob"}, version))
    with pytest.raises(ProtocolError) as err:
        m.StartupReader().feed(packet)
    assert err.value.sqlstate == FEATURE_NOT_SUPPORTED == "0A000"


@pytest.mark.parametrize(
    "params", [{}, {"database": "db"}, {"user": ""}, {"user": "", "database": "db"}]
)
def test_startup_missing_user(params: dict[str, str]) -> None:
    with pytest.raises(ProtocolError) as err:
        m.parse_startup_packet(startup_packet(startup_body(params)))
    assert err.value.sqlstate == INVALID_AUTHORIZATION == "28000"


V3 = i32(3 << 16)
BAD_LAYOUTS = {
    "no bytes after the version": V3,
    "last byte not NUL": V3 + b"user\x00bob",
    # PostgreSQL: "invalid startup packet layout: expected terminator as last byte".
    "list terminator missing": V3 + b"user\x00bob\x00",
    "list terminator missing, two pairs": V3 + b"user\x00bob\x00database\x00db\x00",
    "odd number of strings": V3 + b"user\x00bob\x00database\x00\x00",
    "name without value": V3 + b"user\x00\x00",
    # An empty name ends the list in PostgreSQL; anything after it is garbage.
    "pair after an empty name": V3 + b"user\x00bob\x00\x00x\x00\x00",
    "invalid UTF-8 in a value": V3 + b"user\x00b\xffb\x00\x00",
    "invalid UTF-8 in a name": V3 + b"user\x00bob\x00\xc3\x28\x00v\x00\x00",
    "CancelRequest code, wrong length": i32(80877102) + i32(1),
}


def test_ssl_and_gssenc_requests_of_any_length_are_requests() -> None:
    # PostgreSQL 15 answers them ("S", "G"/"N") whatever the length; the rest is dropped.
    assert m.parse_startup_packet(startup_packet(i32(80877103) + b"\x00" * 4)) == m.SSLRequest()
    assert m.parse_startup_packet(startup_packet(i32(80877104) + b"\x00")) == m.GSSENCRequest()
    reader = m.StartupReader()
    assert reader.feed(startup_packet(i32(80877103) + b"xy") + b"rest") == (m.SSLRequest(), b"rest")


@pytest.mark.parametrize("body", BAD_LAYOUTS.values(), ids=BAD_LAYOUTS.keys())
def test_startup_bad_layout(body: bytes) -> None:
    packet = startup_packet(body)
    with pytest.raises(ProtocolError):
        m.parse_startup_packet(packet)
    with pytest.raises(ProtocolError):
        m.StartupReader().feed(packet)


@pytest.mark.parametrize("packet", [b"", b"\x00\x00\x00\x04", b"\x00\x00\x00\x08\x00\x03"])
def test_parse_startup_packet_short_input(packet: bytes) -> None:
    # Unreachable through StartupReader (it checks the length first), but a parser must not
    # leak struct.error to its caller.
    with pytest.raises(ProtocolError):
        m.parse_startup_packet(packet)


# ---------------------------------------------------------------------------
# Builders against hand-written bytes (PostgreSQL "Message Formats")


def test_constant_messages() -> None:
    assert m.AUTH_OK_MSG == b"R\x00\x00\x00\x08\x00\x00\x00\x00"
    assert m.TERMINATE_MSG == b"X\x00\x00\x00\x04"
    assert m.SYNC_MSG == b"S\x00\x00\x00\x04"
    assert m.auth_request(m.AUTH_OK) == m.AUTH_OK_MSG
    assert m.PROTOCOL_V3 == 0x0003_0000
    assert (m.SSL_REQUEST_CODE, m.GSSENC_REQUEST_CODE, m.CANCEL_REQUEST_CODE) == (
        (1234 << 16) | 5679,
        (1234 << 16) | 5680,
        (1234 << 16) | 5678,
    )


def test_simple_builders() -> None:
    assert m.ready_for_query() == b"Z\x00\x00\x00\x05I"
    assert m.ready_for_query(b"T") == b"Z\x00\x00\x00\x05T"
    assert m.ready_for_query(b"E") == b"Z\x00\x00\x00\x05E"
    assert m.query("SELECT 1") == b"Q\x00\x00\x00\x0dSELECT 1\x00"
    assert m.query("SELECT 'é'") == b"Q\x00\x00\x00\x10SELECT '\xc3\xa9'\x00"
    assert m.message(b"H") == b"H\x00\x00\x00\x04"
    assert m.password_message(b"md5abc\x00") == b"p\x00\x00\x00\x0bmd5abc\x00"
    assert m.auth_md5(b"\x01\x02\x03\x04") == b"R\x00\x00\x00\x0c\x00\x00\x00\x05\x01\x02\x03\x04"
    assert m.auth_request(m.AUTH_CLEARTEXT) == b"R\x00\x00\x00\x08\x00\x00\x00\x03"
    assert (
        m.auth_sasl(["SCRAM-SHA-256"]) == b"R\x00\x00\x00\x17\x00\x00\x00\x0aSCRAM-SHA-256\x00\x00"
    )
    assert (
        m.auth_request(m.AUTH_SASL_CONTINUE, b"r=abc") == b"R\x00\x00\x00\x0d\x00\x00\x00\x0br=abc"
    )
    assert m.auth_request(m.AUTH_SASL_FINAL, b"v=x") == b"R\x00\x00\x00\x0b\x00\x00\x00\x0cv=x"
    assert m.parameter_status("client_encoding", "UTF8") == (
        b"S\x00\x00\x00\x19client_encoding\x00UTF8\x00"
    )
    assert m.backend_key_data(1234, -2) == (b"K\x00\x00\x00\x0c\x00\x00\x04\xd2\xff\xff\xff\xfe")
    assert m.sasl_initial_response("SCRAM-SHA-256", b"n,,n=,r=abc") == (
        b"p\x00\x00\x00\x21SCRAM-SHA-256\x00\x00\x00\x00\x0bn,,n=,r=abc"
    )


def test_startup_builders() -> None:
    assert m.ssl_request() == SSL_BYTES
    assert m.cancel_request(1234, -2) == CANCEL_BYTES + b"\x00\x00\x04\xd2\xff\xff\xff\xfe"
    assert m.startup_message({"user": "bob"}) == (
        b"\x00\x00\x00\x12\x00\x03\x00\x00user\x00bob\x00\x00"
    )
    assert m.startup_message(UNICODE_PARAMS) == startup_packet(startup_body(UNICODE_PARAMS))


def test_error_builders() -> None:
    assert m.error_response("42601", "syntax error") == pkt(
        b"E", b"SERROR\x00VERROR\x00C42601\x00Msyntax error\x00\x00"
    )
    assert m.fatal("57P01", "terminating", detail="because") == pkt(
        b"E", b"SFATAL\x00VFATAL\x00C57P01\x00Mterminating\x00Dbecause\x00\x00"
    )
    assert m.notice_response("hello") == pkt(
        b"N", b"SNOTICE\x00VNOTICE\x00C00000\x00Mhello\x00\x00"
    )


# ---------------------------------------------------------------------------
# Builders and parsers round trip


def framed(built: bytes) -> Event:
    """Split one built message with MessageReader, checking nothing is left over."""
    reader = m.MessageReader()
    reader.feed(built)
    msg = reader.next()
    assert msg is not None
    assert reader.take_rest() == b""
    return msg


@pytest.mark.parametrize(
    ("kwargs", "fields"),
    [
        ({}, {"S": "ERROR", "V": "ERROR", "C": "XX000", "M": "boom ✗"}),
        (
            {"severity": "WARNING", "detail": "d é", "hint": "h"},
            {"S": "WARNING", "V": "WARNING", "C": "XX000", "M": "boom ✗", "D": "d é", "H": "h"},
        ),
        (
            {"hint": "only a hint"},
            {"S": "ERROR", "V": "ERROR", "C": "XX000", "M": "boom ✗", "H": "only a hint"},
        ),
    ],
)
def test_error_response_round_trip(kwargs: dict[str, str], fields: dict[str, str]) -> None:
    typ, body = framed(m.error_response("XX000", "boom ✗", **kwargs))
    assert typ == m.ERROR_RESPONSE
    assert m.parse_error_fields(body) == fields


def test_fatal_and_notice_round_trip() -> None:
    typ, body = framed(m.fatal("08P01", "bad", detail="worse"))
    assert typ == m.ERROR_RESPONSE
    assert m.parse_error_fields(body) == {
        "S": "FATAL",
        "V": "FATAL",
        "C": "08P01",
        "M": "bad",
        "D": "worse",
    }
    # server.py spots FATAL/PANIC by this byte pattern in the raw body.
    assert b"SFATAL\x00" in body
    typ, body = framed(m.notice_response("note", sqlstate="01000", severity="WARNING"))
    assert typ == m.NOTICE_RESPONSE
    assert m.parse_error_fields(body) == {"S": "WARNING", "V": "WARNING", "C": "01000", "M": "note"}


@pytest.mark.parametrize(
    ("name", "value"),
    [("client_encoding", "UTF8"), ("application_name", ""), ("TimeZone", "Europe/Zürich")],
)
def test_parameter_status_round_trip(name: str, value: str) -> None:
    typ, body = framed(m.parameter_status(name, value))
    assert typ == m.PARAMETER_STATUS
    assert m.parse_parameter_status(body) == (name, value)


@pytest.mark.parametrize("body", [b"", b"name", b"name\x00value"])
def test_parse_parameter_status_malformed(body: bytes) -> None:
    with pytest.raises(ProtocolError):
        m.parse_parameter_status(body)


@pytest.mark.parametrize(("pid", "secret"), [(1, 2), (2**31 - 1, -(2**31)), (0, -1)])
def test_backend_key_round_trip(pid: int, secret: int) -> None:
    typ, body = framed(m.backend_key_data(pid, secret))
    assert typ == m.BACKEND_KEY_DATA
    assert m.parse_backend_key(body) == (pid, secret)


@pytest.mark.parametrize("body", [b"", b"\x00" * 7, b"\x00" * 9])
def test_parse_backend_key_malformed(body: bytes) -> None:
    with pytest.raises(ProtocolError):
        m.parse_backend_key(body)


def test_auth_requests_round_trip() -> None:
    typ, body = framed(m.AUTH_OK_MSG)
    assert typ == m.AUTHENTICATION
    assert m.parse_auth_request(body) == (m.AUTH_OK, b"")
    assert m.parse_auth_request(framed(m.auth_md5(b"salt"))[1]) == (m.AUTH_MD5, b"salt")
    code, data = m.parse_auth_request(
        framed(m.auth_sasl(["SCRAM-SHA-256-PLUS", "SCRAM-SHA-256"]))[1]
    )
    assert code == m.AUTH_SASL
    assert m.parse_sasl_mechanisms(data) == ["SCRAM-SHA-256-PLUS", "SCRAM-SHA-256"]
    final = m.auth_request(m.AUTH_SASL_FINAL, b"v=abc")
    assert m.parse_auth_request(framed(final)[1]) == (m.AUTH_SASL_FINAL, b"v=abc")


@pytest.mark.parametrize("body", [b"", b"\x00\x00\x00"])
def test_parse_auth_request_short(body: bytes) -> None:
    with pytest.raises(ProtocolError):
        m.parse_auth_request(body)


@pytest.mark.parametrize("data", [b"", b"n,,n=,r=rOprNGfwEbeRWgbNEkqO", bytes(range(256))])
def test_sasl_initial_response_round_trip(data: bytes) -> None:
    typ, body = framed(m.sasl_initial_response("SCRAM-SHA-256", data))
    assert typ == m.PASSWORD_MESSAGE
    assert m.parse_sasl_initial_response(body) == ("SCRAM-SHA-256", data)


SASL_MALFORMED = {
    "empty": b"",
    "no NUL after the mechanism": b"SCRAM-SHA-256",
    "no length": b"SCRAM-SHA-256\x00",
    "short length": b"SCRAM-SHA-256\x00\x00\x00\x05",
    "length longer than data": b"SCRAM-SHA-256\x00" + i32(10) + b"abc",
    "length shorter than data": b"SCRAM-SHA-256\x00" + i32(2) + b"abc",
    "negative length with data": b"SCRAM-SHA-256\x00" + i32(-2) + b"abc",
}


@pytest.mark.parametrize("body", SASL_MALFORMED.values(), ids=SASL_MALFORMED.keys())
def test_parse_sasl_initial_response_malformed(body: bytes) -> None:
    with pytest.raises(ProtocolError):
        m.parse_sasl_initial_response(body)


@pytest.mark.parametrize(("packet", "event"), STARTUP_CASES)
def test_parse_startup_packet_matches_reader(packet: bytes, event: m.StartupEvent) -> None:
    assert m.parse_startup_packet(packet) == event


def test_startup_builders_round_trip() -> None:
    assert m.parse_startup_packet(m.ssl_request()) == m.SSLRequest()
    assert m.parse_startup_packet(m.cancel_request(77, -9)) == m.CancelRequest(77, -9)
    assert m.parse_startup_packet(m.startup_message(UNICODE_PARAMS)) == m.StartupMessage(
        UNICODE_PARAMS
    )
    event = m.parse_startup_packet(m.startup_message(UNICODE_PARAMS))
    assert isinstance(event, m.StartupMessage)
    assert list(event.params) == list(UNICODE_PARAMS)  # order kept, as sent


def test_parse_error_fields_tolerates_what_servers_send() -> None:
    body = fields_body(
        [("S", "ERROR"), ("V", "ERROR"), ("C", "23505"), ("M", "dup"), ("n", "t_pkey")]
    )
    assert m.parse_error_fields(body)["n"] == "t_pkey"
    assert m.parse_error_fields(b"") == {}
    assert m.parse_error_fields(b"Mbad \xff byte\x00\x00") == {"M": "bad \ufffd byte"}
