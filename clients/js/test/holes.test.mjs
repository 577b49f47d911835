// Holes in the stream, on Node with `ws` and the official SDK: a scripted server
// on a loopback port speaks the legacy hub protocol (/api/v1/ws) and the
// Centrifuge JSON protocol (/connection/websocket) with a history of the global
// channel, so the kit's recovery of missing offsets is seen end to end.
import assert from 'node:assert/strict';
import { test } from 'node:test';
import { Centrifuge } from 'centrifuge';
import WebSocket, { WebSocketServer } from 'ws';
import { RealtimeKit, orderedWebSocket } from '../dist/index.js';

const EPOCH = 'e1';
const data = (offset) => ({ type: 'task.updated', timestamp: `ts${offset}`, task_id: 't1', seq: offset });
const pub = (offset) => ({ data: data(offset), offset });
const legacyFrame = (offset) =>
  JSON.stringify({ type: 'task.updated', timestamp: `ts${offset}`, payload: { task_id: 't1', seq: offset } });
const until = async (condition, ms = 3000) => {
  const deadline = Date.now() + ms;
  while (!condition()) {
    if (Date.now() > deadline) throw new Error('timed out');
    await new Promise((resolve) => setTimeout(resolve, 5));
  }
};

/** The global channel's history is offsets 1..top (or from `first`); `answer` may
 *  refuse a subscribe. Every subscribe request is recorded. */
class ScriptedServer {
  constructor() {
    this.top = 0;
    this.first = 1;
    this.subscribes = [];
    this.channelSockets = [];
    this.legacySockets = [];
    this.answer = () => 'ok';
  }

  async start() {
    this.wss = new WebSocketServer({ port: 0, host: '127.0.0.1' });
    await new Promise((resolve) => this.wss.on('listening', resolve));
    this.url = `http://127.0.0.1:${this.wss.address().port}`;
    this.wss.on('connection', (ws, request) => {
      if (request.url.startsWith('/api/v1/ws')) {
        this.legacySockets.push(ws);
        ws.on('message', (raw) => this.legacyCommand(ws, JSON.parse(String(raw))));
        return;
      }
      this.channelSockets.push(ws);
      ws.on('message', (raw) => {
        for (const line of String(raw).split('\n').filter(Boolean)) this.command(ws, JSON.parse(line));
      });
    });
  }

  legacyCommand(ws, command) {
    if (command.action === 'position') {
      // Where this socket's frames stand (a stalled node's stay behind), and the top.
      const offset = ws.dispatched ?? this.top;
      const payload = { channel: 'global', offset, epoch: EPOCH, top: this.top };
      ws.send(JSON.stringify({ type: 'shim.position', timestamp: 't', payload }));
    }
  }

  command(ws, cmd) {
    if (cmd.connect !== undefined) ws.send(JSON.stringify({ id: cmd.id, connect: { client: 'c', version: '0' } }));
    if (cmd.unsubscribe) ws.send(JSON.stringify({ id: cmd.id, unsubscribe: {} }));
    if (!cmd.subscribe) return;
    const request = cmd.subscribe;
    this.subscribes.push(request);
    const answer = this.answer(request);
    if (answer === 'deny') {
      ws.send(JSON.stringify({ id: cmd.id, error: { code: 103, message: 'permission denied' } }));
      return;
    }
    const result = { recoverable: true, positioned: true, epoch: EPOCH, offset: this.top };
    if (request.recover) {
      result.was_recovering = true;
      const since = request.offset ?? 0;
      if (since + 1 >= this.first) {
        result.recovered = true;
        result.offset = since;
        result.publications = [];
        for (let offset = since + 1; offset <= this.top; offset++) result.publications.push(pub(offset));
      }
    }
    ws.send(JSON.stringify({ id: cmd.id, subscribe: result }));
  }

  /** Publish `offset` (history keeps it); `skip` leaves the live push out. */
  publish(offset, { skip = false } = {}) {
    this.top = Math.max(this.top, offset);
    if (skip) return;
    for (const ws of this.channelSockets) ws.send(JSON.stringify({ push: { channel: 'global', pub: pub(offset) } }));
    for (const ws of this.legacySockets) {
      ws.send(legacyFrame(offset));
      ws.dispatched = offset;
    }
  }

