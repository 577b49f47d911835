"""What the console's dashboard shows, read from a running node (never changed here)."""

from __future__ import annotations

import heapq
import logging
import time
from typing import TYPE_CHECKING, Any

from shim.centrifuge import codes

if TYPE_CHECKING:
    from shim.app.runtime import Runtime

log = logging.getLogger("shim.console")

# Channels listed in "top channels"; the rest only count towards the total.
TOP_CHANNELS = 10


def top_channels(runtime: Runtime, limit: int = TOP_CHANNELS) -> list[dict[str, Any]]:
    """This node's channels with the most local subscribers (both protocols), ties by name."""
    node = runtime.node
    counts = {channel: node.subscriber_count(channel) for channel in list(node.channels())}
    busiest = heapq.nsmallest(limit, counts, key=lambda channel: (-counts[channel], channel))
    return [{"channel": channel, "subscribers": counts[channel]} for channel in busiest]


def disconnects(runtime: Runtime) -> list[dict[str, Any]]:
    """Server-initiated disconnects of this node since start, by protocol and code."""
    return [
        {"protocol": protocol, "code": code, "count": count}
        for (protocol, code), count in sorted(runtime.node.counters.disconnects.items())
    ]


async def overview(runtime: Runtime) -> dict[str, Any]:
    nodes_error = None
    try:
        nodes = await runtime.nodes()
    except Exception:  # the cluster view needs Redis; this node's own numbers do not
        log.warning("console: the node list is unavailable", exc_info=True)
        nodes = {runtime.node.name: runtime.connection_counts()}
        nodes_error = "node list unavailable (Redis): showing this node only"
    totals = {"legacy": 0, "channels": 0}
    for counts in nodes.values():
        for protocol in totals:
            totals[protocol] += counts.get(protocol, 0)
    by_code = disconnects(runtime)
    slow = {"legacy": 0, "channels": 0}
    for row in by_code:
        if row["code"] == codes.SLOW.code and row["protocol"] in slow:
            slow[row["protocol"]] += row["count"]
    stats = runtime.legacy_stats
    return {
        "time": time.time(),
        "node": runtime.node.name,
        "engine": runtime.settings.engine,
        "nodes": nodes,
        "nodes_error": nodes_error,
        "totals": totals,
        "connections": runtime.connection_counts(),
        "channels": {
            "count": sum(1 for _ in runtime.node.channels()),
            "top": top_channels(runtime),
        },
        "slow_disconnects": slow,
        "disconnects": by_code,
        "cutover": runtime.cutover.as_dict(),
        "legacy": {
            "malformed_commands": stats.malformed_commands,
            "unknown_actions": stats.unknown_actions,
            "refused_subscriptions": stats.refused_subscriptions,
            "unreadable_events": stats.unreadable_events,
        },
    }
