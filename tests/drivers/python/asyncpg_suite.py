#!/usr/bin/env python3
"""asyncpg through a pooler port, with its statement cache (every query is a named prepared
statement; executemany pipelines Bind/Execute with Flush-only round trips).

Connection settings come from the environment (PGHOST, PGPORT, PGUSER, PGPASSWORD, PGDATABASE).
Many connections run each check at once so that, through a transaction-mode pool of a few
server connections, a statement is prepared on one server connection and used on another.
Every check runs; the exit status is 1 when any failed. SUITE_CLIENTS sets the number of
concurrent connections (default 30).
"""

import asyncio
import os
import random
import sys
import time
import traceback

import asyncpg
from asyncpg import exceptions as exc

CLIENTS = int(os.environ.get("SUITE_CLIENTS", "30"))
CHECK_DEADLINE = float(os.environ.get("SUITE_CHECK_DEADLINE", "25"))
PREFIX = f"drv_apg_{os.getpid()}_{random.randrange(1 << 30)}"
SETTER_TZ = "Pacific/Chatham"


async def connect(**kw):
    kw.setdefault("timeout", 10)
    return await asyncpg.connect(**kw)


# Barriers of the running check: a failing client breaks them, so that the others fail at once
# instead of waiting for it until the deadline.
BARRIERS = []


def barrier(n):
    b = asyncio.Barrier(n)
    BARRIERS.append(b)
    return b


async def run_clients(n, fn):
    """Open n connections, run fn(i, conn) on all at once; raise the first failure."""
    await run_clients_with(n, fn, lambda i: {})


async def run_clients_with(n, fn, per_client):
    """Like run_clients, with per-client connect arguments per_client(i)."""

    async def client(i):
        conn = await connect(**per_client(i))
        try:
            await fn(i, conn)
        except BaseException:
            for b in BARRIERS:
                await b.abort()
            raise
        finally:
            await conn.close(timeout=5)

    try:
        results = await asyncio.wait_for(
            asyncio.gather(*(client(i) for i in range(n)), return_exceptions=True), CHECK_DEADLINE
        )
    finally:
        BARRIERS.clear()
    errs = [r for r in results if isinstance(r, BaseException)]
    real = [e for e in errs if not isinstance(e, asyncio.BrokenBarrierError)]
    if real or errs:
        raise (real or errs)[0]


# ---------------------------------------------------------------------------------------------


async def check_cached_statements_many_clients():
    """Every connection's statement cache prepares its queries once and runs them many times."""

    async def client(i, conn):
        for r in range(40):
            assert await conn.fetchval("SELECT $1::int + 1000", r) == r + 1000
            assert await conn.fetchval(f"SELECT $1::text || '-c{i}'", str(r)) == f"{r}-c{i}"
            row = await conn.fetchrow(f"SELECT $1::int AS a, $2::text AS b, {i} AS c", r, "x")
            assert tuple(row) == (r, "x", i), row

    await run_clients(CLIENTS, client)


async def check_same_name_different_queries():
    """One explicit statement name on every connection, a different query (and shape) per client."""

    async def client(i, conn):
        if i % 2 == 0:
            st = await conn.prepare(f"SELECT $1::int * {i + 2}", name="drv_same")
            expect = lambda r: r * (i + 2)  # noqa: E731
        else:
            st = await conn.prepare(f"SELECT 'client{i}:' || $1::text", name="drv_same")
            expect = lambda r: f"client{i}:{r}"  # noqa: E731
        assert st.get_name() == "drv_same"
        for r in range(30):
            arg = r if i % 2 == 0 else str(r)
            assert await st.fetchval(arg) == expect(r), f"client {i} round {r}"
            await asyncio.sleep(0)

    await run_clients(CLIENTS, client)


async def check_prepare_close_prepare_same_name():
    """Prepare a name, DEALLOCATE it, prepare the same name for another query: the new one runs.
    A tiny statement cache (3 entries, 6 queries) makes asyncpg Close and re-prepare constantly."""

    async def client(i, conn):
        keep = []  # keep old statement objects alive: their collection would Close the name
        for cycle in range(10):
            st = await conn.prepare(f"SELECT $1::int * {cycle + 1}, 'cycle{cycle}-c{i}'", name="drv_cycle")
            keep.append(st)
            for r in range(3):
                got = tuple(await st.fetchrow(r + i))
                assert got == ((r + i) * (cycle + 1), f"cycle{cycle}-c{i}"), f"client {i} cycle {cycle}: {got}"
            await conn.execute("DEALLOCATE drv_cycle")
        try:
            await keep[-1].fetchval(1)
        except exc.InvalidSQLStatementNameError:
            pass
        else:
            raise AssertionError("a deallocated statement still executes")

    async def small_cache(i, conn):
        for r in range(30):
            k = r % 6
            assert await conn.fetchval(f"SELECT $1::int - {k} + {i}", r) == r - k + i

    await run_clients(CLIENTS, client)
    await run_clients_with(CLIENTS, small_cache, lambda i: {"statement_cache_size": 3})


