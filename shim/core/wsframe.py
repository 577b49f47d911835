"""WebSocket frame headers for server-to-client text and binary frames (RFC 6455 §5.2).

Server frames are never masked, so a frame's bytes depend only on its payload:
the edge writes `text_frame_header(len(payload)) + payload` straight to the
transport (see shim/transport/edge.py) instead of going through hypercorn's per-frame chain.
"""

from __future__ import annotations

import struct

# FIN set, opcode 0x1 (text) or 0x2 (binary); no RSV bits: never compressed.
_FIN_TEXT = 0x81
_FIN_BINARY = 0x82
_HEADERS_SHORT = [bytes((_FIN_TEXT, n)) for n in range(126)]
_BINARY_HEADERS_SHORT = [bytes((_FIN_BINARY, n)) for n in range(126)]


def _header(first: int, short: list[bytes], length: int) -> bytes:
    if length < 126:
        return short[length]
    if length < 1 << 16:
        return struct.pack("!BBH", first, 126, length)
    if length < 1 << 63:
        return struct.pack("!BBQ", first, 127, length)
    raise ValueError(f"frame payload too long: {length}")


def text_frame_header(length: int) -> bytes:
    """The header of one unfragmented, unmasked text frame carrying `length` bytes."""
    return _header(_FIN_TEXT, _HEADERS_SHORT, length)


def binary_frame_header(length: int) -> bytes:
    """The same for a binary frame (Centrifuge Protobuf)."""
    return _header(_FIN_BINARY, _BINARY_HEADERS_SHORT, length)
