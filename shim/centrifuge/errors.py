"""How a command handler ends a command early: an error reply, or a disconnect."""

from __future__ import annotations

from shim.centrifuge import codes


class Reject(Exception):
    """A command fails with a reply error."""

    def __init__(self, error: codes.ErrorCode, message: str | None = None) -> None:
        super().__init__(message or error.message)
        self.error = error
        self.message = message


class Disconnect(Exception):
    """A command makes the whole connection close with a disconnect code."""

    def __init__(self, code: codes.DisconnectCode) -> None:
        super().__init__(code.reason)
        self.code = code
