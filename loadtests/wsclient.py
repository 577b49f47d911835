"""A small blocking WebSocket client for gevent greenlets.

websockets' sans-I/O `ClientProtocol` does the framing; the socket is the standard
library's, which gevent's monkey patching makes cooperative. Unlike
`websockets.sync.client` there is no background reader thread: bytes leave the
kernel only while the owner calls `recv`, so a user that stops calling it stalls the
connection for real (the kernel buffers fill and the server's writes block), and a
fast reader costs one greenlet instead of two plus a lock per message.
"""

from __future__ import annotations

import contextlib
import socket
import time

from websockets.client import ClientProtocol
from websockets.frames import Close, Frame, Opcode
from websockets.protocol import State
from websockets.uri import parse_uri

# Largest message accepted; the server's frames are at most 512 KiB by default.
MAX_MESSAGE_BYTES = 4 * 1024 * 1024
_READ_CHUNK = 65536


class WebSocketClosed(Exception):
    """The connection is over; `code` is the server's close code (1006 if none came)."""

    def __init__(self, code: int, reason: str = "") -> None:
        super().__init__(f"closed with {code} {reason}".strip())
        self.code = code
        self.reason = reason


class GeventWebSocket:
    """One client connection. Not shared between greenlets."""

    def __init__(self, sock: socket.socket, protocol: ClientProtocol) -> None:
        self.sock = sock
        self.protocol = protocol
        self._pending: list[str] = []
        self._fragments: list[bytes] = []
        self.bytes_received = 0

    @classmethod
    def connect(
        cls, url: str, *, timeout: float, rcvbuf: int | None = None, mss: int | None = None
    ) -> GeventWebSocket:
        """Open and upgrade within `timeout` seconds. `rcvbuf` shrinks the kernel
        receive buffer and `mss` the segment size the server may send; both are set
        before connecting because TCP agrees them in the handshake."""
        uri = parse_uri(url)
        sock = socket.socket(socket.AF_INET, socket.SOCK_STREAM)
        try:
            if rcvbuf is not None:
                sock.setsockopt(socket.SOL_SOCKET, socket.SO_RCVBUF, rcvbuf)
            if mss is not None:
                sock.setsockopt(socket.IPPROTO_TCP, socket.TCP_MAXSEG, mss)
            sock.settimeout(timeout)
            sock.connect((uri.host, uri.port))
            sock.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
            protocol = ClientProtocol(uri, max_size=MAX_MESSAGE_BYTES)
            client = cls(sock, protocol)
            protocol.send_request(protocol.connect())
            client._flush()
            client._handshake(time.monotonic() + timeout)
        except BaseException:
            sock.close()
            raise
        return client

    def _handshake(self, deadline: float) -> None:
        while True:
            remaining = deadline - time.monotonic()
            if remaining <= 0:
                raise TimeoutError("WebSocket handshake timed out")
            self.sock.settimeout(remaining)
            data = self.sock.recv(_READ_CHUNK)
            if not data:
                raise ConnectionError("server closed the connection during the handshake")
            self.protocol.receive_data(data)
            for event in self.protocol.events_received():
                if isinstance(event, Frame):
                    self._take(event)
                elif self.protocol.handshake_exc is not None:
                    raise self.protocol.handshake_exc
            if self.protocol.state is State.OPEN:
                return
            if self.protocol.handshake_exc is not None:
                raise self.protocol.handshake_exc

    def send_text(self, text: str) -> None:
        self.protocol.send_text(text.encode())
        self._flush()

    def recv(self, timeout: float, max_bytes: int | None = None, answer: bool = True) -> list[str]:
        """Text messages that arrived, waiting at most `timeout` seconds for the first
        (an empty list when none did), reading at most `max_bytes` from the socket.
        Answers WebSocket pings on the way unless `answer` is False."""
        if self._pending:
            messages, self._pending = self._pending, []
            return messages
        self.sock.settimeout(timeout)
        try:
            data = self.sock.recv(max_bytes or _READ_CHUNK)
        except TimeoutError:
            return []
        except OSError as exc:
            raise WebSocketClosed(1006, str(exc)) from exc
        if data:
            self.bytes_received += len(data)
            self.protocol.receive_data(data)
        else:
            self.protocol.receive_eof()
        for event in self.protocol.events_received():
            if isinstance(event, Frame):
                self._take(event)
        if answer:
            self._flush()
        messages, self._pending = self._pending, []
        if not messages and self.protocol.state is State.CLOSED:
            raise WebSocketClosed(*self._close_status())
        if not messages and self.protocol.close_rcvd is not None:
            raise WebSocketClosed(*self._close_status())
        return messages

    def read_to_close(self, seconds: float, idle: float = 0.3) -> int | None:
        """Read and drop whatever arrives until the server's close (its code is
        returned), `idle` seconds without a byte, or `seconds` in all (None). Pings
        are not answered: a pong to a server that already closed the socket makes
        it reset the connection, and the reset throws away the unread close frame."""
        deadline = time.monotonic() + seconds
        try:
            while time.monotonic() < deadline:
                before = self.bytes_received
                self.recv(idle, answer=False)
                if self.bytes_received == before and not self._pending:
                    return None
        except WebSocketClosed as closed:
            return closed.code
        return None

    def _take(self, frame: Frame) -> None:
        if frame.opcode is Opcode.TEXT or frame.opcode is Opcode.BINARY:
            if frame.fin:
                self._pending.append(bytes(frame.data).decode())
            else:
                self._fragments = [bytes(frame.data)]
        elif frame.opcode is Opcode.CONT:
            self._fragments.append(bytes(frame.data))
            if frame.fin:
                self._pending.append(b"".join(self._fragments).decode())
                self._fragments = []

    def _close_status(self) -> tuple[int, str]:
        received: Close | None = self.protocol.close_rcvd
        if received is None:
            return 1006, ""
        return received.code, received.reason

    def _flush(self) -> None:
        try:
            for chunk in self.protocol.data_to_send():
                if chunk:
                    self.sock.sendall(chunk)
        except OSError as exc:
            # The server is gone (a reset after it cut us off, say): report its close.
            code, reason = self._close_status()
            raise WebSocketClosed(code, reason or str(exc)) from exc

    @property
    def close_code(self) -> int | None:
        received = self.protocol.close_rcvd
        return None if received is None else received.code

    def close(self) -> None:
        """Send a normal close (best effort, never blocks long) and drop the socket."""
        with contextlib.suppress(Exception):
            if self.protocol.state is State.OPEN:
                self.protocol.send_close(1000)
                self.sock.settimeout(1.0)
                self._flush()
        with contextlib.suppress(OSError):
            self.sock.close()
