"""Wires the pieces of one node together from Settings."""

from __future__ import annotations

import asyncio
import logging
import os
import random
import secrets
from collections.abc import Awaitable, Callable, Mapping
from dataclasses import replace
from pathlib import Path
from typing import TYPE_CHECKING, Any, Protocol

from adapters.auth.jwt import TokenVerifier, generate_signing_key
from adapters.brokers.memory import MemoryBroker, MemoryPresenceManager
from legacy.fanout import LegacyFanout
from legacy.session import LegacyStats
from legacy.wire import encode_legacy_frame
from shim.app.metrics import Metrics
from shim.centrifuge.emulation import EmulationHub
from shim.centrifuge.fanout import CentrifugeFanout
from shim.centrifuge.session import CentrifugeSession
from shim.core.broker import Broker, PresenceManager
from shim.core.config import Settings, origin_patterns
from shim.core.cutover import CutoverState, Mode
from shim.core.ingest import Ingestor
from shim.core.node import Node
from shim.core.policy import ChannelAuthorizer
from shim.core.routing import Router

if TYPE_CHECKING:
    from redis.asyncio import Redis

    from adapters.ingest.redis_stream import StreamConsumer
    from adapters.redis_control import RedisControl
    from adapters.redis_emulation import RedisEmulationRelay

log = logging.getLogger("shim.runtime")

# Where a development signing key lives when no key is configured, so that
# `dex-shim serve` and `dex-shim token` agree without any set-up.
DEV_KEY_DIR = Path(os.environ.get("DEX_SHIM_DEV_DIR", ".dex-shim"))


def dev_signing_key(algorithm: str) -> tuple[str, str]:
    """(signing key, verification key) kept in DEV_KEY_DIR, made on first use."""
    private_path = DEV_KEY_DIR / f"dev-{algorithm}.key"
    public_path = DEV_KEY_DIR / f"dev-{algorithm}.pub"
    if not private_path.exists():
        DEV_KEY_DIR.mkdir(parents=True, exist_ok=True)
        private, public = generate_signing_key(algorithm)
        private_path.write_text(private)
        private_path.chmod(0o600)
        public_path.write_text(public)
    return private_path.read_text(), public_path.read_text()


def dev_api_key(name: str = "api-key") -> str:
    """A key kept in DEV_KEY_DIR (never logged), made on first use."""
    path = DEV_KEY_DIR / name
    if not path.exists():
        DEV_KEY_DIR.mkdir(parents=True, exist_ok=True)
        path.write_text(secrets.token_urlsafe(24))
        path.chmod(0o600)
    return path.read_text().strip()


def resolve_keys(settings: Settings) -> Settings:
    """Settings with a verification key: the configured one, or the dev key."""
    if settings.token_key or settings.token_key_file:
        return settings
    _, public = dev_signing_key(settings.token_algorithm)
    log.warning(
        "no token key configured: using the development key in %s (dex-shim token mints for it)",
        DEV_KEY_DIR,
    )
    return replace(settings, token_key=public)


