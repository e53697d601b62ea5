"""The admin console's sessions: the wire side of the virtual `sidecar` / `pgbouncer` database.

One `AdminSession` per console connection frames the client's messages and speaks the simple
query protocol and enough of the extended one (named statements and portals, Describe) for
psycopg 3 and asyncpg; the command table (control.tables.Console) plans and runs each
statement. PAUSE is the one command that waits (for busy servers to come back): this
connection answers nothing else until it completes, while other connections are served.
"""

from __future__ import annotations

import asyncio
import time
from collections.abc import Awaitable, Callable, Sequence
from dataclasses import dataclass
from typing import TYPE_CHECKING

from .. import __version__, log
from ..dataplane.client import ClientState
from ..protocol import messages as m
from ..protocol import rows as r
from ..protocol.errors import (
    FEATURE_NOT_SUPPORTED,
    INTERNAL_ERROR,
    PROTOCOL_VIOLATION,
    SYNTAX_ERROR,
    ProtocolError,
)
from ..protocol.rows import Column
from .commands import (
    EMPTY_PLAN,
    AdminError,
    Plan,
    Result,
    RunResult,
    Token,
    split_statements,
    tokenize,
)
from .tables import RELOADABLE, RELOADABLE_POOL, Console

if TYPE_CHECKING:
    from ..dataplane.client import ClientConn
    from ..dataplane.proxy import Proxy

logger = log.get()

#: The console's statements are short; a bigger message is garbage, not a query.
MAX_MESSAGE = 1 << 20
DUPLICATE_PREPARED_STATEMENT = "42P05"
DUPLICATE_CURSOR = "42P03"
INVALID_SQL_STATEMENT_NAME = "26000"
INVALID_CURSOR_NAME = "34000"

_Q, _P, _B, _D, _E, _S, _C, _H, _X, _F = (ord(c) for c in "QPBDESCHXF")
_COPY_MESSAGES = (ord("d"), ord("c"), ord("f"))


# -- the connection ------------------------------------------------------------------------


@dataclass(slots=True)
class _Statement:
    plan: Plan
    param_types: tuple[int, ...]


@dataclass(slots=True)
class _Portal:
    plan: Plan
    formats: tuple[int, ...]
    result: Result | None = None
    sent: int = 0  #: rows already sent (Execute with a row limit)


