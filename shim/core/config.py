"""Settings: one home for every knob, each default stated beside its field.

Sources, later wins: the defaults below, an optional TOML file (`--config` or
`DEX_SHIM_CONFIG`), then environment variables `DEX_SHIM_<FIELD>` (upper case).
Namespaces and routes are tables, so they come from the TOML file (or a JSON
string in `DEX_SHIM_NAMESPACES` / `DEX_SHIM_ROUTES`). Names follow Centrifugo
where the concept matches; units are in the names (`_bytes`, `_seconds`).
"""

from __future__ import annotations

import dataclasses
import os
import re
import tomllib
from collections.abc import Mapping
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, get_type_hints

import orjson

ENV_PREFIX = "DEX_SHIM_"
# Where `engine = "redis"` (or a stream ingest) without a redis_url looks.
DEFAULT_REDIS_URL = "redis://127.0.0.1:6379/0"
# Shortest API/admin key accepted from the configuration (a generated one is 32).
MIN_KEY_BYTES = 32


# Longest coalescing delay allowed: a bound on the latency it adds.
MAX_WRITE_DELAY_SECONDS = 0.5


class ConfigError(ValueError):
    """A setting has a value we cannot use; the message names the setting."""


@dataclass(slots=True, frozen=True)
class NamespaceOptions:
    """Per-namespace channel options. The namespace is the part of a channel name
    before the first ':' (`task:42` is in `task`); channels without ':' use "".
    """

    # Publications kept per channel for history and recovery; 0 disables history.
    history_size: int = 100
    # Seconds a channel's history is kept after its last publication; 0 disables history.
    history_ttl_seconds: float = 300.0
    # Recovery on by default for every subscriber, as if each asked `recoverable: true`.
    force_recovery: bool = True
    # Positioning on by default (stream offset tracked per subscriber).
    force_positioning: bool = True
    # Presence kept for the channel (presence and presence_stats commands).
    presence: bool = True
    # Join/leave pushes sent to subscribers that ask for them (`join_leave: true`).
    join_leave: bool = False
    # Join/leave pushes sent to every subscriber, asked or not.
    force_push_join_leave: bool = False
    # Subscribers may publish into the channel from the client (off: the backend publishes).
    allow_publish_for_subscriber: bool = False
    # Any authenticated client may publish, subscribed or not.
    allow_publish_for_client: bool = False
    # Subscribers may call history on the channel.
    allow_history_for_subscriber: bool = True
    # Subscribers may call presence/presence_stats on the channel.
    allow_presence_for_subscriber: bool = True
    # Delta formats a subscriber may ask for (`delta` in subscribe): only "fossil" exists.
    allowed_delta_types: tuple[str, ...] = ()
    # Channels with Centrifugo's user boundary are for the users they list only:
    # `dialog#42,43` for users 42 and 43, `#42` for user 42, whatever the channel policy.
    allow_user_limited_channels: bool = False

    @property
    def history_enabled(self) -> bool:
        return self.history_size > 0 and self.history_ttl_seconds > 0


def _default_namespaces() -> dict[str, NamespaceOptions]:
    # The product's own migration kept 100 messages for 5 minutes on every channel.
    base = NamespaceOptions()
    return {
        "": base,
        "task": base,
        "quest": base,
        "project": base,
        "user": base,
        "system": base,
        "global": base,
    }


@dataclass(slots=True, frozen=True)
class RouteRule:
    """Where events of a type family go. `channel` is a template: `{key}` is filled
    from the payload (or the legacy top-level field of the same name); a rule whose
    key is missing is skipped and reported as a missing route.
    """

    # Event type prefix ending in '.', or a full event type; the longest match wins.
    match: str
    # Channel templates, e.g. ["task:{task_id}", "project:{project_id}"].
    channels: tuple[str, ...]
    # Templates whose key may be absent without counting as a missing route.
    optional: tuple[str, ...] = ()
    # Used when every template of `channels` lacked its key (approvals: user or system).
    fallback: str = ""


