"""Unit tests for the transaction-mode stream walkers: protocol.frontend.Frontend (client to
server: statement renaming, injected Parse, DEALLOCATE) and protocol.backend.Backend (server to
client: the fixups), with protocol.statements.Registry and ServerStatements in between.

Plain bytes only, written by hand from the PostgreSQL v3 message formats: no sockets, no
asyncio, no database.
"""

from __future__ import annotations

import itertools
import struct
from collections.abc import Callable, Iterable

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from sidecar.protocol.backend import Backend
from sidecar.protocol.errors import ProtocolError
from sidecar.protocol.frontend import (
    Q_ADVISORY,
    Q_DEALLOCATE,
    Q_DISCARD,
    Q_HOLD,
    Q_LISTEN,
    Q_PREPARE,
    Q_SET,
    Q_TEMP,
    Frontend,
    _plain_lowered,
    _plain_scan,
    classify,
    classify_fully,
    deallocate_target,
    local_prepare,
    single_request,
)
from sidecar.protocol.statements import Registry, ServerStatements

# --- hand-rolled wire encoding ------------------------------------------------------------------


def msg(typ: bytes, body: bytes = b"") -> bytes:
    return typ + struct.pack("!i", len(body) + 4) + body


def cstr(s: str | bytes) -> bytes:
    return (s.encode() if isinstance(s, str) else s) + b"\x00"


def i16(v: int) -> bytes:
    return struct.pack("!h", v)


def i32(v: int) -> bytes:
    return struct.pack("!i", v)


def parse_body(sql: str, types: Iterable[int] = ()) -> bytes:
    """A Parse body after the statement name: query text and parameter type OIDs."""
    types = list(types)
    return cstr(sql) + i16(len(types)) + b"".join(i32(t) for t in types)


def parse(name: str, sql: str, types: Iterable[int] = ()) -> bytes:
    return msg(b"P", cstr(name) + parse_body(sql, types))


def bind(statement: str, *params: bytes, portal: str = "") -> bytes:
    values = b"".join(i32(len(p)) + p for p in params)
    return msg(b"B", cstr(portal) + cstr(statement) + i16(0) + i16(len(params)) + values + i16(0))


def describe(kind: bytes, name: str) -> bytes:
    return msg(b"D", kind + cstr(name))


def execute(portal: str = "") -> bytes:
    return msg(b"E", cstr(portal) + i32(0))


def close(kind: bytes, name: str) -> bytes:
    return msg(b"C", kind + cstr(name))


def query(sql: str) -> bytes:
    return msg(b"Q", cstr(sql))


SYNC = msg(b"S")
FLUSH = msg(b"H")
TERMINATE = msg(b"X")

PARSE_COMPLETE = msg(b"1")
BIND_COMPLETE = msg(b"2")
CLOSE_COMPLETE = msg(b"3")
NO_DATA = msg(b"n")
EMPTY_QUERY = msg(b"I")
PARAMETER_DESCRIPTION = msg(b"t", i16(1) + i32(23))


def proxy_prepares(name: str, sql: str, types: Iterable[int] = ()) -> list[bytes]:
    """The messages the proxy sends to prepare its statement `name` on a server connection
    that lacks it (as far as the proxy knows)."""
    return [close(b"S", name), parse(name, sql, types)]


#: A server's answer to proxy_prepares() when the text parses.
PREPARED = CLOSE_COMPLETE + PARSE_COMPLETE


def ready(status: bytes = b"I") -> bytes:
    return msg(b"Z", status)


def complete(tag: str) -> bytes:
    return msg(b"C", cstr(tag))


def data_row(*values: bytes) -> bytes:
    return msg(b"D", i16(len(values)) + b"".join(i32(len(v)) + v for v in values))


def error(code: str = "42601", severity: str = "ERROR") -> bytes:
    fields = cstr("S" + severity) + cstr("V" + severity) + cstr("C" + code) + cstr("Mboom")
    return msg(b"E", fields + b"\x00")


def split_messages(data: bytes) -> list[bytes]:
    """Whole messages of a typed stream, each with its header."""
    out = []
    pos = 0
    while pos < len(data):
        (length,) = struct.unpack_from("!i", data, pos + 1)
        out.append(data[pos : pos + 1 + length])
        pos += 1 + length
    assert pos == len(data)
    return out


# --- a client, a server, and the walkers between them -----------------------------------------


class Link:
    """One client's Frontend in front of one server connection's bookkeeping and Backend.

    A client moving to another server is a new Link sharing its Frontend (and the pool's
    Registry)."""

    def __init__(
        self, registry: Registry, frontend: Frontend | None = None, cap: int = 200
    ) -> None:
        self.registry = registry
        self.fe = frontend if frontend is not None else Frontend(inspect=True)
        self.ctx = ServerStatements(cap)
        self.be = Backend()
        self.requests = 0

    def send(self, data: bytes) -> bytes:
        out, requests, _terminate = self.fe.feed(data, self.ctx, self.registry)
        self.requests += requests
        return out

    def recv(self, data: bytes) -> bytes:
        return self.be.feed(data, self.ctx)

    @property
    def lru(self) -> list[bytes]:
        return list(self.ctx.lru)

    def settled(self) -> bool:
        """Every batch sent has been answered and nothing is left to fix up."""
        c = self.ctx
        return c.sent_syncs == c.recv_z and not c.fixups and not c.open_specials


SELECT_ONE = "select $1::int + 1"
SELECT_TWO = "select $1::text"


