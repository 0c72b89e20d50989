#!/usr/bin/env node
// node-postgres named queries ({name, text, values}) through a pooler port.
//
// Connection settings come from the environment (PGHOST, PGPORT, PGUSER, PGPASSWORD,
// PGDATABASE). Many clients run each check at once so that, through a transaction-mode pool of
// a few server connections, a statement is prepared on one server connection and used on
// another. Every check runs; the exit status is 1 when any failed. SUITE_CLIENTS sets the
// number of concurrent connections (default 30).
'use strict';

const assert = require('node:assert/strict');
const { Client } = require('pg');

const CLIENTS = Number(process.env.SUITE_CLIENTS || 30);
const CHECK_DEADLINE_MS = Number(process.env.SUITE_CHECK_DEADLINE || 25) * 1000;
const PREFIX = `drv_node_${process.pid}_${Math.floor(Math.random() * 2 ** 30)}`;
const SETTER_TZ = 'Pacific/Chatham';

async function connect(extra = {}) {
  const c = new Client({ connectionTimeoutMillis: 10000, ...extra });
  c.on('error', () => {}); // a dying connection fails the query that used it
  await c.connect();
  return c;
}

async function one(c, q) {
  const res = await c.query(q);
  assert.equal(res.rows.length, 1, `one row for ${JSON.stringify(q)}`);
  return res.rows[0];
}

async function val(c, q) {
  const row = await one(c, q);
  return Object.values(row)[0];
}

function withDeadline(p, what) {
  let timer;
  const t = new Promise((_, reject) => {
    timer = setTimeout(() => reject(new Error(`${what}: not done within ${CHECK_DEADLINE_MS} ms`)), CHECK_DEADLINE_MS);
  });
  return Promise.race([p, t]).finally(() => clearTimeout(timer));
}

// Open n clients (perClient(i) gives extra config), run fn(i, client) on all at once.
async function runClients(n, fn, perClient = () => ({})) {
  const results = await withDeadline(
    Promise.allSettled(
      Array.from({ length: n }, async (_, i) => {
        const c = await connect(perClient(i));
        try {
          await fn(i, c);
        } catch (e) {
          for (const b of barriers) b.abort();
          throw e;
        } finally {
          await c.end().catch(() => {});
        }
      }),
    ),
    'clients',
  );
  barriers.clear();
  const failed = results.find((r) => r.status === 'rejected' && !/barrier broken/.test(String(r.reason)));
  if (failed) throw failed.reason;
  const broken = results.find((r) => r.status === 'rejected');
  if (broken) throw broken.reason;
}

const tick = () => new Promise((r) => setImmediate(r));

// Barriers of the running check: a failing client breaks them, so the others fail at once
// instead of waiting for it until the deadline.
const barriers = new Set();

function barrier(n) {
  let count = 0;
  let release;
  let reject;
  const done = new Promise((res, rej) => {
    release = res;
    reject = rej;
  });
  done.catch(() => {});
  const b = { abort: () => reject(new Error('barrier broken: another client failed')) };
  barriers.add(b);
  return async () => {
    count += 1;
    if (count === n) release();
    await done;
  };
}

// ---------------------------------------------------------------------------------------------

async function namedQueriesManyClients() {
  await runClients(CLIENTS, async (i, c) => {
    for (let r = 0; r < 40; r++) {
      assert.equal(await val(c, { name: 'plus', text: 'SELECT $1::int + 1000 AS v', values: [r] }), r + 1000);
      assert.equal(
        await val(c, { name: 'tag', text: `SELECT $1::text || '-c${i}' AS v`, values: [String(r)] }),
        `${r}-c${i}`,
      );
    }
    assert.ok(c.connection.parsedStatements.plus, 'node-postgres did not prepare the named query');
  });
}

async function sameNameDifferentQueries() {
  // Every client uses the name 'q1', each for its own query and result shape.
  await runClients(CLIENTS, async (i, c) => {
    const even = i % 2 === 0;
    const q = even
      ? { name: 'q1', text: `SELECT $1::int * ${i + 2} AS v` }
      : { name: 'q1', text: `SELECT 'client${i}:' || $1::text AS v, ${i} AS w` };
    for (let r = 0; r < 30; r++) {
      const row = await one(c, { ...q, values: [even ? r : String(r)] });
      if (even) assert.deepEqual(row, { v: r * (i + 2) }, `client ${i} round ${r}`);
      else assert.deepEqual(row, { v: `client${i}:${r}`, w: i }, `client ${i} round ${r}`);
      await tick();
    }
  });
}

