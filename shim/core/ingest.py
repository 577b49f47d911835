"""From legacy hub messages to channel publications.

Each accepted message becomes one Event; its legacy frame and its channel data
are each encoded once, and it is published to every channel the router names, in
order, so a legacy client that reaches it through several channels sees it once
(by event id) and every channel keeps publish order.
"""

from __future__ import annotations

import functools
import logging
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass, field
from typing import Any

from shim.core.broadcast import Accepted, ParsedItem, channel_data, with_tool_use_id
from shim.core.broker import BrokerUnavailable, Fence, LegacyFrame, StreamPosition, Superseded
from shim.core.events import Event, new_event_id, now_timestamp
from shim.core.limits import Pacer
from shim.core.node import Node
from shim.core.routing import Route, Router

log = logging.getLogger("shim.ingest")

# Events of one request published between two chances to pause (see Pacer). Each chunk
# leaves as (at least) one frame per subscriber: centrifuge-js under Node (ws) can
# reorder publications of multi-message frames that arrive in one tick (its dispatch
# chain is replaced before it runs), so a request of up to this many stays one frame.
PUBLISH_CHUNK = 100


@dataclass(slots=True)
class ItemResult:
    index: int
    status: str  # "accepted" | "refused" | "failed"
    event_id: str = ""
    channels: tuple[str, ...] = ()
    missing_routes: tuple[str, ...] = ()
    # Channels that already had this event (a fenced re-publish: see Fence).
    superseded: tuple[str, ...] = ()
    error: str = ""

    def as_dict(self) -> dict[str, Any]:
        body: dict[str, Any] = {"index": self.index, "status": self.status}
        if self.event_id:
            body["event_id"] = self.event_id
        if self.channels:
            body["channels"] = list(self.channels)
        if self.missing_routes:
            body["missing_routes"] = list(self.missing_routes)
        if self.superseded:
            body["superseded"] = list(self.superseded)
        if self.error:
            body["error"] = self.error
        return body


@dataclass(slots=True)
class IngestStats:
    # (event type, result) -> count; results: accepted, refused, failed, and the
    # accepted ones that also had a missing route or an unknown type.
    counts: dict[tuple[str, str], int] = field(default_factory=dict)
    in_flight: int = 0

    def count(self, event_type: str, result: str) -> None:
        key = (event_type, result)
        self.counts[key] = self.counts.get(key, 0) + 1

    def total(self, result: str) -> int:
        return sum(n for (_type, outcome), n in self.counts.items() if outcome == result)


# An event's legacy hub frame (legacy.wire.encode_legacy_frame), injected by the
# composition root: made at most once per event (on first read) and carried with
# every publication of it, so no node or client encodes it again.
LegacyFrameEncoder = Callable[[Event], str]


def _frame_bytes(encode: LegacyFrameEncoder, event: Event) -> bytes:
    return encode(event).encode()


