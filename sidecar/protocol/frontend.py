"""Client-to-server stream walker: counts requests, spots Terminate and session state, and
renames prepared statements for the server that will run them.

Bytes are forwarded as received unless a message must change: only message headers are read,
except for the few messages whose body matters (Query, Parse, Bind, Describe, Close), and only
when statement tracking or session-state detection is on (transaction mode).
"""

from __future__ import annotations

import re
import struct

from .errors import ProtocolError
from .messages import (
    BIND,
    CLOSE,
    CLOSE_COMPLETE,
    DESCRIBE,
    ERROR_RESPONSE,
    EXECUTE,
    MAX_MESSAGE_LENGTH,
    PARSE,
    PARSE_COMPLETE,
    QUERY,
    SYNC,
    SYNC_MSG,
    TARGET_STATEMENT,
    TERMINATE,
    message,
    splice,
)
from .statements import Fix, Registry, ServerStatements, Special, Statement

_unpack_i32 = struct.Struct("!i").unpack_from

# Extended-protocol messages: after one of them, only a Sync brings the server back to a
# state another client can use (an error makes it skip everything until Sync). A Query or
# FunctionCall closes the batch too: it is answered only if the server was not skipping, and
# while unanswered it keeps the server linked.
_EXTENDED = b"PBCDEH"
# Copy messages: PostgreSQL ignores them outside COPY, so they say nothing of the batch state.
_COPY = b"dcf"
_INSPECT = b"QPBDC"
_BIND_DESCRIBE = b"BD"
_REQUESTS = b"QSF"
_COPY_WATCH = b"ESdcf"
# Every message type a logged-in client may send (PostgreSQL closes the session on others).
_FRONTEND_TYPES = b"BCDEFHPQSXcdf"
_USUAL = _FRONTEND_TYPES.replace(b"X", b"")  # all but Terminate
_NONE = -1

# The sets above as bits of one table indexed by the type byte: `feed` looks a message's
# type up once (a C array read in the compiled build, see frontend.pxd).
_K_USUAL = 1
_K_INSPECT = 2
_K_REQUEST = 4
_K_COPY_WATCH = 8
_K_COPY = 16
_K_EXTENDED = 32
_K_BIND_DESCRIBE = 64


def _kinds() -> bytes:
    table = bytearray(256)
    for bit, members in (
        (_K_USUAL, _USUAL),
        (_K_INSPECT, _INSPECT),
        (_K_REQUEST, _REQUESTS),
        (_K_COPY_WATCH, _COPY_WATCH),
        (_K_COPY, _COPY),
        (_K_EXTENDED, _EXTENDED),
        (_K_BIND_DESCRIBE, _BIND_DESCRIBE),
    ):
        for typ in members:
            table[typ] |= bit
    return bytes(table)


_KINDS = _kinds()


# True when this module runs compiled (setup.py): Cython gives it a .so as __file__.
_COMPILED = not __file__.endswith(".py")


def _signed(length: int) -> int:
    """A message length as PostgreSQL reads it (int32): for the error text only."""
    return length - (1 << 32) if length >= 1 << 31 else length


# What a query does to the session (bit flags).
Q_ADVISORY = 1  #: takes a session-level advisory lock
Q_TEMP = 2  #: creates a temporary object
Q_HOLD = 4  #: declares a WITH HOLD cursor
Q_LISTEN = 8  #: LISTEN
Q_PREPARE = 16  #: SQL-level PREPARE
Q_SET = 32  #: SET / RESET / set_config of a session setting
Q_DISCARD = 64  #: DISCARD ALL
Q_DEALLOCATE = 128  #: DEALLOCATE of a statement

PIN_FLAGS = Q_ADVISORY | Q_TEMP | Q_HOLD | Q_LISTEN | Q_PREPARE
PIN_REASONS = {
    Q_ADVISORY: "advisory lock",
    Q_TEMP: "temporary table",
    Q_HOLD: "WITH HOLD cursor",
    Q_LISTEN: "LISTEN",
    Q_PREPARE: "SQL PREPARE",
}

