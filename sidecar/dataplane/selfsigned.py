"""The self-signed certificate clienttls.py serves by default, made without the sidecar package.

clienttls.generate_certificate runs this file as a script in a child Python (`python -I -S
selfsigned.py`, the parent's sys.path as JSON on stdin, the PEM certificate and key on
stdout), so that cryptography, imported only here, is never loaded into the sidecar. It
imports nothing of the sidecar, so the child starts in tens of milliseconds.
"""

from __future__ import annotations

import datetime
import ipaddress
import json
import sys

#: Names the generated certificate is valid for: what a local app can connect to.
LOCAL_NAMES = ("localhost",)
LOCAL_IPS = ("127.0.0.1", "::1")


def make_certificate() -> tuple[bytes, bytes]:
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


if __name__ == "__main__":
    sys.path[:] = json.loads(sys.stdin.read())
    cert, key = make_certificate()
    sys.stdout.buffer.write(cert + key)
