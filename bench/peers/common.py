"""What both peers share: the loopback socket they serve on, and routing a legacy hub
message to its room the way the shim routes `task.*` events (`task:<task_id>`)."""

from __future__ import annotations

import socket
from typing import Any


def loopback_socket() -> socket.socket:
    """A listening socket on a free 127.0.0.1 port; its port is printed for the runner."""
    sock = socket.socket(socket.AF_INET, socket.SOCK_STREAM)
    sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
    sock.bind(("127.0.0.1", 0))
    sock.listen(2048)
    return sock


def messages_of(body: Any) -> list[dict[str, Any]]:
    """A broadcast body is one legacy hub message or an array of them."""
    items = body if isinstance(body, list) else [body]
    return [item for item in items if isinstance(item, dict)]


def room_of(message: dict[str, Any]) -> str:
    payload = message.get("payload")
    task_id = payload.get("task_id", "") if isinstance(payload, dict) else ""
    return f"task:{task_id}"


def ready_line(port: int) -> str:
    return f"peer listening on 127.0.0.1:{port}"
