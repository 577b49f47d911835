"""One event stream, both protocols: every example of legacy-broadcasts.json replayed
through POST /api/v1/broadcast while legacy clients (like the browser hook) and
Centrifuge clients (centrifuge-python, centrifuge-js) are connected at once.

Legacy frames must be byte-equal to the corpus `wire` text (the examples carry
their timestamps, which the shim keeps). In the corpus replays who gets what is
computed from the routing table (shim.core.routing.Router with the default routes),
or, with strict matching, from the corpus' own `delivered_to_subscriptions`; the
smaller tests below (project subscriptions, Redis shards, encoding once) write
their expectations out by hand.
"""

from __future__ import annotations

import asyncio
import contextlib
import json
import time
from collections import Counter
from collections.abc import AsyncIterator, Callable
from typing import Any

import orjson
import pytest

import shim.app.runtime
from adapters.brokers.redis.keys import shard_index
from legacy.session import LegacySession
from shim.core.broadcast import Accepted, channel_data, parse_broadcast
from shim.core.config import Settings
from shim.core.events import Event
from shim.core.outbox import Outbox
from shim.core.routing import Router
from tests.conftest import RunningServer, run_server
from tests.jsclient import JsClient
from tests.legacyclient import SHORT_PINGS, LegacyClient, open_legacy, settle
from tests.pyclient import SubEvents, new_client, new_subscription
from tests.redis_server import RedisServer

Keys = tuple[str, str]
Corpus = list[dict[str, Any]]

# How long a client must stay quiet after its last expected frame to count as done.
QUIET = 0.5


def subscribe(**ids: str) -> str:
    return orjson.dumps({"action": "subscribe", **ids}).decode()


def the_task(corpus: Corpus) -> str:
    """The task id that the most examples name (in the payload or top level)."""
    counts: dict[str, int] = {}
    for item in corpus:
        example = item["example"]
        for task in {example["payload"].get("task_id"), example.get("task_id")} - {None}:
            counts[task] = counts.get(task, 0) + 1
    task = max(counts, key=lambda t: counts[t])
    assert counts[task] >= 5
    return task


def the_value(corpus: Corpus, key: str) -> str:
    values = [item["example"]["payload"].get(key) for item in corpus]
    found = [v for v in values if isinstance(v, str)]
    assert found, key
    return max(set(found), key=found.count)


def events_of(corpus: Corpus) -> list[Event]:
    """The events the shim makes of the corpus examples (its own parser)."""
    body = orjson.dumps([item["example"] for item in corpus])
    parsed = parse_broadcast(body, max_item_bytes=Settings().ingest_max_item_bytes)
    assert all(isinstance(p, Accepted) for p in parsed), parsed
    return [p.event for p in parsed if isinstance(p, Accepted)]


def routes_of(events: list[Event]) -> list[tuple[str, ...]]:
    settings = Settings()
    router = Router(
        settings.routes,
        default_channel=settings.default_channel,
        global_channel=settings.global_channel,
    )
    return [router.route(event).channels for event in events]


def routed_wires(corpus: Corpus, channel: str) -> list[str]:
    routes = routes_of(events_of(corpus))
    return [
        item["wire"] for item, channels in zip(corpus, routes, strict=True) if channel in channels
    ]


def routed_data(corpus: Corpus, channel: str) -> list[dict[str, Any]]:
    events = events_of(corpus)
    return [
        orjson.loads(channel_data(event))
        for event, channels in zip(events, routes_of(events), strict=True)
        if channel in channels
    ]


async def publish(server: RunningServer, body: Any) -> None:
    response = await server.broadcast(body)
    assert response.status_code == 200, response.text
    expected = len(body) if isinstance(body, list) else 1
    assert response.json()["accepted"] == expected, response.text


def publisher(server: RunningServer) -> Callable[[Any], Any]:
    async def run(body: Any) -> None:
        await publish(server, body)

    return run