def _default_routes() -> tuple[RouteRule, ...]:
    # The design doc's table (docs/spec/dex-realtime-design.md): task-scoped families to task:{task_id},
    # task.* also to project:{project_id} when known, quests to quest:{quest_id},
    # approvals to the user when named and to `system` otherwise.
    return (
        RouteRule(
            "task.", ("task:{task_id}", "project:{project_id}"), optional=("project:{project_id}",)
        ),
        RouteRule("session.", ("task:{task_id}",)),
        RouteRule("activity.", ("task:{task_id}",)),
        RouteRule("planning.", ("task:{task_id}",)),
        RouteRule("checklist.", ("task:{task_id}",)),
        RouteRule("quest.", ("quest:{quest_id}",)),
        RouteRule("approval.", ("user:{user_id}",), fallback="system"),
        RouteRule("project.", ("project:{project_id}",)),
    )


@dataclass(slots=True, frozen=True)
class Settings:
    # --- listener -------------------------------------------------------------
    # Interface to bind.
    host: str = "127.0.0.1"
    # TCP port; 0 picks a free one (printed at start).
    port: int = 8000
    # Use uvloop when it is installed.
    use_uvloop: bool = True
    # Seconds a stopping node (SIGTERM) gives its clients to receive what is queued
    # and in-flight ingest requests to finish, before it closes anyway.
    shutdown_grace_seconds: float = 10.0
    # "json" (one object per line, with client/user/channel fields) or "text".
    log_format: str = "json"
    # Lowest level logged: debug, info, warning, error.
    log_level: str = "info"
    # Log every HTTP request and WebSocket upgrade (tokens in URLs are redacted).
    access_log: bool = False
    # Name of this node in info and metrics; empty = hostname:pid.
    node_name: str = ""

    # --- engine -------------------------------------------------------------
    # "memory" (single node) or "redis"; empty (the default) picks "redis" when
    # redis_url is set and "memory" otherwise, so redis_url alone switches engines.
    engine: str = ""
    # Redis address(es), comma-separated for client-side sharding by channel (every
    # node must list the same addresses in the same order). Setting it selects the
    # Redis engine. Empty (the default): no Redis, unless engine = "redis" or
    # ingest_stream_key asks for it, which then use redis://127.0.0.1:6379/0.
    redis_url: str = ""
    # redis_url names seed nodes of one Redis Cluster (instead of independent shards):
    # commands follow the cluster's slots, pub/sub is sharded (SSUBSCRIBE) on Redis 7+.
    redis_cluster: bool = False
    # Prefix of every Redis key and pub/sub channel of this deployment.
    redis_prefix: str = "dex"
    # Seconds a presence entry lives unless its node refreshes it (a dead node's
    # clients disappear from presence after this).
    presence_ttl_seconds: float = 60.0
    # Seconds between a node's refreshes of its clients' presence entries.
    presence_refresh_seconds: float = 25.0

    # --- connections --------------------------------------------------------
    # Bytes a client's outbound queue may hold before it is disconnected with 3008.
    client_queue_max_size_bytes: int = 2 * 1024 * 1024
    # Seconds one socket write may take before the client is disconnected with 3008.
    websocket_write_timeout_seconds: float = 5.0
    # Largest client frame accepted, in bytes; larger ones close the socket with 1009.
    websocket_read_limit_bytes: int = 65536
    # Largest server frame built by joining queued messages, in bytes (the Python SDK
    # refuses frames over 1 MiB).
    websocket_max_frame_bytes: int = 512 * 1024
    # Seconds the node waits, after the first message queued for idle sockets, before
    # writing (Centrifugo's client_write_delay): publications arriving meanwhile leave
    # in the same write (one frame for the channel protocol, several frames for the
    # legacy one), trading that much latency for fewer syscalls under sustained load.
    # 0 (the default): write in the same event-loop iteration. At most 0.5.
    client_write_delay_seconds: float = 0.0
    # Negotiate permessage-deflate when the client offers it (costs memory and CPU per client).
    websocket_compression: bool = False
    # Seconds between server pings (Centrifuge app-level `{}`); 0 disables pings.
    client_ping_interval_seconds: float = 25.0
    # Seconds a client has to answer a ping before it is disconnected with 3012.
    client_pong_timeout_seconds: float = 10.0
    # Seconds a socket may stay open without a connect command (then 3502).
    client_stale_close_delay_seconds: float = 15.0
    # Grace after a connection or subscription expires before it is closed (3005/2501).
    client_expired_close_delay_seconds: float = 25.0
    # Seconds between checks of each positioned subscription's position against the
    # engine's stream top (one read per channel per check, shared by its subscribers).
    # A subscription still missing, at a check, what the previous check found it
    # behind on gets unsubscribe 2500 (server-side: disconnect 3010) and resubscribes,
    # recovering from history. 0 disables the check. Centrifuge's default: 40.
    client_channel_position_check_delay_seconds: float = 40.0
    # A positioned subscription that gets a publication more than this many seconds
    # after it was published (by the publishing node's clock) is treated the same
    # way: 2500 / 3010, then recovery from history. 0 (the default) disables it.
    client_channel_position_max_time_lag_seconds: float = 0.0
    # Channels one client may hold (error 106 above it).
    client_channel_limit: int = 128
    # Longest channel name in bytes (error 107 above it).
    channel_max_length: int = 255
    # Accept clients whose token has no user id (anonymous); off: 3507 / 401.
    client_anonymous: bool = False

    # --- fallback transports (Centrifugo's names; see README "Fallback transports") ---
    # HTTP-streaming with bidirectional emulation (/connection/http_stream; commands
    # come back through POST /emulation). On: centrifuge-js falls back to it by itself
    # where WebSocket is blocked, and it costs nothing until used.
    http_stream_enabled: bool = True
    # Largest initial request (the connect command) of an HTTP-streaming client, in bytes.
    http_stream_max_request_body_size: int = 65536
    # SSE (EventSource) with bidirectional emulation (/connection/sse, connect command in
    # the `cf_connect` URL parameter).
    sse_enabled: bool = True
    # Largest initial POST body of an SSE client, in bytes (browsers connect with GET).
    sse_max_request_body_size: int = 65536
    # Largest POST /emulation body (one batch of an emulated client's commands), in bytes.
    emulation_max_request_body_size: int = 65536
    # Unidirectional WebSocket (/connection/uni_websocket): pushes only, for clients
    # without an SDK. Off: nothing in Dex uses it; turn on for such integrations.
    uni_websocket_enabled: bool = False
    # Largest message a unidirectional WebSocket client may send (its connect request), in bytes.
    uni_websocket_message_size_limit: int = 65536
    # Unidirectional HTTP-streaming (/connection/uni_http_stream, connect request as the
    # POST body): pushes only. Off by default, as uni_websocket.
    uni_http_stream_enabled: bool = False
    # Largest connect request body of a unidirectional HTTP-streaming client, in bytes.
    uni_http_stream_max_request_body_size: int = 65536
    # Unidirectional SSE (/connection/uni_sse, connect request in `cf_connect` or the
    # POST body): pushes only. Off by default, as uni_websocket.
    uni_sse_enabled: bool = False
    # Largest connect request body of a unidirectional SSE client (POST), in bytes.
    uni_sse_max_request_body_size: int = 65536

    # --- authentication -----------------------------------------------------
    # Signature algorithm of client JWTs: EdDSA (what Dex issues), HS256, RS256 or ES256.
    token_algorithm: str = "EdDSA"
    # Verification key: PEM public key (EdDSA/RS256/ES256) or the shared secret (HS256).
    token_key: str = ""
    # File holding the verification key; wins over token_key when set.
    token_key_file: str = ""
    # Private key (PEM) or secret that `dex-shim token` signs with in development; when
    # neither token_key nor token_key_file is set, a key pair is made at start.
    token_signing_key_file: str = ""
    # Required `aud` claim; empty = not checked.
    token_audience: str = ""
    # Required `iss` claim; empty = not checked.
    token_issuer: str = ""

    # --- channel authorization ---------------------------------------------
    # "any" (every authenticated user), "claims" (token `channels`/`project_ids`),
    # or "http" (ask the application, like Centrifugo's subscribe proxy).
    channel_policy: str = "any"
    # URL the "http" policy POSTs {user, channel, client} to; 200 with {"allow": true} allows.
    channel_policy_url: str = ""
    # Seconds the "http" policy waits for an answer before refusing (error 100, temporary).
    channel_policy_timeout_seconds: float = 2.0
    # Seconds a "http" policy answer is reused for the same (user, channel).
    channel_policy_cache_seconds: float = 10.0

    # --- channels -----------------------------------------------------------
    # Channel namespaces (TOML table [namespaces.<name>]); see NamespaceOptions.
    namespaces: Mapping[str, NamespaceOptions] = field(default_factory=_default_namespaces)
    # Prefix of each user's personal channel; every connection is subscribed to
    # `<prefix>:<user id>` server-side.
    user_channel_prefix: str = "user"
    # Centrifugo's personal channel, beside the one above: every connection with a user
    # is also subscribed server-side to `#<user id>` (or `<namespace>:#<user id>`).
    user_subscribe_to_personal: bool = False
    # Namespace of that channel ("" = none: `#<user id>`); it must be configured.
    user_personal_channel_namespace: str = ""
    # Channel every ingested event is also published to (legacy `*` clients read it),
    # except events routed to a personal or user-limited channel (or any name with a
    # `#`): those reach only the users the channel names.
    global_channel: str = "global"

    # --- legacy hub protocol (GET /api/v1/ws) --------------------------------
    # Match legacy `task:`/`project:` subscriptions the old hub's way: only on the
    # message's top-level task_id/project_id. Off: they match the routed channels
    # (an intentional fix: most task events never reached task subscribers before).
    legacy_strict_matching: bool = False
    # Seconds between WebSocket pings to legacy clients (the hub's 30 s).
    legacy_ping_interval_seconds: float = 30.0
    # Seconds a legacy client may go without answering a ping before it is dropped
    # (the hub's 60 s read deadline, renewed only by pongs).
    legacy_read_deadline_seconds: float = 60.0
    # Compatibility: deliver events routed to a personal or user-limited channel
    # (approvals, `#42`, `dialog#42,43`) to every legacy `*` client, as the Go hub did.
    # Off: only to the users the channel names, on both protocols. Only
    # channel_policy = "any" lets it through (claims/http still ask).
    legacy_personal_events_to_all: bool = False

    # --- cutover (changed at runtime through the admin API) -------------------
    # Starting mode: "legacy" (legacy only), "dual" (both) or "channels" (legacy refused).
    cutover_mode: str = "dual"
    # Share of users (0-100, stable hash of the user id) told to use channels in "dual".
    cutover_channels_percent: float = 0.0
    # Comma-separated user ids always told to use channels.
    cutover_allow_users: str = ""
    # Comma-separated user ids always told to use the legacy protocol (wins over allow).
    cutover_deny_users: str = ""
    # Seconds over which existing legacy connections are closed after entering "channels".
    cutover_drain_seconds: float = 300.0
    # Serve the Centrifuge protocol to an SDK that connects to /api/v1/ws (recognised by
    # its first frame) in "dual" and "channels".
    detect_centrifuge_on_legacy_path: bool = True
    # Key for the admin API (`X-Admin-Key`); empty = generated in the dev key directory.
    admin_api_key: str = ""

    # --- ingest -------------------------------------------------------------
    # Key the backend sends in `X-API-Key` to POST /api/v1/broadcast; empty = generated
    # at start and printed once.
    api_key: str = ""
    # Routing rules of event types to channels (TOML [[routes]]).
    routes: tuple[RouteRule, ...] = field(default_factory=_default_routes)
    # Channel for event types no rule matches (logged once per type).
    default_channel: str = "system"
    # Largest single legacy message accepted, in bytes of its JSON text.
    ingest_max_item_bytes: int = 256 * 1024
    # Largest request body of POST /api/v1/broadcast, in bytes.
    ingest_max_body_bytes: int = 8 * 1024 * 1024
    # Redis stream the backend may append legacy hub messages to (field `message`),
    # published by every node, each channel in append order (docs/stream-ingest.md);
    # empty = no stream ingest. It lives on the first address of redis_url.
    ingest_stream_key: str = ""
    # Seconds a silent node (dead, paused) keeps its share of the stream before other
    # nodes take it over: its lease time.
    ingest_stream_claim_idle_seconds: float = 30.0
    # Partitions of the stream: at most this many nodes publish it at once; a task's
    # entries all go to one. Read at the stream's first start only (then kept in Redis).
    ingest_stream_partitions: int = 8

    # Most items one POST /api/v1/broadcast may carry; more are refused whole with
    # HTTP 413 (split the batch). Large requests are published in chunks, so
    # deliveries to clients go on meanwhile.
    ingest_max_items: int = 1000

    # --- limits ---------------------------------------------------------------
    # WebSocket upgrades whose Origin header matches none of these comma-separated
    # patterns (shell-style, e.g. `https://*.example.com`) get HTTP 403; a request
    # without Origin (not a browser) is not checked. Empty = any origin, as before.
    allowed_origins: str = ""
    # WebSocket connections (both protocols) this node holds at most; past it the
    # upgrade is answered HTTP 503, as Centrifugo's connection limit does. 0 = no limit.
    client_connection_limit: int = 0
    # Connections of one user on this node at most: a Centrifuge connect past it is
    # closed with 3504 "connection limit", a legacy upgrade gets HTTP 503. 0 = no
    # limit (legacy pages open several sockets per tab: leave room for them).
    client_user_connection_limit: int = 0
    # Commands per second one connection may send on average (token bucket; every
    # Centrifuge command and every legacy frame counts; pongs do not). Past the
    # burst a command gets error 111 "too many requests" (a legacy frame is dropped
    # and counted); a client that sends as many again into the empty bucket is
    # disconnected with 3013 "too many requests". 0 = no limit.
    client_command_rate_limit: float = 100.0
    # Commands a connection may send at once before the rate applies.
    client_command_burst: int = 200
    # Publications per second into one channel, counted on this node over ingest,
    # the server API and client publish (the global channel is exempt: it carries
    # every event). Past the burst an ingest item is refused with its own result,
    # a server API or client publish gets error 111. 0 = no limit.
    channel_publish_rate_limit: float = 0.0
    # Publications one channel may take at once before the rate applies.
    channel_publish_burst: int = 100
    # Commands in one server API `batch` and channels in one `broadcast` at most;
    # more are refused with HTTP 413.
    api_max_batch_size: int = 1000
    # Channels the memory engine keeps history streams for at most; past it the
    # least recently published stream is dropped (its subscribers resync).
    memory_max_streams: int = 100_000
    # `host:port` of a separate listener serving only GET /metrics (keep it internal);
    # then the public port answers 404 there. Empty = /metrics on the main port.
    metrics_listen: str = ""
    # Seconds a console credential (POST /console/api/token, admin key required) is
    # valid for connecting the console's live tail; the console fetches a new one.
    console_token_ttl_seconds: float = 60.0

    def __post_init__(self) -> None:
        # Resolved once here, so every reader sees "memory" or "redis" and a URL when
        # Redis is used. dataclasses.replace() passes the resolved engine on: change
        # `engine` too when replacing redis_url.
        engine = self.engine or ("redis" if self.redis_url else "memory")
        object.__setattr__(self, "engine", engine)
        if not self.redis_url and (engine == "redis" or self.ingest_stream_key):
            object.__setattr__(self, "redis_url", DEFAULT_REDIS_URL)

    def namespace_for(self, channel: str) -> NamespaceOptions | None:
        """Options of the channel's namespace, or None when it is not configured."""
        name, sep, _ = channel.partition(":")
        return self.namespaces.get(name if sep else "")


