"""Query results the proxy answers itself (the admin console), as wire messages; sans-IO.

Builders for RowDescription, DataRow, CommandComplete and the other small result messages,
and parsers for the extended-query-protocol requests (Parse, Bind, Describe, Execute, Close)
a virtual database must understand. Values are encoded in text or binary format per column,
for the three types the console uses: text, int8 and float8.
"""

from __future__ import annotations

import math
import struct
from collections.abc import Sequence
from dataclasses import dataclass

from .errors import ProtocolError
from .messages import message

# Type OIDs (pg_type.oid) and their fixed sizes (-1: variable).
TEXT = 25
INT8 = 20
FLOAT8 = 701
_TYPLEN = {TEXT: -1, INT8: 8, FLOAT8: 8}

TEXT_FORMAT = 0
BINARY_FORMAT = 1

_I16 = struct.Struct("!h")
_I32 = struct.Struct("!i")
_I64 = struct.Struct("!q")
_F64 = struct.Struct("!d")
_NULL = _I32.pack(-1)

PARSE_COMPLETE = b"1\x00\x00\x00\x04"
BIND_COMPLETE = b"2\x00\x00\x00\x04"
CLOSE_COMPLETE = b"3\x00\x00\x00\x04"
NO_DATA = b"n\x00\x00\x00\x04"
EMPTY_QUERY_RESPONSE = b"I\x00\x00\x00\x04"
PORTAL_SUSPENDED = b"s\x00\x00\x00\x04"

#: A value of one result cell; None is SQL NULL.
Value = str | int | float | None


@dataclass(frozen=True, slots=True)
class Column:
    """One result column: its name and type OID (TEXT, INT8 or FLOAT8)."""

    name: str
    type_oid: int = TEXT


def _cstr(s: str) -> bytes:
    return s.encode("utf-8") + b"\x00"


def row_description(columns: Sequence[Column], formats: Sequence[int] = ()) -> bytes:
    """RowDescription; `formats` has one code per column (empty: all text)."""
    parts = [_I16.pack(len(columns))]
    for i, col in enumerate(columns):
        fmt = formats[i] if formats else TEXT_FORMAT
        parts.append(
            _cstr(col.name)
            + struct.pack("!ihihih", 0, 0, col.type_oid, _TYPLEN[col.type_oid], -1, fmt)
        )
    return message(b"T", b"".join(parts))


def _float_text(value: float) -> str:
    # PostgreSQL's float8 output (extra_float_digits=1): shortest exact, its own inf/nan words.
    if math.isnan(value):
        return "NaN"
    if math.isinf(value):
        return "Infinity" if value > 0 else "-Infinity"
    return repr(value)


def encode_value(value: Value, type_oid: int, fmt: int = TEXT_FORMAT) -> bytes | None:
    """The bytes of one cell (None for NULL) in the given format."""
    if value is None:
        return None
    if type_oid == INT8:
        number = int(value)
        return _I64.pack(number) if fmt == BINARY_FORMAT else str(number).encode()
    if type_oid == FLOAT8:
        real = float(value)
        return _F64.pack(real) if fmt == BINARY_FORMAT else _float_text(real).encode()
    # text: the binary and the text format are both the UTF-8 bytes.
    return str(value).encode("utf-8")


def data_row(
    values: Sequence[Value], columns: Sequence[Column], formats: Sequence[int] = ()
) -> bytes:
    """DataRow for one row; values line up with `columns`."""
    parts = [_I16.pack(len(values))]
    for i, value in enumerate(values):
        fmt = formats[i] if formats else TEXT_FORMAT
        data = encode_value(value, columns[i].type_oid, fmt)
        parts.append(_NULL if data is None else _I32.pack(len(data)) + data)
    return message(b"D", b"".join(parts))


def command_complete(tag: str) -> bytes:
    return message(b"C", _cstr(tag))


def parameter_description(type_oids: Sequence[int]) -> bytes:
    return message(b"t", _I16.pack(len(type_oids)) + b"".join(_I32.pack(o) for o in type_oids))


def result_formats(codes: Sequence[int], ncolumns: int) -> tuple[int, ...]:
    """One format code per column from Bind's list (none: text; one: for all; else one each).

    Raises ValueError with PostgreSQL's wording when the list does not fit the columns.
    """
    if not codes:
        return (TEXT_FORMAT,) * ncolumns
    for code in codes:
        if code not in (TEXT_FORMAT, BINARY_FORMAT):
            raise ValueError(f"unsupported format code: {code}")
    if len(codes) == 1:
        return (codes[0],) * ncolumns
    if len(codes) != ncolumns:
        raise ValueError(f"bind message has {len(codes)} result formats but query has {ncolumns}")
    return tuple(codes)


