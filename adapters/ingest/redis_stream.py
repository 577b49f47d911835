"""Durable ingest: the backend appends legacy hub messages to one Redis stream (XADD,
field `message`), and every node helps publish them, each channel in append order.

Order with several nodes comes from partitioning (docs/stream-ingest.md):

- The splitter (one node at a time, under a lease) copies each entry of the input
  stream to one of N partition streams, `<key>:p<n>`, chosen by a hash of the entry's
  first channel (`task:<id>` for task events), in one script that also moves the
  input cursor: an entry is copied exactly once, in order.
- Each partition is published by one node at a time, under its own lease, in order,
  a batch at a time: the batch's events are published, then one script checks the
  lease and moves the partition's cursor (and trims what it passed). A node that
  dies leaves the cursor where it was; the next owner starts there.
- Every publication carries a Fence (partition, entry id, item index): a channel
  stores it only if it has nothing at or after that place of that partition. A node
  that was paused (SIGSTOP) and wakes up mid-publish after losing its lease can
  therefore neither repeat nor reorder anything; its commit is refused and it stops.

Leases are SET NX PX keys with a token per acquisition, all of a node's renewed in
one script every third of their time (one that ran out while nobody took it is
taken again); commits check the token and the cursor they started from. Nodes
announce themselves in a sorted set and take an equal share of the partitions; a
node that holds more than its share hands the extra ones over after their current
batch.

Keys, beside the input stream `<key>`: `<key>:partitions` (the partition count, fixed
at first start), `<key>:cursor` (last input entry copied), `<key>:p<n>` and
`<key>:p<n>:cursor` (a partition and its last published entry), `<key>:lease:split`,
`<key>:lease:p<n>`, `<key>:nodes`, and `<key>:refused` (dead letters).
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import math
import random
import secrets
from collections.abc import Awaitable, Callable, Coroutine
from dataclasses import dataclass, field
from typing import Any

import orjson
from redis.asyncio import Redis
from redis.exceptions import RedisError, ResponseError

from adapters.brokers.redis.keys import fnv1a_64
from shim.core.broadcast import Accepted, BroadcastError, parse_broadcast
from shim.core.broker import Fence
from shim.core.events import Event
from shim.core.ingest import Ingestor

log = logging.getLogger("shim.ingest.stream")

MESSAGE_FIELD = b"message"
SOURCE_FIELD = b"src"

# KEYS: lease, cursor, input stream. ARGV: token, expected cursor, legacy group, then
# (entry id, partition) pairs in stream order. Returns {copied, skipped} or {-1} (lease
# lost) / {-2} (cursor moved). An entry marked done by a node of the previous version
# (which published it before acknowledging) is not copied again.
_SPLIT = """
if redis.call('GET', KEYS[1]) ~= ARGV[1] then return {-1} end
if (redis.call('GET', KEYS[2]) or '0-0') ~= ARGV[2] then return {-2} end
local copied, skipped, last, ids = 0, 0, ARGV[2], {}
for i = 4, #ARGV, 2 do
  local id = ARGV[i]
  local found = redis.call('XRANGE', KEYS[3], id, id)
  if #found == 1 then
    if redis.call('EXISTS', KEYS[3] .. ':done:' .. id) == 1 then
      skipped = skipped + 1
    else
      local fields = found[1][2]
      fields[#fields + 1] = 'src'
      fields[#fields + 1] = id
      redis.call('XADD', KEYS[3] .. ':p' .. ARGV[i + 1], '*', unpack(fields))
      copied = copied + 1
    end
  end
  last = id
  ids[#ids + 1] = id
end
redis.call('SET', KEYS[2], last)
-- The consumer group of the previous version: what it still held is copied now.
if #ids > 0 then redis.pcall('XACK', KEYS[3], ARGV[3], unpack(ids)) end
redis.pcall('XGROUP', 'SETID', KEYS[3], ARGV[3], last)
return {copied, skipped}
"""

# KEYS: lease, partition cursor, partition stream, dead letters. ARGV: token, expected
# cursor, new cursor, trim below (MINID), lease ttl ms, then (entry id, error) pairs
# refused. Returns 1 (and extends the lease), or -1 (lease lost) / -2 (cursor moved).
_COMMIT = """
if redis.call('GET', KEYS[1]) ~= ARGV[1] then return -1 end
if (redis.call('GET', KEYS[2]) or '0-0') ~= ARGV[2] then return -2 end
redis.call('PEXPIRE', KEYS[1], ARGV[5])
redis.call('SET', KEYS[2], ARGV[3])
redis.call('XTRIM', KEYS[3], 'MINID', ARGV[4])
for i = 6, #ARGV, 2 do
  redis.call('XADD', KEYS[4], 'MAXLEN', 10000, '*', 'entry', ARGV[i], 'error', ARGV[i + 1])
end
return 1
"""

# KEYS: lease. ARGV: token.
_RELEASE = """
if redis.call('GET', KEYS[1]) == ARGV[1] then return redis.call('DEL', KEYS[1]) end
return 0
"""

# One round trip per manager tick. KEYS: nodes, then the leases held. ARGV: member, ttl
# ms, then each lease's token. Announces the node (expiry on the Redis clock), then
# extends each lease still ours, or takes it again with the same token if it ran out
# and nobody took it (a stale holder is stopped by the cursor check of its next
# commit). Returns {nodes alive, then 1 (held) or 0 (another node has it) per lease}.
_RENEW = """
local t = redis.call('TIME')
local now = tonumber(t[1]) * 1000 + math.floor(tonumber(t[2]) / 1000)
local ttl = tonumber(ARGV[2])
redis.call('ZADD', KEYS[1], string.format('%d', now + ttl), ARGV[1])
redis.call('ZREMRANGEBYSCORE', KEYS[1], '-inf', string.format('%d', now))
redis.call('PEXPIRE', KEYS[1], ttl * 2)
local result = {redis.call('ZCARD', KEYS[1])}
for i = 2, #KEYS do
  local holder = redis.call('GET', KEYS[i])
  if holder == ARGV[i + 1] or not holder then
    redis.call('SET', KEYS[i], ARGV[i + 1], 'PX', ttl)
    result[i] = 1
  else
    result[i] = 0
  end
end
return result
"""


@dataclass(slots=True, frozen=True)
class StreamOptions:
    key: str
    group: str = "dex-shim"
    consumer: str = "node"
    # Partitions at the first start (later starts use the count stored in Redis).
    partitions: int = 8
    # Entries read per call.
    batch: int = 100
    # Milliseconds a read blocks waiting for new entries.
    block_ms: int = 1000
    # Seconds a lease lasts unless renewed: how long a silent node's partitions wait.
    lease_seconds: float = 30.0
    # Seconds a channel remembers a partition's last position (see Fence).
    fence_ttl_seconds: float = 24 * 3600.0
    max_item_bytes: int = 256 * 1024


@dataclass(slots=True)
class StreamStats:
    # Input entries copied to partitions by this node.
    split: int = 0
    # Entries skipped because a node of the previous version had published them.
    skipped_already_published: int = 0
    # Partition entries whose publications this node stored and committed.
    consumed: int = 0
    # Events some channel already had (a fenced repeat after a takeover).
    superseded: int = 0
    refused: int = 0
    # Commits refused because the lease had been lost: the batch is the next owner's.
    fenced: int = 0
    # Partition leases taken and handed over by this node.
    acquired: int = 0
    released: int = 0
    failures: int = 0


def partition_of(channel: str, partitions: int) -> int:
    """The partition of entries whose first channel is `channel`."""
    return fnv1a_64(channel.encode()) % partitions


def id_position(entry_id: str) -> tuple[int, int]:
    """(milliseconds, sequence) of a stream entry id; ValueError if it is none."""
    ms, seq = entry_id.split("-")
    return int(ms), int(seq)


def next_id(entry_id: str) -> str:
    """The smallest stream id after `entry_id` (for XTRIM MINID)."""
    ms, seq = id_position(entry_id)
    return f"{ms}-{seq + 1}"


def _text(value: Any, default: str = "") -> str:
    """A reply of this bytes-mode client as text."""
    if value is None:
        return default
    return value.decode() if isinstance(value, bytes) else str(value)


async def backlog(redis: Redis, key: str) -> int:
    """Entries of stream `key` appended but not yet published and committed: input
    entries not yet copied, plus partition entries past their cursors (a commit trims
    what it passed). Reads every input entry after the cursor: for checks, not for
    a hot path."""
    cursor = _text(await redis.get(f"{key}:cursor"), "0-0")
    left = len(await redis.xrange(key, f"({cursor}", "+") or ())
    partitions = int(_text(await redis.get(f"{key}:partitions"), "0"))
    for partition in range(partitions):
        left += await redis.xlen(f"{key}:p{partition}")
    return left


class _LeaseLost(Exception):
    """A commit was refused: another node owns the partition (or the splitter) now."""


@dataclass(slots=True)
class _Worker:
    """One lease this node holds, and the task doing its work."""

    name: str
    token: str
    task: asyncio.Task[None] | None = None
    # Set unless a batch is between its first publish and its commit.
    idle: asyncio.Event = field(default_factory=asyncio.Event)
    # Finish the batch in progress, then stop (a hand-over or a shutdown).
    stopping: bool = False

    def __post_init__(self) -> None:
        self.idle.set()


class StreamConsumer:
    def __init__(self, redis: Redis, ingestor: Ingestor, options: StreamOptions) -> None:
        self.redis = redis
        self.ingestor = ingestor
        self.options = options
        self.stats = StreamStats()
        # The last heartbeat reached Redis (for readiness).
        self.running = False
        self.partitions = options.partitions
        self._ttl_ms = max(1, round(options.lease_seconds * 1000))
        self._member = f"{options.consumer}:{secrets.token_hex(4)}"
        self._workers: dict[str, _Worker] = {}
        # Every worker task not yet finished, whatever became of its lease.
        self._worker_tasks: set[asyncio.Task[None]] = set()
        self._task: asyncio.Task[None] | None = None
        self._stopping = False
        self._split = redis.register_script(_SPLIT)
        self._commit = redis.register_script(_COMMIT)
        self._renew = redis.register_script(_RENEW)
        self._release = redis.register_script(_RELEASE)

    @property
    def partitions_held(self) -> int:
        return sum(1 for name in self._workers if name != "split")

    # -- keys ------------------------------------------------------------------

    @property
    def dead_letter_key(self) -> str:
        return f"{self.options.key}:refused"

    def partition_key(self, partition: int) -> str:
        return f"{self.options.key}:p{partition}"

    def _lease_key(self, name: str) -> str:
        return f"{self.options.key}:lease:{name}"

    # -- life cycle ------------------------------------------------------------

    async def start(self) -> None:
        self._task = asyncio.create_task(self._manage(), name="shim-ingest-stream")

    async def close(self, timeout: float = 10.0) -> None:
        """Stop consuming. A batch being published finishes first (published and
        committed), for at most `timeout` seconds; reads only waiting for new entries
        are abandoned at once. Leases are handed back so other nodes take over now."""
        task, self._task = self._task, None
        if task is None:
            return
        # The manager keeps renewing the leases (and takes no new ones) meanwhile:
        # a batch that outlasts a lease would not be committed.
        self._stopping = True
        try:
            async with asyncio.timeout(timeout):
                for worker in list(self._workers.values()):
                    worker.stopping = True
                    await worker.idle.wait()
        except TimeoutError:
            log.warning("ingest stream batch still in progress at shutdown: left to the next owner")
        task.cancel()
        with contextlib.suppress(asyncio.CancelledError):
            await task
        workers = list(self._workers.values())
        for worker in workers:
            await self._stop_worker(worker, release=True)
        for leftover in list(self._worker_tasks):  # its stop cut short by the cancel above
            leftover.cancel()
            with contextlib.suppress(asyncio.CancelledError):
                await leftover
        with contextlib.suppress(RedisError, OSError):
            await self.redis.zrem(f"{self.options.key}:nodes", self._member)
        self.running = False

    async def backlog(self) -> int:
        return await backlog(self.redis, self.options.key)

    # -- leases ----------------------------------------------------------------

    async def _manage(self) -> None:
        """Heartbeat, renew what is held, take a fair share, hand back the excess."""
        interval = self.options.lease_seconds / 3
        loop = asyncio.get_running_loop()
        while True:
            started = loop.time()
            try:
                await self._tick()
                self.running = True
            except (RedisError, OSError) as exc:
                self.running = False
                self.stats.failures += 1
                log.warning("ingest stream unavailable: %s", exc.__class__.__name__)
            except Exception:  # a bug must not stop the renewals of every lease
                self.running = False
                self.stats.failures += 1
                log.exception("ingest stream lease manager failed")
            pause = interval * random.uniform(0.9, 1.0) - (loop.time() - started)
            await asyncio.sleep(max(0.0, pause))

    async def _tick(self) -> None:
        key = self.options.key
        # Renewals first, in one round trip: they are what a slow tick would cost.
        workers = list(self._workers.values())
        reply = await self._renew(
            keys=[f"{key}:nodes", *(self._lease_key(w.name) for w in workers)],
            args=[self._member, self._ttl_ms, *(w.token for w in workers)],
        )
        alive = int(reply[0])
        for worker, held_still in zip(workers, reply[1:], strict=True):
            done = worker.task is None or worker.task.done()
            if done or not int(held_still):
                if not done and not worker.stopping:
                    log.warning("ingest stream lease %s lost", worker.name)
                await self._stop_worker(worker, release=done)

        pipe = self.redis.pipeline(transaction=False)
        pipe.set(f"{key}:partitions", self.options.partitions, nx=True)
        pipe.get(f"{key}:partitions")
        stored = int(_text((await pipe.execute())[1], str(self.options.partitions)))
        if stored != self.partitions:
            if stored != self.options.partitions:
                log.warning(
                    "ingest stream %s has %d partitions (configured: %d): using %d",
                    key,
                    stored,
                    self.options.partitions,
                    stored,
                )
            await self._stop_all()
            self.partitions = stored

        if self._stopping:
            return
        share = math.ceil(self.partitions / max(1, alive))
        held = sorted(
            (w for w in self._workers.values() if w.name != "split" and not w.stopping),
            key=lambda w: int(w.name[1:]),
        )
        for worker in held[share:]:
            # Hand over after the batch in progress; released once the worker ends.
            worker.stopping = True
        names = ["split"] + [f"p{n}" for n in range(self.partitions)]
        holders = await self.redis.mget([self._lease_key(name) for name in names])
        free = [name for name, holder in zip(names, holders, strict=True) if holder is None]
        random.shuffle(free)
        free.sort(key=lambda name: name != "split")  # the splitter first
        for name in free:
            if name in self._workers:
                continue
            if name != "split" and len(held) >= share:
                break
            token = f"{self._member}:{secrets.token_hex(6)}"
            if await self.redis.set(self._lease_key(name), token, nx=True, px=self._ttl_ms):
                worker = _Worker(name, token)
                run: Callable[[_Worker], Coroutine[Any, Any, None]] = (
                    self._run_splitter if name == "split" else self._run_partition
                )
                worker.task = asyncio.create_task(run(worker), name=f"shim-ingest-{name}")
                self._worker_tasks.add(worker.task)
                worker.task.add_done_callback(self._worker_tasks.discard)
                self._workers[name] = worker
                if name != "split":
                    held.append(worker)
                    self.stats.acquired += 1

    async def _stop_all(self) -> None:
        for worker in list(self._workers.values()):
            worker.stopping = True
            await worker.idle.wait()
            await self._stop_worker(worker, release=True)

    async def _stop_worker(self, worker: _Worker, *, release: bool) -> None:
        self._workers.pop(worker.name, None)
        # Also checked by its loop: redis-py's retries can swallow a cancel.
        worker.stopping = True
        if worker.task is not None and not worker.task.done():
            worker.task.cancel()
            with contextlib.suppress(asyncio.CancelledError):
                await worker.task
        if release:
            with contextlib.suppress(RedisError, OSError):
                released = await self._release(
                    keys=[self._lease_key(worker.name)], args=[worker.token]
                )
                if released and worker.name != "split":
                    self.stats.released += 1

    async def _retrying(self, worker: _Worker, step: Callable[[], Awaitable[bool]]) -> None:
        """Run `step` until the worker stops; back off while it fails (False or a Redis
        error). A lost lease ends the worker."""
        delay = 0.1
        while not (worker.stopping or self._stopping):
            try:
                if await step():
                    delay = 0.1
                    continue
            except _LeaseLost:
                self.stats.fenced += 1
                log.warning("ingest stream %s taken over by another node", worker.name)
                return
            except (RedisError, OSError) as exc:
                log.warning("ingest stream %s: %s", worker.name, exc.__class__.__name__)
            except Exception:
                log.exception("ingest stream %s failed", worker.name)
            self.stats.failures += 1
            await asyncio.sleep(delay + random.uniform(0, delay))
            delay = min(delay * 2, 5.0)

    # -- splitter --------------------------------------------------------------

    async def _run_splitter(self, worker: _Worker) -> None:
        key = self.options.key
        cursor = ""  # read on the first step (a Redis error there is retried too)

        async def step() -> bool:
            nonlocal cursor
            cursor = cursor or await self._start_cursor()
            response: Any = await self.redis.xread(
                {key: cursor}, count=self.options.batch, block=self.options.block_ms
            )
            entries: list[tuple[bytes, dict[bytes, bytes]]] = response[0][1] if response else []
            if not entries or worker.stopping:
                return True
            plan: list[str | int] = []
            for entry_id, fields in entries:
                plan += [entry_id.decode(), self._partition_of(fields.get(MESSAGE_FIELD, b""))]
            reply = await self._split(
                keys=[self._lease_key("split"), f"{key}:cursor", key],
                args=[worker.token, cursor, self.options.group, *plan],
            )
            if int(reply[0]) < 0:
                raise _LeaseLost
            self.stats.split += int(reply[0])
            self.stats.skipped_already_published += int(reply[1])
            cursor = str(plan[-2])
            return True

        await self._retrying(worker, step)

    async def _start_cursor(self) -> str:
        """The last input entry copied. On the very first start: before the oldest entry
        a node of the previous version left pending, or after the last one its group
        delivered, or (no group) the beginning of the stream."""
        key = self.options.key
        stored = await self.redis.get(f"{key}:cursor")
        if stored is not None:
            return _text(stored)
        start = "0-0"
        try:
            groups = await self.redis.xinfo_groups(key)
        except ResponseError:  # no stream yet
            groups = []
        for group in groups:
            if _text(group["name"]) != self.options.group:
                continue
            pending = await self.redis.xpending(key, self.options.group)
            if pending["pending"]:
                ms, seq = id_position(_text(pending["min"]))
                start = f"{ms}-{seq - 1}" if seq else f"{ms - 1}-{2**64 - 1}"
            else:
                start = _text(group["last-delivered-id"])
        await self.redis.set(f"{key}:cursor", start, nx=True)
        return _text(await self.redis.get(f"{key}:cursor"), start)

    def _partition_of(self, message: bytes) -> int:
        """By the first channel of the entry's first valid event, so every entry of a
        task lands in one partition; an entry with no valid event anywhere (it will be
        refused) in the first."""
        try:
            items = parse_broadcast(message, max_item_bytes=self.options.max_item_bytes)
        except BroadcastError:
            return 0
        for item in items:
            if isinstance(item, Accepted):
                channels = self.ingestor.router.route(item.event).channels
                if channels:
                    return partition_of(channels[0], self.partitions)
        return 0

    # -- partitions ------------------------------------------------------------

    async def _run_partition(self, worker: _Worker) -> None:
        partition = int(worker.name[1:])
        stream = self.partition_key(partition)
        cursor_key = f"{stream}:cursor"
        cursor = ""  # read on the first step (a Redis error there is retried too)
        # Read but not yet committed: retried as a whole after a failed publish.
        batch: list[tuple[bytes, dict[bytes, bytes]]] = []

        async def step() -> bool:
            nonlocal cursor, batch
            cursor = cursor or _text(await self.redis.get(cursor_key), "0-0")
            if not batch:
                response: Any = await self.redis.xread(
                    {stream: cursor}, count=self.options.batch, block=self.options.block_ms
                )
                batch = response[0][1] if response else []
                if not batch or worker.stopping:
                    batch = []
                    return True
            worker.idle.clear()
            try:
                refused = await self._publish_batch(stream, batch)
                if refused is None:
                    # Not stored: the same batch again, after a pause. Publications
                    # that were stored are Superseded then, not repeated.
                    log.warning("ingest stream %s: batch not stored, retrying", worker.name)
                    return False
                last = batch[-1][0].decode()
                reply = await self._commit(
                    keys=[self._lease_key(worker.name), cursor_key, stream, self.dead_letter_key],
                    args=[worker.token, cursor, last, next_id(last), self._ttl_ms, *refused],
                )
            finally:
                worker.idle.set()
            if int(reply) < 0:
                raise _LeaseLost
            self.stats.consumed += len(batch)
            self.stats.refused += len(refused) // 2
            cursor, batch = last, []
            return True

        await self._retrying(worker, step)

    async def _publish_batch(
        self, stream: str, batch: list[tuple[bytes, dict[bytes, bytes]]]
    ) -> list[str] | None:
        """Publish every event of the batch, in order, each behind its fence. Returns
        the (entry id, error) pairs refused, flattened, or None when something was not
        stored."""
        events: list[tuple[int, Event]] = []
        fences: list[Fence] = []
        sources: list[str] = []  # each event's input entry
        refused: list[str] = []
        ttl = self.options.fence_ttl_seconds
        for entry_id, fields in batch:
            source = fields.get(SOURCE_FIELD, b"").decode()
            try:
                ms, seq = id_position(source)
            except ValueError:  # not written by the splitter: no place to fence it by
                refused += [f"{stream}/{entry_id.decode()}", "no source entry id"]
                continue
            try:
                items = parse_broadcast(
                    with_stream_ids(fields.get(MESSAGE_FIELD, b""), source),
                    max_item_bytes=self.options.max_item_bytes,
                )
            except BroadcastError as exc:
                refused += [source, str(exc)]
                continue
            for item in items:
                if not isinstance(item, Accepted):
                    refused += [source, f"item {item.index}: {item.error}"]
                    continue
                events.append((item.index, item.event))
                fences.append(Fence(stream, (ms, seq, item.index), ttl))
                sources.append(source)
        if events:
            results = await self.ingestor.publish_events(events, fences)
            if any(result.status == "failed" for result in results):
                return None
            self.stats.superseded += sum(1 for result in results if result.superseded)
            for source, result in zip(sources, results, strict=True):
                if result.status == "refused":  # over a channel's publish rate limit
                    refused += [source, f"item {result.index}: {result.error}"]
        for index in range(0, len(refused), 2):
            log.warning("ingest stream entry %s refused: %s", refused[index], refused[index + 1])
        return refused


def with_stream_ids(message: bytes, entry_id: str) -> bytes:
    """The message with an id derived from its stream entry on every item that has
    none, so a re-published entry carries the same event ids. Unparseable input is
    returned unchanged for parse_broadcast to refuse."""
    try:
        document = orjson.loads(message)
    except orjson.JSONDecodeError:
        return message
    if isinstance(document, dict):
        document.setdefault("id", f"stream:{entry_id}")
    elif isinstance(document, list):
        for index, item in enumerate(document):
            if isinstance(item, dict):
                item.setdefault("id", f"stream:{entry_id}:{index}")
    else:
        return message
    return orjson.dumps(document)
