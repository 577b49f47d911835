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

/** Several frames' payloads as one (JSON replies are newline-separated, Protobuf
 *  ones length-prefixed, so both read the same joined). */
function joined(batch: unknown[]): unknown {
  if (batch.length === 1) return batch[0];
  if (batch.every((data) => typeof data === 'string')) return batch.join('\n');
  const parts = batch.map((data) =>
    typeof data === 'string' ? new TextEncoder().encode(data) : new Uint8Array(data as ArrayBuffer),
  );
  const out = new Uint8Array(parts.reduce((size, part) => size + part.length, 0));
  let at = 0;
  for (const part of parts) {
    out.set(part, at);
    at += part.length;
  }
  return out.buffer;
}

/**
 * A WebSocket class for the SDK that hands it the frames received in one task as
 * one message.
 *
 * centrifuge-js (5.7.4, `_dataReceived`) chains each message's handling on a
 * promise and replaces the chain before the previous message finished: two
 * messages handed to it in one task interleave their replies, so publications of
 * several frames come out of order (12 publications in 4 frames arrive as 11, 14,
 * 17, 12, 20, ...). A browser dispatches every message as its own task, with the
 * promise reactions run in between; Node's `ws` emits all the frames of one TCP
 * read synchronously. Joined, they are one reply list, handled in order; a close
 * or error comes after the frames received before it.
 */
export function orderedWebSocket(Base: unknown): SdkSocketClass {
  const Socket = Base as SdkSocketClass;
  return class OrderedSocket implements SdkSocket {
    onopen: ((ev: unknown) => void) | null = null;
    onmessage: ((ev: unknown) => void) | null = null;
    onerror: ((ev: unknown) => void) | null = null;
    onclose: ((ev: unknown) => void) | null = null;
    private readonly socket: SdkSocket;
    private batch: unknown[] = [];
    private closing = false;

    constructor(url: string, protocols?: string | string[]) {
      this.socket = protocols === undefined ? new Socket(url) : new Socket(url, protocols);
      this.socket.onopen = (ev) => this.onopen?.(ev);
      this.socket.onmessage = (ev) => {
        // As a browser does: nothing is received once the page called close().
        if (this.closing) return;
        this.batch.push((ev as { data: unknown }).data);
        if (this.batch.length === 1) queueMicrotask(() => this.flush());
      };
      this.socket.onerror = (ev) => {
        this.flush();
        this.onerror?.(ev);
      };
      this.socket.onclose = (ev) => {
        this.flush();
        this.onclose?.(ev);
      };
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

    private flush(): void {
      const batch = this.batch;
      if (batch.length === 0) return;
      this.batch = [];
      if (!this.closing) this.onmessage?.({ data: joined(batch) });
    }
  };
}
