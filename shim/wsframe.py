"""WebSocket frame headers for server-to-client text frames (RFC 6455 §5.2).

Server frames are never masked, so a frame's bytes depend only on its payload:
the edge writes `text_frame_header(len(payload)) + payload` straight to the
transport (see shim/edge.py) instead of going through hypercorn's per-frame chain.
"""

from __future__ import annotations

import struct

# FIN set, opcode 0x1 (text); no RSV bits: never compressed.
_FIN_TEXT = 0x81
_HEADERS_SHORT = [bytes((_FIN_TEXT, n)) for n in range(126)]


def text_frame_header(length: int) -> bytes:
    """The header of one unfragmented, unmasked text frame carrying `length` bytes."""
    if length < 126:
        return _HEADERS_SHORT[length]
    if length < 1 << 16:
        return struct.pack("!BBH", _FIN_TEXT, 126, length)
    if length < 1 << 63:
        return struct.pack("!BBQ", _FIN_TEXT, 127, length)
    raise ValueError(f"frame payload too long: {length}")
