"""The Redis engine on a Redis Cluster (what managed Redis usually is).

Commands go through redis-py's cluster client, which routes each by the slot of its
keys and follows MOVED/ASK redirections (the command did not run); it is given no
retries, so a command whose connection broke is never sent twice (a retried publish
script could store a publication twice): it fails as BrokerUnavailable and the next
command re-reads the topology. A channel's keys share a hash tag (keys.py), so each
script touches one slot.

Pub/sub: with Redis >= 7, sharded pub/sub. The pub/sub name carries the channel's
hash tag, the publish script SPUBLISHes it on the slot's master, and the node
SSUBSCRIBEs on that master; a publication then travels inside one shard instead of
across the whole cluster bus. Older servers get classic PUBLISH/SUBSCRIBE (broadcast
to every node). Either way there is one pub/sub connection per master that owns a
wanted channel's slot. When one fails, or a master drops a subscription because its
slot moved (failover, resharding), the topology is read again and every wanted
channel is subscribed on its current owner. Publications made in between are not
replayed: subscribers see the gap by offset and recover from history, as after a
lone Redis restarts.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import random
from collections.abc import Callable, Sequence
from typing import Any, cast
from urllib.parse import urlsplit, urlunsplit

from redis.asyncio import Redis
from redis.asyncio.cluster import ClusterNode, ClusterPubSub, RedisCluster
from redis.asyncio.retry import Retry
from redis.backoff import NoBackoff
from redis.crc import key_slot
from redis.exceptions import RedisClusterException, RedisError

from adapters.brokers.redis.listener import ShardListener
from adapters.brokers.redis.scripts import Script
from adapters.brokers.redis.shards import Shards, Timeouts, make_pool, parse_urls
from shim.core.broker import BrokerUnavailable

log = logging.getLogger("adapters.brokers.redis")

# Least time between two slot-map reads caused by failed commands.
REFRESH_INTERVAL_SECONDS = 0.5
# First wait before reading the topology again after a failure; doubles to the max.
_FIRST_REMAP_DELAY_SECONDS = 0.05


def _host_port(url: str) -> tuple[str, int]:
    parts = urlsplit(url)
    return parts.hostname or "127.0.0.1", parts.port or 6379


def node_url(seed_url: str, host: str, port: int | str) -> str:
    """The seed URL's scheme and credentials with another node's address (db 0: the
    only one a cluster has)."""
    parts = urlsplit(seed_url)
    userinfo = parts.netloc.rpartition("@")[0]
    netloc = f"{userinfo}@{host}:{port}" if userinfo else f"{host}:{port}"
    return urlunsplit((parts.scheme, netloc, "/0", "", ""))


class _InitializingPubSub(ClusterPubSub):
    """redis-py's cluster pub/sub looks the channel's slot up in a slot map that only
    a first command fills: load it first, so a pub/sub can be a client's first use."""

    async def execute_command(self, *args: Any, **kwargs: Any) -> Any:
        await self.cluster.initialize()
        return await super().execute_command(*args, **kwargs)


class _ControlCluster(RedisCluster):
    def pubsub(
        self,
        node: ClusterNode | None = None,
        host: str | None = None,
        port: int | None = None,
        **kwargs: Any,
    ) -> ClusterPubSub:
        return _InitializingPubSub(self, node=node, host=host, port=port, **kwargs)


def control_client(urls: Sequence[str]) -> Redis:
    """A cluster client for the node's control state and ingest stream (plain
    commands, which may retry: none of them adds anything twice)."""
    password = urlsplit(urls[0]).password
    username = urlsplit(urls[0]).username
    cluster = _ControlCluster(
        startup_nodes=[ClusterNode(*_host_port(url)) for url in urls],
        protocol=2,
        username=username,
        password=password,
        socket_timeout=5.0,
        socket_connect_timeout=2.0,
        require_full_coverage=False,
    )
    # Duck-typed: RedisControl and StreamConsumer use commands both clients have.
    return cast(Redis, cluster)


