#!/usr/bin/env node
// @neondatabase/serverless (Client and Pool) through the pooler's WebSocket listener, with `ws` as
// the WebSocket implementation, configured as README's "WebSocket clients" section shows.
//
// Environment:
//   WS_HOST        host:port of the pooler's WebSocket listener (required)
//   DATABASE_URL   postgres://user.tenant:password@host:port/db; its host:port is sent as
//                  `address=` and its port picks the pool mode (the session port: session)
//   WS_QUERY       extra query parameters for the upgrade URL (e.g. `mode=session`)
//   EXPECT_MODE    transaction | session: the mode the pooler must have picked
//   POOL_SIZE      the pool's size: in transaction mode no more backends may be seen
//   SUITE_CLIENTS  concurrent clients (default 40)
//   SECURE         1: wss:// (NODE_EXTRA_CA_CERTS names the CA)
//   PIPELINE       "password" (default, the driver's default) or "false"
//   ONLY           comma-separated check names to run (default: all)
// Every check runs; the last line is "N passed, M failed" and the exit status is 1 on a failure.
'use strict';

const assert = require('node:assert/strict');
const { Client, Pool, neonConfig } = require('@neondatabase/serverless');
const ws = require('ws');

const WS_HOST = required('WS_HOST');
const DATABASE_URL = required('DATABASE_URL');
const WS_QUERY = process.env.WS_QUERY || '';
const EXPECT_MODE = process.env.EXPECT_MODE || 'transaction';
const POOL_SIZE = Number(process.env.POOL_SIZE || 0);
const CLIENTS = Number(process.env.SUITE_CLIENTS || 40);
const CHECK_DEADLINE_MS = 30_000;
const ONLY = (process.env.ONLY || '').split(',').filter(Boolean);
const TABLE = `neon_${process.pid}_${Math.floor(Math.random() * 2 ** 30)}`;

function required(name) {
  const v = process.env[name];
  if (!v) {
    console.error(`${name} is required`);
    process.exit(2);
  }
  return v;
}

// The driver's configuration for a self-hosted proxy: the whole of it.
neonConfig.webSocketConstructor = ws;
neonConfig.wsProxy = (host, port) =>
  `${WS_HOST}/v2?address=${host}:${port}${WS_QUERY ? `&${WS_QUERY}` : ''}`;
neonConfig.useSecureWebSocket = process.env.SECURE === '1';
neonConfig.pipelineConnect = process.env.PIPELINE === 'false' ? false : 'password';
neonConfig.pipelineTLS = false;
neonConfig.forceDisablePgSSL = true;

function withDeadline(p, what) {
  let timer;
  const t = new Promise((_, reject) => {
    timer = setTimeout(() => reject(new Error(`${what}: not done within ${CHECK_DEADLINE_MS} ms`)), CHECK_DEADLINE_MS);
  });
  return Promise.race([p, t]).finally(() => clearTimeout(timer));
}

async function connect(extra = {}) {
  const c = new Client({ connectionString: DATABASE_URL, ...extra });
  c.on('error', () => {}); // a dying connection fails the query that used it
  await c.connect();
  return c;
}

async function val(c, text, values) {
  const r = await c.query(text, values);
  assert.equal(r.rows.length, 1, `one row for ${text}`);
  return Object.values(r.rows[0])[0];
}

async function expectError(p, code, what) {
  try {
    await p;
  } catch (e) {
    assert.equal(e.code, code, `${what}: SQLSTATE ${e.code} (${e.message}), wanted ${code}`);
    return e;
  }
  assert.fail(`${what}: succeeded, wanted SQLSTATE ${code}`);
}

