// Simulated users for the cutover rehearsal (loadtests/rehearsal.py): each runs the
// kit's core (dist/index.js) in this one Node process, as a browser tab would.
//
// Line protocol on stdin/stdout, one JSON object per line:
//   {"cmd":"start","users":[{"name","baseUrl","token"}],"options":{...KitOptions}}
//   {"cmd":"status"}            -> per-protocol counts of settled users
//   {"cmd":"metrics"}           -> switches, switch times, peak connections (new period)
//   {"cmd":"check","upTo":S}    -> lost / duplicated / out-of-order among seqs 1..S
//   {"cmd":"stop"}
// Every ingested event carries payload.seq = 1, 2, 3, ... in ingest order. Events with
// seq % 4 == 2 are personal (approval.required for users[seq % users.length]): only
// that user is to get them.
import { createInterface } from 'node:readline';
import WebSocket from 'ws';
import { RealtimeKit } from '../dist/index.js';

for (const level of ['log', 'info', 'debug', 'warn', 'error']) console[level] = (...a) => process.stderr.write(a.join(' ') + '\n');

const users = [];
globalThis.KIT_DEBUG = Boolean(process.env.REHEARSAL_STDERR);

class Received {
  constructor() {
    this.max = 0;
    // Order is per channel: the global stream, and the user's personal events.
    this.maxOf = { global: 0, personal: 0 };
    this.duplicated = 0;
    this.outOfOrder = 0;
    this.seen = new Uint8Array(1024);
  }
  add(seq) {
    if (seq >= this.seen.length) {
      const bigger = new Uint8Array(Math.max(seq + 1, this.seen.length * 2));
      bigger.set(this.seen);
      this.seen = bigger;
    }
    const stream = seq % 4 === 2 ? 'personal' : 'global';
    if (this.seen[seq]) this.duplicated++;
    else if (seq < this.maxOf[stream]) this.outOfOrder++;
    this.maxOf[stream] = Math.max(this.maxOf[stream], seq);
    this.seen[seq] = 1;
    this.max = Math.max(this.max, seq);
  }
  missing(upTo, mine) {
    let lost = 0;
    for (let seq = 1; seq <= upTo; seq++) if (!this.seen[seq] && mine(seq)) lost++;
    return lost;
  }
}

const commands = {
  start({ users: specs, options }) {
    for (const spec of specs) {
      const kit = new RealtimeKit({ ...options, baseUrl: spec.baseUrl, getToken: () => spec.token, WebSocket });
      const received = new Received();
      kit.subscribe((delivery) => {
        const seq = delivery.message.payload.seq;
        if (typeof seq === 'number') received.add(seq);
      });
      kit.start();
      users.push({ name: spec.name, kit, received });
    }
    return { users: users.length };
  },
  status() {
    const protocols = { legacy: 0, channels: 0, switching: 0 };
    const switching = [];
    for (const { name, kit } of users) {
      const m = kit.metrics();
      if (m.state === 'connected' && m.connections === 1 && m.protocol) protocols[m.protocol]++;
      else {
        protocols.switching++;
        switching.push(name);
      }
    }
    return { protocols, switching: switching.slice(0, 3), perUser: Object.fromEntries(users.map(({ name, kit }) => [name, kit.protocol])) };
  },
  metrics() {
    let switches = 0, gaps = 0, holes = 0, stalls = 0, skipped = 0, peak = 0, reconnects = 0, dropped = 0;
    const switchMs = [];
    for (const { kit } of users) {
      const m = kit.takeMetrics();
      switches += m.switches;
      gaps += m.gaps;
      holes += m.holes;
      stalls += m.stalls;
      skipped += m.skippedOffsets;
      reconnects += m.reconnects;
      dropped += m.duplicatesDropped;
      peak = Math.max(peak, m.peakConnections);
      switchMs.push(...m.switchMs);
    }
    return { switches, switchMs, gaps, holes, stalls, skipped, peakConnectionsPerUser: peak, reconnects, duplicatesDropped: dropped };
  },
  check({ upTo }) {
    let lost = 0, duplicated = 0, outOfOrder = 0, behind = 0;
    const examples = [];
    const count = users.length;
    for (const [index, { received }] of users.entries()) {
      const mine = (seq) => seq % 4 !== 2 || seq % count === index;
      const missing = received.missing(upTo, mine);
      lost += missing;
      if (missing && examples.length < 5) {
        const seqs = [];
        for (let seq = 1; seq <= upTo && seqs.length < 5; seq++) if (!received.seen[seq] && mine(seq)) seqs.push(seq);
        examples.push({ user: users[index].name, seqs });
      }
      duplicated += received.duplicated;
      outOfOrder += received.outOfOrder;
      let last = upTo;
      while (last > 0 && !mine(last)) last--;
      if (received.max < last) behind++;
    }
    return { lost, duplicated, outOfOrder, behind, examples };
  },
  inspect({ name }) {
    const user = users.find((u) => u.name === name) ?? users[0];
    const kit = user.kit;
    const sources = [...kit.sources.values()].map((s) => ({
      protocol: s.protocol, ready: s.ready, connected: s.connected, from: s.from, epoch: s.epoch, next: s.next, queued: s.queue.length,
    }));
    return { name: user.name, last: kit.last, epoch: kit.epoch, desired: kit.desired, state: kit.state, sources, max: user.received.max, metrics: kit.metrics() };
  },
  stop() {
    for (const { kit } of users) kit.stop();
    setTimeout(() => process.exit(0), 200);
    return {};
  },
};

const lines = createInterface({ input: process.stdin });
lines.on('line', (line) => {
  const { seq, cmd, ...params } = JSON.parse(line);
  let answer;
  try {
    answer = { seq, ok: true, result: commands[cmd](params) };
  } catch (error) {
    answer = { seq, ok: false, error: String(error?.stack ?? error) };
  }
  process.stdout.write(JSON.stringify(answer) + '\n');
});
lines.on('close', () => process.exit(0));
