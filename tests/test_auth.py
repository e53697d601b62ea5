"""Unit tests for sidecar.protocol.auth: md5, SASLprep and both sides of SCRAM-SHA-256."""

from __future__ import annotations

import base64
import contextlib
import hashlib
import hmac

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from sidecar.protocol.auth import (
    AuthError,
    ScramClient,
    ScramSecret,
    ScramServer,
    md5_password_response,
    saslprep,
    verify_md5_response,
)

# RFC 7677 section 3 test vector.
RFC_PASSWORD = "pencil"
RFC_CLIENT_NONCE = "rOprNGfwEbeRWgbNEkqO"
RFC_SERVER_NONCE = "%hvYDpWUa2RaTCAfuxFIlj)hNlF$k0"
RFC_SALT = base64.b64decode("W22ZaJ0SNY7soEsUEjb6gQ==")
RFC_CLIENT_FIRST = b"n,,n=user,r=rOprNGfwEbeRWgbNEkqO"
RFC_SERVER_FIRST = (
    b"r=rOprNGfwEbeRWgbNEkqO%hvYDpWUa2RaTCAfuxFIlj)hNlF$k0,s=W22ZaJ0SNY7soEsUEjb6gQ==,i=4096"
)
RFC_CLIENT_FINAL = (
    b"c=biws,r=rOprNGfwEbeRWgbNEkqO%hvYDpWUa2RaTCAfuxFIlj)hNlF$k0,"
    b"p=dHzbZapWIk4jUhN+Ute9ytag9zjfMHgsqmmiz7AndVQ="
)
RFC_SERVER_FINAL = b"v=6rriTRBi23WpRR/wtup+mMhUZUn/dB5nLTJRsjl95G4="

# Few iterations keep the non-vector tests fast; the maths does not depend on the count.
FAST_ITERATIONS = 16


@pytest.fixture(scope="module")
def rfc_secret() -> ScramSecret:
    return ScramSecret.from_password(RFC_PASSWORD, salt=RFC_SALT, iterations=4096)


@pytest.fixture(scope="module")
def secret() -> ScramSecret:
    return ScramSecret.from_password("correct horse", iterations=FAST_ITERATIONS)


def _replace_attr(message: bytes, name: bytes, value: bytes) -> bytes:
    parts = message.split(b",")
    return b",".join(name + b"=" + value if p.startswith(name + b"=") else p for p in parts)


def _flip_b64(value: bytes) -> bytes:
    raw = bytearray(base64.b64decode(value))
    raw[0] ^= 0x01
    return base64.b64encode(bytes(raw))


def _attr(message: bytes, name: bytes) -> bytes:
    for part in message.split(b","):
        if part.startswith(name + b"="):
            return part[len(name) + 1 :]
    raise AssertionError(f"no {name!r} in {message!r}")


# --------------------------------------------------------------------------------------------
# RFC 7677 vector


def test_rfc7677_client(rfc_secret: ScramSecret) -> None:
    client = ScramClient(RFC_PASSWORD, client_nonce=RFC_CLIENT_NONCE, user="user")
    assert client.client_first() == RFC_CLIENT_FIRST
    assert client.handle_server_first(RFC_SERVER_FIRST) == RFC_CLIENT_FINAL
    client.verify_server_final(RFC_SERVER_FINAL)


def test_rfc7677_server(rfc_secret: ScramSecret) -> None:
    server = ScramServer(rfc_secret, server_nonce=RFC_SERVER_NONCE)
    assert server.handle_client_first(RFC_CLIENT_FIRST) == RFC_SERVER_FIRST
    assert server.handle_client_final(RFC_CLIENT_FINAL) == RFC_SERVER_FINAL


def test_client_first_is_postgres_style() -> None:
    client = ScramClient("pw", client_nonce="abc")
    assert client.client_first() == b"n,,n=,r=abc"


def test_default_nonces_are_random_base64() -> None:
    a, b = ScramClient("pw").client_first(), ScramClient("pw").client_first()
    assert a != b
    assert len(base64.b64decode(a.removeprefix(b"n,,n=,r="), validate=True)) == 18


def test_secret_repr_hides_keys(secret: ScramSecret) -> None:
    text = repr(secret)
    assert "stored_key" not in text
    assert "server_key" not in text
    assert repr(secret.stored_key) not in text


# --------------------------------------------------------------------------------------------
# Round trips and tampering