  async stop() {
    for (const ws of this.wss.clients) ws.terminate();
    await new Promise((resolve) => this.wss.close(resolve));
  }
}

async function kitOn(server, protocol, extra = {}) {
  const kit = new RealtimeKit({
    ...extra,
    baseUrl: server.url,
    getToken: () => 'tok',
    WebSocket,
    fetch: async () => ({
      ok: true,
      json: async () => ({ user: 'u', protocol, url: '', mode: 'dual', cutover_version: 1 }),
    }),
    configPollMs: 0,
    minReconnectDelayMs: 20,
    maxReconnectDelayMs: 40,
  });
  const got = [];
  kit.subscribe((d) => got.push(d.offset));
  kit.start();
  return { kit, got };
}

test('frames of one TCP read reach the SDK in order through orderedWebSocket', async () => {
  const wss = new WebSocketServer({ port: 0, host: '127.0.0.1' });
  await new Promise((resolve) => wss.on('listening', resolve));
  wss.on('connection', (ws) => {
    ws.on('message', (raw) => {
      for (const line of String(raw).split('\n').filter(Boolean)) {
        const cmd = JSON.parse(line);
        if (cmd.connect !== undefined) ws.send(JSON.stringify({ id: cmd.id, connect: { client: 'c', version: '0' } }));
        if (!cmd.subscribe) continue;
        ws.send(JSON.stringify({ id: cmd.id, subscribe: { recoverable: true, positioned: true, epoch: EPOCH, offset: 10 } }));
        setTimeout(() => {
          // Four frames of three publications each, in one TCP write.
          const push = (offset) => JSON.stringify({ push: { channel: 'global', pub: pub(offset) } });
          ws._socket.cork();
          for (let frame = 0, offset = 11; frame < 4; frame++, offset += 3) {
            ws.send([push(offset), push(offset + 1), push(offset + 2)].join('\n'));
          }
          ws._socket.uncork();
        }, 20);
      }
    });
  });
  const client = new Centrifuge(`ws://127.0.0.1:${wss.address().port}`, { websocket: orderedWebSocket(WebSocket) });
  const sub = client.newSubscription('global', { recoverable: true, positioned: true });
  const offsets = [];
  sub.on('publication', (ctx) => offsets.push(ctx.offset));
  sub.subscribe();
  client.connect();
  try {
    await until(() => offsets.length === 12);
    assert.deepEqual(offsets, [11, 12, 13, 14, 15, 16, 17, 18, 19, 20, 21, 22]);
  } finally {
    client.disconnect();
    await new Promise((resolve) => wss.close(resolve));
  }
});

test('a channel stream that skips an offset is subscribed again from the last one and the hole recovered', async () => {
  const server = new ScriptedServer();
  await server.start();
  const { kit, got } = await kitOn(server, 'channels');
  try {
    await until(() => server.subscribes.length === 1 && kit.state === 'connected');
    server.publish(1);
    server.publish(2);
    server.publish(3, { skip: true }); // lost on the way
    server.publish(4);
    server.publish(5);
    await until(() => got.length === 5);
    assert.deepEqual(got, [1, 2, 3, 4, 5]);
    assert.deepEqual(
      server.subscribes.map((s) => [s.recover ?? false, s.offset ?? 0]),
      [[false, 0], [true, 2]],
      'the second subscription recovers from the last offset delivered',
    );
    server.publish(6);
    await until(() => got.length === 6);
    const metrics = kit.metrics();
    assert.equal(metrics.holes, 1);
    assert.equal(metrics.gaps, 0);
    assert.equal(metrics.duplicatesDropped, 0);
  } finally {
    kit.stop();
    await server.stop();
  }
});

test('a hole history no longer holds is reported as a gap, and the stream goes on', async () => {
  const server = new ScriptedServer();
  await server.start();
  const { kit, got } = await kitOn(server, 'channels');
  try {
    await until(() => server.subscribes.length === 1 && kit.state === 'connected');
    server.publish(1);
    server.publish(2, { skip: true });
    server.first = 3; // history dropped offset 2
    server.publish(3);
    await until(() => server.subscribes.length === 2);
    server.publish(4);
    await until(() => got.includes(4));
    assert.deepEqual(got, [1, 3, 4]);
    const metrics = kit.metrics();
    assert.equal(metrics.gaps, 1);
    assert.equal(metrics.skippedOffsets, 1);
  } finally {
    kit.stop();
    await server.stop();
  }
});

