"""The one internal event model: what the backend said happened.

A legacy hub message and a channel publication are two encodings of an Event;
each is produced once per event (legacy frame) or once per publication (channel
push), never per client.
"""

from __future__ import annotations

import itertools
import os
from dataclasses import dataclass, field
from typing import Any

# Event ids: a random per-process prefix and a counter. Unique across nodes and
# restarts like a UUID (64 random bits per process), without a urandom call per event.
_ID_PREFIX = os.urandom(8).hex()
_ID_COUNTER = itertools.count(1)


def new_event_id() -> str:
    return f"{_ID_PREFIX}{next(_ID_COUNTER):016x}"  # 32 hex digits, as a UUID's


@dataclass(slots=True, frozen=True)
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
