"""Framing and building of PostgreSQL v3 wire messages: incremental readers, builders, parsers.

Everything here is bytes in, values or bytes out. The data path does not frame messages here:
the two stream walkers (frontend.py, backend.py) read headers in place as bytes go by.
"""

from __future__ import annotations

import struct
from dataclasses import dataclass

from .errors import PROTOCOL_VIOLATION, ProtocolError

PROTOCOL_V3 = 196608  # 3 << 16
SSL_REQUEST_CODE = 80877103
GSSENC_REQUEST_CODE = 80877104
CANCEL_REQUEST_CODE = 80877102

# PostgreSQL refuses startup packets above this: its MAX_STARTUP_PACKET_LENGTH (10000) counts
# the packet without its 4-byte length word.
MAX_STARTUP_LENGTH = 10_004
# Largest message PostgreSQL itself accepts (MaxAllocSize); anything above is garbage.
MAX_MESSAGE_LENGTH = 0x3FFF_FFFF

_I32 = struct.Struct("!i")
_unpack_i32 = _I32.unpack_from
_pack_i32 = _I32.pack

# Message type bytes, as ints (what indexing bytes gives): the one table of them. The stream
# walkers import theirs into C ints of their own (frontend.pxd, backend.pxd).
# Server to client:
AUTHENTICATION = ord("R")
BACKEND_KEY_DATA = ord("K")
PARAMETER_STATUS = ord("S")
READY_FOR_QUERY = ord("Z")
ERROR_RESPONSE = ord("E")
NOTICE_RESPONSE = ord("N")
NOTIFICATION_RESPONSE = ord("A")
PARSE_COMPLETE = ord("1")
CLOSE_COMPLETE = ord("3")
COPY_IN_RESPONSE = ord("G")
# Client to server:
QUERY = ord("Q")
PARSE = ord("P")
BIND = ord("B")
DESCRIBE = ord("D")
EXECUTE = ord("E")
CLOSE = ord("C")
FLUSH = ord("H")
SYNC = ord("S")
FUNCTION_CALL = ord("F")
TERMINATE = ord("X")
PASSWORD_MESSAGE = ord("p")
# The first body byte of Describe and Close: a prepared statement (b"P": a portal).
TARGET_STATEMENT = ord("S")
# ReadyForQuery's transaction status: idle, in a transaction block, in a failed one.
TX_IDLE = ord("I")
TX_IN_BLOCK = ord("T")
TX_FAILED = ord("E")

# Authentication request codes (the int32 after an 'R').
AUTH_OK = 0
AUTH_CLEARTEXT = 3
AUTH_MD5 = 5
AUTH_SASL = 10
AUTH_SASL_CONTINUE = 11
AUTH_SASL_FINAL = 12


# The quotes: Cython 3.3 does not match the unquoted union with messages.pxd's `list out`.
def splice(out: "list[bytes] | None", chunk: bytes, repl: bytes) -> list[bytes]:  # noqa: UP037
    """How a stream walker rewrites a message in passing: `out` (a new list when None) gets
    `chunk`, the bytes before the message, forwarded as they came, then `repl`."""
    if out is None:
        out = []
    out.append(chunk)
    out.append(repl)
    return out


# ---------------------------------------------------------------------------
# Startup phase (untyped packets)


@dataclass(frozen=True, slots=True)
class SSLRequest:
    """The client asks for TLS before its startup packet."""


@dataclass(frozen=True, slots=True)
class GSSENCRequest:
    """The client asks for GSSAPI encryption before its startup packet."""


@dataclass(frozen=True, slots=True)
class CancelRequest:
    """A new connection carrying a cancel key instead of a startup packet."""

    pid: int
    secret: int


@dataclass(frozen=True, slots=True)
class StartupMessage:
    """Protocol 3.0 startup packet: user, database and session parameters."""

    params: dict[str, str]


StartupEvent = SSLRequest | GSSENCRequest | CancelRequest | StartupMessage


class StartupReader:
    """Incremental reader of the untyped packets a client sends before authentication."""

    __slots__ = ("_buf",)

    def __init__(self) -> None:
        self._buf = bytearray()

    def pending(self) -> bool:
        """Part of a packet has come, not all of it."""
        return bool(self._buf)

    def feed(self, data: bytes) -> tuple[StartupEvent | None, bytes]:
        """Add bytes; return (event or None if incomplete, bytes left over after the packet)."""
        self._buf += data
        if len(self._buf) < 4:
            return None, b""
        (length,) = _unpack_i32(self._buf, 0)
        if length < 8 or length > MAX_STARTUP_LENGTH:
            # Also where a typed message lands ("X\0\0\0\4" reads as a huge length).
            raise ProtocolError("invalid length of startup packet", silent=True)
        if len(self._buf) < length:
            return None, b""
        packet = bytes(self._buf[:length])
        rest = bytes(self._buf[length:])
        self._buf.clear()
        return parse_startup_packet(packet), rest