class AdminSession:
    """One console connection: message framing, the query protocols, replies."""

    def __init__(self, proxy: Proxy, client: ClientConn) -> None:
        self.proxy = proxy
        self.client = client
        self.console = Console(proxy, client)
        self._reader = m.MessageReader(max_length=MAX_MESSAGE)
        self._statements: dict[str, _Statement] = {}
        self._portals: dict[str, _Portal] = {}
        # After an error in an extended-protocol batch, skip to its Sync (PostgreSQL's rule).
        self._skip_to_sync = False
        # A command that waits (PAUSE); nothing else of this connection runs until it is done.
        self._task: asyncio.Task[None] | None = None
        self._close_when_ready = False
        self._out: list[bytes] = []

    def welcome(self) -> bytes:
        """ParameterStatus, BackendKeyData and ReadyForQuery after authentication."""
        major = "15.0"
        for pool in self.proxy.pools.values():
            if pool.defaults and pool.defaults.get("server_version"):
                major = pool.defaults["server_version"].split()[0]
                break
        params = {
            "server_version": f"{major} (pg-sidecar {__version__})",
            "server_encoding": "UTF8",
            "client_encoding": "UTF8",
            "DateStyle": "ISO",
            "integer_datetimes": "on",
            "standard_conforming_strings": "on",
            "application_name": self.client.params.get("application_name", ""),
        }
        out = [m.parameter_status(k, v) for k, v in params.items()]
        out.append(m.backend_key_data(self.client.pid, self.client.secret))
        out.append(m.ready_for_query())
        return b"".join(out)

    # input

    @property
    def _gone(self) -> bool:
        return self.client.state is ClientState.CLOSED

    def feed(self, data: bytes) -> None:
        """Bytes from the client; answers what is complete (unless a command is running)."""
        self.client.last_active = time.monotonic()
        self._reader.feed(data)
        self._run()

    def _run(self) -> None:
        try:
            while self._task is None and not self._gone:
                msg = self._reader.next()
                if msg is None:
                    break
                self._dispatch(*msg)
        except ProtocolError as exc:
            self._flush()
            self.client.protocol_violation(str(exc))
            return
        self._flush()

    def _dispatch(self, typ: int, body: bytes) -> None:
        if self._skip_to_sync and typ not in (_S, _X):
            return  # after an error in an extended-protocol batch: everything up to its Sync
        if typ == _X:
            self._flush()
            self.client.close("client close request")
        elif typ == _Q:
            self._simple_query(body)
        elif typ == _S:
            self._skip_to_sync = False
            self._portals.clear()  # the implicit transaction ends; portals with it
            self._ready()
        elif typ in _EXTENDED:
            try:
                _EXTENDED[typ](self, body)
            except AdminError as exc:
                self._error(exc)
                self._skip_to_sync = True
        elif typ == _F:
            self._error(AdminError(FEATURE_NOT_SUPPORTED, "function calls are not supported"))
            self._ready()
        elif typ in _COPY_MESSAGES:
            return  # PostgreSQL ignores copy messages outside COPY, and so do we
        else:
            raise ProtocolError(f"invalid frontend message type {typ}")

    # output

    def _send(self, data: bytes) -> None:
        self._out.append(data)

    def _flush(self) -> None:
        if self._out and not self._gone:
            self.client.write(b"".join(self._out))
        self._out.clear()

    def _error(self, exc: AdminError) -> None:
        self._send(m.error_response(exc.sqlstate, exc.message, hint=exc.hint))

    def _ready(self) -> None:
        self._send(m.ready_for_query())
        if self._close_when_ready:
            self._flush()
            self.client.close("admin SHUTDOWN")

    def _send_rows(
        self,
        result: Result,
        columns: Sequence[Column],
        formats: Sequence[int],
        start: int,
        stop: int,
    ) -> None:
        names = [c.name for c in columns]
        for row in result.rows[start:stop]:
            self._send(r.data_row([row[n] for n in names], columns, formats))

    def _begin_result(self, result: Result) -> None:
        for text in result.notices:
            self._send(m.notice_response(text))
        if result.close_session:
            self._close_when_ready = True

    # running commands

    def _start(self, plan: Plan) -> RunResult:
        assert plan.run is not None
        try:
            return plan.run()
        except AdminError:
            raise
        except Exception as exc:  # a bug in one SHOW must not take the console down
            logger.exception("admin_command_failed", user=self.client.user)
            raise AdminError(INTERNAL_ERROR, f"command failed: {exc}") from None

    def _wait(
        self,
        pending: Awaitable[Result],
        done: Callable[[Result], None],
        failed: Callable[[AdminError], None],
    ) -> None:
        """Run a waiting command; this connection reads nothing more until it finishes."""

        async def finish() -> None:
            outcome: Result | AdminError
            try:
                outcome = await pending
            except AdminError as exc:
                outcome = exc
            except Exception as exc:
                logger.exception("admin_command_failed", user=self.client.user)
                outcome = AdminError(INTERNAL_ERROR, f"command failed: {exc}")
            self._task = None
            if self._gone:
                return
            if isinstance(outcome, AdminError):
                failed(outcome)
            else:
                done(outcome)
            self._run()

        self._task = asyncio.get_running_loop().create_task(finish())

    # simple query protocol

    def _simple_query(self, body: bytes) -> None:
        sql = _query_text(body, "Query")
        # A simple Query ends the implicit transaction and replaces the unnamed statement.
        self._statements.pop("", None)
        self._portals.clear()
        try:
            statements = split_statements(sql)
        except AdminError as exc:
            self._error(exc)
            self._ready()
            return
        if not statements:
            self._send(r.EMPTY_QUERY_RESPONSE)
            self._ready()
            return
        self._simple_from(statements, 0)

    def _simple_from(self, statements: list[str], index: int) -> None:
        while index < len(statements):
            try:
                plan = self.console.plan(statements[index])
                if plan.run is None:
                    index += 1
                    continue
                outcome = self._start(plan)
            except AdminError as exc:
                self._error(exc)
                break
            if not isinstance(outcome, Result):
                rest = index + 1

                def done(result: Result, plan: Plan = plan, rest: int = rest) -> None:
                    self._simple_result(plan, result)
                    self._simple_from(statements, rest)

                def failed(exc: AdminError) -> None:
                    self._error(exc)
                    self._ready()

                self._wait(outcome, done, failed)
                return
            self._simple_result(plan, outcome)
            index += 1
        self._ready()

    def _simple_result(self, plan: Plan, result: Result) -> None:
        self._begin_result(result)
        if plan.columns is not None:
            self._send(r.row_description(plan.columns))
            self._send_rows(result, plan.columns, (), 0, len(result.rows))
        self._send(r.command_complete(result.tag))

    # extended query protocol

    def _parse(self, body: bytes) -> None:
        msg = r.parse_parse(body)
        if msg.statement and msg.statement in self._statements:
            raise AdminError(
                DUPLICATE_PREPARED_STATEMENT, f'prepared statement "{msg.statement}" already exists'
            )
        statements = split_statements(msg.query)
        if len(statements) > 1:
            raise AdminError(
                SYNTAX_ERROR, "cannot insert multiple commands into a prepared statement"
            )
        plan = self._plan_extended(statements[0]) if statements else EMPTY_PLAN
        self._statements[msg.statement] = _Statement(plan, msg.param_types)
        self._send(r.PARSE_COMPLETE)

    def _plan_extended(self, statement: str) -> Plan:
        tokens = tokenize(statement)
        if tokens and tokens[0].keyword == "deallocate":
            # psycopg deallocates its prepared statements with SQL when libpq is older than 17.
            return self._plan_deallocate(tokens[1:])
        return self.console.plan(statement)

    def _plan_deallocate(self, args: list[Token]) -> Plan:
        if args and args[0].keyword == "prepare":
            args = args[1:]
        if len(args) != 1:
            raise AdminError(SYNTAX_ERROR, "DEALLOCATE needs one statement name or ALL")
        name = args[0]

        def run() -> Result:
            if name.keyword == "all":
                self._statements.clear()
            elif self._statements.pop(name.text, None) is None:
                raise AdminError(
                    INVALID_SQL_STATEMENT_NAME, f'prepared statement "{name.text}" does not exist'
                )
            return Result("DEALLOCATE")

        return Plan(None, run)

    def _statement(self, name: str) -> _Statement:
        stmt = self._statements.get(name)
        if stmt is None:
            shown = f'prepared statement "{name}"' if name else "unnamed prepared statement"
            raise AdminError(INVALID_SQL_STATEMENT_NAME, f"{shown} does not exist")
        return stmt

    def _portal(self, name: str) -> _Portal:
        portal = self._portals.get(name)
        if portal is None:
            raise AdminError(INVALID_CURSOR_NAME, f'portal "{name}" does not exist')
        return portal

    def _bind(self, body: bytes) -> None:
        msg = r.parse_bind(body)
        stmt = self._statement(msg.statement)
        if len(msg.params) != len(stmt.param_types):
            raise AdminError(
                PROTOCOL_VIOLATION,
                f"bind message supplies {len(msg.params)} parameters, but prepared statement "
                f'"{msg.statement}" requires {len(stmt.param_types)}',
            )
        columns = stmt.plan.columns or ()
        try:
            formats = r.result_formats(msg.result_formats, len(columns))
        except ValueError as exc:
            raise AdminError(PROTOCOL_VIOLATION, str(exc)) from None
        if msg.portal and msg.portal in self._portals:
            raise AdminError(DUPLICATE_CURSOR, f'cursor "{msg.portal}" already exists')
        self._portals[msg.portal] = _Portal(stmt.plan, formats)
        self._send(r.BIND_COMPLETE)

    def _describe(self, body: bytes) -> None:
        msg = r.parse_describe(body)
        formats: tuple[int, ...] = ()
        if msg.kind == "S":
            stmt = self._statement(msg.name)
            self._send(r.parameter_description(stmt.param_types))
            plan = stmt.plan
        else:
            portal = self._portal(msg.name)
            plan, formats = portal.plan, portal.formats
        if plan.columns is None:
            self._send(r.NO_DATA)
        else:
            self._send(r.row_description(plan.columns, formats))

    def _execute(self, body: bytes) -> None:
        msg = r.parse_execute(body)
        portal = self._portal(msg.portal)
        if portal.plan.run is None:
            self._send(r.EMPTY_QUERY_RESPONSE)
            return
        if portal.result is not None:
            self._portal_rows(portal, msg.max_rows)
            return
        outcome = self._start(portal.plan)
        if isinstance(outcome, Result):
            portal.result = outcome
            self._begin_result(outcome)
            self._portal_rows(portal, msg.max_rows)
            return

        def done(result: Result) -> None:
            portal.result = result
            self._begin_result(result)
            self._portal_rows(portal, msg.max_rows)

        def failed(exc: AdminError) -> None:
            self._error(exc)
            self._skip_to_sync = True

        self._wait(outcome, done, failed)

    def _portal_rows(self, portal: _Portal, max_rows: int) -> None:
        result = portal.result
        assert result is not None
        columns = portal.plan.columns
        if columns is not None:
            stop = len(result.rows)
            if max_rows and portal.sent + max_rows < stop:
                stop = portal.sent + max_rows
            self._send_rows(result, columns, portal.formats, portal.sent, stop)
            portal.sent = stop
            if stop < len(result.rows):
                self._send(r.PORTAL_SUSPENDED)
                return
        self._send(r.command_complete(result.tag))

    def _close(self, body: bytes) -> None:
        msg = r.parse_close(body)
        if msg.kind == "S":
            self._statements.pop(msg.name, None)
        else:
            self._portals.pop(msg.name, None)
        self._send(r.CLOSE_COMPLETE)

    def _flush_request(self, body: bytes) -> None:
        """Flush: every reply is written at the end of each input chunk anyway."""


def _query_text(body: bytes, what: str) -> str:
    if not body.endswith(b"\x00"):
        raise ProtocolError(f"invalid {what} message format")
    try:
        return body[:-1].decode("utf-8")
    except UnicodeDecodeError:
        raise ProtocolError(f"invalid UTF-8 in {what} message") from None


_EXTENDED: dict[int, Callable[[AdminSession, bytes], None]] = {
    _P: AdminSession._parse,
    _B: AdminSession._bind,
    _D: AdminSession._describe,
    _E: AdminSession._execute,
    _C: AdminSession._close,
    _H: AdminSession._flush_request,
}


__all__ = [
    "EMPTY_PLAN",
    "RELOADABLE",
    "RELOADABLE_POOL",
    "AdminError",
    "AdminSession",
    "Console",
    "Plan",
    "Result",
    "split_statements",
    "tokenize",
]