test('a legacy reconnect hole is filled from channel history, again after a failed attempt', async () => {
  const server = new ScriptedServer();
  await server.start();
  const { kit, got } = await kitOn(server, 'legacy');
  try {
    server.publish(1);
    await until(() => server.legacySockets.length === 1 && kit.state === 'connected');
    server.publish(2);
    await until(() => got.length === 1);
    assert.deepEqual(got, [2]);
    // The node restarts: offsets 3-5 are published while the socket is down.
    let attempts = 0;
    server.answer = () => (++attempts === 1 ? 'deny' : 'ok');
    server.legacySockets[0].terminate();
    server.legacySockets.length = 0;
    for (const offset of [3, 4, 5]) server.publish(offset);
    await until(() => got.length === 4 && server.legacySockets.length === 1);
    server.publish(6);
    await until(() => got.includes(6));
    assert.deepEqual(got, [2, 3, 4, 5, 6]);
    assert.equal(attempts, 2, 'the first filler was refused, the second one recovered');
    const metrics = kit.metrics();
    assert.equal(metrics.gaps, 0);
    assert.equal(metrics.connections, 1, 'the filler closed once the legacy socket covered the stream');
  } finally {
    kit.stop();
    await server.stop();
  }
});

test('offsets a legacy node missed (announced by the server) are recovered from history', async () => {
  const server = new ScriptedServer();
  await server.start();
  const { kit, got } = await kitOn(server, 'legacy');
  try {
    server.publish(1);
    await until(() => server.legacySockets.length === 1 && kit.state === 'connected');
    server.publish(2);
    await until(() => got.length === 1);
    // Offsets 3 and 4 never reached the node; it says so before offset 5's frame.
    server.publish(3, { skip: true });
    server.publish(4, { skip: true });
    const notice = { channel: 'global', offset: 4, epoch: EPOCH, missed: true };
    server.legacySockets[0].send(JSON.stringify({ type: 'shim.position', timestamp: 't', payload: notice }));
    server.publish(5);
    await until(() => got.length === 4);
    assert.deepEqual(got, [2, 3, 4, 5]);
    const metrics = kit.metrics();
    assert.equal(metrics.holes, 1);
    assert.equal(metrics.gaps, 0);
  } finally {
    kit.stop();
    await server.stop();
  }
});

test('a legacy socket that stays silent while the stream moves on is closed as stalled, and the hole filled', async () => {
  const server = new ScriptedServer();
  await server.start();
  const { kit, got } = await kitOn(server, 'legacy', { stallCheckMs: 40 });
  try {
    server.publish(1);
    await until(() => server.legacySockets.length === 1 && kit.state === 'connected');
    server.publish(2);
    await until(() => got.length === 1);
    const stalled = server.legacySockets[0];
    server.legacySockets.length = 0; // its node no longer gets the stream
    for (const offset of [3, 4, 5]) server.publish(offset);
    await until(() => server.legacySockets.length === 1 && got.length === 4);
    assert.equal(stalled.readyState, WebSocket.CLOSED, 'the stalled socket was closed');
    server.publish(6);
    await until(() => got.includes(6));
    assert.deepEqual(got, [2, 3, 4, 5, 6]);
    const metrics = kit.metrics();
    assert.equal(metrics.stalls, 1);
    assert.equal(metrics.gaps, 0);
  } finally {
    kit.stop();
    await server.stop();
  }
});

test('a quiet stream is not taken for a stalled one', async () => {
  const server = new ScriptedServer();
  await server.start();
  const { kit, got } = await kitOn(server, 'legacy', { stallCheckMs: 20 });
  try {
    server.publish(1);
    await until(() => server.legacySockets.length === 1 && kit.state === 'connected');
    server.publish(2);
    await until(() => got.length === 1);
    await new Promise((resolve) => setTimeout(resolve, 200)); // ten silent checks
    assert.equal(server.legacySockets.length, 1);
    assert.equal(kit.metrics().stalls, 0);
  } finally {
    kit.stop();
    await server.stop();
  }
});
