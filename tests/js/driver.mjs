// Drives the official centrifuge-js SDK for pytest (see tests/jsclient.py).
//
// Protocol: one JSON object per line on stdin (commands) and stdout (answers and events).
//   startup options: argv[2] = JSON {url, token, name?, minReconnectDelay?, maxReconnectDelay?,
//                    timeout?, maxServerPingDelay?, data?, debug?, getToken? (default true),
//                    transports? ([{transport, endpoint}] instead of url: the SDK's fallback list),
//                    emulationEndpoint?, websocket? (false: no WebSocket implementation at all,
//                    as where the network or the runtime has none),
//                    protobuf? (use the SDK's protobuf build, centrifuge/build/protobuf)}
// In protobuf mode payloads are bytes: the driver encodes the JSON values it is given
// and decodes the bytes it gets, as an app with JSON payloads would, so answers and
// events look the same in both modes.
//   command: {seq, cmd, ...params}
//   answer:  {seq, ok: true, result} | {seq, ok: false, error: {code, message}}
//   event:   {event: "<name>", ...context}
// stdout carries only these lines; everything else (SDK debug output too) goes to stderr.

import WebSocket from 'ws';
import { createInterface } from 'node:readline';
// The client kit's socket wrapper (built by `make kit`): see the websocket option below.
import { orderedWebSocket } from '../../clients/js/dist/index.js';

// The SDK's debug logger writes through console.*; keep stdout clean for the line protocol.
for (const level of ['log', 'info', 'debug', 'warn']) {
  console[level] = (...args) => console.error(...args);
}

// Code used for failures that come from the driver itself, not from the SDK or the server.
const DRIVER_ERROR = -1;

let options;
try {
  options = JSON.parse(process.argv[2] ?? '{}');
} catch (err) {
  console.error('driver: bad startup options', err);
  process.exit(2);
}
const protobuf = options.protobuf === true;
const { Centrifuge, UnauthorizedError } = await import(
  protobuf ? 'centrifuge/build/protobuf' : 'centrifuge');

// Protobuf mode: JSON values travel as their UTF-8 text.
function encodePayload(value) {
  if (!protobuf || value === null || value === undefined) return value;
  return new TextEncoder().encode(JSON.stringify(value));
}

function decodePayload(bytes) {
  if (bytes.length === 0) return null;
  return JSON.parse(new TextDecoder().decode(bytes));
}

function plain(value, depth = 0) {
  // JSON-safe deep copy: drops functions, maps Errors to {code, message}, bytes to arrays
  // (to the JSON value they hold in protobuf mode).
  if (depth > 20) return null;
  if (value === null || value === undefined) return null;
  if (typeof value === 'bigint') return value.toString();
  if (typeof value === 'number') return Number.isFinite(value) ? value : null;
  if (typeof value === 'string' || typeof value === 'boolean') return value;
  if (typeof value === 'function' || typeof value === 'symbol') return null;
  if (value instanceof Error) return errorOf(value);
  if (ArrayBuffer.isView(value)) return protobuf ? decodePayload(value) : Array.from(value);
  // The protobuf build hands 64-bit fields (offsets) over as protobufjs Longs.
  if (value.__isLong__ === true && typeof value.toNumber === 'function') return value.toNumber();
  if (Array.isArray(value)) return value.map((item) => plain(item, depth + 1));
  const out = {};
  for (const [key, item] of Object.entries(value)) {
    if (typeof item === 'function' || item === undefined) continue;
    out[key] = plain(item, depth + 1);
  }
  return out;
}

function errorOf(err) {
  if (err === null || err === undefined) return { code: DRIVER_ERROR, message: String(err) };
  if (typeof err !== 'object') return { code: DRIVER_ERROR, message: String(err) };
  const out = {
    code: typeof err.code === 'number' ? err.code : DRIVER_ERROR,
    message: typeof err.message === 'string' ? err.message : String(err),
  };
  if (typeof err.temporary === 'boolean') out.temporary = err.temporary;
  if (err instanceof Error && out.code === DRIVER_ERROR) out.name = err.name;
  return out;
}

function writeLine(obj) {
  let line;
  try {
    line = JSON.stringify(obj);
  } catch (err) {
    line = JSON.stringify({ event: 'driver.error', message: `unserializable: ${err}` });
  }
  // Writes to a pipe are synchronous on Linux, so lines leave in emission order immediately.
  process.stdout.write(line + '\n');
}

function emit(name, ctx, defaults = {}) {
  writeLine({ ...defaults, ...plain(ctx ?? {}), event: name });
}

const publicationDefaults = { channel: null, data: null, offset: null, info: null, tags: null };
const subscribedDefaults = {
  channel: null,
  recovered: false,
  wasRecovering: false,
  recoverable: false,
  positioned: false,
  streamPosition: null,
  hasRecoveredPublications: false,
  data: null,
};
const codeReasonDefaults = { code: null, reason: null };

