export { RealtimeKit, type KitOptions } from './kit.js';
export { acquireKit, configureRealtime, sharedKit } from './shared.js';
export { Router } from './routing.js';
export { toChannelData, toLegacyMessage, parseLegacyFrame } from './message.js';
export { backoffDelay } from './backoff.js';
export { orderedWebSocket } from './ordered-socket.js';
export type {
  ChannelData,
  ConnectionState,
  Delivery,
  KitMetrics,
  LegacyMessage,
  Position,
  Protocol,
  RealtimeConfig,
  RouteRule,
  RoutingTable,
} from './types.js';
