"""The official Centrifuge `client.proto` as protobuf message classes.

Loaded from the vendored, compiled descriptor (proto/client.desc, see
proto/README.md) into a private pool: centrifuge-python registers its own copy of
the same file in protobuf's default pool, and both may live in one process.
"""

from __future__ import annotations

from importlib import resources
from typing import Any

from google.protobuf import descriptor_pb2, descriptor_pool, message_factory

PACKAGE = "centrifugal.centrifuge.protocol"


def _load() -> descriptor_pool.DescriptorPool:
    raw = resources.files("shim.centrifuge").joinpath("proto/client.desc").read_bytes()
    files = descriptor_pb2.FileDescriptorSet.FromString(raw)
    pool = descriptor_pool.DescriptorPool()
    for file in files.file:
        pool.Add(file)
    return pool


POOL = _load()


def message_class(name: str) -> Any:
    """The generated class of `name` (e.g. "Reply"); typed Any, fields are dynamic."""
    return message_factory.GetMessageClass(POOL.FindMessageTypeByName(f"{PACKAGE}.{name}"))


Command = message_class("Command")
Reply = message_class("Reply")
Publication = message_class("Publication")
ClientInfo = message_class("ClientInfo")
