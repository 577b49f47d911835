import { backoffDelay } from './backoff.js';
import { ChannelSource } from './channel-source.js';
import { LegacySource, type SocketFactory } from './legacy-source.js';
import { Router } from './routing.js';
import type { Item, Source, SourceHooks } from './source.js';
import type {
  ChannelData,
  ConnectionState,
  Delivery,
  KitMetrics,
  LegacyMessage,
  Protocol,
  RealtimeConfig,
} from './types.js';

export interface KitOptions {
  /** The shim's base URL, e.g. `https://dex.example.com`; defaults to the page's origin. */
  baseUrl?: string;
  /** A current token, asked for before every connection and config request. */
  getToken: () => string | Promise<string>;
  /** A WebSocket class (the browser's by default; `ws` in Node). */
  WebSocket?: unknown;
  fetch?: typeof fetch;
  /** Where to ask for the config; defaults to `${baseUrl}/api/v1/realtime/config`. */
  configUrl?: string;
  legacyPath?: string;
  channelsPath?: string;
  /** Reconnect backoff (exponential, jittered, never giving up). */
  minReconnectDelayMs?: number;
  maxReconnectDelayMs?: number;
  /** After a flag notice, the config is asked again within this many ms (spread). */
  noticeJitterMs?: number;
  /** Ask for the config this often anyway (0: never); the flag notice is the fast path. */
  configPollMs?: number;
  /** A legacy socket silent this long asks where the stream stands; one that stays
   *  behind it for two such periods is closed as stalled (0: never). */
  stallCheckMs?: number;
  /** For tests: a clock in ms. */
  now?: () => number;
}

type Handler = (delivery: Delivery) => void;
type StateHandler = (state: ConnectionState) => void;

const RETIRED_CODE = 4410;

/**
 * One realtime connection for a tab, following the cutover flag.
 *
 * It asks `/api/v1/realtime/config` which protocol to use and carries the global
 * stream over it. When the answer changes it opens the new connection, and closes
 * the old one only once the new one provides every position after the last one
 * handed to the page: until then both run and each event goes to the handlers
 * once, in stream order, from whichever connection brings it first
 * (docs/client-kit.md).
 */
export class RealtimeKit {
  config: RealtimeConfig | null = null;
  router: Router | null = null;
  state: ConnectionState = 'disconnected';
  private readonly options: Required<Omit<KitOptions, 'WebSocket' | 'fetch' | 'baseUrl'>> & {
    baseUrl: string;
  };
  private readonly socketClass: unknown;
  private readonly fetcher: typeof fetch;
  private readonly handlers = new Set<Handler>();
  private readonly stateHandlers = new Set<StateHandler>();
  private readonly sources = new Map<Protocol, Source>();
  private readonly opening = new Set<Protocol>();
  private desired: Protocol | null = null;
  private last: number | null = null;
  private epoch: string | null = null;
  private switchStarted: number | null = null;
  private attempt = 0;
  private running = false;
  private refreshing: Promise<void> | null = null;
  private refreshAgain = false;
  private retryTimer: ReturnType<typeof setTimeout> | null = null;
  private noticeTimer: ReturnType<typeof setTimeout> | null = null;
  private pollTimer: ReturnType<typeof setInterval> | null = null;
  /** Channel subscriptions opened to fill the current hole, and when the next may be. */
  private fillAttempts = 0;
  private fillAfter = 0;
  private fillTimer: ReturnType<typeof setTimeout> | null = null;
  private readonly sideLast = new Map<string, { offset: number; epoch: string | null }>();
  private readonly counts: KitMetrics = {
    protocol: null,
    state: 'disconnected',
    switches: 0,
    switchMs: [],
    delivered: 0,
    duplicatesDropped: 0,
    holes: 0,
    gaps: 0,
    stalls: 0,
    skippedOffsets: 0,
    connections: 0,
    peakConnections: 0,
    reconnects: 0,
  };

  constructor(options: KitOptions) {
    const origin = (globalThis as { location?: { origin?: string } }).location?.origin ?? '';
    this.options = {
      baseUrl: (options.baseUrl ?? origin).replace(/\/$/, ''),
      getToken: options.getToken,
      configUrl: options.configUrl ?? `${(options.baseUrl ?? origin).replace(/\/$/, '')}/api/v1/realtime/config`,
      legacyPath: options.legacyPath ?? '/api/v1/ws',
      channelsPath: options.channelsPath ?? '/connection/websocket',
      minReconnectDelayMs: options.minReconnectDelayMs ?? 500,
      maxReconnectDelayMs: options.maxReconnectDelayMs ?? 20_000,
      noticeJitterMs: options.noticeJitterMs ?? 5_000,
      configPollMs: options.configPollMs ?? 120_000,
      stallCheckMs: options.stallCheckMs ?? 15_000,
      now: options.now ?? (() => Date.now()),
    };
    this.socketClass = options.WebSocket ?? (globalThis as { WebSocket?: unknown }).WebSocket;
    this.fetcher = options.fetch ?? globalThis.fetch.bind(globalThis);
  }