function publicationOf(pub) {
  return { ...publicationDefaults, ...plain(pub) };
}

// The token getToken hands out next; starts as the startup token, replaced by setToken.
let currentToken = options.token ?? '';
const subTokens = new Map();

async function getConnectionToken() {
  // An empty token means the app refuses: the SDK then disconnects with "unauthorized".
  if (!currentToken) throw new UnauthorizedError('');
  return currentToken;
}

const clientOptions = { token: options.token ?? '' };
// Node 20 has no WebSocket of its own: without the `ws` package the SDK finds none.
// `ws` emits every frame of one TCP read in one task, and centrifuge-js 5.7.4 then
// interleaves the replies of those frames (a browser gives each message its own task),
// so the SDK gets them joined, as one message, through the kit's wrapper.
if (options.websocket !== false) clientOptions.websocket = orderedWebSocket(WebSocket);
if ((options.transports ?? []).some((t) => t.transport === 'sse')) {
  // Node has no EventSource either; the SDK takes one as an option, as fetch.
  clientOptions.eventsource = (await import('eventsource')).EventSource;
}
for (const key of [
  'name', 'minReconnectDelay', 'maxReconnectDelay', 'timeout', 'maxServerPingDelay', 'data',
  'debug', 'version', 'emulationEndpoint',
]) {
  if (options[key] !== undefined && options[key] !== null) clientOptions[key] = options[key];
}
if (clientOptions.data !== undefined) clientOptions.data = encodePayload(clientOptions.data);
if (options.getToken !== false) clientOptions.getToken = getConnectionToken;

const client = new Centrifuge(options.transports ?? options.url, clientOptions);

client.on('connecting', (ctx) => emit('connecting', ctx, codeReasonDefaults));
client.on('connected', (ctx) => emit('connected', ctx, { client: null, transport: null, data: null }));
client.on('disconnected', (ctx) => emit('disconnected', ctx, codeReasonDefaults));
client.on('error', (ctx) => emit('error', ctx, { type: null, error: null }));
client.on('message', (ctx) => emit('message', ctx, { data: null }));
client.on('publication', (ctx) => writeLine({ ...publicationOf(ctx), event: 'publication' }));
client.on('join', (ctx) => emit('join', ctx, { channel: null, info: null }));
client.on('leave', (ctx) => emit('leave', ctx, { channel: null, info: null }));
client.on('subscribed', (ctx) => emit('subscribed', ctx, subscribedDefaults));
client.on('subscribing', (ctx) => emit('subscribing', ctx, { channel: null, ...codeReasonDefaults }));
client.on('unsubscribed', (ctx) => emit('unsubscribed', ctx, { channel: null, ...codeReasonDefaults }));

function attachSubscription(sub) {
  const channel = sub.channel;
  const withChannel = (defaults) => ({ ...defaults, channel });
  sub.on('subscribing', (ctx) => emit('sub.subscribing', ctx, withChannel(codeReasonDefaults)));
  sub.on('subscribed', (ctx) => emit('sub.subscribed', ctx, withChannel(subscribedDefaults)));
  sub.on('unsubscribed', (ctx) => emit('sub.unsubscribed', ctx, withChannel(codeReasonDefaults)));
  sub.on('publication', (ctx) =>
    writeLine({ ...publicationOf(ctx), channel, event: 'sub.publication' }));
  sub.on('join', (ctx) => emit('sub.join', ctx, withChannel({ info: null })));
  sub.on('leave', (ctx) => emit('sub.leave', ctx, withChannel({ info: null })));
  sub.on('error', (ctx) => emit('sub.error', ctx, withChannel({ type: null, error: null })));
}

class DriverError extends Error {
  constructor(message) {
    super(message);
    this.code = DRIVER_ERROR;
  }
}

function need(params, key, type) {
  const value = params[key];
  if (typeof value !== type) throw new DriverError(`parameter ${key} must be a ${type}`);
  return value;
}

function subscriptionFor(params) {
  const channel = need(params, 'channel', 'string');
  const sub = client.getSubscription(channel);
  if (sub === null) throw new DriverError(`no subscription for channel ${channel}`);
  return sub;
}

function subscriptionOptions(channel, given) {
  const opts = {};
  for (const key of [
    'recoverable', 'joinLeave', 'positioned', 'since', 'data', 'delta',
    'minResubscribeDelay', 'maxResubscribeDelay',
  ]) {
    if (given[key] !== undefined && given[key] !== null) opts[key] = given[key];
  }
  if (opts.data !== undefined) opts.data = encodePayload(opts.data);
  if (typeof given.token === 'string') {
    // A token-protected subscription gets a getToken so sub refresh flows work (see setSubToken).
    opts.token = given.token;
    subTokens.set(channel, given.token);
    opts.getToken = async () => {
      const token = subTokens.get(channel) ?? '';
      if (!token) throw new UnauthorizedError('');
      return token;
    };
  }
  return opts;
}

