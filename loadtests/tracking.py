"""What a subscriber received: parsing of both protocols' frames and per-key
sequence checks (no loss, no duplicate, in order). Pure: no I/O.

Every measured publication is a legacy hub message whose payload carries
`task_id` (the key: one sequence per publisher), `seq` (0, 1, 2, ... per key;
negative for unmeasured primers) and `sent_ns` (the publisher's wall clock).
"""

from __future__ import annotations

import enum
from dataclasses import dataclass, field
from typing import Any

import orjson


@dataclass(slots=True, frozen=True)
class Delivery:
    key: str
    seq: int
    sent_ns: int


def _delivery(payload: Any, prefix: str) -> Delivery | None:
    if not isinstance(payload, dict):
        return None
    key, seq, sent = payload.get("task_id"), payload.get("seq"), payload.get("sent_ns")
    if not isinstance(key, str) or not key.startswith(prefix):
        return None
    if not isinstance(seq, int) or not isinstance(sent, int):
        return None
    return Delivery(key, seq, sent)


def parse_legacy(frame: str, prefix: str) -> Delivery | None:
    """The delivery of one legacy frame (one hub message per frame), if it is ours."""
    try:
        message = orjson.loads(frame)
    except orjson.JSONDecodeError:
        return None
    if not isinstance(message, dict):
        return None
    return _delivery(message.get("payload"), prefix)


@dataclass(slots=True)
class ChannelFrame:
    """One Centrifuge frame: several JSON lines joined by "\\n"."""

    deliveries: list[Delivery] = field(default_factory=list)
    # Server pings (`{}` lines); each wants a `{}` answer.
    pings: int = 0
    # Replies to commands, by command id.
    replies: dict[int, dict[str, Any]] = field(default_factory=dict)
    # Disconnect pushes' codes (the server says goodbye in-band before closing).
    disconnects: list[int] = field(default_factory=list)


def parse_channel(frame: str, prefix: str) -> ChannelFrame:
    out = ChannelFrame()
    for line in frame.split("\n"):
        if line == "{}":
            out.pings += 1
            continue
        if not line:
            continue
        try:
            message = orjson.loads(line)
        except orjson.JSONDecodeError:
            continue
        if not isinstance(message, dict):
            continue
        command_id = message.get("id")
        if isinstance(command_id, int) and command_id > 0:
            out.replies[command_id] = message
            continue
        push = message.get("push")
        if not isinstance(push, dict):
            continue
        pub = push.get("pub")
        if isinstance(pub, dict):
            delivery = _delivery(pub.get("data"), prefix)
            if delivery is not None:
                out.deliveries.append(delivery)
        disconnect = push.get("disconnect")
        if isinstance(disconnect, dict) and isinstance(disconnect.get("code"), int):
            out.disconnects.append(disconnect["code"])
    return out


class Order(enum.Enum):
    IN_ORDER = "in order"
    # A later sequence number came before an earlier one was seen (maybe lost).
    GAP = "gap"
    # A sequence number seen before.
    DUPLICATE = "duplicate"
    # An earlier sequence number than the last one, not seen before.
    REORDERED = "reordered"


@dataclass(slots=True)
class _KeyState:
    last: int = -1
    seen: set[int] = field(default_factory=set)


@dataclass(slots=True)
class SequenceTracker:
    """Measured sequence numbers (>= 0) one subscriber received, per key."""

    keys: dict[str, _KeyState] = field(default_factory=dict)
    gaps: int = 0
    duplicates: int = 0
    reordered: int = 0

    def observe(self, key: str, seq: int) -> Order:
        state = self.keys.get(key)
        if state is None:
            state = self.keys[key] = _KeyState()
        if seq in state.seen:
            self.duplicates += 1
            return Order.DUPLICATE
        state.seen.add(seq)
        if seq < state.last:
            self.reordered += 1
            return Order.REORDERED
        expected = state.last + 1
        state.last = seq
        if seq != expected:
            self.gaps += 1
            return Order.GAP
        return Order.IN_ORDER

    def received(self, key: str) -> int:
        state = self.keys.get(key)
        return 0 if state is None else len(state.seen)

    def missing(self, published: dict[str, tuple[int, frozenset[int]]]) -> int:
        """Published sequence numbers this subscriber never received. `published` maps
        each key to (n, failed): numbers 0..n-1 were sent, those in `failed` were
        refused by the ingest and are not owed to anyone."""
        lost = 0
        for key, (count, failed) in published.items():
            state = self.keys.get(key)
            if state is None:
                lost += count - len(failed)
                continue
            got = len(state.seen)
            if state.last >= count:
                got -= sum(1 for seq in state.seen if seq >= count)
            got -= sum(1 for seq in failed if seq in state.seen)
            lost += count - len(failed) - got
        return lost
