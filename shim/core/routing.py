"""Which channels an Event is published to, from the configured RouteRules.

Runs once per ingested event, so rules and templates are compiled up front and a
route costs a few dict look-ups and string joins.
"""

from __future__ import annotations

import string
from collections.abc import Iterable, Sequence
from dataclasses import dataclass
from typing import Protocol

from shim.core.config import RouteRule
from shim.core.events import Event

# Routes remembered (then forgotten all at once): bounded whatever channels events name.
_ROUTE_CACHE_SIZE = 10_000

# Template keys that may also come from the legacy envelope's top-level fields.
_TOP_LEVEL_KEYS = ("task_id", "project_id")


# Where events routed to a personal channel also go when
# `legacy_personal_events_to_all` is on: legacy `*` clients read it, and no client
# may subscribe to it (its namespace is never configured, and the authorizer refuses it).
PERSONAL_FANOUT_CHANNEL = "$legacy:personal"
# Centrifugo's user boundary: `dialog#42,43` is for users 42 and 43 only.
USER_BOUNDARY = "#"


class ChannelAudience(Protocol):
    """Which channels are for some users only (the channel authorizer answers)."""

    def limited(self, channel: str) -> bool:
        """A personal or user-limited channel (`user:42`, `#42`, `dialog#42,43`)."""

    def personal_owner(self, channel: str) -> str:
        """The user whose personal channel this is, "" for any other channel."""


@dataclass(slots=True, frozen=True)
class Route:
    # Channels to publish to, without duplicates; the global channel is always last,
    # except for a personal event: it never goes to the global channel, and goes last
    # to PERSONAL_FANOUT_CHANNEL when that is on.
    channels: tuple[str, ...]
    # Templates (as configured) that could not be filled: the event lacked their key.
    missing: tuple[str, ...]
    # No rule matched the event type; it went to the default channel.
    unknown_type: bool
    # Routed to a personal or user-limited channel: meant for its users only.
    personal: bool = False
    # Channels whose publication carries no legacy frame: a user's second personal
    # channel in the route (a legacy `*` client reads all of its user's personal
    # channels, and must get the event once).
    legacy_skip: tuple[str, ...] = ()

    @property
    def routed(self) -> tuple[str, ...]:
        """The channels the event was routed to, without the internal fan-out channel."""
        if self.channels and self.channels[-1] == PERSONAL_FANOUT_CHANNEL:
            return self.channels[:-1]
        return self.channels


@dataclass(slots=True, frozen=True)
class _Template:
    text: str
    # [literal, key, literal, ..., literal]: keys at odd positions, filled per event.
    parts: tuple[str, ...]
    optional: bool

    def fill(self, event: Event) -> str | None:
        parts = self.parts
        if len(parts) == 3:
            # The common shape, one key ("task:{task_id}").
            value = _lookup(event, parts[1])
            return None if value is None else parts[0] + value + parts[2]
        pieces = list(parts)
        for i in range(1, len(pieces), 2):
            value = _lookup(event, pieces[i])
            if value is None:
                return None
            pieces[i] = value
        return "".join(pieces)


@dataclass(slots=True, frozen=True)
class _CompiledRule:
    templates: tuple[_Template, ...]
    fallback: str


def _lookup(event: Event, key: str) -> str | None:
    value = event.payload.get(key)
    if isinstance(value, str) and value:
        return value
    if key in _TOP_LEVEL_KEYS:
        top: str = getattr(event, key)
        return top or None
    return None


def _compile_template(text: str, optional: bool) -> _Template:
    parts: list[str] = []
    literal_run = ""
    try:
        parsed = list(string.Formatter().parse(text))
    except ValueError as exc:
        raise ValueError(f"route template {text!r}: {exc}") from exc
    for literal, key, spec, conversion in parsed:
        literal_run += literal
        if key is None:
            continue
        if not key or spec or conversion:
            raise ValueError(f"route template {text!r}: only plain {{key}} placeholders")
        parts += (literal_run, key)
        literal_run = ""
    parts.append(literal_run)
    return _Template(text=text, parts=tuple(parts), optional=optional)