async def check_prepared_across_unrelated_transaction(table):
    """A cached statement prepared before an unrelated transaction runs right after it."""
    b1, b2 = barrier(CLIENTS), barrier(CLIENTS)

    async def client(i, conn):
        q = f"SELECT $1::int * 3 + {i}"
        assert await conn.fetchval(q, i) == i * 3 + i
        await b1.wait()
        async with conn.transaction():
            await conn.execute(f"INSERT INTO {table} (client, n) VALUES ($1, $2)", i, 1)
            assert await conn.fetchval(f"SELECT count(*) FROM {table} WHERE client = $1", i) == 1
        await b2.wait()
        for r in range(10):
            assert await conn.fetchval(q, r) == r * 3 + i, f"client {i} round {r}"

    await run_clients(CLIENTS, client)


async def check_prepared_inside_and_outside_transaction(table):
    """One cached statement outside, inside a transaction (seeing its own rows), after a rollback,
    and outside again."""

    async def client(i, conn):
        cid = 1000 + i
        count = f"SELECT count(*) FROM {table} WHERE client = $1"
        ins = f"INSERT INTO {table} (client, n) VALUES ($1, $2)"
        assert await conn.fetchval(count, cid) == 0
        async with conn.transaction():
            for n in range(5):
                await conn.execute(ins, cid, n)
                assert await conn.fetchval(count, cid) == n + 1
        assert await conn.fetchval(count, cid) == 5
        try:
            async with conn.transaction():
                await conn.execute(ins, cid, 99)
                assert await conn.fetchval(count, cid) == 6
                raise RuntimeError("roll back")
        except RuntimeError:
            pass
        for _ in range(5):
            assert await conn.fetchval(count, cid) == 5
        async with conn.transaction():
            assert await conn.fetchval(count, cid) == 5

    await run_clients(CLIENTS, client)


async def check_executemany_failing_row(ptable):
    """executemany with a failing row in the middle (one pipeline): the error is this client's,
    nothing of the batch stays (atomic), and statements after it work."""

    async def client(i, conn):
        ins = f"INSERT INTO {ptable} (id, client) VALUES ($1, $2)"
        q = f"SELECT $1::int + {i}"
        for rnd in range(4):
            base = (i * 100 + rnd) * 100
            rows = [(base + k, i) for k in range(20)]
            rows.insert(10, (base + 3, i))  # duplicate key in the middle
            try:
                await conn.executemany(ins, rows)
            except exc.UniqueViolationError:
                pass
            else:
                raise AssertionError(f"client {i}: failing executemany did not raise")
            assert await conn.fetchval(f"SELECT count(*) FROM {ptable} WHERE id >= $1 AND id < $2", base, base + 100) == 0
            assert await conn.fetchval(q, rnd) == rnd + i
            await conn.executemany(ins, [(base + k, i) for k in range(20)])
            assert await conn.fetchval(f"SELECT count(*) FROM {ptable} WHERE id >= $1 AND id < $2", base, base + 100) == 20
            # A failing statement inside a transaction: rolled back, the connection goes on.
            try:
                async with conn.transaction():
                    await conn.execute(ins, base + 50, i)
                    await conn.fetchval("SELECT 10 / $1::int", 0)
            except exc.DivisionByZeroError:
                pass
            assert await conn.fetchval(f"SELECT count(*) FROM {ptable} WHERE id = $1", base + 50) == 0
            assert await conn.fetchval(q, rnd + 1) == rnd + 1 + i

    await run_clients(CLIENTS, client)


