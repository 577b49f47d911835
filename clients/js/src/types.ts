/** The legacy hub's message, as Dex's `useWebSocket` handlers receive it. */
export interface LegacyMessage {
  type: string;
  timestamp: string;
  payload: Record<string, unknown>;
  task_id?: string;
  project_id?: string;
}

/** A channel publication's data: the payload's fields plus `type` and `timestamp`. */
export type ChannelData = Record<string, unknown> & { type: string; timestamp: string };

export type Protocol = 'legacy' | 'channels';

/** What the legacy hook called its state; `failed` is never reached (no hard stop). */
export type ConnectionState = 'connecting' | 'connected' | 'disconnected' | 'failed';

export interface RouteRule {
  match: string;
  channels: string[];
  optional: string[];
  fallback: string;
}

export interface RoutingTable {
  global_channel: string;
  default_channel: string;
  routes: RouteRule[];
}

/** `GET /api/v1/realtime/config`. */
export interface RealtimeConfig {
  user: string;
  protocol: Protocol;
  url: string;
  mode: 'legacy' | 'dual' | 'channels';
  cutover_version: number;
  routing?: RoutingTable;
}

/** A place in the global channel's stream. */
export interface Position {
  offset: number;
  epoch: string;
}

/** One event as handed to page handlers. */
export interface Delivery {
  message: LegacyMessage;
  data: ChannelData;
  offset: number;
  epoch: string;
  /** Which connection brought it. */
  protocol: Protocol;
}

/** What the kit reports about itself (for the page's telemetry): counts since the last
 *  `takeMetrics()` (or the start). */
export interface KitMetrics {
  protocol: Protocol | null;
  state: ConnectionState;
  /** Handovers completed (the old connection closed after the new one covered it),
   *  since the last `takeMetrics()`. */
  switches: number;
  /** Duration of each completed handover, ms: flag seen to old connection closed. */
  switchMs: number[];
  /** Events handed to handlers. */
  delivered: number;
  /** Copies dropped because the other connection had already delivered them. */
  duplicatesDropped: number;
  /** Holes found inside a connection's stream (offsets it skipped), each recovered
   *  from history by subscribing again from the last offset delivered. */
  holes: number;
  /** Stream positions that neither connection could provide (history gone). */
  gaps: number;
  /** Legacy sockets closed because they stayed silent while the stream moved on. */
  stalls: number;
  skippedOffsets: number;
  /** Sockets open now and at most since the last `takeMetrics()`. */
  connections: number;
  peakConnections: number;
  reconnects: number;
}
