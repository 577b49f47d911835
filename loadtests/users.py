"""locust users for the slow-client isolation scenario, and the board they share.

Subscribers (one WebSocket each, on `loadtests.wsclient`):

- fast: read everything at once, check each key's sequence numbers and report each
  delivery's publish-to-receive delay as a locust request named "deliver legacy" /
  "deliver channel" (a sequence error is reported as that request's failure);
- slow: read at a trickle (`Plan.slow_bytes_per_second`), reported as
  "deliver legacy (slow)" / "deliver channel (slow)";
- stalled: subscribe, see one primer, then never read again, on a socket with a
  tiny receive buffer so the kernel buffers fill and the server must cut them off.

`Publisher` (FastHttpUser) POSTs legacy hub messages to /api/v1/broadcast at
`Plan.rate` messages per second in total, one key (hence one channel, task:<key>)
per publisher. Who does what when is on `BOARD`, which the runner (scenario.py or
locustfile.py) drives through its stages. Every loop ends at `Plan.max_seconds`.
"""

from __future__ import annotations

import enum
import time
from dataclasses import dataclass, field
from typing import Any, ClassVar

import gevent  # type: ignore[import-untyped]
import orjson
from gevent.event import Event  # type: ignore[import-untyped]
from locust import FastHttpUser, User, constant, constant_throughput, task
from locust.exception import StopUser

from adapters.auth.jwt import mint_token
from loadtests.tracking import Delivery, Order, SequenceTracker, parse_channel, parse_legacy
from loadtests.wsclient import GeventWebSocket, WebSocketClosed

LEGACY_PATH = "/api/v1/ws"
CHANNEL_PATH = "/connection/websocket"
SUBSCRIBE_ALL = '{"action":"subscribe_all"}'
# Seconds one read waits before the loop looks at the board again.
POLL_SECONDS = 0.25


class Stage(enum.Enum):
    CONNECTING = "connecting"  # subscribers connect; publishers wait
    PRIMING = "priming"  # publishers send unmeasured primers (seq -1) until all are ready
    PUBLISHING = "publishing"  # measured publications
    DRAINING = "draining"  # publishers idle; subscribers catch up
    DONE = "done"  # everyone leaves


@dataclass(slots=True, frozen=True)
class Plan:
    # Prefix of every key of this phase (so phases never see each other's messages).
    run_id: str
    # "ws://127.0.0.1:<port>" of each node; subscriber i uses node i mod len.
    ws_bases: tuple[str, ...]
    # "http://127.0.0.1:<port>" of the node publishers POST to.
    publish_url: str
    api_key: str
    signing_key: str
    token_algorithm: str = "EdDSA"
    publishers: int = 2
    # Messages per second over all publishers.
    rate: float = 50.0
    # Filler bytes per payload (bigger messages fill a stalled client's buffers sooner).
    payload_bytes: int = 512
    # SO_RCVBUF of stalled clients (the kernel doubles it and has a floor).
    stalled_rcvbuf: int = 4096
    # TCP_MAXSEG of stalled clients: an Ethernet-sized segment, as over a real network.
    # Loopback's 64 KiB segments let the server's kernel buffer ~4 MB for a peer that
    # reads nothing, which delays the cut-off by minutes at realistic rates.
    stalled_mss: int | None = 1460
    slow_bytes_per_second: int = 8192
    connect_timeout: float = 20.0
    # No user loop outlives this.
    max_seconds: float = 600.0

    def key(self, publisher: int) -> str:
        return f"{self.run_id}-p{publisher}"

    @property
    def keys(self) -> tuple[str, ...]:
        return tuple(self.key(i) for i in range(self.publishers))

    def token(self, user: str) -> str:
        return mint_token(self.signing_key, self.token_algorithm, user=user, ttl_seconds=3600)


class SequenceError(Exception):
    """A delivery out of sequence (gap, duplicate or reordering)."""


@dataclass(slots=True)
class Record:
    """What one subscriber saw, for the verdict."""

    protocol: str  # "legacy" or "channel"
    role: str  # "fast", "slow" or "stalled"
    index: int
    node: int
    connected: bool = False
    ready: bool = False
    error: str = ""
    tracker: SequenceTracker = field(default_factory=SequenceTracker)
    # Close code the client saw (None: still open when it left).
    close_code: int | None = None
    closed_during: Stage | None = None
    left: bool = False