  // -- public surface ------------------------------------------------------------

  /** Receive every event once, in stream order; returns the unsubscribe function. */
  subscribe(handler: Handler): () => void {
    this.handlers.add(handler);
    return () => this.handlers.delete(handler);
  }

  onState(handler: StateHandler): () => void {
    this.stateHandlers.add(handler);
    return () => this.stateHandlers.delete(handler);
  }

  get protocol(): Protocol | null {
    return this.desired;
  }

  /** The last stream position handed to the handlers. */
  get position(): { offset: number; epoch: string } | null {
    return this.last === null || this.epoch === null ? null : { offset: this.last, epoch: this.epoch };
  }

  start(): void {
    if (this.running) return;
    this.running = true;
    this.setState('connecting');
    void this.refresh();
    const every = this.options.configPollMs;
    if (every > 0) this.pollTimer = setInterval(() => void this.refresh(), every * (0.8 + 0.4 * Math.random()));
  }

  /** Close everything; nothing reconnects afterwards (the hook's leaked reconnect). */
  stop(): void {
    this.running = false;
    for (const timer of [this.retryTimer, this.noticeTimer, this.fillTimer]) if (timer !== null) clearTimeout(timer);
    if (this.pollTimer !== null) clearInterval(this.pollTimer);
    this.retryTimer = this.noticeTimer = this.pollTimer = this.fillTimer = null;
    for (const source of [...this.sources.values()]) source.close();
    this.sources.clear();
    this.setState('disconnected');
  }

  /** Reconnect now (the hook's manual reconnect): backoff starts over. */
  reconnect(): void {
    if (!this.running) {
      this.start();
      return;
    }
    if (this.retryTimer !== null) clearTimeout(this.retryTimer);
    this.retryTimer = null;
    this.attempt = 0;
    void this.refresh();
  }

  metrics(): KitMetrics {
    return { ...this.counts, switchMs: [...this.counts.switchMs], protocol: this.desired, state: this.state };
  }

  /** The metrics, then start a new period: every counter and the peak start over. */
  takeMetrics(): KitMetrics {
    const snapshot = this.metrics();
    Object.assign(this.counts, {
      switches: 0,
      switchMs: [],
      delivered: 0,
      duplicatesDropped: 0,
      holes: 0,
      gaps: 0,
      stalls: 0,
      skippedOffsets: 0,
      reconnects: 0,
      peakConnections: this.counts.connections,
    });
    return snapshot;
  }

  // -- config --------------------------------------------------------------------

  async refresh(): Promise<void> {
    if (this.refreshing) {
      this.refreshAgain = true;
      return this.refreshing;
    }
    this.refreshing = this.fetchConfig().finally(() => {
      this.refreshing = null;
      if (this.refreshAgain) {
        this.refreshAgain = false;
        void this.refresh();
      }
    });
    return this.refreshing;
  }

  private async fetchConfig(): Promise<void> {
    let config: RealtimeConfig;
    try {
      const token = await this.options.getToken();
      const response = await this.fetcher(this.options.configUrl, {
        headers: { Authorization: `Bearer ${token}` },
      });
      if (!response.ok) throw new Error(`realtime config: HTTP ${response.status}`);
      config = (await response.json()) as RealtimeConfig;
    } catch {
      if (this.running && !this.sources.has(this.desired ?? 'legacy')) this.scheduleRetry();
      return;
    }
    if (this.running) this.apply(config);
  }

  private apply(config: RealtimeConfig): void {
    this.config = config;
    if (config.routing) this.router = new Router(config.routing);
    if (config.protocol !== this.desired) {
      if (this.desired !== null && this.last !== null) this.switchStarted = this.options.now();
      this.desired = config.protocol;
      this.fillAttempts = 0;
      this.fillAfter = 0;
    }
    void this.open(config.protocol);
    this.settle();
  }

  private notice(version: number): void {
    // Any other version is news: a restarted node on the memory engine counts from 0 again.
    if (this.noticeTimer !== null || (this.config && version === this.config.cutover_version)) return;
    this.noticeTimer = setTimeout(() => {
      this.noticeTimer = null;
      void this.refresh();
    }, Math.random() * this.options.noticeJitterMs);
  }