class Ingestor:
    def __init__(self, node: Node, router: Router, legacy_frame: LegacyFrameEncoder) -> None:
        self.node = node
        self.router = router
        self.legacy_frame = legacy_frame
        self.stats = IngestStats()
        self._unknown_types_logged: set[str] = set()

    async def ingest(self, items: Sequence[ParsedItem]) -> list[ItemResult]:
        """Publish every accepted item of one request together (one round trip per
        shard with Redis); each item gets its own result."""
        self.stats.in_flight += 1
        try:
            accepted = [(item.index, item.event) for item in items if isinstance(item, Accepted)]
            published = iter(await self._publish_in_chunks(accepted))
            results = []
            for item in items:
                if isinstance(item, Accepted):
                    results.append(next(published))
                else:
                    # A refused item has no trustworthy type: counted under "".
                    self.stats.count("", "refused")
                    results.append(ItemResult(item.index, "refused", error=item.error))
            return results
        finally:
            self.stats.in_flight -= 1

    async def _publish_in_chunks(self, events: Sequence[tuple[int, Event]]) -> list[ItemResult]:
        """publish_events over a large request a chunk at a time, in order, letting the
        loop run between chunks: clients' sockets keep being written (and a healthy
        client is not taken for slow) while a big batch is published."""
        results: list[ItemResult] = []
        pacer = Pacer()
        for start in range(0, len(events), PUBLISH_CHUNK):
            if start:
                await pacer.tick()
            results += await self.publish_events(events[start : start + PUBLISH_CHUNK])
        return results

    async def publish(self, event_type: str, payload: Mapping[str, Any], **top: str) -> ItemResult:
        """The design doc's Publisher: publish(event_type, payload) from Python code."""
        event = Event(
            id=new_event_id(),
            type=event_type,
            payload=dict(payload),
            timestamp=now_timestamp(),
            task_id=top.get("task_id", ""),
            project_id=top.get("project_id", ""),
        )
        return await self.publish_event(with_tool_use_id(event))

    async def publish_event(self, event: Event, *, index: int = 0) -> ItemResult:
        return (await self.publish_events([(index, event)]))[0]

    async def publish_events(
        self, events: Sequence[tuple[int, Event]], fences: Sequence[Fence] = ()
    ) -> list[ItemResult]:
        """Route and encode each event once, publish them all in order, and say per
        event whether every one of its channels stored it. An event whose channel is
        over channel_publish_rate_limit is refused on its own; the others go on.
        `fences`: one per event (every channel of an event gets its fence), or none."""
        batch: list[tuple[str, bytes, LegacyFrame | None]] = []
        channel_fences: list[Fence | None] = []
        routes: list[Route | str] = []
        route_event = self.router.route
        node = self.node
        limited = node.publish_rates.enabled
        for position, (_index, event) in enumerate(events):
            route = route_event(event)
            if route.unknown_type and event.type not in self._unknown_types_logged:
                self._unknown_types_logged.add(event.type)
                log.warning("unknown event type %r routed to the default channel", event.type)
            if limited:
                over = node.over_publish_rate(route.channels)
                if over is not None:
                    routes.append(over)
                    continue
            tag = LegacyFrame(
                event.id,
                # Encoded when first read: not at all while no legacy client sees it.
                functools.partial(_frame_bytes, self.legacy_frame, event),
                event.task_id,
                event.project_id,
                route.routed,
            )
            data = channel_data(event)
            if route.legacy_skip:
                skip = route.legacy_skip
                batch.extend((c, data, None if c in skip else tag) for c in route.channels)
            else:
                batch += [(channel, data, tag) for channel in route.channels]
            if fences:
                channel_fences.extend([fences[position]] * len(route.channels))
            routes.append(route)
        outcomes = await node.publish_many(batch, channel_fences) if batch else []
        # The common case, checked once for the whole batch: stored in every channel.
        everywhere = all(type(outcome) is StreamPosition for outcome in outcomes)

        results = []
        count = self.stats.count
        start = 0
        for (index, event), routed in zip(events, routes, strict=True):
            if isinstance(routed, str):
                count(event.type, "refused")
                results.append(
                    ItemResult(
                        index,
                        "refused",
                        error=f"rate limited: {routed} is over channel_publish_rate_limit",
                    )
                )
                continue
            route = routed
            first, start = start, start + len(route.channels)
            superseded: tuple[str, ...] = ()
            if not everywhere:
                stored = outcomes[first:start]
                failures = [o for o in stored if isinstance(o, BrokerUnavailable)]
                if failures:
                    count(event.type, "failed")
                    results.append(
                        ItemResult(
                            index,
                            "failed",
                            event_id=event.id,
                            channels=tuple(
                                c
                                for c, o in zip(route.channels, stored, strict=True)
                                if not isinstance(o, Exception)
                            ),
                            error=f"not stored: {failures[0]}",
                        )
                    )
                    continue
                superseded = tuple(
                    c
                    for c, o in zip(route.channels, stored, strict=True)
                    if isinstance(o, Superseded)
                )
            count(event.type, "accepted")
            if superseded:
                count(event.type, "superseded")
            if route.missing:
                count(event.type, "missing_route")
            if route.unknown_type:
                count(event.type, "unknown_type")
            # Positional (event_id, channels, missing_routes, superseded): a keyword
            # call costs about twice as much, once per event.
            results.append(
                ItemResult(index, "accepted", event.id, route.channels, route.missing, superseded)
            )
        return results
