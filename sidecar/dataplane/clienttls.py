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

`cryptography` is never loaded into the sidecar itself: its Rust core holds about 11 MiB of
RSS for the process's life (a fifth of the 10,000-idle-clients budget) for a certificate made
once. A short-lived child Python makes it (generate_certificate), and the start-up line reads
the certificate with the ssl module (describe). A single-process sidecar makes it while it
already listens (generate_client_tls, from Proxy.start): an SSLRequest that comes first waits
for it, so start-up does not.
"""

from __future__ import annotations

import asyncio
import contextlib
import datetime
import json
import os
import ssl
import subprocess
import sys
import tempfile
import time
from collections.abc import Iterator
from dataclasses import dataclass, field

from ..config import Settings
from . import selfsigned


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
        subject, not_after = _subject_and_expiry(self.cert_pem)
        return {
            "cert": self.source,
            "subject": subject,
            "not_after": not_after.isoformat(),
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


#: The child that makes the certificate: -I (nothing of the app's environment), -S (no site:
#: our sys.path comes on its stdin, so it finds cryptography where we would and starts
#: sooner), the script alone, not the sidecar package.
_CHILD = (sys.executable, "-I", "-S", selfsigned.__file__)


def generate_certificate() -> tuple[bytes, bytes]:
    """selfsigned.make_certificate() in a child Python, so that cryptography is not loaded
    here; in this process if the child cannot run. (Blocking: for the shell, which makes the
    workers' one certificate before they start.)"""
    try:
        proc = subprocess.run(
            _CHILD, input=_child_input(), capture_output=True, timeout=60, check=True
        )
    except (OSError, subprocess.SubprocessError):
        return selfsigned.make_certificate()
    return _child_output(proc.stdout) or selfsigned.make_certificate()


async def generate_client_tls() -> ClientTLS:
    """generate_certificate without blocking the loop: a single-process sidecar listens (and
    serves clients in clear, and SSLRequests wait) while the child works, so the certificate
    is not part of the time to ready."""
    started = time.perf_counter()
    pems: tuple[bytes, bytes] | None = None
    try:
        proc = await asyncio.create_subprocess_exec(
            *_CHILD,
            stdin=asyncio.subprocess.PIPE,
            stdout=asyncio.subprocess.PIPE,
            stderr=asyncio.subprocess.DEVNULL,
        )
        try:
            out, _ = await asyncio.wait_for(proc.communicate(_child_input()), 60)
        except BaseException:  # too slow, or the proxy stops (cancelled): no child left behind
            with contextlib.suppress(ProcessLookupError):
                proc.kill()
            await proc.wait()
            raise
        pems = _child_output(out) if proc.returncode == 0 else None
    except (OSError, TimeoutError, subprocess.SubprocessError):
        pass
    cert, key = pems or selfsigned.make_certificate()
    return ClientTLS(cert, key, "generated", time.perf_counter() - started)


def _child_input() -> bytes:
    return json.dumps(sys.path).encode()


def _child_output(out: bytes) -> tuple[bytes, bytes] | None:
    """The certificate and key the child wrote, or None if it wrote something else."""
    cert, marker, key = out.partition(b"-----BEGIN PRIVATE KEY-----")
    if not cert.startswith(b"-----BEGIN CERTIFICATE-----") or not marker:
        return None
    return cert, marker + key


#: OpenSSL's long attribute names -> the short ones RFC 4514 (and cryptography) print.
_RFC4514_NAMES = {
    "commonName": "CN",
    "localityName": "L",
    "stateOrProvinceName": "ST",
    "organizationName": "O",
    "organizationalUnitName": "OU",
    "countryName": "C",
    "streetAddress": "STREET",
    "domainComponent": "DC",
    "userId": "UID",
}


def _rfc4514_value(value: str) -> str:
    """RFC 4514 section 2.4's escaping of an attribute value."""
    out = "".join("\\" + c if c in ',+"\\<>;' else c for c in value)
    if out[:1] in ("#", " "):
        out = "\\" + out
    if out.endswith(" ") and not out.endswith("\\ "):
        out = out[:-1] + "\\ "
    return out


def _subject_and_expiry(cert_pem: bytes) -> tuple[str, datetime.date]:
    """The certificate's subject as RFC 4514 prints it (last RDN first) and its expiry date,
    read by the ssl module (cryptography would stay loaded: see the module's docstring)."""
    decode = getattr(getattr(ssl, "_ssl", None), "_test_decode_cert", None)
    if decode is None:  # not CPython's ssl: the same fields from cryptography
        from cryptography import x509

        cert = x509.load_pem_x509_certificate(cert_pem)
        return cert.subject.rfc4514_string(), cert.not_valid_after_utc.date()
    with _pem_path(cert_pem) as path:
        info = decode(path)
    subject = ",".join(
        "+".join(f"{_RFC4514_NAMES.get(k, k)}={_rfc4514_value(v)}" for k, v in rdn)
        for rdn in reversed(info["subject"])
    )
    expiry = datetime.datetime.fromtimestamp(
        ssl.cert_time_to_seconds(info["notAfter"]), datetime.UTC
    )
    return subject, expiry.date()


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