const checks = {
  // The driver pipelines startup, cleartext password and this first query in one flight.
  async client_queries_parameters_and_errors() {
    const c = await connect();
    try {
      assert.equal(await val(c, 'SELECT 1 + 1 AS two'), 2);
      const r = await c.query('SELECT $1::int + $2::int AS sum, $3::text AS t, $4::int IS NULL AS n', [2, 3, 'héllo ✓', null]);
      assert.deepEqual(r.rows[0], { sum: 5, t: 'héllo ✓', n: true });
      await expectError(c.query('SELECT 1 / 0'), '22012', 'division by zero');
      await expectError(c.query('SELECT * FROM no_such_table_here'), '42P01', 'missing table');
      assert.equal(await val(c, "SELECT 'still here' AS s"), 'still here', 'the client goes on after errors');
      // A result larger than one WebSocket frame's coalescing buffer (16 KiB).
      const big = await val(c, 'SELECT repeat($1::text, 100000) AS big', ['xyz']);
      assert.equal(big.length, 300000);
      assert.equal(big, 'xyz'.repeat(100000));
      // And a large parameter the other way.
      const echoed = await val(c, 'SELECT length($1::text) AS n', ['é'.repeat(70000)]);
      assert.equal(echoed, 70000);
    } finally {
      await c.end();
    }
  },

  async mode_is_the_expected_one() {
    const c = await connect();
    try {
      // SQL-level PREPARE works on session connections only; transaction mode refuses it.
      if (EXPECT_MODE === 'session') {
        await c.query('PREPARE neon_mode_probe AS SELECT 1');
        await c.query('DEALLOCATE neon_mode_probe');
        const a = await val(c, 'SELECT pg_backend_pid() AS pid');
        const b = await val(c, 'SELECT pg_backend_pid() AS pid');
        assert.equal(a, b, 'one backend for the whole session');
      } else {
        await expectError(c.query('PREPARE neon_mode_probe AS SELECT 1'), '0A000', 'PREPARE in transaction mode');
      }
    } finally {
      await c.end();
    }
  },

  async transactions_commit_and_roll_back() {
    const c = await connect();
    const other = await connect();
    try {
      await c.query(`CREATE TABLE ${TABLE} (id int PRIMARY KEY, note text)`);
      await c.query('BEGIN');
      await c.query(`INSERT INTO ${TABLE} VALUES ($1, $2)`, [1, 'rolled back']);
      assert.equal(await val(c, `SELECT count(*)::int AS n FROM ${TABLE}`), 1, 'seen inside');
      assert.equal(await val(other, `SELECT count(*)::int AS n FROM ${TABLE}`), 0, 'not seen outside');
      await c.query('ROLLBACK');
      assert.equal(await val(c, `SELECT count(*)::int AS n FROM ${TABLE}`), 0);
      await c.query('BEGIN');
      await c.query(`INSERT INTO ${TABLE} VALUES ($1, $2)`, [2, 'kept']);
      await expectError(c.query(`INSERT INTO ${TABLE} VALUES (2, 'dup')`), '23505', 'duplicate key');
      await expectError(c.query('SELECT 1'), '25P02', 'statement in a failed transaction');
      await c.query('ROLLBACK');
      await c.query('BEGIN');
      await c.query(`INSERT INTO ${TABLE} VALUES ($1, $2)`, [3, 'committed']);
      await c.query('COMMIT');
      assert.equal(await val(other, `SELECT note FROM ${TABLE} WHERE id = 3`), 'committed');
      assert.equal(await val(other, `SELECT count(*)::int AS n FROM ${TABLE}`), 1);
    } finally {
      await c.query(`DROP TABLE IF EXISTS ${TABLE}`).catch(() => {});
      await c.end();
      await other.end();
    }
  },

  // node-postgres named statements: in transaction mode the pooler maps them across its pool.
  async named_prepared_statements_from_many_clients() {
    const n = Math.min(CLIENTS, 20);
    const clients = await Promise.all(Array.from({ length: n }, () => connect()));
    try {
      const rounds = await Promise.all(
        clients.map(async (c, i) => {
          const out = [];
          for (let k = 0; k < 3; k++) {
            const r = await c.query({ name: 'neon_double', text: 'SELECT $1::int * 2 AS d', values: [i * 10 + k] });
            out.push(r.rows[0].d);
          }
          return out;
        }),
      );
      rounds.forEach((out, i) => assert.deepEqual(out, [i * 20, i * 20 + 2, i * 20 + 4]));
    } finally {
      await Promise.all(clients.map((c) => c.end()));
    }
  },

  async pool_under_concurrency() {
    const pool = new Pool({ connectionString: DATABASE_URL, max: Math.min(CLIENTS, 20) });
    pool.on('error', () => {});
    try {
      const results = await Promise.all(
        Array.from({ length: CLIENTS * 5 }, (_, i) =>
          pool.query('SELECT $1::int AS i, pg_backend_pid() AS pid', [i]),
        ),
      );
      results.forEach((r, i) => assert.equal(r.rows[0].i, i));
      const pids = new Set(results.map((r) => r.rows[0].pid));
      if (EXPECT_MODE === 'transaction' && POOL_SIZE > 0) {
        assert.ok(pids.size <= POOL_SIZE, `${pids.size} backends served a pool of ${POOL_SIZE}`);
      }
      // A transaction on a client checked out of the driver's pool.
      const c = await pool.connect();
      try {
        await c.query('BEGIN');
        const a = await val(c, 'SELECT txid_current() AS x');
        const b = await val(c, 'SELECT txid_current() AS x');
        assert.equal(a, b, 'one transaction');
        await c.query('COMMIT');
      } finally {
        c.release();
      }
    } finally {
      await pool.end();
    }
  },

  async many_clients_at_once() {
    const started = await Promise.allSettled(
      Array.from({ length: CLIENTS }, async (_, i) => {
        const c = await connect();
        try {
          for (let k = 0; k < 3; k++) {
            assert.equal(await val(c, 'SELECT $1::int + $2::int AS s', [i, k]), i + k);
          }
          return await val(c, 'SELECT pg_backend_pid() AS pid');
        } finally {
          await c.end();
        }
      }),
    );
    const failed = started.filter((r) => r.status === 'rejected');
    assert.equal(failed.length, 0, `failed clients: ${failed.map((f) => f.reason && f.reason.message).join('; ')}`);
    const pids = new Set(started.map((r) => r.value));
    if (EXPECT_MODE === 'transaction' && POOL_SIZE > 0) {
      assert.ok(pids.size <= POOL_SIZE, `${pids.size} backends for ${CLIENTS} clients over a pool of ${POOL_SIZE}`);
    }
  },

  // node-postgres cancels with a CancelRequest on a new connection: here a new WebSocket.
  async cancel_a_running_query() {
    const c = await connect();
    const watcher = await connect();
    try {
      const tag = `neon_cancel_${process.pid}_${Math.floor(Math.random() * 1e9)}`;
      const running = c.query(`SELECT pg_sleep(30) /* ${tag} */`);
      const failed = expectError(running, '57014', 'cancelled query');
      const deadline = Date.now() + 10_000;
      for (;;) {
        const n = await val(
          watcher,
          "SELECT count(*)::int AS n FROM pg_stat_activity WHERE state = 'active' AND query LIKE $1",
          [`%${tag}%`],
        );
        if (n === 1) break;
        assert.ok(Date.now() < deadline, 'the query never started');
        await new Promise((r) => setTimeout(r, 20));
      }
      const started = Date.now();
      const helper = new Client({ connectionString: DATABASE_URL });
      helper.cancel(c, c.activeQuery);
      await failed;
      assert.ok(Date.now() - started < 10_000, 'cancelled well before the sleep ended');
      assert.equal(await val(c, 'SELECT 7 AS seven'), 7, 'the client goes on');
    } finally {
      await c.end();
      await watcher.end();
    }
  },

  async wrong_password_is_refused() {
    const url = new URL(DATABASE_URL);
    url.password = 'not-the-password';
    const c = new Client({ connectionString: url.toString() });
    c.on('error', () => {});
    let err;
    try {
      await c.connect();
      // With pipelined startup the first query carries the failure.
      await c.query('SELECT 1');
    } catch (e) {
      err = e;
    } finally {
      await c.end().catch(() => {});
    }
    assert.ok(err, 'a wrong password must fail');
    assert.equal(err.code, '28P01', `SQLSTATE ${err.code}: ${err.message}`);
  },
};

async function main() {
  let passed = 0;
  let failed = 0;
  for (const [name, fn] of Object.entries(checks)) {
    if (ONLY.length && !ONLY.includes(name)) continue;
    const t0 = Date.now();
    try {
      await withDeadline(fn(), name);
      passed++;
      console.log(`ok   ${name} (${Date.now() - t0} ms)`);
    } catch (e) {
      failed++;
      const code = e && e.code ? `[SQLSTATE ${e.code}] ` : '';
      console.log(`FAIL ${name}: ${code}${e && e.stack ? e.stack : e}`);
    }
  }
  console.log(`${passed} passed, ${failed} failed`);
  process.exit(failed ? 1 : 0);
}

main().catch((e) => {
  console.error(e);
  process.exit(1);
});