_SCALARS: dict[str, type] = {"int": int, "float": float, "str": str, "bool": bool}


def _coerce(name: str, type_name: str, raw: Any) -> Any:
    target = _SCALARS.get(type_name)
    if target is None:
        raise ConfigError(f"{name}: not a scalar setting")
    if target is bool:
        if isinstance(raw, bool):
            return raw
        text = str(raw).strip().lower()
        if text in {"1", "true", "yes", "on"}:
            return True
        if text in {"0", "false", "no", "off", ""}:
            return False
        raise ConfigError(f"{name}: expected a boolean, got {raw!r}")
    if target is str:
        return str(raw)
    try:
        return target(raw)
    except (TypeError, ValueError) as exc:
        raise ConfigError(f"{name}: expected {type_name}, got {raw!r}") from exc


# Namespace options holding a list of strings (TOML array, JSON array or "a,b").
_LIST_OPTIONS = frozenset({"allowed_delta_types"})
_DELTA_TYPES = frozenset({"fossil"})


def _string_tuple(name: str, raw: Any) -> tuple[str, ...]:
    items = raw.split(",") if isinstance(raw, str) else raw
    if not isinstance(items, list | tuple) or not all(isinstance(i, str) for i in items):
        raise ConfigError(f"{name}: expected a list of strings, got {raw!r}")
    values = tuple(i.strip() for i in items if i.strip())
    unknown = set(values) - _DELTA_TYPES
    if unknown:
        raise ConfigError(f"{name}: unknown delta types {sorted(unknown)} (only 'fossil')")
    return values