def prepared(registry: Registry, link: Link | None = None, name: str = "s1") -> Link:
    """A link on which the client has prepared `name` AS SELECT_ONE (the server confirmed)."""
    link = link or Link(registry)
    link.send(parse(name, SELECT_ONE, [23]) + SYNC)
    assert link.recv(PREPARED + ready()) == PARSE_COMPLETE + ready()
    return link


# --- renaming, injection, stand-ins --------------------------------------------------------------


def test_named_parse_is_renamed_and_its_answer_passes() -> None:
    link = Link(Registry())
    out = link.send(parse("s1", SELECT_ONE, [23]) + describe(b"S", "s1") + SYNC)
    assert split_messages(out) == [
        *proxy_prepares("sidecar_1", SELECT_ONE, [23]),
        describe(b"S", "sidecar_1"),
        SYNC,
    ]
    assert link.requests == 1
    assert link.lru == [b"sidecar_1"]
    stmt = link.fe.statements[b"s1"]
    assert stmt.name == b"sidecar_1" and not stmt.confirmed
    answer = PARAMETER_DESCRIPTION + NO_DATA + ready()
    assert link.recv(PREPARED + answer) == PARSE_COMPLETE + answer
    assert stmt.confirmed and link.settled()
    # another client's Parse of the same text (and types) is a new generation, parsed again
    other = Link(link.registry)
    other.send(parse("theirs", SELECT_ONE, [23]) + SYNC)
    theirs = other.fe.statements[b"theirs"]
    assert theirs.name == b"sidecar_2" and theirs.rest == stmt.rest
    assert link.registry.newest(stmt) is theirs
    # other parameter types make another statement
    other.send(parse("typed", SELECT_ONE, [20]) + SYNC)
    assert other.fe.statements[b"typed"].name == b"sidecar_3"
    assert len(link.registry) == 2


def test_unnamed_statements_are_not_renamed() -> None:
    link = Link(Registry())
    data = parse("", SELECT_ONE) + bind("", b"1") + execute() + SYNC
    assert link.send(data) == data
    assert link.lru == [] and link.fe.statements == {}
    answer = PARSE_COMPLETE + BIND_COMPLETE + data_row(b"2") + complete("SELECT 1") + ready()
    assert link.recv(answer) == answer


def test_injected_parse_precedes_the_bind_and_its_answer_is_swallowed() -> None:
    registry = Registry()
    first = prepared(registry)
    # the client moves to a server that never saw the statement
    second = Link(registry, first.fe)
    out = second.send(bind("s1", b"41") + execute() + SYNC)
    assert split_messages(out) == [
        *proxy_prepares("sidecar_1", SELECT_ONE, [23]),
        bind("sidecar_1", b"41"),
        execute(),
        SYNC,
    ]
    assert second.lru == [b"sidecar_1"]
    rows = BIND_COMPLETE + data_row(b"42") + complete("SELECT 1") + ready()
    assert second.recv(PREPARED + rows) == rows
    assert second.settled()
    # now the server has it: the next Bind goes as is (renamed)
    assert second.send(bind("s1", b"1") + execute() + SYNC) == (
        bind("sidecar_1", b"1") + execute() + SYNC
    )
    assert second.recv(rows) == rows


def test_injected_parse_before_a_statement_describe() -> None:
    registry = Registry()
    first = prepared(registry)
    second = Link(registry, first.fe)
    out = second.send(describe(b"S", "s1") + SYNC)
    assert split_messages(out) == [
        *proxy_prepares("sidecar_1", SELECT_ONE, [23]),
        describe(b"S", "sidecar_1"),
        SYNC,
    ]
    answer = PARAMETER_DESCRIPTION + NO_DATA + ready()
    assert second.recv(PREPARED + answer) == answer
    # portals are not statements: Describe/Close of a portal passes as is
    data = describe(b"P", "s1") + close(b"P", "s1") + SYNC
    assert second.send(data) == data


def test_parse_of_a_text_the_server_has_is_parsed_again_under_a_new_name() -> None:
    """The server's copy was planned before this client's Parse, maybe before a schema change
    (0A000 / XX000 for a client that PostgreSQL would give a fresh plan): parse it afresh."""
    registry = Registry()
    link = prepared(registry)
    again = Link(registry)
    again.ctx = link.ctx
    again.be = link.be
    out = again.send(parse("mine", SELECT_ONE, [23]) + bind("mine", b"1") + execute() + SYNC)
    assert split_messages(out) == [
        *proxy_prepares("sidecar_2", SELECT_ONE, [23]),
        bind("sidecar_2", b"1"),
        execute(),
        SYNC,
    ]
    rows = BIND_COMPLETE + data_row(b"2") + complete("SELECT 1") + ready()
    assert again.recv(PREPARED + rows) == PARSE_COMPLETE + rows
    assert again.fe.statements[b"mine"].name == b"sidecar_2"
    assert link.lru == [b"sidecar_1", b"sidecar_2"]
    # the first client keeps its own generation where the server has it
    assert link.send(bind("s1", b"1") + SYNC) == bind("sidecar_1", b"1") + SYNC


def test_a_miss_moves_the_client_to_the_newest_generation() -> None:
    registry = Registry()
    first = prepared(registry)  # sidecar_1
    second = prepared(registry, name="s2")  # sidecar_2, another client on another server
    assert second.fe.statements[b"s2"].name == b"sidecar_2"
    # the first client on the second server: it lacks sidecar_1 but has the newer sidecar_2,
    # prepared after the first client's Parse
    moved = Link(registry, first.fe)
    moved.ctx, moved.be = second.ctx, second.be
    assert moved.send(bind("s1", b"1") + SYNC) == bind("sidecar_2", b"1") + SYNC
    assert first.fe.statements[b"s1"].name == b"sidecar_2"
    assert moved.recv(BIND_COMPLETE + ready()) == BIND_COMPLETE + ready()
    # on a third server with neither, the newest is prepared
    third = Link(registry, first.fe)
    assert split_messages(third.send(describe(b"S", "s1") + SYNC)) == [
        *proxy_prepares("sidecar_2", SELECT_ONE, [23]),
        describe(b"S", "sidecar_2"),
        SYNC,
    ]