class Runtime:
    def __init__(
        self,
        settings: Settings,
        *,
        broker: Broker | None = None,
        presence: PresenceManager | None = None,
    ) -> None:
        settings = resolve_keys(settings)
        if not settings.api_key:
            settings = replace(settings, api_key=dev_api_key())
            log.warning("no api_key configured: using the development key in %s", DEV_KEY_DIR)
        if not settings.admin_api_key:
            settings = replace(settings, admin_api_key=dev_api_key("admin-key"))
            log.warning("no admin_api_key configured: using the development key in %s", DEV_KEY_DIR)
        self.settings = settings
        self.api_key = settings.api_key
        # Port of the separate metrics listener (metrics_listen), once it is bound.
        self.metrics_port = 0
        # Lower-cased allowed_origins patterns; empty = any origin.
        self.origin_patterns = origin_patterns(settings)
        if broker is None or presence is None:
            broker, presence = _engine(settings)
        self.broker: Broker = broker
        self.presence: PresenceManager = presence
        # Centrifuge subscribers first: as before the move, they get each publication
        # before legacy clients do.
        self.node = Node(
            settings,
            self.broker,
            self.presence,
            fanouts=(CentrifugeFanout(), LegacyFanout(settings.global_channel)),
        )
        self.verifier = TokenVerifier.from_settings(settings)
        self.authorizer = ChannelAuthorizer.from_settings(settings)
        self.router = Router(
            settings.routes,
            default_channel=settings.default_channel,
            global_channel=settings.global_channel,
            audience=self.authorizer,
            personal_fanout=settings.legacy_personal_events_to_all,
        )
        self.ingestor = Ingestor(self.node, self.router, encode_legacy_frame)
        self.legacy_stats = LegacyStats()
        self.metrics = Metrics(self)
        self.node.observer = self.metrics.histograms
        self.cutover = CutoverState(
            mode=Mode(settings.cutover_mode),
            channels_percent=settings.cutover_channels_percent,
            allow_users=_user_list(settings.cutover_allow_users),
            deny_users=_user_list(settings.cutover_deny_users),
            drain_seconds=settings.cutover_drain_seconds,
            detect_centrifuge_on_legacy_path=settings.detect_centrifuge_on_legacy_path,
        )
        self.control: RedisControl | None = None
        # Applies a server API action forwarded by another node (set by the server API).
        self.command_handler: Callable[[str, dict[str, Any]], Awaitable[None]] | None = None
        # Client connections still running (WebSocket and streaming HTTP), and whether
        # the node is stopping.
        self.open_sockets: set[OpenConnection] = set()
        self.shutting_down = False
        self.stream_consumer: StreamConsumer | None = None
        # Emulated (HTTP-streaming, SSE) clients' sessions, for POST /emulation.
        self.emulation = EmulationHub(self.node.name)
        self.emulation_relay: RedisEmulationRelay | None = None
        self.started = False

    def apply_cutover(self, state: CutoverState) -> None:
        """Make `state` current on this node. Entering `channels` schedules every
        open legacy connection to close at a random moment of the drain window, so
        reconnecting browsers do not arrive all at once."""
        previous, self.cutover = self.cutover, state
        log.info("cutover %s -> %s", previous.as_dict(), state.as_dict())
        self._announce_cutover(state.version)
        draining = state.mode is Mode.CENTRIFUGE
        if draining == (previous.mode is Mode.CENTRIFUGE):
            return
        now = asyncio.get_running_loop().time()
        for session in list(self.node.sessions):
            session.drain_by(now + random.uniform(0, state.drain_seconds) if draining else 0.0)

    def _announce_cutover(self, version: int) -> None:
        """Tell connected clients the flag changed, so a client kit asks for its
        config again (docs/client-kit.md): a `message` push to Centrifuge clients
        (SDKs without a message handler ignore it), a notice to legacy clients that
        opted in. The legacy hook never opts in and sees nothing."""
        for session in list(self.node.sessions):
            session.cutover_changed(version)

    def secrets(self) -> list[str]:
        """Strings that must never appear in a log line."""
        found = [self.settings.api_key, self.settings.admin_api_key]
        if self.settings.token_algorithm.startswith("HS"):
            found.append(self.settings.token_key)
        return [s for s in found if s]

    def centrifuge_sessions(self) -> list[CentrifugeSession]:
        """The Centrifuge sessions of this node, for the server API's commands (the
        composition root is the one place that knows the concrete session types)."""
        return [s for s in self.node.sessions if isinstance(s, CentrifugeSession)]

    def connection_counts(self) -> dict[str, int]:
        counts = {fanout.protocol: 0 for fanout in self.node.fanouts}
        for session in self.node.sessions:
            counts[session.protocol] += 1
        return counts

    async def start(self) -> None:
        if self.started:
            return
        await self.node.start()
        settings = self.settings
        if settings.engine == "redis":
            from adapters.redis_control import RedisControl

            self.control = RedisControl(
                _redis_client(settings),
                # On a cluster the control keys share one slot (MGET of node counts).
                prefix=f"{{{settings.redis_prefix}}}"
                if settings.redis_cluster
                else settings.redis_prefix,
                node_name=self.node.name,
                on_cutover=self.apply_cutover,
                counts=self.connection_counts,
            )
            self.control.on_command = self.command_handler
            await self.control.start()
            from adapters.redis_emulation import RedisEmulationRelay

            self.emulation_relay = RedisEmulationRelay(
                _redis_client(settings),
                prefix=settings.redis_prefix,
                node_name=self.node.name,
                on_commands=self.emulation.on_relayed,
            )
            await self.emulation_relay.start()
            self.emulation.relay = self.emulation_relay
        if settings.ingest_stream_key:
            from adapters.ingest.redis_stream import StreamConsumer, StreamOptions

            self.stream_consumer = StreamConsumer(
                _redis_client(settings),
                self.ingestor,
                StreamOptions(
                    key=settings.ingest_stream_key,
                    consumer=self.node.name,
                    partitions=settings.ingest_stream_partitions,
                    lease_seconds=settings.ingest_stream_claim_idle_seconds,
                    max_item_bytes=settings.ingest_max_item_bytes,
                ),
            )
            await self.stream_consumer.start()
        self.started = True

    async def shutdown(self) -> None:
        """Before the listener closes: turn new clients away, tell every client to go
        (Centrifuge 3001 "shutdown", which makes SDKs reconnect elsewhere; legacy 1001),
        let queued writes and in-flight ingest finish, all within the grace period."""
        self.shutting_down = True
        loop = asyncio.get_running_loop()
        deadline = loop.time() + self.settings.shutdown_grace_seconds
        if self.stream_consumer is not None:
            # An entry in progress finishes first, within the grace period.
            await self.stream_consumer.close(timeout=max(0.0, deadline - loop.time()))
        for session in list(self.node.sessions):
            session.shutdown()
        # A bounded poll of two counters, once per shutdown.
        while (self.open_sockets or self.ingestor.stats.in_flight) and loop.time() < deadline:  # noqa: ASYNC110
            await asyncio.sleep(0.05)
        log.info(
            "shutdown drained: %d sockets and %d ingest requests left",
            len(self.open_sockets),
            self.ingestor.stats.in_flight,
        )
        # A peer that stopped reading would hold its connection (and hypercorn's exit)
        # forever, its unsent bytes kept by the kernel: past the grace period, drop it.
        for pump in list(self.open_sockets):
            pump.abort()

    async def change_cutover(self, changes: Mapping[str, Any]) -> CutoverState:
        """Apply an admin change here and, with Redis, on every node."""
        state = self.cutover.updated(changes)
        if self.control is not None:
            return await self.control.save_cutover(state)
        self.apply_cutover(state)
        return state

    async def nodes(self) -> dict[str, dict[str, int]]:
        """Connection counts per node: every live node with Redis, this one otherwise."""
        if self.control is not None:
            return await self.control.nodes()
        return {self.node.name: self.connection_counts()}

    async def close(self) -> None:
        if self.started:
            await self.node.close()
            if self.stream_consumer is not None:
                await self.stream_consumer.close()
                await self.stream_consumer.redis.aclose()
            if self.control is not None:
                await self.control.close()
            if self.emulation_relay is not None:
                self.emulation.relay = None
                await self.emulation_relay.close()
            close_presence = getattr(self.presence, "close", None)
            if close_presence is not None:
                await close_presence()
            await self.authorizer.aclose()
            self.started = False


