"""Legacy hub client commands, parsed as Go's encoding/json parsed them.

Keys match case-insensitively and the last of duplicates wins; a wrong type for a
known field, trailing bytes, an empty frame or a non-object drops the whole
command. The hub never answered a command, so neither do we: the caller only
counts the ones it could not use.
"""

from __future__ import annotations

import json
from dataclasses import dataclass

KNOWN_FIELDS = ("action", "task_id", "project_id")


@dataclass(slots=True, frozen=True)
class LegacyCommand:
    action: str = ""
    task_id: str = ""
    project_id: str = ""


class MalformedCommand(ValueError):
    """The frame is not a command the Go hub would have decoded."""


class _Object(list[tuple[str, object]]):
    """A decoded JSON object as its pairs in order, so case-variant duplicate keys
    resolve as Go's decoder resolves them (the last one wins)."""


def _no_constants(name: str) -> object:
    raise MalformedCommand(f"{name} is not JSON")


def parse_command(frame: str | bytes) -> LegacyCommand:
    """The command in one frame, or MalformedCommand."""
    text = frame.decode("utf-8", errors="replace") if isinstance(frame, bytes) else frame
    try:
        document = json.loads(text, object_pairs_hook=_Object, parse_constant=_no_constants)
    except (ValueError, RecursionError) as exc:
        raise MalformedCommand(str(exc)) from None
    if document is None:
        return LegacyCommand()  # Go decodes `null` into a struct as "nothing set"
    if not isinstance(document, _Object):
        raise MalformedCommand("not a JSON object")
    fields: dict[str, str] = {}
    for key, value in document:
        # Go folds case when matching keys to fields (so does str.casefold for the
        # ASCII names involved, including the Kelvin sign and long s Go folds too).
        name = key.casefold()
        if name not in KNOWN_FIELDS:
            continue
        if value is None:
            continue  # null leaves a Go string field unchanged
        if not isinstance(value, str):
            raise MalformedCommand(f"{name} must be a string")
        fields[name] = value
    return LegacyCommand(**fields)
