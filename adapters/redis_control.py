"""What the nodes of one deployment share besides publications: the cutover flag
and each node's connection counts, kept in Redis.

The flag is a hash (`state` JSON, a `version` counter bumped atomically with
each change, and a random `generation` set when the hash is created) plus a pub/sub
notice, so a change made through any node's admin API reaches every node within a
moment, and a node that starts (or reconnects) reads the current one. A Redis that
restarts empty counts versions from 1 again; the new generation tells nodes that
those versions are newer than the ones they saw before. Each node writes its
counts under a key that expires, so a dead node drops out of the totals by itself.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import random
import secrets
from collections.abc import Awaitable, Callable
from typing import Any

import orjson
from redis.asyncio import Redis
from redis.exceptions import RedisError

from shim.core.broker import BrokerUnavailable
from shim.core.cutover import CutoverState

log = logging.getLogger("shim.control")

# Bumps the version and stores the state in one step, then tells every node. The
# first save into an empty Redis also fixes the generation (ARGV[3], the caller's
# random proposal); later saves keep it.
_SAVE = """
redis.call('HSETNX', KEYS[1], 'generation', ARGV[3])
local version = redis.call('HINCRBY', KEYS[1], 'version', 1)
redis.call('HSET', KEYS[1], 'state', ARGV[1])
redis.call('PUBLISH', ARGV[2], version)
return {version, redis.call('HGET', KEYS[1], 'generation')}
"""


class RedisControl:
    def __init__(
        self,
        redis: Redis,
        *,
        prefix: str,
        node_name: str,
        on_cutover: Callable[[CutoverState], None],
        counts: Callable[[], dict[str, int]],
        report_seconds: float = 5.0,
    ) -> None:
        self.redis = redis
        self.node_name = node_name
        self._on_cutover = on_cutover
        self._counts = counts
        self._report_seconds = report_seconds
        self._state_key = f"{prefix}:cutover"
        self._notice_channel = f"{prefix}:cutover:changed"
        # Server API actions on users (disconnect, unsubscribe, subscribe) for the
        # connections other nodes hold.
        self._command_channel = f"{prefix}:control"
        self.on_command: Callable[[str, dict[str, Any]], Awaitable[None]] | None = None
        self._nodes_key = f"{prefix}:nodes"
        self._node_prefix = f"{prefix}:node:"
        # (generation, version) of the state applied last; versions only compare
        # within one generation.
        self._generation = b""
        self._version = -1
        self._tasks: list[asyncio.Task[None]] = []

    async def start(self) -> None:
        with contextlib.suppress(RedisError, OSError):
            await self._load()
        self._tasks = [
            asyncio.create_task(self._listen(), name="shim-control-listen"),
            asyncio.create_task(self._report_forever(), name="shim-control-report"),
        ]

    async def close(self) -> None:
        for task in self._tasks:
            task.cancel()
        for task in self._tasks:
            with contextlib.suppress(asyncio.CancelledError):
                await task
        with contextlib.suppress(RedisError, OSError):
            await self.redis.delete(self._node_prefix + self.node_name)
            await self.redis.zrem(self._nodes_key, self.node_name)
        await self.redis.aclose()

    async def save_cutover(self, state: CutoverState) -> CutoverState:
        """Store `state` for every node; returns it with the version Redis gave it."""
        body = state.as_dict()
        body.pop("version")
        try:
            version, generation = await self.redis.eval(
                _SAVE,
                1,
                self._state_key,
                orjson.dumps(body),
                self._notice_channel,
                secrets.token_hex(8),
            )
        except (RedisError, OSError) as exc:
            raise BrokerUnavailable(f"cutover not saved: {exc.__class__.__name__}") from None
        saved = CutoverState.from_dict({**body, "version": int(version)})
        self._apply(saved, bytes(generation))
        return saved

    async def send_command(self, kind: str, body: dict[str, Any]) -> None:
        """Ask every other node to apply a server API action to its own connections."""
        message = orjson.dumps({"node": self.node_name, "kind": kind, "body": body})
        try:
            await self.redis.publish(self._command_channel, message)
        except (RedisError, OSError) as exc:
            raise BrokerUnavailable(f"control command not sent: {exc.__class__.__name__}") from None

    async def _run_command(self, raw: bytes) -> None:
        try:
            command = orjson.loads(raw)
            if command.get("node") == self.node_name or self.on_command is None:
                return  # the sender applied it already
            await self.on_command(str(command["kind"]), dict(command["body"]))
        except Exception:  # one bad command must not stop the listener
            log.exception("control command failed")

    async def nodes(self) -> dict[str, dict[str, int]]:
        """Connection counts of every live node."""
        members: list[bytes] = list(await self.redis.zrange(self._nodes_key, 0, -1))  # type: ignore[arg-type]
        names = [member.decode() for member in members]
        if not names:
            return {}
        values = await self.redis.mget([self._node_prefix + name for name in names])
        result: dict[str, dict[str, int]] = {}
        gone = []
        for name, value in zip(names, values, strict=True):
            if value is None:
                gone.append(name)
            else:
                result[name] = orjson.loads(value)
        if gone:
            await self.redis.zrem(self._nodes_key, *gone)
        return result

    async def _load(self) -> None:
        stored: Any = await self.redis.hgetall(self._state_key)
        if b"state" in stored:
            body: dict[str, Any] = orjson.loads(stored[b"state"])
            state = CutoverState.from_dict({**body, "version": int(stored[b"version"])})
            self._apply(state, stored.get(b"generation", b""))

    def _apply(self, state: CutoverState, generation: bytes) -> None:
        # Another generation means the hash was lost and made again: whatever it
        # holds now is the newest state, whatever its version.
        if generation != self._generation or state.version > self._version:
            self._generation, self._version = generation, state.version
            self._on_cutover(state)

    async def _listen(self) -> None:
        delay = 0.1
        while True:
            pubsub = self.redis.pubsub()
            try:
                await pubsub.subscribe(self._notice_channel, self._command_channel)
                await self._load()  # a change may have been missed while disconnected
                delay = 0.1
                async for message in pubsub.listen():
                    if message.get("type") != "message":
                        continue
                    if message.get("channel") == self._command_channel.encode():
                        await self._run_command(message["data"])
                    else:
                        await self._load()
            except (RedisError, OSError) as exc:
                log.warning("cutover notices unavailable: %s", exc.__class__.__name__)
            finally:
                with contextlib.suppress(RedisError, OSError):
                    await pubsub.aclose()  # type: ignore[no-untyped-call]
            await asyncio.sleep(delay + random.uniform(0, delay))
            delay = min(delay * 2, 5.0)

    async def _report_forever(self) -> None:
        while True:
            with contextlib.suppress(RedisError, OSError):
                key = self._node_prefix + self.node_name
                ttl = max(1, int(self._report_seconds * 3))
                await self.redis.set(key, orjson.dumps(self._counts()), ex=ttl)
                await self.redis.zadd(self._nodes_key, {self.node_name: 0})
            await asyncio.sleep(self._report_seconds)
