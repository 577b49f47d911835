"""The one place we reach into hypercorn: permessage-deflate on or off.

hypercorn 0.18 negotiates permessage-deflate whenever a client offers it and has
no setting for it. Compression costs memory per connection and CPU per client per
message (it defeats encode-once), so we want it off by default. Hypercorn builds a
`Handshake` from the request headers; we install a subclass that forgets the
offered extensions unless compression is enabled. It is process-wide (one node per
process) and checked against the hypercorn version it was written for.
"""

from __future__ import annotations

from importlib.metadata import version

from hypercorn.protocol import ws_stream

SUPPORTED_HYPERCORN = ("0.18.",)


class _NoCompressionHandshake(ws_stream.Handshake):
    def __init__(self, headers: list[tuple[bytes, bytes]], http_version: str) -> None:
        super().__init__(headers, http_version)
        self.extensions = None  # as if the client had offered none


_ORIGINAL_HANDSHAKE = ws_stream.Handshake


def set_websocket_compression(enabled: bool) -> None:
    installed = version("hypercorn")
    if not installed.startswith(SUPPORTED_HYPERCORN):
        raise RuntimeError(
            f"hypercorn {installed} is not one we checked the compression switch against; "
            f"supported: {SUPPORTED_HYPERCORN}"
        )
    ws_stream.Handshake = _ORIGINAL_HANDSHAKE if enabled else _NoCompressionHandshake  # type: ignore[misc]
