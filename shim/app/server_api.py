"""Centrifugo's server HTTP API, so existing server SDKs (`cent`, gocent, phpcent...)
work against the shim unchanged.

`POST /api/<method>` with a JSON body; the key in `X-API-Key: <key>` or
`Authorization: apikey <key>`. Like Centrifugo: a bad key is HTTP 401, a body that
is not a JSON object (or a field of the wrong type) is HTTP 400, an unknown method
is HTTP 404; everything else is HTTP 200 with `{"result": {...}}` or
`{"error": {"code", "message"}}`, and batch answers `{"replies": [...]}`.

What differs from Centrifugo, on purpose or for lack of a mechanism:
- publish/broadcast put raw data in the channel with no legacy frame: only Centrifuge
  clients see it, legacy hub clients do not (it is not a legacy event).
- disconnect, unsubscribe and subscribe act on the user's Centrifuge connections of
  this node at once and, with the Redis engine, are sent to every other node over
  the control channel (each applies them to its own connections, a moment later).
- channels lists this node's channels; info reports this node in full and, with
  Redis, the other live nodes with their connection counts only.
- idempotency_key is remembered per node for 5 minutes.
- tags, b64data/b64info, session, recover_since and override are refused with 108
  (not available) rather than silently ignored.
"""

from __future__ import annotations

import asyncio
import fnmatch
import functools
import logging
import time
from collections.abc import Awaitable, Callable, Mapping
from typing import Any

import orjson
from quart import Blueprint, Response, request

from shim import __version__
from shim.app.http import json_response, key_matches
from shim.app.runtime import Runtime
from shim.centrifuge import codec, codes
from shim.centrifuge.session import CentrifugeSession
from shim.core.broker import (
    BrokerUnavailable,
    Publication,
    PublishOptions,
    StreamPosition,
    UnrecoverablePosition,
)
from shim.core.config import NamespaceOptions
from shim.core.jsonbytes import dumps_kept
from shim.core.limits import Pacer

log = logging.getLogger("shim.server_api")

# Centrifugo's API says "not found" for an unknown method (the client protocol's 104
# says "method not found").
NOT_FOUND = codes.ErrorCode(104, "not found")
UNAUTHORIZED = codes.ErrorCode(101, "unauthorized")
# How long a publish idempotency key is remembered (Centrifugo's window).
IDEMPOTENCY_SECONDS = 300.0

Result = dict[str, Any]


class ApiError(Exception):
    """The command fails with `{"error": ...}` (HTTP 200)."""

    def __init__(self, error: codes.ErrorCode, message: str | None = None) -> None:
        super().__init__(message or error.message)
        self.error = error
        self.message = message

    def as_dict(self) -> dict[str, object]:
        return {"code": self.error.code, "message": self.message or self.error.message}


class BadBody(Exception):
    """The request body does not have the method's shape (HTTP 400)."""


class TooLarge(Exception):
    """More batch commands or broadcast channels than api_max_batch_size (HTTP 413)."""


# --- field readers: a wrong type is a malformed body, as Go's decoder sees it --------


def _field(body: Mapping[str, Any], key: str, kind: type | tuple[type, ...], default: Any) -> Any:
    value = body.get(key)
    if value is None:
        return default
    # bool is an int in Python; JSON keeps them apart.
    if not isinstance(value, kind) or (kind is int and isinstance(value, bool)):
        raise BadBody(f"{key}: wrong type")
    return value


def _str(body: Mapping[str, Any], key: str) -> str:
    value: str = _field(body, key, str, "")
    return value


def _int(body: Mapping[str, Any], key: str) -> int:
    value: int = _field(body, key, int, 0)
    return value


def _bool(body: Mapping[str, Any], key: str) -> bool:
    value: bool = _field(body, key, bool, False)
    return value


def _obj(body: Mapping[str, Any], key: str) -> dict[str, Any] | None:
    value: dict[str, Any] | None = _field(body, key, dict, None)
    return value


def _str_list(body: Mapping[str, Any], key: str) -> list[str]:
    value: list[Any] = _field(body, key, list, [])
    if not all(isinstance(item, str) for item in value):
        raise BadBody(f"{key}: wrong type")
    return value