def test_a_copy_older_than_the_clients_parse_is_never_used() -> None:
    """Server A prepared the text (sidecar_1) before client B's Parse (maybe before a schema
    change): B's Bind on A prepares B's generation there rather than use sidecar_1."""
    registry = Registry()
    server_a = prepared(registry)  # sidecar_1
    b_on_other = prepared(registry, name="b")  # client B parses elsewhere: sidecar_2
    b_on_a = Link(registry, b_on_other.fe)
    b_on_a.ctx, b_on_a.be = server_a.ctx, server_a.be
    assert split_messages(b_on_a.send(bind("b", b"1") + SYNC)) == [
        *proxy_prepares("sidecar_2", SELECT_ONE, [23]),
        bind("sidecar_2", b"1"),
        SYNC,
    ]
    assert b_on_a.recv(PREPARED + BIND_COMPLETE + ready()) == BIND_COMPLETE + ready()
    assert server_a.ctx.by_text[parse_body(SELECT_ONE, [23])].name == b"sidecar_2"


def test_any_copy_newer_than_the_clients_parse_serves_it() -> None:
    """Clients keep parsing the text (sidecar_2, sidecar_3 ...): an older client takes
    whichever generation a server has, as long as it is newer than its own Parse."""
    registry = Registry()
    old_client = prepared(registry)  # sidecar_1
    later = [prepared(registry, name=f"c{k}") for k in range(3)]  # sidecar_2 .. sidecar_4
    for link, name in zip(later, ("sidecar_2", "sidecar_3", "sidecar_4"), strict=True):
        moved = Link(registry, old_client.fe)
        moved.ctx, moved.be = link.ctx, link.be
        assert moved.send(bind("s1", b"1") + SYNC) == bind(name, b"1") + SYNC
        assert moved.recv(BIND_COMPLETE + ready()) == BIND_COMPLETE + ready()


def test_client_close_of_a_statement_is_its_own() -> None:
    registry = Registry()
    link = prepared(registry)
    data = close(b"S", "s1") + SYNC
    assert link.send(data) == data  # Close of a name the server does not know: a no-op there
    assert b"s1" not in link.fe.statements
    assert link.lru == [b"sidecar_1"], "the server keeps it for other clients"
    assert link.recv(CLOSE_COMPLETE + ready()) == CLOSE_COMPLETE + ready()
    # and a Bind of it is now the client's unknown name, for the server to refuse (26000)
    data = bind("s1") + execute() + SYNC
    assert link.send(data) == data


def test_bind_of_an_unknown_name_passes_unchanged() -> None:
    link = Link(Registry())
    data = bind("never") + execute() + describe(b"S", "never") + SYNC
    assert link.send(data) == data
    assert link.lru == []


def test_terminate_ends_the_stream() -> None:
    link = prepared(Registry())
    out, requests, terminate = link.fe.feed(
        bind("s1", b"1") + execute() + SYNC + TERMINATE + query("select 1"), link.ctx, link.registry
    )
    assert out == bind("sidecar_1", b"1") + execute() + SYNC
    assert (requests, terminate) == (1, True)


def test_pass_through_without_statement_context() -> None:
    """max_prepared_statements = 0: names go to the server as the client wrote them."""
    fe = Frontend(inspect=True)
    data = parse("s1", SELECT_ONE) + bind("s1", b"1") + execute() + close(b"S", "s1") + SYNC
    out, requests, terminate = fe.feed(data)
    assert (out, requests, terminate) == (data, 1, False)
    be = Backend()
    answer = PARSE_COMPLETE + BIND_COMPLETE + complete("SELECT 1") + CLOSE_COMPLETE + ready()
    assert be.feed(answer) == answer
    assert (be.zs, be.xacts) == (1, 1)


# --- the per-server LRU -------------------------------------------------------------------------


def test_lru_evicts_the_oldest_with_a_swallowed_close() -> None:
    registry = Registry()
    link = Link(registry, cap=2)
    texts = [f"select {k}" for k in range(3)]
    for k, sql in enumerate(texts[:2]):
        link.send(parse(f"s{k}", sql) + SYNC)
        link.recv(PREPARED + ready())
    assert link.lru == [b"sidecar_1", b"sidecar_2"]
    # using s0 makes s1's statement the oldest
    link.send(bind("s0") + execute() + SYNC)
    link.recv(BIND_COMPLETE + complete("SELECT 1") + ready())
    out = link.send(parse("s2", texts[2]) + SYNC)
    assert split_messages(out) == [
        close(b"S", "sidecar_2"),
        *proxy_prepares("sidecar_3", texts[2]),
        SYNC,
    ]
    assert link.lru == [b"sidecar_1", b"sidecar_3"]
    assert link.recv(CLOSE_COMPLETE + PREPARED + ready()) == PARSE_COMPLETE + ready()
    # the evicted one is prepared again when its client uses it
    out = link.send(bind("s1") + execute() + SYNC)
    assert split_messages(out) == [
        close(b"S", "sidecar_1"),
        *proxy_prepares("sidecar_2", texts[1]),
        bind("sidecar_2"),
        execute(),
        SYNC,
    ]
    rows = BIND_COMPLETE + complete("SELECT 1") + ready()
    assert link.recv(CLOSE_COMPLETE + PREPARED + rows) == rows
    assert link.settled()


