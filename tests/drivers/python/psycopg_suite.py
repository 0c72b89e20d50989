#!/usr/bin/env python3
"""psycopg 3 through a pooler port, every statement prepared server-side (prepare_threshold=0).

Connection settings come from the libpq environment (PGHOST, PGPORT, PGUSER, PGPASSWORD,
PGDATABASE). Many connections run each check at once so that, through a transaction-mode pool
of a few server connections, a statement is prepared on one server connection and used on
another. Every check runs (a failing one does not stop the others); the exit status is 1 when
any failed. SUITE_CLIENTS sets the number of concurrent connections (default 30).
"""

import os
import random
import sys
import threading
import time
import traceback
from concurrent.futures import ThreadPoolExecutor, wait

import psycopg
from psycopg import errors, pq

CLIENTS = int(os.environ.get("SUITE_CLIENTS", "30"))
CHECK_DEADLINE = float(os.environ.get("SUITE_CHECK_DEADLINE", "25"))
PREFIX = f"drv_py_{os.getpid()}_{random.randrange(1 << 30)}"
SETTER_TZ = "Pacific/Chatham"


def connect(**kw):
    kw.setdefault("autocommit", True)
    kw.setdefault("prepare_threshold", 0)
    kw.setdefault("connect_timeout", 10)
    return psycopg.connect("", **kw)


def one(conn, query, params=None, **kw):
    row = conn.execute(query, params, **kw).fetchone()
    assert row is not None, f"no row for {query!r}"
    return row[0] if len(row) == 1 else tuple(row)


# Barriers of the running check: a failing client breaks them, so that the others fail at once
# instead of waiting for it until the deadline.
BARRIERS = []


def barrier(n):
    b = threading.Barrier(n, timeout=CHECK_DEADLINE)
    BARRIERS.append(b)
    return b


def run_clients(n, fn, *args):
    """Run fn(i, *args) for i in 0..n on n threads at once; raise the first failure."""

    def guarded(i):
        try:
            fn(i, *args)
        except BaseException:
            for b in BARRIERS:
                b.abort()
            raise

    with ThreadPoolExecutor(max_workers=n) as ex:
        futs = [ex.submit(guarded, i) for i in range(n)]
        done, pending = wait(futs, timeout=CHECK_DEADLINE)
        BARRIERS.clear()
        if pending:
            raise TimeoutError(f"{len(pending)} of {n} clients still running after {CHECK_DEADLINE}s")
        errs = [f.exception() for f in futs if f.exception() is not None]
        real = [e for e in errs if not isinstance(e, threading.BrokenBarrierError)]
        if real or errs:
            raise (real or errs)[0]


def with_conns(n, fn, **connect_kw):
    """Open n connections, run fn(i, conn) for each concurrently, close them."""

    def client(i):
        with connect(**connect_kw) as conn:
            fn(i, conn)

    run_clients(n, client)


# ---------------------------------------------------------------------------------------------
# Checks
# ---------------------------------------------------------------------------------------------


def check_prepared_many_clients():
    """Every connection prepares its own queries and executes them many times."""

    def client(i, conn):
        for r in range(40):
            assert one(conn, "SELECT %s::int + 1000", (r,)) == r + 1000
            assert one(conn, f"SELECT %s::text || '-c{i}'", (str(r),)) == f"{r}-c{i}"
        assert conn._prepared._names, "psycopg prepared nothing: prepare_threshold ignored"

    with_conns(CLIENTS, client)


def check_same_name_different_queries():
    """psycopg names every connection's first statement _pg3_0: across clients the same name is
    used for different queries (and shapes). Explicit names through libpq too."""

    def client(i, conn):
        # Fresh connection: this is _pg3_0 here, different text and result per client.
        if i % 2 == 0:
            q, expect = f"SELECT %s::int * {i + 2}", lambda r: r * (i + 2)
        else:
            q, expect = f"SELECT 'client{i}:' || %s::text", lambda r: f"client{i}:{r}"
        names = set()
        for r in range(30):
            assert one(conn, q, (r,)) == expect(r), f"client {i} round {r}"
            names.update(conn._prepared._names.values())
        assert b"_pg3_0" in names, names
        # The same explicit protocol name on every connection, different statement per client.
        pg = conn.pgconn
        res = pg.prepare(b"drv_same", f"SELECT $1::int + {i * 1000}, {i}".encode())
        assert res.status == pq.ExecStatus.COMMAND_OK, res.get_error_message()
        for r in range(20):
            res = pg.exec_prepared(b"drv_same", [str(r).encode()])
            assert res.status == pq.ExecStatus.TUPLES_OK, res.get_error_message()
            got = (int(res.get_value(0, 0)), int(res.get_value(0, 1)))
            assert got == (r + i * 1000, i), f"client {i}: drv_same gave {got}"
        res = pg.close_prepared(b"drv_same")
        assert res.status == pq.ExecStatus.COMMAND_OK, res.get_error_message()

    with_conns(CLIENTS, client)