async def received(client: LegacyClient, count: int) -> list[str]:
    """The next `count` frames' text, then nothing more for QUIET seconds."""
    frames = await client.take(count, timeout=10) if count else []
    await client.expect_silence(QUIET)
    return [frame.raw for frame in frames]


@contextlib.asynccontextmanager
async def legacy_clients(
    server: RunningServer, **first: tuple[str, ...]
) -> AsyncIterator[dict[str, LegacyClient]]:
    """Named legacy clients, each sending its first commands on open."""
    clients: dict[str, LegacyClient] = {}
    try:
        for name, commands in first.items():
            clients[name] = await open_legacy(
                server.port, server.token(f"legacy-{name}"), first_commands=commands
            )
        yield clients
    finally:
        for client in clients.values():
            await client.aclose()


async def wait_until(condition: Callable[[], bool], timeout: float = 10.0) -> None:
    deadline = time.monotonic() + timeout
    while not condition():
        assert time.monotonic() < deadline, "condition not met in time"
        await asyncio.sleep(0.02)


def channels_for(corpus: Corpus) -> list[str]:
    task = the_task(corpus)
    quest = the_value(corpus, "quest_id")
    project = the_value(corpus, "project_id")
    return [f"task:{task}", f"quest:{quest}", f"project:{project}", "system", "global"]


# --- legacy clients ------------------------------------------------------------------


async def test_corpus_reaches_legacy_and_python_sdk_clients_at_once(
    signing_keys: Keys, corpus: Corpus
) -> None:
    task = the_task(corpus)
    project = the_value(corpus, "project_id")
    wires = [item["wire"] for item in corpus]
    expected_task = routed_wires(corpus, f"task:{task}")
    expected_project = routed_wires(corpus, f"project:{project}")
    # The routing fix: far more than the 11 sites with a top-level task_id.
    assert len(expected_task) > 11
    # Today's backend puts project_id in no task payload (only quest payloads carry
    # one, and quests go to quest:<id>): project:<id> gets nothing from the corpus.
    # test_project_subscribers_get_task_and_project_events_naming_the_project shows
    # what it gets once the backend sends it.
    assert expected_project == []
    channels = channels_for(corpus)
    async with (
        run_server(signing_keys, **SHORT_PINGS) as server,
        legacy_clients(
            server,
            hook=('{"action":"subscribe_all"}',),
            task=(subscribe(task_id=task),),
            both=('{"action":"subscribe_all"}', subscribe(task_id=task)),
            project=(subscribe(project_id=project),),
        ) as clients,
    ):
        await settle(publisher(server), [clients["project"]], f"project:{project}")
        await settle(publisher(server), [clients["hook"], clients["task"], clients["both"]], task)
        # The SDK subscribes after the probes, so it sees the corpus only.
        sdk, _events = new_client(server.ws_url, server.token("py"))
        await sdk.connect()
        subs: dict[str, SubEvents] = {}
        try:
            for channel in channels:
                sub, sub_events = new_subscription(sdk, channel)
                await sub.subscribe()
                await sub_events.wait_for("subscribed")
                subs[channel] = sub_events

            await publish(server, [item["example"] for item in corpus])

            hook, task_only, both, project_only = await asyncio.gather(
                received(clients["hook"], len(wires)),
                received(clients["task"], len(expected_task)),
                received(clients["both"], len(wires)),
                received(clients["project"], len(expected_project)),
            )
            for channel in channels:
                expected = routed_data(corpus, channel)
                if expected:
                    await subs[channel].wait_for("publication", count=len(expected))
            await asyncio.sleep(QUIET)
            got = {
                channel: [ctx.pub.data for ctx in subs[channel].named("publication")]
                for channel in channels
            }
        finally:
            await sdk.disconnect()

    assert hook == wires
    assert task_only == expected_task
    # `*` and task:<id> together: every event once, in the one global order.
    assert both == wires
    assert project_only == expected_project
    for channel in channels:
        expected = routed_data(corpus, channel)
        assert got[channel] == expected, channel
        # Flat shape: payload keys first in their order, then type and timestamp.
        assert [list(d) for d in got[channel]] == [list(d) for d in expected], channel
    assert len(got["global"]) == len(corpus)
    assert got[f"task:{task}"] and got["system"]