# Where a statement starts: after leading blanks and comments (query tags), or a semicolon.
_START = rb"(?:^|;)(?:\s|/\*.*?\*/|--[^\n]*(?:\n|$))*"
# A cheap first look, enough for one statement: its first word, and the function names that
# matter anywhere in it. Texts with a second statement (a DO block too) get the full look.
_LEAD = re.compile(
    _START + rb"(?:set|reset|listen|prepare|discard|deallocate|declare)\b", re.DOTALL
)
# First bytes of a text _LEAD may match: most queries (insert, update, with, begin, and
# select, tested apart) skip the regex.
_LEAD_FIRST = frozenset(b"srlpd \t\r\n/-")
_ADVISORY = re.compile(rb"pg_(?:try_)?advisory_lock(?:_shared)?\s*\(", re.IGNORECASE)
_TEMP = re.compile(
    rb"\b(?:create\s+(?:(?:global|local)\s+)?|into\s+)temp(?:orary)?\s", re.IGNORECASE
)
_HOLD = re.compile(rb"\bwith\s+hold\b", re.IGNORECASE)
_ICASE = re.IGNORECASE | re.DOTALL
_LISTEN = re.compile(_START + rb"listen\s", _ICASE)
_PREPARE = re.compile(_START + rb"prepare\s+(?!transaction\b)\w", _ICASE)
_SET = re.compile(
    _START + rb"(?:set|reset)\s+(?:session\s+)?(?!local\b|transaction\b|constraints\b)"
    rb"(\w[\w.]*(?:\s+zone)?)",
    _ICASE,
)
_SET_CONFIG = re.compile(rb"set_config\s*\(\s*'([\w.]+)'", re.IGNORECASE)
_DISCARD = re.compile(_START + rb"discard\s+all\b", _ICASE)
_DEALLOCATE_WORD = re.compile(_START + rb"deallocate\s", _ICASE)
_DEALLOCATE_ALL = re.compile(_START + rb"deallocate\s+(?:prepare\s+)?all\b", _ICASE)
_DEALLOCATE = re.compile(
    rb"^\s*deallocate\s+(?:prepare\s+)?(all|\"(?:[^\"]|\"\")+\"|[^\s;\"]+)\s*;?\s*$",
    re.IGNORECASE,
)


def _nul(data: bytes, start: int, end: int) -> int:
    """End of the NUL-terminated string at `start` within one message."""
    nul = data.find(b"\x00", start, end)
    if nul < 0:
        raise ProtocolError("invalid string in message")
    return nul


def _plain(sql: bytes) -> bool:
    """Certainly no session effect (most queries: a few C-speed scans, no regex search)."""
    if _COMPILED:
        return _plain_scan(sql)
    return _plain_lowered(sql)


def _plain_lowered(sql: bytes) -> bool:
    """_plain in the pure build: C-speed scans of a lowered copy (a Python loop would cost
    far more)."""
    low = sql.lower()
    if (
        low
        and low[0] in _LEAD_FIRST
        and not low.startswith(b"select")
        and _LEAD.match(low) is not None
    ):
        return False
    # Anywhere: advisory locks, set_config, temporary tables (CREATE TEMP, SELECT INTO TEMP,
    # EXPLAIN ANALYZE CREATE TEMP ...). find(), not `in`: half the cost on bytes.
    if low.find(b"advisory") >= 0 or low.find(b"set_config") >= 0 or low.find(b"temp") >= 0:
        return False
    semi = low.find(b";")
    return semi < 0 or semi == len(low) - 1 or not low[semi:].strip(b"; \t\r\n")


def _plain_scan(sql: bytes) -> bool:
    """_plain in the compiled build: one pass of C byte reads (frontend.pxd types them), no
    lowered copy and no method calls (bytes.find parses its arguments from a tuple)."""
    buf = sql
    n = len(sql)
    if n:
        c = buf[0]
        if 65 <= c <= 90:
            c += 32
        # Not "select" in any case (b | 32 is a letter's lower case, and only a letter's).
        select = n >= 6 and c == 115 and (buf[1] | 32) == 101 and (buf[2] | 32) == 108
        select = select and (buf[3] | 32) == 101 and (buf[4] | 32) == 99 and (buf[5] | 32) == 116
        if c in _LEAD_FIRST and not select and _LEAD.match(sql.lower()) is not None:
            return False
    semi = -1
    for i in range(n):
        c = buf[i]
        if 65 <= c <= 90:
            c += 32
        # The words _plain_lowered finds: advisory, set_config, temp.
        if c == 97:
            w, m = _W_ADVISORY, 8
        elif c == 115:
            w, m = _W_SET_CONFIG, 10
        elif c == 116:
            w, m = _W_TEMP, 4
        else:
            if c == 59 and semi < 0:
                semi = i
            continue
        if i + m <= n:
            k = 1
            while k < m:
                c = buf[i + k]
                if 65 <= c <= 90:
                    c += 32
                if c != w[k]:
                    break
                k += 1
            if k == m:
                return False
    if semi < 0:
        return True
    # Only semicolons and blanks after the first semicolon: one statement.
    for i in range(semi, n):  # noqa: SIM110 (a generator is a closure: slower when compiled)
        if buf[i] not in (59, 32, 9, 13, 10):
            return False
    return True