  private scheduleRetry(): void {
    if (!this.running || this.retryTimer !== null) return;
    const delay = backoffDelay(this.attempt++, this.options.minReconnectDelayMs, this.options.maxReconnectDelayMs);
    this.counts.reconnects++;
    this.retryTimer = setTimeout(() => {
      this.retryTimer = null;
      void this.refresh();
    }, delay);
  }

  // -- connections ---------------------------------------------------------------

  private async open(protocol: Protocol): Promise<void> {
    if (this.sources.has(protocol) || this.opening.has(protocol)) return;
    this.opening.add(protocol);
    let token: string;
    try {
      token = await this.options.getToken();
    } catch {
      this.opening.delete(protocol);
      this.scheduleRetry();
      return;
    }
    if (!this.running || this.sources.has(protocol)) {
      this.opening.delete(protocol);
      return;
    }
    const wsBase = this.options.baseUrl.replace(/^http/, 'ws');
    let source: Source | null = null;
    const hooks: SourceHooks = {
      changed: () => this.settle(),
      closed: (code) => source && this.closed(source, code),
      notice: (version) => this.notice(version),
      hole: () => this.counts.holes++,
      stalled: () => this.counts.stalls++,
      sideReset: (channel) => this.sideLast.delete(channel),
      sideStart: (channel, offset, epoch) => {
        if (!this.sideLast.has(channel)) this.sideLast.set(channel, { offset, epoch });
      },
      side: (channel, offset, epoch, message, data) =>
        source && this.side(source.protocol, channel, offset, epoch, message, data),
      sockets: (delta) => this.sockets(delta),
    };
    if (protocol === 'legacy') {
      const url = `${wsBase}${this.options.legacyPath}?token=${encodeURIComponent(token)}`;
      const globalChannel = this.config?.routing?.global_channel ?? 'global';
      source = new LegacySource(
        url,
        this.socketClass as SocketFactory,
        hooks,
        globalChannel,
        this.options.stallCheckMs,
      );
    } else {
      source = new ChannelSource(
        {
          url: `${wsBase}${this.options.channelsPath}`,
          channel: this.config?.routing?.global_channel ?? 'global',
          getToken: async () => await this.options.getToken(),
          since: this.position,
          serverSubs: this.sidePositions(),
          websocket: this.socketClass,
          minReconnectDelay: this.options.minReconnectDelayMs,
          maxReconnectDelay: this.options.maxReconnectDelayMs,
        },
        hooks,
      );
    }
    // Still "opening" until registered: the SDK reports its first state change from
    // inside the constructor, and the kit must not take the hole for unfillable.
    this.sources.set(protocol, source);
    this.opening.delete(protocol);
    this.settle();
  }

  private closed(source: Source, code: number): void {
    if (this.sources.get(source.protocol) !== source) return;
    this.sources.delete(source.protocol);
    if (!source.retired && this.running) {
      if (code === RETIRED_CODE) void this.refresh();
      else if (source.protocol === this.desired) this.scheduleRetry();
    }
    this.settle();
  }

  private sockets(delta: number): void {
    this.counts.connections += delta;
    this.counts.peakConnections = Math.max(this.counts.peakConnections, this.counts.connections);
  }

  // -- the handover --------------------------------------------------------------

  /** Deliver what can be delivered, then decide which connections stay. */
  private settle(): void {
    if (!this.running) return;
    const target = this.desired === null ? undefined : this.sources.get(this.desired);
    if (target?.ready) {
      const waiting = [...this.sources.values()].some((s) => s !== target && s.unplaced > 0);
      if (this.last === null && waiting) {
        // Another connection holds events it cannot place yet: they may come first.
        this.updateState();
        return;
      }
      if (this.last === null) {
        this.last = target.from - 1;
        this.epoch = target.epoch;
      } else if (this.epoch !== target.epoch) {
        // The stream lost continuity (a new epoch: history lost, e.g. a restarted node
        // on the memory engine). The new epoch's history may still hold its start.
        this.last = 0;
        this.epoch = target.epoch;
        this.fillAttempts = 0;
        this.fillAfter = 0;
        this.sideLast.clear();
      }
    }
    this.pump();
    if (!target?.ready || this.last === null) {
      this.updateState();
      return;
    }
    if (target.from > this.last + 1 && !this.fillable(target)) {
      if (this.config?.mode !== 'legacy' && !this.refused()) {
        // Recover the hole from channel history (the legacy protocol has none).
        this.fill();
        this.updateState();
        return;
      }
      this.counts.gaps++;
      this.counts.skippedOffsets += target.from - 1 - this.last;
      this.last = target.from - 1;
      this.pump();
    }
    if (target.from <= this.last + 1) {
      // The target provides every position from here on: the others can go.
      for (const source of [...this.sources.values()]) {
        if (source === target) continue;
        this.sources.delete(source.protocol);
        source.close();
      }
      this.fillAttempts = 0;
      this.fillAfter = 0;
      if (this.switchStarted !== null) {
        this.counts.switches++;
        this.counts.switchMs.push(this.options.now() - this.switchStarted);
        this.switchStarted = null;
      }
      this.updateState();
      return;
    }
    this.updateState();
  }