def check_prepare_close_prepare_same_name():
    """Prepare a name, drop it (protocol Close, or SQL DEALLOCATE), prepare the same name again
    for another query: the new statement runs, never the old one, never 'already exists'."""

    def client(i, conn):
        pg = conn.pgconn
        for cycle in range(12):
            text = f"SELECT $1::int * {cycle + 1}, 'cycle{cycle}-c{i}'"
            res = pg.prepare(b"drv_cycle", text.encode())
            assert res.status == pq.ExecStatus.COMMAND_OK, f"client {i} cycle {cycle}: {res.get_error_message()}"
            for r in range(3):
                res = pg.exec_prepared(b"drv_cycle", [str(r + i).encode()])
                assert res.status == pq.ExecStatus.TUPLES_OK, f"client {i} cycle {cycle}: {res.get_error_message()}"
                got = (int(res.get_value(0, 0)), res.get_value(0, 1).decode())
                assert got == ((r + i) * (cycle + 1), f"cycle{cycle}-c{i}"), f"client {i} cycle {cycle}: {got}"
            if cycle % 2 == 0:
                res = pg.close_prepared(b"drv_cycle")
            else:
                res = pg.exec_(b"DEALLOCATE drv_cycle")
            assert res.status == pq.ExecStatus.COMMAND_OK, f"client {i} cycle {cycle} drop: {res.get_error_message()}"
        # Dropped means dropped: executing it now fails as PostgreSQL says.
        res = pg.exec_prepared(b"drv_cycle", [b"1"])
        assert res.status == pq.ExecStatus.FATAL_ERROR, "closed statement still executes"
        assert res.error_field(pq.DiagnosticField.SQLSTATE) == b"26000", res.get_error_message()
        # psycopg's own LRU (prepared_max 3 over 6 queries) closes and re-prepares all the time.
        conn.prepared_max = 3
        for r in range(30):
            k = r % 6
            assert one(conn, f"SELECT %s::int - {k}", (r,)) == r - k

    with_conns(CLIENTS, client)


def check_prepared_across_unrelated_transaction(table):
    """A statement prepared before an unrelated transaction (while every other client runs its
    own) still runs, with the right result, after it."""
    bar = barrier(CLIENTS)

    def client(i, conn):
        q = f"SELECT %s::int * 3 + {i}"
        assert one(conn, q, (i,)) == i * 3 + i
        bar.wait()
        with conn.transaction():
            conn.execute(f"INSERT INTO {table} (client, n) VALUES (%s, %s)", (i, 1))
            assert one(conn, f"SELECT count(*) FROM {table} WHERE client = %s", (i,)) == 1
        bar.wait()
        for r in range(10):
            assert one(conn, q, (r,)) == r * 3 + i, f"client {i} round {r}"

    with_conns(CLIENTS, client)


def check_prepared_inside_and_outside_transaction(table):
    """One prepared statement executed outside, inside an explicit transaction (seeing that
    transaction's own uncommitted rows), after a rollback, and outside again."""

    def client(i, conn):
        cid = 1000 + i
        count = f"SELECT count(*) FROM {table} WHERE client = %s"
        ins = f"INSERT INTO {table} (client, n) VALUES (%s, %s)"
        assert one(conn, count, (cid,)) == 0
        with conn.transaction():
            for n in range(5):
                conn.execute(ins, (cid, n))
                assert one(conn, count, (cid,)) == n + 1
        assert one(conn, count, (cid,)) == 5
        try:
            with conn.transaction():
                conn.execute(ins, (cid, 99))
                assert one(conn, count, (cid,)) == 6
                raise RuntimeError("roll back")
        except RuntimeError:
            pass
        for _ in range(5):
            assert one(conn, count, (cid,)) == 5
        with conn.transaction():
            assert one(conn, count, (cid,)) == 5

    with_conns(CLIENTS, client)


