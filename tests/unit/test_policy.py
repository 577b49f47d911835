"""Channel authorization: the personal-channel rule, the claims policy, and the HTTP
callback policy against a real HTTP server on 127.0.0.1.
"""

from __future__ import annotations

import asyncio
import socket
from collections.abc import AsyncIterator, Callable
from typing import Any

import httpx
import orjson
import pytest

from shim.core.auth import Credentials
from shim.core.config import Settings
from shim.core.policy import (
    AllowAuthenticated,
    ChannelAuthorizer,
    ClaimsPolicy,
    Decision,
    HttpCallbackPolicy,
    policy_from_settings,
)
from shim.core.routing import PERSONAL_FANOUT_CHANNEL

ADA = Credentials(user="ada")
ANONYMOUS = Credentials(user="")


class RecordingPolicy:
    """Answers `answer` and remembers every channel it was asked about."""

    def __init__(self, answer: Decision) -> None:
        self.answer = answer
        self.asked: list[str] = []

    async def can_subscribe(
        self, credentials: Credentials, channel: str, client_id: str
    ) -> Decision:
        self.asked.append(channel)
        return self.answer


class BrokenPolicy:
    async def can_subscribe(
        self, credentials: Credentials, channel: str, client_id: str
    ) -> Decision:
        raise RuntimeError("bug")


# --- ChannelAuthorizer ------------------------------------------------------------


async def test_own_personal_channel_is_allowed_without_asking_the_policy() -> None:
    policy = RecordingPolicy(Decision.deny("nothing"))
    decision = await ChannelAuthorizer(policy).authorize_subscribe(ADA, "user:ada", "c1")
    assert decision.allowed and not decision.temporary
    assert policy.asked == []


@pytest.mark.parametrize(
    ("credentials", "channel"),
    [
        (ADA, "user:bob"),
        (ADA, "user:ada2"),
        (ADA, "user:"),
        (ANONYMOUS, "user:"),
        (ANONYMOUS, "user:ada"),
    ],
)
async def test_other_personal_channels_are_denied_even_by_a_permissive_policy(
    credentials: Credentials, channel: str
) -> None:
    policy = RecordingPolicy(Decision.allow("everything"))
    decision = await ChannelAuthorizer(policy).authorize_subscribe(credentials, channel, "c1")
    assert (decision.allowed, decision.temporary) == (False, False)
    assert policy.asked == []


async def test_token_grants_cannot_open_another_users_channel() -> None:
    greedy = Credentials(user="ada", channels=("user:bob", "user:*"))
    decision = await ChannelAuthorizer(ClaimsPolicy()).authorize_subscribe(greedy, "user:bob", "c")
    assert not decision.allowed


async def test_other_channels_go_to_the_policy() -> None:
    policy = RecordingPolicy(Decision.deny("no"))
    authorizer = ChannelAuthorizer(policy)
    assert not (await authorizer.authorize_subscribe(ADA, "task:1", "c1")).allowed
    assert not (await authorizer.authorize_subscribe(ADA, "users:ada", "c1")).allowed
    assert policy.asked == ["task:1", "users:ada"]


async def test_custom_prefix_and_disabled_rule() -> None:
    policy = RecordingPolicy(Decision.deny("no"))
    personal = ChannelAuthorizer(policy, user_channel_prefix="me")
    assert (await personal.authorize_subscribe(ADA, "me:ada", "c")).allowed
    assert not (await personal.authorize_subscribe(ADA, "user:ada", "c")).allowed
    assert policy.asked == ["user:ada"]
    assert personal.personal_channel("ada") == "me:ada"
    assert personal.personal_channel("") == ""
    off = ChannelAuthorizer(policy, user_channel_prefix="")
    assert not (await off.authorize_subscribe(ADA, "me:ada", "c")).allowed
    assert policy.asked[-1] == "me:ada"