  /**
   * A channel subscription from the last position delivered, to recover the hole
   * from history: beside the legacy socket, or instead of a channel subscription
   * that started later. A hole is filled as often as it takes: an attempt that
   * ended without an answer (the connection failed) is followed by another, with
   * backoff; only history's answer that it no longer holds the hole ends it.
   */
  private fill(): void {
    const wait = this.fillAfter - this.options.now();
    if (wait > 0) {
      if (this.fillTimer === null) {
        this.fillTimer = setTimeout(() => {
          this.fillTimer = null;
          this.settle();
        }, wait);
      }
      return;
    }
    this.fillAfter =
      this.options.now() +
      backoffDelay(this.fillAttempts++, this.options.minReconnectDelayMs, this.options.maxReconnectDelayMs);
    const channels = this.sources.get('channels');
    if (channels) {
      // It started after the hole (or was refused from an older position): replace it.
      this.sources.delete('channels');
      channels.close();
    }
    void this.open('channels');
  }

  /** History said it no longer holds the position after the last one delivered. */
  private refused(): boolean {
    const channels = this.sources.get('channels');
    const refused = channels instanceof ChannelSource ? channels.refusedFrom : null;
    return refused !== null && refused.epoch === this.epoch && refused.offset >= (this.last ?? 0);
  }

  /** Another connection may still bring the position after the last one delivered. */
  private fillable(target: Source): boolean {
    const wanted = (this.last ?? 0) + 1;
    for (const source of this.sources.values()) {
      if (source === target) continue;
      if (!source.ready) return true;
      if (source.epoch === this.epoch && source.from <= wanted) return true;
    }
    return this.opening.size > 0;
  }

  private pump(): void {
    if (this.last === null) return;
    let progressed = true;
    while (progressed) {
      progressed = false;
      for (const source of this.sources.values()) {
        if (!source.ready || source.epoch !== this.epoch) continue;
        const queue = source.queue;
        while (queue.length && queue[0].offset <= this.last) {
          if (queue.shift()?.message) this.counts.duplicatesDropped++;
        }
        if (queue.length && queue[0].offset === this.last + 1) {
          const item = queue.shift() as Item;
          this.last = item.offset;
          progressed = true;
          if (item.message && item.data) this.deliver(item, source.protocol);
        }
      }
    }
  }

  /**
   * An event of a channel outside the global stream (personal events): delivered
   * unless that channel's stream already passed its offset. Both connections carry
   * it during a handover, so copies are dropped; it is not used to decide handovers.
   */
  private side(
    protocol: Protocol,
    channel: string,
    offset: number,
    epoch: string | null,
    message: LegacyMessage,
    data: ChannelData,
  ): void {
    const seen = this.sideLast.get(channel);
    const sameEpoch = !seen || epoch === null || seen.epoch === null || seen.epoch === epoch;
    if (seen && sameEpoch && offset <= seen.offset) {
      this.counts.duplicatesDropped++;
      return;
    }
    this.sideLast.set(channel, { offset, epoch: epoch ?? seen?.epoch ?? null });
    this.deliver({ offset, message, data }, protocol);
  }

  private sidePositions(): Map<string, { offset: number; epoch: string }> {
    const positions = new Map<string, { offset: number; epoch: string }>();
    for (const [channel, seen] of this.sideLast) {
      if (seen.epoch !== null) positions.set(channel, { offset: seen.offset, epoch: seen.epoch });
    }
    return positions;
  }

  private deliver(item: Item, protocol: Protocol): void {
    this.counts.delivered++;
    const delivery: Delivery = {
      message: item.message!,
      data: item.data!,
      offset: item.offset,
      epoch: this.epoch ?? '',
      protocol,
    };
    for (const handler of [...this.handlers]) {
      try {
        handler(delivery);
      } catch (error) {
        console.error('[realtime] handler failed', error);
      }
    }
  }

  /** Connected while any connection is up (one of them delivers during a handover). */
  private updateState(): void {
    const target = this.desired === null ? undefined : this.sources.get(this.desired);
    if (target?.connected) this.attempt = 0;
    const up = [...this.sources.values()].some((s) => s.connected);
    this.setState(up ? 'connected' : this.running ? 'connecting' : 'disconnected');
  }

  private setState(state: ConnectionState): void {
    if (state === this.state) return;
    this.state = state;
    for (const handler of [...this.stateHandlers]) handler(state);
  }
}