@dataclass(slots=True)
class Board:
    """The shared state of one phase (all greenlets of one process: no locking)."""

    plan: Plan | None = None
    stage: Stage = Stage.CONNECTING
    changed: Event = field(default_factory=Event)
    records: list[Record] = field(default_factory=list)
    # Next sequence number per key = measured publications sent so far.
    sent: dict[str, int] = field(default_factory=dict)
    # Sequence numbers the ingest refused (nobody is owed them).
    refused: dict[str, set[int]] = field(default_factory=dict)
    publishers_started: int = 0

    def reset(self, plan: Plan) -> None:
        self.plan = plan
        self.stage = Stage.CONNECTING
        self.records = []
        self.sent = {key: 0 for key in plan.keys}
        self.refused = {key: set() for key in plan.keys}
        self.publishers_started = 0
        self.changed.set()
        self.changed = Event()

    def enter(self, stage: Stage) -> None:
        self.stage = stage
        # Wake whoever waits for a change, then arm a fresh event for the next one.
        self.changed.set()
        self.changed = Event()

    def require_plan(self) -> Plan:
        if self.plan is None:
            raise RuntimeError("no plan: the runner must call BOARD.reset(plan) first")
        return self.plan

    def register(self, protocol: str, role: str) -> Record:
        plan = self.require_plan()
        index = len(self.records)
        record = Record(protocol, role, index, index % len(plan.ws_bases))
        self.records.append(record)
        return record

    def published(self) -> dict[str, tuple[int, frozenset[int]]]:
        return {key: (count, frozenset(self.refused[key])) for key, count in self.sent.items()}


BOARD = Board()


# --- subscribers ------------------------------------------------------------------


class Subscriber(User):
    """One WebSocket subscriber; subclasses say which protocol and role."""

    abstract = True
    protocol: ClassVar[str] = ""
    role: ClassVar[str] = ""
    wait_time = constant(0)

    record: Record
    ws: GeventWebSocket | None = None

    # -- protocol specifics --

    def open_socket(self, plan: Plan, base: str, token: str) -> GeventWebSocket:
        raise NotImplementedError

    def handle(self, frame: str, now_ns: int) -> None:
        raise NotImplementedError

    # -- lifecycle --

    def on_start(self) -> None:
        plan = BOARD.require_plan()
        self.plan = plan
        self.started = time.monotonic()
        self.record = BOARD.register(self.protocol, self.role)
        base = plan.ws_bases[self.record.node]
        user = f"load-{plan.run_id}-{self.protocol}-{self.role}-{self.record.index}"
        try:
            self.ws = self.open_socket(plan, base, plan.token(user))
            self.record.connected = True
        except Exception as exc:  # every failure to connect is reported
            self.record.error = f"{type(exc).__name__}: {exc}"
            raise StopUser() from exc

    def on_stop(self) -> None:
        if self.ws is not None:
            self.ws.close()
        self.record.left = True

    def tcp(self, plan: Plan) -> dict[str, int | None]:
        if self.role != "stalled":
            return {}
        return {"rcvbuf": plan.stalled_rcvbuf, "mss": plan.stalled_mss}

    def out_of_time(self) -> bool:
        return time.monotonic() - self.started > self.plan.max_seconds

    @task
    def read(self) -> None:
        try:
            self.consume()
        except WebSocketClosed as closed:
            self.record.close_code = closed.code
            self.record.closed_during = BOARD.stage
        except OSError:
            self.record.close_code = 1006  # the socket broke without a close frame
            self.record.closed_during = BOARD.stage
        raise StopUser()

    def consume(self) -> None:
        """Read (at the role's pace) until the phase is over."""
        assert self.ws is not None
        budget = self.plan.slow_bytes_per_second if self.role == "slow" else None
        while BOARD.stage is not Stage.DONE and not self.out_of_time():
            began = time.monotonic()
            chunk = max(1, int(budget * POLL_SECONDS)) if budget else None
            frames = self.ws.recv(POLL_SECONDS, max_bytes=chunk)
            now_ns = time.time_ns()
            for frame in frames:
                self.handle(frame, now_ns)
            if budget:
                gevent.sleep(max(0.0, POLL_SECONDS - (time.monotonic() - began)))

    def delivered(self, delivery: Delivery, now_ns: int, size: int) -> None:
        if delivery.seq < 0:
            self.record.ready = True  # a primer: subscribed and flowing
            return
        order = self.record.tracker.observe(delivery.key, delivery.seq)
        suffix = "" if self.role == "fast" else f" ({self.role})"
        self.environment.events.request.fire(
            request_type="WS",
            name=f"deliver {self.protocol}{suffix}",
            response_time=(now_ns - delivery.sent_ns) / 1e6,
            response_length=size,
            exception=None if order is Order.IN_ORDER else SequenceError(order.value),
            context={},
        )