class ClusterShards(Shards):
    """Shards' interface over one cluster client: every channel maps to "shard" 0,
    and the client spreads commands (and pipelines) over the masters by slot."""

    def __init__(self, urls: Sequence[str] | str, timeouts: Timeouts, max_connections: int) -> None:
        self.urls = parse_urls(urls)
        self.timeouts = timeouts
        password = urlsplit(self.urls[0]).password
        username = urlsplit(self.urls[0]).username
        self.cluster = RedisCluster(
            startup_nodes=[ClusterNode(*_host_port(url)) for url in self.urls],
            protocol=2,
            username=username,
            password=password,
            socket_timeout=timeouts.socket_seconds,
            socket_connect_timeout=timeouts.connect_seconds,
            retry=Retry(NoBackoff(), 0),
            max_connections=max_connections,
            # Slots of a failed master are briefly uncovered; the rest keeps working.
            require_full_coverage=False,
        )
        self.clients = [self.cluster]  # type: ignore[list-item]
        # The cluster client fails at once past its per-node connection limit; callers
        # beyond it wait here instead, as they do for a lone Redis's blocking pool.
        self._in_flight = asyncio.Semaphore(max_connections)
        self._refresh: asyncio.Task[None] | None = None
        self._refreshed_at = float("-inf")

    async def call(self, client: Any, *args: Any) -> Any:
        async with self._in_flight:
            try:
                return await super().call(client, *args)
            except RedisClusterException as error:  # e.g. a slot nobody serves
                self._refresh_soon()
                raise BrokerUnavailable(f"redis cluster: {error}") from error
            except BrokerUnavailable:
                self._refresh_soon()
                raise

    def _refresh_soon(self) -> None:
        """After a failed command, read the slot map again in the background (at most
        every REFRESH_INTERVAL_SECONDS): a crashed master's slots move to a replica,
        and pipelines would keep going to the dead address until the map says so."""
        now = asyncio.get_running_loop().time()
        if self._refresh is not None and not self._refresh.done():
            return
        if now - self._refreshed_at < REFRESH_INTERVAL_SECONDS:
            return
        self._refreshed_at = now
        self._refresh = asyncio.get_running_loop().create_task(self._refresh_topology())

    async def _refresh_topology(self) -> None:
        with contextlib.suppress(BrokerUnavailable):
            await self.topology()

    async def load_script(self, client: Any, script: Script) -> None:
        """On every master: a pipeline's scripts may run on any of them."""
        try:
            async with self._in_flight, asyncio.timeout(self.timeouts.deadline):
                await self.cluster.initialize()
                for node in self.cluster.get_primaries():
                    await node.execute_command("SCRIPT", "LOAD", script.source)
        except (RedisError, RedisClusterException, OSError, TimeoutError) as error:
            raise BrokerUnavailable(f"redis cluster: {error}") from error

    async def _pipeline_once(self, client: Any, commands: Sequence[tuple[Any, ...]]) -> list[Any]:
        async with self._in_flight:
            try:
                replies = await super()._pipeline_once(client, commands)
            except RedisClusterException as error:
                self._refresh_soon()
                raise BrokerUnavailable(f"redis cluster: {error}") from error
            except BrokerUnavailable:
                self._refresh_soon()
                raise
        if any(isinstance(reply, (RedisError, OSError)) for reply in replies):
            self._refresh_soon()
        return replies

    def index(self, channel: str) -> int:
        return 0

    def _connection_of(self, command: tuple[Any, ...]) -> object:
        # A cluster pipeline sends each command to its key's master: the first of a
        # script per slot is the first on whichever master owns that slot.
        return key_slot(str(command[3]).encode()) if len(command) > 3 else None

    def client(self, channel: str) -> Any:
        return self.cluster

    async def ping(self) -> bool:
        """True when every master answers PING."""
        try:
            async with asyncio.timeout(self.timeouts.deadline):
                await self.cluster.initialize()
                for node in self.cluster.get_primaries():
                    await node.execute_command("PING")
        except (RedisError, OSError, TimeoutError):
            return False
        return True

    async def topology(self) -> None:
        """Read the slot map again (BrokerUnavailable when no node answers)."""
        try:
            async with asyncio.timeout(self.timeouts.deadline):
                await self.cluster.initialize()
                await self.cluster.nodes_manager.initialize()
        except (RedisError, OSError, TimeoutError) as error:
            raise BrokerUnavailable(f"redis cluster: {error}") from error

    def owner(self, name: bytes) -> str:
        """host:port of the master that owns `name`'s slot now."""
        node = self.cluster.nodes_manager.get_node_from_slot(key_slot(name))
        return str(node.name)

    async def supports_sharded_pubsub(self) -> bool:
        """Redis >= 7 on the node the client talks to first."""
        await self.topology()
        try:
            async with asyncio.timeout(self.timeouts.deadline):
                info = await self.cluster.get_default_node().execute_command("INFO", "server")
        except (RedisError, OSError, TimeoutError) as error:
            raise BrokerUnavailable(f"redis cluster: {error}") from error
        version = str(info.get("redis_version", "0")) if isinstance(info, dict) else "0"
        return int(version.split(".")[0]) >= 7

    async def close(self) -> None:
        if self._refresh is not None:
            self._refresh.cancel()
            with contextlib.suppress(asyncio.CancelledError):
                await self._refresh
        await self.cluster.aclose()


