import { RealtimeKit, type KitOptions } from './kit.js';

interface Entry {
  kit: RealtimeKit;
  users: number;
  stopTimer: ReturnType<typeof setTimeout> | null;
}

const tab = new Map<string, Entry>();
let defaults: KitOptions | null = null;

/** Options for kits acquired without any (the drop-in hook's case: set once at start). */
export function configureRealtime(options: KitOptions): void {
  defaults = options;
}

/** The tab's kit for `baseUrl` while someone holds it (for telemetry and tests). */
export function sharedKit(baseUrl = ''): RealtimeKit | null {
  return tab.get(baseUrl)?.kit ?? null;
}

/**
 * The tab's one kit for this base URL (the legacy hook opened one socket per page).
 * The last user's `release` stops it after `lingerMs`, so a page change or React's
 * double mount does not reconnect, and nothing runs once nobody holds it.
 */
export function acquireKit(options?: KitOptions, lingerMs = 1000): { kit: RealtimeKit; release: () => void } {
  const resolved = options ?? defaults;
  if (!resolved) throw new Error('realtime: call configureRealtime({getToken}) or use <RealtimeProvider>');
  const key = resolved.baseUrl ?? '';
  let entry = tab.get(key);
  if (!entry) {
    entry = { kit: new RealtimeKit(resolved), users: 0, stopTimer: null };
    tab.set(key, entry);
  }
  const held = entry;
  held.users++;
  if (held.stopTimer !== null) {
    clearTimeout(held.stopTimer);
    held.stopTimer = null;
  }
  held.kit.start();
  let released = false;
  return {
    kit: held.kit,
    release: () => {
      if (released) return;
      released = true;
      held.users--;
      if (held.users > 0) return;
      held.stopTimer = setTimeout(() => {
        held.stopTimer = null;
        if (held.users === 0 && tab.get(key) === held) {
          tab.delete(key);
          held.kit.stop();
        }
      }, lingerMs);
    },
  };
}
