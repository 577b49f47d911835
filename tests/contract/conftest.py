"""The `engine` fixture, parametrized over engine factories.

A factory is an async context manager yielding an `EngineUnderTest`. Tests use only
the Broker/PresenceManager protocol methods, the recording handler and
`advance_time`, so a Redis factory can join ENGINE_FACTORIES unchanged; the Redis
Cluster engine shares one cluster per session (`redis_cluster`). Channel
names come from the `channel` fixtures so engines with shared storage see fresh channels.
"""

from __future__ import annotations

import asyncio
import uuid
from collections.abc import AsyncIterator, Awaitable, Callable, Iterator
from contextlib import AbstractAsyncContextManager, asynccontextmanager
from dataclasses import dataclass, field
from typing import Any

import pytest

from adapters.brokers.memory import MemoryBroker, MemoryPresenceManager
from adapters.brokers.redis import RedisBroker, RedisPresenceManager
from shim.core.broker import Broker, ClientInfo, PresenceManager, Publication
from tests.redis_cluster import RedisClusterProcesses
from tests.redis_server import RedisServer

# How long an engine that delivers through a network may take to deliver.
DELIVERY_TIMEOUT_SECONDS = 5.0


@dataclass(slots=True)
class RecordingHandler:
    """A BrokerEventHandler that keeps everything it hears, in arrival order."""

    publications: list[tuple[str, Publication, str]] = field(default_factory=list)
    joins: list[tuple[str, ClientInfo]] = field(default_factory=list)
    leaves: list[tuple[str, ClientInfo]] = field(default_factory=list)
    # Set whenever anything arrives; waiters clear it before waiting.
    heard: asyncio.Event = field(default_factory=asyncio.Event)

    def on_publication(self, channel: str, pub: Publication, epoch: str) -> None:
        self.publications.append((channel, pub, epoch))
        self.heard.set()

    def on_join(self, channel: str, info: ClientInfo) -> None:
        self.joins.append((channel, info))
        self.heard.set()

    def on_leave(self, channel: str, info: ClientInfo) -> None:
        self.leaves.append((channel, info))
        self.heard.set()

    def publications_of(self, channel: str) -> list[tuple[Publication, str]]:
        return [(pub, epoch) for ch, pub, epoch in self.publications if ch == channel]


@dataclass(slots=True)
class EngineUnderTest:
    broker: Broker
    presence: PresenceManager
    handler: RecordingHandler
    # Moves the engine's notion of time forward (fake clock, or a real wait).
    advance_time: Callable[[float], Awaitable[None]]
    # True when the handler has heard an event by the time the publishing call returns.
    synchronous_delivery: bool
    # Whether the engine keeps anything of the channel's stream (memory: a stream
    # entry; Redis: its meta, history or fence key), read from its storage directly.
    stores_stream: Callable[[str], Awaitable[bool]]

    async def delivered(self, predicate: Callable[[], bool]) -> None:
        """Assert `predicate` holds: at once for a synchronous engine, else within
        DELIVERY_TIMEOUT_SECONDS."""
        if self.synchronous_delivery:
            assert predicate()
            return
        async with asyncio.timeout(DELIVERY_TIMEOUT_SECONDS):
            while not predicate():
                self.handler.heard.clear()
                await self.handler.heard.wait()


@dataclass(slots=True)
class FakeClock:
    now: float = 1000.0

    def __call__(self) -> float:
        return self.now

    async def advance(self, seconds: float) -> None:
        self.now += seconds


async def _in_memory(broker: MemoryBroker, channel: str) -> bool:
    return channel in broker._streams


async def _in_redis(broker: RedisBroker, channel: str) -> bool:
    keys = broker._keys(channel)
    shards = broker._shards
    found = await shards.call(shards.client(channel), "EXISTS", keys.meta, keys.history)
    fenced = await shards.call(shards.client(channel), "EXISTS", keys.fence)
    return bool(int(found) + int(fenced))


@asynccontextmanager
async def memory_engine() -> AsyncIterator[EngineUnderTest]:
    clock = FakeClock()
    broker = MemoryBroker(clock=clock)
    handler = RecordingHandler()
    await broker.start(handler)
    try:
        yield EngineUnderTest(
            broker=broker,
            presence=MemoryPresenceManager(),
            handler=handler,
            advance_time=clock.advance,
            synchronous_delivery=True,
            stores_stream=lambda channel: _in_memory(broker, channel),
        )
    finally:
        await broker.close()


@asynccontextmanager
async def _redis_engine_on(urls: list[str], **options: Any) -> AsyncIterator[EngineUnderTest]:
    """The Redis engine (broker and presence) on `urls`; time passes for real."""
    broker = RedisBroker(urls, **options)
    presence = RedisPresenceManager(urls, **options)
    handler = RecordingHandler()
    await broker.start(handler)
    try:
        yield EngineUnderTest(
            broker=broker,
            presence=presence,
            handler=handler,
            advance_time=asyncio.sleep,
            synchronous_delivery=False,
            stores_stream=lambda channel: _in_redis(broker, channel),
        )
    finally:
        await broker.close()
        await presence.close()


@asynccontextmanager
async def redis_engine() -> AsyncIterator[EngineUnderTest]:
    """A fresh redis-server per test."""
    async with RedisServer() as server, _redis_engine_on([server.url]) as engine:
        yield engine


@asynccontextmanager
async def redis_cluster_engine(cluster: RedisClusterProcesses) -> AsyncIterator[EngineUnderTest]:
    """The session's three-master Redis Cluster, a fresh key prefix per test; sharded
    pub/sub (the servers are Redis 7)."""
    prefix = f"t{uuid.uuid4().hex[:12]}"
    async with _redis_engine_on(cluster.seed_urls, prefix=prefix, cluster=True) as engine:
        yield engine


ENGINE_FACTORIES: dict[str, Callable[[], AbstractAsyncContextManager[EngineUnderTest]]] = {
    "memory": memory_engine,
    "redis": redis_engine,
}
# Engines on a Redis Cluster the session starts once (six redis-servers take seconds).
CLUSTER_ENGINE = "redis-cluster"


def pytest_configure(config: pytest.Config) -> None:
    config.addinivalue_line(
        "markers", "expiry: moves time with advance_time (real waiting on some engines)"
    )


@pytest.fixture(scope="session")
def redis_cluster() -> Iterator[RedisClusterProcesses]:
    with RedisClusterProcesses() as cluster:
        yield cluster


@pytest.fixture(params=[*ENGINE_FACTORIES, CLUSTER_ENGINE])
async def engine(request: pytest.FixtureRequest) -> AsyncIterator[EngineUnderTest]:
    if request.param == CLUSTER_ENGINE:
        factory = redis_cluster_engine(request.getfixturevalue("redis_cluster"))
    else:
        factory = ENGINE_FACTORIES[request.param]()
    async with factory as under_test:
        yield under_test


@pytest.fixture
def advance_time(engine: EngineUnderTest) -> Callable[[float], Awaitable[None]]:
    return engine.advance_time


@pytest.fixture
def channel() -> str:
    return f"contract:{uuid.uuid4().hex}"


@pytest.fixture
def other_channel() -> str:
    return f"contract:{uuid.uuid4().hex}"
