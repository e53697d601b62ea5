"""`bin/start-sidecar`: URL rewriting, the disabled path, config errors, paired lifetimes, drain.

Each test runs the real script as a subprocess against the real PostgreSQL (the `pg` fixture),
with small Python or shell commands as the app; the apps report through files, so stdout holds
only log lines, and no `sidecar ...` line may contain the app's password in any form.
"""

from __future__ import annotations

import asyncio
import json
import os
import shlex
import shutil
import signal
import subprocess
import sys
import time
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any
from urllib.parse import quote, unquote, urlsplit

import psycopg
import pytest
from pgfixtures import (
    APP_PASSWORD,
    PASSWORDS,
    REPO_ROOT,
    PostgresServer,
    free_port,
    poll_until,
    short_tempdir,
)

from sidecar.config import PoolConfig, Settings, parse_url
from sidecar.control import stats
from sidecar.control.console import AdminSession
from sidecar.dataplane.proxy import Proxy
from sidecar.shell.assemble import new_proxy
from sidecar.shell.launcher import Launcher, local_url

START = REPO_ROOT / "bin" / "start-sidecar"

# An app that writes its environment (as JSON) to the file named by its first argument.
DUMP_ENV = "import json, os, sys; json.dump(dict(os.environ), open(sys.argv[1], 'w'))"

# An app that queries through every URL it is given and writes the answers as JSON: psql,
# psycopg and asyncpg must each read the URL the launcher exported.
QUERY_ALL = r"""
import asyncio, json, os, subprocess, sys
import asyncpg, psycopg
out, names = sys.argv[1], sys.argv[2:]
sql = ("SELECT current_user || '|' || current_database() || '|' "
       "|| current_setting('application_name')")
res = {}
for var in names:
    url = os.environ[var]
    psql = subprocess.run(["psql", url, "-Atc", sql], capture_output=True, text=True)
    with psycopg.connect(url) as conn:
        via_psycopg = conn.execute(sql).fetchone()[0]
    async def via_asyncpg():
        conn = await asyncpg.connect(url, statement_cache_size=0)
        try:
            return await conn.fetchval(sql)
        finally:
            await conn.close()
    res[var] = {
        "psql": psql.stdout.strip() or psql.stderr.strip(),
        "psycopg": via_psycopg,
        "asyncpg": asyncio.run(via_asyncpg()),
    }
json.dump(res, open(out, "w"))
"""


def sidecar_lines(text: str, at: str | None = None) -> list[str]:
    """The log lines of the launcher and proxy (optionally only `sidecar at=<at>` ones)."""
    lines = [line for line in text.splitlines() if line.startswith("sidecar ")]
    if at is not None:
        lines = [line for line in lines if line.split()[1] == f"at={at}"]
    return lines


def password_leaks(text: str) -> list[str]:
    problems = []
    for user, password in PASSWORDS.items():
        for form in {password, quote(password, safe=""), quote(password)}:
            for line in sidecar_lines(text):
                if form in line:
                    problems.append(f"{user}'s password in: {line}")
    return problems


@dataclass
class Result:
    code: int
    out: str
    elapsed: float


