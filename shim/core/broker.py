"""The engine contracts: a Broker moves publications between nodes and keeps
history; a PresenceManager keeps who is in a channel. The memory engine
(adapters/brokers/memory.py) is the single-node default; a Redis engine passes
the same contract suite (tests/contract) for multi-node.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from dataclasses import dataclass
from typing import Protocol


# Not frozen (hashable all the same): every publish returns one per channel, and a
# frozen dataclass costs over twice as much to make. Nothing changes one once made.
@dataclass(slots=True, unsafe_hash=True)
class StreamPosition:
    """A place in a channel's stream. `epoch` changes whenever continuity is lost."""

    offset: int
    epoch: str


@dataclass(slots=True, frozen=True)
class ClientInfo:
    """Who published, joined or is present. conn_info/chan_info are raw JSON bytes."""

    user: str
    client: str
    conn_info: bytes | None = None
    chan_info: bytes | None = None


class LegacyFrame:
    """An ingested event's legacy hub frame as UTF-8 bytes, encoded once per event and
    carried with each of its publications, so every channel and client it reaches
    shares it; beside it what a legacy client needs: the event id (to deliver it once
    however many of the client's subscriptions it reaches), the top-level routing
    fields the old hub matched on, and where it was routed.

    `frame` may be given as a function making it: it is then encoded on first read
    (a legacy subscriber, another node's engine wire), and never when no legacy
    client is there to see the event.
    """

    __slots__ = ("_encode", "_frame", "channels", "event_id", "project_id", "task_id")

    def __init__(
        self,
        event_id: str,
        frame: bytes | Callable[[], bytes],
        task_id: str = "",
        project_id: str = "",
        channels: tuple[str, ...] = (),
    ) -> None:
        self.event_id = event_id
        if isinstance(frame, bytes):
            self._frame: bytes | None = frame
            self._encode: Callable[[], bytes] | None = None
        else:
            self._frame, self._encode = None, frame
        self.task_id = task_id
        self.project_id = project_id
        # The channels the event was routed to: a legacy client whose reads are
        # authorized per channel gets it when its user may read one of them.
        self.channels = channels

    @property
    def frame(self) -> bytes:
        frame = self._frame
        if frame is None:
            assert self._encode is not None
            frame = self._frame = self._encode()
            self._encode = None  # what it held (the event) is no longer needed
        return frame

    def _key(self) -> tuple[str, bytes, str, str, tuple[str, ...]]:
        return (self.event_id, self.frame, self.task_id, self.project_id, self.channels)

    def __eq__(self, other: object) -> bool:
        if not isinstance(other, LegacyFrame):
            return NotImplemented
        return self._key() == other._key()

    def __hash__(self) -> int:
        return hash(self._key())

    def __repr__(self) -> str:
        return (
            f"LegacyFrame(event_id={self.event_id!r}, frame={self.frame!r}, "
            f"task_id={self.task_id!r}, project_id={self.project_id!r}, "
            f"channels={self.channels!r})"
        )


# Not frozen: a frozen dataclass costs several times as much to make, and the
# publish path makes one per channel per event. Nothing changes one once made.
@dataclass(slots=True)
class Publication:
    """One message in one channel. `data` is raw JSON, embedded verbatim in pushes."""

    data: bytes
    offset: int = 0
    info: ClientInfo | None = None
    # Unix milliseconds of the publish, 0 when unknown.
    time_ms: int = 0
    # Set for publications made from an ingested event.
    legacy: LegacyFrame | None = None


@dataclass(slots=True, frozen=True)
class PublishOptions:
    # Publications kept in the channel's history; 0 = no history, offset stays 0.
    history_size: int = 0
    # Seconds publications stay in history.
    history_ttl_seconds: float = 0.0
    # Seconds the stream's epoch and top offset outlive its last publication.
    history_meta_ttl_seconds: float = 7 * 24 * 3600.0


@dataclass(slots=True, frozen=True)
class HistoryResult:
    publications: list[Publication]
    # Current top of the stream.
    position: StreamPosition


@dataclass(slots=True, frozen=True)
class PresenceStats:
    num_clients: int
    num_users: int