# Centrifugo's spelling of namespace options that ours name differently.
_CENTRIFUGO_NAMES = {"history_ttl": "history_ttl_seconds"}
_DURATION = re.compile(r"(\d+(?:\.\d+)?)(ms|s|m|h)")
_DURATION_UNITS = {"ms": 0.001, "s": 1.0, "m": 60.0, "h": 3600.0}


def duration_seconds(name: str, raw: Any) -> float:
    """A Centrifugo duration ("300s", "1h30m", "500ms") or a number of seconds."""
    if isinstance(raw, int | float) and not isinstance(raw, bool):
        return float(raw)
    text = str(raw).strip()
    parts = _DURATION.findall(text)
    if not parts or "".join(number + unit for number, unit in parts) != text:
        raise ConfigError(f"{name}: expected a duration such as 300s or 1h30m, got {raw!r}")
    return sum(float(number) * _DURATION_UNITS[unit] for number, unit in parts)


def _centrifugo_names(name: str, options: Mapping[str, Any]) -> dict[str, Any]:
    renamed: dict[str, Any] = {}
    for key, value in options.items():
        ours = _CENTRIFUGO_NAMES.get(key)
        if ours is None:
            renamed[key] = value
            continue
        if ours in options:
            raise ConfigError(f"namespaces.{name}: both {key} and {ours} given")
        renamed[ours] = duration_seconds(f"namespaces.{name}.{key}", value)
    return renamed