class Launches:
    """Runs bin/start-sidecar with a clean, test-specific environment; checks logs at the end."""

    def __init__(self, pg: PostgresServer, tmp_path: Path) -> None:
        self.pg = pg
        self.tmp = tmp_path
        self.socket_dir = short_tempdir("sl")
        self.outputs: list[Path] = []
        self.procs: list[subprocess.Popen[bytes]] = []

    def env(self, **overrides: str | int | None) -> dict[str, str]:
        env = {
            k: v
            for k, v in os.environ.items()
            if not k.startswith(("SIDECAR_", "PGBOUNCER_", "DATABASE_URL", "HEROKU_"))
            and k != "DYNO"
        }
        env.update(
            SIDECAR_PORT=str(free_port()),
            SIDECAR_SOCKET_DIR=str(self.socket_dir),
            SIDECAR_STATS_PERIOD="0",
            # the interpreter running the tests has every dependency; the script's own
            # choice (.venv, python3) is what the buildpack test covers
            SIDECAR_PYTHON=sys.executable,
            PYTHONUNBUFFERED="1",
            DATABASE_URL=self.pg.url(),
        )
        for name, value in overrides.items():
            if value is None:
                env.pop(name, None)
            else:
                env[name] = str(value)
        return env

    def _log(self) -> Path:
        path = self.tmp / f"launch-{len(self.outputs)}.log"
        self.outputs.append(path)
        return path

    def run(
        self, *cmd: str, env: dict[str, str] | None = None, timeout: float = 25, **kw: Any
    ) -> Result:
        log = self._log()
        t0 = time.monotonic()
        with log.open("wb") as f:
            proc = subprocess.run(
                [str(START), *cmd],
                env=self.env() if env is None else env,
                stdin=subprocess.DEVNULL,
                stdout=f,
                stderr=subprocess.STDOUT,
                timeout=timeout,
                check=False,
                **kw,
            )
        return Result(proc.returncode, log.read_text(errors="replace"), time.monotonic() - t0)

    def start(
        self, *cmd: str, env: dict[str, str], **kw: Any
    ) -> tuple[subprocess.Popen[bytes], Path]:
        log = self._log()
        with log.open("wb") as f:
            proc = subprocess.Popen(
                [str(START), *cmd],
                env=env,
                stdin=subprocess.DEVNULL,
                stdout=f,
                stderr=subprocess.STDOUT,
                **kw,
            )
        self.procs.append(proc)
        return proc, log

    def close(self) -> list[str]:
        for proc in self.procs:
            if proc.poll() is None:
                proc.kill()
            proc.wait()
        problems = []
        for path in self.outputs:
            text = path.read_text(errors="replace") if path.exists() else ""
            if text:
                print(f"--- {path.name} ---\n{text[-10000:]}")
            problems += password_leaks(text)
        shutil.rmtree(self.socket_dir, ignore_errors=True)
        return problems


@pytest.fixture
def launches(pg: PostgresServer, tmp_path: Path) -> Iterator[Launches]:
    runner = Launches(pg, tmp_path)
    try:
        yield runner
    finally:
        problems = runner.close()
    if problems:
        pytest.fail("\n".join(problems))


def _own_database(pg: PostgresServer, prefix: str) -> str:
    """A fresh database owned by `app`, so backend counts see only this test's connections."""
    name = f"{prefix}_{os.urandom(3).hex()}"
    pg.query(f"CREATE DATABASE {name} OWNER app", dbname="postgres")
    return name


# -- URL rewriting -------------------------------------------------------------------------------


@pytest.mark.parametrize("password", [APP_PASSWORD, "p@ss:w/rd%25+x", "plain", "sp ace&=?#[]"])
@pytest.mark.parametrize("style", ["tcp", "unix"])
def test_local_url_round_trips_user_and_password(password: str, style: str) -> None:
    """What libpq and asyncpg read back is the upstream's user/password, and our pool name."""
    up = parse_url(f"postgres://us%40er:{quote(password, safe='')}@db.example.com:5433/d1")
    assert up.password == password
    settings = Settings(port=6001, socket_dir="/tmp/sc x", url_style=style)
    url = local_url(PoolConfig(name="heroku_postgresql_cobalt", upstream=up), settings)
    assert password not in url or password == "plain"

    libpq = psycopg.conninfo.conninfo_to_dict(url)
    assert libpq["user"] == "us@er"
    assert libpq["password"] == password
    assert libpq["dbname"] == "heroku_postgresql_cobalt"
    assert libpq["port"] == "6001"
    assert libpq["host"] == ("127.0.0.1" if style == "tcp" else "/tmp/sc x")

    from asyncpg.connect_utils import _parse_connect_dsn_and_args

    addrs, params = _parse_connect_dsn_and_args(
        dsn=url, host=None, port=None, user=None, password=None, passfile=None,
        database=None, ssl=None, service=None, servicefile=None, direct_tls=None,
        server_settings=None, target_session_attrs=None, krbsrvname=None, gsslib=None,
    )  # fmt: skip
    assert params.user == "us@er"
    assert params.password == password
    assert params.database == "heroku_postgresql_cobalt"
    expected = ("127.0.0.1", 6001) if style == "tcp" else ("/tmp/sc x/.s.PGSQL.6001", 6001)
    assert addrs[0] == (expected[0] if style == "unix" else expected)


