from __future__ import annotations

import asyncio

from tests.conftest import RunningServer
from tests.pyclient import new_client, new_subscription


async def test_python_sdk_connects_subscribes_and_receives(server: RunningServer) -> None:
    client, events = new_client(server.ws_url, server.token("alice"))
    await client.connect()
    connected = await events.wait_for("connected")
    assert connected.client
    sub, sub_events = new_subscription(client, "task:t1")
    await sub.subscribe()
    await sub_events.wait_for("subscribed")
    resp = await server.broadcast(
        {"type": "task.updated", "payload": {"task_id": "t1", "status": "running"}}
    )
    assert resp.status_code == 200, resp.text
    pub = await sub_events.wait_for("publication")
    assert pub.pub.data["type"] == "task.updated"
    await client.disconnect()
    await asyncio.sleep(0)