_W_ADVISORY = b"advisory"
_W_SET_CONFIG = b"set_config"
_W_TEMP = b"temp"


def classify(sql: bytes) -> tuple[int, list[str]]:
    """(Q_* flags, names of settings SET/RESET) for a query text; cheap when nothing matches."""
    if _plain(sql):
        return 0, []
    return classify_fully(sql)


def classify_fully(sql: bytes) -> tuple[int, list[str]]:
    """`classify` without the first look: every pattern searched."""
    flags = 0
    names: list[str] = []
    if _ADVISORY.search(sql):
        flags |= Q_ADVISORY
    if _TEMP.search(sql):
        flags |= Q_TEMP
    if _HOLD.search(sql):
        flags |= Q_HOLD
    if _LISTEN.search(sql):
        flags |= Q_LISTEN
    if _PREPARE.search(sql):
        flags |= Q_PREPARE
    for match in _SET.finditer(sql):
        name = match.group(1).decode("utf-8", "replace").lower()
        if " " in name:
            name = "timezone"  # SET TIME ZONE
        elif name == "authorization":
            name = "session_authorization"  # SET SESSION AUTHORIZATION
        names.append(name)
    for match in _SET_CONFIG.finditer(sql):
        names.append(match.group(1).decode("utf-8", "replace").lower())
    if names:
        flags |= Q_SET
    if _DISCARD.search(sql):
        flags |= Q_DISCARD
    if _DEALLOCATE_WORD.search(sql):
        flags |= Q_DEALLOCATE
    return flags, names


def _forgets_all(flags: int, sql: bytes) -> bool:
    """The text drops every prepared statement of the session (DISCARD ALL, DEALLOCATE ALL)."""
    if flags & Q_DISCARD:
        return True
    return bool(flags & Q_DEALLOCATE) and _DEALLOCATE_ALL.search(sql) is not None


def deallocate_target(sql: bytes) -> bytes | None:
    """The statement name of a lone `DEALLOCATE name` query (b"" for ALL), else None."""
    match = _DEALLOCATE.match(sql)
    if match is None:
        return None
    target = match.group(1)
    if target.lower() == b"all":
        return b""
    if target.startswith(b'"'):
        return target[1:-1].replace(b'""', b'"')
    return target.lower()


def local_prepare(data: bytes, registry: Registry) -> list[tuple[bytes, Statement]] | None:
    """If `data` is only Parse messages of already-accepted texts and one final Sync, the
    (client name, statement) pairs, so the proxy can answer without a server; else None.

    A client that prepares while holding no server (libpq's PQprepare, pgbench -M prepared)
    then never waits for one, and cannot block its thread behind a busy pool. Each Parse still
    makes a new generation (see statements.py): the server parses it at its first use.
    """
    found: list[tuple[bytes, bytes, int]] = []
    pos = 0
    n = len(data)
    while n - pos >= 5 and data[pos] == PARSE:
        (length,) = _unpack_i32(data, pos + 1)
        end = pos + 1 + length
        if length < 4 or end > n:
            return None
        nul = data.find(b"\x00", pos + 5, end)
        if nul <= pos + 5:  # malformed, or the unnamed statement
            return None
        rest = data[nul + 1 : end]
        stmt = registry.known(rest)
        if stmt is None or stmt.flags:
            return None
        found.append((data[pos + 5 : nul], rest, stmt.flags))
        pos = end
    if found and data[pos:] == SYNC_MSG:
        return [(name, registry.new(rest, flags)) for name, rest, flags in found]
    return None