def _namespace_table(raw: Any) -> Mapping[str, Any]:
    """Ours is a table keyed by name; Centrifugo's is a list of objects with `name`."""
    if isinstance(raw, Mapping):
        return raw
    if not isinstance(raw, list):
        raise ConfigError("namespaces: expected a table of tables or a list with names")
    table: dict[str, Any] = {}
    for index, item in enumerate(raw):
        if not isinstance(item, Mapping) or not isinstance(item.get("name"), str):
            raise ConfigError(f"namespaces[{index}]: expected an object with a `name`")
        table[item["name"]] = {k: v for k, v in item.items() if k != "name"}
    return table


def _namespaces_from(raw: Any) -> dict[str, NamespaceOptions]:
    known = {f.name for f in dataclasses.fields(NamespaceOptions)}
    hints = get_type_hints(NamespaceOptions)
    result: dict[str, NamespaceOptions] = {}
    for name, given in _namespace_table(raw).items():
        if not isinstance(given, Mapping):
            raise ConfigError(f"namespaces.{name}: expected a table")
        options = _centrifugo_names(name, given)
        unknown = set(options) - known
        if unknown:
            raise ConfigError(f"namespaces.{name}: unknown keys {sorted(unknown)}")
        values: dict[str, Any] = {
            key: _string_tuple(f"namespaces.{name}.{key}", value)
            if key in _LIST_OPTIONS
            else _coerce(f"namespaces.{name}.{key}", hints[key].__name__, value)
            for key, value in options.items()
        }
        result[str(name)] = NamespaceOptions(**values)
    return result


