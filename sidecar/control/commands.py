"""The admin console's language: statements split and tokenized, and what a command is
(`Plan`: its columns, known before it runs, and how to run it; `Result`; `AdminError`).
Shared by the session (control.console) and the command table (control.tables)."""

from __future__ import annotations

import re
from collections.abc import Awaitable, Callable
from dataclasses import dataclass, field

from .. import log
from ..protocol.errors import SYNTAX_ERROR
from ..protocol.rows import Column, Value

logger = log.get()

Row = dict[str, Value]


class AdminError(Exception):
    """A console command failed; becomes an ErrorResponse, and the connection stays up."""

    def __init__(self, sqlstate: str, message: str, hint: str | None = None) -> None:
        super().__init__(message)
        self.sqlstate = sqlstate
        self.message = message
        self.hint = hint


@dataclass(frozen=True, slots=True)
class Result:
    """What one command produced."""

    tag: str
    rows: list[Row] = field(default_factory=list)
    notices: tuple[str, ...] = ()
    #: Close this console connection at its next ReadyForQuery (SHUTDOWN).
    close_session: bool = False


RunResult = Result | Awaitable[Result]


@dataclass(frozen=True, slots=True)
class Plan:
    """A parsed statement: its result columns (None: no rows) and how to run it."""

    columns: tuple[Column, ...] | None
    run: Callable[[], RunResult] | None  #: None: the empty query


EMPTY_PLAN = Plan(None, None)


# -- lexing ----------------------------------------------------------------------------------


def split_statements(sql: str) -> list[str]:
    """The `;`-separated statements of a query string; comments dropped, empty ones skipped."""
    out: list[str] = []
    cur: list[str] = []
    i, n = 0, len(sql)
    while i < n:
        ch = sql[i]
        if ch in "'\"":
            j = i + 1
            while True:
                j = sql.find(ch, j)
                if j < 0:
                    what = "quoted string" if ch == "'" else "quoted identifier"
                    raise AdminError(SYNTAX_ERROR, f"unterminated {what} at or near {sql[i:]!r}")
                if sql.startswith(ch, j + 1):
                    j += 2
                    continue
                break
            cur.append(sql[i : j + 1])
            i = j + 1
        elif sql.startswith("--", i):
            j = sql.find("\n", i)
            i = n if j < 0 else j + 1
            cur.append(" ")
        elif sql.startswith("/*", i):
            depth, i = 1, i + 2
            while depth:
                if i >= n:
                    raise AdminError(SYNTAX_ERROR, "unterminated /* comment")
                if sql.startswith("/*", i):
                    depth, i = depth + 1, i + 2
                elif sql.startswith("*/", i):
                    depth, i = depth - 1, i + 2
                else:
                    i += 1
            cur.append(" ")
        elif ch == ";":
            out.append("".join(cur).strip())
            cur = []
            i += 1
        else:
            cur.append(ch)
            i += 1
    out.append("".join(cur).strip())
    return [s for s in out if s]


_TOKEN = re.compile(
    r"""\s*(?:"(?P<ident>(?:[^"]|"")*)"|'(?P<string>(?:[^']|'')*)'|(?P<word>[^\s"']+))"""
)


@dataclass(frozen=True, slots=True)
class Token:
    text: str
    quoted: bool

    @property
    def keyword(self) -> str:
        return "" if self.quoted else self.text.lower()


def tokenize(statement: str) -> list[Token]:
    """Words and quoted names of one statement (split_statements checked the quotes)."""
    tokens: list[Token] = []
    pos, text = 0, statement.strip()
    while pos < len(text):
        match = _TOKEN.match(text, pos)
        if match is None:
            raise AdminError(SYNTAX_ERROR, f'syntax error at or near "{text[pos:].strip()}"')
        if match["word"] is not None:
            tokens.append(Token(match["word"], False))
        elif match["ident"] is not None:
            tokens.append(Token(match["ident"].replace('""', '"'), True))
        else:
            tokens.append(Token(match["string"].replace("''", "'"), True))
        pos = match.end()
    return tokens
