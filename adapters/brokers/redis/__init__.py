"""The Redis engine: RedisBroker and RedisPresenceManager for several nodes.

Layout: wire (bytes format), keys (sharding and key names), scripts (Lua), shards
(command clients and error mapping), listener (pub/sub per shard), broker, presence.
"""

from __future__ import annotations

from adapters.brokers.redis.broker import RedisBroker
from adapters.brokers.redis.keys import shard_index
from adapters.brokers.redis.presence import RedisPresenceManager
from adapters.brokers.redis.shards import parse_urls

__all__ = ["RedisBroker", "RedisPresenceManager", "parse_urls", "shard_index"]