def check_pipeline_error_then_recover(table):
    """An error in the middle of a pipeline (psycopg pipeline(), prepared statements) is this
    client's only; statements after it, and the statements prepared before it, work."""

    def client(i, conn):
        ok = f"SELECT %s::int + {i}"
        ok2 = f"SELECT %s::text || ' from c{i}'"
        for rnd in range(4):
            raised = None
            try:
                with conn.pipeline() as p:
                    c1 = conn.execute(ok, (rnd,))
                    conn.execute("SELECT 10 / %s::int", (0,))
                    conn.execute(ok2, (str(rnd),))
                    p.sync()
            except errors.DivisionByZero as e:
                raised = e
            assert raised is not None, f"client {i}: the failing pipeline statement did not raise"
            assert c1.fetchone()[0] == rnd + i
            # Inside an explicit transaction: the error aborts it; nothing of it stays.
            try:
                with conn.transaction():
                    with conn.pipeline():
                        conn.execute(f"INSERT INTO {table} (client, n) VALUES (%s, %s)", (2000 + i, rnd))
                        conn.execute("SELECT 10 / %s::int", (0,))
                        conn.execute(ok, (rnd,))
            except errors.DivisionByZero:
                pass
            else:
                raise AssertionError(f"client {i}: transaction pipeline error did not raise")
            assert one(conn, ok, (rnd + 1,)) == rnd + 1 + i
            assert one(conn, ok2, (str(rnd),)) == f"{rnd} from c{i}"
            assert one(conn, f"SELECT count(*) FROM {table} WHERE client = %s", (2000 + i,)) == 0
            with conn.pipeline():
                cs = [conn.execute(ok, (k,)) for k in range(5)]
            assert [c.fetchone()[0] for c in cs] == [k + i for k in range(5)]

    with_conns(CLIENTS, client)


def check_discard_all():
    """DISCARD ALL by some clients (executed prepared, as psycopg does) drops their own
    statements only: the others' keep running, and theirs are re-prepared by psycopg."""
    def client(i, conn):
        q = f"SELECT %s::int * 7 + {i}"
        if i % 3 == 0:
            app = one(conn, "SELECT current_setting('application_name')")
            for r in range(15):
                assert one(conn, q, (r,)) == r * 7 + i
                one(conn, "SELECT set_config('application_name', %s, false)", (f"discard{i}",))
                conn.execute("DISCARD ALL")
                assert not conn._prepared._names, f"psycopg did not notice DISCARD ALL: {conn._prepared._names}"
                assert one(conn, q, (r,)) == r * 7 + i
                # DISCARD ALL resets the session: application_name is the startup one again.
                got = one(conn, "SELECT current_setting('application_name')")
                assert got == app, f"client {i} round {r}: application_name {got!r} after DISCARD ALL, want {app!r}"

        else:
            for r in range(40):
                assert one(conn, q, (r,)) == r * 7 + i, f"client {i} round {r}"

    run_clients(CLIENTS, lambda i: _with(i, client, application_name=f"drv{i}"))


def _with(i, fn, **kw):
    with connect(**kw) as conn:
        fn(i, conn)


