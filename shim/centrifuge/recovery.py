"""Where a new subscription starts in its channel's stream, and the recovery of what
a reconnecting client missed (Centrifuge protocol v2: `recover` with the offset and
epoch the client last saw). Recovered only when history holds every publication
since that offset, up to the top of the stream."""

from __future__ import annotations

from typing import Any

from shim.centrifuge import codes
from shim.centrifuge.codec import SubscribeRequest
from shim.centrifuge.errors import Reject
from shim.centrifuge.subscriptions import Subscription
from shim.core.broker import (
    Broker,
    HistoryResult,
    PublishOptions,
    StreamPosition,
    UnrecoverablePosition,
)

# SubscribeRequest.flag bit: the client prefers error 112 over recovered=false.
FLAG_REJECT_UNRECOVERED = 2


async def subscribe_position(
    broker: Broker,
    options: PublishOptions,
    sub: Subscription,
    request: SubscribeRequest | None,
) -> tuple[dict[str, Any], StreamPosition]:
    """The subscribe result's stream fields (and recovered publications), and the
    position the subscription goes live from."""
    result: dict[str, Any] = {}
    if not sub.positioned:
        return result, StreamPosition(0, "")
    result["positioned"] = True
    if sub.recoverable:
        result["recoverable"] = True
    recovering = bool(sub.recoverable and request is not None and request.recover)
    if not recovering:
        current = (await broker.history(sub.channel, limit=0, options=options)).position
        result["epoch"], result["offset"] = current.epoch, current.offset
        return result, current

    assert request is not None
    result["was_recovering"] = True
    since = StreamPosition(request.offset, request.epoch)
    history: HistoryResult | None
    try:
        history = await broker.history(sub.channel, since=since, limit=-1, options=options)
    except UnrecoverablePosition:
        history = None
    recovered = False
    if history is not None:
        pubs, stream_top = history.publications, history.position.offset
        if pubs:
            recovered = pubs[0].offset == since.offset + 1 and pubs[-1].offset == stream_top
        else:
            recovered = stream_top == since.offset
    if not recovered:
        if request.flag & FLAG_REJECT_UNRECOVERED:
            raise Reject(codes.UNRECOVERABLE_POSITION)
        if history is None:
            history = await broker.history(sub.channel, limit=0, options=options)
        current = history.position
        result["epoch"], result["offset"] = current.epoch, current.offset
        return result, current
    assert history is not None
    result["recovered"] = True
    result["epoch"] = history.position.epoch
    result["offset"] = since.offset
    if history.publications:
        result["publications"] = history.publications
    return result, history.position