# ---------------------------------------------------------------------------
# Extended query protocol requests


@dataclass(frozen=True, slots=True)
class Parse:
    statement: str
    query: str
    param_types: tuple[int, ...]


@dataclass(frozen=True, slots=True)
class Bind:
    portal: str
    statement: str
    param_formats: tuple[int, ...]
    params: tuple[bytes | None, ...]
    result_formats: tuple[int, ...]


@dataclass(frozen=True, slots=True)
class Describe:
    kind: str  #: "S" (prepared statement) or "P" (portal)
    name: str


@dataclass(frozen=True, slots=True)
class Execute:
    portal: str
    max_rows: int  #: 0: no limit


@dataclass(frozen=True, slots=True)
class Close:
    kind: str  #: "S" (prepared statement) or "P" (portal)
    name: str


class _Body:
    """Cursor over a message body; any overrun is the peer's protocol violation."""

    __slots__ = ("data", "pos", "what")

    def __init__(self, data: bytes, what: str) -> None:
        self.data = data
        self.pos = 0
        self.what = what

    def _bad(self) -> ProtocolError:
        return ProtocolError(f"invalid {self.what} message format")

    def cstr(self) -> str:
        end = self.data.find(b"\x00", self.pos)
        if end < 0:
            raise self._bad()
        raw = self.data[self.pos : end]
        self.pos = end + 1
        try:
            return raw.decode("utf-8")
        except UnicodeDecodeError:
            raise ProtocolError(f"invalid UTF-8 in {self.what} message") from None

    def _unpack(self, st: struct.Struct) -> int:
        if self.pos + st.size > len(self.data):
            raise self._bad()
        (value,) = st.unpack_from(self.data, self.pos)
        self.pos += st.size
        return int(value)

    def i16(self) -> int:
        return self._unpack(_I16)

    def i32(self) -> int:
        return self._unpack(_I32)

    def count(self) -> int:
        n = self.i16()
        if n < 0:
            raise self._bad()
        return n

    def take(self, n: int) -> bytes:
        if n < 0 or self.pos + n > len(self.data):
            raise self._bad()
        out = self.data[self.pos : self.pos + n]
        self.pos += n
        return out

    def byte(self) -> str:
        return self.take(1).decode("latin-1")

    def end(self) -> None:
        if self.pos != len(self.data):
            raise self._bad()


def parse_parse(body: bytes) -> Parse:
    b = _Body(body, "Parse")
    name = b.cstr()
    query = b.cstr()
    types = tuple(b.i32() for _ in range(b.count()))
    b.end()
    return Parse(name, query, types)


def parse_bind(body: bytes) -> Bind:
    b = _Body(body, "Bind")
    portal = b.cstr()
    statement = b.cstr()
    param_formats = tuple(b.i16() for _ in range(b.count()))
    params: list[bytes | None] = []
    for _ in range(b.count()):
        length = b.i32()
        params.append(None if length == -1 else b.take(length))
    formats = tuple(b.i16() for _ in range(b.count()))
    b.end()
    return Bind(portal, statement, param_formats, tuple(params), formats)


def _kind_and_name(body: bytes, what: str) -> tuple[str, str]:
    b = _Body(body, what)
    kind = b.byte()
    if kind not in ("S", "P"):
        raise ProtocolError(f"invalid {what} message subtype {kind!r}")
    name = b.cstr()
    b.end()
    return kind, name


def parse_describe(body: bytes) -> Describe:
    return Describe(*_kind_and_name(body, "Describe"))


def parse_close(body: bytes) -> Close:
    return Close(*_kind_and_name(body, "Close"))


def parse_execute(body: bytes) -> Execute:
    b = _Body(body, "Execute")
    portal = b.cstr()
    max_rows = b.i32()
    b.end()
    return Execute(portal, max(max_rows, 0))


__all__ = [
    "BINARY_FORMAT",
    "BIND_COMPLETE",
    "CLOSE_COMPLETE",
    "EMPTY_QUERY_RESPONSE",
    "FLOAT8",
    "INT8",
    "NO_DATA",
    "PARSE_COMPLETE",
    "PORTAL_SUSPENDED",
    "TEXT",
    "TEXT_FORMAT",
    "Bind",
    "Close",
    "Column",
    "Describe",
    "Execute",
    "Parse",
    "Value",
    "command_complete",
    "data_row",
    "encode_value",
    "parameter_description",
    "parse_bind",
    "parse_close",
    "parse_describe",
    "parse_execute",
    "parse_parse",
    "result_formats",
    "row_description",
]