def check_many_statements_cycle():
    """More distinct statements per client (300) than a server connection's LRU (200), cycled
    twice by a few clients while the others run a small working set."""
    heavy = max(2, CLIENTS // 6)

    def client(i, conn):
        if i < heavy:
            conn.prepared_max = 1000
            for cycle in range(2):
                for k in range(300):
                    assert one(conn, f"SELECT %s::int + {k} + {i * 100000}", (cycle,)) == cycle + k + i * 100000
            assert len(conn._prepared._names) == 300, len(conn._prepared._names)
        else:
            for r in range(60):
                k = r % 4
                assert one(conn, f"SELECT %s::int * {k} - {i}", (r,)) == r * k - i

    with_conns(CLIENTS, client)


def check_session_params_no_leak(schema):
    """Half the clients SET search_path / application_name / TimeZone (each committed); the other
    half never see those values. The setters keep application_name and TimeZone."""
    bar = barrier(CLIENTS)
    q = "SELECT current_setting('TimeZone'), current_setting('application_name'), current_setting('search_path')"

    def client(i, conn):
        base = one(conn, q)
        assert base[1] != f"setter{i}", base
        assert base[0] != SETTER_TZ
        bar.wait()
        setter = i % 2 == 0
        if setter:
            conn.execute(f"SET search_path TO {schema}, public")
            conn.execute(f"SET application_name = 'setter{i}'")
            conn.execute(f"SET TimeZone = '{SETTER_TZ}'")
        bar.wait()
        for r in range(12):
            if r % 3 == 0:
                with conn.transaction():
                    got = one(conn, q)
            else:
                got = one(conn, q)
            if setter:
                assert got[0] == SETTER_TZ, f"setter {i} lost its TimeZone: {got}"
                assert got[1] == f"setter{i}", f"setter {i} lost its application_name: {got}"
                # search_path is not reported by the server (ParameterStatus): keeping it is a
                # bonus, but it must be the client's own or the default.
                assert got[2] in (f"{schema}, public", base[2]), f"setter {i}: {got}"
            else:
                assert got == base, f"client {i} sees another client's settings: {got} (own {base})"

    run_clients(CLIENTS, lambda i: _with(i, client, application_name=f"nl{i}"))


def check_resets_restore_startup():
    """DISCARD ALL, RESET ALL, RESET name and SET name TO DEFAULT bring back the values the client
    gave at startup (as PostgreSQL does), prepared and unprepared, while other clients run."""
    want = lambda i: (f"reset{i}", "public,pg_catalog")

    def client(i):
        opts = "-c search_path=public,pg_catalog"
        for thr in (0, None):
            with connect(application_name=f"reset{i}", options=opts, prepare_threshold=thr) as conn:
                get = lambda: one(conn, "SELECT current_setting('application_name'), current_setting('search_path')")
                for r in range(4):
                    steps = [
                        ["SELECT set_config('application_name', 'x', false)", "DISCARD ALL"],
                        ["SET application_name = 'y'", "SET search_path = pg_catalog", "RESET ALL"],
                        ["SET application_name = 'y'", "SET search_path = pg_catalog",
                         "RESET application_name", "RESET search_path"],
                        ["SET search_path = pg_catalog", "SET application_name TO DEFAULT",
                         "SET search_path TO DEFAULT"],
                    ]
                    for step in steps:
                        for sql in step:
                            conn.execute(sql)
                        got = get()
                        assert got == want(i), f"client {i} round {r} after {step[-1]}: {got!r}"

    run_clients(8, client)


def check_startup_params_kept(schemas):
    """application_name, options=-c search_path=... and -c DateStyle given at startup are each
    client's own in every transaction, also for one statement text prepared by all of them."""

    def client(i):
        style = "ISO, DMY" if i % 2 else "ISO, MDY"
        opts = f"-c search_path={schemas[i]},public -c DateStyle=ISO,{style.split(', ')[1]}"
        with connect(application_name=f"startup{i}", options=opts) as conn:
            for r in range(15):
                if r % 4 == 3:
                    with conn.transaction():
                        got = one(conn, "SELECT v, current_setting('application_name'), current_setting('DateStyle') FROM who")
                else:
                    got = one(conn, "SELECT v, current_setting('application_name'), current_setting('DateStyle') FROM who")
                assert got == (i, f"startup{i}", style), f"client {i} round {r}: {got}"
                sp = one(conn, "SELECT current_setting('search_path')")
                assert sp == f"{schemas[i]},public", f"client {i} round {r}: search_path {sp}"

    run_clients(CLIENTS, client)


def check_sql_prepare_execute():
    """SQL-level PREPARE / EXECUTE / DEALLOCATE with one name for every client: each gets its own
    statement's result, or an error that points to the session port; never another client's
    result, never 'already exists'."""
    refused = []

    def acceptable_refusal(e):
        msg = str(e)
        assert "already exists" not in msg, f"collision across clients: {msg}"
        if "session" in msg.lower():
            refused.append(msg)
            return True
        raise AssertionError(f"SQL-level prepared statement failed without pointing to the session port: {e!r}")

    def client(i, conn):
        for r in range(8):
            try:
                conn.execute(f"PREPARE drv_sql(int) AS SELECT $1 * {i + 1}, {i}", prepare=False)
            except psycopg.Error as e:
                acceptable_refusal(e)
                continue
            try:
                for k in range(3):
                    got = one(conn, f"EXECUTE drv_sql({k + r})", prepare=False)
                    assert got == ((k + r) * (i + 1), i), f"client {i} got another statement's result: {got}"
                with conn.transaction():
                    got = one(conn, "EXECUTE drv_sql(5)", prepare=False)
                    assert got == (5 * (i + 1), i), f"client {i}: {got}"
            except psycopg.Error as e:
                acceptable_refusal(e)
            try:
                conn.execute("DEALLOCATE drv_sql", prepare=False)
            except psycopg.Error as e:
                acceptable_refusal(e)

    with_conns(CLIENTS, client)
    if refused:
        print(f"    (SQL-level PREPARE refused {len(refused)} times: {refused[0]})")


# ---------------------------------------------------------------------------------------------


def main():
    table = f"{PREFIX}_t"
    schema = f"{PREFIX}_s"
    schemas = [f"{PREFIX}_c{i}" for i in range(CLIENTS)]
    with connect(prepare_threshold=None) as c:
        c.execute(f"CREATE TABLE {table} (client int, n int)")
        c.execute(f"CREATE SCHEMA {schema}")
        for i, s in enumerate(schemas):
            c.execute(f"CREATE SCHEMA {s}; CREATE TABLE {s}.who (v int); INSERT INTO {s}.who VALUES ({i})")

    checks = [
        ("prepared_many_clients", check_prepared_many_clients),
        ("same_name_different_queries", check_same_name_different_queries),
        ("prepare_close_prepare_same_name", check_prepare_close_prepare_same_name),
        ("prepared_across_unrelated_transaction", lambda: check_prepared_across_unrelated_transaction(table)),
        ("prepared_inside_and_outside_transaction", lambda: check_prepared_inside_and_outside_transaction(table)),
        ("pipeline_error_then_recover", lambda: check_pipeline_error_then_recover(table)),
        ("discard_all", check_discard_all),
        ("many_statements_cycle", check_many_statements_cycle),
        ("session_params_no_leak", lambda: check_session_params_no_leak(schema)),
        ("startup_params_kept", lambda: check_startup_params_kept(schemas)),
        ("resets_restore_startup", check_resets_restore_startup),
        ("sql_prepare_execute", check_sql_prepare_execute),
    ]
    only = os.environ.get("SUITE_ONLY")
    if only:
        checks = [(n, f) for n, f in checks if n in only.split(",")]
    # Known gaps of the pooler, named by the Rust test that runs the suite (see drivers.rs).
    skip = os.environ.get("SUITE_SKIP", "").split(",")
    for n, _ in checks:
        if n in skip:
            print(f"skipped {n} (known gap, SUITE_SKIP)")
    checks = [(n, f) for n, f in checks if n not in skip]
    failed = []
    started = time.monotonic()
    print(f"psycopg {psycopg.__version__} (libpq {pq.version()}), {CLIENTS} connections, "
          f"{os.environ.get('PGHOST')}:{os.environ.get('PGPORT')} as {os.environ.get('PGUSER')}")
    for name, fn in checks:
        t0 = time.monotonic()
        try:
            fn()
            print(f"ok      {name} ({time.monotonic() - t0:.1f}s)")
        except Exception as e:  # noqa: BLE001 - every failure is reported
            failed.append(name)
            print(f"FAILED  {name} ({time.monotonic() - t0:.1f}s): {type(e).__name__}: {e}")
            traceback.print_exc(limit=4, file=sys.stdout)
        sys.stdout.flush()

    try:
        with connect(prepare_threshold=None) as c:
            c.execute(f"DROP TABLE IF EXISTS {table}")
            for s in [schema] + schemas:
                c.execute(f"DROP SCHEMA IF EXISTS {s} CASCADE")
    except psycopg.Error as e:
        print(f"cleanup failed: {e}")
    print(f"psycopg suite: {len(checks) - len(failed)} of {len(checks)} checks ok in "
          f"{time.monotonic() - started:.1f}s" + (f"; FAILED: {', '.join(failed)}" if failed else ""))
    sys.exit(1 if failed else 0)


if __name__ == "__main__":
    main()