async def test_strict_matching_is_the_old_hubs_top_level_rule(
    signing_keys: Keys, corpus: Corpus
) -> None:
    task = the_task(corpus)
    project = the_value(corpus, "project_id")
    # What the corpus says the Go hub delivered to a task subscriber: only the sites
    # that set the top-level task_id (never the payload's).
    expected_task = [
        item["wire"]
        for item in corpus
        if "task:<task_id>" in item["delivered_to_subscriptions"]
        and json.loads(item["wire"]).get("task_id") == task
    ]
    assert len(expected_task) == 11
    assert not [i for i in corpus if "project:<project_id>" in i["delivered_to_subscriptions"]]
    async with (
        run_server(signing_keys, legacy_strict_matching=True, **SHORT_PINGS) as server,
        legacy_clients(
            server,
            task=(subscribe(task_id=task),),
            both=('{"action":"subscribe_all"}', subscribe(task_id=task)),
            project=(subscribe(project_id=project),),
        ) as clients,
    ):
        await settle(publisher(server), [clients["project"]], f"project:{project}")
        await settle(publisher(server), [clients["task"], clients["both"]], task)
        await publish(server, [item["example"] for item in corpus])
        task_only, both, project_only = await asyncio.gather(
            received(clients["task"], len(expected_task)),
            received(clients["both"], len(corpus)),
            received(clients["project"], 0),
        )
    assert task_only == expected_task
    assert both == [item["wire"] for item in corpus]
    # project:<id> never matched: no legacy site sets the top-level project_id.
    assert project_only == []


# --- project:<id> subscriptions ----------------------------------------------------------

PROJECT = "proj-7"

# Messages naming PROJECT (or not) in each way a backend could; payload `n` numbers them.
PROJECT_EVENTS: list[dict[str, Any]] = [
    # A task event whose payload names the project (what today's backend does not send).
    {"type": "task.updated", "payload": {"n": 1, "project_id": PROJECT, "task_id": "t-1"}},
    # A project event naming it in the payload only.
    {"type": "project.updated", "payload": {"n": 2, "project_id": PROJECT}},
    # A project event with the top-level field only, as the old hub matched.
    {"type": "project.updated", "payload": {"n": 3}, "project_id": PROJECT},
    # A task event with both.
    {
        "type": "task.created",
        "payload": {"n": 4, "project_id": PROJECT, "task_id": "t-2"},
        "project_id": PROJECT,
    },
    # A quest naming the project in its payload: quests go to quest:<id> only.
    {"type": "quest.created", "payload": {"n": 5, "project_id": PROJECT, "quest_id": "q-1"}},
    # Another project's task, and a task event naming no project (today's shape).
    {"type": "task.updated", "payload": {"n": 6, "project_id": "proj-other", "task_id": "t-3"}},
    {"type": "task.updated", "payload": {"n": 7, "task_id": "t-1"}},
]


@pytest.mark.parametrize(
    ("strict", "expected"),
    [
        # Routed channels: every event whose payload or top level names the project,
        # except quests (the routing table sends those to quest:<id>).
        (False, [1, 2, 3, 4]),
        # The old hub's rule: the top-level project_id only.
        (True, [3, 4]),
    ],
    ids=["routed", "strict"],
)
async def test_project_subscribers_get_task_and_project_events_naming_the_project(
    signing_keys: Keys, strict: bool, expected: list[int]
) -> None:
    async with (
        run_server(signing_keys, legacy_strict_matching=strict, **SHORT_PINGS) as server,
        legacy_clients(server, project=(subscribe(project_id=PROJECT),)) as clients,
    ):
        client = clients["project"]
        await settle(publisher(server), [client], f"project:{PROJECT}")
        await publish(server, PROJECT_EVENTS)
        frames = await client.take(len(expected), timeout=10)
        await client.expect_silence(QUIET)
    assert [f.message["payload"]["n"] for f in frames] == expected
    # Each exactly as sent: the top-level field only where the message had it.
    for frame in frames:
        sent = PROJECT_EVENTS[frame.message["payload"]["n"] - 1]
        assert frame.message.get("project_id") == sent.get("project_id")
        assert frame.message["payload"] == sent["payload"]