async def test_the_personal_fan_out_channel_is_never_granted() -> None:
    policy = RecordingPolicy(Decision.allow("yes"))
    authorizer = ChannelAuthorizer(policy)
    decision = await authorizer.authorize_subscribe(ADA, PERSONAL_FANOUT_CHANNEL, "c")
    assert not decision.allowed and not decision.temporary
    assert authorizer.never_granted(PERSONAL_FANOUT_CHANNEL, "ada")
    assert authorizer.never_granted("user:bob", "ada")
    assert not authorizer.never_granted("user:ada", "ada")
    assert policy.asked == []


def test_decisions_without_io_are_had_on_the_spot() -> None:
    claims = ChannelAuthorizer(ClaimsPolicy())
    granted = Credentials(user="ada", channels=("task:*",))
    assert claims.decide_now(granted, "task:1") == Decision.allow("token channels")
    assert claims.decide_now(granted, "quest:1") == Decision.deny("not granted by token")
    assert claims.decide_now(granted, "user:ada") == Decision.allow("own personal channel")
    recording = ChannelAuthorizer(RecordingPolicy(Decision.allow("yes")))
    assert recording.decide_now(ADA, "task:1") is None  # only the callback can tell
    assert recording.decide_now(ADA, "user:bob") == Decision.deny(
        "personal channel of another user"
    )


def test_only_the_any_policy_lets_a_user_read_every_shared_channel() -> None:
    assert ChannelAuthorizer(AllowAuthenticated()).reads_everything_shared(ADA)
    assert not ChannelAuthorizer(AllowAuthenticated()).reads_everything_shared(ANONYMOUS)
    assert not ChannelAuthorizer(ClaimsPolicy()).reads_everything_shared(ADA)


async def test_a_raising_policy_gives_a_temporary_internal_error() -> None:
    decision = await ChannelAuthorizer(BrokenPolicy()).authorize_subscribe(ADA, "task:1", "c")
    assert (decision.allowed, decision.temporary) == (False, True)


# --- AllowAuthenticated and ClaimsPolicy -------------------------------------------


async def test_allow_authenticated() -> None:
    policy = AllowAuthenticated()
    assert (await policy.can_subscribe(ADA, "task:1", "c")).allowed
    refused = await policy.can_subscribe(ANONYMOUS, "task:1", "c")
    assert (refused.allowed, refused.temporary) == (False, False)


@pytest.mark.parametrize(
    ("channel", "allowed"),
    [
        ("global", True),
        ("task:7", True),
        ("task:8", False),
        ("quest:9", True),
        ("quest:", False),
        ("quests:9", False),
        ("project:p1", True),
        ("project:42", True),
        ("project:p2", False),
        ("project:", False),
        ("system", False),
        ("anything", False),
    ],
)
async def test_claims_policy(channel: str, allowed: bool) -> None:
    credentials = Credentials(
        user="ada",
        channels=("global", "task:7", "quest:*", "*"),
        project_ids=("p1", "42"),
    )
    decision = await ClaimsPolicy().can_subscribe(credentials, channel, "c")
    assert decision.allowed is allowed
    assert (decision.allowed, decision.temporary) == (allowed, False)


async def test_claims_policy_with_empty_token_denies() -> None:
    assert not (await ClaimsPolicy().can_subscribe(ADA, "project:p1", "c")).allowed


def test_policy_from_settings() -> None:
    assert isinstance(policy_from_settings(Settings()), AllowAuthenticated)
    assert isinstance(policy_from_settings(Settings(channel_policy="claims")), ClaimsPolicy)
    http = Settings(channel_policy="http", channel_policy_url="http://127.0.0.1:1/x")
    assert isinstance(policy_from_settings(http), HttpCallbackPolicy)


# --- HttpCallbackPolicy against a real server ---------------------------------------


