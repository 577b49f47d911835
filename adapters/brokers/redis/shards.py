"""Command connections to the Redis shards, and the one place Redis errors become
BrokerUnavailable.

Clients speak RESP2 (no HELLO handshake; the scripts need Redis >= 4) and never
retry a command by themselves: a retried publish script could store a publication
twice. Every call is bounded by the socket timeouts, plus a deadline as a backstop.
"""

from __future__ import annotations

import asyncio
from collections.abc import Awaitable, Callable, Sequence
from dataclasses import dataclass
from typing import Any

from redis.asyncio import Redis
from redis.asyncio.connection import BlockingConnectionPool, ConnectionPool
from redis.asyncio.retry import Retry
from redis.backoff import NoBackoff
from redis.exceptions import NoScriptError, RedisError

from adapters.brokers.redis.keys import shard_index
from adapters.brokers.redis.scripts import Script
from shim.core.broker import BrokerUnavailable


@dataclass(slots=True, frozen=True)
class Timeouts:
    # Seconds a command may wait for Redis to answer.
    socket_seconds: float = 3.0
    # Seconds a TCP connect (and handshake) may take.
    connect_seconds: float = 2.0

    @property
    def deadline(self) -> float:
        return self.socket_seconds + self.connect_seconds


def parse_urls(urls: Sequence[str] | str) -> list[str]:
    """A list of URLs, or one comma-separated string (settings.redis_url)."""
    items = urls.split(",") if isinstance(urls, str) else list(urls)
    cleaned = [url.strip() for url in items if url.strip()]
    if not cleaned:
        raise ValueError("at least one Redis URL is needed")
    return cleaned


def make_pool(url: str, timeouts: Timeouts, max_connections: int = 1) -> ConnectionPool:
    """A pool of at most `max_connections`; a caller beyond that waits for a free one
    (up to the socket timeout) instead of failing at once."""
    return BlockingConnectionPool.from_url(
        url,
        protocol=2,
        socket_timeout=timeouts.socket_seconds,
        socket_connect_timeout=timeouts.connect_seconds,
        retry=Retry(NoBackoff(), 0),
        max_connections=max_connections,
        timeout=timeouts.socket_seconds,
    )


class Shards:
    """One command client per Redis URL; a channel always maps to the same one."""

    def __init__(self, urls: Sequence[str] | str, timeouts: Timeouts, max_connections: int) -> None:
        self.urls = parse_urls(urls)
        self.timeouts = timeouts
        self.clients = [
            Redis(connection_pool=make_pool(url, timeouts, max_connections)) for url in self.urls
        ]

    def index(self, channel: str) -> int:
        return shard_index(channel, len(self.clients))

    def client(self, channel: str) -> Redis:
        return self.clients[self.index(channel)]

    async def call(self, client: Redis, *args: Any) -> Any:
        """Run one command; BrokerUnavailable when Redis cannot answer it."""
        # redis-py leaves execute_command untyped; replies are checked by the callers.
        execute: Callable[..., Awaitable[Any]] = client.execute_command
        try:
            async with asyncio.timeout(self.timeouts.deadline):
                return await execute(*args)
        except (RedisError, OSError, TimeoutError) as error:
            raise BrokerUnavailable(f"redis: {error}") from error

    async def run(self, client: Redis, script: Script, keys: Sequence[str], *args: Any) -> Any:
        """EVALSHA, falling back to EVAL (which caches it) after a restart or flush."""
        try:
            return await self.call(client, "EVALSHA", script.sha, len(keys), *keys, *args)
        except BrokerUnavailable as error:
            if not isinstance(error.__cause__, NoScriptError):
                raise
        return await self.call(client, "EVAL", script.source, len(keys), *keys, *args)

    async def pipeline(
        self, client: Redis, commands: Sequence[tuple[Any, ...]], scripts: Sequence[Script] = ()
    ) -> list[Any]:
        """Send `commands` in one round trip and return each reply (an error reply
        is returned as its exception). A connection failure raises BrokerUnavailable
        for the lot.

        The first EVALSHA of each of `scripts` (per connection the commands go to)
        is sent as EVAL, which caches the script for the ones after it: a pipeline
        never finds a script missing part way through. Otherwise, on a Redis that
        has not cached it yet (a fresh or restarted server), another node loading it
        while Redis reads our pipeline would make our first commands fail NOSCRIPT
        and the later ones run: retried, those first ones would come after them, and
        a fenced publish would be refused as superseded, its event lost. A NOSCRIPT
        left (SCRIPT FLUSH meanwhile) is retried after loading `scripts`."""
        replies = await self._pipeline_once(client, self._loading_first(commands, scripts))
        missing = [i for i, reply in enumerate(replies) if isinstance(reply, NoScriptError)]
        if missing:
            for script in scripts:
                await self.load_script(client, script)
            retried = await self._pipeline_once(client, [commands[i] for i in missing])
            for index, reply in zip(missing, retried, strict=True):
                replies[index] = reply
        return replies

    def _loading_first(
        self, commands: Sequence[tuple[Any, ...]], scripts: Sequence[Script]
    ) -> list[tuple[Any, ...]]:
        """`commands` with the first EVALSHA of each script per connection as EVAL."""
        sources = {script.sha: script.source for script in scripts}
        loaded: set[tuple[str, object]] = set()
        sent = []
        for command in commands:
            if command[0] == "EVALSHA" and command[1] in sources:
                first = (command[1], self._connection_of(command))
                if first not in loaded:
                    loaded.add(first)
                    command = ("EVAL", sources[command[1]], *command[2:])
            sent.append(command)
        return sent

    def _connection_of(self, command: tuple[Any, ...]) -> object:
        """What decides the connection a pipelined command goes to: one per pipeline."""
        return None

    async def load_script(self, client: Redis, script: Script) -> None:
        await self.call(client, "SCRIPT", "LOAD", script.source)

    async def _pipeline_once(self, client: Redis, commands: Sequence[tuple[Any, ...]]) -> list[Any]:
        try:
            async with asyncio.timeout(self.timeouts.deadline):
                pipe = client.pipeline(transaction=False)
                for args in commands:
                    pipe.execute_command(*args)
                return list(await pipe.execute(raise_on_error=False))
        except (RedisError, OSError, TimeoutError) as error:
            raise BrokerUnavailable(f"redis: {error}") from error

    async def ping(self) -> bool:
        """True when every shard answers PING."""
        try:
            for client in self.clients:
                await self.call(client, "PING")
        except BrokerUnavailable:
            return False
        return True

    async def close(self) -> None:
        for client in self.clients:
            # The pool was passed in, so Redis would leave it open.
            await client.aclose(close_connection_pool=True)
