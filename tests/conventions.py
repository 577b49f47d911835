"""Namespaces and a publish helper shared by the fossil delta and channel-convention
tests of both SDK suites and the wire-level delta tests."""

from __future__ import annotations

from dataclasses import replace
from typing import Any

from shim.core.config import NamespaceOptions, Settings
from tests.conftest import API_KEY, RunningServer


def with_quest_delta() -> dict[str, NamespaceOptions]:
    """The default namespaces, `quest` allowing fossil delta."""
    namespaces = dict(Settings().namespaces)
    namespaces["quest"] = replace(namespaces["quest"], allowed_delta_types=("fossil",))
    return namespaces


def centrifugo_conventions() -> dict[str, NamespaceOptions]:
    """`#` limits channels of the default namespace to the users they list; the
    `personal` namespace holds Centrifugo's personal channels."""
    namespaces = dict(Settings().namespaces)
    namespaces[""] = replace(namespaces[""], allow_user_limited_channels=True)
    namespaces["personal"] = namespaces[""]
    return namespaces


async def publish_api(server: RunningServer, channel: str, data: Any) -> None:
    """Publish through the server API, as the backend would."""
    response = await server.http.post(
        "/api/publish", json={"channel": channel, "data": data}, headers={"X-API-Key": API_KEY}
    )
    assert response.status_code == 200 and "error" not in response.json(), response.text