def _routes_from(raw: Any) -> tuple[RouteRule, ...]:
    if not isinstance(raw, list):
        raise ConfigError("routes: expected an array of tables")
    rules = []
    for index, item in enumerate(raw):
        if not isinstance(item, Mapping) or "match" not in item or "channels" not in item:
            raise ConfigError(f"routes[{index}]: needs `match` and `channels`")
        rules.append(
            RouteRule(
                match=str(item["match"]),
                channels=tuple(str(c) for c in item["channels"]),
                optional=tuple(str(c) for c in item.get("optional", ())),
                fallback=str(item.get("fallback", "")),
            )
        )
    return tuple(rules)


def load_settings(
    path: str | Path | None = None,
    env: Mapping[str, str] | None = None,
    **overrides: Any,
) -> Settings:
    """Build Settings from defaults, then the TOML file, then the environment, then overrides."""
    env = os.environ if env is None else env
    values: dict[str, Any] = {}
    path = path or env.get(ENV_PREFIX + "CONFIG") or None
    if path:
        try:
            with open(path, "rb") as handle:
                values.update(tomllib.load(handle))
        except (OSError, tomllib.TOMLDecodeError) as exc:
            raise ConfigError(f"config file {path}: {exc}") from exc

    hints = get_type_hints(Settings)
    known = {f.name for f in dataclasses.fields(Settings)}
    unknown = set(values) - known
    if unknown:
        raise ConfigError(f"unknown settings in {path}: {sorted(unknown)}")
    for name in known:
        env_value = env.get(ENV_PREFIX + name.upper())
        if env_value is not None:
            values[name] = (
                orjson.loads(env_value) if name in ("namespaces", "routes") else env_value
            )
    values.update(overrides)

    final: dict[str, Any] = {}
    for name, raw in values.items():
        if name == "namespaces":
            final[name] = raw if _is_namespace_map(raw) else _namespaces_from(raw)
        elif name == "routes":
            final[name] = raw if _is_rule_tuple(raw) else _routes_from(raw)
        else:
            type_name = getattr(hints[name], "__name__", str(hints[name]))
            final[name] = _coerce(name, type_name, raw)
    settings = Settings(**final)
    _validate(settings)
    return settings


