from __future__ import annotations

import pytest
from wsproto.connection import Connection, ConnectionType
from wsproto.events import TextMessage
from wsproto.frame_protocol import FrameDecoder, Opcode

from shim.core.wsframe import text_frame_header


@pytest.mark.parametrize(
    ("length", "header"),
    [
        (0, b"\x81\x00"),
        (5, b"\x81\x05"),
        (125, b"\x81\x7d"),
        (126, b"\x81\x7e\x00\x7e"),
        (65535, b"\x81\x7e\xff\xff"),
        (65536, b"\x81\x7f\x00\x00\x00\x00\x00\x01\x00\x00"),
    ],
)
def test_header_vectors(length: int, header: bytes) -> None:
    assert text_frame_header(length) == header


@pytest.mark.parametrize("length", [0, 1, 125, 126, 127, 65535, 65536, 300_000])
def test_frames_equal_what_wsproto_would_send(length: int) -> None:
    payload = "é" * (length // 2) + "x" * (length % 2)
    data = payload.encode()
    server = Connection(ConnectionType.SERVER)
    assert text_frame_header(len(data)) + data == server.send(TextMessage(payload))


def test_a_client_decodes_the_frame() -> None:
    decoder = FrameDecoder(client=True)
    decoder.receive_bytes(text_frame_header(11) + b"hello world")
    frame = decoder.process_buffer()
    assert frame is not None
    assert (frame.opcode, frame.payload, frame.frame_finished) == (
        Opcode.TEXT,
        b"hello world",
        True,
    )


def test_too_long_is_refused() -> None:
    with pytest.raises(ValueError):
        text_frame_header(1 << 63)
