// The browser test page (tests/integration/test_client_kit.py): a Dex-like page
// that uses the kit's drop-in hook and useChannel under one provider, and records
// what its handlers were given. Parameters come from the query string.
import { createElement, useEffect, useState } from 'react';
import { createRoot } from 'react-dom/client';
import { sharedKit } from '../../src/index.js';
import { RealtimeProvider, useChannel, useWebSocket } from '../../src/react.js';
import type { ChannelData, LegacyMessage } from '../../src/types.js';

const params = new URLSearchParams(location.search);
const baseUrl = params.get('shim') ?? location.origin;
const token = params.get('token') ?? '';
const channel = params.get('channel') ?? '';

interface Recorded {
  dropIn: LegacyMessage[];
  channel: ChannelData[];
  states: string[];
}
const recorded: Recorded = { dropIn: [], channel: [], states: [] };
const kitOptions = {
  baseUrl,
  configUrl: '/api/v1/realtime/config',
  getToken: async () => token,
  noticeJitterMs: Number(params.get('jitter') ?? 200),
  minReconnectDelayMs: 200,
  maxReconnectDelayMs: 2000,
};
Object.assign(window, {
  recorded,
  kitMetrics: () => sharedKit(baseUrl)?.metrics() ?? null,
});

function DropInPage() {
  // Exactly what a Dex page does with the legacy hook.
  const { subscribe, isConnected, connectionState } = useWebSocket();
  useEffect(() => subscribe((message) => recorded.dropIn.push(message)), [subscribe]);
  useEffect(() => {
    recorded.states.push(connectionState);
  }, [connectionState]);
  return createElement('p', { id: 'state', 'data-connected': String(isConnected) }, connectionState);
}

function ChannelPage() {
  const [count, setCount] = useState(0);
  useChannel(channel || null, (data) => {
    recorded.channel.push(data);
    setCount((n) => n + 1);
  });
  return createElement('p', { id: 'channel-count' }, String(count));
}

createRoot(document.getElementById('root')!).render(
  createElement(RealtimeProvider, { ...kitOptions, children: [createElement(DropInPage, { key: 'a' }), createElement(ChannelPage, { key: 'b' })] }),
);
