"""centrifuge-python (the official SDK) wrapped with event recorders for tests, and
a way to break a client's connection as the network would."""

from __future__ import annotations

import asyncio
import contextlib
import dataclasses
import json
import socket
import struct
from collections.abc import Callable, Iterator
from typing import Any

from centrifuge import (
    Client,
    ClientEventHandler,
    ConnectedContext,
    ConnectingContext,
    DisconnectedContext,
    ErrorContext,
    JoinContext,
    LeaveContext,
    PublicationContext,
    ServerPublicationContext,
    ServerSubscribedContext,
    ServerUnsubscribedContext,
    SubscribedContext,
    SubscribingContext,
    Subscription,
    SubscriptionErrorContext,
    SubscriptionEventHandler,
    UnsubscribedContext,
)

from shim.centrifuge import codes
from shim.centrifuge.session import CentrifugeSession
from shim.transport.edge import SocketPump

# The wire formats every SDK-facing test runs in (see `use_codec`).
CODECS = ("json", "protobuf")
_codec = "json"


@contextlib.contextmanager
def use_codec(name: str) -> Iterator[None]:
    """Clients made by new_client in this block speak `name` ("json" or "protobuf")."""
    global _codec
    previous, _codec = _codec, name
    try:
        yield
    finally:
        _codec = previous


def current_codec() -> str:
    return _codec


_PAYLOAD_FIELDS = ("data", "conn_info", "chan_info")


def json_payloads(value: Any) -> Any:
    """What a protobuf app does with payloads it receives: its JSON bytes decoded, in
    place, in contexts and results (publications, client infos, nested ones too), so
    tests assert the same values in both codecs. JSON-mode values pass unchanged."""
    if isinstance(value, list | tuple):
        for item in value:
            json_payloads(item)
    elif isinstance(value, dict):
        for item in value.values():
            json_payloads(item)
    elif dataclasses.is_dataclass(value) and not isinstance(value, type):
        for f in dataclasses.fields(value):
            item = getattr(value, f.name)
            if f.name in _PAYLOAD_FIELDS and isinstance(item, bytes):
                setattr(value, f.name, json.loads(item) if item else None)
            else:
                json_payloads(item)
    return value


class AppClient(Client):  # type: ignore[misc]
    """centrifuge-python as an app with JSON payloads uses it in protobuf mode: it
    encodes what it sends to bytes and decodes what it gets back."""

    @staticmethod
    def _payload(data: Any) -> bytes:
        return json.dumps(data, separators=(",", ":")).encode()

    async def publish(self, channel: str, data: Any, timeout: float | None = None) -> Any:
        return await super().publish(channel, self._payload(data), timeout=timeout)

    async def rpc(self, method: str, data: Any, timeout: float | None = None) -> Any:
        return json_payloads(await super().rpc(method, self._payload(data), timeout=timeout))

    async def history(self, *args: Any, **kwargs: Any) -> Any:
        return json_payloads(await super().history(*args, **kwargs))

    async def presence(self, *args: Any, **kwargs: Any) -> Any:
        return json_payloads(await super().presence(*args, **kwargs))


class Recorder:
    """Keeps (name, ctx) of every event and lets a test wait for one."""

    def __init__(self) -> None:
        self.events: list[tuple[str, Any]] = []
        self._changed = asyncio.Event()

    def record(self, name: str, ctx: Any) -> None:
        self.events.append((name, json_payloads(ctx)))
        self._changed.set()

    def named(self, name: str) -> list[Any]:
        return [ctx for event, ctx in self.events if event == name]

    async def wait_for(
        self,
        name: str,
        predicate: Callable[[Any], bool] = lambda _ctx: True,
        *,
        timeout: float = 10.0,
        count: int = 1,
    ) -> Any:
        async def until() -> Any:
            while True:
                matches = [ctx for ctx in self.named(name) if predicate(ctx)]
                if len(matches) >= count:
                    return matches[count - 1]
                self._changed.clear()
                await self._changed.wait()

        return await asyncio.wait_for(until(), timeout)


