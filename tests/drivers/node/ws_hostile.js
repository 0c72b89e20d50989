#!/usr/bin/env node
// Hostile and unusual WebSocket clients, written with the `ws` package, against the pooler's
// WebSocket listener: what a real WebSocket implementation can send that a driver would not.
//
// Environment: WS_HOST (host:port of the listener), PGUSER (user.tenant), PGPASSWORD.
// Every check runs; the last line is "N passed, M failed" and the exit status is 1 on a failure.
'use strict';

const assert = require('node:assert/strict');
const WebSocket = require('ws');

const WS_HOST = process.env.WS_HOST;
const USER = process.env.PGUSER;
const PASSWORD = process.env.PGPASSWORD;
const DEADLINE_MS = 15_000;

// ----- a little PostgreSQL protocol -----
function startup(user) {
  const body = Buffer.concat([
    Buffer.from([0, 3, 0, 0]),
    Buffer.from(`user\0${user}\0database\0postgres\0\0`),
  ]);
  const len = Buffer.alloc(4);
  len.writeInt32BE(body.length + 4);
  return Buffer.concat([len, body]);
}

function message(tag, body) {
  const head = Buffer.alloc(5);
  head[0] = tag.charCodeAt(0);
  head.writeInt32BE(body.length + 4, 1);
  return Buffer.concat([head, body]);
}

const password = (pw) => message('p', Buffer.from(`${pw}\0`));
const query = (sql) => message('Q', Buffer.from(`${sql}\0`));

// Collects the protocol messages a socket receives; `until(tag)` resolves with them when one
// with that tag has arrived.
function collector(ws) {
  let buf = Buffer.alloc(0);
  const msgs = [];
  let waiter = null;
  ws.on('message', (data, isBinary) => {
    assert.ok(isBinary, 'the pooler answers in binary frames');
    buf = Buffer.concat([buf, data]);
    while (buf.length >= 5) {
      const len = buf.readInt32BE(1);
      if (buf.length < len + 1) break;
      msgs.push({ tag: String.fromCharCode(buf[0]), body: buf.subarray(5, len + 1) });
      buf = buf.subarray(len + 1);
    }
    if (waiter) waiter();
  });
  return {
    msgs,
    until(tag) {
      return new Promise((resolve) => {
        const check = () => {
          const i = msgs.findIndex((m) => m.tag === tag);
          if (i >= 0) {
            waiter = null;
            resolve(msgs.splice(0, i + 1));
          }
        };
        waiter = check;
        check();
      });
    },
  };
}

function sqlstate(body) {
  for (let i = 0; i < body.length; ) {
    const code = String.fromCharCode(body[i]);
    const end = body.indexOf(0, i + 1);
    if (code === 'C') return body.toString('utf8', i + 1, end);
    if (body[i] === 0) break;
    i = end + 1;
  }
  return null;
}

function open(path = '/v2?address=localhost:1') {
  const ws = new WebSocket(`ws://${WS_HOST}${path}`);
  return new Promise((resolve, reject) => {
    ws.once('open', () => resolve(ws));
    ws.once('error', reject);
    ws.once('unexpected-response', (_req, res) => reject(new Error(`HTTP ${res.statusCode}`)));
  });
}

const closed = (ws) => new Promise((resolve) => ws.once('close', (code, reason) => resolve({ code, reason: reason.toString() })));

const checks = {
  async text_frame_is_closed_1003() {
    const ws = await open();
    const c = closed(ws);
    ws.send('SELECT 1'); // a string goes as a text frame
    const { code, reason } = await c;
    assert.equal(code, 1003);
    assert.match(reason, /text frames are not accepted/);
  },

  async fragmented_message_with_a_ping_inside() {
    const ws = await open();
    const col = collector(ws);
    const pong = new Promise((resolve) => ws.once('pong', (data) => resolve(data.toString())));
    const flight = Buffer.concat([startup(USER), password(PASSWORD), query("SELECT 'frag' || 'ments'")]);
    const third = Math.floor(flight.length / 3);
    ws.send(flight.subarray(0, third), { binary: true, fin: false });
    ws.ping('between fragments');
    ws.send(flight.subarray(third, 2 * third), { binary: true, fin: false });
    ws.send(flight.subarray(2 * third), { binary: true, fin: true });
    assert.equal(await pong, 'between fragments');
    const login = await col.until('Z');
    assert.ok(login.some((m) => m.tag === 'R'), 'authentication');
    const answer = await col.until('Z');
    const row = answer.find((m) => m.tag === 'D');
    assert.ok(row, 'a DataRow');
    assert.equal(row.body.toString('utf8', 6), 'fragments');
    const c = closed(ws);
    ws.close(4000, 'done here');
    assert.equal((await c).code, 4000, 'the close code is echoed');
  },

  async garbage_inside_good_frames_gets_08P01() {
    const ws = await open();
    const col = collector(ws);
    const c = closed(ws);
    ws.send(Buffer.from('GET / HTTP/1.1\r\n\r\n'));
    const [err] = await col.until('E');
    assert.equal(sqlstate(err.body), '08P01');
    assert.equal((await c).code, 1000);
  },

  async wrong_password_gets_28P01() {
    const ws = await open();
    const col = collector(ws);
    ws.send(Buffer.concat([startup(USER), password('wrong')]));
    const msgs = await col.until('E');
    assert.equal(sqlstate(msgs[msgs.length - 1].body), '28P01');
    ws.terminate();
  },

  async old_protocol_version_gets_426() {
    await assert.rejects(
      new Promise((resolve, reject) => {
        const ws = new WebSocket(`ws://${WS_HOST}/`, { protocolVersion: 8 });
        ws.once('open', resolve);
        ws.once('error', reject);
        ws.once('unexpected-response', (_req, res) => reject(new Error(`HTTP ${res.statusCode}`)));
      }),
      /HTTP 426/,
    );
  },

  async unknown_mode_gets_400() {
    await assert.rejects(open('/v2?mode=statement'), /HTTP 400/);
  },
};

function withDeadline(p, what) {
  let timer;
  const t = new Promise((_, reject) => {
    timer = setTimeout(() => reject(new Error(`${what}: not done within ${DEADLINE_MS} ms`)), DEADLINE_MS);
  });
  return Promise.race([p, t]).finally(() => clearTimeout(timer));
}

async function main() {
  let passed = 0;
  let failed = 0;
  for (const [name, fn] of Object.entries(checks)) {
    try {
      await withDeadline(fn(), name);
      passed++;
      console.log(`ok   ${name}`);
    } catch (e) {
      failed++;
      console.log(`FAIL ${name}: ${e && e.stack ? e.stack : e}`);
    }
  }
  console.log(`${passed} passed, ${failed} failed`);
  process.exit(failed ? 1 : 0);
}

main();