def single_request(data: bytes) -> bool:
    """`data` is whole messages ending with its one request (Query, Sync or FunctionCall): what
    a client waiting for a server has sent for one query, and all of it can be answered with
    one error and ReadyForQuery."""
    pos = 0
    n = len(data)
    while n - pos >= 5:
        typ = data[pos]
        (length,) = _unpack_i32(data, pos + 1)
        end = pos + 1 + length
        if length < 4 or end > n or typ not in _FRONTEND_TYPES or typ in b"Xdcf":
            return False
        if typ in _REQUESTS:
            return bool(end == n)
        pos = end
    return False


class Frontend:
    """Walks one client's stream; holds back incomplete messages it needs whole."""

    __slots__ = (
        "_after_exec",
        "_batch_open",
        "_effects",
        "_exec_syncs",
        "_held",
        "_parsed",
        "_skip",
        "_skip_type",
        "dirty_tail",
        "flags",
        "inspect",
        "mid_message",
        "set_names",
        "statements",
    )

    def __init__(self, inspect: bool) -> None:
        #: Transaction mode: look at Query/Parse texts and statement names.
        self.inspect = inspect
        self._skip = 0
        self._skip_type = 0
        # Syncs sent since an Execute, while it may have started a COPY FROM STDIN.
        self._after_exec = False
        self._exec_syncs = 0
        self._held = b""
        self._batch_open = False
        #: The bytes sent end inside an extended-protocol batch (no Sync yet) or a message.
        self.dirty_tail = False
        #: The bytes sent end inside a message (streamed in part, rest to come).
        self.mid_message = False
        #: Client statement name -> proxy-wide statement.
        self.statements: dict[bytes, Statement] = {}
        # Client statement name -> the generation its Parse made (Statement.seq): a server
        # copy serves it only if at least as new (see statements.py). Read on misses only;
        # an entry left after a Close is overwritten by the name's next Parse.
        self._parsed: dict[bytes, int] = {}
        #: Q_* flags seen since the caller last cleared them, and settings SET meanwhile.
        self.flags = 0
        self.set_names: list[str] = []
        # Client statement name (b"" for the unnamed one) -> what running it does to the
        # session: (Q_* flags, settings SET, drops every prepared statement).
        self._effects: dict[bytes, tuple[int, list[str], bool]] = {}

    @property
    def holding(self) -> bool:
        return bool(self._held)

    def feed(
        self,
        data: bytes,
        ctx: ServerStatements | None = None,
        registry: Registry | None = None,
        copy_in: bool = False,
    ) -> tuple[bytes, int, bool]:
        """(bytes to send, requests that will get a ReadyForQuery, Terminate seen).

        `ctx`/`registry` are given when statements are renamed (transaction mode with
        max_prepared_statements > 0): the bytes are then rewritten for that server.
        """
        if self._held:
            data = self._held + data
            self._held = b""
        n = len(data)
        pos = 0
        requests = 0
        terminate = False
        last = _NONE  # type of the last non-copy message that ended in `data`
        if self._skip:
            pos = self._skip if self._skip < n else n
            self._skip -= pos
            if not self._skip and not _KINDS[self._skip_type] & _K_COPY:
                last = self._skip_type
        out: list[bytes] | None = None  # set once a message is rewritten
        copied = 0  # data[copied:pos] not yet in `out`
        inspect = self.inspect
        after_exec, exec_syncs = self._after_exec, self._exec_syncs
        # The compiled build reads `buf` and `kinds` as C arrays (frontend.pxd); `data` is not
        # rebound while the loop reads `buf`.
        buf = data
        kinds = _KINDS
        headed = n - 5  # the last position where a whole header can start
        while pos <= headed:
            typ = buf[pos]
            kind = kinds[typ]
            if _COMPILED:  # int32, big-endian, from four C byte reads (signed: see _signed)
                length = buf[pos + 1] << 24 | buf[pos + 2] << 16 | buf[pos + 3] << 8 | buf[pos + 4]
            else:  # one C call, cheaper than four Python-level reads
                (length,) = _unpack_i32(data, pos + 1)
            if not kind & _K_USUAL or length < 4 or length > MAX_MESSAGE_LENGTH:
                # One test on the fast path for three rare cases.
                if length < 4 or length > MAX_MESSAGE_LENGTH:
                    raise ProtocolError(f"invalid message length {_signed(length)}")
                if typ != TERMINATE:
                    raise ProtocolError(f"invalid frontend message type {typ}")
                terminate = True
                if out is not None:
                    out.append(data[copied:pos])
                copied = pos
                data = data[:pos]
                n = pos
                break
            end = pos + 1 + length
            if inspect and kind & _K_INSPECT:
                # Whole messages only; none of them is a COPY or a Sync, and each one ends
                # here (fewer tests per message than the general path below).
                if end > n:
                    self._held = data[pos:]
                    break
                if typ == QUERY:  # most of them: no call at all when the text has no effect
                    sql = data[pos + 5 : end - 1]
                    repl = None if _plain(sql) else self._query(sql, ctx)
                    requests += 1
                    if ctx is not None:
                        self._request(ctx)
                elif kind & _K_BIND_DESCRIBE:
                    # Nothing to rename or note without the client's named statements (an
                    # unnamed-statement client): no call.
                    repl = (
                        self._inspect(typ, data, pos + 5, end, ctx, registry)
                        if self.statements or self._effects
                        else None
                    )
                else:
                    repl = self._inspect(typ, data, pos + 5, end, ctx, registry)
                if repl is not None:
                    out = splice(out, data[copied:pos], repl)
                    copied = end
                if after_exec:
                    after_exec = False
                    exec_syncs = 0
                last = typ
                pos = end
                continue
            if kind & _K_REQUEST:
                requests += 1
                if ctx is not None:
                    self._request(ctx)
            if kind & _K_COPY_WATCH:
                if typ == EXECUTE:
                    exec_syncs = 0
                    after_exec = True
                elif typ == SYNC:
                    if after_exec:
                        exec_syncs += 1
                elif exec_syncs:
                    if copy_in:
                        # That Execute started a COPY FROM STDIN (the server said so before
                        # the client sent data): PostgreSQL ignores Syncs in copy-in mode, so
                        # they get no ReadyForQuery (libpq sends one anyway). Without the
                        # server's word, CopyData is a stray message PostgreSQL ignores, and
                        # the Syncs count.
                        requests -= exec_syncs
                        last = EXECUTE  # the batch is open again
                        if ctx is not None:
                            self._unsync(ctx, exec_syncs)
                    exec_syncs = 0
                    after_exec = False
            elif after_exec:
                after_exec = False
                exec_syncs = 0
            if end > n:  # only uninspected messages get here incomplete: stream them
                self._skip = end - n
                self._skip_type = typ
                pos = n
                break
            if not kind & _K_COPY:
                last = typ
            pos = end
        else:
            if pos < n:  # less than a header left
                self._held = data[pos:]
        self._after_exec, self._exec_syncs = after_exec, exec_syncs
        if last != _NONE:
            self._batch_open = bool(_KINDS[last] & _K_EXTENDED)
        mid = self.mid_message = self._skip != 0
        self.dirty_tail = self._batch_open or mid
        limit = n - len(self._held) if self._held else n
        if out is None:
            sent = data if limit == len(data) else data[:limit]
        else:
            out.append(data[copied:limit])
            sent = b"".join(out)
        return sent, requests, terminate

    # -- per-message work ------------------------------------------------------------------------

    def _inspect(
        self,
        typ: int,
        data: bytes,
        start: int,
        end: int,
        ctx: ServerStatements | None,
        registry: Registry | None,
    ) -> bytes | None:
        """Look at one whole message; return its replacement bytes, or None to send it as is."""
        if typ == PARSE:
            nul = _nul(data, start, end)
            name = data[start:nul]
            text = data[nul + 1 : _nul(data, nul + 1, end)]
            flags, names = classify(text)
            self._note(flags, names)
            if name and name in self.statements and ctx is not None:
                pass  # refused (42P05, see _parse): the name keeps its statement and effects
            elif flags:
                # Noted again each time it runs (Bind): a prepare can come batches earlier.
                forgets = _forgets_all(flags, text)
                self._effects[name] = (flags, names, forgets)
            elif self._effects:
                self._effects.pop(name, None)
            if ctx is None or registry is None:
                return None
            if not name:
                ctx.batch_parses += 1
                return None
            return self._parse(name, data[nul + 1 : end], flags, ctx, registry)
        if typ == BIND:
            nul = _nul(data, start, end)  # end of the portal name
            nul2 = _nul(data, nul + 1, end)
            name = data[nul + 1 : nul2]
            effects = self._effects.get(name) if self._effects else None
            stmt = self.statements.get(name) if name and ctx is not None else None
            repl = None
            if stmt is not None and ctx is not None:
                if stmt.name in ctx.lru:
                    ctx.lru.move_to_end(stmt.name)
                    prefix = b""
                else:
                    prefix, stmt = self._miss(name, stmt, ctx, registry)
                repl = prefix + message(b"B", data[start : nul + 1] + stmt.name + data[nul2:end])
            if effects is not None:
                self._ran(effects, ctx)
            return repl
        if ctx is None:
            if (
                typ == CLOSE
                and end - start >= 2
                and data[start] == TARGET_STATEMENT
                and self._effects
            ):
                self._effects.pop(data[start + 1 : end - 1], None)
            return None
        if typ == DESCRIBE:
            if end - start < 2 or data[start] != TARGET_STATEMENT:
                return None
            name = data[start + 1 : end - 1]
            stmt = self.statements.get(name) if name else None
            if stmt is None:
                return None
            if stmt.name in ctx.lru:
                ctx.lru.move_to_end(stmt.name)
                prefix = b""
            else:
                prefix, stmt = self._miss(name, stmt, ctx, registry)
            return prefix + message(b"D", b"S" + stmt.name + b"\x00")
        # Close: a client's name means nothing to the server, where Close of an unknown name
        # succeeds, so forwarding it as is gives the client its CloseComplete in place.
        if end - start >= 2 and data[start] == TARGET_STATEMENT:
            self.statements.pop(data[start + 1 : end - 1], None)
            self._effects.pop(data[start + 1 : end - 1], None)
        ctx.batch_closes += 1
        return None

    def _ran(self, effects: tuple[int, list[str], bool], ctx: ServerStatements | None) -> None:
        """A statement with session effects is bound: it runs in this batch."""
        flags, names, forgets = effects
        self._note(flags, names)
        if forgets:
            # DEALLOCATE ALL / DISCARD ALL: the server drops every prepared statement.
            self.statements.clear()
            self._effects.clear()
            if ctx is not None:
                ctx.forget_all()

    def _query(self, sql: bytes, ctx: ServerStatements | None) -> bytes | None:
        """A Query whose text the first look could not clear."""
        flags, names = classify_fully(sql)
        if not flags:
            return None
        target = deallocate_target(sql) if flags & Q_DEALLOCATE else None
        if target == b"" or (target is None and _forgets_all(flags, sql)):
            # DEALLOCATE ALL, alone or among other statements: the server drops them all.
            self.statements.clear()
            self._effects.clear()
            if ctx is not None:
                ctx.forget_all()
        elif target is not None and ctx is not None and target in self.statements:
            # The server knows it by a name other clients share: an empty query stands in and
            # the backend walker answers DEALLOCATE in its place.
            del self.statements[target]
            self._effects.pop(target, None)
            ctx.open_specials.append(Special(0, 0, Fix.REPLACE, tag=b"DEALLOCATE"))
            self._note(flags & ~Q_DEALLOCATE, names)
            return message(b"Q", b"\x00")
        if flags & Q_DISCARD:
            self.statements.clear()
            self._effects.clear()
            if ctx is not None:
                ctx.forget_all()
        self._note(flags, names)
        return None

    def _note(self, flags: int, names: list[str]) -> None:
        if flags:
            self.flags |= flags
            if names:
                self.set_names.extend(names)

    def _parse(
        self,
        name: bytes,
        rest: bytes,
        flags: int,
        ctx: ServerStatements,
        registry: Registry,
    ) -> bytes:
        """A client's own Parse: a new generation, parsed by the server now, as PostgreSQL
        would parse it, even if the server holds an older one of the same text (planned
        before this Parse, maybe before a schema change: see statements.py)."""
        used = self.statements.get(name)
        if used is not None:
            # PostgreSQL refuses a second Parse of a name in use (42P05) and keeps the first:
            # parse it under the server name of the client's statement, which the server has
            # (prepared first if not), for the server to refuse it the same way.
            if used.name in ctx.lru:
                ctx.lru.move_to_end(used.name)
                prefix = b""
            else:
                prefix, used = self._miss(name, used, ctx, registry)
            ctx.open_specials.append(
                Special(ERROR_RESPONSE, 0, Fix.RENAME, owner_name=name, tag=used.name)
            )
            ctx.batch_parses += 1
            return prefix + message(b"P", used.name + b"\x00" + rest)
        stmt = registry.new(rest, flags)
        self.statements[name] = stmt
        self._parsed[name] = stmt.seq
        # A fresh name, so the server cannot hold it; the Close anyway keeps every Parse the
        # proxy sends on one pattern (a CloseComplete swallowed, on a rare path).
        evict = self._remember(stmt, ctx) + self._unprepare(stmt, ctx)
        ctx.open_specials.append(
            Special(PARSE_COMPLETE, ctx.batch_parses, Fix.PASS, stmt, self.statements, name)
        )
        ctx.batch_parses += 1
        return evict + stmt.parse_msg

    def _miss(
        self, name: bytes, stmt: Statement, ctx: ServerStatements, registry: Registry | None
    ) -> tuple[bytes, Statement]:
        """The server lacks the client's generation of a statement it binds or describes.

        Any generation of the same text made after the client's Parse will do (every copy of
        it was prepared later still): the newest one this server has, else the text's newest,
        prepared here first. The client's name maps to the one used, so it keeps hitting.
        Returns (bytes to put before the use, the generation to name in it)."""
        here = ctx.by_text.get(stmt.rest)
        if here is not None and here.seq >= self._parsed.get(name, stmt.seq):
            self.statements[name] = here
            ctx.lru.move_to_end(here.name)
            return b"", here
        if registry is not None:
            self.statements[name] = stmt = registry.newest(stmt)
        evict = self._remember(stmt, ctx) + self._unprepare(stmt, ctx)
        ctx.open_specials.append(Special(PARSE_COMPLETE, ctx.batch_parses, Fix.SWALLOW, stmt))
        ctx.batch_parses += 1
        return evict + stmt.parse_msg, stmt

    def prepared_locally(self, prepared: list[tuple[bytes, Statement]]) -> None:
        """The proxy answered these Parses itself (see local_prepare)."""
        for name, stmt in prepared:
            self.statements[name] = stmt
            self._parsed[name] = stmt.seq

    def _unprepare(self, stmt: Statement, ctx: ServerStatements) -> bytes:
        """A Close of `stmt` right before the proxy prepares it. The LRU can believe a
        statement absent that the server still has (an eviction Close or a DISCARD ALL the
        server skipped after an error); Close of an absent name succeeds, so the Parse that
        follows never fails with 42P05."""
        ctx.open_specials.append(Special(CLOSE_COMPLETE, ctx.batch_closes, Fix.SWALLOW))
        ctx.batch_closes += 1
        return message(b"C", b"S" + stmt.name + b"\x00")

    def _remember(self, stmt: Statement, ctx: ServerStatements) -> bytes:
        """Add to the server's LRU; return a Close for the statement it pushes out, if any."""
        old = ctx.add(stmt)
        if old is None:
            return b""
        ctx.open_specials.append(Special(CLOSE_COMPLETE, ctx.batch_closes, Fix.SWALLOW))
        ctx.batch_closes += 1
        return message(b"C", b"S" + old.name + b"\x00")

    def _unsync(self, ctx: ServerStatements, count: int) -> None:
        """Take back the last `count` sync points: their batch goes on to the next one."""
        for _ in range(count):
            merged = ctx.fixups.pop(ctx.sent_syncs, [])
            ctx.open_specials[:0] = merged
            ctx.sent_syncs -= 1

    def _request(self, ctx: ServerStatements) -> None:
        """A Query, Sync or FunctionCall went out: the server will close a batch there."""
        ctx.sent_syncs += 1
        ctx.batch_parses = ctx.batch_closes = 0
        if ctx.open_specials:
            ctx.fixups[ctx.sent_syncs] = ctx.open_specials
            ctx.open_specials = []
