import { parseLegacyFrame, toChannelData } from './message.js';
import { Source, type SourceHooks } from './source.js';
import type { LegacyMessage } from './types.js';

/** The minimal WebSocket surface the kit uses (browser WebSocket or `ws`). */
export interface SocketLike {
  readonly readyState: number;
  onopen: ((ev: unknown) => void) | null;
  onmessage: ((ev: { data: unknown }) => void) | null;
  onclose: ((ev: { code: number; reason: string }) => void) | null;
  onerror: ((ev: unknown) => void) | null;
  send(data: string): void;
  close(code?: number, reason?: string): void;
}
export type SocketFactory = new (url: string) => SocketLike;

/** A `shim.position` notice's payload. */
interface Notice {
  channel: string;
  offset: number | null;
  epoch: string | null;
  /** Where the client's stream in `channel` stands (its personal channel). */
  start?: boolean;
  /** The offsets up to `offset` never reached the node: lost, not skipped. */
  missed?: boolean;
  /** In answers to `position`: the engine's stream top. */
  top?: number;
}

/** The close the kit makes on a stalled socket (an application code: 4000-4999). */
const STALLED: [number, string] = [4000, 'stalled: no events while the stream moved on'];

export const POSITION_TYPE = 'shim.position';
export const CUTOVER_TYPE = 'shim.cutover';

/**
 * The legacy hub connection: `subscribe_all` as the hook sent it, between two of
 * the kit's opt-in `position` actions. The first one (answered `null`: nothing is
 * subscribed yet) has the server announce every personal event from the start, so
 * none is counted as a frame of the global stream. The server answers with a `shim.position` notice:
 * every event frame before it is at or before that offset of the global channel,
 * every frame after it follows on one by one (another notice marks any jump). So
 * each frame's offset is known by counting, and the frames stay byte-identical.
 */
export class LegacySource extends Source {
  readonly protocol = 'legacy' as const;
  private readonly socket: SocketLike;
  private pending: LegacyMessage[] = [];
  private askAgain = false;
  private ended = false;
  /** Set by a notice naming another channel: where the next frame belongs. */
  private side: { channel: string; offset: number; epoch: string } | null = null;
  /** The stall check: event frames since the last check, checks found behind. */
  private framesSinceCheck = 0;
  private behindChecks = 0;
  private stallTimer: ReturnType<typeof setInterval> | null = null;

  /** `stallCheckMs`: how long a silent socket waits before it asks where the stream
   *  stands (0: never). */
  constructor(
    url: string,
    Socket: SocketFactory,
    private readonly hooks: SourceHooks,
    private readonly globalChannel = 'global',
    stallCheckMs = 0,
  ) {
    super();
    this.socket = new Socket(url);
    hooks.sockets(1);
    this.socket.onopen = () => {
      this.connected = true;
      hooks.changed();
      this.socket.send('{"action":"position"}');
      this.socket.send('{"action":"subscribe_all"}');
      this.socket.send('{"action":"position"}');
      if (stallCheckMs > 0) this.stallTimer = setInterval(() => this.checkStall(), stallCheckMs);
    };
    this.socket.onmessage = (ev) => this.frame(typeof ev.data === 'string' ? ev.data : String(ev.data));
    this.socket.onclose = (ev) => this.end(ev.code, ev.reason);
    this.socket.onerror = () => {};
  }

  override get unplaced(): number {
    return this.pending.length;
  }

  private frame(text: string): void {
    const message = parseLegacyFrame(text);
    if (message === null) return;
    if (message.type === POSITION_TYPE) {
      this.position(message.payload as unknown as Notice);
      return;
    }
    if (message.type === CUTOVER_TYPE) {
      this.hooks.notice(Number(message.payload.cutover_version));
      return;
    }
    this.framesSinceCheck++;
    if (this.side) {
      const { channel, offset, epoch } = this.side;
      this.side = null;
      this.hooks.side(channel, offset, epoch, message, toChannelData(message));
      return;
    }
    if (!this.ready) {
      this.pending.push(message);
      if (this.askAgain) {
        this.askAgain = false;
        this.socket.send('{"action":"position"}');
      }
      return;
    }
    this.queue.push({ offset: this.next++, message, data: toChannelData(message) });
    this.hooks.changed();
  }

  private position(at: Notice): void {
    if (at.channel !== this.globalChannel) {
      if (at.offset === null || at.epoch === null) return;
      if (at.start) this.hooks.sideStart(at.channel, at.offset, at.epoch);
      else this.side = { channel: at.channel, offset: at.offset + 1, epoch: at.epoch };
      return;
    }
    if (at.offset === null || at.epoch === null) {
      // The node has dispatched nothing on the stream yet: ask after the next frame.
      if (!this.ready) this.askAgain = true;
      return;
    }
    if (at.top !== undefined) this.noteTop(at.top);
    if (!this.ready) {
      // The frames already received are the ones right up to this position.
      this.from = at.offset - this.pending.length + 1;
      this.epoch = at.epoch;
      this.ready = true;
      this.next = this.from;
      for (const message of this.pending) {
        this.queue.push({ offset: this.next++, message, data: toChannelData(message) });
      }
      this.pending = [];
    } else if (at.epoch !== this.epoch || at.offset + 1 < this.next || (at.missed && at.offset >= this.next)) {
      // A new epoch, or events that never reached the node (`missed`): the stream
      // lost continuity; a new chain starts after `at`, and the kit fills the hole.
      if (at.epoch === this.epoch && at.missed) this.hooks.hole(this.next, at.offset);
      this.queue.length = 0;
      this.from = this.next = at.offset + 1;
      this.epoch = at.epoch;
    } else {
      // Positions legacy clients do not get (not ingested events): nothing to deliver.
      while (this.next <= at.offset) this.queue.push({ offset: this.next++, message: null, data: null });
    }
    this.hooks.changed();
  }

  /**
   * A socket that stays silent while events are published is stalled (its node no
   * longer gets the stream): after a silent period it asks where the stream stands;
   * an answer whose engine top is past the last frame, twice with nothing arriving
   * in between, closes it. The kit reconnects and fills the hole from history.
   */
  private checkStall(): void {
    if (!this.ready || this.ended) return;
    if (this.framesSinceCheck > 0) {
      this.framesSinceCheck = 0;
      this.behindChecks = 0;
      return;
    }
    this.socket.send('{"action":"position"}');
  }

  private noteTop(top: number): void {
    if (!this.ready || top <= this.next - 1 || this.framesSinceCheck > 0) {
      this.behindChecks = 0;
      return;
    }
    if (++this.behindChecks < 2) return;
    this.hooks.stalled();
    this.socket.close(STALLED[0], STALLED[1]);
    this.end(STALLED[0], STALLED[1]);
  }

  private end(code: number, reason: string): void {
    if (this.ended) return;
    this.ended = true;
    if (this.stallTimer !== null) clearInterval(this.stallTimer);
    this.connected = false;
    this.hooks.sockets(-1);
    this.hooks.closed(code, reason);
  }

  close(): void {
    this.retired = true;
    if (this.socket.readyState <= 1) this.socket.close(1000, 'switched');
    this.end(1000, 'switched');
  }
}