def _exchange_to_client_final(
    secret: ScramSecret, password: str = "correct horse"
) -> tuple[ScramClient, ScramServer, bytes]:
    client = ScramClient(password)
    server = ScramServer(secret)
    server_first = server.handle_client_first(client.client_first())
    return client, server, client.handle_server_first(server_first)


def test_round_trip(secret: ScramSecret) -> None:
    client, server, client_final = _exchange_to_client_final(secret)
    client.verify_server_final(server.handle_client_final(client_final))


def test_round_trip_non_ascii_password() -> None:
    # The client preps "\u2168" to "IX", so a verifier built from "IX" must accept it.
    secret = ScramSecret.from_password("IX", iterations=FAST_ITERATIONS)
    client, server, client_final = _exchange_to_client_final(secret, password="\u2168")
    client.verify_server_final(server.handle_client_final(client_final))


def test_wrong_password(secret: ScramSecret) -> None:
    _, server, client_final = _exchange_to_client_final(secret, password="hunter2")
    with pytest.raises(AuthError, match="proof mismatch") as info:
        server.handle_client_final(client_final)
    text = str(info.value)
    assert "hunter2" not in text
    assert _attr(client_final, b"p").decode() not in text


def test_tampered_proof(secret: ScramSecret) -> None:
    _, server, client_final = _exchange_to_client_final(secret)
    bad = _replace_attr(client_final, b"p", _flip_b64(_attr(client_final, b"p")))
    with pytest.raises(AuthError, match="proof mismatch"):
        server.handle_client_final(bad)


def test_short_proof(secret: ScramSecret) -> None:
    _, server, client_final = _exchange_to_client_final(secret)
    bad = _replace_attr(client_final, b"p", base64.b64encode(b"x" * 31))
    with pytest.raises(AuthError):
        server.handle_client_final(bad)


def test_tampered_nonce(secret: ScramSecret) -> None:
    _, server, client_final = _exchange_to_client_final(secret)
    bad = _replace_attr(client_final, b"r", _attr(client_final, b"r") + b"x")
    with pytest.raises(AuthError, match="nonce mismatch"):
        server.handle_client_final(bad)


@pytest.mark.parametrize("cbind", [b"eSws", b"cD10bHMtc2VydmVyLWVuZC1wb2ludCws", b"", b"biws="])
def test_tampered_channel_binding(secret: ScramSecret, cbind: bytes) -> None:
    _, server, client_final = _exchange_to_client_final(secret)
    with pytest.raises(AuthError):
        server.handle_client_final(_replace_attr(client_final, b"c", cbind))


def test_gs2_flag_y_accepted_and_pinned(secret: ScramSecret) -> None:
    # A client that supports channel binding but saw no -PLUS offer sends "y"; its c= must
    # then be base64("y,,") = "eSws", and "biws" must be refused.
    client = ScramClient("correct horse", client_nonce="abc")
    server = ScramServer(secret)
    server_first = server.handle_client_first(b"y,,n=,r=abc")
    client.client_first()
    client_final = client.handle_server_first(server_first)
    with pytest.raises(AuthError, match="channel binding"):
        server.handle_client_final(client_final)  # client computed c=biws


def test_gs2_flag_y_round_trip(secret: ScramSecret) -> None:
    # Rebuild the client-final by hand with c=eSws to show "y" works end to end.
    server = ScramServer(secret)
    server_first = server.handle_client_first(b"y,,n=,r=abc")
    salted = hashlib.pbkdf2_hmac("sha256", b"correct horse", secret.salt, secret.iterations)
    client_key = hmac.digest(salted, b"Client Key", "sha256")
    without_proof = b"c=eSws,r=" + _attr(server_first, b"r")
    auth_message = b"n=,r=abc," + server_first + b"," + without_proof
    signature = hmac.digest(hashlib.sha256(client_key).digest(), auth_message, "sha256")
    proof = bytes(a ^ b for a, b in zip(client_key, signature, strict=True))
    final = server.handle_client_final(without_proof + b",p=" + base64.b64encode(proof))
    assert final.startswith(b"v=")


def test_channel_binding_requested(secret: ScramSecret) -> None:
    server = ScramServer(secret)
    with pytest.raises(AuthError, match="channel binding"):
        server.handle_client_first(b"p=tls-server-end-point,,n=,r=abc")