async def check_discard_all():
    """DISCARD ALL by some clients drops their own statements only: the other clients' keep
    running; the discarding client's explicit statement is gone (26000), and after
    reload_schema_state() its queries are prepared anew."""

    async def client(i, conn):
        q = f"SELECT $1::int * 7 + {i}"
        if i % 3 == 0:
            app = await conn.fetchval("SELECT current_setting('application_name')")
            for r in range(10):
                st = await conn.prepare(f"SELECT $1::int + {i}", name=f"drv_discard_{r}")
                assert await st.fetchval(r) == r + i
                assert await conn.fetchval(q, r) == r * 7 + i
                await conn.execute("SET application_name = 'changed'")
                await conn.execute("DISCARD ALL")
                try:
                    await st.fetchval(r)
                except exc.InvalidSQLStatementNameError:
                    pass
                else:
                    raise AssertionError(f"client {i}: statement survived DISCARD ALL")
                await conn.reload_schema_state()
                assert await conn.fetchval(q, r) == r * 7 + i
                got = await conn.fetchval("SELECT current_setting('application_name')")
                assert got == app, f"client {i}: DISCARD ALL did not reset application_name: {got}"
        else:
            for r in range(40):
                assert await conn.fetchval(q, r) == r * 7 + i, f"client {i} round {r}"
                await asyncio.sleep(0)

    await run_clients(CLIENTS, client)


