"""Event to channel routing with the default rules (the design doc's table) and custom ones."""

from __future__ import annotations

from typing import Any

import orjson
import pytest

from shim.core.broadcast import Accepted, parse_broadcast
from shim.core.config import NamespaceOptions, RouteRule, Settings
from shim.core.events import Event
from shim.core.policy import AllowAuthenticated, ChannelAuthorizer
from shim.core.routing import PERSONAL_FANOUT_CHANNEL, Route, Router
from tests.unit.test_legacy_wire import CORPUS

SETTINGS = Settings()
# Personal channels `user:<id>`, as the default settings have them.
AUDIENCE = ChannelAuthorizer(AllowAuthenticated())
ROUTER = Router(
    SETTINGS.routes,
    default_channel=SETTINGS.default_channel,
    global_channel=SETTINGS.global_channel,
    audience=AUDIENCE,
)


def event(type_: str, payload: dict[str, Any], task_id: str = "", project_id: str = "") -> Event:
    return Event(
        id="e",
        type=type_,
        payload=payload,
        timestamp="2026-02-04T16:21:55Z",
        task_id=task_id,
        project_id=project_id,
    )


def design_table_channels(example: dict[str, Any]) -> list[str]:
    """The design doc's routing table, written out for one legacy example (and the
    global channel, except for approvals to a user: personal events skip it)."""
    family = example["type"].split(".")[0]
    payload = example["payload"]
    task_id = payload.get("task_id") or example.get("task_id")
    if family in ("task", "session", "activity", "planning", "checklist"):
        channels = [f"task:{task_id}"]
        if family == "task" and payload.get("project_id"):
            channels.append(f"project:{payload['project_id']}")
    elif family == "quest":
        channels = [f"quest:{payload['quest_id']}"]
    elif family == "approval":
        if payload.get("user_id"):
            return [f"user:{payload['user_id']}"]
        channels = ["system"]
    else:
        raise AssertionError(f"corpus has an event family the design table lacks: {family}")
    return [*channels, "global"]


@pytest.mark.parametrize("site", CORPUS, ids=[f"{i}-{s['event']}" for i, s in enumerate(CORPUS)])
def test_every_corpus_example_lands_where_the_design_table_says(site: dict[str, Any]) -> None:
    [item] = parse_broadcast(site["wire"].encode(), max_item_bytes=1 << 20)
    assert isinstance(item, Accepted)
    route = ROUTER.route(item.event)
    channels = tuple(design_table_channels(site["example"]))
    assert route == Route(
        channels=channels, missing=(), unknown_type=False, personal="global" not in channels
    )


def test_corpus_reaches_every_family_channel() -> None:
    namespaces = set()
    for site in CORPUS:
        [item] = parse_broadcast(site["wire"].encode(), max_item_bytes=1 << 20)
        assert isinstance(item, Accepted)
        namespaces |= {c.split(":")[0] for c in ROUTER.route(item.event).channels}
    assert namespaces >= {"task", "quest", "system", "global"}


def test_session_event_routes_by_top_level_task_id() -> None:
    # session.* payloads have no task_id; the legacy envelope's top-level one is used.
    route = ROUTER.route(event("session.started", {"session_id": "s-1"}, task_id="task-9"))
    assert route.channels == ("task:task-9", "global")


def test_payload_task_id_wins_over_top_level() -> None:
    route = ROUTER.route(event("activity.new", {"task_id": "task-p"}, task_id="task-t"))
    assert route.channels == ("task:task-p", "global")


@pytest.mark.parametrize("bad", [17, "", None, ["task-1"]])
def test_non_string_or_empty_payload_key_falls_back_to_top_level(bad: Any) -> None:
    assert ROUTER.route(event("task.updated", {"task_id": bad}, task_id="task-t")).channels == (
        "task:task-t",
        "global",
    )
    assert ROUTER.route(event("task.updated", {"task_id": bad})).channels == ("global",)


def test_task_events_also_reach_the_project_when_known() -> None:
    from_payload = event("task.created", {"task_id": "t-1", "project_id": "p-1"})
    from_envelope = event("task.updated", {"task_id": "t-1"}, project_id="p-2")
    assert ROUTER.route(from_payload).channels == ("task:t-1", "project:p-1", "global")
    assert ROUTER.route(from_envelope).channels == ("task:t-1", "project:p-2", "global")


