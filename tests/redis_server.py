"""A throwaway redis-server on a free loopback port, for tests that need a real Redis
(and may kill it). No persistence: a restart loses everything, like a crashed cache.

    async with RedisServer() as server:
        broker = RedisBroker([server.url])
        await server.kill()      # SIGKILL
        await server.start()     # same port again
"""

from __future__ import annotations

import asyncio
import contextlib
import signal
import socket
import tempfile
import time
from types import TracebackType

REDIS_SERVER = "/usr/bin/redis-server"
START_TIMEOUT_SECONDS = 5.0


def _free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return int(sock.getsockname()[1])


class RedisServer:
    def __init__(self, port: int | None = None) -> None:
        self.port = port or _free_port()
        self._dir = tempfile.TemporaryDirectory(prefix="dex-redis-")
        self._proc: asyncio.subprocess.Process | None = None

    @property
    def url(self) -> str:
        return f"redis://127.0.0.1:{self.port}/0"

    @property
    def running(self) -> bool:
        return self._proc is not None and self._proc.returncode is None

    async def start(self) -> None:
        """Start (or start again, on the same port) and wait until it answers PING."""
        if self.running:
            return
        self._proc = await asyncio.create_subprocess_exec(
            REDIS_SERVER,
            "--port",
            str(self.port),
            "--bind",
            "127.0.0.1",
            "--save",
            "",
            "--appendonly",
            "no",
            "--dir",
            self._dir.name,
            stdin=asyncio.subprocess.DEVNULL,
            stdout=asyncio.subprocess.DEVNULL,
            stderr=asyncio.subprocess.DEVNULL,
        )
        deadline = time.monotonic() + START_TIMEOUT_SECONDS
        while not await self._answers_ping():
            if self._proc.returncode is not None or time.monotonic() > deadline:
                await self.kill()
                raise RuntimeError(f"redis-server did not start on port {self.port}")
            await asyncio.sleep(0.01)

    async def _answers_ping(self) -> bool:
        try:
            reader, writer = await asyncio.open_connection("127.0.0.1", self.port)
        except OSError:
            return False
        try:
            writer.write(b"PING\r\n")
            return await asyncio.wait_for(reader.readline(), 1.0) == b"+PONG\r\n"
        except (OSError, TimeoutError):
            return False
        finally:
            writer.close()
            with contextlib.suppress(OSError):
                await writer.wait_closed()

    async def stop(self) -> None:
        """SIGTERM and wait (a clean shutdown; nothing is saved)."""
        await self._end(signal.SIGTERM)

    async def kill(self) -> None:
        """SIGKILL and wait: a crash."""
        await self._end(signal.SIGKILL)

    async def restart(self) -> None:
        await self.kill()
        await self.start()

    async def _end(self, sig: signal.Signals) -> None:
        proc, self._proc = self._proc, None
        if proc is None:
            return
        if proc.returncode is None:
            proc.send_signal(sig)
        await proc.wait()

    async def command(self, *args: str) -> bytes:
        """Run one command over a raw socket and return the raw reply (for checks that
        must not go through the code under test)."""
        reader, writer = await asyncio.open_connection("127.0.0.1", self.port)
        try:
            parts = [b"*%d\r\n" % len(args)]
            for arg in args:
                data = arg.encode()
                parts.append(b"$%d\r\n%s\r\n" % (len(data), data))
            writer.write(b"".join(parts))
            return await asyncio.wait_for(reader.readline(), 2.0)
        finally:
            writer.close()
            await writer.wait_closed()

    async def dbsize(self) -> int:
        reply = await self.command("DBSIZE")
        assert reply.startswith(b":"), reply
        return int(reply[1:])

    async def __aenter__(self) -> RedisServer:
        await self.start()
        return self

    async def __aexit__(
        self,
        exc_type: type[BaseException] | None,
        exc: BaseException | None,
        tb: TracebackType | None,
    ) -> None:
        await self.kill()
        self._dir.cleanup()
