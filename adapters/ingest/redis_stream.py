"""Durable ingest: the backend appends legacy hub messages to a Redis stream and
every node consumes it in one consumer group.

An entry is acknowledged only after all of its publications are stored. A node
that dies leaves its entries pending; another node claims them once they have been
idle for `claim_idle_seconds`. Each entry gets the event id `stream:<entry id>`
(unless the message carries its own `id`), and a marker written after publishing
lets a reclaiming node skip entries that were published but not yet acknowledged,
so an entry is published at most once more than needed (when a node dies between
publishing and writing the marker). A publish that fails leaves its entry pending;
the consumer backs off and retries its own pending entries before reading new ones.
A stopping node lets the entry in progress finish (within a bound) and starts no
other; what it read but did not start stays pending for the other nodes to claim.

Entry fields: `message` = one legacy hub message as JSON text (an object; an
array of several is accepted too).
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import random
from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any

import orjson
from redis.asyncio import Redis
from redis.exceptions import RedisError, ResponseError

from legacy.translate import Accepted, BroadcastError, parse_broadcast
from shim.ingest import Ingestor

log = logging.getLogger("shim.ingest.stream")

MESSAGE_FIELD = b"message"


@dataclass(slots=True, frozen=True)
class StreamOptions:
    key: str
    group: str = "dex-shim"
    consumer: str = "node"
    # Entries read per call.
    batch: int = 100
    # Milliseconds a read blocks waiting for new entries.
    block_ms: int = 1000
    # Seconds an entry may stay pending with another consumer before it is claimed.
    claim_idle_seconds: float = 30.0
    # Seconds the "already published" marker of an entry is kept.
    marker_ttl_seconds: int = 24 * 3600
    max_item_bytes: int = 256 * 1024


@dataclass(slots=True)
class StreamStats:
    consumed: int = 0
    acknowledged: int = 0
    skipped_already_published: int = 0
    refused: int = 0
    claimed: int = 0
    failures: int = 0


class _Stopped(Exception):
    """The consumer was asked to stop before starting another entry."""


class StreamConsumer:
    def __init__(self, redis: Redis, ingestor: Ingestor, options: StreamOptions) -> None:
        self.redis = redis
        self.ingestor = ingestor
        self.options = options
        self.stats = StreamStats()
        self.running = False
        self._task: asyncio.Task[None] | None = None
        # Set unless an entry is between its first publish and its acknowledgement.
        self._idle = asyncio.Event()
        self._idle.set()
        # close() was called: start no new entry.
        self._stopping = False

    @property
    def dead_letter_key(self) -> str:
        return f"{self.options.key}:refused"

    def _marker(self, entry_id: str) -> str:
        return f"{self.options.key}:done:{entry_id}"

    async def start(self) -> None:
        self._task = asyncio.create_task(self._run(), name="shim-ingest-stream")

    async def close(self, timeout: float = 10.0) -> None:
        """Stop consuming. An entry being handled finishes first (published, marked,
        acknowledged), for at most `timeout` seconds; a read that is only waiting for
        new entries is abandoned at once. No new entry is started meanwhile."""
        task, self._task = self._task, None
        if task is not None:
            self._stopping = True
            try:
                await asyncio.wait_for(self._idle.wait(), timeout)
            except TimeoutError:
                log.warning("ingest stream entry still in progress at shutdown: left pending")
            task.cancel()
            with contextlib.suppress(asyncio.CancelledError, _Stopped):
                await task
        self.running = False

    async def _ensure_group(self) -> None:
        try:
            await self.redis.xgroup_create(
                self.options.key, self.options.group, id="0", mkstream=True
            )
        except ResponseError as exc:
            if "BUSYGROUP" not in str(exc):
                raise

    async def _run(self) -> None:
        delay = 0.1
        while True:
            try:
                await self._ensure_group()
                self.running = True
                # First what this consumer already holds (it may have restarted, or a
                # publish failed), then new entries. A failed publish backs off and
                # starts here again, so its entry is retried before anything newer.
                if await self._drain_own_pending():
                    while await self._claim_abandoned() and await self._read(">") is not None:
                        delay = 0.1
            except _Stopped:
                return
            except (RedisError, OSError) as exc:
                if self._stopping:
                    return  # close()'s cancel, as redis-py reports it
                log.warning("ingest stream unavailable: %s", exc.__class__.__name__)
            self.running = False
            self.stats.failures += 1
            await asyncio.sleep(delay + random.uniform(0, delay))
            delay = min(delay * 2, 5.0)

    async def _drain_own_pending(self) -> bool:
        """Handle what this consumer holds; False when a publish failed."""
        while True:
            handled = await self._read("0")
            if handled is None:
                return False
            if handled == 0:
                return True

    def _check_stopping(self) -> None:
        # Checked before every step: redis-py can swallow the cancel of close() (its
        # retries turn it into a fresh command), so cancelling alone may not stop us.
        if self._stopping:
            raise _Stopped

    async def _read(self, start: str) -> int | None:
        """Handle one batch. Returns how many entries, or None when publishing failed."""
        self._check_stopping()
        # RESP2 (our pools speak it): [[stream, [(id, fields), ...]]].
        response: Any = await self.redis.xreadgroup(
            self.options.group,
            self.options.consumer,
            {self.options.key: start},
            count=self.options.batch,
            block=self.options.block_ms if start == ">" else None,
        )
        entries: list[tuple[bytes, dict[bytes, bytes]]] = response[0][1] if response else []
        for entry_id, fields in entries:
            if not await self._handle(entry_id.decode(), fields):
                return None
        return len(entries)

    async def _claim_abandoned(self) -> bool:
        """Take over entries idle with other consumers; False when a publish failed."""
        self._check_stopping()
        result: Sequence[Any] = await self.redis.xautoclaim(
            self.options.key,
            self.options.group,
            self.options.consumer,
            min_idle_time=int(self.options.claim_idle_seconds * 1000),
            start_id="0-0",
            count=self.options.batch,
        )
        claimed = [(i, f) for i, f in (result[1] if len(result) > 1 else []) if f is not None]
        if claimed:
            # Ids in the log: how an operator (or a test) sees which entries moved.
            log.info(
                "claimed %d idle ingest stream entries: %s",
                len(claimed),
                " ".join(entry_id.decode() for entry_id, _ in claimed),
            )
        for entry_id, fields in claimed:
            self.stats.claimed += 1
            if not await self._handle(entry_id.decode(), fields):
                return False
        return True

    async def _handle(self, entry_id: str, fields: dict[bytes, bytes]) -> bool:
        """Publish one entry and acknowledge it; False when it must be retried later."""
        self._check_stopping()  # it stays pending: claimed by another node, or ours on restart
        self._idle.clear()
        try:
            return await self._publish_entry(entry_id, fields)
        finally:
            self._idle.set()

    async def _publish_entry(self, entry_id: str, fields: dict[bytes, bytes]) -> bool:
        self.stats.consumed += 1
        marker = self._marker(entry_id)
        if await self.redis.exists(marker):
            self.stats.skipped_already_published += 1
            await self._ack(entry_id)
            return True
        try:
            items = parse_broadcast(
                with_stream_ids(fields.get(MESSAGE_FIELD, b""), entry_id),
                max_item_bytes=self.options.max_item_bytes,
            )
        except BroadcastError as exc:
            await self._refuse(entry_id, str(exc))
            await self._ack(entry_id)  # retrying cannot make it valid
            return True
        for item in items:
            if not isinstance(item, Accepted):
                await self._refuse(entry_id, f"item {item.index}: {item.error}")
                continue
            result = await self.ingestor.publish_event(item.event, index=item.index)
            if result.status == "failed":
                return False
        await self.redis.set(marker, b"1", ex=self.options.marker_ttl_seconds)
        await self._ack(entry_id)
        return True

    async def _ack(self, entry_id: str) -> None:
        await self.redis.xack(self.options.key, self.options.group, entry_id)
        self.stats.acknowledged += 1

    async def _refuse(self, entry_id: str, error: str) -> None:
        self.stats.refused += 1
        log.warning("ingest stream entry %s refused: %s", entry_id, error)
        await self.redis.xadd(
            self.dead_letter_key, {"entry": entry_id, "error": error}, maxlen=10_000
        )


def with_stream_ids(message: bytes, entry_id: str) -> bytes:
    """The message with an id derived from its stream entry on every item that has
    none, so a re-published entry carries the same event ids. Unparseable input is
    returned unchanged for parse_broadcast to refuse."""
    try:
        document = orjson.loads(message)
    except orjson.JSONDecodeError:
        return message
    if isinstance(document, dict):
        document.setdefault("id", f"stream:{entry_id}")
    elif isinstance(document, list):
        for index, item in enumerate(document):
            if isinstance(item, dict):
                item.setdefault("id", f"stream:{entry_id}:{index}")
    else:
        return message
    return orjson.dumps(document)
