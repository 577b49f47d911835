"""Does a slow client block the others? A headless locust scenario with a verdict.

For each share of stalled clients (default 0 %, 10 %, 50 %) one phase runs: fast
subscribers of both protocols (legacy hub and Centrifuge, spread over the nodes),
a few slow ones, and the stalled ones connect and subscribe; publishers POST
legacy hub messages to the first node at a fixed rate for `--duration` seconds;
then the fast clients must have received every publication of every key, in
order, once. The table shows the fast clients' publish-to-receive latency per
phase, their loss, when the server cut the stalled clients off (its session
count, through the admin API), and the server's RSS.

    .venv/bin/python -m loadtests.scenario                 # starts its own node
    .venv/bin/python -m loadtests.scenario --nodes 2       # two nodes on a fresh Redis
    .venv/bin/python -m loadtests.scenario --host http://127.0.0.1:8000 \\
        --host http://127.0.0.1:8001 --api-key ... --signing-key-file dev.pem --admin-key ...

Exit status: 0 when the verdict passes, 1 when it fails, 2 when the run could not
be made. Traffic stays where the nodes are; every wait has a deadline.
"""

from __future__ import annotations

import argparse
import math
import resource
import secrets
import sys
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import gevent  # type: ignore[import-untyped]
import orjson
from locust.env import Environment
from locust.runners import LocalRunner
from locust.stats import print_stats

from loadtests.measure_core import raise_fd_limit
from loadtests.servers import Cluster, attach_cluster, started_cluster
from loadtests.users import BOARD, Counts, Plan, Record, Stage, concrete_users
from loadtests.verdict import Bound, Latency, PhaseResult, as_json, evaluate, render_table

# Settings a started node gets from the scenario itself; `--set` may not change them.
RESERVED_SETTINGS = frozenset(
    {"host", "port", "token_algorithm", "token_key", "api_key", "admin_api_key", "engine"}
)
FAST_NAMES = {"deliver legacy": "legacy", "deliver channel": "channel"}


@dataclass(slots=True, frozen=True)
class Options:
    fast: int = 200
    slow: int = 10
    protocols: tuple[str, ...] = ("legacy", "channel")
    stalled_percents: tuple[float, ...] = (0.0, 10.0, 50.0)
    # The phases run this many times, interleaved, and the verdict compares median
    # p99s: on a shared machine one phase's p99 moves by a third between runs.
    rounds: int = 3
    rate: float = 50.0
    publishers: int = 2
    payload_bytes: int = 2048
    duration: float = 20.0
    warmup: float = 3.0
    drain_timeout: float = 15.0
    connect_timeout: float = 20.0
    spawn_rate: float = 100.0
    stalled_rcvbuf: int = 4096
    stalled_mss: int = 1460
    slow_bytes_per_second: int = 8192
    bound: Bound = field(default_factory=Bound)
    locust_stats: bool = False


# --- counts ----------------------------------------------------------------------------