class LegacySubscriber(Subscriber):
    """The legacy browser hook: /api/v1/ws?token=<jwt>, then subscribe_all."""

    abstract = True
    protocol = "legacy"

    def open_socket(self, plan: Plan, base: str, token: str) -> GeventWebSocket:
        ws = GeventWebSocket.connect(
            f"{base}{LEGACY_PATH}?token={token}", timeout=plan.connect_timeout, **self.tcp(plan)
        )
        ws.send_text(SUBSCRIBE_ALL)
        return ws

    def handle(self, frame: str, now_ns: int) -> None:
        delivery = parse_legacy(frame, self.plan.run_id)
        if delivery is not None:
            self.delivered(delivery, now_ns, len(frame))


class ChannelSubscriber(Subscriber):
    """A Centrifuge client: connect, then subscribe to every publisher's channel."""

    abstract = True
    protocol = "channel"

    def open_socket(self, plan: Plan, base: str, token: str) -> GeventWebSocket:
        ws = GeventWebSocket.connect(
            f"{base}{CHANNEL_PATH}", timeout=plan.connect_timeout, **self.tcp(plan)
        )
        self.ws = ws
        commands: dict[int, dict[str, Any]] = {1: {"connect": {"token": token, "name": "load"}}}
        for offset, key in enumerate(plan.keys):
            commands[2 + offset] = {"subscribe": {"channel": f"task:{key}"}}
        ws.send_text("\n".join(orjson.dumps({"id": i, **c}).decode() for i, c in commands.items()))
        waiting = set(commands)
        deadline = time.monotonic() + plan.connect_timeout
        while waiting:
            if time.monotonic() > deadline:
                raise TimeoutError(f"no reply to commands {sorted(waiting)}")
            for frame in ws.recv(POLL_SECONDS):
                parsed = parse_channel(frame, plan.run_id)
                for command_id, reply in parsed.replies.items():
                    if "error" in reply:
                        raise RuntimeError(f"command {command_id} refused: {reply['error']}")
                    waiting.discard(command_id)
                self._answer_pings(parsed.pings)
        return ws

    def _answer_pings(self, pings: int) -> None:
        assert self.ws is not None
        for _ in range(pings):
            self.ws.send_text("{}")

    def handle(self, frame: str, now_ns: int) -> None:
        parsed = parse_channel(frame, self.plan.run_id)
        self._answer_pings(parsed.pings)
        # Messages of one frame arrived together; each line's share of the size.
        size = len(frame) // max(1, len(parsed.deliveries))
        for delivery in parsed.deliveries:
            self.delivered(delivery, now_ns, size)
        if parsed.disconnects:
            raise WebSocketClosed(parsed.disconnects[0], "disconnect push")


class StalledMixin(Subscriber):
    """Reads until it has seen one primer (so it surely is subscribed), then stops
    reading until the phase is over; finally reads what is left, briefly, to learn
    whether the server closed it."""

    abstract = True
    role = "stalled"

    def consume(self) -> None:
        assert self.ws is not None
        while not self.record.ready and BOARD.stage is not Stage.DONE and not self.out_of_time():
            now_ns = time.time_ns()
            for frame in self.ws.recv(POLL_SECONDS):
                self.handle(frame, now_ns)
        while BOARD.stage is not Stage.DONE and not self.out_of_time():
            BOARD.changed.wait(timeout=1.0)
        # Whatever the kernel held, then the close frame if the server got it out.
        code = self.ws.read_to_close(5.0)
        if code is not None:
            raise WebSocketClosed(code)

    def delivered(self, delivery: Delivery, now_ns: int, size: int) -> None:
        if delivery.seq < 0:
            self.record.ready = True


class LegacyFast(LegacySubscriber):
    abstract = True
    role = "fast"


class ChannelFast(ChannelSubscriber):
    abstract = True
    role = "fast"


