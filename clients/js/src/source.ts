import type { ChannelData, LegacyMessage, Protocol } from './types.js';

/** One event (or a position with nothing to deliver: `message` null) at `offset`. */
export interface Item {
  offset: number;
  message: LegacyMessage | null;
  data: ChannelData | null;
}

/** What a connection tells the kit. */
export interface SourceHooks {
  /** New items were queued, or the source became ready or rebased. */
  changed(): void;
  /** The connection ended for good (the kit decides what comes next). */
  closed(code: number, reason: string): void;
  /** An event of another channel (the user's personal one): placed by its own offset. */
  side(channel: string, offset: number, epoch: string | null, message: LegacyMessage, data: ChannelData): void;
  /** Where that channel's stream stands now (before any of its events arrived). */
  sideStart(channel: string, offset: number, epoch: string): void;
  /** That channel's stream starts over (a subscription that did not recover). */
  sideReset(channel: string): void;
  /** Offsets `first`..`last` were found missing inside the stream; the source is
   *  recovering them (the kit counts it). */
  hole(first: number, last: number): void;
  /** A legacy socket stayed silent while the stream moved on: it is being closed. */
  stalled(): void;
  /** The server announced a cutover flag change. */
  notice(version: number): void;
  /** A socket opened or closed (for the connection count). */
  sockets(delta: number): void;
}

/**
 * A connection that yields the global stream as contiguous offsets from `from`
 * (once `ready`). Items are queued in offset order; the kit takes them.
 */
export abstract class Source {
  abstract readonly protocol: Protocol;
  ready = false;
  /** The socket is open (the SDK may be reconnecting underneath otherwise). */
  connected = false;
  from = 0;
  epoch = '';
  /** Set by the kit when it closes the source on purpose. */
  retired = false;
  readonly queue: Item[] = [];

  /** Events received whose offset is not known yet. */
  get unplaced(): number {
    return 0;
  }

  /** Offset of the next item this source will queue (its chain's end). */
  next = 0;

  abstract close(): void;
}
