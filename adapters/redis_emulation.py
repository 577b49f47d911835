"""Emulation requests that reach a node other than the one holding the client's
stream travel to that node over Redis pub/sub: each node listens on its own
channel, and PUBLISH answers how many listened, so an unknown (or dead) node is
told apart from a delivered request at once.
"""

from __future__ import annotations

import asyncio
import base64
import contextlib
import logging
import random
from collections.abc import Callable

import orjson
from redis.asyncio import Redis
from redis.asyncio.client import PubSub
from redis.exceptions import RedisError

from shim.core.broker import BrokerUnavailable

log = logging.getLogger("shim.emulation")


class RedisEmulationRelay:
    def __init__(
        self,
        redis: Redis,
        *,
        prefix: str,
        node_name: str,
        on_commands: Callable[[str, str | bytes], None],
    ) -> None:
        self.redis = redis
        self._prefix = prefix
        self._channel = self.channel_of(node_name)
        self._on_commands = on_commands
        self._task: asyncio.Task[None] | None = None

    def channel_of(self, node: str) -> str:
        return f"{self._prefix}:emulation:{node}"

    async def start(self) -> None:
        """Listening before the node serves, so no node id is handed out before
        requests for it can arrive (a Redis that is down is retried in the background)."""
        pubsub: PubSub | None = None
        try:
            pubsub = await self._subscribed()
        except (RedisError, OSError) as exc:
            log.warning("emulation relay not subscribed yet: %s", exc.__class__.__name__)
        self._task = asyncio.create_task(self._listen(pubsub), name="shim-emulation-relay")

    async def close(self) -> None:
        if self._task is not None:
            self._task.cancel()
            with contextlib.suppress(asyncio.CancelledError):
                await self._task
        await self.redis.aclose()

    async def forward(self, node: str, session: str, data: str | bytes) -> bool:
        # Text commands as they are, Protobuf ones in base64.
        body = {"session": session}
        if isinstance(data, str):
            body["data"] = data
        else:
            body["binary"] = base64.b64encode(data).decode()
        message = orjson.dumps(body)
        try:
            receivers = await self.redis.publish(self.channel_of(node), message)
        except (RedisError, OSError) as exc:
            raise BrokerUnavailable(f"emulation not forwarded: {exc.__class__.__name__}") from None
        return int(receivers) > 0

    async def _subscribed(self) -> PubSub:
        # A command first: a cluster client learns the slot map on its first command,
        # and its pub/sub needs that map.
        await self.redis.ping()
        pubsub = self.redis.pubsub()
        try:
            await pubsub.subscribe(self._channel)
        except BaseException:
            await _close(pubsub)
            raise
        return pubsub

    async def _listen(self, pubsub: PubSub | None) -> None:
        delay = 0.1
        while True:
            try:
                if pubsub is None:
                    pubsub = await self._subscribed()
                delay = 0.1
                async for message in pubsub.listen():
                    if message.get("type") == "message":
                        self._deliver(message["data"])
            except (RedisError, OSError) as exc:
                log.warning("emulation relay unavailable: %s", exc.__class__.__name__)
            finally:
                if pubsub is not None:
                    await _close(pubsub)
                pubsub = None
            await asyncio.sleep(delay + random.uniform(0, delay))
            delay = min(delay * 2, 5.0)

    def _deliver(self, raw: bytes) -> None:
        try:
            body = orjson.loads(raw)
            session = body["session"]
            data: str | bytes = body["data"] if "data" in body else base64.b64decode(body["binary"])
        except (orjson.JSONDecodeError, KeyError, TypeError, ValueError):
            log.warning("malformed relayed emulation request dropped")
            return
        if isinstance(session, str) and isinstance(data, str | bytes):
            self._on_commands(session, data)


async def _close(pubsub: PubSub) -> None:
    with contextlib.suppress(RedisError, OSError):
        await pubsub.aclose()  # type: ignore[no-untyped-call]