def test_error_mid_batch_forgets_statements_the_server_never_parsed() -> None:
    registry = Registry()
    link = prepared(registry, name="s0")  # sidecar_1, confirmed on this server
    batch = (
        parse("s1", "select 1")
        + bind("s1")
        + execute()
        + parse("s2", "select 2")  # skipped by the server after the error
        + bind("s2")
        + execute()
        + SYNC
    )
    link.send(batch)
    assert link.lru == [b"sidecar_1", b"sidecar_2", b"sidecar_3"]
    answer = BIND_COMPLETE + error("22012") + ready()
    assert link.recv(PREPARED + answer) == PARSE_COMPLETE + answer
    assert link.lru == [b"sidecar_1", b"sidecar_2"]
    assert set(link.fe.statements) == {b"s0", b"s1"}, "s2 never existed for the client"
    assert link.settled()
    # s2 is parsed again next time (a Parse is always a new generation)
    out = link.send(parse("s2", "select 2") + SYNC)
    assert split_messages(out) == [*proxy_prepares("sidecar_4", "select 2"), SYNC]


def test_error_before_an_injected_parse_forgets_it_but_keeps_the_clients_name() -> None:
    registry = Registry()
    first = prepared(registry)
    second = Link(registry, first.fe)
    second.send(parse("", "select 1/0") + bind("") + execute() + bind("s1", b"1") + SYNC)
    assert second.lru == [b"sidecar_1"]
    answer = PARSE_COMPLETE + error("22012") + ready()
    assert second.recv(answer) == answer
    assert second.lru == [] and second.settled()
    assert second.fe.statements[b"s1"].name == b"sidecar_1"
    # so the next use injects the Parse again
    assert split_messages(second.send(bind("s1", b"1") + SYNC)) == [
        *proxy_prepares("sidecar_1", SELECT_ONE, [23]),
        bind("sidecar_1", b"1"),
        SYNC,
    ]


def test_failed_parse_of_a_client_statement() -> None:
    link = Link(Registry())
    link.send(parse("bad", "selec 1") + SYNC)
    assert link.recv(error("42601") + ready()) == error("42601") + ready()
    assert link.lru == [] and link.fe.statements == {}
    assert not link.registry.known(parse_body("selec 1"))


def test_eviction_close_skipped_by_an_error() -> None:
    registry = Registry()
    link = Link(registry, cap=2)
    for k in range(2):
        link.send(parse(f"s{k}", f"select {k}") + SYNC)
        link.recv(PREPARED + ready())
    # s2 evicts s0 (sidecar_1), but the error before it makes the server skip that Close
    link.send(
        parse("", "select 1/0")
        + bind("")
        + execute()
        + parse("s2", "select 2")
        + bind("s2")
        + execute()
        + SYNC
    )
    link.recv(PARSE_COMPLETE + error("22012") + ready())
    # the server still has sidecar_1: bringing s0 back must not be a bare Parse of it
    sent = split_messages(link.send(bind("s0") + execute() + SYNC))
    parses = [i for i, m in enumerate(sent) if m == parse("sidecar_1", "select 0")]
    for i in parses:
        assert close(b"S", "sidecar_1") in sent[:i], "Parse of a statement the server has"


# --- DEALLOCATE and DISCARD ----------------------------------------------------------------------


def test_deallocate_of_a_client_statement_is_replaced_by_an_empty_query() -> None:
    registry = Registry()
    link = prepared(registry)
    out = link.send(query("DEALLOCATE s1"))
    assert out == query("")
    assert link.fe.statements == {}
    assert link.lru == [b"sidecar_1"], "other clients' statement stays on the server"


def test_deallocate_stand_in_is_answered_as_deallocate() -> None:
    registry = Registry()
    link = prepared(registry)
    link.send(query("DEALLOCATE s1"))
    assert link.recv(EMPTY_QUERY + ready()) == complete("DEALLOCATE") + ready()


def test_deallocate_all_and_discard_all_forget_the_servers_statements() -> None:
    for sql in ("DEALLOCATE ALL", "discard all", "DEALLOCATE PREPARE ALL;"):
        registry = Registry()
        link = prepared(registry)
        assert link.send(query(sql)) == query(sql)  # the server runs it
        assert link.fe.statements == {} and link.lru == []
        answer = complete(sql.rstrip(";").upper()) + ready()
        assert link.recv(answer) == answer


def test_deallocate_of_an_unknown_name_goes_to_the_server() -> None:
    """An SQL-level PREPARE'd name (the client is pinned) or a mistake: the server answers."""
    link = prepared(Registry())
    assert link.send(query("DEALLOCATE sql_level")) == query("DEALLOCATE sql_level")
    assert b"s1" in link.fe.statements


@pytest.mark.parametrize(
    ("sql", "target"),
    [
        ("DEALLOCATE s1", b"s1"),
        ("deallocate prepare S1", b"s1"),
        ('DEALLOCATE "Mixed""Case"', b'Mixed"Case'),
        ("  DEALLOCATE s1 ;  ", b"s1"),
        ("DEALLOCATE ALL", b""),
        ("deallocate prepare all", b""),
        ("DEALLOCATE s1; select 1", None),
        ("select 1", None),
    ],
)
def test_deallocate_target(sql: str, target: bytes | None) -> None:
    assert deallocate_target(sql.encode()) == target


