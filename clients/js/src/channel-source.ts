import { Centrifuge, type PublicationContext, type SubscribedContext, type Subscription } from 'centrifuge';
import { toLegacyMessage } from './message.js';
import { Source, type SourceHooks } from './source.js';
import type { ChannelData, Position } from './types.js';

export interface ChannelSourceOptions {
  url: string;
  channel: string;
  getToken: () => Promise<string>;
  /** Recover from here (the last position handed to the page), if known. */
  since: Position | null;
  websocket?: unknown;
  /** Positions the tab has in channels the server subscribes it to (its personal one). */
  serverSubs?: Map<string, Position>;
  minReconnectDelay: number;
  maxReconnectDelay: number;
}

/**
 * The channel protocol through the official SDK: one recoverable subscription to
 * the global channel, started from the kit's position so that history fills what
 * came between (the SDK itself recovers across its reconnects).
 */
export class ChannelSource extends Source {
  readonly protocol = 'channels' as const;
  readonly client: Centrifuge;
  private readonly sub: Subscription;
  private ended = false;
  private subscribedOnce = false;

  constructor(options: ChannelSourceOptions, private readonly hooks: SourceHooks) {
    super();
    const config: Record<string, unknown> = {
      getToken: options.getToken,
      minReconnectDelay: options.minReconnectDelay,
      maxReconnectDelay: options.maxReconnectDelay,
    };
    if (options.websocket) config.websocket = options.websocket;
    this.client = new Centrifuge(options.url, config);
    this.sub = this.client.newSubscription(options.channel, {
      recoverable: true,
      positioned: true,
      ...(options.since ? { since: options.since } : {}),
    });
    const since = options.since;
    this.sub.on('subscribed', (ctx: SubscribedContext) => this.subscribed(ctx, since));
    this.sub.on('publication', (ctx: PublicationContext) => this.publication(ctx));
    this.client.on('connecting', () => this.link(false));
    this.client.on('connected', () => this.link(true));
    this.client.on('disconnected', (ctx) => this.end(ctx.code, ctx.reason));
    // Server-side subscriptions (the user's personal channel) arrive on the client.
    const epochs = new Map<string, string>();
    this.client.on('subscribed', (ctx) => {
      if (!ctx.recovered) this.hooks.sideReset(ctx.channel);
      if (ctx.streamPosition) {
        epochs.set(ctx.channel, ctx.streamPosition.epoch);
        this.hooks.sideStart(ctx.channel, ctx.streamPosition.offset, ctx.streamPosition.epoch);
      }
    });
    this.client.on('publication', (ctx) => {
      if (ctx.offset === undefined) return;
      const data = ctx.data as ChannelData;
      this.hooks.side(ctx.channel, ctx.offset, epochs.get(ctx.channel) ?? null, toLegacyMessage(data, ctx.tags), data);
    });
    this.client.on('message', (ctx) => {
      const version = (ctx.data as { cutover_version?: unknown } | null)?.cutover_version;
      if (typeof version === 'number') this.hooks.notice(version);
    });
    this.sub.on('unsubscribed', (ctx) => {
      // The server dropped the subscription for good (e.g. permission): nothing more comes.
      if (!this.retired) this.end(ctx.code, ctx.reason);
    });
    // One connection from the dial to the end, across the SDK's own reconnects.
    hooks.sockets(1);
    this.recoverServerSubs(options.serverSubs);
    this.sub.subscribe();
    this.client.connect();
  }

  /**
   * The SDK recovers server-side subscriptions across its own reconnects from the
   * positions it keeps for them, and sends those in its connect command. A new client
   * (a handover, a hole to fill) is given the positions the tab already has, so the
   * server recovers what the personal channel published meanwhile. That table is the
   * SDK's internal state (the pinned version's shape): without it there is no
   * recovery of personal events, as for any new client.
   */
  private recoverServerSubs(positions: Map<string, Position> | undefined): void {
    type Known = Record<string, { offset: number; epoch: string; recoverable: boolean }>;
    const known = (this.client as unknown as { _serverSubs?: Known })._serverSubs;
    if (!positions || typeof known !== 'object' || known === null) return;
    for (const [channel, position] of positions) {
      known[channel] = { offset: position.offset, epoch: position.epoch, recoverable: true };
    }
  }

  private link(up: boolean): void {
    this.connected = up;
    this.hooks.changed();
  }

  private subscribed(ctx: SubscribedContext, since: Position | null): void {
    const top = ctx.streamPosition;
    if (!top) return;
    const first = !this.subscribedOnce;
    this.subscribedOnce = true;
    if (first && since && ctx.recovered && top.epoch === since.epoch) {
      this.start(since.offset + 1, top.epoch);
    } else if (first || !ctx.recovered) {
      // Nothing before `top` comes through this subscription.
      this.start(top.offset + 1, top.epoch);
    }
    this.hooks.changed();
  }

  private start(from: number, epoch: string): void {
    this.queue.length = 0;
    this.from = from;
    this.next = from;
    this.epoch = epoch;
    this.ready = true;
  }

  private publication(ctx: PublicationContext): void {
    const offset = ctx.offset;
    if (!this.ready || offset === undefined || offset < this.next) return;
    const data = ctx.data as ChannelData;
    // Offsets the channel skipped (none expected) carry nothing to deliver.
    while (this.next < offset) this.queue.push({ offset: this.next++, message: null, data: null });
    this.queue.push({ offset, message: toLegacyMessage(data, ctx.tags), data });
    this.next = offset + 1;
    this.hooks.changed();
  }

  private end(code: number, reason: string): void {
    if (this.ended) return;
    this.ended = true;
    this.connected = false;
    this.hooks.sockets(-1);
    this.hooks.closed(code, reason);
  }

  close(): void {
    this.retired = true;
    this.sub.removeAllListeners();
    this.client.disconnect();
    this.end(0, 'switched');
  }
}
