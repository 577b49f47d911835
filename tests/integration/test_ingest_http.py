"""POST /api/v1/broadcast and the Python Publisher API, seen from the backend (HTTP
answers) and from an SDK client subscribed to the channels the events go to."""

from __future__ import annotations

import contextlib
import logging
from collections.abc import AsyncIterator
from typing import Any

import orjson
import pytest
from prometheus_client.parser import text_string_to_metric_families

from tests.conftest import API_KEY, RunningServer, run_server
from tests.pyclient import SubEvents, new_client, new_subscription

ENDPOINT = "/api/v1/broadcast"


@contextlib.asynccontextmanager
async def subscriber(server: RunningServer, *channels: str) -> AsyncIterator[dict[str, SubEvents]]:
    """An SDK client subscribed to `channels`; yields each channel's events."""
    client, events = new_client(server.ws_url, server.token("watcher"))
    await client.connect()
    try:
        await events.wait_for("connected", timeout=5)
        recorders: dict[str, SubEvents] = {}
        for channel in channels:
            sub, recorders[channel] = new_subscription(client, channel)
            await sub.subscribe()
            await recorders[channel].wait_for("subscribed", timeout=5)
        yield recorders
    finally:
        await client.disconnect()


def flat(event: dict[str, Any]) -> dict[str, Any]:
    """The channel data the design promises: payload fields, then type and timestamp."""
    return {**event["payload"], "type": event["type"], "timestamp": event["timestamp"]}


async def post_raw(server: RunningServer, body: bytes, **headers: str) -> Any:
    return await server.http.post(
        ENDPOINT,
        content=body,
        headers={"X-API-Key": API_KEY, "Content-Type": "application/json", **headers},
    )


def assert_json_error(response: Any, status: int) -> None:
    assert response.status_code == status, response.text
    assert response.headers["content-type"].startswith("application/json")
    body = response.json()
    assert isinstance(body["error"], str) and body["error"]


async def test_mixed_batch_gets_per_item_results_and_good_items_are_delivered(
    signing_keys: tuple[str, str],
) -> None:
    good_1 = {
        "type": "task.updated",
        "timestamp": "2026-02-04T16:21:31.005Z",
        "payload": {"task_id": "b1", "status": "running"},
    }
    good_2 = {
        "type": "session.started",
        "timestamp": "2026-02-04T16:21:32.005Z",
        "payload": {"task_id": "b1", "session_id": "s1"},
    }
    oversized = {"type": "task.updated", "payload": {"task_id": "b1", "pad": "x" * 2000}}
    batch = [
        good_1,
        42,
        {"payload": {"task_id": "b1"}},
        {"type": "task.updated", "payload": ["task_id", "b1"]},
        oversized,
        good_2,
    ]
    async with (
        run_server(signing_keys, ingest_max_item_bytes=1024) as server,
        subscriber(server, "task:b1") as subs,
    ):
        response = await server.broadcast(batch)
        assert response.status_code == 200, response.text
        body = response.json()
        assert (body["accepted"], body["refused"], body["failed"]) == (2, 4, 0)
        results = body["results"]
        assert [r["index"] for r in results] == list(range(len(batch)))
        assert [r["status"] for r in results] == [
            "accepted",
            "refused",
            "refused",
            "refused",
            "refused",
            "accepted",
        ]
        for accepted in (results[0], results[5]):
            assert accepted["channels"] == ["task:b1", "global"]
            assert isinstance(accepted["event_id"], str) and accepted["event_id"]
            assert "error" not in accepted and "missing_routes" not in accepted
        assert results[0]["event_id"] != results[5]["event_id"]
        for refused in results[1:5]:
            assert "event_id" not in refused and "channels" not in refused
        assert "not an object" in results[1]["error"]
        assert "type" in results[2]["error"]
        assert "payload" in results[3]["error"]
        assert "1024" in results[4]["error"]

        events = subs["task:b1"]
        await events.wait_for("publication", count=2)
        # A marker proves nothing else was on its way before it.
        await server.broadcast({"type": "task.updated", "payload": {"task_id": "b1", "m": 1}})
        await events.wait_for("publication", count=3)
        datas = [ctx.pub.data for ctx in events.named("publication")]
        assert datas[:2] == [flat(good_1), flat(good_2)]
        assert datas[2]["m"] == 1