# --- exactly once across Redis shards ---------------------------------------------------------


@pytest.mark.redis
async def test_copies_through_two_shards_reach_a_task_and_project_client_once(
    signing_keys: Keys,
) -> None:
    # task:T and project:P on different shards: each event's two copies come through
    # two Redis connections, as far apart as those deliver them.
    task, project = next(
        (f"T{i}", f"P{i}")
        for i in range(100)
        if shard_index(f"task:T{i}", 2) != shard_index(f"project:P{i}", 2)
    )
    count = 1500
    events = [
        {"type": "task.updated", "payload": {"n": n, "project_id": project, "task_id": task}}
        for n in range(count)
    ]
    async with (
        RedisServer() as first,
        RedisServer() as second,
        run_server(
            signing_keys, engine="redis", redis_url=f"{first.url},{second.url}", **SHORT_PINGS
        ) as server,
        legacy_clients(server, both=(subscribe(task_id=task, project_id=project),)) as clients,
    ):
        client = clients["both"]
        await settle(publisher(server), [client], f"project:{project}")
        await settle(publisher(server), [client], task)
        for start in range(0, count, 500):
            await publish(server, events[start : start + 500])
        await client.take(count, timeout=20)
        await asyncio.sleep(QUIET)
        numbers = [f.message["payload"].get("n") for f in client.frames]
    numbers = [n for n in numbers if n is not None]  # the probes carry none
    repeated = sorted(n for n, times in Counter(numbers).items() if times > 1)
    assert repeated == [], f"{len(repeated)} events delivered twice"
    # Once each, in publish order (both shards keep it, so the first copies do too).
    assert numbers == list(range(count))


# --- the legacy frame is encoded once per event ---------------------------------------------


async def test_each_event_is_encoded_once_and_the_same_bytes_reach_every_legacy_client(
    signing_keys: Keys, monkeypatch: pytest.MonkeyPatch
) -> None:
    encoded: list[str] = []
    real_encode = shim.app.runtime.encode_legacy_frame

    def counting_encode(event: Event) -> str:
        text = real_encode(event)
        encoded.append(text)
        return text

    pushed: list[tuple[Outbox, bytes]] = []
    real_push = Outbox.push

    def recording_push(outbox: Outbox, message: bytes) -> bool:
        pushed.append((outbox, message))
        return real_push(outbox, message)

    # The runtime hands this encoder to its Ingestor when the server below starts.
    monkeypatch.setattr(shim.app.runtime, "encode_legacy_frame", counting_encode)
    monkeypatch.setattr(Outbox, "push", recording_push)
    # Each event goes to task:T, project:P and global: several channels, several clients.
    events = [
        {"type": "task.updated", "payload": {"n": n, "project_id": "P", "task_id": "T"}}
        for n in range(5)
    ]
    async with (
        run_server(signing_keys, **SHORT_PINGS) as server,
        legacy_clients(
            server,
            hook1=('{"action":"subscribe_all"}',),
            hook2=('{"action":"subscribe_all"}',),
            hook3=('{"action":"subscribe_all"}',),
            task=(subscribe(task_id="T"),),
            task_and_project=(subscribe(task_id="T", project_id="P"),),
        ) as clients,
    ):
        await settle(publisher(server), list(clients.values()), "T")
        legacy_outboxes = {
            s.outbox for s in server.runtime.node.sessions if isinstance(s, LegacySession)
        }
        assert len(legacy_outboxes) == len(clients)
        encoded.clear()
        pushed.clear()
        await publish(server, events)
        got = await asyncio.gather(*(received(c, len(events)) for c in clients.values()))

    assert len(encoded) == len(events)
    for frames in got:
        assert frames == encoded
    legacy_pushes = [(o, m) for o, m in pushed if o in legacy_outboxes]
    assert len(legacy_pushes) == len(events) * len(clients)
    for text in encoded:
        copies = [m for _o, m in legacy_pushes if m == text.encode()]
        assert len(copies) == len(clients)
        # One bytes object for every client: encoded once, never per client or channel.
        assert all(m is copies[0] for m in copies)