class LegacySlow(LegacySubscriber):
    abstract = True
    role = "slow"


class ChannelSlow(ChannelSubscriber):
    abstract = True
    role = "slow"


class LegacyStalled(StalledMixin, LegacySubscriber):
    abstract = True
    role = "stalled"


class ChannelStalled(StalledMixin, ChannelSubscriber):
    abstract = True
    role = "stalled"


# --- publisher --------------------------------------------------------------------


class Publisher(FastHttpUser):
    """The backend: POST /api/v1/broadcast, one task.updated message per request."""

    abstract = True
    # One request per 1/(rate/publishers) seconds (set per phase by `concrete_users`).
    wait_time = constant_throughput(1.0)

    def on_start(self) -> None:
        self.plan = BOARD.require_plan()
        self.key = self.plan.key(BOARD.publishers_started % self.plan.publishers)
        BOARD.publishers_started += 1
        self.filler = "x" * self.plan.payload_bytes
        self.started = time.monotonic()
        self.headers = {"X-API-Key": self.plan.api_key, "Content-Type": "application/json"}

    @task
    def publish(self) -> None:
        stage = BOARD.stage
        if stage is Stage.DONE or time.monotonic() - self.started > self.plan.max_seconds:
            raise StopUser()
        if stage is Stage.PRIMING:
            self._post(-1, "broadcast (primer)", filler="")
        elif stage is Stage.PUBLISHING:
            seq = BOARD.sent[self.key]
            BOARD.sent[self.key] = seq + 1
            if not self._post(seq, "broadcast"):
                BOARD.refused[self.key].add(seq)

    def _post(self, seq: int, name: str, filler: str | None = None) -> bool:
        pad = self.filler if filler is None else filler
        payload = {"task_id": self.key, "seq": seq, "pad": pad, "sent_ns": time.time_ns()}
        body = orjson.dumps({"type": "task.updated", "payload": payload}).decode()
        with self.client.post(
            "/api/v1/broadcast", data=body, headers=self.headers, name=name, catch_response=True
        ) as response:
            ok = response.status_code == 200 and _accepted(response.content) == 1
            if not ok:
                response.failure(f"{response.status_code} {response.text!r:.200}")
            return ok


def _accepted(body: bytes | None) -> object:
    try:
        answer = orjson.loads(body or b"")
    except orjson.JSONDecodeError:
        return None
    return answer.get("accepted") if isinstance(answer, dict) else None


# --- concrete classes for one phase ---------------------------------------------------


@dataclass(slots=True, frozen=True)
class Counts:
    """Users per protocol and role (fast and slow and stalled are per protocol)."""

    legacy_fast: int = 0
    channel_fast: int = 0
    legacy_slow: int = 0
    channel_slow: int = 0
    legacy_stalled: int = 0
    channel_stalled: int = 0
    publishers: int = 1

    @property
    def subscribers(self) -> int:
        return (
            self.legacy_fast
            + self.channel_fast
            + self.legacy_slow
            + self.channel_slow
            + self.legacy_stalled
            + self.channel_stalled
        )

    @property
    def total(self) -> int:
        return self.subscribers + self.publishers


def concrete_users(counts: Counts, plan: Plan) -> list[type[User]]:
    """Concrete user classes with `fixed_count`s; locust spawns exactly these."""
    bases: list[tuple[str, type[User], int]] = [
        ("LegacyFastUser", LegacyFast, counts.legacy_fast),
        ("ChannelFastUser", ChannelFast, counts.channel_fast),
        ("LegacySlowUser", LegacySlow, counts.legacy_slow),
        ("ChannelSlowUser", ChannelSlow, counts.channel_slow),
        ("LegacyStalledUser", LegacyStalled, counts.legacy_stalled),
        ("ChannelStalledUser", ChannelStalled, counts.channel_stalled),
    ]
    classes: list[type[User]] = [
        type(name, (base,), {"fixed_count": count, "abstract": False, "weight": 1})
        for name, base, count in bases
        if count > 0
    ]
    per_publisher = plan.rate / max(1, counts.publishers)
    classes.append(
        type(
            "PublisherUser",
            (Publisher,),
            {
                "fixed_count": counts.publishers,
                "abstract": False,
                "host": plan.publish_url,
                "wait_time": constant_throughput(per_publisher),
            },
        )
    )
    return classes