class CallbackServer:
    """A minimal HTTP/1.1 server: records each JSON body, answers `status` + `body`
    after `delay` seconds, one request per connection.
    """

    def __init__(self) -> None:
        self.requests: list[dict[str, Any]] = []
        self.status = 200
        self.body = b'{"allow": true}'
        self.delay = 0.0
        self.url = ""
        self._server: asyncio.Server | None = None
        self._handlers: set[asyncio.Task[Any]] = set()

    async def start(self) -> None:
        self._server = await asyncio.start_server(self._handle, "127.0.0.1", 0)
        port = self._server.sockets[0].getsockname()[1]
        self.url = f"http://127.0.0.1:{port}/subscribe"

    async def stop(self) -> None:
        assert self._server is not None
        self._server.close()
        for task in list(self._handlers):
            task.cancel()
        await asyncio.gather(*self._handlers, return_exceptions=True)
        await self._server.wait_closed()

    async def _handle(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        task = asyncio.current_task()
        assert task is not None
        self._handlers.add(task)
        try:
            head = await reader.readuntil(b"\r\n\r\n")
            length = 0
            for line in head.split(b"\r\n")[1:]:
                name, _, value = line.partition(b":")
                if name.strip().lower() == b"content-length":
                    length = int(value)
            self.requests.append(orjson.loads(await reader.readexactly(length)))
            if self.delay:
                await asyncio.sleep(self.delay)
            writer.write(
                b"HTTP/1.1 %d X\r\nContent-Type: application/json\r\n"
                b"Content-Length: %d\r\nConnection: close\r\n\r\n%s"
                % (self.status, len(self.body), self.body)
            )
            await writer.drain()
        except (asyncio.IncompleteReadError, ConnectionError):
            pass
        finally:
            writer.close()
            self._handlers.discard(task)


class FakeClock:
    def __init__(self) -> None:
        self.now = 1000.0

    def __call__(self) -> float:
        return self.now


@pytest.fixture
async def server() -> AsyncIterator[CallbackServer]:
    instance = CallbackServer()
    await instance.start()
    yield instance
    await instance.stop()


@pytest.fixture
async def make_policy() -> AsyncIterator[Callable[..., HttpCallbackPolicy]]:
    made: list[HttpCallbackPolicy] = []

    def make(url: str, **options: Any) -> HttpCallbackPolicy:
        options.setdefault("timeout_seconds", 2.0)
        options.setdefault("cache_seconds", 10.0)
        policy = HttpCallbackPolicy(url, **options)
        made.append(policy)
        return policy

    yield make
    for policy in made:
        await policy.aclose()


async def test_callback_allows_and_sends_user_channel_client(
    server: CallbackServer, make_policy: Callable[..., HttpCallbackPolicy]
) -> None:
    policy = make_policy(server.url)
    decision = await policy.can_subscribe(ADA, "task:1", "client-9")
    assert (decision.allowed, decision.temporary) == (True, False)
    assert server.requests == [{"user": "ada", "channel": "task:1", "client": "client-9"}]


@pytest.mark.parametrize(("status", "body"), [(200, b'{"allow": false}'), (403, b"")])
async def test_callback_refusal_is_permission_denied(
    server: CallbackServer,
    make_policy: Callable[..., HttpCallbackPolicy],
    status: int,
    body: bytes,
) -> None:
    server.status, server.body = status, body
    decision = await make_policy(server.url).can_subscribe(ADA, "task:1", "c")
    assert (decision.allowed, decision.temporary) == (False, False)


@pytest.mark.parametrize("answer", [b'{"allow": true}', b'{"allow": false}'])
async def test_answers_are_cached_per_user_and_channel(
    server: CallbackServer, make_policy: Callable[..., HttpCallbackPolicy], answer: bytes
) -> None:
    server.body = answer
    policy = make_policy(server.url)
    first = await policy.can_subscribe(ADA, "task:1", "c1")
    second = await policy.can_subscribe(ADA, "task:1", "c2")
    assert first == second
    assert len(server.requests) == 1
    await policy.can_subscribe(ADA, "task:2", "c1")
    await policy.can_subscribe(Credentials(user="bob"), "task:1", "c1")
    assert len(server.requests) == 3


async def test_cache_expires(
    server: CallbackServer, make_policy: Callable[..., HttpCallbackPolicy]
) -> None:
    clock = FakeClock()
    policy = make_policy(server.url, cache_seconds=10.0, clock=clock)
    assert (await policy.can_subscribe(ADA, "task:1", "c")).allowed
    clock.now += 9.9
    assert (await policy.can_subscribe(ADA, "task:1", "c")).allowed
    assert len(server.requests) == 1
    server.body = b'{"allow": false}'
    clock.now += 0.2
    assert not (await policy.can_subscribe(ADA, "task:1", "c")).allowed
    assert len(server.requests) == 2


async def test_zero_cache_seconds_asks_every_time(
    server: CallbackServer, make_policy: Callable[..., HttpCallbackPolicy]
) -> None:
    policy = make_policy(server.url, cache_seconds=0)
    await policy.can_subscribe(ADA, "task:1", "c")
    await policy.can_subscribe(ADA, "task:1", "c")
    assert len(server.requests) == 2


async def test_timeout_is_a_temporary_error_and_not_cached(
    server: CallbackServer, make_policy: Callable[..., HttpCallbackPolicy]
) -> None:
    server.delay = 5.0
    policy = make_policy(server.url, timeout_seconds=0.2)
    loop = asyncio.get_running_loop()
    started = loop.time()
    decision = await policy.can_subscribe(ADA, "task:1", "c")
    assert loop.time() - started < 2.0
    assert (decision.allowed, decision.temporary) == (False, True)
    server.delay = 0
    assert (await policy.can_subscribe(ADA, "task:1", "c")).allowed
    assert len(server.requests) == 2


@pytest.mark.parametrize(
    ("status", "body"),
    [(500, b"oops"), (503, b""), (404, b""), (200, b"not json"), (200, b'{"allow": "yes"}')],
)
async def test_server_errors_and_bad_answers_are_temporary_and_not_cached(
    server: CallbackServer,
    make_policy: Callable[..., HttpCallbackPolicy],
    status: int,
    body: bytes,
) -> None:
    server.status, server.body = status, body
    policy = make_policy(server.url)
    decision = await policy.can_subscribe(ADA, "task:1", "c")
    assert (decision.allowed, decision.temporary) == (False, True)
    await policy.can_subscribe(ADA, "task:1", "c")
    assert len(server.requests) == 2


async def test_unreachable_callback_is_a_temporary_error(
    make_policy: Callable[..., HttpCallbackPolicy],
) -> None:
    with socket.socket() as probe:
        probe.bind(("127.0.0.1", 0))
        port = probe.getsockname()[1]
    decision = await make_policy(f"http://127.0.0.1:{port}/").can_subscribe(ADA, "task:1", "c")
    assert (decision.allowed, decision.temporary) == (False, True)


async def test_concurrent_identical_asks_share_one_request(
    server: CallbackServer, make_policy: Callable[..., HttpCallbackPolicy]
) -> None:
    server.delay = 0.2
    policy = make_policy(server.url, cache_seconds=0)
    decisions = await asyncio.gather(
        *(policy.can_subscribe(ADA, "task:1", f"c{i}") for i in range(5))
    )
    assert all(decision.allowed for decision in decisions)
    assert len(server.requests) == 1


async def test_a_cancelled_asker_does_not_cancel_the_shared_request(
    server: CallbackServer, make_policy: Callable[..., HttpCallbackPolicy]
) -> None:
    server.delay = 0.2
    policy = make_policy(server.url)
    quitter = asyncio.create_task(policy.can_subscribe(ADA, "task:1", "c1"))
    stayer = asyncio.create_task(policy.can_subscribe(ADA, "task:1", "c2"))
    await asyncio.sleep(0.05)
    quitter.cancel()
    assert (await stayer).allowed
    assert quitter.cancelled()
    assert len(server.requests) == 1


async def test_injected_client_is_used_and_left_open(server: CallbackServer) -> None:
    async with httpx.AsyncClient() as client:
        policy = HttpCallbackPolicy(server.url, 2.0, 10.0, client)
        assert (await policy.can_subscribe(ADA, "task:1", "c")).allowed
        await policy.aclose()
        assert not client.is_closed
