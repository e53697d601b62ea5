"""Prepared-statement bookkeeping shared by the two stream walkers (frontend and backend).

A client's named statement maps to a proxy-wide `Statement` (one per distinct query text and
parameter types). Each server connection remembers which of those it has prepared (an LRU)
and which responses of its in-flight batches the proxy must swallow or rewrite.

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
    """One distinct (query, parameter types) under its proxy-wide name."""

    __slots__ = ("confirmed", "flags", "name", "parse_msg", "stale")

    def __init__(self, name: bytes, rest: bytes, flags: int) -> None:
        self.name = name
        #: Some server has parsed it successfully.
        self.confirmed = False
        #: A server said its plan no longer fits (0A000 after DDL): new Parses get a new name.
        self.stale = False
        # The Parse a server gets when it lacks this statement: server name + client's body.
        self.parse_msg = message(b"P", name + b"\x00" + rest)
        #: What the query text does to the session (see frontend.Q_* flags).
        self.flags = flags


class Registry:
    """Proxy-wide names for statements, per pool."""

    __slots__ = ("_by_key", "_next")

    def __init__(self) -> None:
        self._by_key: dict[bytes, Statement] = {}
        self._next = 0

    def get(self, rest: bytes, flags: int) -> Statement:
        """`rest` is a Parse body after the statement name: query, parameter types."""
        stmt = self._by_key.get(rest)
        if stmt is None or stmt.stale:
            self._next += 1
            stmt = Statement(b"sidecar_%d" % self._next, rest, flags)
            self._by_key[rest] = stmt
        return stmt

    def known(self, rest: bytes) -> Statement | None:
        """The statement for this text if a server has already accepted it."""
        stmt = self._by_key.get(rest)
        return stmt if stmt is not None and stmt.confirmed and not stmt.stale else None

    def __len__(self) -> int:
        return len(self._by_key)


class Fix(enum.Enum):
    PASS = "pass"  #: a client's own Parse of a named statement: forward its ParseComplete
    SWALLOW = "swallow"  #: a message the proxy injected: drop its response
    AS_PARSE = (
        "as_parse"  #: a stand-in Close for a Parse the server needs not run: say ParseComplete
    )
    REPLACE = "replace"  #: a stand-in empty Query: answer with `tag` instead


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
        self.kind = kind  # ord("1") for ParseComplete, ord("3") for CloseComplete, 0 for REPLACE
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
        "binds",
        "cap",
        "fixups",
        "lru",
        "open_binds",
        "open_specials",
        "recv_z",
        "sent_syncs",
    )

    def __init__(self, cap: int) -> None:
        self.cap = cap
        self.lru: OrderedDict[bytes, None] = OrderedDict()
        # Requests sent that end a batch, and ReadyForQuery received: batch n ends with the
        # n-th ReadyForQuery.
        self.sent_syncs = 0
        self.recv_z = 0
        # Parse and Close messages sent so far in the open (not yet synced) batch.
        self.batch_parses = 0
        self.batch_closes = 0
        self.open_specials: list[Special] = []
        self.fixups: dict[int, list[Special]] = {}
        # Statements bound per batch, as fixups: the culprits if the server reports a stale plan.
        self.open_binds: list[Statement] = []
        self.binds: dict[int, list[Statement]] = {}

    @property
    def settled(self) -> bool:
        """Every batch sent has been answered and nothing is booked for one not yet sent."""
        return self.sent_syncs == self.recv_z and not self.open_specials and not self.fixups

    def forget_all(self) -> None:
        """DEALLOCATE ALL / DISCARD ALL ran on the server."""
        self.lru.clear()