class OpenConnection(Protocol):
    """A client connection the shutdown waits for, and drops past the grace period."""

    def abort(self) -> None: ...


def _user_list(text: str) -> frozenset[str]:
    return frozenset(user.strip() for user in text.split(",") if user.strip())


def _engine(settings: Settings) -> tuple[Broker, PresenceManager]:
    if settings.engine == "redis":
        from adapters.brokers.redis import RedisBroker, RedisPresenceManager, parse_urls

        urls = parse_urls(settings.redis_url)
        return (
            RedisBroker(urls, prefix=settings.redis_prefix, cluster=settings.redis_cluster),
            RedisPresenceManager(
                urls,
                prefix=settings.redis_prefix,
                presence_ttl_seconds=settings.presence_ttl_seconds,
                cluster=settings.redis_cluster,
            ),
        )
    return MemoryBroker(max_streams=settings.memory_max_streams), MemoryPresenceManager()


def _redis_client(settings: Settings) -> Redis:
    """A client on the first Redis address (control state and the ingest stream), or
    on the whole Redis Cluster."""
    from redis.asyncio import Redis

    from adapters.brokers.redis import parse_urls

    if settings.redis_cluster:
        from adapters.brokers.redis.cluster import control_client

        return control_client(parse_urls(settings.redis_url))

    return Redis.from_url(
        parse_urls(settings.redis_url)[0],
        protocol=2,
        socket_timeout=5.0,
        socket_connect_timeout=2.0,
    )