def parse_startup_packet(packet: bytes) -> StartupEvent:
    """Decode one complete untyped startup-phase packet (length included)."""
    if len(packet) < 8:
        raise ProtocolError("invalid length of startup packet", silent=True)
    (code,) = _unpack_i32(packet, 4)
    if code == CANCEL_REQUEST_CODE and len(packet) != 16:
        # As PostgreSQL (ProcessStartupPacket): logged, closed without a word.
        raise ProtocolError("invalid length of startup packet", silent=True)
    # As PostgreSQL: these two are answered whatever their length (the rest is read and
    # dropped); only a CancelRequest must have its exact size.
    if code == SSL_REQUEST_CODE:
        return SSLRequest()
    if code == GSSENC_REQUEST_CODE:
        return GSSENCRequest()
    if code == CANCEL_REQUEST_CODE and len(packet) == 16:
        pid, secret = struct.unpack_from("!ii", packet, 8)
        return CancelRequest(pid, secret)
    if code >> 16 != 3:
        raise ProtocolError(
            f"unsupported frontend protocol {code >> 16}.{code & 0xFFFF}: "
            "server supports 3.0 to 3.0",
            "0A000",
        )
    params = _parse_startup_params(packet[8:])
    if "user" not in params or not params["user"]:
        raise ProtocolError("no PostgreSQL user name specified in startup packet", "28000")
    return StartupMessage(params)


def _parse_startup_params(body: bytes) -> dict[str, str]:
    if not body.endswith(b"\x00"):
        raise ProtocolError("invalid startup packet layout: expected terminator as last byte")
    # As in PostgreSQL: NUL-terminated name/value pairs, then one NUL that must be the last
    # byte. An empty name is that terminator, so nothing may follow it.
    strings = body[:-1]
    if strings and not strings.endswith(b"\x00"):
        raise ProtocolError("invalid startup packet layout: expected terminator as last byte")
    parts = strings[:-1].split(b"\x00") if strings else []
    if len(parts) % 2:
        raise ProtocolError("invalid startup packet layout: missing parameter value")
    if not all(parts[::2]):
        raise ProtocolError("invalid startup packet layout: expected terminator as last byte")
    try:
        decoded = [p.decode("utf-8") for p in parts]
    except UnicodeDecodeError as exc:
        raise ProtocolError("invalid byte sequence in startup packet") from exc
    return dict(zip(decoded[::2], decoded[1::2], strict=True))


# ---------------------------------------------------------------------------
# Typed messages


def take_message(buf: bytearray, max_length: int = MAX_MESSAGE_LENGTH) -> tuple[int, bytes] | None:
    """Pop one complete (type, body) off the front of `buf`, or None if it is incomplete."""
    if len(buf) < 5:
        return None
    (length,) = _unpack_i32(buf, 1)
    if length < 4 or length > max_length:
        raise ProtocolError(f"invalid message length {length}")
    end = length + 1
    if len(buf) < end:
        return None
    msg = (buf[0], bytes(buf[5:end]))
    del buf[:end]
    return msg


class MessageReader:
    """Incremental framing of typed messages; returns whole (type, body) pairs.

    Used where every message matters (authentication, the admin console); the data path uses
    the stream walkers in frontend.py and backend.py instead.
    """

    __slots__ = ("_buf", "_max")

    def __init__(self, max_length: int = MAX_MESSAGE_LENGTH) -> None:
        self._buf = bytearray()
        self._max = max_length

    def feed(self, data: bytes) -> None:
        self._buf += data

    def next(self) -> tuple[int, bytes] | None:
        """Pop the next complete message, or None if more bytes are needed."""
        return take_message(self._buf, self._max)

    def take_rest(self) -> bytes:
        """Hand over whatever is buffered (the start of the data phase)."""
        rest = bytes(self._buf)
        self._buf.clear()
        return rest


# ---------------------------------------------------------------------------
# Builders


def message(typ: bytes, body: bytes = b"") -> bytes:
    return typ + _pack_i32(len(body) + 4) + body


def _cstr(s: str) -> bytes:
    return s.encode("utf-8") + b"\x00"


AUTH_OK_MSG = b"R\x00\x00\x00\x08\x00\x00\x00\x00"
TERMINATE_MSG = b"X\x00\x00\x00\x04"
SYNC_MSG = b"S\x00\x00\x00\x04"


def auth_request(code: int, data: bytes = b"") -> bytes:
    return message(b"R", _pack_i32(code) + data)


def auth_sasl(mechanisms: list[str]) -> bytes:
    return auth_request(AUTH_SASL, b"".join(_cstr(m) for m in mechanisms) + b"\x00")


