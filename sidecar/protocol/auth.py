"""Password authentication exchanges (md5 and SCRAM-SHA-256) as pure, sans-IO computations.

This module only turns the payloads of authentication messages into the payloads to send
back; framing them into wire messages and deciding which mechanism to offer live elsewhere.
Both sides of SCRAM are here: `ScramServer` for the proxy authenticating an application
client, `ScramClient` for the proxy authenticating to an upstream PostgreSQL.

Every malformed or failing peer message raises `AuthError`, whose text never contains a
password, salted password, key or proof. After an `AuthError` an exchange object is dead:
every later call raises too.
"""

from __future__ import annotations

import base64
import binascii
import enum
import hashlib
import hmac
import re
import secrets
import stringprep
import unicodedata
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import ClassVar, Final, TypeVar

_R = TypeVar("_R")

__all__ = [
    "SCRAM_SHA_256",
    "AuthError",
    "ScramClient",
    "ScramSecret",
    "ScramServer",
    "md5_password_response",
    "saslprep",
    "verify_md5_response",
]

#: What PostgreSQL offers in AuthenticationSASL and expects in SASLInitialResponse.
SCRAM_SHA_256: Final = "SCRAM-SHA-256"

_DIGEST: Final = "sha256"
_KEY_LEN: Final = 32  # SHA-256 output; every proof and signature is this long
_MD5_SALT_LEN: Final = 4
_DEFAULT_SALT_LEN: Final = 16  # PostgreSQL's SCRAM_DEFAULT_SALT_LEN
_NONCE_RAW_LEN: Final = 18  # PostgreSQL's SCRAM_RAW_NONCE_LEN
# PostgreSQL stores iterations in a C int; anything larger is not a real server.
_MAX_ITERATIONS: Final = 2**31 - 1

# RFC 5802: printable = %x21-2B / %x2D-7E, i.e. visible ASCII except ",".
_PRINTABLE_RE: Final = re.compile(r"[\x21-\x2b\x2d-\x7e]+")
# saslname: any UTF-8 except "," and "=", with "=" only as the escapes =2C and =3D.
_SASLNAME_RE: Final = re.compile(r"(?:[^,=\x00]|=2C|=3D)*")
_ITERATIONS_RE: Final = re.compile(r"[1-9][0-9]{0,9}")
_ATTR_NAME_RE: Final = re.compile(r"[A-Za-z]")


class AuthError(Exception):
    """A peer sent a bad or failing SASL/md5 message.

    str() must never contain a password, salted password, key or proof.
    """


# --------------------------------------------------------------------------------------------
# md5


def _md5_hex(data: bytes) -> bytes:
    # md5 is what the protocol mandates here; it is not used as a security primitive by us.
    return hashlib.md5(data, usedforsecurity=False).hexdigest().encode("ascii")


def md5_password_response(user: str, password: str, salt: bytes) -> bytes:
    """Return the PasswordMessage payload for AuthenticationMD5Password, without the NUL."""
    if len(salt) != _MD5_SALT_LEN:
        raise AuthError("md5 salt must be 4 bytes")
    inner = _md5_hex(password.encode("utf-8") + user.encode("utf-8"))
    return b"md5" + _md5_hex(inner + salt)


def verify_md5_response(user: str, password: str, salt: bytes, response: bytes) -> bool:
    """Check a client's md5 PasswordMessage payload in constant time."""
    if response.endswith(b"\x00"):
        response = response[:-1]
    return hmac.compare_digest(md5_password_response(user, password, salt), response)


# --------------------------------------------------------------------------------------------
# SASLprep


def _raw_utf8(password: str) -> bytes:
    # A str that came from bytes via surrogateescape (os.environ, argv) gets its original
    # bytes back; that is the "not valid UTF-8" case PostgreSQL passes through untouched.
    try:
        return password.encode("utf-8")
    except UnicodeEncodeError:
        pass
    try:
        return password.encode("utf-8", "surrogateescape")
    except UnicodeEncodeError:
        return password.encode("utf-8", "surrogatepass")