# --- session effects: classify() -------------------------------------------------------------

SET_CASES = [
    ("SET TIME ZONE 'Asia/Tokyo'", ["timezone"]),
    ("set time  zone local", ["timezone"]),
    ("SET search_path TO myschema, public", ["search_path"]),
    ("set SESSION statement_timeout = '5s'", ["statement_timeout"]),
    ("SET statement_timeout TO DEFAULT", ["statement_timeout"]),
    ("RESET statement_timeout", ["statement_timeout"]),
    ("/* controller:users,action:show */ SET search_path = app", ["search_path"]),
    ("-- tag\n  set work_mem = '8MB'", ["work_mem"]),
    ("RESET ALL", ["all"]),
    ("SET myapp.tenant = 'acme'", ["myapp.tenant"]),
    ("select 1; SET DateStyle = 'ISO, DMY'", ["datestyle"]),
    ("select set_config('search_path', 'a', false)", ["search_path"]),
    ("SELECT pg_catalog.set_config( 'MyApp.Tenant' , $1, false)", ["myapp.tenant"]),
]


@pytest.mark.parametrize(("sql", "names"), SET_CASES)
def test_classify_set(sql: str, names: list[str]) -> None:
    assert classify(sql.encode()) == (Q_SET, names)


@pytest.mark.parametrize(
    "sql",
    [
        "select 1",
        "UPDATE t SET x = 1",
        "update t\nset x = 1 where id = 2",
        "INSERT INTO t VALUES (1) ON CONFLICT (id) DO UPDATE SET x = 1",
        "SET LOCAL statement_timeout = '1s'",
        "set local time zone 'UTC'",
        "SET TRANSACTION ISOLATION LEVEL SERIALIZABLE",
        "SET CONSTRAINTS ALL DEFERRED",
        "select * from t offset 5",
        "select * from settings_table",
        "select pg_advisory_xact_lock(1)",
        "select pg_advisory_unlock(1), pg_advisory_unlock_all()",
        "select * from temperatures",
        "DECLARE c CURSOR WITHOUT HOLD FOR select 1",
        "UNLISTEN ch",
        "select 'listening'",
        "PREPARE TRANSACTION 'x'",
        "DISCARD TEMP",
        "select 'hold', 'temp', 'listen'",
    ],
)
def test_classify_nothing(sql: str) -> None:
    assert classify(sql.encode()) == (0, [])


@pytest.mark.parametrize(
    ("sql", "flags"),
    [
        ("select pg_advisory_lock(1)", Q_ADVISORY),
        ("SELECT pg_try_advisory_lock(1, 2)", Q_ADVISORY),
        ("select pg_advisory_lock_shared ($1)", Q_ADVISORY),
        ("select pg_try_advisory_lock_shared(1)", Q_ADVISORY),
        ("CREATE TEMP TABLE x (n int)", Q_TEMP),
        ("create temporary table x as select 1", Q_TEMP),
        ("CREATE LOCAL TEMPORARY TABLE x (n int)", Q_TEMP),
        ("create global temp table x (n int)", Q_TEMP),
        # flagged: the check query after the transaction finds nothing left, so no pin
        ("CREATE TEMP TABLE x (n int) ON COMMIT DROP", Q_TEMP),
        ("create temp view v as select 1", Q_TEMP),
        ("DECLARE c CURSOR WITH HOLD FOR select 1", Q_HOLD),
        ('declare "c" no scroll cursor with\thold for select 1', Q_HOLD),
        ("LISTEN ch", Q_LISTEN),
        ("select 1;listen ch", Q_LISTEN),
        ("PREPARE p AS select 1", Q_PREPARE),
        ("prepare p(int) as select $1", Q_PREPARE),
        ("DISCARD ALL", Q_DISCARD),
        ("DEALLOCATE p", Q_DEALLOCATE),
        ("deallocate all", Q_DEALLOCATE),
        ("LISTEN a; select pg_advisory_lock(1)", Q_LISTEN | Q_ADVISORY),
        ("/* app:web */ LISTEN ch", Q_LISTEN),
        ("/* a */ /* b */\ndiscard all", Q_DISCARD),
        ("EXPLAIN ANALYZE CREATE TEMP TABLE x AS SELECT 1", Q_TEMP),
        ("select * into temp t from x", Q_TEMP),
        ("SELECT a INTO TEMPORARY TABLE t FROM x", Q_TEMP),
    ],
)
def test_classify_session_state(sql: str, flags: int) -> None:
    assert classify(sql.encode()) == (flags, [])


# Pieces of query texts that _plain looks at: its words in any case, cut short, at the end,
# the first-word prefixes, semicolons and blanks.
_PLAIN_PIECES = [
    "select", "SELECT", "Select", "set", "RESET", "listen", "prepare", "discard", "Declare",
    "advisory", "ADVISORY", "advisor", "set_config", "SET_CONFIG", "set_confi", "temp", "TEMP",
    "tem", "pg_advisory_lock(", "x", "1", "insert", "with", ";", ";;", " ", "\t", "\n", "\r",
    "/* c */", "-- c\n", "'a'", "\xc9", "\x00",
]  # fmt: skip


@settings(max_examples=400, deadline=None)
@given(st.lists(st.sampled_from(_PLAIN_PIECES), max_size=12))
def test_plain_scan_agrees_with_the_lowered_scans(pieces: list[str]) -> None:
    # The compiled build's one-pass scan and the pure build's scans of a lowered copy: the
    # same answer for every text (each build runs one of them in classify).
    sql = "".join(pieces).encode("latin-1")
    assert _plain_scan(sql) == _plain_lowered(sql), sql


