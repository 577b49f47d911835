/** Exponential backoff with jitter and no hard stop: the delay before attempt `n` (0-based). */
export function backoffDelay(attempt: number, minMs: number, maxMs: number, random: () => number = Math.random): number {
  const ceiling = Math.min(maxMs, minMs * 2 ** Math.min(attempt, 30));
  // Half fixed, half random: spread without ever retrying at once.
  return Math.round(ceiling / 2 + random() * (ceiling / 2));
}