def _prohibited(ch: str) -> bool:
    # RFC 4013 section 2.3 plus unassigned code points (A.1), as PostgreSQL checks them.
    return (
        stringprep.in_table_c12(ch)
        or stringprep.in_table_c21_c22(ch)
        or stringprep.in_table_c3(ch)
        or stringprep.in_table_c4(ch)
        or stringprep.in_table_c5(ch)
        or stringprep.in_table_c6(ch)
        or stringprep.in_table_c7(ch)
        or stringprep.in_table_c8(ch)
        or stringprep.in_table_c9(ch)
        or stringprep.in_table_a1(ch)
    )


def saslprep(password: str) -> bytes:
    """Normalise a password with SASLprep (RFC 4013) exactly as PostgreSQL's pg_saslprep does.

    Falls back to the raw UTF-8 bytes when the input is not valid Unicode or SASLprep would
    reject it, because that is what PostgreSQL hashes in those cases too.
    """
    raw = _raw_utf8(password)
    # pg_saslprep returns pure ASCII verbatim, even ASCII control characters.
    if password.isascii():
        return raw
    if any("\ud800" <= ch <= "\udfff" for ch in password):
        return raw  # not valid Unicode: PostgreSQL's SASLPREP_INVALID_UTF8 case

    mapped: list[str] = []
    for ch in password:
        if stringprep.in_table_c12(ch):
            mapped.append(" ")
        elif not stringprep.in_table_b1(ch):
            mapped.append(ch)
    if not mapped:
        return raw  # PostgreSQL refuses an empty prepared password

    # pg_saslprep runs the prohibit and bidi checks on the mapped, not yet normalised
    # characters; we copy that so our verifiers match the ones PostgreSQL stores.
    if any(_prohibited(ch) for ch in mapped):
        return raw
    if any(stringprep.in_table_d1(ch) for ch in mapped):
        if any(stringprep.in_table_d2(ch) for ch in mapped):
            return raw
        if not (stringprep.in_table_d1(mapped[0]) and stringprep.in_table_d1(mapped[-1])):
            return raw

    return unicodedata.normalize("NFKC", "".join(mapped)).encode("utf-8")


# --------------------------------------------------------------------------------------------
# SCRAM primitives (RFC 5802 / RFC 7677)


def _hmac(key: bytes, msg: bytes) -> bytes:
    return hmac.digest(key, msg, _DIGEST)


def _h(data: bytes) -> bytes:
    return hashlib.sha256(data).digest()


def _xor(a: bytes, b: bytes) -> bytes:
    return bytes(x ^ y for x, y in zip(a, b, strict=True))


def _b64(data: bytes) -> str:
    return base64.b64encode(data).decode("ascii")


def _b64decode(value: str, what: str) -> bytes:
    try:
        return base64.b64decode(value.encode("ascii"), validate=True)
    except (binascii.Error, ValueError, UnicodeEncodeError):
        raise AuthError(f"malformed SCRAM message: bad base64 in {what}") from None


def _new_nonce() -> str:
    return _b64(secrets.token_bytes(_NONCE_RAW_LEN))


def _check_nonce_arg(nonce: str) -> str:
    if not _PRINTABLE_RE.fullmatch(nonce):
        raise ValueError("SCRAM nonce must be printable ASCII without ','")
    return nonce


def _decode_message(data: bytes, what: str) -> str:
    try:
        text = data.decode("utf-8")
    except UnicodeDecodeError:
        raise AuthError(f"malformed SCRAM message: {what} is not UTF-8") from None
    if "\x00" in text:
        raise AuthError(f"malformed SCRAM message: NUL in {what}")
    return text


def _fields(data: bytes, what: str, least: int) -> tuple[str, list[str]]:
    """The text of a SCRAM message and its comma-separated attributes, at least `least`."""
    text = _decode_message(data, what)
    parts = text.split(",")
    if len(parts) < least:
        raise AuthError(f"malformed SCRAM message: {what} too short")
    return text, parts


def _attr(part: str, name: str, what: str) -> str:
    """Return the value of `part` if it is the attribute `name=value`, else raise."""
    if not part.startswith(name + "="):
        raise AuthError(f"malformed SCRAM message: expected attribute {name!r} in {what}")
    return part[len(name) + 1 :]


