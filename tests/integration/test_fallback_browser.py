"""centrifuge-js in headless Chromium (Debian's) on a page without WebSocket: two
clients, one given [websocket, http_stream], one [websocket, sse], fall back with the
browser's own fetch streams and EventSource, receive events routed from the
backend's broadcasts, and recover what was published while their stream was cut.
"""

from __future__ import annotations

import asyncio
import json
from typing import Any

import pytest

from tests.conftest import RunningServer, sessions_of
from tests.integration.test_console import Browser, browser_available

pytestmark = pytest.mark.js

TRANSPORTS = ("http_stream", "sse")

# Runs in the page: WebSocket gone, the vendored SDK loaded from the server, and one
# client per fallback recording what the application would see in window.__events.
PAGE_SETUP = """
(async () => {
  window.WebSocket = undefined;
  await new Promise((loaded, failed) => {
    const script = document.createElement('script');
    script.src = '/console/static/vendor/centrifuge.js';
    script.onload = loaded;
    script.onerror = () => failed(new Error('centrifuge.js not loaded'));
    document.head.appendChild(script);
  });
  window.__events = {};
  window.__clients = {};
  for (const name of %(transports)s) {
    const events = (window.__events[name] = []);
    const client = new Centrifuge(
      [
        { transport: 'websocket', endpoint: 'ws://' + location.host + '/connection/websocket' },
        { transport: name, endpoint: '/connection/' + name },
      ],
      { token: %(token)s, minReconnectDelay: 100, maxReconnectDelay: 300 },
    );
    client.on('connected', (ctx) => events.push({ event: 'connected', transport: ctx.transport }));
    client.on('connecting', (ctx) => events.push({ event: 'connecting', code: ctx.code }));
    client.on('publication', (ctx) =>
      events.push({ event: 'publication', channel: ctx.channel, data: ctx.data }));
    const sub = client.newSubscription('task:W');
    sub.on('subscribed', (ctx) => events.push({
      event: 'subscribed', recovered: ctx.recovered, wasRecovering: ctx.wasRecovering }));
    sub.on('publication', (ctx) =>
      events.push({ event: 'sub.publication', data: ctx.data, offset: ctx.offset }));
    sub.subscribe();
    client.connect();
    window.__clients[name] = client;
  }
  return typeof window.WebSocket;
})()
"""


async def events_of(browser: Browser, name: str) -> list[dict[str, Any]]:
    return list(await browser.call("evaluate", expression=f"window.__events[{name!r}]"))


async def wait_events(
    browser: Browser, name: str, event: str, count: int, timeout: float = 10.0
) -> list[dict[str, Any]]:
    deadline = asyncio.get_running_loop().time() + timeout
    while True:
        found = [e for e in await events_of(browser, name) if e["event"] == event]
        if len(found) >= count:
            return found
        assert asyncio.get_running_loop().time() < deadline, (
            name,
            event,
            await events_of(browser, name),
        )
        await asyncio.sleep(0.1)


def task_event(seq: int) -> dict[str, Any]:
    return {"type": "task.updated", "payload": {"task_id": "W", "seq": seq}}


async def test_browser_without_websocket_falls_back_and_recovers(server: RunningServer) -> None:
    assert browser_available(), "needs node, Chromium and playwright-core (make test installs them)"
    token = server.token("wes")
    async with Browser() as browser:
        assert await browser.call("goto", url=server.url + "/health") == 200
        setup = PAGE_SETUP % {"transports": json.dumps(TRANSPORTS), "token": json.dumps(token)}
        assert await browser.call("evaluate", expression=setup) == "undefined"
        for name in TRANSPORTS:
            (connected,) = await wait_events(browser, name, "connected", 1)
            assert connected["transport"] == name
            await wait_events(browser, name, "subscribed", 1)

        # Routed events: a task event to task:W, an approval to the personal channel.
        approval = {"type": "approval.required", "payload": {"user_id": "wes", "id": "a1"}}
        response = await server.broadcast([task_event(1), approval])
        assert response.status_code == 200, response.text
        for name in TRANSPORTS:
            (pub,) = await wait_events(browser, name, "sub.publication", 1)
            assert (pub["data"]["seq"], pub["offset"]) == (1, 1)
            (personal,) = await wait_events(browser, name, "publication", 1)
            assert personal["channel"] == "user:wes" and personal["data"]["id"] == "a1"

        # Both streams are cut as by a network drop; what is published meanwhile
        # arrives after the reconnect, recovered from history, in order.
        sessions = sessions_of(server, "wes")
        assert len(sessions) == 2
        for session in sessions:
            session.transport.abort()  # type: ignore[attr-defined]
        for name in TRANSPORTS:
            await wait_events(browser, name, "connecting", 1)
        response = await server.broadcast([task_event(2), task_event(3)])
        assert response.status_code == 200, response.text
        for name in TRANSPORTS:
            reconnected = await wait_events(browser, name, "connected", 2)
            assert reconnected[-1]["transport"] == name
            subscribed = await wait_events(browser, name, "subscribed", 2)
            assert subscribed[-1] == {
                "event": "subscribed",
                "recovered": True,
                "wasRecovering": True,
            }
            pubs = await wait_events(browser, name, "sub.publication", 3)
            assert [p["data"]["seq"] for p in pubs] == [1, 2, 3]
            assert [p["offset"] for p in pubs] == [1, 2, 3]
        assert not [p for p in await browser.call("problems") if "pageerror" in p]
