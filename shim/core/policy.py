"""Channel authorization: may this connection subscribe to that channel?

The session asks one ChannelAuthorizer. It answers for personal channels
(`<prefix>:<user id>`) itself and hands every other channel to a ChannelPolicy:

- AllowAuthenticated ("any"): every user with a non-empty id (the product is single-user).
- ClaimsPolicy ("claims"): the connection token lists what the user may read.
- HttpCallbackPolicy ("http"): the application answers, like Centrifugo's subscribe proxy.

A decision is protocol-free: a refusal is final, a policy that could not answer
gives a temporary refusal (Centrifuge sends 103 and 100 for them; SDKs retry the
latter later).
"""

from __future__ import annotations

import asyncio
import logging
import time
from collections.abc import Callable
from dataclasses import dataclass
from typing import TYPE_CHECKING, Protocol

import httpx
import orjson

from shim.core.routing import PERSONAL_FANOUT_CHANNEL, USER_BOUNDARY

if TYPE_CHECKING:
    from shim.core.auth import Credentials
    from shim.core.config import Settings

logger = logging.getLogger("shim.policy")


@dataclass(slots=True, frozen=True)
class Decision:
    allowed: bool
    # Refused because no answer was had (the policy failed): worth asking again later.
    temporary: bool = False
    # For logs only; never sent to clients.
    reason: str = ""

    @classmethod
    def allow(cls, reason: str) -> Decision:
        return cls(True, False, reason)

    @classmethod
    def deny(cls, reason: str) -> Decision:
        return cls(False, False, reason)

    @classmethod
    def failure(cls, reason: str) -> Decision:
        return cls(False, True, reason)


class ChannelPolicy(Protocol):
    async def can_subscribe(
        self, credentials: Credentials, channel: str, client_id: str
    ) -> Decision: ...


class AllowAuthenticated:
    """Any connection with a user id may subscribe anywhere (the legacy hub's rule)."""

    def decide(self, credentials: Credentials, channel: str) -> Decision:
        if credentials.user:
            return Decision.allow("authenticated")
        return Decision.deny("anonymous")

    async def can_subscribe(
        self, credentials: Credentials, channel: str, client_id: str
    ) -> Decision:
        return self.decide(credentials, channel)


def channel_granted(grants: tuple[str, ...], channel: str) -> bool:
    """True when an entry of `grants` is `channel` itself or `<namespace>:*` for its
    namespace. Nothing else is a pattern: `*` and `task:4*` are plain names, so a
    grant never widens by accident.
    """
    namespace, sep, rest = channel.partition(":")
    wildcard = f"{namespace}:*" if sep and namespace and rest else None
    return any(grant in (channel, wildcard) for grant in grants)


class ClaimsPolicy:
    """The signed connection token decides; the user id plays no part, so a token
    without `sub` still gets what it lists.

    - `channels`: exact channel names, or `<namespace>:*` for a whole namespace
      (`task:*`). The same claim makes server-side subscriptions; patterns are skipped there.
    - `project_ids`: each id grants `<project_namespace>:<id>`.
    - Task and quest channels come only from `channels`: a channel name does not say
      which project a task belongs to. When access must follow project membership,
      use HttpCallbackPolicy, where the application can look it up.
    """

    __slots__ = ("_project_prefix",)

    def __init__(self, *, project_namespace: str = "project") -> None:
        self._project_prefix = f"{project_namespace}:"

    async def can_subscribe(
        self, credentials: Credentials, channel: str, client_id: str
    ) -> Decision:
        return self.decide(credentials, channel)

    def decide(self, credentials: Credentials, channel: str) -> Decision:
        if channel_granted(credentials.channels, channel):
            return Decision.allow("token channels")
        if channel.startswith(self._project_prefix):
            project_id = channel[len(self._project_prefix) :]
            if project_id and project_id in credentials.project_ids:
                return Decision.allow("token project_ids")
        return Decision.deny("not granted by token")


_Key = tuple[str, str]
_JSON_HEADERS = {"Content-Type": "application/json", "Accept": "application/json"}