class ClusterListeners:
    """One pub/sub listener per master owning a wanted name; names follow their
    slot's owner through failovers."""

    def __init__(
        self,
        shards: ClusterShards,
        on_message: Callable[[bytes, bytes], None],
        *,
        sharded: bool,
        ping_interval_seconds: float,
        max_delay_seconds: float,
    ) -> None:
        self._shards = shards
        self._on_message = on_message
        self.sharded = sharded
        self._ping_interval = ping_interval_seconds
        self._max_delay = max_delay_seconds
        self._listeners: dict[str, ShardListener] = {}
        self._names: set[bytes] = set()
        self._remap_task: asyncio.Task[None] | None = None
        self._closed = False

    @property
    def healthy(self) -> bool:
        return not self._closed and all(
            listener.healthy for listener in self._listeners.values() if listener.wanted
        )

    def _listener(self, address: str) -> ShardListener:
        listener = self._listeners.get(address)
        if listener is None:
            host, _, port = address.rpartition(":")
            url = node_url(self._shards.urls[0], host, port)
            listener = ShardListener(
                make_pool(url, self._shards.timeouts),
                self._on_message,
                name=f"redis-cluster-pubsub-{address}",
                confirm_timeout_seconds=self._shards.timeouts.deadline,
                ping_interval_seconds=self._ping_interval,
                max_delay_seconds=self._max_delay,
                sharded=self.sharded,
                on_lost=self.remap_soon,
                on_moved=lambda _name: self.remap_soon(),
            )
            self._listeners[address] = listener
            listener.start()
        return listener

    async def subscribe(self, name: bytes) -> None:
        self._names.add(name)
        try:
            await self._listener(self._shards.owner(name)).subscribe(name)
        except BaseException:
            self._names.discard(name)
            raise

    async def unsubscribe(self, name: bytes) -> None:
        self._names.discard(name)
        for listener in self._listeners.values():
            if name in listener.wanted:
                await listener.unsubscribe(name)

    def remap_soon(self) -> None:
        if self._closed or (self._remap_task is not None and not self._remap_task.done()):
            return
        self._remap_task = asyncio.get_running_loop().create_task(
            self._remap(), name="redis-cluster-remap"
        )

    async def _remap(self) -> None:
        """Read the topology until it answers, then put every wanted name on the
        listener of its slot's current owner, and drop listeners nobody needs."""
        delay = _FIRST_REMAP_DELAY_SECONDS
        while True:
            await asyncio.sleep(delay * random.uniform(0.5, 1.0))
            try:
                await self._shards.topology()
                break
            except BrokerUnavailable as error:
                log.warning("cluster topology unreadable: %s", error)
                delay = min(delay * 2, self._max_delay)
        for name in list(self._names):
            try:
                owner = self._shards.owner(name)
            except RedisError:  # slot not covered yet: a later failure remaps again
                continue
            for address, listener in self._listeners.items():
                if address != owner and name in listener.wanted:
                    await listener.unsubscribe(name)
            target = self._listener(owner)
            if name not in target.wanted:
                log.info("pub/sub %r moved to %s", name, owner)
                await target.want(name)
        for address, listener in list(self._listeners.items()):
            if not listener.wanted:
                del self._listeners[address]
                await listener.close()

    async def close(self) -> None:
        self._closed = True
        task, self._remap_task = self._remap_task, None
        if task is not None:
            task.cancel()
            with contextlib.suppress(asyncio.CancelledError):
                await task
        for listener in self._listeners.values():
            await listener.close()
        self._listeners.clear()