def test_rewrites_urls_for_psql_psycopg_and_asyncpg(launches: Launches, tmp_path: Path) -> None:
    """Both vars are rewritten (and the app reaches PostgreSQL through each), the originals
    kept in *_UPSTREAM, the same URL in *_SIDECAR; query parameters go upstream."""
    pg = launches.pg
    cobalt = pg.url(application_name="from-upstream-url")
    env = launches.env(
        SIDECAR_URLS="DATABASE_URL HEROKU_POSTGRESQL_COBALT_URL",
        HEROKU_POSTGRESQL_COBALT_URL=cobalt,
    )
    port = env["SIDECAR_PORT"]
    out, seen = tmp_path / "env.json", tmp_path / "queries.json"
    script = (
        f"{shlex.quote(sys.executable)} -c {shlex.quote(DUMP_ENV)} {out} && "
        f"{shlex.quote(sys.executable)} -c {shlex.quote(QUERY_ALL)} {seen} "
        "DATABASE_URL HEROKU_POSTGRESQL_COBALT_URL"
    )
    res = launches.run("sh", "-c", script, env=env)
    assert res.code == 0, res.out

    app_env = json.loads(out.read_text())
    enc = quote(APP_PASSWORD, safe="")
    assert app_env["DATABASE_URL"] == f"postgres://app:{enc}@127.0.0.1:{port}/database"
    assert app_env["DATABASE_URL_SIDECAR"] == app_env["DATABASE_URL"]
    assert app_env["DATABASE_URL_UPSTREAM"] == pg.url()
    assert (
        app_env["HEROKU_POSTGRESQL_COBALT_URL"]
        == f"postgres://app:{enc}@127.0.0.1:{port}/heroku_postgresql_cobalt"
    )
    assert (
        app_env["HEROKU_POSTGRESQL_COBALT_URL_SIDECAR"] == (app_env["HEROKU_POSTGRESQL_COBALT_URL"])
    )
    assert app_env["HEROKU_POSTGRESQL_COBALT_URL_UPSTREAM"] == cobalt

    answers = json.loads(seen.read_text())
    for client in ("psycopg", "asyncpg"):
        assert answers["DATABASE_URL"][client] == "app|appdb|"
        assert answers["HEROKU_POSTGRESQL_COBALT_URL"][client] == "app|appdb|from-upstream-url"
    assert answers["DATABASE_URL"]["psql"] == "app|appdb|psql"  # psql names itself

    launch = sidecar_lines(res.out, "launch")
    assert len(launch) == 2
    assert f"url=postgres://app@127.0.0.1:{port}/database" in launch[0]
    assert "upstream=postgres://app@127.0.0.1:" in launch[0]
    assert sidecar_lines(res.out, "exit")[-1].endswith("code=0")


def test_unix_style_urls_work_for_psql_psycopg_and_asyncpg(
    launches: Launches, tmp_path: Path
) -> None:
    env = launches.env(SIDECAR_URL_STYLE="unix", DATABASE_URL=launches.pg.url())
    out, seen = tmp_path / "env.json", tmp_path / "queries.json"
    res = launches.run(
        "sh",
        "-c",
        f"{shlex.quote(sys.executable)} -c {shlex.quote(DUMP_ENV)} {out} && "
        f"{shlex.quote(sys.executable)} -c {shlex.quote(QUERY_ALL)} {seen} DATABASE_URL",
        env=env,
    )
    assert res.code == 0, res.out
    url = json.loads(out.read_text())["DATABASE_URL"]
    parts = urlsplit(url)
    assert (
        unquote(parts.netloc.rpartition("@")[2]) == f"{launches.socket_dir}:{env['SIDECAR_PORT']}"
    )
    assert parts.path == "/database"
    assert json.loads(seen.read_text())["DATABASE_URL"] == {
        "psql": "app|appdb|psql",
        "psycopg": "app|appdb|",
        "asyncpg": "app|appdb|",
    }