async def ingest_counts(server: RunningServer) -> dict[tuple[str, str], float]:
    """The service's ingest counter, as Prometheus scrapes it: (type, result) -> count."""
    response = await server.http.get("/metrics")
    assert response.status_code == 200, response.text
    for family in text_string_to_metric_families(response.text):
        if family.name == "dex_shim_ingest_events":
            return {
                (sample.labels["type"], sample.labels["result"]): sample.value
                for sample in family.samples
                if sample.name == "dex_shim_ingest_events_total"
            }
    raise AssertionError("no dex_shim_ingest_events in /metrics")


async def test_missing_route_key_goes_to_global_only_and_is_counted(
    server: RunningServer,
) -> None:
    lacking_task = {"type": "task.updated", "payload": {"status": "running"}}
    lacking_quest = {"type": "quest.updated", "payload": {"title": "q"}}
    complete = {"type": "task.updated", "payload": {"task_id": "m1"}}
    async with subscriber(server, "global") as subs:
        response = await server.broadcast([lacking_task, lacking_quest, lacking_task, complete])
        assert response.status_code == 200, response.text
        results = response.json()["results"]
        assert [r["status"] for r in results] == ["accepted"] * 4
        assert [r["channels"] for r in results] == [
            ["global"],
            ["global"],
            ["global"],
            ["task:m1", "global"],
        ]
        assert [r.get("missing_routes") for r in results] == [
            ["task:{task_id}"],
            ["quest:{quest_id}"],
            ["task:{task_id}"],
            None,
        ]
        await subs["global"].wait_for("publication", count=4)
        datas = [ctx.pub.data for ctx in subs["global"].named("publication")]
        assert [d["type"] for d in datas] == [
            e["type"] for e in (lacking_task, lacking_quest, lacking_task, complete)
        ]
        assert datas[0]["status"] == "running" and datas[1]["title"] == "q"

    counts = await ingest_counts(server)
    assert counts[("task.updated", "missing_route")] == 2
    assert counts[("quest.updated", "missing_route")] == 1
    assert counts[("task.updated", "accepted")] == 3


async def test_unknown_type_goes_to_system_and_global_logged_once_per_type(
    server: RunningServer, caplog: pytest.LogCaptureFixture
) -> None:
    def unknown_type_lines() -> list[str]:
        return [
            r.getMessage()
            for r in caplog.records
            if r.name == "shim.ingest" and "unknown event type" in r.getMessage()
        ]

    event = {"type": "brand.new_thing", "payload": {"x": 1}}
    caplog.set_level(logging.WARNING, logger="shim.ingest")
    async with subscriber(server, "system", "global") as subs:
        response = await server.broadcast(event)
        assert response.status_code == 200, response.text
        (result,) = response.json()["results"]
        assert result["status"] == "accepted"
        assert result["channels"] == ["system", "global"]
        assert "missing_routes" not in result
        for channel in ("system", "global"):
            pub = (await subs[channel].wait_for("publication")).pub
            assert pub.data["type"] == "brand.new_thing" and pub.data["x"] == 1
        assert unknown_type_lines() == [
            "unknown event type 'brand.new_thing' routed to the default channel"
        ]

        # The same type again, in its own request and twice in a batch: nothing new
        # in the log; another unknown type gets its own line.
        again = await server.broadcast(event)
        assert again.status_code == 200, again.text
        batch = await server.broadcast([event, {"type": "other.thing", "payload": {}}, event])
        assert [r["channels"] for r in batch.json()["results"]] == [["system", "global"]] * 3
        await subs["system"].wait_for("publication", count=5)
        assert unknown_type_lines() == [
            "unknown event type 'brand.new_thing' routed to the default channel",
            "unknown event type 'other.thing' routed to the default channel",
        ]

    counts = await ingest_counts(server)
    assert counts[("brand.new_thing", "unknown_type")] == 4
    assert counts[("other.thing", "unknown_type")] == 1