def _is_namespace_map(raw: Any) -> bool:
    return isinstance(raw, Mapping) and all(isinstance(v, NamespaceOptions) for v in raw.values())


def _is_rule_tuple(raw: Any) -> bool:
    return isinstance(raw, tuple) and all(isinstance(v, RouteRule) for v in raw)


def _validate(settings: Settings) -> None:
    if settings.log_format not in ("json", "text"):
        raise ConfigError(f"log_format: expected json or text, got {settings.log_format!r}")
    if settings.log_level.upper() not in ("DEBUG", "INFO", "WARNING", "ERROR"):
        raise ConfigError(f"log_level: unknown level {settings.log_level!r}")
    if settings.engine not in ("memory", "redis"):
        raise ConfigError(f"engine: expected 'memory' or 'redis', got {settings.engine!r}")
    if settings.token_algorithm not in ("EdDSA", "HS256", "RS256", "ES256"):
        raise ConfigError(f"token_algorithm: unsupported {settings.token_algorithm!r}")
    if settings.cutover_mode not in ("legacy", "dual", "channels"):
        raise ConfigError(
            f"cutover_mode: expected legacy|dual|channels, got {settings.cutover_mode!r}"
        )
    if not 0 <= settings.cutover_channels_percent <= 100:
        raise ConfigError("cutover_channels_percent: must be within 0..100")
    if settings.channel_policy not in ("any", "claims", "http"):
        raise ConfigError(
            f"channel_policy: expected any|claims|http, got {settings.channel_policy!r}"
        )
    if settings.channel_policy == "http" and not settings.channel_policy_url:
        raise ConfigError("channel_policy_url: required when channel_policy is 'http'")
    if settings.presence_refresh_seconds >= settings.presence_ttl_seconds:
        raise ConfigError("presence_refresh_seconds: must be below presence_ttl_seconds")
    if settings.client_queue_max_size_bytes < 1024:
        raise ConfigError("client_queue_max_size_bytes: must be at least 1024")
    if not 0 <= settings.client_write_delay_seconds <= MAX_WRITE_DELAY_SECONDS:
        raise ConfigError(
            f"client_write_delay_seconds: must be within 0..{MAX_WRITE_DELAY_SECONDS}"
        )
    if settings.client_channel_position_check_delay_seconds < 0:
        raise ConfigError("client_channel_position_check_delay_seconds: must be 0 (off) or more")
    if settings.client_channel_position_max_time_lag_seconds < 0:
        raise ConfigError("client_channel_position_max_time_lag_seconds: must be 0 (off) or more")
    if settings.websocket_max_frame_bytes > 1024 * 1024:
        raise ConfigError("websocket_max_frame_bytes: must stay under 1 MiB for the Python SDK")
    for name in ("api_key", "admin_api_key"):
        # Empty means "generate one"; a configured key must not be guessable.
        configured = getattr(settings, name)
        if configured and len(configured.encode()) < MIN_KEY_BYTES:
            raise ConfigError(f"{name}: must be at least {MIN_KEY_BYTES} bytes long")
    for name in ("ingest_max_items", "api_max_batch_size", "memory_max_streams"):
        if getattr(settings, name) < 1:
            raise ConfigError(f"{name}: must be at least 1")
    if settings.client_command_burst < 1 or settings.channel_publish_burst < 1:
        raise ConfigError("client_command_burst / channel_publish_burst: must be at least 1")
    if settings.ingest_stream_partitions < 1 or settings.ingest_stream_claim_idle_seconds <= 0:
        raise ConfigError(
            "ingest_stream_partitions / ingest_stream_claim_idle_seconds: must be positive"
        )
    if settings.ingest_stream_key and settings.redis_cluster:
        # The stream, its partitions, cursors and leases are touched together by
        # scripts: one slot, so the key needs a hash tag.
        opened, closed = settings.ingest_stream_key.find("{"), settings.ingest_stream_key.find("}")
        if not 0 <= opened < closed - 1:
            raise ConfigError(
                "ingest_stream_key: on a Redis Cluster it needs a hash tag, e.g. '{dex-ingest}'"
            )
    if settings.user_subscribe_to_personal:
        personal = settings.user_personal_channel_namespace
        if personal not in settings.namespaces:
            raise ConfigError(
                f"user_personal_channel_namespace: namespace {personal!r} is not configured"
            )
    if settings.metrics_listen and not _host_port(settings.metrics_listen):
        raise ConfigError(f"metrics_listen: expected host:port, got {settings.metrics_listen!r}")