# An app that connects through DATABASE_URL with every client and says, for each, whether its
# own connection (app -> sidecar) is TLS; PGSSLMODE in its environment applies to all three.
TLS_REPORT = r"""
import asyncio, json, os, subprocess, sys
import asyncpg, psycopg
url = os.environ["DATABASE_URL"]
psql = subprocess.run(["psql", url, "-Atc", r"\conninfo"], capture_output=True, text=True)
with psycopg.connect(url) as conn:
    via_psycopg = [conn.execute("select current_database()").fetchone()[0],
                   conn.pgconn.ssl_in_use]
async def via_asyncpg():
    conn = await asyncpg.connect(url, statement_cache_size=0)
    try:
        return [await conn.fetchval("select current_database()"),
                conn._transport.get_extra_info("ssl_object") is not None]
    finally:
        await conn.close()
json.dump({"psql": psql.stdout + psql.stderr, "psycopg": via_psycopg,
           "asyncpg": asyncio.run(via_asyncpg())}, open(sys.argv[1], "w"))
"""


def test_heroku_enhanced_certificate_url_and_pgsslmode_require(
    launches: Launches, tmp_path: Path
) -> None:
    """Heroku's enhanced certificates put `sslmode=verify-full&sslrootcert=...` in
    DATABASE_URL: that verification stays with the upstream side (the server's certificate
    is checked against that root), the app's URL names the sidecar without it, and an app
    that also sets PGSSLMODE=require gets TLS from the sidecar, with every driver."""
    pg = launches.pg
    upstream = pg.url(host="localhost", sslmode="verify-full", sslrootcert=str(pg.ca_file))
    env = launches.env(DATABASE_URL=upstream, PGSSLMODE="require")
    out, seen = tmp_path / "env.json", tmp_path / "tls.json"
    res = launches.run(
        "sh",
        "-c",
        f"{shlex.quote(sys.executable)} -c {shlex.quote(DUMP_ENV)} {out} && "
        f"{shlex.quote(sys.executable)} -c {shlex.quote(TLS_REPORT)} {seen}",
        env=env,
    )
    assert res.code == 0, res.out
    app_env = json.loads(out.read_text())
    assert "sslmode" not in app_env["DATABASE_URL"] and "sslrootcert" not in app_env["DATABASE_URL"]
    assert app_env["DATABASE_URL_UPSTREAM"] == upstream
    report = json.loads(seen.read_text())
    assert "SSL connection (protocol: TLSv1." in report["psql"], report["psql"]
    assert report["psycopg"] == ["appdb", True]
    assert report["asyncpg"] == ["appdb", True]
    # the start-up line (with upstream=...), not the role line a first login adds
    [pool] = [line for line in sidecar_lines(res.out, "pool") if " upstream=" in line]
    assert "sslmode=verify-full" in pool, pool
    # and the server side verified: a wrong root would have failed the start of every server
    assert sidecar_lines(res.out, "server_connect"), res.out


# -- disabled, config errors -----------------------------------------------------------------------


@pytest.mark.parametrize(
    "switch", [("SIDECAR_ENABLED", "0"), ("SIDECAR_ENABLED", "False"), ("PGBOUNCER_ENABLED", "0")]
)
def test_disabled_runs_the_command_untouched(
    launches: Launches, tmp_path: Path, switch: tuple[str, str]
) -> None:
    """No Python is even started (SIDECAR_PYTHON points nowhere), no var changes, no listener,
    and the app's exit code comes straight through."""
    out = tmp_path / "env.json"
    env = launches.env(
        **{switch[0]: switch[1]}, SIDECAR_PYTHON="/nonexistent/python", SIDECAR_URLS="NOPE_URL"
    )
    res = launches.run(
        "sh", "-c", f'{shlex.quote(sys.executable)} -c "$1" {out}; exit 3', "sh", DUMP_ENV, env=env
    )
    assert res.code == 3, res.out
    app_env = json.loads(out.read_text())
    shell_managed = {"_", "PWD", "OLDPWD", "SHLVL"}  # what bash and sh set for themselves
    assert {k: app_env.get(k) for k in env if k not in shell_managed} == {
        k: v for k, v in env.items() if k not in shell_managed
    }
    assert app_env["DATABASE_URL"] == launches.pg.url()
    assert not any(k.endswith(("_SIDECAR", "_UPSTREAM")) for k in app_env)
    assert sidecar_lines(res.out) == ["sidecar at=disabled command=sh"]