async function prepareDeallocatePrepareSameName() {
  // Prepare 'cyc', DEALLOCATE it, prepare 'cyc' for another query: the new one runs.
  await runClients(CLIENTS, async (i, c) => {
    for (let cycle = 0; cycle < 10; cycle++) {
      const text = `SELECT $1::int * ${cycle + 1} AS v, 'cycle${cycle}-c${i}' AS w`;
      for (let r = 0; r < 3; r++) {
        const row = await one(c, { name: 'cyc', text, values: [r + i] });
        assert.deepEqual(row, { v: (r + i) * (cycle + 1), w: `cycle${cycle}-c${i}` }, `client ${i} cycle ${cycle}`);
      }
      await c.query('DEALLOCATE cyc');
      delete c.connection.parsedStatements.cyc;
    }
    // Dropped means dropped: with node-postgres told otherwise, the server says 26000.
    c.connection.parsedStatements.cyc = 'SELECT 1';
    await assert.rejects(c.query({ name: 'cyc', text: 'SELECT 1', values: [] }), (e) => e.code === '26000');
  });
}

async function preparedAcrossUnrelatedTransaction(table) {
  const b1 = barrier(CLIENTS);
  const b2 = barrier(CLIENTS);
  await runClients(CLIENTS, async (i, c) => {
    const q = (v) => ({ name: 'across', text: `SELECT $1::int * 3 + ${i} AS v`, values: [v] });
    assert.equal(await val(c, q(i)), i * 3 + i);
    await b1();
    await c.query('BEGIN');
    await c.query(`INSERT INTO ${table} (client, n) VALUES ($1, $2)`, [i, 1]);
    assert.equal(await val(c, { text: `SELECT count(*)::int AS n FROM ${table} WHERE client = $1`, values: [i] }), 1);
    await c.query('COMMIT');
    await b2();
    for (let r = 0; r < 10; r++) assert.equal(await val(c, q(r)), r * 3 + i, `client ${i} round ${r}`);
  });
}

async function preparedInsideAndOutsideTransaction(table) {
  await runClients(CLIENTS, async (i, c) => {
    const cid = 1000 + i;
    const count = { name: 'count', text: `SELECT count(*)::int AS n FROM ${table} WHERE client = $1`, values: [cid] };
    const ins = (n) => ({ name: 'ins', text: `INSERT INTO ${table} (client, n) VALUES ($1, $2)`, values: [cid, n] });
    assert.equal(await val(c, count), 0);
    await c.query('BEGIN');
    for (let n = 0; n < 5; n++) {
      await c.query(ins(n));
      assert.equal(await val(c, count), n + 1);
    }
    await c.query('COMMIT');
    assert.equal(await val(c, count), 5);
    await c.query('BEGIN');
    await c.query(ins(99));
    assert.equal(await val(c, count), 6);
    await c.query('ROLLBACK');
    for (let k = 0; k < 5; k++) assert.equal(await val(c, count), 5);
    await c.query('BEGIN');
    assert.equal(await val(c, count), 5);
    await c.query('COMMIT');
  });
}

async function errorMidPipeline(table) {
  // node-postgres sends Parse/Bind/Describe/Execute/Sync in one write. A Bind that fails after
  // its Parse succeeded leaves the statement prepared: node-postgres reuses it without Parse.
  // A failing statement in an explicit transaction aborts only that transaction.
  await runClients(CLIENTS, async (i, c) => {
    const q = (v) => ({ name: 'num', text: `SELECT $1::int + ${i} AS v`, values: [v] });
    for (let r = 0; r < 4; r++) {
      const name = `fresh${r}`;
      await assert.rejects(c.query({ name, text: `SELECT $1::int * ${i} AS v`, values: ['not a number'] }), (e) => e.code === '22P02');
      assert.equal(await val(c, { name, text: `SELECT $1::int * ${i} AS v`, values: [r] }), r * i);
      await assert.rejects(c.query({ name: 'div', text: 'SELECT 10 / $1::int AS v', values: [0] }), (e) => e.code === '22012');
      assert.equal(await val(c, q(r)), r + i);
      assert.equal(await val(c, { name: 'div', text: 'SELECT 10 / $1::int AS v', values: [5] }), 2);
      await c.query('BEGIN');
      await c.query({ name: 'ins', text: `INSERT INTO ${table} (client, n) VALUES ($1, $2)`, values: [2000 + i, r] });
      await assert.rejects(c.query({ name: 'div', text: 'SELECT 10 / $1::int AS v', values: [0] }), (e) => e.code === '22012');
      await assert.rejects(c.query(q(r)), (e) => e.code === '25P02');
      await c.query('ROLLBACK');
      assert.equal(await val(c, { name: 'cnt', text: `SELECT count(*)::int AS n FROM ${table} WHERE client = $1`, values: [2000 + i] }), 0);
      assert.equal(await val(c, q(r + 1)), r + 1 + i);
    }
  });
}

