"""The multi-node Broker: history streams in Redis, delivery through Redis pub/sub.

Each publish with history runs one Lua script that increments the channel's offset,
appends, trims, expires and PUBLISHes atomically, so offsets grow strictly across all
nodes and every node hears a channel's publications in offset order. Channels are
spread over the URLs by keys.shard_index; each shard has one command pool and one
pub/sub listener.
"""

from __future__ import annotations

import asyncio
import logging
from collections.abc import Sequence
from typing import Any

from adapters.brokers.memory import new_epoch
from adapters.brokers.redis import scripts, wire
from adapters.brokers.redis.cluster import ClusterListeners, ClusterShards
from adapters.brokers.redis.keys import (
    ChannelKeys,
    channel_keys,
    channel_of_sharded,
    check_prefix,
    pubsub_prefix,
)
from adapters.brokers.redis.listener import ShardListener
from adapters.brokers.redis.shards import Shards, Timeouts, make_pool
from shim.core.broker import (
    BrokerEventHandler,
    BrokerUnavailable,
    ClientInfo,
    Fence,
    HistoryResult,
    Publication,
    PublishOptions,
    StreamPosition,
    Superseded,
    UnrecoverablePosition,
)

log = logging.getLogger("adapters.brokers.redis")

# A channel never published to reads in a blank epoch named after this window of
# time (see scripts.HISTORY): reads within one window get the same position.
BLANK_WINDOW_MS = 10_000


def _publish_args(
    pubsub: str | bytes, body: bytes, options: PublishOptions, command: str
) -> tuple[object, ...]:
    """ARGV of the publish script (see scripts.PUBLISH)."""
    return (
        pubsub,
        body,
        options.history_size,
        _ms(options.history_ttl_seconds),
        _ms(options.history_meta_ttl_seconds),
        new_epoch(),
        command,
    )


def _position(reply: Any) -> StreamPosition:
    offset, epoch = reply
    return StreamPosition(int(offset), epoch.decode())


def _ms(seconds: float) -> int:
    return max(1, round(seconds * 1000)) if seconds > 0 else 0