def test_frontend_notes_effects_of_queries_and_parses() -> None:
    link = Link(Registry())
    link.send(query("SET search_path TO a") + parse("", "select pg_advisory_lock(1)") + SYNC)
    assert link.fe.flags == Q_SET | Q_ADVISORY and link.fe.set_names == ["search_path"]
    link.fe.flags, link.fe.set_names = 0, []
    link.send(parse("s", "SET TIME ZONE 'UTC'") + SYNC)
    assert (link.fe.flags, link.fe.set_names) == (Q_SET, ["timezone"])


def test_frontend_notes_effects_when_a_prepared_statement_runs() -> None:
    link = Link(Registry())
    link.send(parse("set_tenant", "select set_config('myapp.tenant', $1, false)") + SYNC)
    link.send(parse("lock", "select pg_advisory_lock($1)") + SYNC)
    link.recv(PREPARED + ready() + PREPARED + ready())
    link.fe.flags, link.fe.set_names = 0, []  # the pool looked after those batches
    link.send(bind("set_tenant", b"acme") + execute() + bind("lock", b"1") + execute() + SYNC)
    assert (link.fe.flags, link.fe.set_names) == (Q_SET | Q_ADVISORY, ["myapp.tenant"])


# --- answering prepares without a server -------------------------------------------------------


def test_local_prepare() -> None:
    registry = Registry()
    prepared(registry)  # confirmed by a server
    known = parse("mine", SELECT_ONE, [23])
    result = local_prepare(known + parse("again", SELECT_ONE, [23]) + SYNC, registry)
    assert result is not None
    # new generations, parsed by a server at their first use
    assert [(name, stmt.name) for name, stmt in result] == [
        (b"mine", b"sidecar_2"),
        (b"again", b"sidecar_3"),
    ]
    assert all(stmt.confirmed for _name, stmt in result)
    for data in (
        known,  # no Sync
        known + FLUSH,
        known + bind("mine") + SYNC,  # more than prepares
        parse("x", "select 42") + SYNC,  # never accepted by a server
        parse("", SELECT_ONE, [23]) + SYNC,  # the unnamed statement
        parse("mine", SELECT_ONE) + SYNC,  # other parameter types
        SYNC,
    ):
        assert local_prepare(data, registry) is None, data
    # a text with session effects always goes to a server
    lock = Link(registry)
    lock.send(parse("l", "select pg_advisory_lock(1)") + SYNC)
    lock.recv(PREPARED + ready())
    assert local_prepare(parse("l2", "select pg_advisory_lock(1)") + SYNC, registry) is None


# --- stream splitting: every boundary gives the same bytes ----------------------------------------


def _client_script() -> tuple[Callable[[], Link], bytes, bytes]:
    """(fresh link, client bytes, server answer) for a session touching every rewrite.

    The link's server (LRU cap 2) starts with s0 = "select 0" prepared as sidecar_1.
    """
    client = (
        # batch 1: a new statement (renamed), then one that evicts sidecar_1
        parse("s1", SELECT_ONE, [23])  # sidecar_2
        + bind("s1", b"1")
        + describe(b"P", "")
        + execute()
        + parse("s2", "select 2")  # sidecar_3: Close sidecar_1 first
        + bind("s2")
        + execute()
        + SYNC
        # batch 2: a Parse the server has (stand-in Close), a Bind of the evicted s0
        + parse("s1b", SELECT_ONE, [23])
        + bind("s1b", b"x" * 300)
        + execute()
        + bind("s0")  # Close sidecar_3, Parse sidecar_1 injected
        + execute()
        + SYNC
        + query("SET search_path TO a")
        + query("DEALLOCATE ALL")
        # batch 5: prepare again after DEALLOCATE ALL, and close it
        + parse("s1", SELECT_ONE, [23])
        + bind("s1", b"2")
        + execute()
        + close(b"S", "s1")
        + SYNC
        + parse("s3", "select 3")
        + SYNC
        + query("DEALLOCATE s3")  # a stand-in empty query
        + TERMINATE
    )
    server = (
        PREPARED
        + BIND_COMPLETE
        + NO_DATA
        + complete("SELECT 1")
        + msg(b"S", cstr("TimeZone") + cstr("UTC"))  # asynchronous messages mid-batch
        + msg(b"N", cstr("SNOTICE") + cstr("Mhello") + b"\x00")
        + CLOSE_COMPLETE  # eviction of sidecar_1: swallowed
        + PREPARED
        + BIND_COMPLETE
        + complete("SELECT 1")
        + ready()
        + CLOSE_COMPLETE  # the stand-in: becomes ParseComplete
        + BIND_COMPLETE
        + data_row(b"y" * 500)
        + complete("SELECT 1")
        + CLOSE_COMPLETE  # eviction of sidecar_3: swallowed
        + PREPARED  # injected: swallowed
        + BIND_COMPLETE
        + complete("SELECT 1")
        + ready()
        + complete("SET")
        + ready()
        + complete("DEALLOCATE ALL")
        + ready()
        + PREPARED
        + BIND_COMPLETE
        + data_row(b"2")
        + complete("SELECT 1")
        + CLOSE_COMPLETE  # the client's own Close
        + ready()
        + PREPARED
        + ready()
        + EMPTY_QUERY  # the stand-in's answer
        + ready()
    )

    def make() -> Link:
        registry = Registry()
        link = Link(registry, cap=2)
        link.send(parse("s0", "select 0") + SYNC)
        link.recv(PREPARED + ready())
        link.requests = 0
        return link

    return make, client, server


