"""Fixtures: a real PostgreSQL for the session, real proxy processes per test."""

from __future__ import annotations

import contextlib
import os
import shutil
from collections.abc import Iterator
from pathlib import Path

import pytest
from hypothesis import settings
from pgfixtures import (
    PASSWORDS,
    CertAuthority,
    PostgresServer,
    ProxyFactory,
    ProxyProcess,
    make_ca,
    short_tempdir,
)

# CI runs the same generated cases every time (SIDECAR_TEST_DERANDOMIZE=1 in .ci/run): a
# landing must not hang on a rare draw. Local runs keep random seeds, to keep finding new cases.
settings.register_profile("derandomized", derandomize=True)
if os.environ.get("SIDECAR_TEST_DERANDOMIZE") == "1":
    settings.load_profile("derandomized")


@pytest.fixture(scope="session")
def pg() -> Iterator[PostgresServer]:
    """PostgreSQL 15 on 127.0.0.1:<free port> with TLS from a test CA; see PostgresServer."""
    server = PostgresServer.start()
    try:
        yield server
    finally:
        server.stop()


@pytest.fixture(scope="session")
def other_ca() -> Iterator[CertAuthority]:
    """A second CA that did not sign the server's certificate."""
    directory = short_tempdir("ca")
    try:
        yield make_ca(directory, "pg-sidecar untrusted CA")
    finally:
        shutil.rmtree(directory, ignore_errors=True)


@pytest.fixture
def proxy_factory(pg: PostgresServer, tmp_path: Path) -> Iterator[ProxyFactory]:
    """Call it to start a proxy: proxy_factory("appdb=URL", ..., SIDECAR_X="value")."""
    factory = ProxyFactory(pg, tmp_path)
    try:
        yield factory
    finally:
        problems = factory.close()
        # Let the stopped proxies' server connections exit so that the next test's counts
        # of backends start from zero; a slow exit is not this test's failure.
        for user in PASSWORDS:
            with contextlib.suppress(AssertionError):
                pg.wait_backends(0, user=user, timeout=5)
    if problems:
        pytest.fail("\n".join(problems))


@pytest.fixture
def proxy(proxy_factory: ProxyFactory) -> ProxyProcess:
    """A proxy with default settings serving appdb as `app`."""
    return proxy_factory()