class HttpCallbackPolicy:
    """POSTs {"user", "channel", "client"} to the application.

    200 {"allow": true} allows; 200 {"allow": false} or 403 refuses. Anything else
    (timeout, connection error, another status, an unreadable body) is a temporary
    temporary failure. Answers, not failures, are cached per (user, channel) for
    cache_seconds; concurrent asks for the same (user, channel) share one request.
    """

    def __init__(
        self,
        url: str,
        timeout_seconds: float = 2.0,
        cache_seconds: float = 10.0,
        client: httpx.AsyncClient | None = None,
        *,
        clock: Callable[[], float] = time.monotonic,
        max_cache_entries: int = 10_000,
    ) -> None:
        self._url = url
        self._timeout = timeout_seconds
        self._cache_seconds = cache_seconds
        self._owns_client = client is None
        self._client = client or httpx.AsyncClient(timeout=httpx.Timeout(timeout_seconds))
        self._clock = clock
        self._max_entries = max_cache_entries
        self._cache: dict[_Key, tuple[float, Decision]] = {}
        self._inflight: dict[_Key, asyncio.Task[Decision]] = {}

    async def can_subscribe(
        self, credentials: Credentials, channel: str, client_id: str
    ) -> Decision:
        key = (credentials.user, channel)
        cached = self._cached(key)
        if cached is not None:
            return cached
        task = self._inflight.get(key)
        if task is None:
            task = asyncio.create_task(self._ask(key, client_id))
            self._inflight[key] = task
            task.add_done_callback(lambda done: self._forget(key, done))
        # Shielded: one asker giving up (its client left) must not cancel the others' answer.
        return await asyncio.shield(task)

    async def aclose(self) -> None:
        tasks = list(self._inflight.values())
        for task in tasks:
            task.cancel()
        await asyncio.gather(*tasks, return_exceptions=True)
        if self._owns_client:
            await self._client.aclose()

    async def _ask(self, key: _Key, client_id: str) -> Decision:
        user, channel = key
        body = orjson.dumps({"user": user, "channel": channel, "client": client_id})
        try:
            # httpx timeouts are per phase; this bounds the whole exchange.
            async with asyncio.timeout(self._timeout):
                response = await self._client.post(self._url, content=body, headers=_JSON_HEADERS)
        except TimeoutError:
            return self._failed(channel, "callback timed out")
        except httpx.HTTPError as exc:
            return self._failed(channel, f"callback failed: {type(exc).__name__}")
        decision = _read_answer(response)
        if decision.temporary:
            return self._failed(channel, decision.reason)
        self._remember(key, decision)
        return decision

    def _failed(self, channel: str, reason: str) -> Decision:
        logger.warning("channel policy %s: %s (channel %s)", self._url, reason, channel)
        return Decision.failure(reason)

    def _cached(self, key: _Key) -> Decision | None:
        entry = self._cache.get(key)
        if entry is None:
            return None
        expires_at, decision = entry
        if self._clock() < expires_at:
            return decision
        del self._cache[key]
        return None

    def _remember(self, key: _Key, decision: Decision) -> None:
        if self._cache_seconds <= 0:
            return
        now = self._clock()
        if len(self._cache) >= self._max_entries:
            self._cache = {k: v for k, v in self._cache.items() if v[0] > now}
            while len(self._cache) >= self._max_entries:  # all fresh: drop the oldest
                del self._cache[next(iter(self._cache))]
        self._cache[key] = (now + self._cache_seconds, decision)

    def _forget(self, key: _Key, task: asyncio.Task[Decision]) -> None:
        if self._inflight.get(key) is task:
            del self._inflight[key]


def _read_answer(response: httpx.Response) -> Decision:
    if response.status_code == 403:
        return Decision.deny("callback answered 403")
    if response.status_code != 200:
        return Decision.failure(f"callback answered {response.status_code}")
    try:
        body = orjson.loads(response.content)
    except orjson.JSONDecodeError:
        return Decision.failure("callback answer is not JSON")
    allow = body.get("allow") if isinstance(body, dict) else None
    if allow is True:
        return Decision.allow("callback allowed")
    if allow is False:
        return Decision.deny("callback refused")
    return Decision.failure("callback answer has no boolean `allow`")


# Centrifugo's separator of users after the boundary: `dialog#42,43`.
USER_SEPARATOR = ","


def limited_to(channel: str) -> list[str] | None:
    """The users a channel with a `#` boundary is limited to (after the last `#`),
    None for a channel without one."""
    if USER_BOUNDARY not in channel:
        return None
    return channel.rsplit(USER_BOUNDARY, 1)[1].split(USER_SEPARATOR)