REQUESTS = 7


def _chunkings(n: int) -> Iterable[list[int]]:
    """Cut points: every single one, and byte by byte."""
    for cut in range(1, n):
        yield [cut]
    yield list(range(1, n))


def _pieces(data: bytes, cuts: list[int]) -> list[bytes]:
    bounds = [0, *cuts, len(data)]
    return [data[a:b] for a, b in itertools.pairwise(bounds)]


def _state(link: Link) -> tuple[object, ...]:
    c = link.ctx
    fixups = {
        k: [(s.kind, s.ordinal, s.fix, s.stmt and s.stmt.name, s.tag) for s in v]
        for k, v in c.fixups.items()
    }
    return (
        list(c.lru),
        c.sent_syncs,
        c.recv_z,
        fixups,
        sorted((k, s.name) for k, s in link.fe.statements.items()),
        link.fe.flags,
        list(link.fe.set_names),
        link.fe.dirty_tail,
    )


def test_frontend_split_at_every_boundary() -> None:
    make, client, _ = _client_script()
    whole = make()
    expected = whole.send(client)
    expected_state = _state(whole)
    assert whole.requests == REQUESTS
    assert expected.endswith(query("")), "Terminate is not forwarded"
    for cuts in _chunkings(len(client)):
        link = make()
        out = b"".join(link.send(piece) for piece in _pieces(client, cuts))
        assert out == expected, f"cut at {cuts[:3]}..."
        assert _state(link) == expected_state, f"cut at {cuts[:3]}..."
        assert link.requests == REQUESTS


def test_backend_split_at_every_boundary() -> None:
    make, client, server = _client_script()
    whole = make()
    whole.send(client)
    expected = whole.recv(server)
    expected_state = _state(whole)
    assert whole.be.at_boundary and whole.settled()
    # the rewrites happened: stand-in answered as ParseComplete, injected answers dropped
    kinds = [m[:1] for m in split_messages(expected)]
    assert kinds.count(b"3") == 1, "only the client's own Close answer is left"
    assert kinds.count(b"1") == 5, "s1, s2, the stand-in, s1 again, s3"
    for cuts in _chunkings(len(server)):
        link = make()
        link.send(client)
        out = b"".join(link.recv(piece) for piece in _pieces(server, cuts))
        assert out == expected, f"cut at {cuts[:3]}..."
        assert _state(link) == expected_state, f"cut at {cuts[:3]}..."


# --- batch state: when may the server serve another client ---------------------------------


@pytest.mark.parametrize(
    ("chunks", "dirty"),
    [
        ([parse("", "SELECT 1") + msg(b"S")], False),
        ([parse("", "SELECT 1")], True),
        ([msg(b"H", b"-"), msg(b"d", b"x")], True),  # copy messages do not end a batch
        ([msg(b"D", b""), msg(b"c")], True),
        ([msg(b"E", b"\x00\x00\x00\x00\x00") + msg(b"f", b"x\x00")], True),
        ([execute(), msg(b"S") + msg(b"d", b"x")], False),  # no CopyInResponse: Sync counts
        ([query("SELECT 1") + msg(b"d", b"x")], False),
        ([msg(b"S") + msg(b"d", b"x" * 100)[:20]], True),  # inside a message
    ],
)
def test_frontend_knows_when_the_batch_is_open(chunks: list[bytes], dirty: bool) -> None:
    fe = Frontend(inspect=True)
    for chunk in chunks:
        fe.feed(chunk)
    assert fe.dirty_tail is dirty


def test_frontend_copy_data_after_copy_in_reopens_the_batch() -> None:
    # Execute of COPY FROM STDIN, Sync, then the server says CopyInResponse: the Sync is
    # ignored by PostgreSQL, so the batch stays open until the Sync after CopyDone.
    fe = Frontend(inspect=True)
    _, requests, _ = fe.feed(execute() + msg(b"S"))
    assert requests == 1 and not fe.dirty_tail
    _, requests, _ = fe.feed(msg(b"d", b"1\n"), copy_in=True)
    assert requests == -1 and fe.dirty_tail
    fe.feed(msg(b"c"), copy_in=True)
    assert fe.dirty_tail
    _, requests, _ = fe.feed(msg(b"S"), copy_in=True)
    assert requests == 1 and not fe.dirty_tail


@pytest.mark.parametrize("typ", [b"\x00", b"Z", b"p", b"?", b"\xff"])
def test_frontend_rejects_message_types_no_client_sends(typ: bytes) -> None:
    with pytest.raises(ProtocolError, match="invalid frontend message type"):
        Frontend(inspect=False).feed(msg(b"S") + msg(typ, b"x"))


_STATEMENTS = [
    "SELECT 1",
    "select abalance from pgbench_accounts where aid = 1",
    "UPDATE t SET x = 1",
    "update t\nset x = 1 where id = 2",
    "insert into settings values ('hold', 'temp')",
    "set x = 1",
    "SET search_path = x",
    "Set time zone 'UTC'",
    "RESET ALL",
    "reset x",
    "listen x",
    "PREPARE p AS SELECT 1",
    "prepare transaction 'x'",
    "DISCARD ALL",
    "deallocate p",
    "DEALLOCATE ALL",
    "create temp table t (x int)",
    "CREATE GLOBAL TEMPORARY TABLE t ()",
    "create table t (x int)",
    "declare c cursor for select 1",
    "DECLARE c CURSOR WITH HOLD FOR SELECT 1",
    "select pg_advisory_lock(1)",
    "SELECT PG_TRY_ADVISORY_LOCK_SHARED (2)",
    "select set_config('a.b', 'c', false)",
    "select * into temp t from x",
    "SELECT * INTO TEMPORARY t FROM x",
    "explain analyze create temp table t as select 1",
    "begin",
    "COMMIT",
    "with x as (select 1) select * from x",
    "do $$begin perform pg_advisory_lock(1); end$$",
]
_PREFIXES = ["", " ", "\n\t", "/* app:web */ ", "-- tag\n", "/* a */ /* b */\n"]


