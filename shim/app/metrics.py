"""Prometheus metrics: names follow Centrifuge's (`centrifuge_node_num_clients` ...)
under our own prefix, with a `protocol` label where both protocols count.

Gauges and counters are read from the runtime at scrape time (the hot paths bump
plain integers, see shim.core.node.NodeCounters); only the histograms are observed as
things happen. Each Runtime has its own registry, so several nodes can live in one
process (tests).
"""

from __future__ import annotations

import bisect
import itertools
from collections.abc import Iterator
from typing import TYPE_CHECKING

from prometheus_client import CollectorRegistry, Histogram, generate_latest
from prometheus_client.core import (
    CounterMetricFamily,
    GaugeMetricFamily,
    HistogramMetricFamily,
    Metric,
)
from prometheus_client.registry import Collector
from prometheus_client.utils import floatToGoString

from shim.centrifuge.fanout import CentrifugeFanout

if TYPE_CHECKING:
    from shim.app.runtime import Runtime

PREFIX = "dex_shim"
CONTENT_TYPE = "text/plain; version=0.0.4; charset=utf-8"


class Histograms:
    """The node's Observer: command latency and publish-to-enqueue latency."""

    def __init__(self, registry: CollectorRegistry) -> None:
        self._commands = Histogram(
            f"{PREFIX}_client_command_duration_seconds",
            "Time to handle one Centrifuge client command, by method.",
            ["method"],
            registry=registry,
            buckets=(0.0005, 0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1, 2.5),
        )
        self._publish = BucketCounts(
            f"{PREFIX}_node_publish_to_enqueue_seconds",
            "Time from a publish call to the last local subscriber queue append.",
            (0.0005, 0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 1),
        )
        registry.register(self._publish)
        self._by_method: dict[str, Histogram] = {}

    def command(self, method: str, seconds: float) -> None:
        child = self._by_method.get(method)
        if child is None:
            child = self._by_method[method] = self._commands.labels(method)
        child.observe(seconds)

    def publish_to_enqueue(self, seconds: float) -> None:
        self._publish.observe(seconds)


class BucketCounts(Collector):
    """A histogram observed once per publication: plain integers, exported at scrape
    time (prometheus_client's observe takes a lock and walks every bucket, about
    5 us, as much as fanning a publication out to a few subscribers)."""

    def __init__(self, name: str, documentation: str, bounds: tuple[float, ...]) -> None:
        self.name = name
        self.documentation = documentation
        self.bounds = bounds
        # counts[i]: observations in (bounds[i-1], bounds[i]]; the last one, above all.
        self.counts = [0] * (len(bounds) + 1)
        self.sum = 0.0

    def observe(self, value: float) -> None:
        self.counts[bisect.bisect_left(self.bounds, value)] += 1
        self.sum += value

    def collect(self) -> Iterator[Metric]:
        cumulative = list(itertools.accumulate(self.counts))
        labels = [*map(floatToGoString, self.bounds), "+Inf"]
        yield HistogramMetricFamily(
            self.name,
            self.documentation,
            buckets=list(zip(labels, cumulative, strict=True)),
            sum_value=self.sum,
        )


