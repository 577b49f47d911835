/** The WebSocket surface centrifuge-js uses (the browser's class, or `ws` in Node). */
interface SdkSocket {
  readonly readyState: number;
  binaryType: string;
  onopen: ((ev: unknown) => void) | null;
  onmessage: ((ev: unknown) => void) | null;
  onerror: ((ev: unknown) => void) | null;
  onclose: ((ev: unknown) => void) | null;
  send(data: unknown): void;
  close(code?: number, reason?: string): void;
}
type SdkSocketClass = new (url: string, protocols?: string | string[]) => SdkSocket;

/** Runs `fn` in a later task, after every pending promise reaction. */
const nextTask: (fn: () => void) => void = (() => {
  const immediate = (globalThis as { setImmediate?: (fn: () => void) => unknown }).setImmediate;
  if (typeof immediate === 'function') return (fn: () => void) => void immediate(fn);
  if (typeof MessageChannel === 'function') {
    // Browsers: a message task is not clamped like nested zero timeouts are.
    const queue: Array<() => void> = [];
    const channel = new MessageChannel();
    channel.port1.onmessage = () => queue.shift()?.();
    return (fn: () => void) => {
      queue.push(fn);
      channel.port2.postMessage(null);
    };
  }
  return (fn: () => void) => void setTimeout(fn, 0);
})();

/**
 * A WebSocket class for the SDK whose events reach it one per task.
 *
 * centrifuge-js (5.7.4, `_dataReceived`) chains each message's handling on a
 * promise and replaces the chain before the previous message finished: two
 * messages handed to it in one task interleave their replies, so publications of
 * several frames come out of order (12 publications in 4 frames arrive as 11, 14,
 * 17, 12, 20, ...). Browsers dispatch every message as its own task, with the
 * promise reactions run in between; Node's `ws` emits all the frames of one TCP
 * read synchronously. Delivering one event per task restores the browser's order
 * everywhere; the first event of a quiet socket still goes through at once.
 */
export function orderedWebSocket(Base: unknown): SdkSocketClass {
  const Socket = Base as SdkSocketClass;
  return class OrderedSocket implements SdkSocket {
    onopen: ((ev: unknown) => void) | null = null;
    onmessage: ((ev: unknown) => void) | null = null;
    onerror: ((ev: unknown) => void) | null = null;
    onclose: ((ev: unknown) => void) | null = null;
    private readonly socket: SdkSocket;
    private readonly pending: Array<() => void> = [];
    private busy = false;
    private closing = false;

    constructor(url: string, protocols?: string | string[]) {
      this.socket = protocols === undefined ? new Socket(url) : new Socket(url, protocols);
      this.socket.onopen = (ev) => this.dispatch(() => this.onopen?.(ev));
      this.socket.onmessage = (ev) => {
        // As a browser does: nothing is received once the page called close().
        if (!this.closing) this.dispatch(() => !this.closing && this.onmessage?.(ev));
      };
      this.socket.onerror = (ev) => this.dispatch(() => this.onerror?.(ev));
      this.socket.onclose = (ev) => this.dispatch(() => this.onclose?.(ev));
    }

    get readyState(): number {
      return this.socket.readyState;
    }

    get binaryType(): string {
      return this.socket.binaryType;
    }

    set binaryType(kind: string) {
      this.socket.binaryType = kind;
    }

    send(data: unknown): void {
      this.socket.send(data);
    }

    close(code?: number, reason?: string): void {
      this.closing = true;
      this.socket.close(code, reason);
    }

    private dispatch(run: () => void): void {
      this.pending.push(run);
      if (!this.busy) this.runOne();
    }

    private runOne(): void {
      const run = this.pending.shift();
      if (run === undefined) {
        this.busy = false;
        return;
      }
      this.busy = true;
      try {
        run();
      } finally {
        nextTask(() => this.runOne());
      }
    }
  };
}