# --- channel clients, at the same time as a legacy client ---------------------------------


@pytest.mark.js
async def test_corpus_reaches_the_hook_a_task_client_and_both_sdks_at_once(
    signing_keys: Keys, corpus: Corpus
) -> None:
    task = the_task(corpus)
    channels = channels_for(corpus)
    wires = [item["wire"] for item in corpus]
    expected_task = routed_wires(corpus, f"task:{task}")
    async with (
        run_server(signing_keys, **SHORT_PINGS) as server,
        legacy_clients(
            server, hook=('{"action":"subscribe_all"}',), task=(subscribe(task_id=task),)
        ) as legacy,
        JsClient(server.ws_url, server.token("js")) as js,
    ):
        await settle(publisher(server), [legacy["hook"], legacy["task"]], task)
        # Both SDKs subscribe after the probes, so they see the corpus only.
        await js.call("connect")
        await js.wait_event("connected", timeout=5)
        for channel in channels:
            await js.call("newSubscription", channel=channel, options={})
            await js.call("subscribe", channel=channel, wait=True, timeout=5000)
        py, _events = new_client(server.ws_url, server.token("py"))
        await py.connect()
        py_subs: dict[str, SubEvents] = {}
        try:
            for channel in channels:
                sub, sub_events = new_subscription(py, channel)
                await sub.subscribe()
                await sub_events.wait_for("subscribed")
                py_subs[channel] = sub_events

            def js_pubs(channel: str) -> list[dict[str, Any]]:
                return [
                    e["data"]
                    for e in js.find_events(
                        lambda e: e["event"] == "sub.publication" and e["channel"] == channel
                    )
                ]

            await publish(server, [item["example"] for item in corpus])
            hook, task_only = await asyncio.gather(
                received(legacy["hook"], len(wires)),
                received(legacy["task"], len(expected_task)),
            )
            await py_subs["global"].wait_for("publication", count=len(corpus))
            await wait_until(lambda: len(js_pubs("global")) >= len(corpus))
            await asyncio.sleep(QUIET)
            py_got = {
                channel: [ctx.pub.data for ctx in py_subs[channel].named("publication")]
                for channel in channels
            }
            js_got = {channel: js_pubs(channel) for channel in channels}
        finally:
            await py.disconnect()

    assert hook == wires
    assert task_only == expected_task
    for channel in channels:
        expected = routed_data(corpus, channel)
        assert py_got[channel] == expected, channel
        assert js_got[channel] == expected, channel
        # The same key order in both SDKs: the flat shape, payload keys first.
        assert [list(d) for d in js_got[channel]] == [list(d) for d in expected], channel
    assert (
        js_got[f"task:{task}"]
        and js_got["system"]
        and js_got[f"quest:{the_value(corpus, 'quest_id')}"]
    )


# --- tool calls paired by tool-use id -------------------------------------------------------

PAIR_TASK = "task-pairing"
CREATED_AT = "2026-02-04T11:21:37.147101868-05:00"


def tool_activity(act_id: str, kind: str, content: dict[str, Any], stamp: str) -> dict[str, Any]:
    """An `activity.new` message as the backend sends it (Go maps: keys sorted)."""
    text = json.dumps(content, separators=(",", ":"))
    activity = {
        "content": text,
        "created_at": CREATED_AT,
        "event_type": kind,
        "hat": None,
        "id": act_id,
        "iteration": 2,
        "session_id": "sess-1",
        "tokens_input": None,
        "tokens_output": None,
    }
    payload = {"activity": activity, "session_id": "sess-1", "task_id": PAIR_TASK}
    return {"type": "activity.new", "timestamp": stamp, "payload": payload, "task_id": PAIR_TASK}


