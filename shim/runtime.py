"""Wires the pieces of one node together from Settings."""

from __future__ import annotations

import logging
import os
import secrets
from dataclasses import replace
from pathlib import Path

from adapters.auth.jwt import TokenVerifier, generate_signing_key
from adapters.brokers.memory import MemoryBroker, MemoryPresenceManager
from legacy.session import LegacyStats
from shim.broker import Broker, PresenceManager
from shim.config import Settings
from shim.ingest import Ingestor
from shim.node import Node
from shim.policy import ChannelAuthorizer, policy_from_settings
from shim.routing import Router

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


def dev_api_key() -> str:
    """The ingest API key kept in DEV_KEY_DIR (never logged), made on first use."""
    path = DEV_KEY_DIR / "api-key"
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
        self.settings = settings
        self.api_key = settings.api_key
        self.broker: Broker = broker or MemoryBroker()
        self.presence: PresenceManager = presence or MemoryPresenceManager()
        self.node = Node(settings, self.broker, self.presence)
        self.verifier = TokenVerifier.from_settings(settings)
        self.authorizer = ChannelAuthorizer(
            policy_from_settings(settings), user_channel_prefix=settings.user_channel_prefix
        )
        self.router = Router(
            settings.routes,
            default_channel=settings.default_channel,
            global_channel=settings.global_channel,
        )
        self.ingestor = Ingestor(self.node, self.router)
        self.legacy_stats = LegacyStats()
        self.started = False

    async def start(self) -> None:
        if not self.started:
            await self.node.start()
            self.started = True

    async def close(self) -> None:
        if self.started:
            await self.node.close()
            self.started = False