@pytest.mark.parametrize(
    "client_first",
    [
        b"",
        b"n,,",
        b"n,,n=",
        b"n,,r=abc",  # missing n=
        b"n,,r=abc,n=",  # wrong order
        b"x,,n=,r=abc",  # bad cbind flag
        b"n,a=admin,n=,r=abc",  # authzid
        b"n,,m=ext,n=,r=abc",  # mandatory extension
        b"n,,n=,r=",  # empty nonce
        b"n,,n=,r=a\x7fb",  # non-printable nonce
        b"n,,n=,r=\xc3\xa9",  # non-ASCII nonce
        b"n,,n=a=2Xb,r=abc",  # bad saslname escape
        b"n,,n=,r=abc,x",  # malformed extension
        b"n,,n=,r=abc\x00",
        b"\xff\xfe",
    ],
)
def test_malformed_client_first(secret: ScramSecret, client_first: bytes) -> None:
    with pytest.raises(AuthError):
        ScramServer(secret).handle_client_first(client_first)


def test_client_first_accepts_extensions_and_escaped_name(secret: ScramSecret) -> None:
    server = ScramServer(secret, server_nonce="SRV")
    first = server.handle_client_first(b"n,,n=a=2Cb=3D\xc3\xa9,r=abc,x=ext")
    assert first.startswith(b"r=abcSRV,s=")


@pytest.mark.parametrize(
    "client_final",
    [
        b"",
        b"c=biws",
        b"c=biws,r=x",
        b"r=x,c=biws,p=AAAA",  # wrong order
        b"c=biws,r=x,p=!!!!",  # bad base64
        b"c=biws,r=x,p=AAA",  # bad padding
        b"c=biws,r=x,p=\xc3\xa9",  # non-ASCII
        b"c=biws,r=x,p=" + base64.b64encode(bytes(32)) + b",x=1",  # proof not last
    ],
)
def test_malformed_client_final(secret: ScramSecret, client_final: bytes) -> None:
    server = ScramServer(secret)
    server.handle_client_first(b"n,,n=,r=abc")
    with pytest.raises(AuthError):
        server.handle_client_final(client_final)


def test_server_is_dead_after_error(secret: ScramSecret) -> None:
    _, server, client_final = _exchange_to_client_final(secret)
    with pytest.raises(AuthError):
        server.handle_client_final(b"garbage")
    with pytest.raises(AuthError, match="out of order"):
        server.handle_client_final(client_final)


def test_server_out_of_order(secret: ScramSecret) -> None:
    with pytest.raises(AuthError, match="out of order"):
        ScramServer(secret).handle_client_final(b"c=biws,r=x,p=AAAA")
    server = ScramServer(secret)
    server.handle_client_first(b"n,,n=,r=abc")
    with pytest.raises(AuthError, match="out of order"):
        server.handle_client_first(b"n,,n=,r=abc")


def test_tampered_server_final(secret: ScramSecret) -> None:
    client, server, client_final = _exchange_to_client_final(secret)
    server_final = server.handle_client_final(client_final)
    with pytest.raises(AuthError, match="signature mismatch"):
        client.verify_server_final(b"v=" + _flip_b64(server_final[2:]))


def test_server_final_from_wrong_server(secret: ScramSecret) -> None:
    # A server holding a different verifier cannot forge v= even if it accepted the proof.
    client = ScramClient("correct horse", client_nonce="abc")
    client.client_first()
    client.handle_server_first(b"r=abcSRV,s=" + base64.b64encode(b"salt") + b",i=1")
    with pytest.raises(AuthError, match="signature mismatch"):
        client.verify_server_final(b"v=" + base64.b64encode(bytes(32)))


def test_server_final_error() -> None:
    client = ScramClient("pw", client_nonce="abc")
    client.client_first()
    client.handle_server_first(b"r=abcSRV,s=c2FsdA==,i=1")
    with pytest.raises(AuthError, match="invalid-proof"):
        client.verify_server_final(b"e=invalid-proof")


def test_server_final_error_text_not_echoed() -> None:
    client = ScramClient("pw", client_nonce="abc")
    client.client_first()
    client.handle_server_first(b"r=abcSRV,s=c2FsdA==,i=1")
    with pytest.raises(AuthError) as info:
        client.verify_server_final(b"e=Hello\nFAKE LOG LINE")
    assert "FAKE" not in str(info.value)


