"""TLS towards the apps: the certificate the proxy serves and its server-side SSL context.

Apps that insist on TLS (libpq `sslmode=require`, `PGSSLMODE=require`, asyncpg `ssl='require'`,
node-postgres `ssl: {rejectUnauthorized: false}`) must connect unchanged, so an SSLRequest on
the TCP listener is answered `S` by default (SIDECAR_CLIENT_TLS=allow). The certificate is the
user's pair (SIDECAR_CLIENT_TLS_CERT/KEY) or, by default, one made at start, in memory: a
self-signed P-256 certificate for 127.0.0.1, ::1 and localhost, valid for ten years. Those apps
do not verify the certificate (that is what `require` means in libpq); an app that does
(`verify-full`) needs the user's own pair, one its root certificate trusts.

The material is made once per sidecar: worker 0 makes or reads it, and the other workers get
the PEM with the rest of their configuration (shell/workers.py), so every worker serves the
same certificate.
"""

from __future__ import annotations

import contextlib
import datetime
import ipaddress
import os
import ssl
import tempfile
import time
from collections.abc import Iterator
from dataclasses import dataclass, field

from ..config import Settings

#: Names the generated certificate is valid for: what a local app can connect to.
LOCAL_NAMES = ("localhost",)
LOCAL_IPS = ("127.0.0.1", "::1")


@dataclass(frozen=True, slots=True)
class ClientTLS:
    """A certificate chain and its key (PEM), where they came from, and what making them cost."""

    cert_pem: bytes
    key_pem: bytes = field(repr=False)
    #: "generated" or the certificate file's path.
    source: str
    #: Seconds spent making (or reading) the material.
    cost: float = 0.0

    def context(self) -> ssl.SSLContext:
        """A server-side context serving this certificate: TLS 1.2+ (PostgreSQL's default
        ssl_min_protocol_version), no client certificates asked for."""
        ctx = ssl.SSLContext(ssl.PROTOCOL_TLS_SERVER)
        ctx.minimum_version = ssl.TLSVersion.TLSv1_2
        # PostgreSQL 17's libpq may offer ALPN "postgresql": accept it if offered.
        ctx.set_alpn_protocols(["postgresql"])
        # A fresh session per connection, as PostgreSQL: no ticket keys to keep or rotate.
        ctx.options |= ssl.OP_NO_TICKET
        with _pem_path(self.cert_pem) as cert, _pem_path(self.key_pem) as key:
            ctx.load_cert_chain(cert, key)
        return ctx

    def describe(self) -> dict[str, object]:
        """Fields for the start-up log line."""
        from cryptography import x509

        cert = x509.load_pem_x509_certificate(self.cert_pem)
        return {
            "cert": self.source,
            "subject": cert.subject.rfc4514_string(),
            "not_after": cert.not_valid_after_utc.date().isoformat(),
            "ms": round(self.cost * 1000, 1),
        }


def load_client_tls(settings: Settings) -> ClientTLS | None:
    """The material SIDECAR_CLIENT_TLS* ask for (None when off). Config already checked the
    files (config.check_client_tls_files)."""
    if settings.client_tls == "off":
        return None
    started = time.perf_counter()
    if settings.client_tls_cert:
        with open(settings.client_tls_cert, "rb") as f:
            cert = f.read()
        with open(settings.client_tls_key, "rb") as f:
            key = f.read()
        return ClientTLS(cert, key, settings.client_tls_cert, time.perf_counter() - started)
    cert, key = generate_certificate()
    return ClientTLS(cert, key, "generated", time.perf_counter() - started)


def generate_certificate() -> tuple[bytes, bytes]:
    """A self-signed P-256 certificate for the local names (EC: about a millisecond, where
    an RSA key would take 50-500 ms of a dyno's start)."""
    from cryptography import x509
    from cryptography.hazmat.primitives import hashes, serialization
    from cryptography.hazmat.primitives.asymmetric import ec
    from cryptography.x509.oid import ExtendedKeyUsageOID, NameOID

    key = ec.generate_private_key(ec.SECP256R1())
    name = x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, "pg-sidecar (localhost)")])
    now = datetime.datetime.now(datetime.UTC)
    san: list[x509.GeneralName] = [x509.DNSName(n) for n in LOCAL_NAMES]
    san += [x509.IPAddress(ipaddress.ip_address(ip)) for ip in LOCAL_IPS]
    cert = (
        x509.CertificateBuilder()
        .subject_name(name)
        .issuer_name(name)
        .public_key(key.public_key())
        .serial_number(x509.random_serial_number())
        # An hour back: a client whose clock is a little behind still accepts it.
        .not_valid_before(now - datetime.timedelta(hours=1))
        .not_valid_after(now + datetime.timedelta(days=3650))
        .add_extension(x509.SubjectAlternativeName(san), critical=False)
        .add_extension(x509.BasicConstraints(ca=False, path_length=None), critical=True)
        .add_extension(x509.ExtendedKeyUsage([ExtendedKeyUsageOID.SERVER_AUTH]), critical=False)
        .sign(key, hashes.SHA256())
    )
    return (
        cert.public_bytes(serialization.Encoding.PEM),
        key.private_bytes(
            serialization.Encoding.PEM,
            serialization.PrivateFormat.PKCS8,
            serialization.NoEncryption(),
        ),
    )


@contextlib.contextmanager
def _pem_path(pem: bytes) -> Iterator[str]:
    """A path to `pem` for ssl's load_cert_chain, which reads only files: an anonymous
    in-memory file (memfd) on Linux, so the key never touches a disk; else a private
    temporary file, removed at once."""
    memfd_create = getattr(os, "memfd_create", None)
    if memfd_create is not None:
        fd = memfd_create("sidecar-tls", os.MFD_CLOEXEC)
        try:
            os.write(fd, pem)
            yield f"/proc/self/fd/{fd}"
        finally:
            os.close(fd)
        return
    fd, path = tempfile.mkstemp(prefix="sidecar-tls-")
    try:
        os.write(fd, pem)
        os.close(fd)
        yield path
    finally:
        os.unlink(path)