def _raw(body: Mapping[str, Any], key: str) -> bytes | None:
    """A JSON value of the body re-encoded as bytes, None when absent or null."""
    if body.get(key) is None:
        return None
    try:
        return dumps_kept(body[key])
    except orjson.JSONEncodeError:
        # Read up to 1024 levels deep, written only up to 254.
        raise BadBody(f"{key}: nested too deeply") from None


def _refuse(body: Mapping[str, Any], *keys: str) -> None:
    for key in keys:
        if body.get(key) not in (None, "", {}, []):
            raise ApiError(codes.NOT_AVAILABLE, f"{key} is not supported")


class _IdempotencyCache:
    """Positions of recent publishes by (channel, key), for retried publishes."""

    def __init__(self) -> None:
        self._entries: dict[tuple[str, str], tuple[float, StreamPosition]] = {}

    def get(self, channel: str, key: str, now: float) -> StreamPosition | None:
        entry = self._entries.get((channel, key))
        return entry[1] if entry is not None and entry[0] > now else None

    def put(self, channel: str, key: str, position: StreamPosition, now: float) -> None:
        # Insertion order is expiry order: drop the expired front.
        while self._entries:
            oldest = next(iter(self._entries))
            if self._entries[oldest][0] > now:
                break
            del self._entries[oldest]
        self._entries.pop((channel, key), None)
        self._entries[(channel, key)] = (now + IDEMPOTENCY_SECONDS, position)


Handler = Callable[[Mapping[str, Any]], Awaitable[Result]]