@settings(max_examples=500, deadline=None, database=None)
@given(
    st.lists(
        st.tuples(st.sampled_from(_PREFIXES), st.sampled_from(_STATEMENTS)),
        min_size=1,
        max_size=3,
    ),
    st.sampled_from(["", ";", "; ", ";\n"]),
)
def test_first_look_never_hides_a_session_effect(
    statements: list[tuple[str, str]], end: str
) -> None:
    sql = ("; ".join(prefix + text for prefix, text in statements) + end).encode()
    assert classify(sql) == classify_fully(sql), sql


@pytest.mark.parametrize(
    "sql", ["SET search_path = public; DEALLOCATE ALL", "select 1;\n/* x */ deallocate prepare all"]
)
def test_deallocate_all_among_other_statements_forgets_them_too(sql: str) -> None:
    link = prepared(Registry())
    assert link.send(query(sql)) == query(sql)  # the server runs it
    assert link.fe.statements == {} and link.lru == []


def test_set_session_authorization_is_tracked_by_its_setting_name() -> None:
    assert classify(b"SET SESSION AUTHORIZATION bob") == (Q_SET, ["session_authorization"])
    assert classify(b"reset session authorization") == (Q_SET, ["session_authorization"])


def test_single_request() -> None:
    batch = parse("", "select 1") + bind("") + execute() + SYNC
    assert single_request(query("select 1"))
    assert single_request(batch)
    assert not single_request(batch + query("select 2"))  # pipelined: two requests
    assert not single_request(batch[:-1])  # cut short
    assert not single_request(parse("", "select 1"))  # no request yet
    assert not single_request(query("copy t from stdin") + msg(b"d", b"1\n"))


def test_an_error_that_mentions_fatal_is_not_fatal() -> None:
    # Severity is a field, not a word: RAISE EXCEPTION 'SFATAL' after a ReadyForQuery I is an
    # ordinary error the client gets, not a server going away.
    be = Backend()
    text_error = msg(b"E", b"SERROR\x00VERROR\x00CP0001\x00MSFATAL\x00\x00")
    out = be.feed(ready() + text_error, None)
    assert out == ready() + text_error and not be.fatal_cut
    fatal = msg(b"E", b"SFATAL\x00VFATAL\x00C57P01\x00Mterminating\x00\x00")
    localized = msg(b"E", b"SSCHWERWIEGEND\x00VFATAL\x00C57P01\x00Mx\x00\x00")
    for err in (fatal, localized):
        be = Backend()
        assert be.feed(ready() + err, None) == ready() and be.fatal_cut and be.cut == err


def test_parse_without_the_querys_nul_is_refused() -> None:
    # Without the check, the query text ran on into the next messages (a LISTEN there would
    # have been noted as this statement's effect).
    bad = msg(b"P", b"s1\x00select 1")  # no NUL after the query, no parameter count
    with pytest.raises(ProtocolError, match="invalid string"):
        Frontend(inspect=True).feed(bad + query("LISTEN x"))


# --- notifications --------------------------------------------------------------------------------


def test_notification_from_the_backend_itself_names_the_clients_pid() -> None:
    be = Backend()
    be.own_pid, be.client_pid = 4242, 777

    def notify(pid: int, payload: str) -> bytes:
        return msg(b"A", i32(pid) + cstr("chan") + cstr(payload))

    rows = data_row(b"1") + complete("SELECT 1")
    out = be.feed(rows + notify(4242, "mine") + notify(9999, "theirs") + ready())
    assert out == rows + notify(777, "mine") + notify(9999, "theirs") + ready()
    # split anywhere, the same
    whole = notify(4242, "x") + ready()
    assert be.feed(whole[:3]) + be.feed(whole[3:7]) + be.feed(whole[7:]) == (
        notify(777, "x") + ready()
    )
    # no client linked: as is
    be.client_pid = 0
    assert be.feed(whole) == whole


def test_second_parse_of_a_name_in_use_is_refused_as_postgresql_does() -> None:
    link = prepared(Registry())
    out = link.send(parse("s1", "select 2") + bind("s1") + SYNC)
    assert split_messages(out) == [parse("sidecar_1", "select 2"), bind("sidecar_1"), SYNC]

    def exists(name: str) -> bytes:
        fields = cstr("SERROR") + cstr("VERROR") + cstr("C42P05")
        fields += cstr(f'Mprepared statement "{name}" already exists')
        return msg(b"E", fields + b"\x00")

    assert link.recv(exists("sidecar_1") + ready()) == exists("s1") + ready()
    assert link.fe.statements[b"s1"].name == b"sidecar_1" and link.settled()
    # on a server that lacks the client's statement, it is prepared first
    moved = Link(link.registry, link.fe)
    assert split_messages(moved.send(parse("s1", "select 2") + SYNC)) == [
        *proxy_prepares("sidecar_1", SELECT_ONE, [23]),
        parse("sidecar_1", "select 2"),
        SYNC,
    ]
    assert moved.recv(PREPARED + exists("sidecar_1") + ready()) == exists("s1") + ready()
