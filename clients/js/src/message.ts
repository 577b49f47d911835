import type { ChannelData, LegacyMessage } from './types.js';

const EVENT_OWNED = new Set(['type', 'timestamp']);

/** The flat channel shape of a legacy message (what `useChannel` handlers get). */
export function toChannelData(message: LegacyMessage): ChannelData {
  const data: Record<string, unknown> = {};
  for (const [key, value] of Object.entries(message.payload ?? {})) {
    if (!EVENT_OWNED.has(key)) data[key] = value;
  }
  data.type = message.type;
  data.timestamp = message.timestamp;
  return data as ChannelData;
}

/**
 * The legacy message of a channel publication: the data's fields back under
 * `payload`, and the top-level routing fields the server sends as publication
 * tags (the flat data does not keep them). Key order is the hub's.
 */
export function toLegacyMessage(data: ChannelData, tags?: Record<string, string> | null): LegacyMessage {
  const payload: Record<string, unknown> = {};
  for (const [key, value] of Object.entries(data)) {
    if (!EVENT_OWNED.has(key)) payload[key] = value;
  }
  const message: LegacyMessage = { type: data.type, timestamp: data.timestamp, payload };
  if (tags?.task_id) message.task_id = tags.task_id;
  if (tags?.project_id) message.project_id = tags.project_id;
  return message;
}

/** A legacy frame's text as a message, or null when it is not one. */
export function parseLegacyFrame(text: string): LegacyMessage | null {
  let value: unknown;
  try {
    value = JSON.parse(text);
  } catch {
    return null;
  }
  if (typeof value !== 'object' || value === null || Array.isArray(value)) return null;
  const message = value as LegacyMessage;
  return typeof message.type === 'string' ? message : null;
}