@pytest.mark.parametrize(
    ("overrides", "message"),
    [
        ({"DATABASE_URL": None}, "DATABASE_URL is not set"),
        ({"DATABASE_URL": "  "}, "DATABASE_URL is not set"),
        ({"DATABASE_URL": "mysql://u:p@h/db"}, "DATABASE_URL is not a postgres:// URL"),
        ({"DATABASE_URL": "postgres://app:pw@h:notaport/db"}, "DATABASE_URL is not a valid"),
        ({"DATABASE_URL": "postgres://h/db"}, "DATABASE_URL has no user"),
        (
            {"SIDECAR_URLS": "DATABASE_URL HEROKU_POSTGRESQL_RED_URL"},
            "HEROKU_POSTGRESQL_RED_URL is not set",
        ),
        ({"SIDECAR_URL_STYLE": "tcpip"}, "SIDECAR_URL_STYLE must be tcp or unix"),
    ],
)
def test_bad_config_is_one_line_and_the_app_does_not_start(
    launches: Launches, tmp_path: Path, overrides: dict[str, str | None], message: str
) -> None:
    marker = tmp_path / "app-ran"
    res = launches.run("touch", str(marker), env=launches.env(**overrides))
    assert res.code == 1
    assert not marker.exists()
    lines = res.out.splitlines()
    assert len(lines) == 1, res.out
    assert lines[0].startswith("sidecar at=config_error level=error error=")
    assert message in lines[0]
    assert "pw" not in lines[0].replace("postgres://", "")


def test_port_in_use_fails_before_the_app_starts(launches: Launches, tmp_path: Path) -> None:
    import socket

    marker = tmp_path / "app-ran"
    with socket.socket() as busy:
        busy.bind(("127.0.0.1", 0))
        busy.listen()
        env = launches.env(SIDECAR_PORT=busy.getsockname()[1])
        res = launches.run("touch", str(marker), env=env)
    assert res.code == 1
    assert not marker.exists()
    assert len(sidecar_lines(res.out, "listen_failed")) == 1


# -- exit codes ------------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("script", "code"), [("exit 0", 0), ("exit 7", 7), ('kill -KILL "$$"', 137)]
)
def test_app_exit_code_is_ours_and_the_proxy_stops(
    launches: Launches, script: str, code: int
) -> None:
    res = launches.run("sh", "-c", f'psql "$DATABASE_URL" -Atc "select 1" && {script}')
    assert res.code == code, res.out
    assert sidecar_lines(res.out, "app_exit") == [f"sidecar at=app_exit code={code}"]
    assert len(sidecar_lines(res.out, "stopped")) == 1
    assert sidecar_lines(res.out)[-1] == f"sidecar at=exit code={code}"
    assert res.elapsed < 10


def test_command_not_found(launches: Launches) -> None:
    res = launches.run("no-such-command-xyz")
    assert res.code == 127
    assert len(sidecar_lines(res.out, "app_not_started")) == 1
    assert len(sidecar_lines(res.out, "stopped")) == 1