class ServerApi:
    """The API methods; each takes the parsed body and returns the result object."""

    def __init__(self, runtime: Runtime) -> None:
        self.runtime = runtime
        self.started_at = time.monotonic()
        self._idempotency = _IdempotencyCache()
        self.methods: dict[str, Handler] = {
            "publish": self.publish,
            "broadcast": self.broadcast,
            "subscribe": self.subscribe,
            "unsubscribe": self.unsubscribe,
            "disconnect": self.disconnect,
            "presence": self.presence,
            "presence_stats": self.presence_stats,
            "history": self.history,
            "history_remove": self.history_remove,
            "channels": self.channels,
            "info": self.info,
        }

    # -- helpers ------------------------------------------------------------------------

    def _namespace(self, channel: str) -> NamespaceOptions:
        if not channel:
            raise ApiError(codes.BAD_REQUEST, "channel required")
        if len(channel.encode()) > self.runtime.settings.channel_max_length:
            raise ApiError(codes.BAD_REQUEST, "channel name too long")
        namespace = self.runtime.node.namespace(channel)
        if namespace is None:
            raise ApiError(codes.UNKNOWN_CHANNEL)
        return namespace

    def _sessions(self, body: Mapping[str, Any]) -> list[CentrifugeSession]:
        """The connected Centrifuge sessions the request's user/client/whitelist name."""
        user, client = _str(body, "user"), _str(body, "client")
        keep = set(_str_list(body, "whitelist"))
        _refuse(body, "session")
        if not user:
            raise ApiError(codes.BAD_REQUEST, "user required")
        return [
            session
            for session in self.runtime.centrifuge_sessions()
            if session.connected
            and session.user == user
            and (not client or session.client_id == client)
            and session.client_id not in keep
        ]

    async def _publish_one(
        self, channel: str, data: bytes, *, skip_history: bool, idempotency_key: str
    ) -> Result:
        self._namespace(channel)
        now = time.monotonic()
        if idempotency_key:
            cached = self._idempotency.get(channel, idempotency_key, now)
            if cached is not None:
                return {"offset": cached.offset, "epoch": cached.epoch}
        node = self.runtime.node
        if node.over_publish_rate((channel,)) is not None:
            raise ApiError(codes.TOO_MANY_REQUESTS)
        try:
            if skip_history:
                pub = Publication(data=data, time_ms=time.time_ns() // 1_000_000)
                position = await node.broker.publish(channel, pub, PublishOptions())
            else:
                position = await node.publish(channel, data)
        except BrokerUnavailable:
            raise ApiError(codes.INTERNAL) from None
        if idempotency_key:
            self._idempotency.put(channel, idempotency_key, position, now)
        return {"offset": position.offset, "epoch": position.epoch}

    # -- publishing ---------------------------------------------------------------------

    async def publish(self, body: Mapping[str, Any]) -> Result:
        channel = _str(body, "channel")
        data = _raw(body, "data")
        skip_history = _bool(body, "skip_history")
        idempotency_key = _str(body, "idempotency_key")
        _refuse(body, "tags", "b64data")
        if data is None:
            raise ApiError(codes.BAD_REQUEST, "data required")
        return await self._publish_one(
            channel, data, skip_history=skip_history, idempotency_key=idempotency_key
        )

    async def broadcast(self, body: Mapping[str, Any]) -> Result:
        channels = _str_list(body, "channels")
        data = _raw(body, "data")
        skip_history = _bool(body, "skip_history")
        idempotency_key = _str(body, "idempotency_key")
        _refuse(body, "tags", "b64data")
        if not channels:
            raise ApiError(codes.BAD_REQUEST, "channels required")
        self._check_size("channels", len(channels))
        if data is None:
            raise ApiError(codes.BAD_REQUEST, "data required")

        async def one(channel: str) -> Result:
            try:
                result = await self._publish_one(
                    channel, data, skip_history=skip_history, idempotency_key=idempotency_key
                )
            except ApiError as exc:
                return {"error": exc.as_dict()}
            return {"result": result}

        return {"responses": await _gather_paced([functools.partial(one, c) for c in channels])}

    # -- user connections ---------------------------------------------------------------

    async def disconnect(self, body: Mapping[str, Any]) -> Result:
        await self._local_disconnect(body)
        await self._forward("disconnect", body)
        return {}

    async def unsubscribe(self, body: Mapping[str, Any]) -> Result:
        await self._local_unsubscribe(body)
        await self._forward("unsubscribe", body)
        return {}

    async def subscribe(self, body: Mapping[str, Any]) -> Result:
        await self._local_subscribe(body)
        await self._forward("subscribe", body)
        return {}

    async def _forward(self, kind: str, body: Mapping[str, Any]) -> None:
        control = self.runtime.control
        if control is not None:
            try:
                await control.send_command(kind, dict(body))
            except BrokerUnavailable:
                raise ApiError(
                    codes.INTERNAL, "applied on this node only: Redis unavailable"
                ) from None

    async def apply_forwarded(self, kind: str, body: dict[str, Any]) -> None:
        """Another node's disconnect/unsubscribe/subscribe, for this node's connections."""
        local = {
            "disconnect": self._local_disconnect,
            "unsubscribe": self._local_unsubscribe,
            "subscribe": self._local_subscribe,
        }.get(kind)
        if local is not None:
            await local(body)

    async def _local_disconnect(self, body: Mapping[str, Any]) -> None:
        custom = _obj(body, "disconnect")
        code = codes.FORCE_DISCONNECT  # Centrifugo's default: no reconnect
        if custom is not None:
            number, reason = _int(custom, "code"), _str(custom, "reason")
            # A WebSocket close code an application may send, in Centrifuge's ranges.
            if not 3000 <= number <= 4999:
                raise ApiError(codes.BAD_REQUEST, "disconnect code must be within 3000-4999")
            code = codes.DisconnectCode(number, reason)
        for session in self._sessions(body):
            session.disconnect(code)

    async def _local_unsubscribe(self, body: Mapping[str, Any]) -> None:
        channel = _str(body, "channel")
        if channel:  # no channel: every channel of the user's connections, as in Centrifugo
            self._namespace(channel)
        for session in self._sessions(body):
            names = [channel] if channel else list(session.subscriptions)
            for name in names:
                session.unsubscribe_server(name)

    async def _local_subscribe(self, body: Mapping[str, Any]) -> None:
        channel = _str(body, "channel")
        info = _raw(body, "info")
        data = _raw(body, "data")
        expire_at = _int(body, "expire_at")
        _refuse(body, "b64info", "b64data", "recover_since", "override")
        self._namespace(channel)
        sessions = self._sessions(body)
        outcomes = await asyncio.gather(
            *(
                s.subscribe_server_side(channel, chan_info=info, data=data, expire_at=expire_at)
                for s in sessions
            ),
            return_exceptions=True,
        )
        failures = [o for o in outcomes if isinstance(o, BaseException)]
        if failures:
            log.warning("server-side subscribe failed: %r", failures[0])
            raise ApiError(codes.INTERNAL)

    # -- channel state ------------------------------------------------------------------

    async def presence(self, body: Mapping[str, Any]) -> Result:
        channel = _str(body, "channel")
        if not self._namespace(channel).presence:
            raise ApiError(codes.NOT_AVAILABLE)
        try:
            clients = await self.runtime.presence.presence(channel)
        except BrokerUnavailable:
            raise ApiError(codes.INTERNAL) from None
        return {"presence": {cid: codec.client_info_dict(info) for cid, info in clients.items()}}

    async def presence_stats(self, body: Mapping[str, Any]) -> Result:
        channel = _str(body, "channel")
        if not self._namespace(channel).presence:
            raise ApiError(codes.NOT_AVAILABLE)
        try:
            stats = await self.runtime.presence.presence_stats(channel)
        except BrokerUnavailable:
            raise ApiError(codes.INTERNAL) from None
        return {"num_clients": stats.num_clients, "num_users": stats.num_users}

    async def history(self, body: Mapping[str, Any]) -> Result:
        channel = _str(body, "channel")
        limit = _int(body, "limit")
        reverse = _bool(body, "reverse")
        since_body = _obj(body, "since")
        since = None
        if since_body is not None:
            since = StreamPosition(_int(since_body, "offset"), _str(since_body, "epoch"))
        if not self._namespace(channel).history_enabled:
            raise ApiError(codes.NOT_AVAILABLE)
        node = self.runtime.node
        try:
            history = await node.broker.history(
                channel,
                since=since,
                limit=max(limit, -1),
                reverse=reverse,
                options=node.publish_options(channel),
            )
        except UnrecoverablePosition:
            raise ApiError(codes.UNRECOVERABLE_POSITION) from None
        except BrokerUnavailable:
            raise ApiError(codes.INTERNAL) from None
        return {
            "publications": [codec.publication_dict(p) for p in history.publications],
            "offset": history.position.offset,
            "epoch": history.position.epoch,
        }

    async def history_remove(self, body: Mapping[str, Any]) -> Result:
        channel = _str(body, "channel")
        if not self._namespace(channel).history_enabled:
            raise ApiError(codes.NOT_AVAILABLE)
        try:
            await self.runtime.node.broker.remove_history(channel)
        except BrokerUnavailable:
            raise ApiError(codes.INTERNAL) from None
        return {}

    async def channels(self, body: Mapping[str, Any]) -> Result:
        """Channels with subscribers on this node (legacy clients attached count too)."""
        pattern = _str(body, "pattern")
        node = self.runtime.node
        found: dict[str, Result] = {}
        for channel in list(node.channels()):
            count = node.subscriber_count(channel)
            # fnmatch globs (*, ?, [..]) stand in for Centrifugo's gobwas globs.
            if count and (not pattern or fnmatch.fnmatchcase(channel, pattern)):
                found[channel] = {"num_clients": count}
        return {"channels": found}

    async def info(self, body: Mapping[str, Any]) -> Result:
        runtime = self.runtime
        node = runtime.node
        users: set[str] = set()
        for session in node.sessions:
            users.add(session.user)
        users.discard("")  # anonymous connections are not a user
        channels = [c for c in list(node.channels()) if node.subscriber_count(c)]
        here: Result = {
            "uid": node.name,
            "name": node.name,
            "version": __version__,
            "num_clients": len(node.sessions),
            "num_users": len(users),
            "num_channels": len(channels),
            "num_subs": sum(node.subscriber_count(c) for c in channels),
            "uptime": int(time.monotonic() - self.started_at),
        }
        nodes = [here]
        try:
            others = await runtime.nodes()
        except Exception:  # the shared registry (Redis) is optional for this answer
            log.warning("could not list the other nodes", exc_info=True)
            others = {}
        for name, counts in sorted(others.items()):
            if name != node.name:
                nodes.append({"uid": name, "name": name, "num_clients": sum(counts.values())})
        return {"nodes": nodes}

    # -- batch --------------------------------------------------------------------------

    async def batch(self, body: Mapping[str, Any]) -> Result:
        commands = _field(body, "commands", list, [])
        parallel = _bool(body, "parallel")
        if not all(isinstance(command, dict) for command in commands):
            raise BadBody("commands: wrong type")
        self._check_size("commands", len(commands))
        if parallel:
            replies = await _gather_paced([functools.partial(self._batch_one, c) for c in commands])
            return {"replies": list(replies)}
        answers = []
        pacer = Pacer()  # deliveries and other requests go on during a long batch
        for command in commands:
            answers.append(await self._batch_one(command))
            await pacer.tick()
        return {"replies": answers}

    def _check_size(self, what: str, count: int) -> None:
        limit = self.runtime.settings.api_max_batch_size
        if count > limit:
            raise TooLarge(f"{what}: {count} given, at most {limit} (api_max_batch_size)")

    async def _batch_one(self, command: Mapping[str, Any]) -> Result:
        name = next((key for key in command if key in self.methods), None)
        if name is None:
            return {"error": ApiError(NOT_FOUND).as_dict()}
        params = command[name]
        if not isinstance(params, dict):
            return {"error": ApiError(codes.BAD_REQUEST).as_dict()}
        try:
            return {name: await self.methods[name](params)}
        except ApiError as exc:
            return {"error": exc.as_dict()}
        except (BadBody, TooLarge) as exc:
            return {"error": ApiError(codes.BAD_REQUEST, str(exc)).as_dict()}
        except Exception:
            log.exception("server API batch command %s failed", name)
            return {"error": ApiError(codes.INTERNAL).as_dict()}


# --- server-side subscriptions of a live session ---------------------------------------
# These use the session's own subscribe/unsubscribe steps (`_open`, `_announce`,
# `_drop_subscription`); they belong on CentrifugeSession as public methods.


# Concurrent commands of one request started together (Redis round trips overlap).
GATHER_CHUNK = 100


async def _gather_paced(calls: list[Callable[[], Awaitable[Result]]]) -> list[Result]:
    """Run `calls` concurrently a chunk at a time, pausing between chunks (see Pacer):
    gathering a thousand at once would run them all in one loop iteration."""
    results: list[Result] = []
    pacer = Pacer()
    for start in range(0, len(calls), GATHER_CHUNK):
        chunk = calls[start : start + GATHER_CHUNK]
        results += await asyncio.gather(*(call() for call in chunk))
        await pacer.tick()
    return results


# --- HTTP ------------------------------------------------------------------------------


def _authorized(x_api_key: str, authorization: str, api_key: str) -> bool:
    """Centrifugo's two ways: `X-API-Key: <key>` or `Authorization: apikey <key>`."""
    key = x_api_key
    if not key:
        scheme, _, value = authorization.partition(" ")
        key = value.strip() if scheme.lower() == "apikey" else ""
    return key_matches(key, api_key)


def server_api_blueprint(runtime: Runtime) -> Blueprint:
    """`POST /api/<method>`: Centrifugo's server API over this runtime."""
    api = ServerApi(runtime)
    # Actions forwarded by other nodes (Redis engine) land here.
    runtime.command_handler = api.apply_forwarded
    blueprint = Blueprint("server_api", __name__)

    @blueprint.post("/api/<method>")
    async def call(method: str) -> Response:
        headers = request.headers
        if not _authorized(
            headers.get("X-API-Key", ""), headers.get("Authorization", ""), runtime.api_key
        ):
            return json_response({"error": ApiError(UNAUTHORIZED).as_dict()}, 401)
        handler = api.batch if method == "batch" else api.methods.get(method)
        if handler is None:
            return json_response({"error": ApiError(NOT_FOUND).as_dict()}, 404)
        raw = await request.get_data(cache=False, as_text=False, parse_form_data=False)
        assert isinstance(raw, bytes)
        try:
            body = orjson.loads(raw) if raw.strip() else {}
        except orjson.JSONDecodeError:
            body = None
        if not isinstance(body, dict):
            bad = ApiError(codes.BAD_REQUEST, "body must be a JSON object")
            return json_response({"error": bad.as_dict()}, 400)
        try:
            result = await handler(body)
        except BadBody as exc:
            return json_response({"error": ApiError(codes.BAD_REQUEST, str(exc)).as_dict()}, 400)
        except TooLarge as exc:
            return json_response({"error": ApiError(codes.LIMIT_EXCEEDED, str(exc)).as_dict()}, 413)
        except ApiError as exc:
            return json_response({"error": exc.as_dict()})
        except Exception:
            log.exception("server API %s failed", method)
            return json_response({"error": ApiError(codes.INTERNAL).as_dict()})
        return json_response(result if method == "batch" else {"result": result})

    return blueprint