def test_missing_key_reaches_only_global_and_is_reported() -> None:
    route = ROUTER.route(event("task.updated", {"status": "ready"}))
    # project:{project_id} is optional for task events, so only the task route is missing.
    assert route == Route(channels=("global",), missing=("task:{task_id}",), unknown_type=False)
    quest = ROUTER.route(event("quest.message", {"message": {}}))
    assert quest == Route(channels=("global",), missing=("quest:{quest_id}",), unknown_type=False)


def test_approvals_go_to_the_user_or_else_system() -> None:
    named = ROUTER.route(event("approval.required", {"user_id": "u-1", "reason": "budget"}))
    anonymous = ROUTER.route(event("approval.resolved", {"id": "a-1"}, task_id="t-1"))
    assert named == Route(channels=("user:u-1",), missing=(), unknown_type=False, personal=True)
    assert anonymous == Route(channels=("system", "global"), missing=(), unknown_type=False)


@pytest.mark.parametrize("type_", ["hat.changed", "ping", "tasks.updated", "task"])
def test_unknown_type_goes_to_default_and_global(type_: str) -> None:
    assert ROUTER.route(event(type_, {"task_id": "t-1"})) == Route(
        channels=("system", "global"), missing=(), unknown_type=True
    )


def test_project_events_route_by_project() -> None:
    assert ROUTER.route(event("project.updated", {"project_id": "p-1"})).channels == (
        "project:p-1",
        "global",
    )


def custom(*rules: RouteRule) -> Router:
    return Router(rules, default_channel="fallback", global_channel="all")


def test_longest_match_wins() -> None:
    router = custom(
        RouteRule("task.", ("task:{task_id}",)),
        RouteRule("task.audit.", ("audit",)),
        RouteRule("task.audit.secret", ("secret",)),
    )
    assert router.route(event("task.updated", {"task_id": "1"})).channels == ("task:1", "all")
    assert router.route(event("task.audit.read", {})).channels == ("audit", "all")
    assert router.route(event("task.audit.secret", {})).channels == ("secret", "all")
    assert router.route(event("task.audit.secret.x", {})).channels == ("audit", "all")


def test_exact_rule_matches_only_that_type() -> None:
    router = custom(RouteRule("deploy", ("ops",)))
    assert router.route(event("deploy", {})).channels == ("ops", "all")
    for other in ("deployed", "deploy.done"):
        assert router.route(event(other, {})) == Route(("fallback", "all"), (), True)


def test_channels_are_unique_and_global_is_last() -> None:
    router = custom(RouteRule("a.", ("all", "x:{k}", "y", "x:{k}")))
    assert router.route(event("a.b", {"k": "1"})).channels == ("x:1", "y", "all")


def test_templates_with_several_keys_and_literal_braces() -> None:
    router = custom(RouteRule("a.", ("pair:{left}-{right}", "{{lit}}:{left}{right}")))
    route = router.route(event("a.b", {"left": "L", "right": "R"}))
    assert route.channels == ("pair:L-R", "{lit}:LR", "all")
    half = router.route(event("a.b", {"left": "L"}))
    assert half == Route(("all",), ("pair:{left}-{right}", "{{lit}}:{left}{right}"), False)


def test_only_task_and_project_ids_come_from_the_envelope() -> None:
    router = custom(RouteRule("a.", ("q:{quest_id}", "p:{project_id}")))
    route = router.route(event("a.b", {}, task_id="t", project_id="p"))
    assert route == Route(("p:p", "all"), ("q:{quest_id}",), False)


def test_fallback_only_when_every_template_lacks_its_key() -> None:
    router = custom(
        RouteRule(
            "n.", ("user:{user_id}", "team:{team_id}"), optional=("team:{team_id}",), fallback="sys"
        )
    )
    assert router.route(event("n.x", {})) == Route(("sys", "all"), (), False)
    assert router.route(event("n.x", {"team_id": "t"})) == Route(
        ("team:t", "all"), ("user:{user_id}",), False
    )
    assert router.route(event("n.x", {"user_id": "u"})) == Route(("user:u", "all"), (), False)


def test_rule_without_fallback_reports_every_required_missing_template() -> None:
    router = custom(RouteRule("m.", ("a:{a}", "b:{b}", "c:{c}"), optional=("c:{c}",)))
    assert router.route(event("m.x", {"b": "2"})) == Route(("b:2", "all"), ("a:{a}",), False)


@pytest.mark.parametrize("template", ["task:{task_id!r}", "task:{task_id:>5}", "task:{", "x:{}"])
def test_unusable_templates_fail_at_construction(template: str) -> None:
    with pytest.raises(ValueError, match="route template"):
        custom(RouteRule("a.", (template,)))


