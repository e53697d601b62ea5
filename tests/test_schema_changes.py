"""Prepared statements across schema changes: what a client sees through the proxy (transaction
mode, statements shared between clients) is what it sees from PostgreSQL directly.

Each scenario runs twice, against PostgreSQL directly and through the proxy, with real clients
(asyncpg and psycopg with their default statement caches, node-postgres named queries), and
the two runs' outcomes (rows, or the error class) must be equal. The DDL goes directly to the
server (a release-phase migration the proxy cannot see) or through the proxy. A pool of one
server makes every client of the proxy run on the server connection that prepared the
statements before the change (the case that used to fail: 0A000 "cached plan must not change
result type", XX000 "cache lookup failed for type").
"""

from __future__ import annotations

import asyncio
import json
import re
from collections.abc import Awaitable, Callable
from typing import Any

import asyncpg
import psycopg
import pytest
from nodeclient import run_node
from pgfixtures import APP_PASSWORD, PostgresServer, ProxyFactory, ProxyProcess

Outcome = Any


async def outcome(step: Awaitable[Any]) -> Outcome:
    """Rows as tuples, a value, or the name of the error class raised."""
    try:
        result = await step
    except (asyncpg.PostgresError, asyncpg.InterfaceError, psycopg.Error) as exc:
        return type(exc).__name__
    if isinstance(result, list):
        return [tuple(r) for r in result]
    return result


class Target:
    """Where the clients connect (PostgreSQL directly, or the proxy) and where DDL goes."""

    def __init__(self, pg: PostgresServer, proxy: ProxyProcess | None, ddl_via_proxy: bool):
        self.pg = pg
        self.proxy = proxy
        self.ddl_via_proxy = ddl_via_proxy and proxy is not None

    def asyncpg_params(self) -> dict[str, Any]:
        if self.proxy is not None:
            params = self.proxy.asyncpg_params()
            del params["statement_cache_size"]  # asyncpg's default cache
            return params
        return {
            "host": self.pg.host,
            "port": self.pg.port,
            "user": "app",
            "password": APP_PASSWORD,
            "database": "appdb",
            "ssl": False,
            "timeout": 10,
        }

    def dsn(self) -> str:
        return self.proxy.dsn() if self.proxy is not None else self.pg.dsn()

    async def ddl(self, *statements: str, transaction: bool = False) -> None:
        """Run DDL as `app` through the proxy, or as the superuser directly (then give the
        new objects to `app`)."""
        if self.ddl_via_proxy:
            async with await psycopg.AsyncConnection.connect(
                self.dsn(), autocommit=not transaction
            ) as conn:
                for sql in statements:
                    await conn.execute(sql)
            return
        for sql in statements:
            await asyncio.to_thread(self.pg.query, sql)
            created = re.match(r"CREATE (TABLE|TYPE) (\w+)", sql)
            if created:
                kind, name = created.groups()
                await asyncio.to_thread(self.pg.query, f"ALTER {kind} {name} OWNER TO app")


Scenario = Callable[[Target, str], Awaitable[list[Outcome]]]


async def side_by_side(
    pg: PostgresServer, proxy_factory: ProxyFactory, scenario: Scenario, ddl_via_proxy: bool
) -> list[Outcome]:
    """The scenario against PostgreSQL directly and through the proxy: equal outcomes."""
    direct = await scenario(Target(pg, None, False), pg.create_table())
    proxy = proxy_factory(SIDECAR_DEFAULT_POOL_SIZE="1")
    pooled = await scenario(Target(pg, proxy, ddl_via_proxy), pg.create_table())
    assert pooled == direct
    return pooled


def recreate(table: str, columns: str, row: str) -> list[str]:
    return [
        f"DROP TABLE {table}",
        f"CREATE TABLE {table} ({columns})",
        f"INSERT INTO {table} VALUES ({row})",
    ]


# --- asyncpg ------------------------------------------------------------------------------------