class RuntimeCollector(Collector):
    def __init__(self, runtime: Runtime) -> None:
        self.runtime = runtime

    def collect(self) -> Iterator[Metric]:
        runtime = self.runtime
        node = runtime.node
        counters = node.counters
        node_label = node.name

        clients = GaugeMetricFamily(
            f"{PREFIX}_node_num_clients",
            "Connected clients by protocol.",
            labels=["node", "protocol"],
        )
        for protocol, count in runtime.connection_counts().items():
            clients.add_metric([node_label, protocol], count)
        yield clients
        yield _transport_clients(runtime, node_label)

        users: set[str] = set()
        queued = 0
        subscriptions = 0
        for session in node.sessions:
            if session.user:
                users.add(session.user)
            queued += session.outbox.size
            subscriptions += session.subscription_count
        yield _gauge("node_num_users", "Distinct users connected to this node.", len(users))
        yield _gauge(
            "node_num_channels", "Channels with local subscribers.", sum(1 for _ in node.channels())
        )
        yield _gauge(
            "node_num_subscriptions",
            "Subscriptions of local clients (both protocols).",
            subscriptions,
        )
        yield _gauge("client_queue_bytes", "Bytes waiting in client queues.", queued)
        streams = getattr(runtime.broker, "stream_count", None)
        if isinstance(streams, int):
            yield _gauge("memory_streams", "History streams the memory engine keeps.", streams)

        publications = CounterMetricFamily(
            f"{PREFIX}_node_publications",
            "Publications from the broker that reached local subscribers, by protocol.",
            labels=["protocol"],
        )
        for protocol, count in counters.publications.items():
            publications.add_metric([protocol], count)
        yield publications

        deliveries = CounterMetricFamily(
            f"{PREFIX}_node_messages_sent",
            "Publications appended to client queues, by protocol.",
            labels=["protocol"],
        )
        for protocol, count in counters.deliveries.items():
            deliveries.add_metric([protocol], count)
        yield deliveries

        disconnects = CounterMetricFamily(
            f"{PREFIX}_client_num_server_disconnects",
            "Server-initiated disconnects by protocol and code (3008 = slow).",
            labels=["protocol", "code"],
        )
        for (protocol, code), count in sorted(counters.disconnects.items()):
            disconnects.add_metric([protocol, str(code)], count)
        yield disconnects

        ingested = CounterMetricFamily(
            f"{PREFIX}_ingest_events",
            "Ingested legacy hub messages by event type and result.",
            labels=["type", "result"],
        )
        for (event_type, result), count in sorted(runtime.ingestor.stats.counts.items()):
            ingested.add_metric([event_type, result], count)
        yield ingested

        yield from _stream_metrics(runtime)

        broker_errors = CounterMetricFamily(
            f"{PREFIX}_broker_errors", "Failed broker operations.", labels=["operation"]
        )
        for operation, count in sorted(counters.broker_errors.items()):
            broker_errors.add_metric([operation], count)
        yield broker_errors

        legacy = runtime.legacy_stats
        ignored = CounterMetricFamily(
            f"{PREFIX}_legacy_ignored_commands",
            "Legacy client commands ignored as the Go hub did.",
            labels=["reason"],
        )
        ignored.add_metric(["malformed"], legacy.malformed_commands)
        ignored.add_metric(["unknown_action"], legacy.unknown_actions)
        ignored.add_metric(["rate_limited"], legacy.limited_commands)
        yield ignored
        yield CounterMetricFamily(
            f"{PREFIX}_legacy_refused_subscriptions",
            "Legacy task/project subscriptions the channel policy refused (ignored).",
            value=legacy.refused_subscriptions,
        )
        yield CounterMetricFamily(
            f"{PREFIX}_legacy_unreadable_events",
            "Events not passed to a legacy `*` client: its user may read none of their channels.",
            value=legacy.unreadable_events,
        )

        limited = CounterMetricFamily(
            f"{PREFIX}_limits_refused",
            "Connections, commands, subscriptions and publications refused by a limit.",
            labels=["limit"],
        )
        for limit, count in sorted(counters.limited.items()):
            limited.add_metric([limit], count)
        yield limited

        cutover = runtime.cutover
        mode = GaugeMetricFamily(
            f"{PREFIX}_cutover_mode", "1 for the current cutover mode.", labels=["mode"]
        )
        for name in ("legacy", "dual", "channels"):
            mode.add_metric([name], 1 if cutover.mode.value == name else 0)
        yield mode
        yield _gauge(
            "cutover_channels_percent",
            "Share of users told to use channels in dual mode.",
            cutover.channels_percent,
        )
        yield _gauge(
            "cutover_cohort_users",
            "Users on the allow list (always channels).",
            len(cutover.allow_users),
        )


def _transport_clients(runtime: Runtime, node_label: str) -> GaugeMetricFamily:
    """Centrifuge clients by transport: how many users the fallbacks serve (those whose
    network or browser broke WebSocket)."""
    counts: dict[str, int] = {}
    for session in runtime.node.sessions:
        if session.protocol == CentrifugeFanout.protocol:
            name = session.transport.transport_name
            counts[name] = counts.get(name, 0) + 1
    family = GaugeMetricFamily(
        f"{PREFIX}_node_num_clients_by_transport",
        "Connected Centrifuge clients by transport (websocket, http_stream, sse, uni_*).",
        labels=["node", "transport"],
    )
    for name, count in sorted(counts.items()):
        family.add_metric([node_label, name], count)
    return family


def _gauge(name: str, documentation: str, value: float) -> GaugeMetricFamily:
    return GaugeMetricFamily(f"{PREFIX}_{name}", documentation, value=value)


class Metrics:
    def __init__(self, runtime: Runtime) -> None:
        self.registry = CollectorRegistry(auto_describe=False)
        self.histograms = Histograms(self.registry)
        self.registry.register(RuntimeCollector(runtime))

    def render(self) -> bytes:
        return generate_latest(self.registry)


def _stream_metrics(runtime: Runtime) -> Iterator[Metric]:
    """What this node did of the ingest stream (docs/stream-ingest.md), when configured."""
    consumer = runtime.stream_consumer
    if consumer is None:
        return
    stats = consumer.stats
    activity = CounterMetricFamily(
        f"{PREFIX}_ingest_stream",
        "Stream ingest on this node: entries split to partitions, entries published and "
        "committed, events superseded (already in a channel), entries refused, batches "
        "fenced (lease lost), partition leases acquired and released, failures.",
        labels=["kind"],
    )
    for kind in ("split", "consumed", "superseded", "refused", "fenced", "acquired", "released"):
        activity.add_metric([kind], getattr(stats, kind))
    activity.add_metric(["failures"], stats.failures)
    yield activity
    yield GaugeMetricFamily(
        f"{PREFIX}_ingest_stream_partitions_held",
        "Stream partitions this node publishes now.",
        value=consumer.partitions_held,
    )