class RedisBroker:
    def __init__(
        self,
        urls: Sequence[str] | str,
        *,
        prefix: str = "dex",
        socket_timeout_seconds: float = 3.0,
        connect_timeout_seconds: float = 2.0,
        ping_interval_seconds: float = 5.0,
        reconnect_max_delay_seconds: float = 2.0,
        max_connections_per_shard: int = 32,
        cluster: bool = False,
        sharded_pubsub: bool | None = None,
    ) -> None:
        """`urls`: redis:// URLs (or one comma-separated string), the same list in the
        same order on every node; with `cluster`, seed nodes of one Redis Cluster
        (cluster.py). `sharded_pubsub`: on a cluster, SPUBLISH/SSUBSCRIBE (None: when
        the server has them, Redis >= 7). `ping_interval_seconds`: an idle pub/sub connection
        is pinged after this long, and dropped when a second interval passes unanswered.
        `max_connections_per_shard`: command connections; more concurrent calls wait.
        """
        self._prefix = check_prefix(prefix)
        self._pubsub_prefix = pubsub_prefix(prefix)
        timeouts = Timeouts(socket_timeout_seconds, connect_timeout_seconds)
        self._cluster: ClusterShards | None = None
        self._cluster_listeners: ClusterListeners | None = None
        self._sharded_choice = sharded_pubsub
        self._ping_interval = ping_interval_seconds
        self._max_delay = reconnect_max_delay_seconds
        # SPUBLISH/SSUBSCRIBE and tagged pub/sub names (decided at start on a cluster).
        self._sharded = False
        self._publish_command = "PUBLISH"
        if cluster:
            self._cluster = ClusterShards(urls, timeouts, max_connections_per_shard)
            self._shards: Shards = self._cluster
            self._listeners: list[ShardListener] = []
        else:
            self._shards = Shards(urls, timeouts, max_connections_per_shard)
            self._listeners = self._shard_listeners(timeouts)
        self._handler: BrokerEventHandler | None = None
        self._subscribed: set[str] = set()
        self._closed = False

    def _shard_listeners(self, timeouts: Timeouts) -> list[ShardListener]:
        return [
            ShardListener(
                make_pool(url, timeouts),
                self._on_message,
                name=f"redis-pubsub-{index}",
                confirm_timeout_seconds=timeouts.deadline,
                ping_interval_seconds=self._ping_interval,
                max_delay_seconds=self._max_delay,
            )
            for index, url in enumerate(self._shards.urls)
        ]

    @property
    def healthy(self) -> bool:
        """Every shard's pub/sub connection is up and subscribed (for readiness)."""
        if self._cluster_listeners is not None:
            return not self._closed and self._cluster_listeners.healthy
        if self._cluster is not None:
            return False  # not started
        return not self._closed and all(listener.healthy for listener in self._listeners)

    async def ping(self) -> bool:
        """Every shard answers a command now."""
        return not self._closed and await self._shards.ping()

    async def start(self, handler: BrokerEventHandler) -> None:
        self._handler = handler
        if self._cluster is not None:
            sharded = self._sharded_choice
            if sharded is None:
                sharded = await self._cluster.supports_sharded_pubsub()
            self._sharded = sharded
            self._publish_command = "SPUBLISH" if sharded else "PUBLISH"
            self._cluster_listeners = ClusterListeners(
                self._cluster,
                self._on_message,
                sharded=sharded,
                ping_interval_seconds=self._ping_interval,
                max_delay_seconds=self._max_delay,
            )
        for listener in self._listeners:
            listener.start()

    def _keys(self, channel: str) -> ChannelKeys:
        return channel_keys(self._prefix, channel, sharded_pubsub=self._sharded)

    async def close(self) -> None:
        if self._closed:
            return
        self._closed = True
        self._handler = None
        self._subscribed.clear()
        for listener in self._listeners:
            await listener.close()
        if self._cluster_listeners is not None:
            await self._cluster_listeners.close()
        await self._shards.close()

    async def publish(
        self, channel: str, pub: Publication, options: PublishOptions
    ) -> StreamPosition:
        self._check_open()
        keys = self._keys(channel)
        client = self._shards.client(channel)
        body = wire.encode_body(pub)
        if options.history_size <= 0 or options.history_ttl_seconds <= 0:
            await self._shards.call(
                client, self._publish_command, keys.pubsub, wire.publication_message(body)
            )
            return StreamPosition(0, "")
        reply = await self._shards.run(
            client,
            scripts.PUBLISH,
            (keys.meta, keys.history),
            *_publish_args(keys.pubsub, body, options, self._publish_command),
        )
        return _position(reply)

    async def publish_many(
        self,
        items: Sequence[tuple[str, Publication, PublishOptions]],
        fences: Sequence[Fence | None] = (),
    ) -> list[StreamPosition | Superseded | BrokerUnavailable]:
        """One pipeline per shard (run concurrently); per channel the order holds."""
        if self._closed:
            return [BrokerUnavailable("redis broker is closed")] * len(items)
        results: list[StreamPosition | Superseded | BrokerUnavailable] = [
            BrokerUnavailable("not sent")
        ] * len(items)
        by_shard: dict[int, list[int]] = {}
        for index, (channel, _pub, _options) in enumerate(items):
            by_shard.setdefault(self._shards.index(channel), []).append(index)
        await asyncio.gather(
            *(
                self._publish_on_shard(shard, indexes, items, fences, results)
                for shard, indexes in by_shard.items()
            )
        )
        return results

    async def _publish_on_shard(
        self,
        shard: int,
        indexes: list[int],
        items: Sequence[tuple[str, Publication, PublishOptions]],
        fences: Sequence[Fence | None],
        results: list[StreamPosition | Superseded | BrokerUnavailable],
    ) -> None:
        commands = [self._command_for(*items[i], fences[i] if fences else None) for i in indexes]
        try:
            replies = await self._shards.pipeline(
                self._shards.clients[shard], commands, (scripts.PUBLISH, scripts.FENCED_PUBLISH)
            )
        except BrokerUnavailable as error:
            for index in indexes:
                results[index] = error
            return
        for index, command, reply in zip(indexes, commands, replies, strict=True):
            if isinstance(reply, Exception):
                results[index] = BrokerUnavailable(f"redis: {reply}")
            elif command[0] == self._publish_command:
                results[index] = StreamPosition(0, "")
            elif int(reply[0]) < 0:
                results[index] = Superseded()
            else:
                results[index] = _position(reply)

    def _command_for(
        self, channel: str, pub: Publication, options: PublishOptions, fence: Fence | None
    ) -> tuple[object, ...]:
        """The pipeline command publishing `pub` (behind `fence` when given)."""
        keys = self._keys(channel)
        body = wire.encode_body(pub)
        kept = options.history_size > 0 and options.history_ttl_seconds > 0
        if fence is not None:
            return (
                "EVALSHA",
                scripts.FENCED_PUBLISH.sha,
                3,
                keys.meta,
                keys.history,
                keys.fence,
                *_publish_args(keys.pubsub, body, options, self._publish_command),
                fence.source,
                *fence.position,
                _ms(fence.ttl_seconds),
                1 if kept else 0,
            )
        if not kept:
            return (self._publish_command, keys.pubsub, wire.publication_message(body))
        args = _publish_args(keys.pubsub, body, options, self._publish_command)
        return ("EVALSHA", scripts.PUBLISH.sha, 2, keys.meta, keys.history, *args)

    async def publish_join(self, channel: str, info: ClientInfo) -> None:
        await self._publish_presence(channel, True, info)

    async def publish_leave(self, channel: str, info: ClientInfo) -> None:
        await self._publish_presence(channel, False, info)

    async def _publish_presence(self, channel: str, join: bool, info: ClientInfo) -> None:
        self._check_open()
        keys = self._keys(channel)
        message = wire.presence_message(join, info)
        await self._shards.call(
            self._shards.client(channel), self._publish_command, keys.pubsub, message
        )

    async def subscribe(self, channel: str) -> None:
        self._check_open()
        self._subscribed.add(channel)
        try:
            if self._cluster_listeners is not None:
                await self._cluster_listeners.subscribe(self._keys(channel).pubsub)
            else:
                await self._listener(channel).subscribe(self._keys(channel).pubsub)
        except BaseException:
            self._subscribed.discard(channel)
            raise

    async def unsubscribe(self, channel: str) -> None:
        # Messages already on their way are dropped by the local check in _on_message.
        self._subscribed.discard(channel)
        if self._closed:
            return
        if self._cluster_listeners is not None:
            await self._cluster_listeners.unsubscribe(self._keys(channel).pubsub)
        else:
            await self._listener(channel).unsubscribe(self._keys(channel).pubsub)

    async def history(
        self,
        channel: str,
        *,
        since: StreamPosition | None = None,
        limit: int = 0,
        reverse: bool = False,
        options: PublishOptions | None = None,
    ) -> HistoryResult:
        self._check_open()
        keys = self._keys(channel)
        reply = await self._shards.run(
            self._shards.client(channel),
            scripts.HISTORY,
            (keys.meta, keys.history),
            limit,
            -1 if since is None else since.offset,
            1 if reverse else 0,
            "" if since is None else since.epoch,
            BLANK_WINDOW_MS,
        )
        position = StreamPosition(int(reply[0]), reply[1].decode())
        if since is not None and not int(reply[2]):
            raise UnrecoverablePosition(channel)
        return HistoryResult([wire.decode_history_entry(e) for e in reply[3:]], position)

    async def remove_history(self, channel: str) -> None:
        """A stream with meta starts a new epoch at offset 0 (its meta expires as it
        would have); a channel without one stays without."""
        self._check_open()
        keys = self._keys(channel)
        await self._shards.run(
            self._shards.client(channel),
            scripts.RESET_STREAM,
            (keys.meta, keys.history),
            new_epoch(),
        )

    def _listener(self, channel: str) -> ShardListener:
        return self._listeners[self._shards.index(channel)]

    def _check_open(self) -> None:
        if self._closed:
            raise BrokerUnavailable("redis broker is closed")

    def _on_message(self, name: bytes, payload: bytes) -> None:
        handler = self._handler
        if handler is None or not name.startswith(self._pubsub_prefix):
            return
        suffix = name[len(self._pubsub_prefix) :]
        channel = channel_of_sharded(suffix) if self._sharded else suffix.decode()
        if channel is None or channel not in self._subscribed:
            return
        message = wire.decode_message(payload)
        if isinstance(message, wire.PresenceMessage):
            if message.join:
                handler.on_join(channel, message.info)
            else:
                handler.on_leave(channel, message.info)
        else:
            handler.on_publication(channel, message.pub, message.epoch)