@pytest.mark.parametrize(
    "server_first",
    [
        b"",
        b"r=abcSRV,s=c2FsdA==",  # missing i=
        b"r=xyzSRV,s=c2FsdA==,i=4096",  # nonce not ours
        b"r=abc,s=c2FsdA==,i=4096",  # nonce not extended
        b"r=abcSRV,s=c2FsdA==,i=0",
        b"r=abcSRV,s=c2FsdA==,i=-1",
        b"r=abcSRV,s=c2FsdA==,i=+1",
        b"r=abcSRV,s=c2FsdA==,i=1_0",
        b"r=abcSRV,s=c2FsdA==,i=" + b"9" * 5000,  # would trip int()'s digit limit
        b"r=abcSRV,s=c2FsdA==,i=4294967296",
        b"r=abcSRV,s=,i=4096",  # empty salt
        b"r=abcSRV,s=c2FsdA=,i=4096",  # bad padding
        b"s=c2FsdA==,r=abcSRV,i=4096",  # wrong order
        b"m=ext,r=abcSRV,s=c2FsdA==,i=4096",
        b"r=abcSR\xc3\xa9,s=c2FsdA==,i=4096",
        b"r=abcSRV,s=c2FsdA==,i=4096,bad",
    ],
)
def test_malformed_server_first(server_first: bytes) -> None:
    client = ScramClient("pw", client_nonce="abc")
    client.client_first()
    with pytest.raises(AuthError):
        client.handle_server_first(server_first)
    with pytest.raises(AuthError, match="out of order"):
        client.verify_server_final(b"v=AAAA")


def test_client_out_of_order() -> None:
    client = ScramClient("pw", client_nonce="abc")
    with pytest.raises(AuthError, match="out of order"):
        client.handle_server_first(b"r=abcSRV,s=c2FsdA==,i=1")
    client = ScramClient("pw", client_nonce="abc")
    client.client_first()
    with pytest.raises(AuthError):
        client.client_first()


def test_bad_nonce_argument() -> None:
    with pytest.raises(ValueError):
        ScramClient("pw", client_nonce="a,b")
    with pytest.raises(ValueError):
        ScramServer(ScramSecret.from_password("pw", iterations=1), server_nonce="")


# --------------------------------------------------------------------------------------------
# md5


def _expected_md5(user: str, password: str, salt: bytes) -> bytes:
    inner = hashlib.md5((password + user).encode()).hexdigest().encode()
    return b"md5" + hashlib.md5(inner + salt).hexdigest().encode()


def test_md5_known_value() -> None:
    salt = b"\x01\x02\x03\x04"
    expected = _expected_md5("postgres", "secret", salt)
    assert md5_password_response("postgres", "secret", salt) == expected
    assert len(expected) == 35
    assert not expected.endswith(b"\x00")


def test_verify_md5() -> None:
    salt = b"\x01\x02\x03\x04"
    good = md5_password_response("postgres", "secret", salt)
    assert verify_md5_response("postgres", "secret", salt, good)
    assert verify_md5_response("postgres", "secret", salt, good + b"\x00")
    assert not verify_md5_response("postgres", "wrong", salt, good)
    assert not verify_md5_response("other", "secret", salt, good)
    assert not verify_md5_response("postgres", "secret", b"\x04\x03\x02\x01", good)
    assert not verify_md5_response("postgres", "secret", salt, good.upper())
    assert not verify_md5_response("postgres", "secret", salt, b"")
    assert not verify_md5_response("postgres", "secret", salt, good + b"\x00\x00")


def test_md5_bad_salt() -> None:
    with pytest.raises(AuthError):
        md5_password_response("postgres", "secret", b"\x01\x02\x03")


# --------------------------------------------------------------------------------------------
# SASLprep


@pytest.mark.parametrize(
    ("password", "expected"),
    [
        ("pencil", b"pencil"),
        ("", b""),
        ("I\u00adX", b"IX"),  # soft hyphen maps to nothing
        ("\u2168", b"IX"),  # ROMAN NUMERAL NINE, NFKC
        ("a\u00a0b", b"a b"),  # non-ASCII space maps to space
        ("\ufb01", b"fi"),  # ligature, NFKC
        ("\u00e9", "\u00e9".encode()),
        ("e\u0301", "\u00e9".encode()),  # NFKC composes
        ("\u0627\u0628", "\u0627\u0628".encode()),  # all RandALCat is fine
    ],
)
def test_saslprep(password: str, expected: bytes) -> None:
    assert saslprep(password) == expected