def _check_extensions(parts: list[str], what: str) -> None:
    # Optional extensions are allowed by RFC 5802 and ignored, but must still be attr=value.
    for part in parts:
        if len(part) < 3 or not _ATTR_NAME_RE.fullmatch(part[0]) or part[1] != "=":
            raise AuthError(f"malformed SCRAM message: bad attribute in {what}")


def _printable(value: str, what: str) -> str:
    if not _PRINTABLE_RE.fullmatch(value):
        raise AuthError(f"malformed SCRAM message: bad nonce in {what}")
    return value


def _saslname_escape(name: str) -> str:
    return name.replace("=", "=3D").replace(",", "=2C")


@dataclass(frozen=True, slots=True)
class ScramSecret:
    """The server-side SCRAM verifier: what PostgreSQL keeps in pg_authid, minus the text form."""

    salt: bytes
    iterations: int
    # Keys are kept out of repr() so that logging a secret cannot leak them.
    stored_key: bytes = field(repr=False)
    server_key: bytes = field(repr=False)

    def __post_init__(self) -> None:
        if not self.salt:
            raise ValueError("SCRAM salt must not be empty")
        if not 1 <= self.iterations <= _MAX_ITERATIONS:
            raise ValueError("SCRAM iterations out of range")
        if len(self.stored_key) != _KEY_LEN or len(self.server_key) != _KEY_LEN:
            raise ValueError("SCRAM keys must be 32 bytes")

    @classmethod
    def from_password(
        cls, password: str, salt: bytes | None = None, iterations: int = 4096
    ) -> ScramSecret:
        """Derive the verifier; the one PBKDF2 here is the expensive step, so callers cache it."""
        if salt is None:
            salt = secrets.token_bytes(_DEFAULT_SALT_LEN)
        if not 1 <= iterations <= _MAX_ITERATIONS:
            raise ValueError("SCRAM iterations out of range")
        salted = hashlib.pbkdf2_hmac(_DIGEST, saslprep(password), salt, iterations)
        client_key = _hmac(salted, b"Client Key")
        return cls(
            salt=salt,
            iterations=iterations,
            stored_key=_h(client_key),
            server_key=_hmac(salted, b"Server Key"),
        )


class _State(enum.Enum):
    """Where one side of a SCRAM exchange is: both sides handle a first and a final message
    from the other."""

    #: The client's only: client_first() not yet called.
    INITIAL = enum.auto()
    #: Waiting for the other side's first message (the server: client-first; the client:
    #: server-first, having sent client-first).
    WAIT_FIRST = enum.auto()
    #: Answered the first message; waiting for the other side's final one.
    WAIT_FINAL = enum.auto()
    #: Final message handled: the server verified the proof, or the client the server's
    #: signature (the server proved it knows the password).
    DONE = enum.auto()
    #: Something failed; the exchange cannot continue.
    ERROR = enum.auto()


class _Exchange:
    """One side of a SCRAM exchange as a state machine: each step runs only in the state it
    expects, and any failure leaves the exchange in ERROR for good."""

    __slots__ = ("_state",)
    #: The subclass's messages: the first and the final one it handles, in that order.
    _FIRST: ClassVar[str]
    _FINAL: ClassVar[str]
    _state: _State

    def _fail(self, message: str) -> AuthError:
        self._state = _State.ERROR
        return AuthError(message)

    def _step(self, message: str, step: Callable[[bytes], _R], data: bytes) -> _R:
        """Handle `message` (_FIRST or _FINAL) with `step(data)` if it comes in its turn (else
        it is out of order), then move on; an AuthError from it moves to ERROR and propagates."""
        expected, then = (
            (_State.WAIT_FIRST, _State.WAIT_FINAL)
            if message == self._FIRST
            else (_State.WAIT_FINAL, _State.DONE)
        )
        if self._state is not expected:
            raise self._fail(f"SCRAM {message} out of order")
        try:
            result = step(data)
        except AuthError:
            self._state = _State.ERROR
            raise
        self._state = then
        return result