async def test_api_key_is_required(server: RunningServer) -> None:
    event = {"type": "task.updated", "payload": {"task_id": "k1"}}
    missing = await server.http.post(ENDPOINT, json=event)
    assert_json_error(missing, 401)
    wrong = await server.http.post(ENDPOINT, json=event, headers={"X-API-Key": API_KEY + "x"})
    assert_json_error(wrong, 401)
    empty = await server.http.post(ENDPOINT, json=event, headers={"X-API-Key": ""})
    assert_json_error(empty, 401)
    assert server.runtime.ingestor.stats.total("accepted") == 0


async def test_unusable_bodies_are_refused_as_a_whole(server: RunningServer) -> None:
    assert_json_error(await post_raw(server, b'{"type": "task.updated", '), 400)
    assert_json_error(await post_raw(server, b'"just a string"'), 400)
    assert_json_error(await post_raw(server, b""), 400)
    assert server.runtime.ingestor.stats.total("accepted") == 0


async def test_body_over_the_limit_is_413(signing_keys: tuple[str, str]) -> None:
    async with run_server(signing_keys, ingest_max_body_bytes=4096) as server:
        events = [
            {"type": "task.updated", "payload": {"task_id": "big", "n": n}} for n in range(200)
        ]
        body = orjson.dumps(events)
        assert len(body) > 4096
        assert_json_error(await post_raw(server, body), 413)
        assert server.runtime.ingestor.stats.total("accepted") == 0
        # Under the limit the same endpoint works.
        small = await server.broadcast(events[:3])
        assert small.status_code == 200 and small.json()["accepted"] == 3


async def test_wrong_method_is_405(server: RunningServer) -> None:
    response = await server.http.get(ENDPOINT, headers={"X-API-Key": API_KEY})
    assert_json_error(response, 405)


async def test_whole_corpus_in_one_batch(
    server: RunningServer, corpus: list[dict[str, Any]]
) -> None:
    examples = [entry["example"] for entry in corpus]
    assert len(examples) == 49
    async with subscriber(server, "global") as subs:
        response = await server.broadcast(examples)
        assert response.status_code == 200, response.text
        body = response.json()
        assert (body["accepted"], body["refused"], body["failed"]) == (49, 0, 0)
        assert all(r["channels"][-1] == "global" for r in body["results"])

        await subs["global"].wait_for("publication", count=49)
        pubs = [ctx.pub for ctx in subs["global"].named("publication")]
        assert [p.data for p in pubs] == [flat(example) for example in examples]
        assert [p.offset for p in pubs] == list(range(pubs[0].offset, pubs[0].offset + 49))


async def test_python_publisher_api(server: RunningServer) -> None:
    async with subscriber(server, "task:py1", "project:p9") as subs:
        result = await server.runtime.ingestor.publish(
            "task.updated", {"task_id": "py1", "project_id": "p9", "status": "done"}
        )
        assert result.status == "accepted"
        assert result.channels == ("task:py1", "project:p9", "global")
        for channel in ("task:py1", "project:p9"):
            data = (await subs[channel].wait_for("publication")).pub.data
            assert {k: data[k] for k in ("task_id", "project_id", "status", "type")} == {
                "task_id": "py1",
                "project_id": "p9",
                "status": "done",
                "type": "task.updated",
            }
            assert isinstance(data["timestamp"], str) and data["timestamp"].endswith("Z")
