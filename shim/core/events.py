"""The one internal event model: what the backend said happened.

A legacy hub message and a channel publication are two encodings of an Event;
each is produced once per event (legacy frame) or once per publication (channel
push), never per client.
"""

from __future__ import annotations

import functools
import itertools
import os
import time
from dataclasses import dataclass, field
from datetime import datetime, timedelta
from typing import Any

# Event ids: a random per-process prefix and a counter. Unique across nodes and
# restarts like a UUID (64 random bits per process), without a urandom call per event.
_ID_PREFIX = os.urandom(8).hex()
_ID_COUNTER = itertools.count(1)

_EPOCH = datetime(1970, 1, 1)
_NS_PER_SECOND = 1_000_000_000


def new_event_id() -> str:
    return f"{_ID_PREFIX}{next(_ID_COUNTER):016x}"  # 32 hex digits, as a UUID's


def go_timestamp(ns: int) -> str:
    """Go's `time.Time` JSON text in UTC for integer Unix nanoseconds.

    RFC 3339 with the fraction trimmed of trailing zeros and left out when zero,
    e.g. `2026-02-04T16:21:30.5Z`. Raises ValueError outside years 1-9999.
    """
    seconds, fraction = divmod(ns, _NS_PER_SECOND)
    text = _second_text(seconds)
    if fraction:
        text += "." + f"{fraction:09d}".rstrip("0")
    return text + "Z"


@functools.lru_cache(maxsize=4)
def _second_text(seconds: int) -> str:
    """`YYYY-MM-DDTHH:MM:SS` of a Unix second; cached, since the events of one
    ingest batch (and of one busy second) share it."""
    try:
        moment = _EPOCH + timedelta(seconds=seconds)
    except OverflowError as exc:
        raise ValueError(f"timestamp out of range: {seconds} s") from exc
    return (
        f"{moment.year:04d}-{moment.month:02d}-{moment.day:02d}"
        f"T{moment.hour:02d}:{moment.minute:02d}:{moment.second:02d}"
    )


def now_timestamp() -> str:
    """The current time as the hub stamped it (nanosecond clock, not datetime's microseconds)."""
    return go_timestamp(time.time_ns())


# Not frozen (a frozen dataclass costs several times as much to make, and ingest makes
# one per message); nothing changes an Event once made.
@dataclass(slots=True)
class Event:
    # Unique id, used to deliver an event once to a legacy client that reaches it
    # through several subscriptions, and to make ingest idempotent.
    id: str
    # Event name, e.g. "task.updated".
    type: str
    # The legacy payload object, key order as received.
    payload: dict[str, Any]
    # Publish time as Go's RFC 3339 UTC text (kept verbatim when the producer sent one).
    timestamp: str
    # Legacy top-level routing fields ("" when absent), kept for strict legacy matching.
    task_id: str = ""
    project_id: str = ""
    # Extra top-level fields exposed to channel clients (e.g. the activity's tool_use_id).
    extras: dict[str, Any] = field(default_factory=dict)