class ScramServer(_Exchange):
    """Server side of SCRAM-SHA-256 (the proxy authenticating an app client).

    One instance per login attempt.
    """

    # In the SASLInitialResponse, then in the SASLResponse.
    _FIRST = "client-first-message"
    _FINAL = "client-final-message"

    __slots__ = (
        "_client_first_bare",
        "_gs2_header",
        "_nonce",
        "_secret",
        "_server_first",
    )

    def __init__(self, secret: ScramSecret, server_nonce: str | None = None) -> None:
        self._secret = secret
        self._nonce = _check_nonce_arg(server_nonce) if server_nonce is not None else _new_nonce()
        self._state = _State.WAIT_FIRST
        self._gs2_header = ""
        self._client_first_bare = ""
        self._server_first = ""

    def handle_client_first(self, client_first: bytes) -> bytes:
        """Take the SASLInitialResponse data; return the server-first-message."""
        return self._step(self._FIRST, self._client_first, client_first)

    def _client_first(self, data: bytes) -> bytes:
        what = self._FIRST
        text, parts = _fields(data, what, 4)
        cbind, authzid = parts[0], parts[1]
        if cbind.startswith("p="):
            raise AuthError("SCRAM channel binding requested but not supported")
        # "y" means the client could do channel binding but thinks we can't: true, we don't
        # offer SCRAM-SHA-256-PLUS, so it is not a downgrade.
        if cbind not in ("n", "y"):
            raise AuthError(f"malformed SCRAM message: bad gs2 header in {what}")
        if authzid:
            # PostgreSQL rejects an authorization identity too; it has no meaning here.
            raise AuthError("SCRAM authorization identity is not supported")
        if parts[2].startswith("m="):
            raise AuthError("SCRAM mandatory extension is not supported")
        # PostgreSQL takes the user from the startup packet and clients send "n=";
        # the name is validated for syntax only.
        user = _attr(parts[2], "n", what)
        if not _SASLNAME_RE.fullmatch(user):
            raise AuthError(f"malformed SCRAM message: bad user name in {what}")
        client_nonce = _printable(_attr(parts[3], "r", what), what)
        _check_extensions(parts[4:], what)

        self._gs2_header = f"{cbind},{authzid},"
        self._client_first_bare = text[len(self._gs2_header) :]
        self._nonce = client_nonce + self._nonce
        self._server_first = (
            f"r={self._nonce},s={_b64(self._secret.salt)},i={self._secret.iterations}"
        )
        return self._server_first.encode("ascii")

    def handle_client_final(self, client_final: bytes) -> bytes:
        """Take the SASLResponse data; verify it and return the server-final-message."""
        return self._step(self._FINAL, self._client_final, client_final)

    def _client_final(self, data: bytes) -> bytes:
        what = self._FINAL
        _text, parts = _fields(data, what, 3)
        cbind_data = _attr(parts[0], "c", what)
        nonce = _attr(parts[1], "r", what)
        _check_extensions(parts[2:-1], what)
        proof = _b64decode(_attr(parts[-1], "p", what), "proof")
        if len(proof) != _KEY_LEN:
            raise AuthError(f"malformed SCRAM message: bad proof length in {what}")

        # Without channel binding the c= data is the gs2 header echoed back; comparing the
        # text (as PostgreSQL does) also pins the "n"/"y" flag the client first sent.
        if cbind_data != _b64(self._gs2_header.encode("utf-8")):
            raise AuthError("SCRAM channel binding mismatch")
        if not hmac.compare_digest(nonce.encode("utf-8"), self._nonce.encode("ascii")):
            raise AuthError("SCRAM nonce mismatch")

        without_proof = ",".join(parts[:-1])
        auth_message = ",".join((self._client_first_bare, self._server_first, without_proof))
        auth_bytes = auth_message.encode("utf-8")
        client_signature = _hmac(self._secret.stored_key, auth_bytes)
        client_key = _xor(proof, client_signature)
        if not hmac.compare_digest(_h(client_key), self._secret.stored_key):
            raise AuthError("SCRAM proof mismatch")
        server_signature = _hmac(self._secret.server_key, auth_bytes)
        return b"v=" + _b64(server_signature).encode("ascii")