@pytest.mark.parametrize(
    "password",
    [
        "\u0007",  # ASCII: PostgreSQL passes pure ASCII through without checks
        "\u00e9\u0007",  # control character with non-ASCII: prohibited
        "\u00e9\u200e",  # C.8 change-display-properties
        "\u00e9\ue000",  # C.3 private use
        "\u0221",  # unassigned in Unicode 3.2 (A.1)
        "\u00ad",  # maps to nothing: empty result is refused
        "\u0627a\u0628",  # RandALCat mixed with LCat
        "\u06271",  # RandALCat not last
    ],
)
def test_saslprep_falls_back_to_raw(password: str) -> None:
    assert saslprep(password) == password.encode("utf-8")


def test_saslprep_invalid_utf8_passes_raw_bytes() -> None:
    # A password read via surrogateescape (e.g. from os.environ) keeps its original bytes.
    raw = b"caf\xe9\xff"
    assert saslprep(raw.decode("utf-8", "surrogateescape")) == raw


def test_saslprep_used_by_secret() -> None:
    a = ScramSecret.from_password("\u2168", salt=b"s", iterations=1)
    b = ScramSecret.from_password("IX", salt=b"s", iterations=1)
    assert a == b


# --------------------------------------------------------------------------------------------
# Fuzz: any peer bytes raise AuthError or succeed, never another exception type

FUZZ = settings(max_examples=300, deadline=None)
FUZZ_SECRET = ScramSecret.from_password("fuzz", salt=b"salt", iterations=1)

# Bytes drawn mostly from the SCRAM alphabet so parsing gets past the first check.
scramish = st.lists(
    st.sampled_from([b",", b"=", b"n", b"y", b"p", b"r", b"c", b"s", b"i", b"v", b"e", b"m"])
    | st.sampled_from([b"abc", b"biws", b"AAAA", b"=2C", b"=3D", b"1", b"\x00", b"\xff"])
    | st.binary(max_size=4),
    max_size=24,
).map(b"".join)
peer_bytes = st.binary(max_size=200) | scramish


def _mutations(valid: bytes) -> st.SearchStrategy[bytes]:
    # Splice a short random run into a valid message: reaches the deeper checks.
    return st.tuples(st.integers(0, len(valid)), st.integers(0, 4), st.binary(max_size=3)).map(
        lambda t: valid[: t[0]] + t[2] + valid[t[0] + t[1] :]
    )


def _server_waiting_for_final() -> ScramServer:
    server = ScramServer(FUZZ_SECRET, server_nonce="SRV")
    server.handle_client_first(b"n,,n=,r=abc")
    return server


def _client_waiting_for_first() -> ScramClient:
    client = ScramClient("fuzz", client_nonce="abc")
    client.client_first()
    return client


def _client_waiting_for_final() -> ScramClient:
    client = _client_waiting_for_first()
    client.handle_server_first(b"r=abcSRV,s=c2FsdA==,i=1")
    return client


def _valid_client_final() -> bytes:
    client = _client_waiting_for_first()
    return client.handle_server_first(b"r=abcSRV,s=c2FsdA==,i=1")


@FUZZ
@given(peer_bytes | _mutations(b"n,,n=,r=abc"))
def test_fuzz_handle_client_first(data: bytes) -> None:
    with contextlib.suppress(AuthError):
        ScramServer(FUZZ_SECRET).handle_client_first(data)


@FUZZ
@given(peer_bytes | _mutations(_valid_client_final()))
def test_fuzz_handle_client_final(data: bytes) -> None:
    with contextlib.suppress(AuthError):
        _server_waiting_for_final().handle_client_final(data)


@FUZZ
@given(peer_bytes | _mutations(b"r=abcSRV,s=c2FsdA==,i=1"))
def test_fuzz_handle_server_first(data: bytes) -> None:
    with contextlib.suppress(AuthError):
        _client_waiting_for_first().handle_server_first(data)


@FUZZ
@given(peer_bytes | _mutations(b"v=" + base64.b64encode(bytes(32))))
def test_fuzz_verify_server_final(data: bytes) -> None:
    with contextlib.suppress(AuthError):
        _client_waiting_for_final().verify_server_final(data)
