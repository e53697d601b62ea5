"""A minimal PostgreSQL client for the connection figures: many SCRAM logins, cheaply.

It speaks just enough of the protocol (startup, SCRAM-SHA-256, a simple query, Terminate)
using the sidecar's sans-IO message builders. The one liberty it takes is caching the salted
password per (salt, iterations), which RFC 5802 (section 5.1) allows: a PBKDF2 costs about
2 ms of CPU, and paying it 1,000 times in the load generator would measure the load generator,
not the pooler. Each login still runs the full SCRAM exchange against the pooler.
"""

from __future__ import annotations

import asyncio
import base64
import hashlib
import hmac
import secrets
import time
from collections import Counter
from dataclasses import dataclass, field
from typing import Any

from sidecar.protocol import messages as m
from sidecar.protocol.auth import saslprep

_SALTED: dict[tuple[bytes, bytes, int], bytes] = {}


class LoginError(Exception):
    """The server refused the login or broke the protocol."""


def _salted_password(password: bytes, salt: bytes, iterations: int) -> bytes:
    key = (password, salt, iterations)
    salted = _SALTED.get(key)
    if salted is None:
        salted = hashlib.pbkdf2_hmac("sha256", password, salt, iterations)
        _SALTED[key] = salted
    return salted


class Scram:
    """Client side of one SCRAM-SHA-256 exchange (no channel binding)."""

    def __init__(self, password: str) -> None:
        self.password = saslprep(password)
        self.nonce = base64.b64encode(secrets.token_bytes(18)).decode()
        self.first_bare = f"n=,r={self.nonce}"
        self.expected_signature = b""

    def client_first(self) -> bytes:
        return f"n,,{self.first_bare}".encode()

    def client_final(self, server_first: bytes) -> bytes:
        text = server_first.decode()
        attrs = dict(part.split("=", 1) for part in text.split(","))
        nonce, salt, iterations = attrs["r"], base64.b64decode(attrs["s"]), int(attrs["i"])
        if not nonce.startswith(self.nonce):
            raise LoginError("SCRAM nonce mismatch")
        salted = _salted_password(self.password, salt, iterations)
        client_key = hmac.digest(salted, b"Client Key", "sha256")
        server_key = hmac.digest(salted, b"Server Key", "sha256")
        without_proof = f"c=biws,r={nonce}"
        auth_message = f"{self.first_bare},{text},{without_proof}".encode()
        signature = hmac.digest(hashlib.sha256(client_key).digest(), auth_message, "sha256")
        proof = bytes(a ^ b for a, b in zip(client_key, signature, strict=True))
        self.expected_signature = hmac.digest(server_key, auth_message, "sha256")
        return f"{without_proof},p={base64.b64encode(proof).decode()}".encode()

    def verify(self, server_final: bytes) -> None:
        text = server_final.decode()
        if not text.startswith("v=") or not hmac.compare_digest(
            base64.b64decode(text[2:]), self.expected_signature
        ):
            raise LoginError("SCRAM server signature mismatch")


class Conn:
    """One logged-in connection."""

    def __init__(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        self.reader = reader
        self.writer = writer
        self.messages = m.MessageReader()

    async def recv(self) -> tuple[int, bytes]:
        while (msg := self.messages.next()) is None:
            data = await self.reader.read(65536)
            if not data:
                raise LoginError("connection closed by the server")
            self.messages.feed(data)
        typ, body = msg
        if typ == m.ERROR_RESPONSE:
            fields = m.parse_error_fields(body)
            raise LoginError(f"{fields.get('C', '?')} {fields.get('M', '')}")
        return typ, body

    @classmethod
    async def login(cls, host: str, port: int, user: str, password: str, db: str) -> Conn:
        reader, writer = await asyncio.open_connection(host, port)
        conn = cls(reader, writer)
        try:
            writer.write(m.startup_message({"user": user, "database": db}))
            scram = Scram(password)
            while True:
                typ, body = await conn.recv()
                if typ == m.READY_FOR_QUERY:
                    return conn
                if typ != m.AUTHENTICATION:
                    continue  # ParameterStatus, BackendKeyData, notices
                code, data = m.parse_auth_request(body)
                if code == m.AUTH_SASL:
                    first = scram.client_first()
                    writer.write(m.sasl_initial_response("SCRAM-SHA-256", first))
                elif code == m.AUTH_SASL_CONTINUE:
                    writer.write(m.password_message(scram.client_final(data)))
                elif code == m.AUTH_SASL_FINAL:
                    scram.verify(data)
                elif code != m.AUTH_OK:
                    raise LoginError(f"unexpected authentication request {code}")
        except BaseException:
            writer.close()
            raise

    async def query(self, sql: str) -> None:
        self.writer.write(m.query(sql))
        while (await self.recv())[0] != m.READY_FOR_QUERY:
            pass

    def close(self) -> None:
        if not self.writer.is_closing():
            self.writer.write(m.TERMINATE_MSG)
            self.writer.close()


def _reason(exc: BaseException) -> str:
    return f"{type(exc).__name__}: {exc}"[:200]


@dataclass
class Outcome:
    seconds: float = 0.0
    ok: int = 0
    errors: Counter[str] = field(default_factory=Counter)

    def as_dict(self) -> dict[str, Any]:
        return {
            "seconds": round(self.seconds, 3),
            "ok": self.ok,
            "errors": sum(self.errors.values()),
            "error_kinds": dict(self.errors.most_common(5)),
        }


async def open_idle(
    host: str, port: int, user: str, password: str, db: str, count: int, concurrency: int = 200
) -> tuple[list[Conn], Outcome]:
    """Log `count` clients in (at most `concurrency` logins in flight) and keep them open."""
    gate = asyncio.Semaphore(concurrency)
    outcome = Outcome()
    conns: list[Conn] = []

    async def one() -> None:
        async with gate:
            try:
                conn = await asyncio.wait_for(Conn.login(host, port, user, password, db), 60)
            except (OSError, LoginError, TimeoutError) as exc:
                outcome.errors[_reason(exc)] += 1
            else:
                conns.append(conn)
                outcome.ok += 1

    start = time.perf_counter()
    await asyncio.gather(*(one() for _ in range(count)))
    outcome.seconds = time.perf_counter() - start
    return conns, outcome


async def close_all(conns: list[Conn]) -> None:
    for conn in conns:
        conn.close()
    await asyncio.gather(*(c.writer.wait_closed() for c in conns), return_exceptions=True)


async def storm(
    host: str, port: int, user: str, password: str, db: str, count: int, timeout: float = 60
) -> Outcome:
    """`count` clients at once: connect, log in, `select 1`; wall time until the last is done."""
    outcome = Outcome()
    conns: list[Conn] = []

    async def one() -> None:
        try:
            conn = await Conn.login(host, port, user, password, db)
            conns.append(conn)
            await conn.query("select 1")
        except (OSError, LoginError) as exc:
            outcome.errors[_reason(exc)] += 1
        else:
            outcome.ok += 1

    tasks = [one() for _ in range(count)]
    start = time.perf_counter()
    try:
        await asyncio.wait_for(asyncio.gather(*tasks), timeout)
    except TimeoutError:
        outcome.errors["timed out"] += count - outcome.ok - sum(outcome.errors.values())
    outcome.seconds = time.perf_counter() - start
    await close_all(conns)
    return outcome