class ClientEvents(ClientEventHandler, Recorder):  # type: ignore[misc]
    def __init__(self) -> None:
        Recorder.__init__(self)

    async def on_connecting(self, ctx: ConnectingContext) -> None:
        self.record("connecting", ctx)

    async def on_connected(self, ctx: ConnectedContext) -> None:
        self.record("connected", ctx)

    async def on_disconnected(self, ctx: DisconnectedContext) -> None:
        self.record("disconnected", ctx)

    async def on_error(self, ctx: ErrorContext) -> None:
        self.record("error", ctx)

    async def on_subscribed(self, ctx: ServerSubscribedContext) -> None:
        self.record("subscribed", ctx)

    async def on_unsubscribed(self, ctx: ServerUnsubscribedContext) -> None:
        self.record("unsubscribed", ctx)

    async def on_publication(self, ctx: ServerPublicationContext) -> None:
        self.record("publication", ctx)


class SubEvents(SubscriptionEventHandler, Recorder):  # type: ignore[misc]
    def __init__(self) -> None:
        Recorder.__init__(self)

    async def on_subscribing(self, ctx: SubscribingContext) -> None:
        self.record("subscribing", ctx)

    async def on_subscribed(self, ctx: SubscribedContext) -> None:
        self.record("subscribed", ctx)

    async def on_unsubscribed(self, ctx: UnsubscribedContext) -> None:
        self.record("unsubscribed", ctx)

    async def on_publication(self, ctx: PublicationContext) -> None:
        self.record("publication", ctx)

    async def on_join(self, ctx: JoinContext) -> None:
        self.record("join", ctx)

    async def on_leave(self, ctx: LeaveContext) -> None:
        self.record("leave", ctx)

    async def on_error(self, ctx: SubscriptionErrorContext) -> None:
        self.record("error", ctx)


def new_client(url: str, token: str = "", **options: Any) -> tuple[Client, ClientEvents]:
    events = ClientEvents()
    options.setdefault("proxy", None)
    options.setdefault("max_reconnect_delay", 0.5)
    if _codec == "protobuf":
        options.setdefault("use_protobuf", True)
        if "data" in options and not isinstance(options["data"], bytes):
            options["data"] = AppClient._payload(options["data"])
        return AppClient(url, events=events, token=token, **options), events
    client = Client(url, events=events, token=token, **options)
    return client, events


def new_subscription(
    client: Client, channel: str, **options: Any
) -> tuple[Subscription, SubEvents]:
    events = SubEvents()
    options.setdefault("max_resubscribe_delay", 0.5)
    return client.new_subscription(channel, events=events, **options), events


def drop_socket(session: CentrifugeSession) -> None:
    """Kill the TCP connection under `session` the way a network failure does: a
    reset, no WebSocket close frame, so neither side gets to say goodbye."""
    pump = session.transport
    assert isinstance(pump, SocketPump), pump
    transport = pump.direct.transport
    assert transport is not None, "no direct transport (compression negotiated?)"
    sock = transport.get_extra_info("socket")
    # Linger 0: close() sends RST at once instead of a FIN after the queued bytes.
    sock.setsockopt(socket.SOL_SOCKET, socket.SO_LINGER, struct.pack("ii", 1, 0))
    transport.abort()


# What both SDKs report for a connection that ended without a close frame.
TRANSPORT_CLOSED = (1, "transport closed")
OUTAGES = ("socket dropped", "server closes 3011")


def cut_off(session: CentrifugeSession, outage: str) -> tuple[int, str]:
    """End `session`'s connection as `outage` says; the (code, reason) its SDK reports."""
    if outage == "socket dropped":
        drop_socket(session)
        return TRANSPORT_CLOSED
    session.disconnect(codes.FORCE_RECONNECT)
    return codes.FORCE_RECONNECT.code, codes.FORCE_RECONNECT.reason