async function shutdown(code) {
  try {
    client.disconnect();
  } catch (err) {
    console.error('driver: disconnect on exit failed', err);
  }
  process.exit(code);
}

const commands = {
  connect() {
    client.connect();
    return null;
  },
  disconnect() {
    client.disconnect();
    return null;
  },
  async ready(params) {
    await client.ready(params.timeout ?? undefined);
    return null;
  },
  setToken(params) {
    currentToken = need(params, 'token', 'string');
    return null;
  },
  setSubToken(params) {
    subTokens.set(need(params, 'channel', 'string'), need(params, 'token', 'string'));
    return null;
  },
  newSubscription(params) {
    const channel = need(params, 'channel', 'string');
    const sub = client.newSubscription(channel, subscriptionOptions(channel, params.options ?? {}));
    attachSubscription(sub);
    return { channel, state: sub.state };
  },
  async subscribe(params) {
    const sub = subscriptionFor(params);
    sub.subscribe();
    // wait: true resolves only once subscribed (or fails with the SDK's error).
    if (params.wait) await sub.ready(params.timeout ?? undefined);
    return { state: sub.state };
  },
  async subReady(params) {
    const sub = subscriptionFor(params);
    await sub.ready(params.timeout ?? undefined);
    return { state: sub.state };
  },
  deltaStats(params) {
    return plain(subscriptionFor(params).deltaStats());
  },
  unsubscribe(params) {
    const sub = subscriptionFor(params);
    sub.unsubscribe();
    return { state: sub.state };
  },
  removeSubscription(params) {
    const sub = subscriptionFor(params);
    client.removeSubscription(sub);
    return null;
  },
  async publish(params) {
    return plain(await client.publish(
      need(params, 'channel', 'string'), encodePayload(params.data ?? null)));
  },
  async history(params) {
    const opts = {};
    for (const key of ['limit', 'since', 'reverse']) {
      if (params[key] !== undefined && params[key] !== null) opts[key] = params[key];
    }
    const res = await client.history(need(params, 'channel', 'string'), opts);
    return {
      publications: (res.publications ?? []).map(publicationOf),
      offset: plain(res.offset),
      epoch: plain(res.epoch),
    };
  },
  async presence(params) {
    const res = await client.presence(need(params, 'channel', 'string'));
    return { clients: plain(res.clients ?? {}) };
  },
  async presenceStats(params) {
    const res = await client.presenceStats(need(params, 'channel', 'string'));
    return { numClients: res.numClients, numUsers: res.numUsers };
  },
  async rpc(params) {
    const res = await client.rpc(
      need(params, 'method', 'string'), encodePayload(params.data ?? null));
    return { data: plain(res.data) };
  },
  async send(params) {
    await client.send(encodePayload(params.data ?? null));
    return null;
  },
  state() {
    const subs = {};
    for (const [channel, sub] of Object.entries(client.subscriptions())) subs[channel] = sub.state;
    return { client: client.state, subscriptions: subs };
  },
};

async function handle(line) {
  let msg;
  try {
    msg = JSON.parse(line);
  } catch (err) {
    writeLine({ event: 'driver.error', message: `bad command line: ${err}` });
    return;
  }
  const seq = msg.seq ?? null;
  if (msg.cmd === 'exit') {
    writeLine({ seq, ok: true, result: null });
    await shutdown(0);
    return;
  }
  const fn = Object.hasOwn(commands, msg.cmd) ? commands[msg.cmd] : undefined;
  if (fn === undefined) {
    writeLine({ seq, ok: false, error: { code: DRIVER_ERROR, message: `unknown cmd ${msg.cmd}` } });
    return;
  }
  try {
    const result = await fn(msg);
    writeLine({ seq, ok: true, result: result ?? null });
  } catch (err) {
    writeLine({ seq, ok: false, error: errorOf(err) });
  }
}

process.on('unhandledRejection', (reason) => {
  console.error('driver: unhandled rejection', reason);
  writeLine({ event: 'driver.error', message: String(reason?.message ?? reason) });
});
process.on('uncaughtException', (err) => {
  console.error('driver: uncaught exception', err);
  writeLine({ event: 'driver.error', message: String(err?.message ?? err) });
});

const input = createInterface({ input: process.stdin, crlfDelay: Infinity });
// Commands run concurrently (a pending ready() must not block a later publish).
input.on('line', (line) => {
  if (line.trim() !== '') void handle(line);
});
// The parent went away: never outlive it.
input.on('close', () => void shutdown(0));

writeLine({ event: 'driver.ready' });
