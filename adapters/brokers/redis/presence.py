"""Presence aggregated over all nodes, with expiry of entries nobody refreshes.

Each entry expires `presence_ttl_seconds` after it was last added: a node that dies
stops refreshing and its clients drop out of every read after that. A live node
repeats `add_presence` (idempotent) for its clients well within the TTL.
"""

from __future__ import annotations

from collections.abc import Sequence

from adapters.brokers.redis import scripts, wire
from adapters.brokers.redis.cluster import ClusterShards
from adapters.brokers.redis.keys import channel_keys, check_prefix
from adapters.brokers.redis.shards import Shards, Timeouts
from shim.core.broker import ClientInfo, PresenceStats


class RedisPresenceManager:
    def __init__(
        self,
        urls: Sequence[str] | str,
        *,
        prefix: str = "dex",
        presence_ttl_seconds: float = 60.0,
        socket_timeout_seconds: float = 3.0,
        connect_timeout_seconds: float = 2.0,
        max_connections_per_shard: int = 16,
        cluster: bool = False,
    ) -> None:
        """`urls`, `prefix` and `cluster` as given to RedisBroker, so a channel's
        presence lives on the shard (or in the cluster slot) of its history."""
        if presence_ttl_seconds <= 0:
            raise ValueError("presence_ttl_seconds must be positive")
        self._prefix = check_prefix(prefix)
        self._ttl_ms = max(1, round(presence_ttl_seconds * 1000))
        timeouts = Timeouts(socket_timeout_seconds, connect_timeout_seconds)
        self._shards = (
            ClusterShards(urls, timeouts, max_connections_per_shard)
            if cluster
            else Shards(urls, timeouts, max_connections_per_shard)
        )

    async def close(self) -> None:
        await self._shards.close()

    def _keys(self, channel: str) -> tuple[str, str, str]:
        keys = channel_keys(self._prefix, channel)
        return keys.presence, keys.presence_expiry, keys.presence_users

    async def add_presence(self, channel: str, client_id: str, info: ClientInfo) -> None:
        """Add or replace, and push the entry's expiry to now + TTL."""
        keys = self._keys(channel)
        await self._shards.run(
            self._shards.client(channel),
            scripts.PRESENCE_ADD,
            keys,
            client_id,
            wire.encode_info(info),
            info.user,
            self._ttl_ms,
        )

    async def remove_presence(self, channel: str, client_id: str, user: str) -> None:
        keys = self._keys(channel)
        await self._shards.run(
            self._shards.client(channel), scripts.PRESENCE_REMOVE, keys, client_id
        )

    async def presence(self, channel: str) -> dict[str, ClientInfo]:
        keys = self._keys(channel)
        flat = await self._shards.run(self._shards.client(channel), scripts.PRESENCE_GET, keys)
        return {flat[i].decode(): wire.decode_info(flat[i + 1]) for i in range(0, len(flat), 2)}

    async def presence_stats(self, channel: str) -> PresenceStats:
        keys = self._keys(channel)
        clients, users = await self._shards.run(
            self._shards.client(channel), scripts.PRESENCE_STATS, keys
        )
        return PresenceStats(num_clients=int(clients), num_users=int(users))