@pytest.mark.parametrize("how", ["stops", "raises"])
async def test_proxy_death_terminates_the_app_and_exits_non_zero(
    pg: PostgresServer, tmp_path: Path, how: str
) -> None:
    """In-process (the proxy runs on the launcher's loop): when the proxy ends under a running
    app -- it stops on its own, or waiting on it fails -- the app gets SIGTERM once and the
    launcher's code is non-zero even though the app exits 0."""
    ready, got = tmp_path / "ready", tmp_path / "sigterm"
    app = (
        "import signal, sys, time, pathlib\n"
        "hits = []\n"
        "signal.signal(signal.SIGTERM, lambda *_: hits.append(1))\n"
        f"pathlib.Path({str(ready)!r}).touch()\n"
        "deadline = time.monotonic() + 20\n"
        "while not hits and time.monotonic() < deadline:\n"
        "    time.sleep(0.01)\n"
        f"pathlib.Path({str(got)!r}).write_text(str(len(hits)))\n"
        "sys.exit(0)\n"
    )
    socket_dir = short_tempdir("sl")
    settings = Settings(port=free_port(), socket_dir=str(socket_dir), stats_period=0)
    pools = [PoolConfig(name="database", upstream=parse_url(pg.url()))]

    class FailingProxy(Proxy):
        async def wait_stopped(self) -> None:
            await super().wait_stopped()
            raise RuntimeError("listener task crashed")

    proxy = (FailingProxy if how == "raises" else Proxy)(
        settings, pools, console=AdminSession, side_tasks=(stats.reporter,)
    )
    launcher = Launcher(
        settings, pools, dict(os.environ), [sys.executable, "-c", app], on_heroku=False,
        proxy=proxy,
    )  # fmt: skip
    try:
        run = asyncio.ensure_future(launcher.run())
        while not ready.exists():  # poll the app's own readiness
            assert not run.done(), run
            await asyncio.sleep(0.01)
        proxy.shutdown("simulated death")
        code = await asyncio.wait_for(run, 15)
    finally:
        shutil.rmtree(socket_dir, ignore_errors=True)
    assert code == 1
    assert got.read_text() == "1"


# -- SIGTERM ---------------------------------------------------------------------------------

# The app: one connection with a transaction open, one idle; on SIGTERM it waits for the test's
# go-ahead, then finishes the transaction and exits 0; it reports how many SIGTERMs it saw.
DRAIN_APP = r"""
import os, pathlib, signal, sys, time
import psycopg
ready, go, report = map(pathlib.Path, sys.argv[1:4])
hits = []
signal.signal(signal.SIGTERM, lambda *_: hits.append(1))
url = os.environ["DATABASE_URL"]
busy = psycopg.connect(url)
idle = psycopg.connect(url, autocommit=True)
idle.execute("CREATE TABLE t (id int)")
busy.execute("INSERT INTO t VALUES (1)")          # a transaction now in flight, holding a server
idle.execute("SELECT 1")                          # needs a second server, then leaves it idle
ready.touch()
deadline = time.monotonic() + 20
while not (hits and go.exists()) and time.monotonic() < deadline:
    time.sleep(0.01)
busy.execute("INSERT INTO t VALUES (2)")
busy.commit()
busy.close()
idle.close()
time.sleep(0.2)   # a second SIGTERM, if one came, would arrive by now
report.write_text(str(len(hits)))
"""


@pytest.mark.parametrize("on_heroku", [False, True], ids=["local", "heroku"])
def test_sigterm_drains_a_transaction_in_flight(
    launches: Launches, tmp_path: Path, on_heroku: bool
) -> None:
    """SIGTERM: new logins get 57P01, the idle server is closed, the open transaction still
    commits, the launcher exits with the app's code, and the app sees SIGTERM exactly once --
    forwarded by us locally, sent by the "dyno manager" (the test, to every process) on Heroku."""
    pg = launches.pg
    db = _own_database(pg, "drain")
    env = launches.env(DATABASE_URL=pg.url(dbname=db), SIDECAR_SHUTDOWN_TIMEOUT=15)
    if on_heroku:
        env["DYNO"] = "web.1"
    ready, go, report = tmp_path / "ready", tmp_path / "go", tmp_path / "report"
    proc, log = launches.start(
        sys.executable, "-c", DRAIN_APP, str(ready), str(go), str(report),
        env=env, start_new_session=True,
    )  # fmt: skip
    poll_until(lambda: ready.exists() or proc.poll() is not None, what="app ready")
    assert proc.poll() is None, log.read_text()
    assert pg.count_backends(dbname=db) == 2

    t0 = time.monotonic()
    if on_heroku:
        os.killpg(proc.pid, signal.SIGTERM)  # Heroku signals every process in the dyno
    else:
        proc.send_signal(signal.SIGTERM)
    poll_until(lambda: "at=shutdown" in log.read_text(), what="shutdown log line")
    with pytest.raises(psycopg.OperationalError, match="shutting down") as err:
        psycopg.connect(
            f"postgres://app:{quote(APP_PASSWORD, safe='')}@127.0.0.1:{env['SIDECAR_PORT']}"
            "/database",
            connect_timeout=5,
        ).close()
    assert getattr(err.value, "sqlstate", None) in ("57P01", None)
    pg.wait_backends(1, dbname=db)  # the idle server went; the busy one stays
    go.touch()

    assert proc.wait(20) == 0, log.read_text()
    elapsed = time.monotonic() - t0
    assert report.read_text() == "1", log.read_text()
    assert pg.query("SELECT id FROM t ORDER BY id", dbname=db) == [(1,), (2,)]
    text = log.read_text()
    forwarded = "forwarded=false" if on_heroku else "forwarded=true"
    assert sidecar_lines(text, "signal") == [f"sidecar at=signal signal=SIGTERM {forwarded}"]
    assert sidecar_lines(text)[-1] == "sidecar at=exit code=0"
    assert elapsed < 10
    pg.wait_backends(0, dbname=db)