class ScramClient(_Exchange):
    """Client side of SCRAM-SHA-256 (the proxy authenticating to an upstream PostgreSQL).

    The caller must not treat the upstream as authenticated until `verify_server_final`
    has returned: that is what proves the server knows the password.
    """

    _FIRST = "server-first-message"
    _FINAL = "server-final-message"

    __slots__ = (
        "_auth_message",
        "_client_first_bare",
        "_nonce",
        "_password",
        "_server_key",
    )

    def __init__(self, password: str, client_nonce: str | None = None, *, user: str = "") -> None:
        # PostgreSQL ignores the SCRAM user name; `user` exists so RFC test vectors can run.
        self._password = saslprep(password)
        self._nonce = _check_nonce_arg(client_nonce) if client_nonce is not None else _new_nonce()
        self._client_first_bare = f"n={_saslname_escape(user)},r={self._nonce}"
        self._state = _State.INITIAL
        self._auth_message = b""
        self._server_key = b""

    def __repr__(self) -> str:
        return f"<ScramClient state={self._state.name}>"

    def client_first(self) -> bytes:
        """Return the SASLInitialResponse data: gs2 header plus client-first-message-bare."""
        if self._state is not _State.INITIAL:
            raise self._fail("SCRAM client-first-message already sent")
        self._state = _State.WAIT_FIRST
        return ("n,," + self._client_first_bare).encode("utf-8")

    def handle_server_first(self, server_first: bytes) -> bytes:
        """Take the AuthenticationSASLContinue data; return the client-final-message."""
        return self._step(self._FIRST, self._server_first, server_first)

    def _server_first(self, data: bytes) -> bytes:
        what = self._FIRST
        text, parts = _fields(data, what, 3)
        if parts[0].startswith("m="):
            raise AuthError("SCRAM mandatory extension is not supported")
        nonce = _printable(_attr(parts[0], "r", what), what)
        salt = _b64decode(_attr(parts[1], "s", what), "salt")
        iterations_text = _attr(parts[2], "i", what)
        _check_extensions(parts[3:], what)
        # The server must extend our nonce, not replace or merely echo it.
        if len(nonce) <= len(self._nonce) or not nonce.startswith(self._nonce):
            raise AuthError("SCRAM nonce mismatch")
        if not salt:
            raise AuthError(f"malformed SCRAM message: empty salt in {what}")
        # int() alone would accept "+1", " 1", "1_0" and non-ASCII digits.
        if not _ITERATIONS_RE.fullmatch(iterations_text):
            raise AuthError(f"malformed SCRAM message: bad iteration count in {what}")
        iterations = int(iterations_text)
        if iterations > _MAX_ITERATIONS:
            raise AuthError(f"malformed SCRAM message: bad iteration count in {what}")

        salted = hashlib.pbkdf2_hmac(_DIGEST, self._password, salt, iterations)
        client_key = _hmac(salted, b"Client Key")
        self._server_key = _hmac(salted, b"Server Key")
        without_proof = f"c={_b64(b'n,,')},r={nonce}"
        self._auth_message = ",".join((self._client_first_bare, text, without_proof)).encode(
            "utf-8"
        )
        client_signature = _hmac(_h(client_key), self._auth_message)
        proof = _xor(client_key, client_signature)
        return f"{without_proof},p={_b64(proof)}".encode("ascii")

    def verify_server_final(self, server_final: bytes) -> None:
        """Check the AuthenticationSASLFinal data; raise AuthError unless the server is genuine."""
        self._step(self._FINAL, self._server_final, server_final)

    def _server_final(self, data: bytes) -> None:
        what = self._FINAL
        _text, parts = _fields(data, what, 1)
        _check_extensions(parts[1:], what)
        if parts[0].startswith("e="):
            reason = parts[0][2:]
            # The server's error is a short token like "invalid-proof"; anything else is
            # not echoed, so a hostile server cannot inject text into our logs.
            if not re.fullmatch(r"[a-z0-9-]{1,64}", reason):
                reason = "unrecognised"
            raise AuthError(f"SCRAM server reported error: {reason}")
        signature = _b64decode(_attr(parts[0], "v", what), "server signature")
        expected = _hmac(self._server_key, self._auth_message)
        if not hmac.compare_digest(signature, expected):
            raise AuthError("SCRAM server signature mismatch")