def test_router_reads_routes_from_settings_overrides() -> None:
    settings = Settings(routes=(RouteRule("hat.", ("task:{task_id}",)),))
    router = Router(settings.routes, default_channel="system", global_channel="global")
    body = orjson.dumps({"type": "hat.changed", "payload": {"task_id": "t-3"}})
    [item] = parse_broadcast(body, max_item_bytes=1024)
    assert isinstance(item, Accepted)
    assert router.route(item.event).channels == ("task:t-3", "global")
    assert router.route(event("task.updated", {"task_id": "t-3"})).unknown_type


def test_personal_events_skip_global_but_keep_channels_named_by_their_rule() -> None:
    rules = (
        RouteRule("approval.", ("user:{user_id}",), fallback="system"),
        RouteRule("note.", ("task:{task_id}", "user:{user_id}", "all")),
    )
    router = Router(rules, default_channel="d", global_channel="all", audience=AUDIENCE)
    approval = router.route(event("approval.required", {"user_id": "bob"}))
    assert (approval.channels, approval.personal, approval.routed) == (
        ("user:bob",),
        True,
        ("user:bob",),
    )
    # An explicit global in a rule does not bring it back either.
    note = router.route(event("note.added", {"task_id": "t", "user_id": "bob"}))
    assert (note.channels, note.personal) == (("task:t", "user:bob"), True)
    unnamed = router.route(event("approval.required", {}))
    assert (unnamed.channels, unnamed.personal) == (("system", "all"), False)
    # Without personal channels (user_channel_prefix = "") `user:bob` is shared.
    off = ChannelAuthorizer(AllowAuthenticated(), user_channel_prefix="")
    plain = Router(rules, default_channel="d", global_channel="all", audience=off)
    assert plain.route(event("approval.required", {"user_id": "bob"})).channels == (
        "user:bob",
        "all",
    )


def test_the_compatibility_fan_out_channel_comes_last_and_is_not_routed() -> None:
    router = Router(
        SETTINGS.routes,
        default_channel="system",
        global_channel="global",
        audience=AUDIENCE,
        personal_fanout=True,
    )
    route = router.route(event("approval.required", {"user_id": "bob"}))
    assert route.channels == ("user:bob", PERSONAL_FANOUT_CHANNEL)
    assert route.routed == ("user:bob",)
    shared = router.route(event("task.updated", {"task_id": "t"}))
    assert shared.channels == shared.routed == ("task:t", "global")


def _centrifugo_router(*templates: str) -> Router:
    """Routes `x.*` to `templates`, with Centrifugo's personal channels in namespace
    `personal` and user-limited channels allowed in `dialog` and the default namespace."""
    limited = NamespaceOptions(allow_user_limited_channels=True)
    settings = Settings(
        namespaces={"": limited, "dialog": limited, "personal": NamespaceOptions()},
        user_subscribe_to_personal=True,
        user_personal_channel_namespace="personal",
    )
    return Router(
        (RouteRule("x.", templates),),
        default_channel="d",
        global_channel="global",
        audience=ChannelAuthorizer.from_settings(settings),
    )


@pytest.mark.parametrize(
    "template",
    ["#{a}", "dialog#{a},{b}", "personal:#{a}", "user:{a}", "other#{a}"],
)
def test_personal_and_user_limited_channels_keep_an_event_off_global(template: str) -> None:
    route = _centrifugo_router("task:{t}", template).route(
        event("x.y", {"t": "1", "a": "42", "b": "43"})
    )
    assert route.personal
    assert "global" not in route.channels
    assert route.channels[0] == "task:1" and len(route.channels) == 2


def test_a_users_second_personal_channel_carries_no_legacy_frame() -> None:
    router = _centrifugo_router("user:{a}", "personal:#{a}", "user:{b}", "dialog#{a},{b}")
    route = router.route(event("x.y", {"a": "42", "b": "43"}))
    assert route.channels == ("user:42", "personal:#42", "user:43", "dialog#42,43")
    # 42's legacy `*` reads user:42 and personal:#42: the frame comes through the first.
    assert route.legacy_skip == ("personal:#42",)


def test_shared_channels_still_go_to_global() -> None:
    route = _centrifugo_router("task:{t}", "dialog:{a}").route(event("x.y", {"t": "1", "a": "4"}))
    assert route.channels == ("task:1", "dialog:4", "global")
    assert not route.personal and route.legacy_skip == ()