def go_wire(message: dict[str, Any]) -> str:
    """What the Go hub wrote for one of these: struct envelope, sorted maps, no HTML
    characters in these values (so no escaping beyond JSON's own)."""
    payload = json.dumps(message["payload"], separators=(",", ":"), sort_keys=True)
    return (
        f'{{"type":{json.dumps(message["type"])},"timestamp":{json.dumps(message["timestamp"])},'
        f'"payload":{payload},"task_id":{json.dumps(message["task_id"])}}}'
    )


async def test_same_tool_results_in_reverse_order_pair_by_tool_use_id(
    signing_keys: Keys,
) -> None:
    calls = [
        tool_activity(
            f"act-0000000{n}",
            "tool_call",
            {"name": "read_file", "input": {"path": path}, "tool_use_id": tool_id},
            f"2026-02-04T16:21:0{n}.5Z",
        )
        for n, (path, tool_id) in enumerate([("a.go", "toolu_A"), ("b.go", "toolu_B")], 1)
    ]
    results = [
        tool_activity(
            f"act-0000000{n}",
            "tool_result",
            {
                "name": "read_file",
                "result": {"Output": f"contents of {path}", "IsError": False},
                "tool_use_id": tool_id,
            },
            f"2026-02-04T16:21:0{n}Z",
        )
        # Reverse order: pairing by tool name would match b.go's result with a.go's call.
        for n, (path, tool_id) in enumerate([("b.go", "toolu_B"), ("a.go", "toolu_A")], 3)
    ]
    messages = calls + results
    async with (
        run_server(signing_keys, **SHORT_PINGS) as server,
        legacy_clients(server, hook=('{"action":"subscribe_all"}',)) as legacy,
    ):
        await settle(publisher(server), [legacy["hook"]], "warm-up")
        client, _events = new_client(server.ws_url, server.token("ui"))
        await client.connect()
        try:
            sub, sub_events = new_subscription(client, f"task:{PAIR_TASK}")
            await sub.subscribe()
            await sub_events.wait_for("subscribed")
            for message in messages:  # one at a time, as the session loop emits them
                await publish(server, message)
            frames = await received(legacy["hook"], len(messages))
            await sub_events.wait_for("publication", count=len(messages))
            data = [ctx.pub.data for ctx in sub_events.named("publication")]
        finally:
            await client.disconnect()

    # Legacy: exactly what Go sent; the id stays inside `content`, nothing is added.
    assert frames == [go_wire(m) for m in messages]
    for frame in frames:
        assert "tool_use_id" not in orjson.loads(frame)["payload"]["activity"]

    # Channels: the UI pairs by activity.tool_use_id.
    activities = [d["activity"] for d in data]
    assert [a["id"] for a in activities] == [m["payload"]["activity"]["id"] for m in messages]
    call_path = {
        a["tool_use_id"]: json.loads(a["content"])["input"]["path"]
        for a in activities
        if a["event_type"] == "tool_call"
    }
    assert call_path == {"toolu_A": "a.go", "toolu_B": "b.go"}
    result_activities = [a for a in activities if a["event_type"] == "tool_result"]
    assert [a["tool_use_id"] for a in result_activities] == ["toolu_B", "toolu_A"]
    for result in result_activities:
        output = json.loads(result["content"])["result"]["Output"]
        assert output == f"contents of {call_path[result['tool_use_id']]}"
    # Everything else of the activity is the payload's, unchanged.
    for activity, message in zip(activities, messages, strict=True):
        original = message["payload"]["activity"]
        assert {k: v for k, v in activity.items() if k != "tool_use_id"} == original
