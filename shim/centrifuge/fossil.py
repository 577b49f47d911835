"""Fossil deltas (the format of Centrifuge's `delta: "fossil"`), creation only.

The format (fossil-scm.org, www/delta_format.wiki): the target length, "\\n", then
commands -- `<n>@<offset>,` copies n bytes of the source, `<n>:<bytes>` inserts n
literal bytes -- and `<checksum>;` last. Integers are written in a 64-digit alphabet.
The SDKs only apply deltas, so any valid command list decodes; this encoder is
tuned for what Dex streams: a message that grows or changes in a few places. It
copies the common prefix and suffix straight away (C-speed slice compares), then
looks for source blocks in what is left, so an append costs time in the appended
part only. No PyPI fossil encoder builds on Python 3.11 (fossil-delta 17.12.0 is a
2017 C extension that fails to compile), hence this module.
"""

from __future__ import annotations

from array import array

_DIGITS = b"0123456789ABCDEFGHIJKLMNOPQRSTUVWXYZ_abcdefghijklmnopqrstuvwxyz~"
# Source blocks indexed for matching inside the changed middle part.
_BLOCK = 16
# Bytes of source beyond its own changed part that are indexed too: edits move text
# around locally; indexing the whole source would cost time in what did not change.
_MARGIN = 128


def _int(value: int) -> bytes:
    if value == 0:
        return b"0"
    out = bytearray()
    while value:
        out.append(_DIGITS[value & 63])
        value >>= 6
    out.reverse()
    return bytes(out)


def checksum(data: bytes) -> int:
    """Sum of the big-endian 32-bit words of `data`, zero-padded, modulo 2**32."""
    padded = data + b"\0" * (-len(data) % 4)
    words = array("I")
    assert words.itemsize == 4
    words.frombytes(padded)
    if array("I", [1]).tobytes()[0] == 1:  # little-endian host
        words.byteswap()
    return sum(words) & 0xFFFFFFFF


def _common_prefix(a: bytes, b: bytes, limit: int) -> int:
    """Length of the common prefix of a and b, at most `limit` (binary search on slices)."""
    low, high = 0, limit
    while low < high:
        mid = (low + high + 1) // 2
        if a[low:mid] == b[low:mid]:
            low = mid
        else:
            high = mid - 1
    return low


def _common_suffix(a: bytes, b: bytes, limit: int) -> int:
    low, high = 0, limit
    la, lb = len(a), len(b)
    while low < high:
        mid = (low + high + 1) // 2
        if a[la - mid : la - low] == b[lb - mid : lb - low]:
            low = mid
        else:
            high = mid - 1
    return low


def _copy(count: int, offset: int) -> bytes:
    return _int(count) + b"@" + _int(offset) + b","


def _insert(literal: bytes) -> bytes:
    return _int(len(literal)) + b":" + literal


def _middle(
    source: bytes, target: bytes, start: int, end: int, window: tuple[int, int], out: list[bytes]
) -> None:
    """Commands for target[start:end]: copies of blocks of source[window] found there,
    literals between."""
    low, high = max(0, window[0] - _MARGIN), min(len(source), window[1] + _MARGIN)
    if end - start < 2 * _BLOCK or high - low < _BLOCK:
        if end > start:
            out.append(_insert(target[start:end]))
        return
    blocks: dict[bytes, int] = {}
    for offset in range(low, high - _BLOCK + 1, _BLOCK):
        blocks.setdefault(source[offset : offset + _BLOCK], offset)
    literal_from = start
    position = start
    while position + _BLOCK <= end:
        found = blocks.get(target[position : position + _BLOCK])
        if found is None:
            position += 1
            continue
        # Grow the match both ways (backwards only into the pending literal).
        back = _common_suffix(
            source[:found], target[literal_from:position], min(found, position - literal_from)
        )
        forward = _common_prefix(
            source[found:], target[position:end], min(len(source) - found, end - position)
        )
        if position - back > literal_from:
            out.append(_insert(target[literal_from : position - back]))
        out.append(_copy(back + forward, found - back))
        position += forward
        literal_from = position
    if end > literal_from:
        out.append(_insert(target[literal_from:end]))


def create(source: bytes, target: bytes) -> bytes:
    """A fossil delta that turns `source` into `target`."""
    out = [_int(len(target)), b"\n"]
    limit = min(len(source), len(target))
    prefix = _common_prefix(source, target, limit)
    suffix = _common_suffix(source, target, limit - prefix)
    if prefix:
        out.append(_copy(prefix, 0))
    _middle(source, target, prefix, len(target) - suffix, (prefix, len(source) - suffix), out)
    if suffix:
        out.append(_copy(suffix, len(source) - suffix))
    out.append(_int(checksum(target)))
    out.append(b";")
    return b"".join(out)
