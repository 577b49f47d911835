"""The scenario's users under locust's own command line or web UI, for exploring by hand
(the verdict comes from `python -m loadtests.scenario`, which drives the same users).

    .venv/bin/locust -f loadtests/locustfile.py --headless -t 60s \\
        --host http://127.0.0.1:8000 --dex-api-key ... --dex-signing-key-file dev.pem \\
        --dex-fast 100 --dex-stalled 20

One phase runs from start to stop: subscribers connect, primers flow until they are
all subscribed (at most --dex-prime-seconds), then measured publications until locust
stops. The "deliver legacy" / "deliver channel" rows are the fast clients'
publish-to-receive delays; their failures are sequence errors. Locust's -u and -r are
ignored: the counts come from the --dex-* options.
"""

from __future__ import annotations

import secrets
import time
from pathlib import Path
from typing import Any

import gevent  # type: ignore[import-untyped]
from locust import constant_throughput, events
from locust.env import Environment

from loadtests.users import (
    BOARD,
    ChannelFast,
    ChannelSlow,
    ChannelStalled,
    LegacyFast,
    LegacySlow,
    LegacyStalled,
    Plan,
    Publisher,
    Stage,
)


@events.init_command_line_parser.add_listener  # type: ignore[untyped-decorator]
def _options(parser: Any) -> None:
    group = parser.add_argument_group("dex-shim slow clients")
    group.add_argument("--dex-api-key", default="", help="X-API-Key of the nodes")
    group.add_argument("--dex-signing-key-file", default="", help="key that signs client tokens")
    group.add_argument("--dex-token-algorithm", default="EdDSA")
    group.add_argument(
        "--dex-ws-hosts", default="", help="comma-separated node URLs (default --host)"
    )
    group.add_argument("--dex-fast", type=int, default=100, help="fast subscribers per protocol")
    group.add_argument("--dex-slow", type=int, default=0, help="slow subscribers per protocol")
    group.add_argument(
        "--dex-stalled", type=int, default=0, help="stalled subscribers per protocol"
    )
    group.add_argument("--dex-rate", type=float, default=50.0, help="publications per second")
    group.add_argument("--dex-publishers", type=int, default=2)
    group.add_argument("--dex-payload-bytes", type=int, default=4096)
    group.add_argument("--dex-prime-seconds", type=float, default=30.0)


class LegacyFastUser(LegacyFast):
    abstract = False


class ChannelFastUser(ChannelFast):
    abstract = False


class LegacySlowUser(LegacySlow):
    abstract = False


class ChannelSlowUser(ChannelSlow):
    abstract = False


class LegacyStalledUser(LegacyStalled):
    abstract = False


class ChannelStalledUser(ChannelStalled):
    abstract = False


class PublisherUser(Publisher):
    abstract = False


@events.init.add_listener  # type: ignore[untyped-decorator]
def _plan(environment: Environment, **_: Any) -> None:
    options = environment.parsed_options
    if options is None or not environment.host or not options.dex_signing_key_file:
        return  # not a run of this file (e.g. `locust --help`)
    hosts = [h.strip() for h in (options.dex_ws_hosts or environment.host).split(",") if h.strip()]
    plan = Plan(
        run_id=f"load-{secrets.token_hex(4)}",
        ws_bases=tuple(h.replace("http", "ws", 1).rstrip("/") for h in hosts),
        publish_url=environment.host.rstrip("/"),
        api_key=options.dex_api_key,
        signing_key=Path(options.dex_signing_key_file).read_text(),
        token_algorithm=options.dex_token_algorithm,
        publishers=options.dex_publishers,
        rate=options.dex_rate,
        payload_bytes=options.dex_payload_bytes,
    )
    BOARD.reset(plan)
    counts = {
        LegacyFastUser: options.dex_fast,
        ChannelFastUser: options.dex_fast,
        LegacySlowUser: options.dex_slow,
        ChannelSlowUser: options.dex_slow,
        LegacyStalledUser: options.dex_stalled,
        ChannelStalledUser: options.dex_stalled,
        PublisherUser: options.dex_publishers,
    }
    for user_class, count in counts.items():
        user_class.fixed_count = count
    PublisherUser.wait_time = constant_throughput(plan.rate / plan.publishers)
    # Locust's -u must match the fixed counts, or it spawns fewer users.
    options.num_users = sum(counts.values())
    options.spawn_rate = max(options.spawn_rate or 0, 50)


@events.test_start.add_listener  # type: ignore[untyped-decorator]
def _start(environment: Environment, **_: Any) -> None:
    options = environment.parsed_options
    if BOARD.plan is not None and options is not None:
        subscribers = (options.dex_fast + options.dex_slow + options.dex_stalled) * 2
        gevent.spawn(_drive, subscribers, options.dex_prime_seconds)


def _drive(subscribers: int, prime_seconds: float) -> None:
    """Connecting -> priming until every subscriber saw a primer (bounded) -> publishing."""
    deadline = time.monotonic() + prime_seconds
    while len(BOARD.records) < subscribers and time.monotonic() < deadline:
        gevent.sleep(0.2)
    BOARD.enter(Stage.PRIMING)
    while time.monotonic() < deadline and not all(
        r.ready or r.error or r.left for r in BOARD.records
    ):
        gevent.sleep(0.2)
    BOARD.enter(Stage.PUBLISHING)


@events.test_stopping.add_listener  # type: ignore[untyped-decorator]
def _stopping(**_: Any) -> None:
    BOARD.enter(Stage.DONE)
