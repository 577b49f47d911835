// Unit tests of the kit's core on Node, without a server: a fake WebSocket stands
// in for the legacy hub and a fake fetch for /api/v1/realtime/config.
import assert from 'node:assert/strict';
import { test } from 'node:test';
import { RealtimeKit, Router, backoffDelay, toChannelData, toLegacyMessage } from '../dist/index.js';

const sockets = [];
class FakeSocket {
  constructor(url) {
    this.url = url;
    this.readyState = 0;
    this.sent = [];
    sockets.push(this);
    queueMicrotask(() => {
      this.readyState = 1;
      this.onopen?.({});
    });
  }
  send(text) {
    this.sent.push(text);
  }
  close(code = 1000, reason = '') {
    this.readyState = 3;
    this.onclose?.({ code, reason });
  }
  frame(object) {
    this.onmessage?.({ data: JSON.stringify(object) });
  }
  position(offset, epoch = 'e1') {
    this.frame({ type: 'shim.position', timestamp: 't', payload: { channel: 'global', offset, epoch } });
  }
}

const event = (seq) => ({ type: 'task.updated', timestamp: `ts${seq}`, payload: { task_id: 't1', seq }, task_id: 't1' });
const config = (protocol = 'legacy') => ({ user: 'u', protocol, url: '/api/v1/ws', mode: 'legacy', cutover_version: 1 });
const tick = () => new Promise((resolve) => setTimeout(resolve, 5));

function legacyKit() {
  sockets.length = 0;
  const kit = new RealtimeKit({
    baseUrl: 'http://127.0.0.1:1',
    getToken: () => 'tok',
    WebSocket: FakeSocket,
    fetch: async () => ({ ok: true, json: async () => config() }),
    configPollMs: 0,
  });
  const got = [];
  kit.subscribe((d) => got.push([d.offset, d.message.payload.seq]));
  kit.start();
  return { kit, got };
}

test('the legacy socket opts in to notices, subscribes to everything, then asks for its position', async () => {
  const { kit } = legacyKit();
  await tick();
  assert.equal(sockets.length, 1);
  assert.match(sockets[0].url, /^ws:\/\/127\.0\.0\.1:1\/api\/v1\/ws\?token=tok$/);
  assert.deepEqual(sockets[0].sent, ['{"action":"position"}', '{"action":"subscribe_all"}', '{"action":"position"}']);
  kit.stop();
});

test('frames before the first position notice are placed by counting back from it', async () => {
  const { kit, got } = legacyKit();
  await tick();
  const socket = sockets[0];
  socket.frame(event(1));
  socket.frame(event(2));
  assert.deepEqual(got, [], 'nothing is delivered before it can be placed');
  socket.position(12);
  socket.frame(event(3));
  assert.deepEqual(got, [[11, 1], [12, 2], [13, 3]]);
  assert.equal(kit.state, 'connected');
  kit.stop();
});

test('an unknown position is asked again after the next frame', async () => {
  const { kit, got } = legacyKit();
  await tick();
  const socket = sockets[0];
  socket.frame({ type: 'shim.position', timestamp: 't', payload: { channel: 'global', offset: null, epoch: null } });
  socket.frame(event(1));
  assert.equal(socket.sent.at(-1), '{"action":"position"}');
  assert.equal(socket.sent.length, 4);
  socket.position(5);
  assert.deepEqual(got, [[5, 1]]);
  kit.stop();
});

test('a later notice skips positions legacy clients do not get, without delivering anything', async () => {
  const { kit, got } = legacyKit();
  await tick();
  const socket = sockets[0];
  socket.position(1);
  socket.frame(event(2));
  socket.position(4); // offsets 3 and 4 were not legacy events
  socket.frame(event(5));
  assert.deepEqual(got, [[2, 2], [5, 5]]);
  assert.equal(kit.metrics().gaps, 0);
  kit.stop();
});

test('stop closes the socket and nothing reconnects afterwards', async () => {
  const { kit } = legacyKit();
  await tick();
  kit.stop();
  assert.equal(sockets[0].readyState, 3);
  await new Promise((resolve) => setTimeout(resolve, 700));
  assert.equal(sockets.length, 1, 'no socket was opened after stop');
  assert.equal(kit.state, 'disconnected');
});