def test_sigterm_exits_within_the_shutdown_timeout(launches: Launches, tmp_path: Path) -> None:
    """An app that ignores SIGTERM with a transaction open: the client gets 57P01 at the
    timeout, the app is killed, and we are gone within SIDECAR_SHUTDOWN_TIMEOUT (+ grace)."""
    ready = tmp_path / "ready"
    stubborn = (
        "import os, pathlib, signal, sys, time, psycopg\n"
        "signal.signal(signal.SIGTERM, signal.SIG_IGN)\n"
        "conn = psycopg.connect(os.environ['DATABASE_URL'])\n"
        "conn.execute('SELECT 1')\n"
        f"pathlib.Path({str(ready)!r}).touch()\n"
        "time.sleep(60)\n"
    )
    env = launches.env(SIDECAR_SHUTDOWN_TIMEOUT="1.5")
    proc, log = launches.start(sys.executable, "-c", stubborn, env=env)
    poll_until(lambda: ready.exists() or proc.poll() is not None, what="app ready")
    t0 = time.monotonic()
    proc.send_signal(signal.SIGTERM)
    code = proc.wait(15)
    elapsed = time.monotonic() - t0
    text = log.read_text()
    assert code == 137, text
    assert 1.4 < elapsed < 1.5 + 2.5, text
    assert len(sidecar_lines(text, "app_killed")) == 1
    assert sidecar_lines(text)[-1] == "sidecar at=exit code=137"


def test_second_signal_is_not_forwarded(launches: Launches, tmp_path: Path) -> None:
    ready, report = tmp_path / "ready", tmp_path / "report"
    app = (
        "import pathlib, signal, sys, time\n"
        "hits = []\n"
        "signal.signal(signal.SIGTERM, lambda *_: hits.append(1))\n"
        "signal.signal(signal.SIGINT, lambda *_: hits.append(2))\n"
        f"pathlib.Path({str(ready)!r}).touch()\n"
        "deadline = time.monotonic() + 20\n"
        f"go = pathlib.Path({str(report)!r} + '.go')\n"
        "while not go.exists() and time.monotonic() < deadline:\n"
        "    time.sleep(0.01)\n"
        f"pathlib.Path({str(report)!r}).write_text(repr(hits))\n"
    )
    proc, log = launches.start(sys.executable, "-c", app, env=launches.env())
    poll_until(lambda: ready.exists() or proc.poll() is not None, what="app ready")
    proc.send_signal(signal.SIGTERM)
    poll_until(lambda: "at=signal " in log.read_text(), what="first signal handled")
    proc.send_signal(signal.SIGINT)
    poll_until(lambda: "at=signal_ignored" in log.read_text(), what="second signal handled")
    Path(str(report) + ".go").touch()
    assert proc.wait(15) == 0, log.read_text()
    assert report.read_text() == "[1]"


# -- PGBOUNCER_* fallbacks and the YAML file ---------------------------------------------------