def split(total: int, protocols: Sequence[str]) -> dict[str, int]:
    """`total` clients over the protocols, the first getting the odd one."""
    shares = {p: total // len(protocols) for p in protocols}
    for protocol in protocols[: total % len(protocols)]:
        shares[protocol] += 1
    return {p: shares.get(p, 0) for p in ("legacy", "channel")}


def stalled_for(fast: int, slow: int, percent: float) -> int:
    """Stalled clients making `percent` of all subscribers, the others staying as they are
    (so every phase measures the same fast clients)."""
    if percent <= 0:
        return 0
    others = fast + slow
    return math.ceil(others * percent / (100 - percent))


def phase_counts(options: Options, percent: float, fast: int, slow: int) -> Counts:
    f, s = split(fast, options.protocols), split(slow, options.protocols)
    st = split(stalled_for(fast, slow, percent), options.protocols)
    return Counts(
        legacy_fast=f["legacy"],
        channel_fast=f["channel"],
        legacy_slow=s["legacy"],
        channel_slow=s["channel"],
        legacy_stalled=st["legacy"],
        channel_stalled=st["channel"],
        publishers=options.publishers,
    )


# --- one phase ----------------------------------------------------------------------------


def _wait(condition: Callable[[], bool], timeout: float, step: float = 0.1) -> bool:
    deadline = time.monotonic() + timeout
    while not condition():
        if time.monotonic() >= deadline:
            return False
        gevent.sleep(step)
    return True


class CutoffWatch:
    """Polls the nodes' session counts; notes when stalled sessions disappear."""

    def __init__(self, cluster: Cluster, counts: Counts) -> None:
        self.cluster = cluster
        self.stalled = {"legacy": counts.legacy_stalled, "channels": counts.channel_stalled}
        self.baseline: dict[str, int] | None = None
        self.cut: dict[str, int] = {"legacy": 0, "channels": 0}
        self.first: float | None = None
        self.all: float | None = None
        self.rss_peak: int | None = None
        self.started = 0.0
        self.stopped = False
        self._greenlet: gevent.Greenlet[Any, Any] | None = None

    def start(self) -> None:
        self.baseline = self.cluster.sessions()
        self.started = time.monotonic()
        self._greenlet = gevent.spawn(self._run)

    def stop(self) -> None:
        """Last reading; later ones would count stalled clients leaving by themselves."""
        if self.stopped:
            return
        self.stopped = True
        if self._greenlet is not None:
            self._greenlet.kill(block=True, timeout=10)
            self._sample()

    def _run(self) -> None:
        while True:
            self._sample()
            gevent.sleep(0.2)

    def _sample(self) -> None:
        rss = self.cluster.rss_kib()
        if rss is not None:
            self.rss_peak = max(rss, self.rss_peak or 0)
        if self.baseline is None or not any(self.stalled.values()):
            return
        now = self.cluster.sessions()
        if now is None:
            return
        elapsed = time.monotonic() - self.started
        for protocol, stalled in self.stalled.items():
            gone = max(0, self.baseline[protocol] - now[protocol])
            self.cut[protocol] = max(self.cut[protocol], min(stalled, gone))
        total = sum(self.cut.values())
        if total and self.first is None:
            self.first = elapsed
        if total >= sum(self.stalled.values()) and self.all is None:
            self.all = elapsed

    @property
    def stalled_cut(self) -> int | None:
        return None if self.baseline is None else sum(self.cut.values())


class Collector:
    """Fast deliveries' latencies, from the same request events locust's stats count."""

    def __init__(self) -> None:
        self.latencies: dict[str, list[float]] = {"legacy": [], "channel": []}
        self.bytes = 0

    def on_request(self, name: str, response_time: float, response_length: int, **_: Any) -> None:
        protocol = FAST_NAMES.get(name)
        if protocol is not None:
            self.latencies[protocol].append(response_time)
            self.bytes += response_length


def _phase_result(
    percent: float,
    counts: Counts,
    records: Sequence[Record],
    collector: Collector,
    watch: CutoffWatch,
    env: Environment,
    publish_seconds: float,
    rss_before: int | None,
    rss_after: int | None,
    cpu: tuple[float, float | None],
) -> PhaseResult:
    published = BOARD.published()
    owed = sum(count - len(refused) for count, refused in published.values())
    fast = [r for r in records if r.role == "fast"]
    slow = [r for r in records if r.role == "slow"]
    stalled = [r for r in records if r.role == "stalled"]
    connected = [r for r in records if not r.error]
    post = env.stats.get("broadcast", "POST")
    return PhaseResult(
        stalled_percent=percent,
        fast=counts.legacy_fast + counts.channel_fast,
        slow=counts.legacy_slow + counts.channel_slow,
        stalled=counts.legacy_stalled + counts.channel_stalled,
        connect_errors=counts.subscribers - len(connected),
        not_ready=sum(1 for r in connected if not r.ready),
        publications=sum(count for count, _ in published.values()),
        refused_publications=sum(len(refused) for _, refused in published.values()),
        publish_seconds=publish_seconds,
        fast_expected=owed * len(fast),
        fast_lost=sum(r.tracker.missing(published) for r in fast if not r.error)
        + owed * sum(1 for r in fast if r.error),
        sequence_errors=sum(
            r.tracker.gaps + r.tracker.duplicates + r.tracker.reordered for r in fast
        ),
        fast_disconnects=sum(1 for r in fast if r.close_code is not None),
        latency=Latency.of(collector.latencies["legacy"] + collector.latencies["channel"]),
        legacy_latency=Latency.of(collector.latencies["legacy"]),
        channel_latency=Latency.of(collector.latencies["channel"]),
        slow_delivered=sum(sum(len(k.seen) for k in r.tracker.keys.values()) for r in slow),
        slow_disconnects=sum(1 for r in slow if r.close_code is not None),
        stalled_cut=watch.stalled_cut,
        cutoff_first_s=watch.first,
        cutoff_all_s=watch.all,
        stalled_saw_3008=sum(1 for r in stalled if r.close_code == 3008),
        rss_before_kib=rss_before,
        rss_peak_kib=watch.rss_peak,
        rss_after_kib=rss_after,
        post_p50_ms=post.get_response_time_percentile(0.5) if post.num_requests else math.nan,
        offered_kib_per_second=collector.bytes
        / 1024
        / max(1, counts.legacy_fast + counts.channel_fast)
        / publish_seconds,
        client_cpu_percent=cpu[0],
        server_cpu_percent=cpu[1],
    )


def _own_cpu_seconds() -> float:
    usage = resource.getrusage(resource.RUSAGE_SELF)
    return usage.ru_utime + usage.ru_stime


def _cpu_percent(
    client_before: float, server_before: float | None, cluster: Cluster, seconds: float
) -> tuple[float, float | None]:
    client = (_own_cpu_seconds() - client_before) / seconds * 100
    server_now = cluster.cpu_seconds()
    if server_before is None or server_now is None:
        return client, None
    return client, (server_now - server_before) / seconds * 100


def run_phase(
    cluster: Cluster, options: Options, percent: float, *, fast: int, slow: int, duration: float
) -> PhaseResult:
    counts = phase_counts(options, percent, fast, slow)
    plan = Plan(
        run_id=f"load-{secrets.token_hex(4)}",
        ws_bases=tuple(node.ws_base for node in cluster.nodes),
        publish_url=cluster.nodes[0].http_url,
        api_key=cluster.api_key,
        signing_key=cluster.signing_key,
        token_algorithm=cluster.token_algorithm,
        publishers=options.publishers,
        rate=options.rate,
        payload_bytes=options.payload_bytes,
        stalled_rcvbuf=options.stalled_rcvbuf,
        stalled_mss=options.stalled_mss or None,
        slow_bytes_per_second=options.slow_bytes_per_second,
        connect_timeout=options.connect_timeout,
        max_seconds=duration + options.drain_timeout + options.connect_timeout + 120,
    )
    BOARD.reset(plan)
    collector = Collector()
    env = Environment(user_classes=concrete_users(counts, plan), host=plan.publish_url)
    env.events.request.add_listener(collector.on_request)  # type: ignore[no-untyped-call]
    runner: LocalRunner = env.create_local_runner()
    rss_before = cluster.rss_kib()
    watch = CutoffWatch(cluster, counts)
    try:
        runner.start(counts.total, spawn_rate=options.spawn_rate)
        records = BOARD.records
        # Every subscriber connected (or failed to).
        _wait(
            lambda: (
                len(records) == counts.subscribers
                and all(r.error or r.left or r.connected for r in records)
            ),
            counts.total / options.spawn_rate + options.connect_timeout + 5,
        )
        BOARD.enter(Stage.PRIMING)
        _wait(lambda: all(r.ready or r.error or r.left for r in records), options.connect_timeout)
        watch.start()
        client_cpu, server_cpu = _own_cpu_seconds(), cluster.cpu_seconds()
        BOARD.enter(Stage.PUBLISHING)
        began = time.monotonic()
        gevent.sleep(duration)
        BOARD.enter(Stage.DRAINING)
        publish_seconds = time.monotonic() - began
        cpu = _cpu_percent(client_cpu, server_cpu, cluster, publish_seconds)
        published = BOARD.published()
        _wait(
            lambda: all(
                r.error or r.close_code is not None or r.tracker.missing(published) == 0
                for r in records
                if r.role == "fast"
            ),
            options.drain_timeout,
            step=0.2,
        )
        watch.stop()
        BOARD.enter(Stage.DONE)
        _wait(lambda: runner.user_count == 0, 15)
    finally:
        watch.stop()
        BOARD.enter(Stage.DONE)
        runner.quit()
    # Give the server a moment to free what the departed clients held.
    gevent.sleep(1.0)
    if options.locust_stats:
        print_stats(env.stats)
    return _phase_result(
        percent,
        counts,
        records,
        collector,
        watch,
        env,
        publish_seconds,
        rss_before,
        cluster.rss_kib(),
        cpu,
    )


def run_scenario(cluster: Cluster, options: Options) -> list[PhaseResult]:
    if options.warmup > 0:
        # Unmeasured: first connections, first publications, lazy imports.
        run_phase(
            cluster,
            options,
            0.0,
            fast=min(options.fast, 20),
            slow=0,
            duration=options.warmup,
        )
    return [
        run_phase(
            cluster,
            options,
            percent,
            fast=options.fast,
            slow=options.slow,
            duration=options.duration,
        )
        for _ in range(options.rounds)
        for percent in options.stalled_percents
    ]


# --- command line -----------------------------------------------------------------------


def _floats(text: str) -> tuple[float, ...]:
    values = tuple(float(part) for part in text.split(",") if part.strip())
    if not values or any(not 0 <= v < 100 for v in values):
        raise argparse.ArgumentTypeError("expected comma-separated percentages in [0, 100)")
    return values


def build_parser() -> argparse.ArgumentParser:
    d = Options()
    parser = argparse.ArgumentParser(
        prog="python -m loadtests.scenario",
        description=__doc__,
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    where = parser.add_argument_group("where")
    where.add_argument(
        "--host",
        action="append",
        default=[],
        metavar="URL",
        help="a running node (repeat for several; publishers use the first). "
        "Without it the scenario starts its own nodes.",
    )
    where.add_argument("--nodes", type=int, default=1, help="nodes to start (>1: on a fresh Redis)")
    where.add_argument(
        "--set",
        action="append",
        default=[],
        metavar="FIELD=VALUE",
        help="setting of the started nodes, e.g. websocket_write_timeout_seconds=2",
    )
    where.add_argument("--api-key", default="", help="X-API-Key of the running nodes")
    where.add_argument("--signing-key-file", default="", help="key that signs client tokens")
    where.add_argument("--token-algorithm", default="EdDSA")
    where.add_argument("--admin-key", default="", help="X-Admin-Key (for the cut-off times)")
    load = parser.add_argument_group("load")
    load.add_argument(
        "--fast", type=int, default=d.fast, help="fast subscribers (split over protocols)"
    )
    load.add_argument("--slow", type=int, default=d.slow, help="trickle readers")
    load.add_argument("--protocols", default=",".join(d.protocols), help="legacy,channel")
    load.add_argument(
        "--stalled-percents",
        type=_floats,
        default=d.stalled_percents,
        help="phases: share of all subscribers that stall, e.g. 0,10,50",
    )
    load.add_argument(
        "--rounds",
        type=int,
        default=d.rounds,
        help="run the phases this many times, interleaved; the verdict compares median p99s",
    )
    load.add_argument("--rate", type=float, default=d.rate, help="publications per second")
    load.add_argument("--publishers", type=int, default=d.publishers, help="one key (channel) each")
    load.add_argument("--payload-bytes", type=int, default=d.payload_bytes)
    load.add_argument("--duration", type=float, default=d.duration, help="seconds of publishing")
    load.add_argument(
        "--warmup", type=float, default=d.warmup, help="seconds of unmeasured warm-up"
    )
    load.add_argument("--drain-timeout", type=float, default=d.drain_timeout)
    load.add_argument("--connect-timeout", type=float, default=d.connect_timeout)
    load.add_argument(
        "--spawn-rate", type=float, default=d.spawn_rate, help="connections per second"
    )
    load.add_argument("--stalled-rcvbuf", type=int, default=d.stalled_rcvbuf)
    load.add_argument(
        "--stalled-mss", type=int, default=d.stalled_mss, help="0: loopback's own segment size"
    )
    load.add_argument("--slow-bytes-per-second", type=int, default=d.slow_bytes_per_second)
    verdict = parser.add_argument_group("verdict")
    verdict.add_argument("--p99-factor", type=float, default=d.bound.factor)
    verdict.add_argument(
        "--p99-slack-ms",
        type=float,
        default=d.bound.slack_ms,
        help="the bound is max(factor x baseline p99, baseline p99 + slack)",
    )
    verdict.add_argument(
        "--bound-percent",
        type=float,
        default=d.bound.percent,
        help="the phase held to the bound (baseline: the 0 %% phase)",
    )
    verdict.add_argument(
        "--require-cutoff",
        action="store_true",
        help="also fail unless every stalled client was cut off in its phase",
    )
    out = parser.add_argument_group("output")
    out.add_argument("--json", action="store_true", help="print JSON instead of the table")
    out.add_argument("--locust-stats", action="store_true", help="print locust's stats per phase")
    return parser


def parse_args(argv: Sequence[str] | None) -> tuple[Options, argparse.Namespace]:
    parser = build_parser()
    args = parser.parse_args(argv)
    protocols = tuple(p.strip() for p in args.protocols.split(",") if p.strip())
    if not protocols or set(protocols) - {"legacy", "channel"}:
        parser.error("--protocols takes legacy, channel or both")
    if args.fast < len(protocols) or args.publishers < 1 or args.rate <= 0 or args.duration <= 0:
        parser.error(
            "need at least one fast client per protocol, a publisher, a rate and a duration"
        )
    if args.rounds < 1:
        parser.error("--rounds must be at least 1")
    if 0 not in args.stalled_percents:
        parser.error("--stalled-percents must include 0 (the baseline)")
    if args.host and (not args.api_key or not args.signing_key_file):
        parser.error("--host needs --api-key and --signing-key-file")
    for item in args.set:
        name, sep, _ = item.partition("=")
        if not sep or name.strip().lower() in RESERVED_SETTINGS:
            parser.error(
                f"--set expects FIELD=VALUE of a setting the scenario does not own: {item!r}"
            )
    options = Options(
        fast=args.fast,
        slow=args.slow,
        protocols=protocols,
        stalled_percents=args.stalled_percents,
        rounds=args.rounds,
        rate=args.rate,
        publishers=args.publishers,
        payload_bytes=args.payload_bytes,
        duration=args.duration,
        warmup=args.warmup,
        drain_timeout=args.drain_timeout,
        connect_timeout=args.connect_timeout,
        spawn_rate=args.spawn_rate,
        stalled_rcvbuf=args.stalled_rcvbuf,
        stalled_mss=args.stalled_mss,
        slow_bytes_per_second=args.slow_bytes_per_second,
        bound=Bound(args.p99_factor, args.p99_slack_ms, args.bound_percent, args.require_cutoff),
        locust_stats=args.locust_stats,
    )
    return options, args


def main(argv: Sequence[str] | None = None) -> int:
    options, args = parse_args(argv)
    most = (
        options.fast
        + options.slow
        + stalled_for(options.fast, options.slow, max(options.stalled_percents))
    )
    # Clients and (for started nodes) the server inherit this limit.
    raise_fd_limit(2 * most + 512)
    try:
        if args.host:
            cluster = attach_cluster(
                args.host,
                api_key=args.api_key,
                signing_key=Path(args.signing_key_file).read_text(),
                token_algorithm=args.token_algorithm,
                admin_key=args.admin_key,
            )
            results = run_scenario(cluster, options)
        else:
            settings = dict(item.split("=", 1) for item in args.set)
            with started_cluster(
                args.nodes, {k.strip().lower(): v for k, v in settings.items()}
            ) as cluster:
                results = run_scenario(cluster, options)
    except (OSError, RuntimeError) as exc:
        print(f"scenario could not run: {exc}", file=sys.stderr)
        return 2
    verdict = evaluate(results, options.bound)
    if args.json:
        print(
            orjson.dumps(
                as_json(results, verdict, options.bound), option=orjson.OPT_INDENT_2
            ).decode()
        )
    else:
        print(render_table(results, verdict, options.bound))
    return 0 if verdict.passed else 1


if __name__ == "__main__":
    sys.exit(main())