def _host_port(text: str) -> tuple[str, int] | None:
    host, sep, port = text.rpartition(":")
    if not sep or not host or not port.isdigit() or int(port) > 65535:
        return None
    return host.strip("[]"), int(port)


def metrics_address(settings: Settings) -> tuple[str, int] | None:
    """(host, port) of the separate metrics listener, or None."""
    return _host_port(settings.metrics_listen) if settings.metrics_listen else None


def origin_patterns(settings: Settings) -> tuple[str, ...]:
    return tuple(p.strip().lower() for p in settings.allowed_origins.split(",") if p.strip())


def describe_settings() -> list[tuple[str, str, str]]:
    """(name, default, doc) for every scalar setting, read from this module's comments."""
    import inspect

    source = inspect.getsource(Settings).splitlines()
    docs: dict[str, str] = {}
    pending: list[str] = []
    for line in source:
        stripped = line.strip()
        if stripped.startswith("# ---"):
            pending = []
        elif stripped.startswith("#"):
            pending.append(stripped.lstrip("# "))
        elif ":" in stripped and pending and not stripped.startswith("def "):
            docs[stripped.split(":", 1)[0]] = " ".join(pending)
            pending = []
    defaults = Settings()
    return [
        (f.name, repr(getattr(defaults, f.name)), docs.get(f.name, ""))
        for f in dataclasses.fields(Settings)
        if f.name not in ("namespaces", "routes")
    ]