async def check_many_statements_cycle():
    """More distinct statements per client (300) than a server connection's LRU (200), cycled
    twice by a few clients while the others run a small working set."""
    heavy = max(2, CLIENTS // 6)

    async def client(i, conn):
        if i < heavy:
            for cycle in range(2):
                for k in range(300):
                    got = await conn.fetchval(f"SELECT $1::int + {k} + {i * 100000}", cycle)
                    assert got == cycle + k + i * 100000
        else:
            for r in range(60):
                k = r % 4
                assert await conn.fetchval(f"SELECT $1::int * {k} - {i}", r) == r * k - i

    await run_clients_with(CLIENTS, client, lambda i: {"statement_cache_size": 1000 if i < heavy else 100})


async def check_session_params_no_leak(schema):
    """Half the clients SET search_path / application_name / TimeZone; the others never see them.
    The setters keep application_name and TimeZone across transactions."""
    b1, b2 = barrier(CLIENTS), barrier(CLIENTS)
    q = "SELECT current_setting('TimeZone'), current_setting('application_name'), current_setting('search_path')"

    async def client(i, conn):
        base = tuple(await conn.fetchrow(q))
        assert base[0] != SETTER_TZ and base[1] != f"setter{i}", base
        await b1.wait()
        setter = i % 2 == 0
        if setter:
            await conn.execute(f"SET search_path TO {schema}, public")
            await conn.execute(f"SET application_name = 'setter{i}'")
            await conn.execute(f"SET TimeZone = '{SETTER_TZ}'")
        await b2.wait()
        for r in range(12):
            if r % 3 == 0:
                async with conn.transaction():
                    got = tuple(await conn.fetchrow(q))
            else:
                got = tuple(await conn.fetchrow(q))
            if setter:
                assert got[0] == SETTER_TZ, f"setter {i} lost its TimeZone: {got}"
                assert got[1] == f"setter{i}", f"setter {i} lost its application_name: {got}"
                # search_path is not reported by the server: keeping it is a bonus, but it must
                # be the client's own or the default.
                assert got[2] in (f"{schema}, public", base[2]), f"setter {i}: {got}"
            else:
                assert got == base, f"client {i} sees another client's settings: {got} (own {base})"
            await asyncio.sleep(0)

    await run_clients(CLIENTS, client)


async def check_startup_params_kept(schemas):
    """Startup parameters (application_name, search_path, DateStyle, TimeZone as asyncpg sends
    them) are each client's own in every transaction, also for one shared statement text."""
    zones = ["UTC", "Asia/Tokyo", "America/Lima"]

    def settings(i):
        return {
            "server_settings": {
                "application_name": f"startup{i}",
                "search_path": f"{schemas[i]},public",
                "DateStyle": "ISO, DMY" if i % 2 else "ISO, MDY",
                "TimeZone": zones[i % 3],
            }
        }

    async def client(i, conn):
        q = ("SELECT v, current_setting('application_name'), current_setting('DateStyle'), "
             "current_setting('TimeZone'), current_setting('search_path') FROM who")
        want = (i, f"startup{i}", "ISO, DMY" if i % 2 else "ISO, MDY", zones[i % 3], f"{schemas[i]},public")
        for r in range(15):
            if r % 4 == 3:
                async with conn.transaction():
                    got = tuple(await conn.fetchrow(q))
            else:
                got = tuple(await conn.fetchrow(q))
            assert got == want, f"client {i} round {r}: {got}, want {want}"
            await asyncio.sleep(0)

    await run_clients_with(CLIENTS, client, settings)


async def check_sql_prepare_execute():
    """SQL-level PREPARE / EXECUTE / DEALLOCATE with one name for every client: each gets its own
    statement's result, or an error that points to the session port; never another client's
    result, never 'already exists'."""
    refused = []

    def acceptable_refusal(e):
        msg = str(e)
        assert "already exists" not in msg, f"collision across clients: {msg}"
        if "session" in msg.lower():
            refused.append(msg)
            return
        raise AssertionError(f"SQL-level prepared statement failed without pointing to the session port: {e!r}")

    async def client(i, conn):
        for r in range(8):
            try:
                await conn.execute(f"PREPARE drv_sql(int) AS SELECT $1 * {i + 1}, {i}")
            except asyncpg.PostgresError as e:
                acceptable_refusal(e)
                continue
            try:
                for k in range(3):
                    got = tuple(await conn.fetchrow(f"EXECUTE drv_sql({k + r})"))
                    assert got == ((k + r) * (i + 1), i), f"client {i} got another statement's result: {got}"
                async with conn.transaction():
                    got = tuple(await conn.fetchrow("EXECUTE drv_sql(5)"))
                    assert got == (5 * (i + 1), i), f"client {i}: {got}"
            except asyncpg.PostgresError as e:
                acceptable_refusal(e)
            try:
                await conn.execute("DEALLOCATE drv_sql")
            except asyncpg.PostgresError as e:
                acceptable_refusal(e)

    await run_clients(CLIENTS, client)
    if refused:
        print(f"    (SQL-level PREPARE refused {len(refused)} times: {refused[0]})")


# ---------------------------------------------------------------------------------------------


async def main():
    table = f"{PREFIX}_t"
    ptable = f"{PREFIX}_p"
    schema = f"{PREFIX}_s"
    schemas = [f"{PREFIX}_c{i}" for i in range(CLIENTS)]
    c = await connect(statement_cache_size=0)
    await c.execute(f"CREATE TABLE {table} (client int, n int); CREATE TABLE {ptable} (id int PRIMARY KEY, client int);"
                    f"CREATE SCHEMA {schema}")
    for i, s in enumerate(schemas):
        await c.execute(f"CREATE SCHEMA {s}; CREATE TABLE {s}.who (v int); INSERT INTO {s}.who VALUES ({i})")
    await c.close()

    checks = [
        ("cached_statements_many_clients", check_cached_statements_many_clients),
        ("same_name_different_queries", check_same_name_different_queries),
        ("prepare_close_prepare_same_name", check_prepare_close_prepare_same_name),
        ("prepared_across_unrelated_transaction", lambda: check_prepared_across_unrelated_transaction(table)),
        ("prepared_inside_and_outside_transaction", lambda: check_prepared_inside_and_outside_transaction(table)),
        ("executemany_failing_row", lambda: check_executemany_failing_row(ptable)),
        ("discard_all", check_discard_all),
        ("many_statements_cycle", check_many_statements_cycle),
        ("session_params_no_leak", lambda: check_session_params_no_leak(schema)),
        ("startup_params_kept", lambda: check_startup_params_kept(schemas)),
        ("sql_prepare_execute", check_sql_prepare_execute),
    ]
    only = os.environ.get("SUITE_ONLY")
    if only:
        checks = [(n, f) for n, f in checks if n in only.split(",")]
    failed = []
    started = time.monotonic()
    print(f"asyncpg {asyncpg.__version__}, {CLIENTS} connections, "
          f"{os.environ.get('PGHOST')}:{os.environ.get('PGPORT')} as {os.environ.get('PGUSER')}")
    for name, fn in checks:
        t0 = time.monotonic()
        try:
            await fn()
            print(f"ok      {name} ({time.monotonic() - t0:.1f}s)")
        except Exception as e:  # noqa: BLE001 - every failure is reported
            failed.append(name)
            print(f"FAILED  {name} ({time.monotonic() - t0:.1f}s): {type(e).__name__}: {e}")
            traceback.print_exc(limit=4, file=sys.stdout)
        sys.stdout.flush()

    try:
        c = await connect(statement_cache_size=0)
        await c.execute(f"DROP TABLE IF EXISTS {table}, {ptable}")
        for s in [schema] + schemas:
            await c.execute(f"DROP SCHEMA IF EXISTS {s} CASCADE")
        await c.close()
    except Exception as e:  # noqa: BLE001
        print(f"cleanup failed: {e!r}")
    print(f"asyncpg suite: {len(checks) - len(failed)} of {len(checks)} checks ok in "
          f"{time.monotonic() - started:.1f}s" + (f"; FAILED: {', '.join(failed)}" if failed else ""))
    return 1 if failed else 0


if __name__ == "__main__":
    sys.exit(asyncio.run(main()))
