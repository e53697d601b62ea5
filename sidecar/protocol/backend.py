"""Server-to-client stream walker: ReadyForQuery, ParameterStatus and errors, and the fixups
that prepared-statement renaming needs (swallow or rewrite a few responses).

Bytes go to the client as received. Only message headers are read, plus the small bodies of
ReadyForQuery, ParameterStatus and ErrorResponse; an incomplete one of those (or an incomplete
header) is held back until its last byte arrives, so every decision sees whole messages.
"""

from __future__ import annotations

import struct

from .errors import ProtocolError
from .messages import (
    CLOSE_COMPLETE,
    COPY_IN_RESPONSE,
    ERROR_RESPONSE,
    MAX_MESSAGE_LENGTH,
    NOTIFICATION_RESPONSE,
    PARAMETER_STATUS,
    PARSE_COMPLETE,
    READY_FOR_QUERY,
    TX_IDLE,
    message,
    parse_parameter_status,
    splice,
)
from .statements import Fix, ServerStatements, Special

_unpack_i32 = struct.Struct("!i").unpack_from
_pack_i32 = struct.Struct("!i").pack

# Read whole: ReadyForQuery, ParameterStatus, ErrorResponse, CopyInResponse,
# NotificationResponse; and with statement fixups pending, ParseComplete and CloseComplete.
_WHOLE_PLAIN = b"ZSEGA"
_WHOLE = _WHOLE_PLAIN + b"13"
# The sets above as tables indexed by the type byte (C arrays in the compiled build, see
# backend.pxd): 1 for the types `feed` reads whole.
_SLOW_PLAIN = bytes(1 if typ in _WHOLE_PLAIN else 0 for typ in range(256))
_SLOW_EVERY = bytes([1]) * 256
_IS_WHOLE = bytes(1 if typ in _WHOLE else 0 for typ in range(256))


# True when this module runs compiled (setup.py): Cython gives it a .so as __file__.
_COMPILED = not __file__.endswith(".py")


def _signed(length: int) -> int:
    """A message length as PostgreSQL reads it (int32): for the error text only."""
    return length - (1 << 32) if length >= 1 << 31 else length


# The severity fields of a FATAL/PANIC ErrorResponse: S (maybe localized) comes first, V (never
# localized, PostgreSQL >= 9.6) after a field's NUL. A message text cannot hold a NUL, so these
# match fields only, never the words inside a message.
_FATAL_FIRST = (b"SFATAL\x00", b"SPANIC\x00")
_FATAL_V = (b"\x00VFATAL\x00", b"\x00VPANIC\x00")


def _is_fatal(data: bytes, pos: int, end: int) -> bool:
    body = data[pos + 5 : end]
    return body.startswith(_FATAL_FIRST) or _FATAL_V[0] in body or _FATAL_V[1] in body