def test_pgbouncer_vars_are_taken_and_named_once(launches: Launches) -> None:
    env = launches.env(
        DATABASE_URL=None,
        PGBOUNCER_URLS="MY_DB_URL",
        MY_DB_URL=launches.pg.url(),
        PGBOUNCER_POOL_MODE="session",
        PGBOUNCER_DEFAULT_POOL_SIZE="3",
        SIDECAR_MAX_CLIENT_CONN="50",
        PGBOUNCER_MAX_CLIENT_CONN="7",  # the SIDECAR_ one wins, so this one is not "taken"
    )
    res = launches.run("sh", "-c", 'psql "$MY_DB_URL" -Atc "select 1"', env=env)
    assert res.code == 0, res.out
    [used] = sidecar_lines(res.out, "pgbouncer_vars_used")
    assert set(used.partition(" vars=")[2].split(",")) == {
        "PGBOUNCER_POOL_MODE",
        "PGBOUNCER_DEFAULT_POOL_SIZE",
        "PGBOUNCER_URLS",
    }
    assert "pool_mode=session" in sidecar_lines(res.out, "listening")[0]
    assert "var=MY_DB_URL pool=my_db" in sidecar_lines(res.out, "launch")[0]


def test_yaml_file_in_the_app_root(launches: Launches, tmp_path: Path) -> None:
    app_root = tmp_path / "app"
    app_root.mkdir()
    (app_root / "sidecar.yml").write_text(
        "pools:\n  DATABASE_URL:\n    default_pool_size: 3\n    max_per_instance: 2\n"
    )
    res = launches.run("sh", "-c", 'psql "$DATABASE_URL" -Atc "select 1"', cwd=app_root)
    assert res.code == 0, res.out
    assert len(sidecar_lines(res.out, "config_file")) == 1
    [launch] = sidecar_lines(res.out, "launch")
    assert launch.endswith(' overrides="default_pool_size=3,max_per_instance=2"')
    assert "size=3" in sidecar_lines(res.out, "pool")[0]


@pytest.mark.parametrize(
    ("text", "message"),
    [
        (
            "pools:\n  database:\n    pool_sise: 3\n",
            "pools.database.pool_sise is not a pool setting",
        ),
        ("pools:\n  replica:\n    default_pool_size: 3\n", "pools.replica is not a pool"),
        ("pools:\n  database:\n    default_pool_size: lots\n", "pools.database.default_pool_size"),
        ("pools: [1, 2\n", "sidecar.yml: "),
    ],
)
def test_yaml_errors_stop_the_start(
    launches: Launches, tmp_path: Path, text: str, message: str
) -> None:
    app_root = tmp_path / "app"
    app_root.mkdir()
    (app_root / "sidecar.yml").write_text(text)
    marker = tmp_path / "app-ran"
    res = launches.run("touch", str(marker), cwd=app_root)
    assert res.code == 1
    assert not marker.exists()
    [line] = res.out.splitlines()
    assert line.startswith("sidecar at=config_error")
    assert message in line


def test_sidecar_config_names_a_missing_file(launches: Launches, tmp_path: Path) -> None:
    res = launches.run("true", env=launches.env(SIDECAR_CONFIG=str(tmp_path / "nope.yml")))
    assert res.code == 1
    assert "SIDECAR_CONFIG" in res.out and "is not a file" in res.out


def test_proxy_applies_yaml_overrides_per_pool(tmp_path: Path) -> None:
    """The overrides reach each pool's Settings (the pool objects the proxy builds)."""
    from sidecar.yamlconfig import apply_text

    up = parse_url("postgres://u:p@h/d")
    pools = [PoolConfig("database", up), PoolConfig("replica", up)]
    pools = apply_text(
        "pools:\n  REPLICA_URL:\n    default_pool_size: 40\n    max_per_instance: 12\n",
        "sidecar.yml",
        pools,
        Settings(),
        {"database": "DATABASE_URL", "replica": "REPLICA_URL"},
    )

    proxy = new_proxy(Settings(), pools)
    assert proxy.pools["replica"].settings.default_pool_size == 40
    assert proxy.pools["replica"].settings.max_per_instance == 12
    assert proxy.pools["database"].settings.default_pool_size == Settings().default_pool_size


def test_psql_app(launches: Launches) -> None:
    """A plain `psql` app through the launcher, as the issue's own example."""
    res = launches.run("sh", "-c", 'psql "$DATABASE_URL" -Atc "select current_database()"')
    assert res.code == 0, res.out
    assert "appdb" in res.out