async def asyncpg_table_change(target: Target, table: str) -> list[Outcome]:
    """A prepared before the table changed its column types; B and C connect after it."""
    query = f"select * from {table}"
    await target.ddl(f"INSERT INTO {table} VALUES (1, 'a')")
    a = await asyncpg.connect(**target.asyncpg_params())
    try:
        out = [await outcome(a.fetch(query))]
        await target.ddl(*recreate(table, "val text, id bigint", "'b', 2"))
        b = await asyncpg.connect(**target.asyncpg_params())
        c = await asyncpg.connect(**target.asyncpg_params())
        try:
            out.append(await outcome(b.fetch(query)))  # no transaction open
            async with c.transaction():
                out.append(await outcome(c.fetch(query)))  # the first use is in a transaction
                out.append(await outcome(c.fetchval(f"select count(*) from {table}")))
            # A's own statement predates the change: directly, asyncpg's retry outside a
            # transaction hides it; inside one the error is A's (PostgreSQL's) to see.
            tx = a.transaction()
            await tx.start()
            out.append(await outcome(a.fetch(query)))
            await tx.rollback()
            out.append(await outcome(a.fetch(query)))
        finally:
            await b.close()
            await c.close()
    finally:
        await a.close()
    return out


@pytest.mark.parametrize("via_proxy", [False, True], ids=["ddl-direct", "ddl-through-proxy"])
async def test_asyncpg_table_recreated_with_other_types(
    pg: PostgresServer, proxy_factory: ProxyFactory, via_proxy: bool
) -> None:
    seen = await side_by_side(pg, proxy_factory, asyncpg_table_change, via_proxy)
    assert seen[1:4] == [[("b", 2)], [("b", 2)], 1]


async def asyncpg_type_change(target: Target, table: str) -> list[Outcome]:
    """DROP TYPE / CREATE TYPE under the same name: new OIDs, so new asyncpg codecs."""
    kind = f"{table}_mood"
    await target.ddl(
        f"DROP TABLE {table}",
        f"CREATE TYPE {kind} AS ENUM ('a', 'b')",
        f"CREATE TABLE {table} (id int, m {kind})",
        f"INSERT INTO {table} VALUES (1, 'a')",
    )
    queries = (f"select $1::{kind}", f"select m from {table} where m = $1")
    a = await asyncpg.connect(**target.asyncpg_params())
    try:
        out = [await outcome(a.fetch(q, "a")) for q in queries]
        await target.ddl(
            f"DROP TABLE {table}",
            f"DROP TYPE {kind}",
            f"CREATE TYPE {kind} AS ENUM ('x', 'y', 'z')",
            f"CREATE TABLE {table} (m {kind}, id bigint)",
            f"INSERT INTO {table} VALUES ('z', 2)",
        )
        b = await asyncpg.connect(**target.asyncpg_params())
        try:
            out += [await outcome(b.fetch(q, "z")) for q in queries]
            async with b.transaction():
                out += [await outcome(b.fetchval(f"select count(*) from {table}"))]
        finally:
            await b.close()
        c = await asyncpg.connect(**target.asyncpg_params())
        try:
            async with c.transaction():
                out += [await outcome(c.fetch(q, "y")) for q in queries]
        finally:
            await c.close()
        # A's own statements and codecs predate the change: whatever PostgreSQL tells A
        # directly (its XX000 included), A hears through the proxy too
        out += [await outcome(a.fetch(q, "z")) for q in queries]
    finally:
        await a.close()
    return out


@pytest.mark.parametrize("via_proxy", [False, True], ids=["ddl-direct", "ddl-through-proxy"])
async def test_asyncpg_type_dropped_and_created_again(
    pg: PostgresServer, proxy_factory: ProxyFactory, via_proxy: bool
) -> None:
    seen = await side_by_side(pg, proxy_factory, asyncpg_type_change, via_proxy)
    assert seen[2:7] == [[("z",)], [("z",)], 1, [("y",)], []]


# --- psycopg --------------------------------------------------------------------------------------


async def psycopg_table_change(target: Target, table: str) -> list[Outcome]:
    """psycopg prepares a query after its 5th run (prepare_threshold default): A before the
    change, B after it, in and out of transactions; and a DDL transaction that itself runs
    the query afterwards, prepared."""
    query = f"select * from {table}"
    await target.ddl(f"INSERT INTO {table} VALUES (1, 'a')")

    async def run(conn: psycopg.AsyncConnection[Any], times: int = 6) -> Outcome:
        rows: Outcome = None
        for _ in range(times):
            rows = await outcome(_fetch(conn, query))
        return rows

    out: list[Outcome] = []
    async with await psycopg.AsyncConnection.connect(target.dsn(), autocommit=True) as a:
        out.append(await run(a))
        # DDL inside a transaction that then runs (and prepares) the query itself
        async with await psycopg.AsyncConnection.connect(target.dsn()) as d:
            if target.ddl_via_proxy:
                for sql in recreate(table, "val text, id bigint", "'b', 2"):
                    await d.execute(sql)
                out.append(await run(d))
                await d.commit()
            else:
                await target.ddl(*recreate(table, "val text, id bigint", "'b', 2"))
                out.append(await run(d))
                await d.rollback()
        async with await psycopg.AsyncConnection.connect(target.dsn(), autocommit=True) as b:
            out.append(await run(b))
        async with await psycopg.AsyncConnection.connect(target.dsn()) as c:
            out.append(await run(c))
            await c.commit()
    return out


