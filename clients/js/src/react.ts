import { createContext, createElement, useCallback, useContext, useEffect, useRef, useState, type ReactNode } from 'react';
import type { KitOptions, RealtimeKit } from './kit.js';
import { acquireKit } from './shared.js';
import type { ChannelData, ConnectionState, Delivery, LegacyMessage } from './types.js';

const KitContext = createContext<RealtimeKit | null>(null);

export interface RealtimeProviderProps extends KitOptions {
  children?: ReactNode;
}

/** Holds the tab's shared connection for everything below it. */
export function RealtimeProvider({ children, ...options }: RealtimeProviderProps) {
  const [kit, setKit] = useState<RealtimeKit | null>(null);
  const optionsRef = useRef(options);
  optionsRef.current = options;
  useEffect(() => {
    const held = acquireKit({
      ...optionsRef.current,
      getToken: () => optionsRef.current.getToken(),
    });
    setKit(held.kit);
    return held.release;
  }, [options.baseUrl]);
  return createElement(KitContext.Provider, { value: kit }, kit ? children : null);
}

/** The design doc's name for the provider. */
export const CentrifugeProvider = RealtimeProvider;

/** The provider's kit, or the tab's default one (configureRealtime) outside a provider. */
function useKit(): RealtimeKit | null {
  const provided = useContext(KitContext);
  const [own, setOwn] = useState<RealtimeKit | null>(null);
  useEffect(() => {
    if (provided) return;
    const held = acquireKit();
    setOwn(held.kit);
    return held.release;
  }, [provided]);
  return provided ?? own;
}

function useConnectionState(kit: RealtimeKit | null): ConnectionState {
  const [state, setState] = useState<ConnectionState>(kit?.state ?? 'connecting');
  useEffect(() => {
    if (!kit) return;
    setState(kit.state);
    return kit.onState(setState);
  }, [kit]);
  return state;
}

export interface UseWebSocketResult {
  isConnected: boolean;
  connectionState: ConnectionState;
  lastMessage: LegacyMessage | null;
  subscribe: (handler: (message: LegacyMessage) => void) => () => void;
  reconnect: () => void;
}

/**
 * Drop-in for Dex's `useWebSocket`: the same surface, handlers get the legacy
 * message whichever protocol the flag puts the user on.
 */
export function useWebSocket(): UseWebSocketResult {
  const kit = useKit();
  const connectionState = useConnectionState(kit);
  const [lastMessage, setLastMessage] = useState<LegacyMessage | null>(null);
  const handlers = useRef(new Set<(message: LegacyMessage) => void>());
  useEffect(() => {
    if (!kit) return;
    return kit.subscribe((delivery: Delivery) => {
      setLastMessage(delivery.message);
      for (const handler of [...handlers.current]) {
        try {
          handler(delivery.message);
        } catch (error) {
          console.error('[realtime] handler failed', error);
        }
      }
    });
  }, [kit]);
  const subscribe = useCallback((handler: (message: LegacyMessage) => void) => {
    handlers.current.add(handler);
    return () => {
      handlers.current.delete(handler);
    };
  }, []);
  const reconnect = useCallback(() => kit?.reconnect(), [kit]);
  return { isConnected: connectionState === 'connected', connectionState, lastMessage, subscribe, reconnect };
}

export interface CentrifugeContextValue {
  connected: boolean;
  subscribe: (channel: string, handler: (data: ChannelData) => void) => () => void;
}

/** The design doc's `useCentrifuge`: subscribe a handler to one channel's events. */
export function useCentrifuge(): CentrifugeContextValue {
  const kit = useKit();
  const state = useConnectionState(kit);
  const subscribe = useCallback(
    (channel: string, handler: (data: ChannelData) => void) => {
      if (!kit) return () => {};
      return kit.subscribe((delivery) => {
        if (kit.router?.channels(delivery.message).includes(channel)) handler(delivery.data);
      });
    },
    [kit],
  );
  return { connected: state === 'connected', subscribe };
}

/**
 * `useChannel(channel, handler)`: the events the server routes to `channel`, as
 * channel data (payload fields with `type` and `timestamp`), once each and in order.
 */
export function useChannel(channel: string | null, handler: (data: ChannelData) => void): void {
  const { subscribe } = useCentrifuge();
  const handlerRef = useRef(handler);
  handlerRef.current = handler;
  useEffect(() => {
    if (!channel) return;
    return subscribe(channel, (data) => handlerRef.current(data));
  }, [channel, subscribe]);
}