def auth_md5(salt: bytes) -> bytes:
    return auth_request(AUTH_MD5, salt)


def parameter_status(name: str, value: str) -> bytes:
    return message(b"S", _cstr(name) + _cstr(value))


def backend_key_data(pid: int, secret: int) -> bytes:
    return message(b"K", struct.pack("!ii", pid, secret))


def ready_for_query(status: bytes = b"I") -> bytes:
    return message(b"Z", status)


def _fields(severity: str, sqlstate: str, text: str, detail: str | None, hint: str | None) -> bytes:
    body = b"S" + _cstr(severity) + b"V" + _cstr(severity) + b"C" + _cstr(sqlstate)
    body += b"M" + _cstr(text)
    if detail:
        body += b"D" + _cstr(detail)
    if hint:
        body += b"H" + _cstr(hint)
    return body + b"\x00"


def error_response(
    sqlstate: str,
    text: str,
    *,
    severity: str = "ERROR",
    detail: str | None = None,
    hint: str | None = None,
) -> bytes:
    return message(b"E", _fields(severity, sqlstate, text, detail, hint))


def fatal(sqlstate: str, text: str, detail: str | None = None) -> bytes:
    return error_response(sqlstate, text, severity="FATAL", detail=detail)


def notice_response(text: str, *, sqlstate: str = "00000", severity: str = "NOTICE") -> bytes:
    return message(b"N", _fields(severity, sqlstate, text, None, None))


def query(sql: str) -> bytes:
    return message(b"Q", _cstr(sql))


def startup_message(params: dict[str, str]) -> bytes:
    body = _pack_i32(PROTOCOL_V3) + b"".join(_cstr(k) + _cstr(v) for k, v in params.items())
    body += b"\x00"
    return _pack_i32(len(body) + 4) + body


def ssl_request() -> bytes:
    return struct.pack("!ii", 8, SSL_REQUEST_CODE)


def cancel_request(pid: int, secret: int) -> bytes:
    return struct.pack("!iiii", 16, CANCEL_REQUEST_CODE, pid, secret)


def password_message(data: bytes) -> bytes:
    return message(b"p", data)


def sasl_initial_response(mechanism: str, data: bytes) -> bytes:
    return message(b"p", _cstr(mechanism) + _pack_i32(len(data)) + data)


# ---------------------------------------------------------------------------
# Parsers


def parse_auth_request(body: bytes) -> tuple[int, bytes]:
    if len(body) < 4:
        raise ProtocolError("short authentication request")
    return _unpack_i32(body, 0)[0], body[4:]


def parse_sasl_mechanisms(data: bytes) -> list[str]:
    return [m.decode("ascii", "replace") for m in data.split(b"\x00") if m]


def parse_sasl_initial_response(body: bytes) -> tuple[str, bytes]:
    """(mechanism, client-first-message) from a SASLInitialResponse 'p' body."""
    end = body.find(b"\x00")
    if end < 0 or len(body) < end + 5:
        raise ProtocolError("malformed SASLInitialResponse")
    mechanism = body[:end].decode("ascii", "replace")
    (dlen,) = _unpack_i32(body, end + 1)
    data = body[end + 5 :]
    if dlen != len(data):
        raise ProtocolError("malformed SASLInitialResponse")
    return mechanism, data


def parse_parameter_status(body: bytes) -> tuple[str, str]:
    parts = body.split(b"\x00")
    if len(parts) < 3:
        raise ProtocolError("malformed ParameterStatus")
    return parts[0].decode("utf-8", "replace"), parts[1].decode("utf-8", "replace")


def parse_error_fields(body: bytes) -> dict[str, str]:
    """Fields of an ErrorResponse/NoticeResponse keyed by their one-letter code."""
    fields: dict[str, str] = {}
    for part in body.split(b"\x00"):
        if part:
            fields[chr(part[0])] = part[1:].decode("utf-8", "replace")
    return fields


def parse_data_row(body: bytes) -> list[str | None]:
    """Text-format DataRow values (None for NULL)."""
    (count,) = struct.unpack_from("!h", body, 0)
    pos = 2
    values: list[str | None] = []
    for _ in range(count):
        (size,) = _unpack_i32(body, pos)
        pos += 4
        if size < 0:
            values.append(None)
        else:
            values.append(body[pos : pos + size].decode("utf-8", "replace"))
            pos += size
    return values


def parse_backend_key(body: bytes) -> tuple[int, int]:
    if len(body) != 8:
        raise ProtocolError("malformed BackendKeyData")
    pid, secret = struct.unpack("!ii", body)
    return pid, secret


__all__ = [
    "PROTOCOL_VIOLATION",
    "CancelRequest",
    "GSSENCRequest",
    "MessageReader",
    "ProtocolError",
    "SSLRequest",
    "StartupMessage",
    "StartupReader",
]
