import type { LegacyMessage, RoutingTable } from './types.js';

// Template keys that may also come from the legacy envelope's top-level fields.
const TOP_LEVEL_KEYS = new Set(['task_id', 'project_id']);

function lookup(message: LegacyMessage, key: string): string | null {
  const value = message.payload?.[key];
  if (typeof value === 'string' && value) return value;
  if (TOP_LEVEL_KEYS.has(key)) {
    const top = key === 'task_id' ? message.task_id : message.project_id;
    return top || null;
  }
  return null;
}

function fill(template: string, message: LegacyMessage): string | null {
  let missing = false;
  const channel = template.replace(/\{([^{}]+)\}/g, (_all, key: string) => {
    const value = lookup(message, key);
    if (value === null) missing = true;
    return value ?? '';
  });
  return missing ? null : channel;
}

/**
 * The channels the server publishes an event to, from the route table it serves
 * in `/api/v1/realtime/config` (the same rules as shim/core/routing.py: the longest
 * matching rule, templates filled from the payload or the top-level ids, the
 * fallback when every template lacked its key, the global channel always last).
 */
export class Router {
  private readonly exact = new Map<string, RoutingTable['routes'][number]>();
  private readonly prefixes = new Map<string, RoutingTable['routes'][number]>();

  constructor(private readonly table: RoutingTable) {
    for (const rule of table.routes) {
      (rule.match.endsWith('.') ? this.prefixes : this.exact).set(rule.match, rule);
    }
  }

  channels(message: LegacyMessage): string[] {
    const rule = this.ruleFor(message.type);
    let channels: string[];
    if (!rule) {
      channels = [this.table.default_channel];
    } else {
      channels = [];
      for (const template of rule.channels) {
        const channel = fill(template, message);
        if (channel !== null) channels.push(channel);
      }
      if (rule.fallback && channels.length === 0) channels = [rule.fallback];
    }
    const unique = [...new Set(channels.filter((c) => c !== this.table.global_channel))];
    unique.push(this.table.global_channel);
    return unique;
  }

  private ruleFor(type: string) {
    const exact = this.exact.get(type);
    if (exact) return exact;
    let end = type.lastIndexOf('.');
    while (end >= 0) {
      const rule = this.prefixes.get(type.slice(0, end + 1));
      if (rule) return rule;
      end = end === 0 ? -1 : type.lastIndexOf('.', end - 1);
    }
    return undefined;
  }
}
