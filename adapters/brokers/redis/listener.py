"""One pub/sub connection to one shard, kept alive by its own task.

The task connects, subscribes every channel this node wants, then reads forever,
handing each message to a plain callback on the event loop. Any error (Redis killed,
restarted, unanswered PING) drops the connection; the task reconnects with jittered
exponential backoff and subscribes again. Publications made in between are not
replayed: subscribers see the gap by offset and recover from history.

Sharded mode (Redis Cluster): SSUBSCRIBE, one name per command (a command's names
must share a slot), `on_lost` when the connection fails and `on_moved` when the
server drops a subscription because its slot moved, so the cluster router can
look the owner up again (see cluster.py).
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import random
from collections import deque
from collections.abc import Awaitable, Callable

from redis.asyncio.connection import AbstractConnection, ConnectionPool
from redis.exceptions import ConnectionError as RedisConnectionError
from redis.exceptions import RedisError

from shim.core.broker import BrokerUnavailable

log = logging.getLogger("adapters.brokers.redis")

# First reconnect delay in seconds; doubles per failure up to the listener's maximum.
_FIRST_DELAY_SECONDS = 0.05


class ShardListener:
    def __init__(
        self,
        pool: ConnectionPool,
        on_message: Callable[[bytes, bytes], None],
        *,
        name: str,
        confirm_timeout_seconds: float,
        ping_interval_seconds: float,
        max_delay_seconds: float,
        sharded: bool = False,
        on_lost: Callable[[], None] | None = None,
        on_moved: Callable[[bytes], None] | None = None,
    ) -> None:
        # Only its settings are used: each (re)connect makes one fresh connection.
        self._pool = pool
        self._on_message = on_message
        self._name = name
        self._confirm_timeout = confirm_timeout_seconds
        self._ping_interval = ping_interval_seconds
        self._max_delay = max_delay_seconds
        self._sharded = sharded
        self._subscribe = "SSUBSCRIBE" if sharded else "SUBSCRIBE"
        self._unsubscribe = "SUNSUBSCRIBE" if sharded else "UNSUBSCRIBE"
        self._message_kind = b"smessage" if sharded else b"message"
        self._confirm_kind = b"ssubscribe" if sharded else b"subscribe"
        self._on_lost = on_lost
        self._on_moved = on_moved
        # Pub/sub names this node wants; (re)subscribed on every connect.
        self._wanted: set[bytes] = set()
        # Waiters for SUBSCRIBE confirmations, in the order the commands were sent.
        self._pending: dict[bytes, deque[asyncio.Future[None]]] = {}
        self._conn: AbstractConnection | None = None
        self._task: asyncio.Task[None] | None = None
        # True from the first PONG after (re)subscribing until the connection fails.
        self.healthy = False

    def start(self) -> None:
        self._task = asyncio.get_running_loop().create_task(self._run(), name=self._name)

    async def close(self) -> None:
        task, self._task = self._task, None
        if task is not None:
            task.cancel()
            with contextlib.suppress(asyncio.CancelledError):
                await task
        for waiters in self._pending.values():
            for waiter in waiters:
                waiter.cancel()
        self._pending.clear()

    async def subscribe(self, name: bytes) -> None:
        """Return once Redis confirmed the subscription; BrokerUnavailable when it
        does not within the confirm timeout (the channel is then not wanted)."""
        self._wanted.add(name)
        waiter = asyncio.get_running_loop().create_future()
        waiters = self._pending.setdefault(name, deque())
        waiters.append(waiter)
        try:
            # Not connected: the task subscribes everything wanted once it is.
            await self._send(self._subscribe, name)
            async with asyncio.timeout(self._confirm_timeout):
                await waiter
        except TimeoutError:
            self._wanted.discard(name)
            raise BrokerUnavailable(f"redis: SUBSCRIBE unconfirmed on {self._name}") from None
        finally:
            with contextlib.suppress(ValueError):
                waiters.remove(waiter)
            if not waiters and self._pending.get(name) is waiters:
                del self._pending[name]

    async def unsubscribe(self, name: bytes) -> None:
        self._wanted.discard(name)
        await self._send(self._unsubscribe, name)

    async def want(self, name: bytes) -> None:
        """Subscribe without waiting for the confirmation (a channel moved here)."""
        self._wanted.add(name)
        await self._send(self._subscribe, name)

    @property
    def wanted(self) -> frozenset[bytes]:
        return frozenset(self._wanted)

    async def _send(self, *args: bytes | str) -> None:
        conn = self._conn
        # A disconnected connection would reconnect itself behind the task's back.
        if conn is None or not conn.is_connected:
            return
        try:
            await conn.send_command(*args, check_health=False)
        except (RedisError, OSError):
            # The reading task sees the broken connection and starts over.
            log.debug("pub/sub send failed", extra={"shard": self._name})

    async def _run(self) -> None:
        delay = _FIRST_DELAY_SECONDS
        make_connection: Callable[[], AbstractConnection] = self._pool.make_connection
        while True:
            conn = make_connection()
            connect: Callable[[], Awaitable[None]] = conn.connect
            try:
                await connect()
                self._conn = conn
                # Taken after _conn is set: a later subscribe() sends its own SUBSCRIBE.
                if self._wanted and self._sharded:
                    for name in list(self._wanted):
                        await conn.send_command(self._subscribe, name, check_health=False)
                elif self._wanted:
                    await conn.send_command(self._subscribe, *self._wanted, check_health=False)
                # Its PONG follows every confirmation: then the node is fully subscribed.
                await conn.send_command("PING", check_health=False)
                await self._read(conn)
            except (RedisError, OSError) as error:
                if self.healthy:
                    log.warning("pub/sub connection lost: %s", error, extra={"shard": self._name})
                delay = _FIRST_DELAY_SECONDS if self.healthy else min(delay * 2, self._max_delay)
                if self._on_lost is not None:
                    self._on_lost()
            finally:
                self.healthy = False
                self._conn = None
                await conn.disconnect(nowait=True)
            await asyncio.sleep(delay * random.uniform(0.5, 1.0))

    async def _read(self, conn: AbstractConnection) -> None:
        ping_outstanding = True
        while True:
            response = await conn.read_response(timeout=self._ping_interval)
            if response is None:
                if ping_outstanding:
                    raise RedisConnectionError("PING unanswered")
                await conn.send_command("PING", check_health=False)
                ping_outstanding = True
                continue
            ping_outstanding = False
            if isinstance(response, list) and len(response) == 3:
                kind, name, payload = response
                if kind == self._message_kind:
                    self._dispatch(name, payload)
                elif kind == self._confirm_kind:
                    self._confirm(name)
                elif kind == b"sunsubscribe" and name in self._wanted:
                    # Not asked for: the slot moved to another master.
                    self._wanted.discard(name)
                    if self._on_moved is not None:
                        self._on_moved(name)
            elif response == b"PONG" or (isinstance(response, list) and response[0] == b"pong"):
                self.healthy = True

    def _dispatch(self, name: bytes, payload: bytes) -> None:
        try:
            self._on_message(name, payload)
        except Exception:  # a bad message or handler must not stop the shard
            log.exception("pub/sub message dropped", extra={"shard": self._name})

    def _confirm(self, name: bytes) -> None:
        waiters = self._pending.get(name)
        while waiters:
            waiter = waiters.popleft()
            if not waiter.done():
                waiter.set_result(None)
                return