class Backend:
    """Walks one server connection's stream. Results of the last `feed` are attributes."""

    __slots__ = (
        "_batch_closes",
        "_batch_parses",
        "_held",
        "_skip",
        "at_boundary",
        "client_pid",
        "copy_in",
        "cut",
        "errors",
        "fatal",
        "fatal_cut",
        "own_pid",
        "params",
        "rare",
        "tx_status",
        "xacts",
        "zs",
    )

    def __init__(self) -> None:
        self._skip = 0
        self._held = b""
        self._batch_parses = 0
        self._batch_closes = 0
        #: Status byte of the last ReadyForQuery (I, T or E).
        self.tx_status = TX_IDLE
        #: The server said CopyInResponse and has not finished that request yet.
        self.copy_in = False
        #: Everything handed out so far ends on a message boundary.
        self.at_boundary = True
        #: Of the last feed: ReadyForQuery count, and those with status I.
        self.zs = 0
        self.xacts = 0
        #: The last feed saw an ErrorResponse or ParameterStatus: look at the fields below.
        self.rare = False
        #: Of the last feed (valid when `rare`): ErrorResponses, whether one was FATAL/PANIC,
        #: and ParameterStatus (name, value) pairs.
        self.errors = 0
        self.fatal = False
        self.params: list[tuple[str, str]] | None = None
        #: A FATAL came after a ReadyForQuery in the last feed (valid when `rare`): what
        #: precedes it was handed out, the FATAL and what follows were not.
        self.fatal_cut = False
        #: The bytes held back from the client by `fatal_cut`.
        self.cut = b""
        #: The server backend's process id, and the one its current client was given in
        #: BackendKeyData: a NotificationResponse the backend sends about itself (the client
        #: notified its own channel) names the client's, as PostgreSQL would.
        self.own_pid = 0
        self.client_pid = 0

    def reset(self) -> None:
        self._skip = 0
        self._held = b""
        self._batch_parses = self._batch_closes = 0
        self.at_boundary = True

    def feed(self, data: bytes, ctx: ServerStatements | None = None) -> bytes:
        """Bytes for the client; `ctx` is the server's statement bookkeeping, if any."""
        if self._held:
            data = self._held + data
            self._held = b""
        if self.rare:
            self.rare = self.fatal_cut = False
            self.errors = 0
            self.params = None
        zs = xacts = 0
        n = len(data)
        pos = 0
        if self._skip:
            pos = self._skip if self._skip < n else n
            self._skip -= pos
        out: list[bytes] | None = None
        copied = 0
        # Fixups come from the client's side, never from a feed: with none pending now, only
        # the types read whole need the full path; with some, every message takes it.
        slow = _SLOW_EVERY if ctx is not None and (ctx.fixups or ctx.open_specials) else _SLOW_PLAIN
        # The compiled build reads `buf` as a C array (backend.pxd); `data` is not rebound
        # while the loop reads it.
        buf = data
        headed = n - 5  # the last position where a whole header can start
        while pos <= headed:
            typ = buf[pos]
            if _COMPILED:  # int32, big-endian, from four C byte reads (signed: see _signed)
                length = buf[pos + 1] << 24 | buf[pos + 2] << 16 | buf[pos + 3] << 8 | buf[pos + 4]
            else:  # one C call, cheaper than four Python-level reads
                (length,) = _unpack_i32(data, pos + 1)
            end = pos + 1 + length
            if not slow[typ] and 4 <= length <= MAX_MESSAGE_LENGTH:
                # Most messages (RowDescription, DataRow, CommandComplete ...): streamed as is.
                if end <= n:
                    pos = end
                    continue
                self._skip = end - n
                pos = n
                break
            if length < 4 or length > MAX_MESSAGE_LENGTH:
                raise ProtocolError(f"invalid message length {_signed(length)} from server")
            if typ == READY_FOR_QUERY:  # the one whole message of every answer: inline
                if end > n:
                    self._held = data[pos:]
                    break
                status = buf[pos + 5] if length > 4 else TX_IDLE
                self.tx_status = status
                self.copy_in = False
                zs += 1
                if status == TX_IDLE:
                    xacts += 1
                if ctx is not None:
                    if ctx.fixups:
                        repl = self._ready(ctx)
                        if repl is not None:
                            # A stand-in's CommandComplete goes before the ReadyForQuery.
                            out = splice(out, data[copied:pos], repl)
                            copied = pos
                    else:
                        ctx.recv_z += 1
                        self._batch_parses = self._batch_closes = 0
            elif _IS_WHOLE[typ]:
                if end > n:
                    self._held = data[pos:]
                    break
                if (
                    typ == ERROR_RESPONSE
                    and zs
                    and self.tx_status == TX_IDLE
                    and _is_fatal(data, pos, end)
                ):
                    # Behind a ReadyForQuery I: the transaction is over, so maybe not an answer
                    # to anything the client waits for (the caller decides; `cut` keeps it).
                    # Behind T or E it is: the client's open transaction died with it.
                    self.rare = self.fatal = self.fatal_cut = True
                    self.cut = bytes(data[pos:])
                    self.errors += 1
                    n = pos
                    break
                repl = self._message(typ, data, pos, end, ctx)
                if repl is not None:
                    out = splice(out, data[copied:pos], repl)
                    copied = end
            elif ctx is not None and ctx.fixups and self._replacing(ctx):
                # The stand-in empty query's own answer: the client never asked for it.
                if end > n:
                    self._held = data[pos:]
                    break
                if out is None:
                    out = []
                out.append(data[copied:pos])
                copied = end
            elif end > n:
                self._skip = end - n
                pos = n
                break
            pos = end
        else:
            if pos < n:  # less than a header left
                self._held = data[pos:]
        self.zs = zs
        self.xacts = xacts
        self.at_boundary = not self._skip and not self._held
        limit = n - len(self._held) if self._held else n
        if out is None:
            return data if limit == len(data) else data[:limit]
        out.append(data[copied:limit])
        return b"".join(out)

    # -- per-message work ------------------------------------------------------------------------

    def _message(
        self, typ: int, data: bytes, pos: int, end: int, ctx: ServerStatements | None
    ) -> bytes | None:
        if typ == COPY_IN_RESPONSE:
            self.copy_in = True
            return None
        if typ == NOTIFICATION_RESPONSE:
            if end - pos >= 9 and self.client_pid and _unpack_i32(data, pos + 5)[0] == self.own_pid:
                return data[pos : pos + 5] + _pack_i32(self.client_pid) + data[pos + 9 : end]
            return None
        if typ == PARAMETER_STATUS:
            self.rare = True
            if self.params is None:
                self.params = []
            self.params.append(parse_parameter_status(data[pos + 5 : end]))
            return None
        if typ == ERROR_RESPONSE:
            self.rare = True
            self.errors += 1
            fatal = _is_fatal(data, pos, end)
            if fatal:
                self.fatal = True
            if ctx is not None and ctx.fixups and self._replacing(ctx) and not fatal:
                # The stand-in's error would not be the client's; a FATAL is everyone's news.
                return b""
            if ctx is not None and b"C42P05\x00" in data[pos + 5 : end]:
                return self._renamed(ctx, data[pos:end])
            return None
        if ctx is None or not (ctx.fixups or ctx.open_specials):
            return None
        specials = self._current(ctx)
        if not specials:
            return None
        if typ == PARSE_COMPLETE:
            ordinal = self._batch_parses
            self._batch_parses += 1
            for sp in specials:
                if sp.kind == PARSE_COMPLETE and sp.ordinal == ordinal:
                    sp.confirmed = True
                    if sp.stmt is not None:
                        sp.stmt.confirmed = True
                    return b"" if sp.fix is Fix.SWALLOW else None
            return None
        ordinal = self._batch_closes
        self._batch_closes += 1
        for sp in specials:
            if sp.kind == CLOSE_COMPLETE and sp.ordinal == ordinal:
                sp.confirmed = True
                return b"" if sp.fix is Fix.SWALLOW else None
        return None

    def _renamed(self, ctx: ServerStatements, msg: bytes) -> bytes | None:
        """42P05 for a client's Parse of a name it already uses (sent under the server name of
        its statement, so that the server refuses it as PostgreSQL would): the client's name
        goes in the text."""
        for sp in self._current(ctx) or ():
            if sp.fix is Fix.RENAME and sp.tag in msg:
                quoted = b'"' + sp.tag + b'"'
                if quoted in msg:  # the English text; a translation may quote otherwise
                    return message(b"E", msg[5:].replace(quoted, b'"' + sp.owner_name + b'"'))
                return message(b"E", msg[5:].replace(sp.tag, sp.owner_name))
        return None

    def _current(self, ctx: ServerStatements) -> list[Special] | None:
        """Specials of the batch the server is answering now."""
        batch = ctx.recv_z + 1
        if batch <= ctx.sent_syncs:
            return ctx.fixups.get(batch)
        return ctx.open_specials

    def _replacing(self, ctx: ServerStatements) -> bool:
        specials = self._current(ctx)
        return bool(specials) and specials[0].fix is Fix.REPLACE  # type: ignore[index]

    def _ready(self, ctx: ServerStatements) -> bytes | None:
        """ReadyForQuery ends a batch: settle its specials."""
        ctx.recv_z += 1
        self._batch_parses = self._batch_closes = 0
        specials = ctx.fixups.pop(ctx.recv_z, None) if ctx.fixups else None
        if not specials:
            return None
        repl: bytes | None = None
        for sp in specials:
            if sp.fix is Fix.REPLACE:
                repl = message(b"C", sp.tag + b"\x00")
            elif sp.stmt is not None and not sp.confirmed:
                # An error ended the batch before this Parse ran: the server lacks it.
                ctx.drop(sp.stmt)
                if sp.owner is not None and sp.owner.get(sp.owner_name) is sp.stmt:
                    del sp.owner[sp.owner_name]
        return None if repl is None else repl
