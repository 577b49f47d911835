import { Centrifuge, type PublicationContext, type SubscribedContext, type Subscription } from 'centrifuge';
import { toLegacyMessage } from './message.js';
import { orderedWebSocket } from './ordered-socket.js';
import { Source, type Item, type SourceHooks } from './source.js';
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
 *
 * Offsets of one channel are contiguous, so a publication past the next expected
 * offset means the ones between were lost on the way: it is held, and the
 * subscription is made again from the last contiguous offset, so that recovery
 * brings the missing ones (or says history no longer has them).
 */
export class ChannelSource extends Source {
  readonly protocol = 'channels' as const;
  readonly client: Centrifuge;
  private sub: Subscription;
  private readonly channel: string;
  private ended = false;
  /** Publications past a hole, by offset, until the hole is filled. */
  private readonly ahead = new Map<number, Item>();
  private holeCheck = false;
  private resubscribing = false;
  /** Where the current subscription object was asked to recover from (null: none). */
  private subscribedSince: Position | null;
  /**
   * A position history could not recover from (the channel no longer holds what
   * follows it): the chain starts later, and no subscription from that position
   * or an earlier one can do better.
   */
  refusedFrom: Position | null = null;

  constructor(options: ChannelSourceOptions, private readonly hooks: SourceHooks) {
    super();
    const config: Record<string, unknown> = {
      getToken: options.getToken,
      minReconnectDelay: options.minReconnectDelay,
      maxReconnectDelay: options.maxReconnectDelay,
    };
    const socket = options.websocket ?? (globalThis as { WebSocket?: unknown }).WebSocket;
    if (socket) config.websocket = orderedWebSocket(socket);
    this.client = new Centrifuge(options.url, config);
    this.channel = options.channel;
    this.subscribedSince = options.since;
    this.sub = this.newSubscription(options.since);
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

  /** A subscription to the channel recovering from `since` (a fresh one: the SDK's
   *  own position is that of the last publication it emitted, not the kit's). */
  private newSubscription(since: Position | null): Subscription {
    const sub = this.client.newSubscription(this.channel, {
      recoverable: true,
      positioned: true,
      ...(since ? { since } : {}),
    });
    let first = true;
    sub.on('subscribed', (ctx: SubscribedContext) => {
      this.subscribed(ctx, first);
      first = false;
    });
    sub.on('publication', (ctx: PublicationContext) => this.publication(ctx));
    sub.on('unsubscribed', (ctx) => {
      // The server dropped the subscription for good (e.g. permission): nothing more comes.
      if (!this.retired) this.end(ctx.code, ctx.reason);
    });
    return sub;
  }

  private link(up: boolean): void {
    this.connected = up;
    this.hooks.changed();
  }

  private subscribed(ctx: SubscribedContext, first: boolean): void {
    const top = ctx.streamPosition;
    if (!top) return;
    const since = first ? this.subscribedSince : null;
    if (first && this.resubscribing) {
      this.resubscribing = false;
      if (ctx.recovered && since && top.epoch === this.epoch) {
        // Recovery brings the hole's publications next; the chain goes on.
        this.hooks.changed();
        return;
      }
    }
    if (since && ctx.recovered && top.epoch === since.epoch) {
      if (!this.ready) this.start(since.offset + 1, top.epoch);
    } else if (!this.ready || !ctx.recovered) {
      // Nothing before `top` comes through this subscription.
      const wanted = since ?? (this.ready ? { offset: this.next - 1, epoch: this.epoch } : null);
      if (wanted) this.refusedFrom = wanted;
      // Publications held past the hole that run up to the top are still delivered.
      let from = top.offset + 1;
      const held: Item[] = [];
      for (let item = this.ahead.get(from - 1); item && top.epoch === this.epoch; item = this.ahead.get(from - 1)) {
        held.unshift(item);
        from--;
      }
      this.start(from, top.epoch);
      this.queue.push(...held);
      this.next = top.offset + 1;
      if (held.length === 0) this.next = from;
    }
    this.hooks.changed();
  }

  private start(from: number, epoch: string): void {
    this.queue.length = 0;
    this.ahead.clear();
    this.from = from;
    this.next = from;
    this.epoch = epoch;
    this.ready = true;
  }

  private publication(ctx: PublicationContext): void {
    const offset = ctx.offset;
    if (!this.ready || offset === undefined || offset < this.next) return;
    const data = ctx.data as ChannelData;
    const item = { offset, message: toLegacyMessage(data, ctx.tags), data };
    if (offset > this.next) {
      this.ahead.set(offset, item);
      this.checkHole();
      return;
    }
    this.queue.push(item);
    this.next = offset + 1;
    for (let held = this.ahead.get(this.next); held; held = this.ahead.get(this.next)) {
      this.ahead.delete(this.next);
      this.queue.push(held);
      this.next++;
    }
    this.hooks.changed();
  }

  /**
   * Offsets are missing before a held publication. Once the current task is over
   * (a reordered delivery would have brought them by then), a subscription from the
   * last contiguous offset replaces the current one, and recovery fills the hole.
   */
  private checkHole(): void {
    if (this.holeCheck || this.resubscribing) return;
    this.holeCheck = true;
    setTimeout(() => {
      this.holeCheck = false;
      if (this.ended || this.retired || this.resubscribing) return;
      for (const offset of this.ahead.keys()) if (offset < this.next) this.ahead.delete(offset);
      if (this.ahead.size === 0) return;
      this.hooks.hole(this.next, Math.min(...this.ahead.keys()) - 1);
      this.resubscribing = true;
      this.sub.removeAllListeners();
      this.client.removeSubscription(this.sub);
      this.subscribedSince = { offset: this.next - 1, epoch: this.epoch };
      this.sub = this.newSubscription(this.subscribedSince);
      this.sub.subscribe();
    }, 0);
  }

  private end(code: number, reason: string): void {
    if (this.ended) return;
    this.ended = true;
    this.connected = false;
    // A subscription the server ended for good leaves the connection: close it too.
    this.sub.removeAllListeners();
    this.client.disconnect();
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
