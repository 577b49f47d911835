"""Every private hypercorn, wsproto, h11 and asyncio name the patches in
shim.transport.hypercorn_compat rely on, with the signature they call it with.

The patches check the hypercorn version at install time; these tests say which
name moved when a pinned version is bumped, before any socket misbehaves.
"""

from __future__ import annotations

import asyncio
import collections
import inspect
from collections.abc import Callable
from typing import Any

import h11
import h11._writers
import pytest
import wsproto
import wsproto.connection
from hypercorn.asyncio import task_group, tcp_server, worker_context
from hypercorn.protocol import h2 as hypercorn_h2
from hypercorn.protocol import h11 as hypercorn_h11
from hypercorn.protocol import ws_stream


def parameters(func: Callable[..., Any]) -> list[str]:
    return list(inspect.signature(func).parameters)


def assigns(cls: type, *attributes: str) -> None:
    """`cls.__init__` sets each of `attributes` on the instance."""
    source = inspect.getsource(cls.__init__)
    for attribute in attributes:
        assert f"self.{attribute} =" in source or f"self.{attribute}:" in source, (
            f"{cls.__module__}.{cls.__qualname__} no longer sets {attribute}"
        )


def test_task_group_runs_apps_the_way_our_lean_queue_replaces() -> None:
    assert parameters(task_group.TaskGroup.spawn_app) == ["self", "app", "config", "scope", "send"]
    assert parameters(task_group.TaskGroup.spawn) == ["self", "func", "args"]
    assert parameters(task_group._handle) == [
        "app",
        "config",
        "scope",
        "receive",
        "send",
        "sync_spawn",
        "call_soon",
    ]
    assigns(task_group.TaskGroup, "_loop")


def test_worker_context_builds_its_events_from_event_class() -> None:
    assert "event_class" in vars(worker_context.WorkerContext)
    assert "self.event_class()" in inspect.getsource(worker_context.WorkerContext)


def test_websocket_streams_are_built_from_names_we_replace() -> None:
    assert hypercorn_h11.WSStream is not None and hypercorn_h2.WSStream is not None
    assert parameters(ws_stream.Handshake.__init__) == ["self", "headers", "http_version"]
    assigns(ws_stream.Handshake, "extensions")
    assert parameters(ws_stream.WSStream.handle) == ["self", "event"]
    assert parameters(ws_stream.WSStream._accept) == ["self", "message"]
    assert parameters(ws_stream.WSStream._send_wsproto_event) == ["self", "event"]
    assigns(ws_stream.WSStream, "send", "scope", "closed")
    # `connection` is the stream's wsproto Connection once the handshake is accepted.
    assert "self.connection" in inspect.getsource(ws_stream.WSStream)


def test_the_wiring_from_a_stream_to_its_socket() -> None:
    # WSStream.send / HTTPStream.send is H11Protocol.stream_send, whose `send` is
    # TCPServer.protocol_send; the server holds the writer and the send lock.
    assert parameters(hypercorn_h11.H11Protocol.stream_send) == ["self", "event"]
    assigns(hypercorn_h11.H11Protocol, "send", "connection")
    assert parameters(tcp_server.TCPServer.protocol_send) == ["self", "event"]
    assigns(tcp_server.TCPServer, "writer", "send_lock")
    assert parameters(hypercorn_h11.H11WSConnection.__init__) == ["self", "h11_connection"]
    assigns(hypercorn_h11.H11WSConnection, "h11_connection")


def test_wsproto_keeps_pending_events_in_a_deque_and_extensions_on_its_protocol() -> None:
    # The upgrade is hypercorn's; WSStream.connection is this frame-level Connection.
    frames = wsproto.connection.Connection(wsproto.ConnectionType.SERVER)
    assert isinstance(frames._events, collections.deque)
    assert frames._proto.extensions == []
    assert parameters(frames.events) == []


def test_h11_writes_chunked_bodies_with_a_writer_it_keeps() -> None:
    assert isinstance(h11._writers.ChunkedWriter, type)
    connection = h11.Connection(h11.SERVER)
    assert hasattr(connection, "_writer")
    assert issubclass(h11.LocalProtocolError, Exception)


async def test_asyncio_stream_protocols_keep_drain_waiters_in_a_deque() -> None:
    async def serve(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        writer.close()

    server = await asyncio.start_server(serve, "127.0.0.1", 0)
    port = server.sockets[0].getsockname()[1]
    try:
        _reader, writer = await asyncio.open_connection("127.0.0.1", port)
        assert isinstance(writer._protocol._drain_waiters, collections.deque)  # type: ignore[attr-defined]
        writer.close()
    finally:
        server.close()
        await server.wait_closed()


@pytest.mark.parametrize("name", ["h11_connection", "wsproto_events", "drain_waiters"])
def test_a_memory_hook_that_cannot_apply_says_so_once(
    name: str, caplog: pytest.LogCaptureFixture
) -> None:
    from shim.transport import hypercorn_compat

    hypercorn_compat._UNAPPLIED.discard(name)
    with caplog.at_level("WARNING", logger="shim.hypercorn_compat"):
        hypercorn_compat._unapplied(name)
        hypercorn_compat._unapplied(name)
    said = [r for r in caplog.records if name in r.getMessage()]
    assert len(said) == 1 and "cannot apply" in said[0].getMessage()