@dataclass(slots=True, frozen=True)
class Fence:
    """Keeps one ordered source's publications in order in every channel they reach.

    `source` names a sequence that one writer at a time publishes in order (a
    partition of the ingest stream); `position` is the item's place in it (a stream
    entry id as milliseconds and sequence, then the item's index in the entry),
    compared in that order. A fenced publish is stored only when the
    channel has nothing at or after `position` from `source`: a writer that lost its
    turn (paused, then resumed mid-publish) can repeat nothing and reorder nothing.
    """

    source: str
    position: tuple[int, int, int]
    # How long a channel remembers the source's last position after its last
    # fenced publish: longer than any writer can stay paused and resume.
    ttl_seconds: float = 24 * 3600.0


@dataclass(slots=True, frozen=True)
class Superseded:
    """A fenced publish that was not made: the channel already had this position of
    its source, or a later one (a duplicate, harmless to acknowledge)."""


class UnrecoverablePosition(Exception):
    """A history `since` names an epoch that is not the stream's current one."""


class BrokerUnavailable(Exception):
    """The engine cannot be reached; nothing was stored or published."""


class BrokerEventHandler(Protocol):
    """What the node hears from the broker. Called on the event loop, must not block
    or await: the node only enqueues pre-encoded bytes for its local sessions."""

    def on_publication(self, channel: str, pub: Publication, epoch: str) -> None: ...

    def on_join(self, channel: str, info: ClientInfo) -> None: ...

    def on_leave(self, channel: str, info: ClientInfo) -> None: ...


class Broker(Protocol):
    async def start(self, handler: BrokerEventHandler) -> None:
        """Begin delivering to `handler`; called once before anything else."""

    async def close(self) -> None: ...

    async def publish(
        self, channel: str, pub: Publication, options: PublishOptions
    ) -> StreamPosition:
        """Store (when options keep history) and deliver to every node subscribed to
        the channel. Returns the publication's position; its offset is 0 without
        history. Raises BrokerUnavailable when nothing was stored."""

    async def publish_many(
        self,
        items: Sequence[tuple[str, Publication, PublishOptions]],
        fences: Sequence[Fence | None] = (),
    ) -> list[StreamPosition | Superseded | BrokerUnavailable]:
        """Publish several, as `publish` would one by one in this order (a channel's
        publications keep their order), but in as few round trips as the engine can.
        Each item's result is its position, or the BrokerUnavailable it failed with
        (a failed item was not stored; later items may still have been).
        `fences`, when given, has one entry per item: a fenced item is checked and
        recorded atomically with its publish, and is Superseded when the channel
        already has its position or a later one from the same source."""

    async def publish_join(self, channel: str, info: ClientInfo) -> None: ...

    async def publish_leave(self, channel: str, info: ClientInfo) -> None: ...

    async def subscribe(self, channel: str) -> None:
        """This node wants publications of `channel` (first local subscriber)."""

    async def unsubscribe(self, channel: str) -> None:
        """This node no longer wants `channel` (last local subscriber left)."""

    async def history(
        self,
        channel: str,
        *,
        since: StreamPosition | None = None,
        limit: int = 0,
        reverse: bool = False,
        options: PublishOptions | None = None,
    ) -> HistoryResult:
        """Publications of the channel. limit 0 = none (position only), -1 = all kept.
        Without `since`: oldest first (newest first when reverse). With `since`:
        offsets > since.offset ascending (reverse: < since.offset descending).
        Raises UnrecoverablePosition when since (past offset 0) is not a position of
        this stream. Reading creates nothing: a channel never published to reads as
        offset 0 in a blank epoch, and the stream its first publish makes still
        accepts that position, so a subscriber that saw an empty stream recovers
        once publications begin. `options` are the channel's (engines may ignore them
        on reads)."""

    async def remove_history(self, channel: str) -> None: ...


class PresenceManager(Protocol):
    async def add_presence(self, channel: str, client_id: str, info: ClientInfo) -> None: ...

    async def remove_presence(self, channel: str, client_id: str, user: str) -> None: ...

    async def presence(self, channel: str) -> dict[str, ClientInfo]: ...

    async def presence_stats(self, channel: str) -> PresenceStats: ...