async function discardAll() {
  // DISCARD ALL drops the discarding client's statements only; the others' keep running.
  await runClients(CLIENTS, async (i, c) => {
    const q = (v) => ({ name: 'seven', text: `SELECT $1::int * 7 + ${i} AS v`, values: [v] });
    if (i % 3 === 0) {
      const app = await val(c, "SELECT current_setting('application_name') AS a");
      for (let r = 0; r < 10; r++) {
        assert.equal(await val(c, q(r)), r * 7 + i);
        await c.query("SET application_name = 'changed'");
        await c.query('DISCARD ALL');
        // node-postgres still believes 'seven' is prepared: the server (or pooler) says it is not.
        await assert.rejects(c.query(q(r)), (e) => e.code === '26000');
        c.connection.parsedStatements = {};
        assert.equal(await val(c, q(r)), r * 7 + i);
        assert.equal(await val(c, "SELECT current_setting('application_name') AS a"), app);
      }
    } else {
      for (let r = 0; r < 40; r++) {
        assert.equal(await val(c, q(r)), r * 7 + i, `client ${i} round ${r}`);
        await tick();
      }
    }
  });
}

async function manyStatementsCycle() {
  // More distinct named statements per client (300) than a server connection's LRU (200).
  const heavy = Math.max(2, Math.floor(CLIENTS / 6));
  await runClients(CLIENTS, async (i, c) => {
    if (i < heavy) {
      for (let cycle = 0; cycle < 2; cycle++) {
        for (let k = 0; k < 300; k++) {
          const got = await val(c, { name: `m${k}`, text: `SELECT $1::int + ${k} + ${i * 100000} AS v`, values: [cycle] });
          assert.equal(got, cycle + k + i * 100000);
        }
      }
      assert.equal(Object.keys(c.connection.parsedStatements).length, 300);
    } else {
      for (let r = 0; r < 60; r++) {
        const k = r % 4;
        assert.equal(await val(c, { name: `w${k}`, text: `SELECT $1::int * ${k} - ${i} AS v`, values: [r] }), r * k - i);
      }
    }
  });
}

async function sessionParamsNoLeak(schema) {
  const b1 = barrier(CLIENTS);
  const b2 = barrier(CLIENTS);
  const q = {
    name: 'settings',
    text: "SELECT current_setting('TimeZone') AS tz, current_setting('application_name') AS app, current_setting('search_path') AS sp",
  };
  await runClients(CLIENTS, async (i, c) => {
    const base = await one(c, q);
    assert.notEqual(base.tz, SETTER_TZ);
    await b1();
    const setter = i % 2 === 0;
    if (setter) {
      await c.query(`SET search_path TO ${schema}, public`);
      await c.query(`SET application_name = 'setter${i}'`);
      await c.query(`SET TimeZone = '${SETTER_TZ}'`);
    }
    await b2();
    for (let r = 0; r < 12; r++) {
      let got;
      if (r % 3 === 0) {
        await c.query('BEGIN');
        got = await one(c, q);
        await c.query('COMMIT');
      } else {
        got = await one(c, q);
      }
      if (setter) {
        assert.equal(got.tz, SETTER_TZ, `setter ${i} lost its TimeZone`);
        assert.equal(got.app, `setter${i}`, `setter ${i} lost its application_name`);
        // search_path is not reported by the server: keeping it is a bonus, but it must be the
        // client's own or the default.
        assert.ok([`${schema}, public`, base.sp].includes(got.sp), `setter ${i}: search_path ${got.sp}`);
      } else {
        assert.deepEqual(got, base, `client ${i} sees another client's settings`);
      }
      await tick();
    }
  });
}

async function startupParamsKept(schemas) {
  // application_name and options=-c search_path=... -c DateStyle=... from the startup packet
  // are each client's own in every transaction, also for one named statement shared by text.
  await runClients(
    CLIENTS,
    async (i, c) => {
      const want = { v: i, app: `startup${i}`, ds: i % 2 ? 'ISO, DMY' : 'ISO, MDY', sp: `${schemas[i]},public` };
      const q = {
        name: 'who',
        text: "SELECT v, current_setting('application_name') AS app, current_setting('DateStyle') AS ds, current_setting('search_path') AS sp FROM who",
      };
      for (let r = 0; r < 15; r++) {
        let got;
        if (r % 4 === 3) {
          await c.query('BEGIN');
          got = await one(c, q);
          await c.query('COMMIT');
        } else {
          got = await one(c, q);
        }
        assert.deepEqual(got, want, `client ${i} round ${r}`);
        await tick();
      }
    },
    (i) => ({
      application_name: `startup${i}`,
      options: `-c search_path=${schemas[i]},public -c DateStyle=ISO,${i % 2 ? 'DMY' : 'MDY'}`,
    }),
  );
}

