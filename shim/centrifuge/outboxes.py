"""Outboxes that adapt what a session queues to its transport, on the way in.

The session and the publish path are the WebSocket ones, unchanged: they push the
same shared bytes into every client's outbox. An emulated client needs `session`
and `node` in its connect reply (it sends them back with each command); a
unidirectional client reads bare pushes. Both adaptations happen here, in `push`,
so the byte cap, the writer and the cut-off are exactly the WebSocket outbox's.
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

from shim.centrifuge import framing
from shim.core.outbox import Outbox


class EmulationOutbox(Outbox):
    __slots__ = ("_node_name", "_patch", "_session_id")

    def __init__(
        self,
        *args: Any,
        session_id: str,
        node_name: str,
        patch: Callable[[bytes, str, str], bytes | None] = framing.with_emulation_fields,
        **kwargs: Any,
    ) -> None:
        super().__init__(*args, **kwargs)
        self._session_id: str | None = session_id
        self._node_name = node_name
        # The wire's way of adding session and node to the connect reply.
        self._patch = patch

    def push(self, message: bytes) -> bool:
        session_id = self._session_id
        if session_id is not None:  # until the connect reply went out
            patched = self._patch(message, session_id, self._node_name)
            if patched is not None:
                message, self._session_id = patched, None
        return super().push(message)


class UniOutbox(Outbox):
    __slots__ = ("_session_id", "connect_error")

    def __init__(self, *args: Any, session_id: str, **kwargs: Any) -> None:
        super().__init__(*args, **kwargs)
        self._session_id = session_id
        # The code of a refused connect (0 while none), for the edge to close with.
        self.connect_error = 0

    def push(self, message: bytes) -> bool:
        converted, error = framing.uni_message(message, self._session_id)
        if error:
            self.connect_error = error
        if converted is None:
            return True  # a reply: unidirectional clients send no commands to answer
        return super().push(converted)
