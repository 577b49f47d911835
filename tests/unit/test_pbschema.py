"""The compiled descriptor the server loads matches the vendored client.proto."""

from __future__ import annotations

import re
from pathlib import Path

from shim.centrifuge import pbschema

PROTO = Path(pbschema.__file__).parent / "proto" / "client.proto"
_MESSAGE = re.compile(r"^message (\w+)\s*\{")
_FIELD = re.compile(r"^\s+(?:repeated\s+)?(?:map<[^>]+>|[\w.]+)\s+(\w+)\s*=\s*(\d+)\s*;")


def proto_fields() -> dict[str, dict[str, int]]:
    """message -> field -> number, read from the .proto text (top-level messages only)."""
    messages: dict[str, dict[str, int]] = {}
    current = None
    for line in PROTO.read_text().splitlines():
        if match := _MESSAGE.match(line):
            current = messages.setdefault(match.group(1), {})
            if line.rstrip().endswith("}"):  # `message PingResult {}`
                current = None
        elif line.startswith("}"):
            current = None
        elif current is not None and (match := _FIELD.match(line)):
            current[match.group(1)] = int(match.group(2))
    return messages


def test_descriptor_has_every_message_and_field_of_the_proto() -> None:
    expected = proto_fields()
    assert len(expected) > 40 and expected["Reply"]["push"] == 4
    for name, fields in expected.items():
        descriptor = pbschema.POOL.FindMessageTypeByName(f"{pbschema.PACKAGE}.{name}")
        assert {f.name: f.number for f in descriptor.fields} == fields, name


def test_private_pool_coexists_with_the_sdk_copy() -> None:
    # centrifuge-python registers its own client.proto in the default pool.
    import centrifuge.protocol.client_pb2 as sdk  # type: ignore[import-untyped]

    ours = pbschema.Reply(id=7)
    ours.push.channel = "a"
    assert sdk.Reply.FromString(ours.SerializeToString()).push.channel == "a"