async def _fetch(conn: psycopg.AsyncConnection[Any], query: str) -> list[tuple[Any, ...]]:
    cur = await conn.execute(query)
    return await cur.fetchall()


@pytest.mark.parametrize("via_proxy", [False, True], ids=["ddl-direct", "ddl-through-proxy"])
async def test_psycopg_table_recreated_with_other_types(
    pg: PostgresServer, proxy_factory: ProxyFactory, via_proxy: bool
) -> None:
    seen = await side_by_side(pg, proxy_factory, psycopg_table_change, via_proxy)
    assert seen == [[(1, "a")]] + [[("b", 2)]] * 3


# --- node-postgres ------------------------------------------------------------------------------

NODE_NAMED_QUERIES = """
const { Client } = require('pg');
const cfg = JSON.parse(process.env.PG_CONFIG);
const table = process.env.TABLE;
const q = { name: 'q', text: `select * from ${table}`, rowMode: 'array' };
async function run(client) {
  try { return (await client.query(q)).rows; } catch (e) { return 'error ' + e.code; }
}
(async () => {
  const out = [];
  const a = new Client(cfg); await a.connect();
  out.push(await run(a));
  const d = new Client(cfg); await d.connect();
  for (const sql of JSON.parse(process.env.DDL)) await d.query(sql);
  await d.end();
  const b = new Client(cfg); await b.connect();
  out.push(await run(b));
  await b.query('BEGIN'); out.push(await run(b)); await b.query('COMMIT');
  const c = new Client(cfg); await c.connect();
  await c.query('BEGIN'); out.push(await run(c)); await c.query('COMMIT');
  out.push(await run(a));
  await Promise.all([a.end(), b.end(), c.end()]);
  console.log(JSON.stringify(out));
})().catch((e) => { console.error(e); process.exit(1); });
"""


@pytest.mark.parametrize("via_proxy", [False, True], ids=["ddl-direct", "ddl-through-proxy"])
def test_node_postgres_named_query_after_column_types_change(
    pg: PostgresServer, proxy_factory: ProxyFactory, via_proxy: bool
) -> None:
    def scenario(host: str, port: int, table: str, ddl_user: str) -> Any:
        pg.query(f"INSERT INTO {table} VALUES (1, 'a')")
        ddl = recreate(table, "val text, id bigint", "'b', 2")
        if ddl_user == "postgres":
            # the DDL connection is the superuser's, directly
            ddl.insert(2, f"ALTER TABLE {table} OWNER TO app")
            cfg = {"host": str(pg.socket_dir), "port": pg.port, "user": "postgres"}
        else:
            cfg = {"host": host, "port": port, "user": "app", "password": APP_PASSWORD}
        cfg["database"] = "appdb"
        client = {
            "host": host,
            "port": port,
            "user": "app",
            "password": APP_PASSWORD,
            "database": "appdb",
        }
        script = NODE_NAMED_QUERIES.replace(
            "const d = new Client(cfg)", "const d = new Client(JSON.parse(process.env.DDL_CONFIG))"
        )
        return run_node(
            script,
            PG_CONFIG=json.dumps(client),
            DDL_CONFIG=json.dumps(cfg),
            TABLE=table,
            DDL=json.dumps(ddl),
        )

    direct = scenario(pg.host, pg.port, pg.create_table(), "postgres")
    proxy = proxy_factory(SIDECAR_DEFAULT_POOL_SIZE="1")
    table = pg.create_table()
    pooled = scenario(proxy.host, proxy.port, table, "app" if via_proxy else "postgres")
    assert pooled == direct
    assert pooled[1:4] == [[["b", "2"]]] * 3  # node-postgres gives bigint as a string