class Router:
    """Maps an event type to channels: the longest matching rule wins, where a rule's
    `match` is an exact type or a prefix ending in '.'. Every event also goes to
    `global_channel`, except one routed to a channel for some users only (personal,
    user-limited, or any name with Centrifugo's `#` user boundary): every global
    reader would read it. A type no rule matches goes to `default_channel`.
    """

    __slots__ = (
        "_audience",
        "_exact",
        "_fanout",
        "_global_channel",
        "_prefixes",
        "_routes",
        "_unknown",
    )

    def __init__(
        self,
        rules: Sequence[RouteRule],
        *,
        default_channel: str,
        global_channel: str,
        audience: ChannelAudience | None = None,
        personal_fanout: bool = False,
    ) -> None:
        self._global_channel = global_channel
        # None: only `#` names are kept off the global channel.
        self._audience = audience
        self._fanout = (PERSONAL_FANOUT_CHANNEL,) if personal_fanout else ()
        # Routes without a missing template, by channels filled: an event's Route is
        # then one look-up (Dex sends the same few thousand channels over and over).
        self._routes: dict[tuple[str, ...], Route] = {}
        self._unknown = Route(
            channels=self._finish((default_channel,)), missing=(), unknown_type=True
        )
        self._exact: dict[str, _CompiledRule] = {}
        self._prefixes: dict[str, _CompiledRule] = {}
        for rule in rules:
            optional = set(rule.optional)
            compiled = _CompiledRule(
                templates=tuple(_compile_template(t, t in optional) for t in rule.channels),
                fallback=rule.fallback,
            )
            table = self._prefixes if rule.match.endswith(".") else self._exact
            # A later rule with the same match replaces an earlier one, like a config override.
            table[rule.match] = compiled

    def _rule_for(self, event_type: str) -> _CompiledRule | None:
        rule = self._exact.get(event_type)
        if rule is not None:
            return rule
        # An exact match is always the longest; then try prefixes from the longest down.
        end = event_type.rfind(".")
        while end >= 0:
            rule = self._prefixes.get(event_type[: end + 1])
            if rule is not None:
                return rule
            end = event_type.rfind(".", 0, end)
        return None

    def route(self, event: Event) -> Route:
        rule = self._rule_for(event.type)
        if rule is None:
            return self._unknown
        channels: list[str] = []
        missing: list[str] = []
        lacking = 0
        for template in rule.templates:
            channel = template.fill(event)
            if channel is not None:
                channels.append(channel)
                continue
            lacking += 1
            if not template.optional:
                missing.append(template.text)
        if rule.fallback and lacking == len(rule.templates):
            channels, missing = [rule.fallback], []
        if missing:
            return self._make(channels, tuple(missing))
        key = tuple(channels)
        route = self._routes.get(key)
        if route is None:
            if len(self._routes) >= _ROUTE_CACHE_SIZE:
                self._routes.clear()
            route = self._routes[key] = self._make(channels, ())
        return route

    def _make(self, channels: Sequence[str], missing: tuple[str, ...]) -> Route:
        if any(self._limited(c) for c in channels):
            unique = self._unique(channels)
            return Route(
                channels=(*unique, *self._fanout),
                missing=missing,
                unknown_type=False,
                personal=True,
                legacy_skip=self._second_personal(unique),
            )
        return Route(channels=self._finish(channels), missing=missing, unknown_type=False)

    def _limited(self, channel: str) -> bool:
        # A `#` name is kept off the global channel even where its namespace does not
        # limit it (a route's author meant it for those users; the global channel
        # would hand it to everyone).
        return USER_BOUNDARY in channel or (
            self._audience is not None and self._audience.limited(channel)
        )

    def _second_personal(self, channels: Iterable[str]) -> tuple[str, ...]:
        if self._audience is None:
            return ()
        owners: set[str] = set()
        skip: list[str] = []
        for channel in channels:
            owner = self._audience.personal_owner(channel)
            if owner in owners:
                skip.append(channel)
            elif owner:
                owners.add(owner)
        return tuple(skip)

    def _unique(self, channels: Sequence[str]) -> dict[str, None]:
        # dict keeps first-seen order while dropping duplicates.
        return dict.fromkeys(c for c in channels if c != self._global_channel)

    def _finish(self, channels: Sequence[str]) -> tuple[str, ...]:
        # Global goes last, once.
        return (*self._unique(channels), self._global_channel)
