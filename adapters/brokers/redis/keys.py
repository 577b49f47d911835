"""Which shard holds a channel, and the names of its keys. Pure: no I/O.

Shard choice: the jump consistent hash (Lamping & Veach, 2014) of the 64-bit FNV-1a
hash of the channel's UTF-8 bytes, over the number of Redis URLs, in the order given.
Every node must list the same URLs in the same order. Adding a shard at the end
moves only about 1/n of the channels (to the new shard).

Keys of one channel share the hash tag `{<channel>}` so they stay in one Cluster slot
and one Lua script may touch them all. Braces and "%" in the channel are
percent-escaped so the tag always ends at our closing brace and distinct channels
never share keys.
"""

from __future__ import annotations

from dataclasses import dataclass

_FNV_OFFSET = 0xCBF29CE484222325
_FNV_PRIME = 0x100000001B3
_MASK64 = (1 << 64) - 1


def fnv1a_64(data: bytes) -> int:
    value = _FNV_OFFSET
    for byte in data:
        value = ((value ^ byte) * _FNV_PRIME) & _MASK64
    return value


def jump_hash(key: int, buckets: int) -> int:
    """Bucket in [0, buckets) for a 64-bit key."""
    if buckets < 1:
        raise ValueError("buckets must be positive")
    bucket, candidate = -1, 0
    while candidate < buckets:
        bucket = candidate
        key = (key * 2862933555777941757 + 1) & _MASK64
        candidate = int((bucket + 1) * ((1 << 31) / ((key >> 33) + 1)))
    return bucket


def shard_index(channel: str, shards: int) -> int:
    if shards == 1:
        return 0
    return jump_hash(fnv1a_64(channel.encode()), shards)


def _tag(channel: str) -> str:
    return channel.replace("%", "%25").replace("{", "%7B").replace("}", "%7D")


@dataclass(slots=True, frozen=True)
class ChannelKeys:
    """Every Redis name of one channel under a prefix."""

    # Hash: "e" epoch, "s" top offset. Lives history_meta_ttl after the last publish.
    meta: str
    # List of history entries, oldest first; offsets are consecutive, ending at "s".
    history: str
    # Hash client id -> info body.
    presence: str
    # Sorted set client id -> expiry (Unix ms, Redis clock).
    presence_expiry: str
    # Hash client id -> user, for counting distinct users without reading infos.
    presence_users: str
    # Hash: fenced source -> "<a>-<b>-<c>", its last position here (see shim.core.broker.Fence).
    fence: str
    # Pub/sub channel (not a key; no slot constraint).
    pubsub: bytes


def channel_keys(prefix: str, channel: str, *, sharded_pubsub: bool = False) -> ChannelKeys:
    """`sharded_pubsub`: the pub/sub name carries the channel's hash tag too, so it
    lives in the slot of the keys (Redis Cluster's SPUBLISH from the publish script
    and SSUBSCRIBE on the slot's master need that)."""
    tag = _tag(channel)
    base = f"{prefix}:{{{tag}}}"
    if sharded_pubsub:
        pubsub = pubsub_prefix(prefix) + f"{{{tag}}}".encode()
    else:
        pubsub = pubsub_prefix(prefix) + channel.encode()
    return ChannelKeys(
        meta=f"{base}:meta",
        history=f"{base}:hist",
        presence=f"{base}:pres",
        presence_expiry=f"{base}:pexp",
        presence_users=f"{base}:puser",
        fence=f"{base}:fence",
        pubsub=pubsub,
    )


def channel_of_sharded(suffix: bytes) -> str | None:
    """The channel of a sharded pub/sub name's suffix ("{<tag>}"), or None."""
    if len(suffix) < 2 or suffix[:1] != b"{" or suffix[-1:] != b"}":
        return None
    text = suffix[1:-1].decode()
    return text.replace("%7D", "}").replace("%7B", "{").replace("%25", "%")


def pubsub_prefix(prefix: str) -> bytes:
    return f"{prefix}:pub:".encode()


def check_prefix(prefix: str) -> str:
    if not prefix or any(c in prefix for c in "{}"):
        raise ValueError("prefix must be non-empty and contain no braces")
    return prefix
