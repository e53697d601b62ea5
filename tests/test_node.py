"""node-postgres (`pg` from npm) through the proxy: TLS as Heroku's Node docs set it
(`ssl: {rejectUnauthorized: false}`), and the edges where it differed from PostgreSQL
(connect() then end() at once; a SCRAM exchange abandoned half-way)."""

from __future__ import annotations

from nodeclient import run_node
from pgfixtures import APP_PASSWORD, PostgresServer, ProxyFactory, ProxyProcess, poll_until

# The client's options from the environment; every script prints one JSON line.
CLIENT = """
const { Client } = require('pg');
const options = (extra) => ({
  host: process.env.HOST, port: +process.env.PORT, user: 'app',
  password: process.env.PW, database: 'appdb', ...extra,
});
"""

TLS_QUERY = (
    CLIENT
    + """
(async () => {
  const c = new Client(options({ ssl: { rejectUnauthorized: false } }));
  await c.connect();
  const r = await c.query("select $1::int + 1 as n, repeat('z', 3000000) as big", [41]);
  const named = await c.query({ name: 'q', text: 'select $1::text as t', values: ['x'] });
  const again = await c.query({ name: 'q', text: 'select $1::text as t', values: ['y'] });
  const tls = c.connection.stream.encrypted === true;
  await c.end();
  console.log(JSON.stringify({ n: r.rows[0].n, big: r.rows[0].big.length, tls,
                               named: [named.rows[0].t, again.rows[0].t] }));
})().catch((e) => { console.error(e); process.exit(1); });
"""
)


def test_ssl_reject_unauthorized_false(proxy: ProxyProcess) -> None:
    """Heroku's Node docs: `ssl: {rejectUnauthorized: false}`; the connection is TLS."""
    out = run_node(TLS_QUERY, HOST=proxy.host, PORT=str(proxy.port), PW=APP_PASSWORD)
    assert out == {"n": 42, "big": 3_000_000, "tls": True, "named": ["x", "y"]}


# connect() and at once end(), with no 'error' listener: the client sends a Terminate as its
# first packet (with or without ssl: end() comes before any SSLRequest). A crash (an 'error'
# event nobody listens to) fails the script; what each promise did is compared with
# PostgreSQL's.
CONNECT_END = (
    CLIENT
    + """
const within = (p, ms, label) =>
  Promise.race([p, new Promise((r) => setTimeout(() => r(label), ms))]);
(async () => {
  const results = [];
  for (const ssl of [false, { rejectUnauthorized: false }]) {
    const c = new Client(options({ ssl }));
    const connected = c.connect().then(() => 'connected', (e) => 'connect error: ' + e.message);
    const ended = c.end().then(() => 'ended', (e) => 'end error: ' + e.message);
    results.push([await within(ended, 10000, 'end pending'),
                  await within(connected, 1000, 'connect pending')]);
  }
  console.log(JSON.stringify(results));
})();
"""
)


def test_connect_then_end_behaves_as_against_postgresql(
    pg: PostgresServer, proxy: ProxyProcess
) -> None:
    direct = run_node(CONNECT_END, HOST=pg.host, PORT=str(pg.port), PW=APP_PASSWORD)
    proxied = run_node(CONNECT_END, HOST=proxy.host, PORT=str(proxy.port), PW=APP_PASSWORD)
    assert proxied == direct
    assert all(r[0] == "ended" for r in proxied), proxied
    poll_until(
        lambda: "invalid length of startup packet" in proxy.log_text(), what="the reason logged"
    )


# An empty password: node-postgres throws in the middle of SCRAM and leaves its socket open.
EMPTY_PASSWORD = (
    CLIENT
    + """
(async () => {
  const c = new Client(options({ password: '' }));
  let error = null;
  const closed = new Promise((resolve) => {
    c.on('error', () => {});
    const wait = () => c.connection.stream.once('close', () => resolve('closed'));
    c.connection.stream ? wait() : resolve('no stream');
  });
  try { await c.connect(); } catch (e) { error = e.message; }
  const outcome = await Promise.race(
    [closed, new Promise((r) => setTimeout(() => r('still open'), 20000))]);
  console.log(JSON.stringify({ error, outcome }));
  process.exit(0);
})();
"""
)


def test_abandoned_scram_is_closed_by_client_login_timeout(proxy_factory: ProxyFactory) -> None:
    proxy = proxy_factory(SIDECAR_CLIENT_LOGIN_TIMEOUT="1")
    out = run_node(EMPTY_PASSWORD, HOST=proxy.host, PORT=str(proxy.port), PW="")
    assert out["error"] and "password" in out["error"], out
    assert out["outcome"] == "closed", out
    assert 'reason="client_login_timeout (1s) in auth"' in proxy.log_text()