class ChannelAuthorizer:
    """The one entry point sessions call to authorize a subscription.

    Personal channels are decided here and never delegated: `<prefix>:<user>` and,
    with Centrifugo's `user_subscribe_to_personal`, `#<user>` or `<namespace>:#<user>`.
    So are user-limited channels (`dialog#42,43`) in namespaces that allow them
    (`allow_user_limited_channels`): only the listed users, whatever the policy.
    """

    __slots__ = ("_limited_namespaces", "_personal_namespace", "_policy", "_user_prefix")

    def __init__(
        self,
        policy: ChannelPolicy,
        *,
        user_channel_prefix: str = "user",
        personal_namespace: str | None = None,
        user_limited_namespaces: frozenset[str] = frozenset(),
    ) -> None:
        self._policy = policy
        # An empty prefix turns the personal-channel rule off.
        self._user_prefix = f"{user_channel_prefix}:" if user_channel_prefix else ""
        # Centrifugo's personal channel: None when off, "" for `#<user>`.
        self._personal_namespace = personal_namespace
        self._limited_namespaces = user_limited_namespaces

    @classmethod
    def from_settings(cls, settings: Settings) -> ChannelAuthorizer:
        return cls(
            policy_from_settings(settings),
            user_channel_prefix=settings.user_channel_prefix,
            personal_namespace=settings.user_personal_channel_namespace
            if settings.user_subscribe_to_personal
            else None,
            user_limited_namespaces=frozenset(
                name
                for name, options in settings.namespaces.items()
                if options.allow_user_limited_channels
            ),
        )

    @property
    def policy(self) -> ChannelPolicy:
        return self._policy

    def reads_everything_shared(self, credentials: Credentials) -> bool:
        """True when every channel but others' personal ones is readable to these
        credentials without asking (channel_policy "any" and a user id)."""
        return isinstance(self._policy, AllowAuthenticated) and bool(credentials.user)

    def personal_channel(self, user: str) -> str:
        """The user's personal channel, or "" for anonymous users or when the rule is off."""
        return f"{self._user_prefix}{user}" if user and self._user_prefix else ""

    def centrifugo_personal_channel(self, user: str) -> str:
        """`#<user>` or `<namespace>:#<user>` when user_subscribe_to_personal is on, else ""."""
        namespace = self._personal_namespace
        if not user or namespace is None:
            return ""
        return f"{namespace}:{USER_BOUNDARY}{user}" if namespace else f"{USER_BOUNDARY}{user}"

    def personal_channels(self, user: str) -> list[str]:
        """Every personal channel the user is subscribed to server-side."""
        return [
            c for c in (self.personal_channel(user), self.centrifugo_personal_channel(user)) if c
        ]

    def _centrifugo_personal(self, channel: str) -> bool:
        namespace = self._personal_namespace
        if namespace is None:
            return False
        head = f"{namespace}:{USER_BOUNDARY}" if namespace else USER_BOUNDARY
        rest = channel[len(head) :]
        return channel.startswith(head) and USER_SEPARATOR not in rest and USER_BOUNDARY not in rest

    def personal(self, channel: str) -> bool:
        """A personal channel of some user, in either shape."""
        return bool(self._user_prefix and channel.startswith(self._user_prefix)) or (
            self._centrifugo_personal(channel)
        )

    def personal_owner(self, channel: str) -> str:
        """The user whose personal channel this is, "" for any other channel."""
        if self._user_prefix and channel.startswith(self._user_prefix):
            return channel[len(self._user_prefix) :]
        if self._centrifugo_personal(channel):
            return channel.rsplit(USER_BOUNDARY, 1)[1]
        return ""

    def limited(self, channel: str) -> bool:
        """A channel only some users may read whatever the policy: personal or user-limited."""
        return self.personal(channel) or self.user_limited(channel)

    def foreign_personal_channel(self, channel: str, user: str) -> bool:
        """A personal channel that is not `user`'s: what no policy and no token may
        grant (every personal channel is foreign to an anonymous user)."""
        return self.personal(channel) and channel not in self.personal_channels(user)

    def user_limited(self, channel: str) -> bool:
        """A channel with a `#` boundary in a namespace that allows user-limited channels."""
        if USER_BOUNDARY not in channel:
            return False
        name, sep, _ = channel.partition(":")
        return (name if sep else "") in self._limited_namespaces

    def never_granted(self, channel: str, user: str) -> bool:
        """What no policy and no token may grant: another user's personal channel, or
        the channel the node fans personal events out on to legacy clients."""
        return channel == PERSONAL_FANOUT_CHANNEL or self.foreign_personal_channel(channel, user)

    def decide_now(self, credentials: Credentials, channel: str) -> Decision | None:
        """The decision, when it needs no I/O (personal channels, an instant policy);
        None when only authorize_subscribe can tell."""
        if channel == PERSONAL_FANOUT_CHANNEL:
            return Decision.deny("internal channel")
        if self.personal(channel):
            # Never delegated: no policy may hand one user another's personal channel.
            if self.foreign_personal_channel(channel, credentials.user):
                return Decision.deny("personal channel of another user")
            return Decision.allow("own personal channel")
        if self.user_limited(channel):
            # Centrifugo's rule, never delegated either: listed users only.
            users = limited_to(channel) or []
            if credentials.user and credentials.user in users:
                return Decision.allow("listed in the user-limited channel")
            return Decision.deny("user-limited channel of other users")
        policy = self._policy
        if isinstance(policy, AllowAuthenticated | ClaimsPolicy):
            return policy.decide(credentials, channel)
        return None

    async def authorize_subscribe(
        self, credentials: Credentials, channel: str, client_id: str
    ) -> Decision:
        decision = self.decide_now(credentials, channel)
        if decision is not None:
            return decision
        try:
            return await self._policy.can_subscribe(credentials, channel, client_id)
        except Exception:
            # A broken policy costs one subscribe a retry, not the session.
            logger.exception("channel policy raised for channel %s", channel)
            return Decision.failure("policy error")

    async def aclose(self) -> None:
        close = getattr(self._policy, "aclose", None)
        if close is not None:
            await close()


def policy_from_settings(settings: Settings) -> ChannelPolicy:
    if settings.channel_policy == "claims":
        return ClaimsPolicy()
    if settings.channel_policy == "http":
        return HttpCallbackPolicy(
            settings.channel_policy_url,
            settings.channel_policy_timeout_seconds,
            settings.channel_policy_cache_seconds,
        )
    return AllowAuthenticated()