test('a closed legacy socket is reopened with backoff and the hole is reported when nothing can fill it', async () => {
  sockets.length = 0;
  const kit = new RealtimeKit({
    baseUrl: 'http://127.0.0.1:1',
    getToken: () => 'tok',
    WebSocket: FakeSocket,
    fetch: async () => ({ ok: true, json: async () => config() }),
    configPollMs: 0,
    minReconnectDelayMs: 10,
    maxReconnectDelayMs: 20,
  });
  const got = [];
  kit.subscribe((d) => got.push(d.message.payload.seq));
  kit.start();
  await tick();
  sockets[0].position(0);
  sockets[0].frame(event(1));
  sockets[0].close(1006, '');
  await new Promise((resolve) => setTimeout(resolve, 60));
  assert.equal(sockets.length, 2, 'reconnected');
  sockets[1].position(3); // mode `legacy`: no channel history to fill offsets 2-3
  sockets[1].frame(event(4));
  assert.deepEqual(got, [1, 4]);
  const metrics = kit.metrics();
  assert.equal(metrics.gaps, 1);
  assert.equal(metrics.skippedOffsets, 2);
  kit.stop();
});

test('backoff grows to its ceiling with jitter and never stops', () => {
  const low = [0, 1, 2, 3, 10, 50].map((n) => backoffDelay(n, 100, 5000, () => 0));
  const high = [0, 1, 2, 3, 10, 50].map((n) => backoffDelay(n, 100, 5000, () => 1));
  assert.deepEqual(low, [50, 100, 200, 400, 2500, 2500]);
  assert.deepEqual(high, [100, 200, 400, 800, 5000, 5000]);
});

test('channel data and legacy messages convert both ways, top-level ids from tags', () => {
  const message = event(7);
  const data = toChannelData(message);
  assert.deepEqual(data, { task_id: 't1', seq: 7, type: 'task.updated', timestamp: 'ts7' });
  assert.deepEqual(toLegacyMessage(data, { task_id: 't1' }), message);
  assert.deepEqual(Object.keys(toLegacyMessage(data, { task_id: 't1' })), ['type', 'timestamp', 'payload', 'task_id']);
});

test('the router applies the served route table like the server', () => {
  const router = new Router({
    global_channel: 'global',
    default_channel: 'system',
    routes: [
      { match: 'task.', channels: ['task:{task_id}', 'project:{project_id}'], optional: ['project:{project_id}'], fallback: '' },
      { match: 'session.', channels: ['task:{task_id}'], optional: [], fallback: '' },
      { match: 'approval.', channels: ['user:{user_id}'], optional: [], fallback: 'system' },
    ],
  });
  const m = (type, payload, extra = {}) => ({ type, timestamp: 't', payload, ...extra });
  assert.deepEqual(router.channels(m('task.updated', { task_id: 'a', project_id: 'p' })), ['task:a', 'project:p', 'global']);
  assert.deepEqual(router.channels(m('session.started', {}, { task_id: 'b' })), ['task:b', 'global']);
  assert.deepEqual(router.channels(m('approval.required', { session_id: 's' })), ['system', 'global']);
  assert.deepEqual(router.channels(m('approval.required', { user_id: 'u1' })), ['user:u1', 'global']);
  assert.deepEqual(router.channels(m('other.thing', {})), ['system', 'global']);
});

test('one kit per tab: every page shares one socket, the last release stops it for good', async () => {
  sockets.length = 0;
  const { acquireKit, sharedKit } = await import('../dist/index.js');
  const options = {
    baseUrl: 'http://127.0.0.1:2',
    getToken: () => 'tok',
    WebSocket: FakeSocket,
    fetch: async () => ({ ok: true, json: async () => config() }),
    configPollMs: 0,
  };
  const home = acquireKit(options, 20);
  const detail = acquireKit(options, 20);
  assert.equal(home.kit, detail.kit);
  await tick();
  assert.equal(sockets.length, 1, 'two pages, one connection');
  home.release();
  detail.release();
  detail.release(); // a second release of the same hold changes nothing
  assert.equal(sharedKit('http://127.0.0.1:2'), home.kit, 'kept for the linger time');
  await new Promise((resolve) => setTimeout(resolve, 60));
  assert.equal(sharedKit('http://127.0.0.1:2'), null);
  assert.equal(sockets[0].readyState, 3);
  await new Promise((resolve) => setTimeout(resolve, 600));
  assert.equal(sockets.length, 1, 'nothing reconnects after the last page left');
});
