"""Prepared-statement bookkeeping shared by the two stream walkers (frontend and backend).

A client's named statement maps to a proxy-wide `Statement`: one *generation* of a distinct
(query text, parameter types), under a server-side name of the proxy's (`sidecar_N`). Each
server connection remembers which generations it has prepared (an LRU) and which responses of
its in-flight batches the proxy must swallow or rewrite.

Why generations (statements across schema changes). PostgreSQL plans a prepared statement
when it is parsed and, at each use, revalidates the plan against the catalog: a statement
whose result type changed since its Parse fails with `0A000 cached plan must not change result
type`, one whose parameter type was dropped with `XX000 cache lookup failed for type N`. Both
are right for the client that parsed before the change; a client whose own Parse comes after
the change never sees them directly. So a server copy may serve a client only if the server
prepared it at or after that client's Parse:

- every client Parse makes a new generation (a fresh server name, the newest for its text) and
  is sent to the server as a real Parse, as PostgreSQL would run it: one message, no round
  trip, whatever the server already holds;
- a client's Bind or Describe on a server that lacks its generation uses any generation of the
  same text made after the client's Parse (every copy of it was prepared later still): the
  newest one that server has, else the text's newest, prepared there first. The client's name
  then maps to it. Servers converge on recent generations; older ones age out of the LRU, and
  a long-lived client keeps hitting whatever recent copy a server has, however many clients
  parse the text meanwhile.

This holds whether the schema change went through the proxy or not (a release-phase migration
run directly): nothing needs to see the DDL, and no failed statement is replayed. Errors that
remain are the ones PostgreSQL gives the same client directly (its own statement parsed before
the change). What is not exact: a statement parsed before a change and then prepared afresh on
another server runs with the new plan, where PostgreSQL would refuse it with 0A000 if the
result type changed (the proxy cannot compare row shapes without a round trip).

A *batch* is everything up to and including one request that ends with ReadyForQuery (Sync,
Query, FunctionCall); batches are numbered per server by the ReadyForQuery they end with.
Inside a batch the server answers messages in order and stops at the first error, so "the
k-th ParseComplete of batch n" names one response exactly.
"""

from __future__ import annotations

import enum
from collections import OrderedDict

from .messages import message


class Statement:
    """One generation of a distinct (query, parameter types), under its proxy-wide name."""

    __slots__ = ("confirmed", "flags", "name", "parse_msg", "rest", "seq")

    def __init__(self, seq: int, rest: bytes, flags: int, confirmed: bool = False) -> None:
        #: Generations are numbered in the order they are made (client Parses).
        self.seq = seq
        name = b"sidecar_%d" % seq
        self.name = name
        #: The Parse body after the statement name (query, parameter types): the registry key.
        self.rest = rest
        #: Some server has parsed this text successfully.
        self.confirmed = confirmed
        # The Parse a server gets when it lacks this statement: server name + client's body.
        self.parse_msg = message(b"P", name + b"\x00" + rest)
        #: What the query text does to the session (see frontend.Q_* flags).
        self.flags = flags


class Registry:
    """Proxy-wide names for statements, per pool: the newest generation of each text."""

    __slots__ = ("_by_key", "_next")

    def __init__(self) -> None:
        self._by_key: dict[bytes, Statement] = {}
        self._next = 0

    def new(self, rest: bytes, flags: int) -> Statement:
        """A client parses `rest` (a Parse body after the statement name: query, parameter
        types): a fresh generation, from now on the newest of its text."""
        old = self._by_key.get(rest)
        self._next += 1
        stmt = Statement(self._next, rest, flags, old is not None and old.confirmed)
        self._by_key[rest] = stmt
        return stmt

    def newest(self, stmt: Statement) -> Statement:
        """The newest generation of `stmt`'s text."""
        return self._by_key.get(stmt.rest, stmt)

    def known(self, rest: bytes) -> Statement | None:
        """The newest generation of this text if a server has already accepted the text."""
        stmt = self._by_key.get(rest)
        return stmt if stmt is not None and stmt.confirmed else None

    def __len__(self) -> int:
        return len(self._by_key)


class Fix(enum.Enum):
    PASS = "pass"  #: a client's own Parse of a named statement: forward its ParseComplete
    SWALLOW = "swallow"  #: a message the proxy injected: drop its response
    REPLACE = "replace"  #: a stand-in empty Query: answer with `tag` instead
    RENAME = "rename"  #: a Parse of a name in use: its 42P05 names the client's `owner_name`


class Special:
    """One response of a batch the proxy must treat differently from plain forwarding."""

    __slots__ = ("confirmed", "fix", "kind", "ordinal", "owner", "owner_name", "stmt", "tag")

    def __init__(
        self,
        kind: int,
        ordinal: int,
        fix: Fix,
        stmt: Statement | None = None,
        owner: dict[bytes, Statement] | None = None,
        owner_name: bytes = b"",
        tag: bytes = b"",
    ) -> None:
        # PARSE_COMPLETE, CLOSE_COMPLETE or ERROR_RESPONSE (messages.py); 0 for REPLACE.
        self.kind = kind
        self.ordinal = ordinal
        self.fix = fix
        self.stmt = stmt
        self.owner = owner
        self.owner_name = owner_name
        self.tag = tag
        self.confirmed = False


class ServerStatements:
    """What one server connection has prepared, and the fixups of its in-flight batches."""

    __slots__ = (
        "batch_closes",
        "batch_parses",
        "by_text",
        "cap",
        "fixups",
        "lru",
        "open_specials",
        "recv_z",
        "sent_syncs",
    )

    def __init__(self, cap: int) -> None:
        self.cap = cap
        #: Server name -> generation, least recently used first.
        self.lru: OrderedDict[bytes, Statement] = OrderedDict()
        #: Query text (Statement.rest) -> the newest generation of it in `lru`.
        self.by_text: dict[bytes, Statement] = {}
        # Requests sent that end a batch, and ReadyForQuery received: batch n ends with the
        # n-th ReadyForQuery.
        self.sent_syncs = 0
        self.recv_z = 0
        # Parse and Close messages sent so far in the open (not yet synced) batch.
        self.batch_parses = 0
        self.batch_closes = 0
        self.open_specials: list[Special] = []
        self.fixups: dict[int, list[Special]] = {}

    @property
    def settled(self) -> bool:
        """Every batch sent has been answered and nothing is booked for one not yet sent."""
        return self.sent_syncs == self.recv_z and not self.open_specials and not self.fixups

    def add(self, stmt: Statement) -> Statement | None:
        """`stmt` is prepared here from now on; returns the generation pushed out, if any."""
        self.lru[stmt.name] = stmt
        here = self.by_text.get(stmt.rest)
        if here is None or here.seq < stmt.seq:
            self.by_text[stmt.rest] = stmt
        if len(self.lru) <= self.cap:
            return None
        _name, old = self.lru.popitem(last=False)
        if self.by_text.get(old.rest) is old:
            del self.by_text[old.rest]
        return old

    def drop(self, stmt: Statement) -> None:
        """The server does not have `stmt` after all (an error skipped its Parse)."""
        if self.lru.pop(stmt.name, None) is not None and self.by_text.get(stmt.rest) is stmt:
            del self.by_text[stmt.rest]

    def forget_all(self) -> None:
        """DEALLOCATE ALL / DISCARD ALL ran on the server."""
        self.lru.clear()
        self.by_text.clear()