async function sqlPrepareExecute() {
  // SQL-level PREPARE / EXECUTE / DEALLOCATE, one name for every client: each gets its own
  // statement's result or an error pointing to the session port; never another client's
  // result, never 'already exists'.
  const refused = [];
  const acceptable = (e) => {
    if (!e || !e.message) throw e;
    assert.ok(!e.message.includes('already exists'), `collision across clients: ${e.message}`);
    if (e.message.toLowerCase().includes('session')) {
      refused.push(e.message);
      return;
    }
    throw new Error(`SQL-level prepared statement failed without pointing to the session port: ${e.message} (${e.code})`);
  };
  await runClients(CLIENTS, async (i, c) => {
    for (let r = 0; r < 8; r++) {
      try {
        await c.query(`PREPARE drv_sql(int) AS SELECT $1 * ${i + 1} AS v, ${i} AS w`);
      } catch (e) {
        acceptable(e);
        continue;
      }
      try {
        for (let k = 0; k < 3; k++) {
          const row = await one(c, `EXECUTE drv_sql(${k + r})`);
          assert.deepEqual(row, { v: (k + r) * (i + 1), w: i }, `client ${i} got another statement's result`);
        }
        await c.query('BEGIN');
        try {
          assert.deepEqual(await one(c, 'EXECUTE drv_sql(5)'), { v: 5 * (i + 1), w: i }, `client ${i}`);
        } finally {
          await c.query('ROLLBACK');
        }
      } catch (e) {
        if (e instanceof assert.AssertionError) throw e;
        acceptable(e);
      }
      try {
        await c.query('DEALLOCATE drv_sql');
      } catch (e) {
        acceptable(e);
      }
    }
  });
  if (refused.length) console.log(`    (SQL-level PREPARE refused ${refused.length} times: ${refused[0]})`);
}

// ---------------------------------------------------------------------------------------------

async function main() {
  const table = `${PREFIX}_t`;
  const schema = `${PREFIX}_s`;
  const schemas = Array.from({ length: CLIENTS }, (_, i) => `${PREFIX}_c${i}`);
  const admin = await connect();
  await admin.query(`CREATE TABLE ${table} (client int, n int); CREATE SCHEMA ${schema}`);
  for (const [i, s] of schemas.entries()) {
    await admin.query(`CREATE SCHEMA ${s}; CREATE TABLE ${s}.who (v int); INSERT INTO ${s}.who VALUES (${i})`);
  }
  await admin.end();

  let checks = [
    ['named_queries_many_clients', namedQueriesManyClients],
    ['same_name_different_queries', sameNameDifferentQueries],
    ['prepare_deallocate_prepare_same_name', prepareDeallocatePrepareSameName],
    ['prepared_across_unrelated_transaction', () => preparedAcrossUnrelatedTransaction(table)],
    ['prepared_inside_and_outside_transaction', () => preparedInsideAndOutsideTransaction(table)],
    ['error_mid_pipeline_then_recover', () => errorMidPipeline(table)],
    ['discard_all', discardAll],
    ['many_statements_cycle', manyStatementsCycle],
    ['session_params_no_leak', () => sessionParamsNoLeak(schema)],
    ['startup_params_kept', () => startupParamsKept(schemas)],
    ['sql_prepare_execute', sqlPrepareExecute],
  ];
  if (process.env.SUITE_ONLY) {
    const only = process.env.SUITE_ONLY.split(',');
    checks = checks.filter(([n]) => only.includes(n));
  }
  const pgVersion = require('pg/package.json').version;
  console.log(`node-postgres ${pgVersion}, ${CLIENTS} connections, ${process.env.PGHOST}:${process.env.PGPORT} as ${process.env.PGUSER}`);
  const started = Date.now();
  const failed = [];
  for (const [name, fn] of checks) {
    const t0 = Date.now();
    try {
      await fn();
      console.log(`ok      ${name} (${((Date.now() - t0) / 1000).toFixed(1)}s)`);
    } catch (e) {
      failed.push(name);
      console.log(`FAILED  ${name} (${((Date.now() - t0) / 1000).toFixed(1)}s): ${e && e.stack ? e.stack.split('\n').slice(0, 6).join('\n') : e}`);
      if (e && e.code) console.log(`        SQLSTATE ${e.code}`);
    }
  }
  try {
    const c = await connect();
    await c.query(`DROP TABLE IF EXISTS ${table}`);
    for (const s of [schema, ...schemas]) await c.query(`DROP SCHEMA IF EXISTS ${s} CASCADE`);
    await c.end();
  } catch (e) {
    console.log(`cleanup failed: ${e.message}`);
  }
  console.log(
    `node-postgres suite: ${checks.length - failed.length} of ${checks.length} checks ok in ${((Date.now() - started) / 1000).toFixed(1)}s` +
      (failed.length ? `; FAILED: ${failed.join(', ')}` : ''),
  );
  return failed.length ? 1 : 0;
}

main().then(
  (code) => process.exit(code),
  (e) => {
    console.error(e);
    process.exit(2);
  },
);
