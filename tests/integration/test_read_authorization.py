"""Every read authorized the same way on both protocols (issue #10, items 1-3),
against the real hypercorn server: legacy clients as the browser hook behaves
(tests/legacyclient.py), Centrifuge clients through the official SDK."""

from __future__ import annotations

import time
from typing import Any

import pytest
from websockets.exceptions import InvalidStatus

from tests.conftest import RunningServer, run_server
from tests.legacyclient import legacy_client, open_legacy, settle
from tests.pyclient import new_client

Keys = tuple[str, str]
INVALID = b'{"message":"invalid token"}\n'


def anonymous_token(server: RunningServer, **extra: Any) -> str:
    """Validly signed, with neither `sub` nor `user_id`."""
    return server.token("", **extra)


def publisher(server: RunningServer) -> Any:
    async def publish(body: Any) -> None:
        response = await server.broadcast(body)
        assert response.status_code == 200, response.text

    return publish


# --- item 2: tokens without a user id -----------------------------------------------------


async def test_token_without_user_id_is_refused_on_both_protocols(server: RunningServer) -> None:
    token = anonymous_token(server)
    # Legacy: the hub's 401 before any upgrade, as for any unusable token.
    with pytest.raises(InvalidStatus) as info:
        await open_legacy(server.port, token)
    assert (info.value.response.status_code, info.value.response.body) == (401, INVALID)
    # The same for the token in a Bearer header, and for the realtime config.
    with pytest.raises(InvalidStatus) as info:
        await open_legacy(server.port, bearer=token)
    assert info.value.response.status_code == 401
    config = await server.http.get(
        "/api/v1/realtime/config", headers={"Authorization": f"Bearer {token}"}
    )
    assert (config.status_code, config.json()) == (401, {"error": "token has no user id"})
    # The channel protocol's refusal of the same token (the official SDK).
    client, events = new_client(server.ws_url, token)
    await client.connect()
    try:
        disconnected = await events.wait_for("disconnected", timeout=5)
        assert (disconnected.code, disconnected.reason) == (101, "unauthorized")
        assert not events.named("connected")
    finally:
        await client.disconnect()
    assert server.runtime.connection_counts() == {"legacy": 0, "channels": 0}


async def test_token_without_user_id_is_served_when_anonymous_clients_are_allowed(
    signing_keys: Keys,
) -> None:
    async with run_server(signing_keys, client_anonymous=True) as server:
        token = anonymous_token(server)
        config = await server.http.get("/api/v1/realtime/config", params={"token": token})
        assert config.status_code == 200 and config.json()["user"] == ""
        async with legacy_client(server.port, token) as client:
            await settle(publisher(server), [client], "anon")
            assert not client.closed


async def test_time_claims_as_strings_are_refused_on_the_legacy_path(
    server: RunningServer,
) -> None:
    later = str(int(time.time()) + 3600)
    for claim in ("exp", "nbf", "iat"):
        token = server.token("user-1", ttl=None, **{claim: later})
        with pytest.raises(InvalidStatus) as info:
            await open_legacy(server.port, token)
        assert (info.value.response.status_code, info.value.response.body) == (401, INVALID)
