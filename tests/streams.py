"""Dex's growing-text stream: `quest.content_delta` events, each resending the whole
assistant message so far (see tests/data/legacy-broadcasts.json), for the fossil
delta tests and the bytes-on-the-wire measurement."""

from __future__ import annotations

from typing import Any

_WORDS = (  # noqa: SIM905 (prose reads better than a list of words)
    "Let me look at the auth middleware first, then check how the session tokens are "
    "refreshed. The handler reads the cookie, verifies it, and only then loads the user; "
    "a stale token therefore fails before any quest state is touched. I will open "
    "internal/auth/session.go and compare it with the refresh path in the client. "
).split()


def assistant_message(step: int) -> tuple[str, str]:
    """(content so far, fragment just received) after `step` streamed chunks."""
    words = [_WORDS[i % len(_WORDS)] for i in range(step * 3)]
    fragment = " ".join(words[-3:])
    return " ".join(words), fragment


def content_event(quest_id: str, step: int) -> dict[str, Any]:
    content, fragment = assistant_message(step)
    return {
        "type": "quest.content_delta",
        "payload": {"content": content, "delta": " " + fragment, "quest_id": quest_id},
    }
