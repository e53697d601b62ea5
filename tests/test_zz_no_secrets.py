"""Runs last (the name sorts last): no password in any proxy log the whole suite produced.

Every proxy a test started wrote its output to a `proxy-*.log` file under pytest's base
temporary directory; the launcher's logs hold proxy lines too (those starting "sidecar ").
Each test's teardown already checks its own proxies; this sweep also covers logs that a
failing or crashing test's teardown never looked at, and the passwords test_security.py uses.
"""

from __future__ import annotations

from pathlib import Path
from urllib.parse import quote

import pytest
from pgfixtures import PASSWORDS, ProxyProcess
from tcpproxy import PgWire, errors
from test_security import EXTRA_SECRETS

#: Logs made of proxy output only; in other logs only lines starting "sidecar " are the proxy's.
PROXY_LOGS = "proxy-*.log"


def forms(password: str) -> set[str]:
    return {password, quote(password, safe=""), quote(password)}


def proxy_lines(base: Path) -> dict[Path, list[str]]:
    found: dict[Path, list[str]] = {}
    for path in sorted(base.rglob("*.log")):
        try:
            lines = path.read_text(errors="replace").splitlines()
        except OSError:
            continue  # removed meanwhile
        if not path.match(PROXY_LOGS):
            lines = [line for line in lines if line.startswith("sidecar ")]
        found[path] = lines
    return found


def test_no_password_in_any_proxy_log(
    proxy: ProxyProcess, tmp_path_factory: pytest.TempPathFactory
) -> None:
    # at least one log with a failed login in it, whatever else ran in this session
    with PgWire.connect(proxy.host, proxy.port) as wire:
        assert errors(wire.login("app", EXTRA_SECRETS[0], "appdb"))
    secrets = {form for p in (*PASSWORDS.values(), *EXTRA_SECRETS) for form in forms(p)}
    logs = proxy_lines(tmp_path_factory.getbasetemp())
    assert any(path.match(PROXY_LOGS) for path in logs), "no proxy log found to check"
    leaks = [
        f"{path}:{number}: {line[:200]}"
        for path, lines in logs.items()
        for number, line in enumerate(lines, 1)
        if any(secret in line for secret in secrets)
    ]
    assert not leaks, f"{len(leaks)} log lines hold a password:\n" + "\n".join(leaks[:20])
    print(f"checked {sum(map(len, logs.values()))} proxy log lines in {len(logs)} files")
